"""Issue 21, item 7: a failure on one process of a 2-process job (2 fake CPU devices each, joined on 127.0.0.1)
stops both within a minute, each naming the failing process and its error; none hangs at a collective.
Injected into the real code paths by tests/inject_failure.py: process 0's safetensors write fails (disk full)
while process 1 takes part in the export's all-gathers; process 1's teacher-logits writes fail (a TensorStore
write error); process 1's orbax checkpoint save fails (an orbax error on one host only). The lead's failed
`mkdir` and a refusal raised inside process 0's decision: tests/core/test_multihost.py."""

import time
from pathlib import Path

import pytest
from distill_helpers import make_pair, run_cli, two_processes

SCRIPT = str(Path(__file__).parents[1] / "inject_failure.py")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("pair"))


def failing_job(who: int, what: str, argv: list[str]) -> tuple[list, float]:
    t = time.monotonic()
    done = two_processes([SCRIPT, str(who), what], argv, devices=2, timeout=300)
    return done, time.monotonic() - t


def check_stopped_together(done, took: float, who: int, message: str) -> None:
    logs = [d.stdout + d.stderr for d in done]
    assert all(d.returncode not in (0, None) for d in done), ([d.returncode for d in done], logs)
    assert took < 90, took  # start-up and compiles included; the stop itself takes seconds
    other = logs[1 - who]
    assert f"process {who}: " in other and message in other, other[-3000:]


def test_export_whose_safetensors_write_fails_on_process_0(pair, tmp_path):
    teacher, _, _ = pair
    run_cli(["convert", str(teacher), str(tmp_path / "ckpt")], devices=4)
    done, took = failing_job(0, "safetensors", ["export", str(tmp_path / "ckpt"), str(tmp_path / "hf")])
    check_stopped_together(done, took, 0, "No space left on device (injected)")
    assert not (tmp_path / "hf").exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_distill_whose_orbax_save_fails_on_process_1(pair, tmp_path):
    t, s, d = pair
    done, took = failing_job(1, "orbax", [
        "distill", f"teacher={t}", f"student={s}", f"data={d}", f"out={tmp_path / 'run'}", "batch_size=4",
        "seq_len=64", "holdout=[tempest]", "steps=4", "eval_every=100", "save_every=2", "warmup=0",
        "mesh=[1,-1,1]"])
    check_stopped_together(done, took, 1, "orbax: async save failed on this host (injected)")
    assert not (tmp_path / "run" / "student_hf").exists()
