"""Offline teacher top-k logits (`minitron teacher-logits`, `distill teacher_logits=`): the stored values equal
an independent transformers forward of the teacher on the loader's rows, a run from them equals the online
top-k run, an interrupted write resumes to identical arrays, two processes write one store (also when the mesh
interleaves their devices, and a distillation on such a mesh reads it as one process does), and a store that
belongs to other rows or another teacher is refused before step 0."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

from minitron_jax.core.errors import LogitsError
from minitron_jax.data.loader import Loader, training_data
from minitron_jax.run.teacher_pass import write_teacher_logits
from minitron_jax.train.run_config import RunConfig
from minitron_jax.train.stored_logits import LogitsConfig, TeacherLogits

S, B, K = 32, 8, 16
KILL_AT = """
import os, signal, sys
from minitron_jax.core import progress
real = progress.Progress.update
def update(self, steps=1, tokens=0, **m):
    rec = real(self, steps, tokens, **m)
    if self.desc == "teacher-logits" and self.step == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup: committed rows, written-but-uncommitted rows
    return rec
progress.Progress.update = update
from minitron_jax.run.cli import main
main(["teacher-logits", *sys.argv[2:]])
"""


def make_setup(root, family="llama"):
    from distill_helpers import make_pair

    from minitron_jax.data.tokenize import tokenize
    teacher, student, text = make_pair(root, family=family)
    tokenize([str(text)], teacher, str(root / "store"), workers=1, progress=False)
    return teacher, student, root / "store"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("tl"))


def recipe(setup, out, **kw) -> RunConfig:
    teacher, student, store = setup
    base = dict(teacher=str(teacher), student=str(student), data=str(store), seq_len=S, batch_size=B, steps=5,
                warmup=1, holdout=["tempest"], eval_every=100, eval_batches=1, save_every=100, peak_tflops=1.0,
                out=str(out))
    return RunConfig(**{**base, **kw}).validate()


def cli_args(setup, out, *extra):
    teacher, _, store = setup
    return [f"teacher={teacher}", f"data={store}", f"out={out}", f"seq_len={S}", f"batch_size={B}", f"k={K}",
            "holdout=[tempest]", *extra]


KILL_AFTER_ARRAYS = """
import os, signal, sys
from minitron_jax.run import teacher_pass
real = teacher_pass._arrays
def arrays(*a, **kw):
    out = real(*a, **kw)
    os.kill(os.getpid(), signal.SIGKILL)  # the arrays exist, no row is written
teacher_pass._arrays = arrays
from minitron_jax.run.cli import main
main(["teacher-logits", *sys.argv[1:]])
"""


@pytest.fixture(scope="module")
def whole(setup, tmp_path_factory):
    """An uninterrupted store of 36 rows (commit_every=2), for the interrupted ones to equal."""
    from distill_helpers import run_cli
    out = tmp_path_factory.mktemp("whole") / "tl"
    run_cli(["teacher-logits", *cli_args(setup, out, "samples=36", "commit_every=2")], devices=1)
    return out


def assert_same_store(a, b) -> None:
    a, b = read_all(a), read_all(b)
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k].view(np.uint8), b[k].view(np.uint8))


def read_all(path) -> dict[str, np.ndarray]:
    st = TeacherLogits(path)
    return st.read(0, st.rows)


def test_stored_topk_equals_a_transformers_forward_of_the_teacher(setup, tmp_path):
    """Row j of the store is row j of the loader's order; per position the stored top-k values are the
    teacher's logits rounded to bfloat16, the indices name logits that large (the top k, up to ties), and lse is
    the whole row's log-sum-exp: all from a transformers forward of every document piece of the row (segment
    ids: positions restart, attention stays inside the piece), fp32, rel 1e-5 before rounding."""
    check_stored_topk(setup, tmp_path)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_family_teacher_stored_topk_equals_transformers(tmp_path, family):
    """The same for a Qwen2 (biases) and a Qwen3 (q/k norms) teacher."""
    check_stored_topk(make_setup(tmp_path / "pair", family), tmp_path)


def bf16(x) -> np.ndarray:
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def assert_bf16_rounding(stored: np.ndarray, ref: np.ndarray, rtol: float = 1e-5) -> None:
    """Each stored bfloat16 value is the rounding of a value within `rtol` of `ref` (fp32): a logit that close to
    a rounding boundary may round either way, so exact equality with bf16(ref) would test the last fp32 bits."""
    ok = (stored == bf16(ref)) | (stored == bf16(ref * (1 - rtol))) | (stored == bf16(ref * (1 + rtol)))
    assert ok.all(), (stored[~ok], ref[~ok])


def check_stored_topk(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    teacher = setup[0]
    rc = recipe(setup, tmp_path / "tl")
    m = write_teacher_logits(rc, LogitsConfig(k=K, samples=20), log=lambda s: None)
    assert m["rows"] == 20 and 0 < m["topk_mass"] < 1
    got = read_all(tmp_path / "tl")
    want, segs = loader_rows(rc, teacher, 20)
    np.testing.assert_array_equal(got["tokens"], want)
    assert got["values"].dtype == ml_dtypes.bfloat16 and got["indices"].dtype == np.int32
    hf = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    checked = 0
    for r in range(20):
        for s in np.unique(segs[r][segs[r] > 0]):
            pos = np.flatnonzero(segs[r] == s)
            with torch.no_grad():
                z = hf(torch.tensor(want[r, pos][None].astype(np.int64))).logits[0].numpy()
            top = -np.sort(-z, axis=-1)[:, :K]
            vals = got["values"][r, pos].astype(np.float32)
            idx = got["indices"][r, pos]
            assert_bf16_rounding(vals, top)
            at = np.take_along_axis(z, idx, axis=-1)  # the logits the stored ids name
            np.testing.assert_allclose(at, top, rtol=1e-5, atol=1e-5)  # exact ids, up to ties
            lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
            np.testing.assert_allclose(got["lse"][r, pos], lse, rtol=1e-5)
            checked += len(pos)
    assert checked > 300


def loader_rows(rc, teacher, n) -> tuple[np.ndarray, np.ndarray]:
    """The first n rows of the recipe's loader order: (input_ids, segment_ids), [n, S] each."""
    from minitron_jax.io.hf import load_tokenizer
    rows, _, stream = training_data(rc, load_tokenizer(teacher), 512)
    loader = Loader(rows, B, seed=rc.seed, stream=stream, process_index=0, process_count=1)
    steps = range(-(-n // B))
    return (np.concatenate([loader.batch_at(s)["input_ids"] for s in steps])[:n],
            np.concatenate([loader.batch_at(s)["segment_ids"] for s in steps])[:n])


@pytest.fixture(scope="module")
def fp32_teacher(setup, tmp_path_factory):
    """16 rows of float32 values written with teacher_dtype=float32 and compute_dtype=bfloat16 (a bf16
    student distilled from an fp32 teacher): (its recipe, the store)."""
    out = tmp_path_factory.mktemp("fp32") / "tl"
    rc = recipe(setup, out, steps=2, compute_dtype="bfloat16", teacher_dtype="float32")
    write_teacher_logits(rc, LogitsConfig(k=K, samples=16, values_dtype="float32"), log=lambda s: None)
    return rc, out


def test_stored_logits_are_computed_at_the_teacher_dtype_not_compute_dtype(setup, fp32_teacher):
    """teacher_dtype=float32 with compute_dtype=bfloat16: the stored float32 top-k values equal an fp32
    transformers forward's top k (rel 1e-5; a bfloat16 teacher forward is off by ~1e-2), their ids are the
    same ids wherever the k + 1 largest logits are 1e-4 apart (no near-tie), and the ids name logits that large
    everywhere; the manifest records the teacher's dtype."""
    from transformers import AutoModelForCausalLM
    rc, out = fp32_teacher
    teacher = setup[0]
    got = read_all(out)
    assert got["values"].dtype == np.float32
    want, segs = loader_rows(rc, teacher, 16)
    np.testing.assert_array_equal(got["tokens"], want)
    hf = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    checked = untied = 0
    for r in range(16):
        for s in np.unique(segs[r][segs[r] > 0]):
            pos = np.flatnonzero(segs[r] == s)
            with torch.no_grad():
                z = hf(torch.tensor(want[r, pos][None].astype(np.int64))).logits[0].numpy()
            order = np.argsort(-z, axis=-1, kind="stable")[:, :K + 1]
            top = np.take_along_axis(z, order, axis=-1)
            np.testing.assert_allclose(got["values"][r, pos], top[:, :K], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(np.take_along_axis(z, got["indices"][r, pos], axis=-1), top[:, :K],
                                       rtol=1e-5, atol=1e-5)
            apart = (-np.diff(top, axis=-1) > 1e-4).all(-1)
            np.testing.assert_array_equal(got["indices"][r, pos][apart], order[apart, :K])
            checked, untied = checked + len(pos), untied + int(apart.sum())
    assert checked > 200 and untied > 0.5 * checked, (checked, untied)
    assert TeacherLogits(out).manifest["identity"]["teacher_dtype"] == "float32"


def test_a_store_for_another_teacher_dtype_is_refused_before_step_0(setup, fp32_teacher, tmp_path):
    """Logits stored at teacher_dtype=float32; a run whose teacher runs at bfloat16 (teacher_dtype unset,
    compute_dtype=bfloat16, as the online teacher would) is refused naming both dtypes and the fix; the same
    run with teacher_dtype=float32 passes the check."""
    from minitron_jax.train.trainer import train
    rc, store = fp32_teacher
    run = recipe(setup, tmp_path / "run", steps=2, compute_dtype="bfloat16", teacher_logits=str(store))
    with pytest.raises(LogitsError, match=r"computed at float32, but this run's teacher runs at bfloat16.*set "
                                          r"teacher_dtype=float32.*teacher-logits` with teacher_dtype=bfloat16"):
        train(run, log=lambda s: None)
    assert not (tmp_path / "run" / "checkpoints").exists()
    TeacherLogits(store).check_run(recipe(setup, tmp_path / "ok", steps=2, compute_dtype="bfloat16",
                                          teacher_dtype="float32"), setup[0], 16)


def test_a_teacher_changed_in_the_middle_of_a_tensor_is_refused(setup, tmp_path):
    """One bit flipped in the middle byte of the teacher's largest tensor (far from its first and last 4 KiB)
    after its logits were stored: the distillation run is refused before step 0 naming the teacher's weights,
    and `teacher-logits` into the same store refuses it naming the teacher."""
    import shutil

    from minitron_jax.io.hf import open_checkpoint
    from minitron_jax.train.trainer import train
    teacher = shutil.copytree(setup[0], tmp_path / "teacher")
    rc = recipe((teacher, *setup[1:]), tmp_path / "tl", steps=2)
    write_teacher_logits(rc, LogitsConfig(k=K, samples=16), log=lambda s: None)
    files = open_checkpoint(teacher)
    name = max(files, key=lambda n: np.subtract(*files[n].header[n]["data_offsets"][::-1]))
    a, b = files[name].header[name]["data_offsets"]
    assert b - a > 4 * 8192, (name, b - a)
    at = files[name].data_start + a + (b - a) // 8 * 4  # the low byte of a float32 in the middle
    with open(files[name].path, "r+b") as fh:
        fh.seek(at)
        byte = fh.read(1)[0]
        fh.seek(at)
        fh.write(bytes([byte ^ 1]))
    run = recipe((teacher, *setup[1:]), tmp_path / "run", steps=2, teacher_logits=str(tmp_path / "tl"))
    with pytest.raises(LogitsError, match="the teacher's weights or config"):
        train(run, log=lambda s: None)
    assert not (tmp_path / "run" / "checkpoints").exists()
    with pytest.raises(LogitsError, match="already holds teacher logits for other settings: the teacher"):
        write_teacher_logits(rc, LogitsConfig(k=K, samples=16), log=lambda s: None)


def test_a_run_from_stored_logits_equals_the_online_top_k_run(setup, tmp_path):
    """Same batches, float32 stored values: the per-step loss, KL and CE equal the online top_k=K run's to 1e-5
    for 5 steps, and the final parameters agree; the offline run builds its steps without a teacher."""
    from distill_helpers import metrics

    from minitron_jax.io.hf import open_checkpoint
    from minitron_jax.train.objective import kd_config
    from minitron_jax.train.steps import build_steps
    from minitron_jax.train.trainer import train
    write_teacher_logits(recipe(setup, tmp_path / "tl"), LogitsConfig(k=K, samples=40, values_dtype="float32"),
                         log=lambda s: None)
    online = recipe(setup, tmp_path / "online", top_k=K)
    offline = recipe(setup, tmp_path / "offline", teacher_logits=str(tmp_path / "tl"))
    for rc in (online, offline):
        train(rc, log=lambda s: None)
    a, b = metrics(tmp_path / "online"), metrics(tmp_path / "offline")
    assert len(a) == len(b) == 5
    for x, y in zip(a, b):
        assert x["batch_fingerprint"] == y["batch_fingerprint"]
        for k in ("loss", "kl", "ce"):
            assert abs(x[k] - y[k]) <= 1e-5 * abs(x[k]), (k, x[k], y[k])
    wa, wb = (open_checkpoint(tmp_path / n / "student_hf") for n in ("online", "offline"))
    for name in wa:
        np.testing.assert_allclose(wb[name].tensor(name), wa[name].tensor(name), rtol=1e-4, atol=1e-6)
    from minitron_jax.model.config import LlamaConfig
    s_cfg, t_cfg = LlamaConfig.from_file(setup[1]), LlamaConfig.from_file(setup[0])
    from minitron_jax.model.sharding import make_mesh
    built = build_steps(offline, s_cfg, t_cfg, make_mesh(1, -1, 1), kd_config(offline))
    assert built.teacher is None and built.batch["t_values"].shape == (1, B, S, K)


def test_interrupted_write_resumes_to_identical_arrays(setup, whole, tmp_path):
    """SIGKILL after step 3 of 5 (36 rows of 8 per step) (commit_every=2: rows of step 3 written, not committed); the same command then
    finishes the store, and every array equals an uninterrupted run's."""
    from distill_helpers import run_cli
    part = tmp_path / "part"
    p = subprocess.run([sys.executable, "-c", KILL_AT, "3", *cli_args(setup, part, "samples=36", "commit_every=2")],
                       env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert not (part / "manifest.json").exists()
    assert json.loads((part / "state.json").read_text())["rows_done"] == 2 * B
    with pytest.raises(LogitsError, match="did not finish"):
        TeacherLogits(part)
    r = run_cli(["teacher-logits", *cli_args(setup, part, "samples=36", "commit_every=2")], devices=1)
    assert "resuming" in r.stdout + r.stderr
    assert_same_store(whole, part)
    assert not (part / "state.json").exists()


def test_a_write_killed_before_its_first_commit_resumes(setup, whole, tmp_path):
    """SIGKILL right after the arrays are created (no row written, nothing committed): the store says the run
    did not finish, the same command resumes it at row 0, and every array equals an uninterrupted run's."""
    from distill_helpers import run_cli
    part = tmp_path / "part"
    args = cli_args(setup, part, "samples=36", "commit_every=2")
    p = subprocess.run([sys.executable, "-c", KILL_AFTER_ARRAYS, *args],
                       env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert (part / "values" / "zarr.json").exists() and not (part / "manifest.json").exists()
    assert json.loads((part / "state.json").read_text())["rows_done"] == 0
    with pytest.raises(LogitsError, match="did not finish"):
        TeacherLogits(part)
    r = run_cli(["teacher-logits", *args], devices=1)
    assert f"resuming {part} at row 0 of 36" in r.stdout + r.stderr
    assert_same_store(whole, part)
    assert not (part / "state.json").exists()


def test_a_tensorstore_write_error_on_one_process_stops_both(setup, tmp_path):
    """Process 1's writes fail as a TensorStore write error does (at `.result()`): both processes stop within
    90 s (start-up included), process 0 naming process 1's error; the store is never marked complete."""
    import time

    from distill_helpers import two_processes
    t = time.monotonic()
    done = two_processes([str(Path(__file__).parents[1] / "inject_failure.py"), "1", "tensorstore", "teacher-logits"],
                         cli_args(setup, tmp_path / "tl", "samples=24"), devices=2, timeout=300)
    took = time.monotonic() - t
    assert all(d.returncode not in (0, None) for d in done) and took < 90, ([d.returncode for d in done], took)
    assert "process 1: " in done[0].stderr and "tensorstore: error writing local file" in done[0].stderr, \
        done[0].stderr[-3000:]
    assert not (tmp_path / "tl" / "manifest.json").exists()


def test_two_processes_write_one_store(setup, tmp_path):
    """2 processes x 4 devices, each writing its rows of every global batch, give the 1-process store."""
    from distill_helpers import run_cli, two_processes
    run_cli(["teacher-logits", *cli_args(setup, tmp_path / "one", "samples=24")], devices=1)
    done = two_processes(["-m", "minitron_jax.run.cli", "teacher-logits"], cli_args(setup, tmp_path / "two", "samples=24"))
    assert [d.returncode for d in done] == [0, 0], done[0].stderr[-2000:] + done[1].stderr[-2000:]
    a, b = read_all(tmp_path / "one"), read_all(tmp_path / "two")
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    # 1 device and 2 x 4 devices (fsdp) sum the matmuls in another order: the fp32 logits agree to about 1e-6,
    # so a stored bfloat16 value may sit one unit in the last place away; the ids agree wherever the values do
    va, vb = a["values"].astype(np.float32), b["values"].astype(np.float32)
    ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(va), 1e-30))) - 7)
    assert (np.abs(va - vb) <= ulp).all() and (va != vb).mean() < 1e-3, (va != vb).sum()
    same = (va == vb).all(-1)
    np.testing.assert_array_equal(a["indices"][same], b["indices"][same])
    np.testing.assert_allclose(a["lse"], b["lse"], rtol=1e-5)


INTERLEAVED = str(__import__("pathlib").Path(__file__).parents[1] / "interleaved_devices.py")


def interleaved_job(record, argv) -> list[dict]:
    """`minitron ARGV` as 2 processes x 2 devices whose meshes interleave them (p0d0, p1d0, p0d1, p1d1:
    tests/interleaved_devices.py); each process's record (mesh order, the row blocks it holds)."""
    from distill_helpers import two_processes
    done = two_processes([INTERLEAVED, str(record)], argv, devices=2)
    assert [d.returncode for d in done] == [0, 0], done[0].stderr[-3000:] + done[1].stderr[-3000:]
    return [json.loads((record / f"p{i}.json").read_text()) for i in range(2)]


@pytest.fixture(scope="module")
def interleaved(setup, tmp_path_factory):
    """The 36 rows of `whole` (commit_every=2, the last batch half used) written by 2 processes whose devices
    interleave: (the store, each process's record)."""
    root = tmp_path_factory.mktemp("interleaved")
    recs = interleaved_job(root / "record", ["teacher-logits", *cli_args(setup, root / "tl", "samples=36",
                                                                         "commit_every=2")])
    return root / "tl", recs


def test_two_processes_with_interleaved_devices_write_the_one_process_store(whole, interleaved):
    """The mesh orders the devices p0d0, p1d0, p0d1, p1d1, so each process holds two separate row blocks of
    every global batch (rows 0-1 and 4-5 of 8 on process 0); each process still writes its loader rows
    (p*b .. p*b + b of the batch) at their store rows: the store equals the 1-process one byte for byte
    (tokens, values, indices, lse), the rows past samples=36 of the last batch included."""
    store, recs = interleaved
    assert [r["mesh"] for r in recs] == [[0, 1, 0, 1]] * 2
    assert [r["rows_lead0"] for r in recs] == [[[0, 2], [4, 6]], [[2, 4], [6, 8]]]
    assert_same_store(whole, store)


def test_distilling_on_interleaved_devices_reads_the_rows_of_one_process(setup, interleaved, tmp_path):
    """A distillation from that store (grad_accum=2) on the 2 interleaved processes gives the per-step losses of
    1 process reading it (rel 1e-5): each process reads its loader rows of the store, and they go through the
    same placement as its tokens, whichever devices hold them."""
    from distill_helpers import metrics, run_cli
    teacher, student, data = setup
    store = interleaved[0]

    def argv(out):
        return ["distill", f"teacher={teacher}", f"student={student}", f"data={data}", f"out={out}",
                f"teacher_logits={store}", f"seq_len={S}", f"batch_size={B}", "grad_accum=2", "steps=4", "warmup=1",
                "holdout=[tempest]", "eval_every=100", "save_every=100", "peak_tflops=1", "export=false"]
    run_cli(argv(tmp_path / "one"), devices=4)
    recs = interleaved_job(tmp_path / "record", argv(tmp_path / "two"))
    assert [r["mesh"] for r in recs] == [[0, 1, 0, 1]] * 2
    assert [r["rows_lead1"] for r in recs] == [[[0, 1], [2, 3]], [[1, 2], [3, 4]]]  # micro-batches of 4 rows
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for k in ("loss", "kl"):
            assert abs(x[k] - y[k]) <= 1e-5 * abs(x[k]), (k, x[k], y[k])

def test_a_store_for_other_rows_or_another_teacher_is_refused_before_step_0(setup, tmp_path):
    from minitron_jax.core.errors import TrainingError
    from minitron_jax.train.trainer import train
    write_teacher_logits(recipe(setup, tmp_path / "tl"), LogitsConfig(k=K, samples=40), log=lambda s: None)
    cases = {"seq_len": dict(seq_len=16), "holdout": dict(holdout=["sonnets"]), "seed": dict(seed=1),
             "split_seed": dict(split_seed=1), "holds 40 rows": dict(steps=6)}
    for what, kw in cases.items():
        with pytest.raises(LogitsError, match=what):
            train(recipe(setup, tmp_path / what.replace(" ", "_"), teacher_logits=str(tmp_path / "tl"), **kw),
                  log=lambda s: None)
        assert not (tmp_path / what.replace(" ", "_") / "checkpoints").exists()
    from minitron_jax.data.tokenize import tokenize
    tokenize([str(setup[0].parent / "data")], setup[0], str(tmp_path / "store2"), workers=1, progress=False)
    with pytest.raises(LogitsError, match="the token store"):
        train(recipe(setup, tmp_path / "s2", data=str(tmp_path / "store2"), teacher_logits=str(tmp_path / "tl")),
              log=lambda s: None)
    with pytest.raises(TrainingError, match="top_k=8"):
        train(recipe(setup, tmp_path / "k", teacher_logits=str(tmp_path / "tl"), top_k=8), log=lambda s: None)
    # another teacher: same shapes and tokenizer, other weights
    from distill_helpers import make_pair
    other = make_pair(tmp_path / "other")[0]
    import shutil
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (setup[0] / f).exists():
            shutil.copy(setup[0] / f, other / f)
    from helpers import save_tiny
    save_tiny(other, seed=7, vocab_size=512, hidden_size=72, intermediate_size=96, num_hidden_layers=4,
              num_attention_heads=9, num_key_value_heads=3, head_dim=8, tie_word_embeddings=True)
    with pytest.raises(LogitsError, match="teacher's weights"):
        train(recipe(setup, tmp_path / "t2", teacher=str(other), teacher_logits=str(tmp_path / "tl")),
              log=lambda s: None)


def test_teacher_logits_refuses_text_data_and_an_out_that_is_something_else(setup, tmp_path):
    from minitron_jax.core.errors import RecipeError
    text = setup[0].parent / "data"
    with pytest.raises(RecipeError, match="tokenize the text first"):
        write_teacher_logits(recipe(setup, tmp_path / "tl", data=str(text)), LogitsConfig(k=K, samples=8),
                             log=lambda s: None)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(LogitsError, match="not an unfinished teacher-logits store"):
        write_teacher_logits(recipe(setup, other), LogitsConfig(k=K, samples=8), log=lambda s: None)
    assert (other / "notes.txt").read_text() == "mine" and sorted(p.name for p in other.iterdir()) == ["notes.txt"]


def test_a_store_in_cloud_storage_from_a_teacher_there(setup, whole, gs_dir, tmp_path):
    """Issue 22: `minitron teacher-logits` with the teacher, the token store and `out` on gs:// (the emulator)
    writes the arrays of a local store; a distillation reads them from the bucket (its teacher identity hashed by
    ranged reads) exactly as from the local store."""
    from distill_helpers import metrics, run_cli
    from helpers import upload

    from minitron_jax.train.trainer import train
    teacher, _, store = setup
    remote = {"teacher": upload(teacher, f"{gs_dir}/teacher"), "store": upload(store, f"{gs_dir}/store")}
    out = f"{gs_dir}/tl"
    run_cli(["teacher-logits", *cli_args((remote["teacher"], None, remote["store"]), out, "samples=36",
                                         "commit_every=2")], devices=1)
    assert_same_store(whole, out)
    for name, logits, t in (("local", whole, teacher), ("remote", out, remote["teacher"])):
        train(recipe(setup, tmp_path / name, teacher=str(t), teacher_logits=str(logits), steps=2, export=False,
                     data=remote["store"] if name == "remote" else str(store)), log=lambda s: None)
    a, b = metrics(tmp_path / "local"), metrics(tmp_path / "remote")
    assert [(r["loss"], r["batch_fingerprint"]) for r in a] == [(r["loss"], r["batch_fingerprint"]) for r in b]
