"""The trainer (train/trainer.py) preempted and on bad steps, on a pod: SIGTERM on one process stops every
process after the same step with one checkpoint, `minitron distill` then exits 143 so that a scheduler
requeues it, and the resumed run ends where an uninterrupted one does; a non-finite gradient stops the run
before its state is saved. (A batch that does not split over the data-parallel devices: test_preflight.py.)"""

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from distill_helpers import ENV, metrics, two_processes

from minitron_jax.io.hf import open_checkpoint

HOOK = str(Path(__file__).parents[1] / "train_with_hook.py")
ROOT = Path(__file__).parents[2]
COMMON = ["seq_len=64", "holdout=[tempest]", "eval_every=100", "peak_tflops=1", "warmup=1", "save_every=100"]
# micro-batches of 4 rows over data x fsdp = 4 devices; each of 2 processes feeds 2 of them
POD = ["steps=6", "batch_size=8", "grad_accum=2", "mesh=[2,2,2]"]


def args(pair, out, *extra):
    t, s, d = pair
    return [f"teacher={t}", f"student={s}", f"data={d}", f"out={out}", *COMMON, *extra]


def checkpoints(out) -> list[int]:
    return sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())


def weights(out) -> dict[str, np.ndarray]:
    ck = open_checkpoint(out / "student_hf")
    return {name: np.asarray(ck[name].tensor(name)) for name in ck}


def test_sigterm_on_one_process_stops_both_at_the_same_step(pair, tmp_path):
    """Only process 1 gets SIGTERM, after step 3: both stop after step 3, save checkpoint 3 together and
    exit 143; the resumed 2-process run ends with the weights of an uninterrupted 2-process run."""
    out = tmp_path / "pod"
    stopped = two_processes([HOOK, "sigterm", "3@1"], args(pair, out, *POD))
    logs = [p.stdout + p.stderr for p in stopped]
    for i, (p, log) in enumerate(zip(stopped, logs)):
        assert p.returncode == 143, f"process {i}: exit {p.returncode}\n{log[-3000:]}"
        assert '"preempted_at": 3' in p.stdout, log[-3000:]
        assert re.search(r"minitron distill: preempted \(SIGTERM\) after step 3: saved step 3 to \S+checkpoints; "
                         r"rerun with resume=true to continue", p.stderr), log[-3000:]
    assert "SIGTERM on process 1: saved step 3" in logs[0], logs[0][-3000:]  # process 0 logs; it got no signal
    assert checkpoints(out) == [3]
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
    assert not (out / "student_hf").exists()

    cli = ["-m", "minitron_jax.run.cli", "distill"]
    resumed = two_processes(cli, args(pair, out, *POD, "resume=true"))
    assert [p.returncode for p in resumed] == [0, 0], resumed[0].stderr[-3000:] + resumed[1].stderr[-3000:]
    assert "at step 3" in resumed[0].stdout + resumed[0].stderr
    ref = tmp_path / "ref"
    whole = two_processes(cli, args(pair, ref, *POD))
    assert [p.returncode for p in whole] == [0, 0], whole[0].stderr[-3000:] + whole[1].stderr[-3000:]
    assert [r["batch_fingerprint"] for r in metrics(out)] == [r["batch_fingerprint"] for r in metrics(ref)]
    a, b = weights(out), weights(ref)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-7, err_msg=name)


def test_minitron_distill_exits_143_after_sigterm(pair, tmp_path):
    """The real CLI, one process: SIGTERM once metrics.jsonl shows step 2; the step in flight finishes, is
    saved (save_every=100: no checkpoint was due), and the exit code is 128 + SIGTERM."""
    out = tmp_path / "cli"
    env = {**os.environ, **ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.Popen([sys.executable, "-m", "minitron_jax.run.cli", "distill",
                             *args(pair, out, "steps=400", "batch_size=4", "mesh=[1,1,8]")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and any(r["step"] >= 2 for r in metrics(out)):
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, f"exit {proc.returncode}\n{stdout[-3000:]}\n{stderr[-3000:]}"
    last = stderr.strip().splitlines()[-1]
    m = re.fullmatch(r"minitron distill: preempted \(SIGTERM\) after step (\d+): saved step (\d+) to (\S+); "
                     r"rerun with resume=true to continue", last)
    assert m and m[1] == m[2] and Path(m[3]) == out / "checkpoints", last
    step = int(m[1])
    assert 2 <= step < 400
    assert checkpoints(out) == [step]
    assert metrics(out)[-1]["step"] == step and f'"preempted_at": {step}' in stdout
    assert not (out / "student_hf").exists()


def test_non_finite_gradient_stops_before_saving(pair, tmp_path, monkeypatch):
    """The train step returns a finite loss but an infinite gradient norm (and NaN parameters) at step 3,
    with save_every=1: the run stops naming step 3 and the last good checkpoint, step 2, and nothing of
    step 3 reaches the disk."""
    import jax
    import jax.numpy as jnp

    from minitron_jax.train import trainer
    from minitron_jax.train.run_config import load_recipe

    real, calls = trainer.build_steps, []

    def build_steps(*a, **k):
        steps = real(*a, **k)

        def step(state, teacher, batch):
            state, m = steps.train(state, teacher, batch)
            calls.append(float(m["loss"]))
            if len(calls) == 3:
                state = jax.tree.map(lambda x: x * jnp.nan if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
                m = {**m, "grad_norm": jnp.asarray(jnp.inf)}
            return state, m
        return dataclasses.replace(steps, train=step)

    monkeypatch.setattr(trainer, "build_steps", build_steps)
    out = tmp_path / "inf"
    rc = load_recipe(None, args(pair, out, "steps=5", "batch_size=4", "mesh=[1,1,8]", "save_every=1"))
    with pytest.raises(trainer.TrainingError, match=r"grad_norm is inf at step 3: stopped without saving this state\. "
                                                    r"The last good checkpoint is step 2 in \S+checkpoints "
                                                    r"\(resume=true continues from it\); lower lr"):
        trainer.train(rc, log=lambda m: None)
    assert len(calls) == 3 and all(np.isfinite(calls))  # the loss was finite: only the gradient check stops it
    assert checkpoints(out) == [1, 2]
    assert [r["step"] for r in metrics(out)] == [1, 2]
    assert not (out / "student_hf").exists()
