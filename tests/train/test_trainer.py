"""Distillation: learning works, SPMD and multi-process runs give the 1-device trajectory, a killed job
resumes exactly, and bad input stops before work with a clear message."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from distill_helpers import make_pair, metrics, run_cli, short_documents, train_with_hook

from minitron_jax.io.hf import open_checkpoint
from minitron_jax.run.cli import main
from minitron_jax.train.run_config import load_recipe
from minitron_jax.train.trainer import train

COMMON = ["batch_size=4", "seq_len=64", "holdout=[tempest]", "eval_every=100", "peak_tflops=1", "warmup=1"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("pair"), sharpen=8.0)


def args(pair, out, *extra):
    t, s, d = pair
    return [f"teacher={t}", f"student={s}", f"data={d}", f"out={out}", *COMMON, *extra]


@pytest.fixture(scope="module")
def short_pair(pair, tmp_path_factory):
    """The pair with many short documents: first_fit rows then hold very different numbers of tokens."""
    return (*pair[:2], short_documents(pair[2], tmp_path_factory.mktemp("short") / "data"))


# the reference run and the runs compared with it: first_fit packing and 2 micro-batches per step, so
# that every comparison also checks the token weighting of gradient accumulation; micro-batches of 4
# rows split over the 4 data-parallel devices (data x fsdp)
PACKED = ("steps=10", "save_every=5", "mesh=[2,2,2]", "packing=first_fit", "grad_accum=2", "batch_size=8")


def test_kd_halves_held_out_kl(tmp_path):
    """30 steps: a student with layer 2 of 4 removed recovers more than half of its held-out KL."""
    depth_pair = make_pair(tmp_path / "pair", sharpen=8.0, target="drop_layers=2")
    rc = load_recipe(None, args(depth_pair, tmp_path / "run", "steps=30", "lr=1e-3", "warmup=3", "eval_every=30",
                                "save_every=30", "batch_size=16", "mesh=[1,1,8]"))
    summary = train(rc, log=lambda m: None)
    start, end = summary["start_eval"]["held_out_kl"], summary["held_out_kl"]
    print(f"held-out KL: step 0 {start:.4f} -> step 30 {end:.4f}")
    assert end < 0.5 * start
    # the run leaves an HF student that transformers loads (exported in the stored dtype)
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student_hf") is not None
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert all({"loss", "kl", "ce", "grad_norm", "lr", "tokens_per_s", "mfu"} <= set(r) for r in rows)
    assert list((tmp_path / "run" / "tensorboard").iterdir())


@pytest.fixture(scope="module")
def reference(short_pair, tmp_path_factory):
    """10 steps on 8 devices, (2, 2, 2) mesh, in a fresh process: the trajectory the others must match."""
    out = tmp_path_factory.mktemp("ref") / "run"
    run_cli(["distill", *args(short_pair, out, *PACKED)])
    return out


def test_mesh_matches_single_device(short_pair, reference, tmp_path):
    # same recipe (the LR schedule depends on `steps`), one device
    run_cli(["distill", *args(short_pair, tmp_path / "one", *PACKED, "mesh=[1,1,1]")], devices=1)
    ref, one = metrics(reference)[:5], metrics(tmp_path / "one")[:5]
    np.testing.assert_allclose([r["loss"] for r in one], [r["loss"] for r in ref], rtol=1e-5)
    assert [r["batch_fingerprint"] for r in one] == [r["batch_fingerprint"] for r in ref]


def test_two_processes_match_one(short_pair, reference, tmp_path):
    """launch/local.sh: two processes with 4 fake devices each, joined by jax.distributed on 127.0.0.1.
    Each process's rows form its part of every micro-batch, so which rows share a micro-batch depends on
    the process count: only the token-weighted accumulation makes the losses agree."""
    out = tmp_path / "mp"
    env = {**os.environ, "PYTHON": sys.executable, "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
    proc = subprocess.run(["bash", "launch/local.sh", "2", "4", "distill", *args(short_pair, out, *PACKED)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[p0]" in proc.stdout and "[p1]" in proc.stdout
    np.testing.assert_allclose([r["loss"] for r in metrics(out)][:5], [r["loss"] for r in metrics(reference)[:5]],
                               rtol=1e-5)
    assert (out / "student_hf" / "model.safetensors").exists()


def test_killed_job_resumes_exactly(short_pair, reference, tmp_path):
    out = tmp_path / "killed"
    crashed = train_with_hook("kill", 7, args(short_pair, out, *PACKED), check=False)
    assert crashed.returncode == -9, crashed.stdout[-3000:] + crashed.stderr[-3000:]  # SIGKILL: no cleanup ran
    assert not (out / "student_hf").exists()
    resumed = run_cli(["distill", *args(short_pair, out, *PACKED, "resume=true")])
    assert "at step 5" in resumed.stdout + resumed.stderr
    runs = metrics(out)  # steps 1-7 of the killed run, then 6-10 of the resumed one
    assert [r["step"] for r in runs] == [1, 2, 3, 4, 5, 6, 7, 6, 7, 8, 9, 10]
    ref = metrics(reference)
    assert [r["batch_fingerprint"] for r in runs[7:]] == [r["batch_fingerprint"] for r in ref[5:]]
    a, b = open_checkpoint(out / "student_hf"), open_checkpoint(reference / "student_hf")
    for name in a:
        np.testing.assert_allclose(np.asarray(a[name].tensor(name)), np.asarray(b[name].tensor(name)),
                                   rtol=0, atol=1e-7, err_msg=name)


def test_sigterm_checkpoints_and_resumes(short_pair, reference, tmp_path):
    """A hook raises SIGTERM at step 3 (save_every=100: no checkpoint is due): the trainer finishes the
    step, checkpoints it, `minitron distill` exits 143; the resumed run ends with the uninterrupted run's
    weights."""
    out = tmp_path / "preempted"
    stopped = train_with_hook("sigterm", 3, args(short_pair, out, *PACKED, "save_every=100"), check=False)
    log = stopped.stdout + stopped.stderr
    assert stopped.returncode == 143, log[-3000:]
    assert "SIGTERM: saved step 3" in log and '"preempted_at": 3' in log, log[-3000:]
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [3]
    assert not (out / "student_hf").exists()
    resumed = run_cli(["distill", *args(short_pair, out, *PACKED, "save_every=100", "resume=true")])
    assert "at step 3" in resumed.stdout + resumed.stderr
    assert [r["step"] for r in metrics(out)] == list(range(1, 11))
    a, b = open_checkpoint(out / "student_hf"), open_checkpoint(reference / "student_hf")
    for name in a:
        np.testing.assert_allclose(np.asarray(a[name].tensor(name)), np.asarray(b[name].tensor(name)),
                                   rtol=0, atol=1e-7, err_msg=name)


# ---------------------------------------------------------------------------- clear errors
def test_errors_before_work(pair, tmp_path):
    t, s, d = pair
    base = args(pair, tmp_path / "e", "steps=2", "mesh=[1,1,8]")
    # vocabulary mismatch
    other = tmp_path / "other"
    shutil.copytree(s, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["vocab_size"] = 49153
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SystemExit, match="vocabulary"):
        main(["distill", *base, f"student={other}"])
    # tokenizer mismatch (same size, different tokens)
    shutil.rmtree(other)
    shutil.copytree(s, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[100], list(vocab)[101]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(SystemExit, match="tokenizers .* differ"):
        main(["distill", *base, f"student={other}"])
    # data missing / empty
    with pytest.raises(SystemExit, match="does not exist"):
        main(["distill", *base, f"data={tmp_path / 'nope'}"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no non-empty documents"):
        main(["distill", *base, f"data={tmp_path / 'empty'}"])
    # sequence longer than the model's positions
    with pytest.raises(SystemExit, match="max_position_embeddings"):
        main(["distill", *base, "seq_len=100000"])
    # unknown key
    with pytest.raises(SystemExit, match="unknown recipe keys"):
        main(["distill", *base, "stepz=3"])
    assert not (tmp_path / "e" / "checkpoints").exists()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(pair, tmp_path):
    import re
    out = tmp_path / "nan"
    # here the gradient goes non-finite a step before the loss does (lr=1e30): the check on grad_norm
    # stops the run then, before the NaN parameters that step made are saved
    with pytest.raises(SystemExit, match=r"(loss|grad_norm) is (nan|inf) at step \d+: stopped without saving") as err:
        main(["distill", *args(pair, out, "steps=6", "save_every=1", "lr=1e30", "warmup=0", "clip=1e30",
                                "mesh=[1,1,8]")])
    bad, good = map(int, re.search(r"at step (\d+):.*last good checkpoint is step (\d+)", str(err.value)).groups())
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert good == bad - 1 == steps[-1]  # the NaN state was never written; the one before it was
    assert not (out / "student_hf").exists()
