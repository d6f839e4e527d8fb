"""core.multihost on 2 local processes joined on 127.0.0.1 (1 fake CPU device each): process 0's decisions and
errors reach the other process, inputs and storage the processes do not share are refused on both, and a failure
on one process stops both within a minute with its message (never a hang at a collective)."""

import json
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "multihost_job.py"


def job(scenario: str, d: Path, timeout: int = 120) -> tuple[list[int], list[str], float]:
    """SCRIPT SCENARIO D as 2 processes (1 CPU device each) joined on 127.0.0.1: return codes, logs, seconds."""
    from distill_helpers import two_processes
    t = time.monotonic()
    done = two_processes([str(SCRIPT), scenario], [str(d)], devices=1, timeout=timeout)
    return [p.returncode for p in done], [p.stdout + p.stderr for p in done], time.monotonic() - t


def test_process_0_decides_and_its_errors_reach_every_process(tmp_path):
    """A listing process 1 cannot see (its files are only where process 0 looks) is process 0's on both, also
    when process 0 makes it inside another decision (the decisions after it still line up: no hang); a
    LockError raised by process 0's decision is raised as a LockError with its message on process 1."""
    (tmp_path / "a").write_text("x")
    codes, logs, _ = job("decide", tmp_path)
    assert codes == [0, 0], "\n".join(logs)
    d0, d1 = (json.loads((tmp_path / f"decided{i}.json").read_text()) for i in range(2))
    assert d0 == d1 and d0["pid"] == 0 and d0["listing"] == ["a"]
    for i in range(2):
        assert (tmp_path / f"error{i}.txt").read_text() == "LockError: held by run 7 on host-a"
        assert json.loads((tmp_path / f"agree{i}.json").read_text()) == ["v0", "v1"]


def test_shared_output_passes_and_private_disks_stop_both(tmp_path):
    codes, logs, _ = job("shared", tmp_path)
    assert codes == [0, 0], "\n".join(logs)
    assert not [p for p in (tmp_path / "out").iterdir()], "the token is removed"
    codes, logs, took = job("private", tmp_path)
    assert codes == [1, 1] and took < 60, (codes, took)
    for log in logs:
        assert "is not storage every host shares: process(es) 1 cannot read a file process 0 wrote" in log, log
        assert "gs://" in log


def test_inputs_that_differ_between_processes_are_refused_on_both(tmp_path):
    codes, logs, took = job("inputs", tmp_path)
    assert codes == [1, 1] and took < 60, (codes, took)
    for log in logs:
        assert "do not see the same model: tokenizer (process 1) differ" in log, log


def test_an_output_written_by_process_0_is_in_place_before_any_process_goes_on(tmp_path):
    """atomic_directory on 2 processes: one temporary name (process 0's token) on both, and when the `with` ends
    the output is installed on every process (the next stage, on every host, reads it)."""
    codes, logs, _ = job("atomic", tmp_path)
    assert codes == [0, 0], "\n".join(logs)
    a, b = (json.loads((tmp_path / f"atomic{i}.json").read_text()) for i in range(2))
    assert a["tmp"] == b["tmp"] and a["tmp"].startswith(".out.tmp-") and a["installed"] and b["installed"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]


@pytest.mark.parametrize("scenario, who, message", [
    ("mkdir-fails-on-0", 0, "Permission denied"),
    ("error-on-1", 1, "No space left on device"),
    ("bug-on-0", 0, "KeyError: 'injected bug on process 0'"),
    ("exit-on-1", 1, "injected refusal"),
])
def test_a_failure_on_one_process_stops_both_within_a_minute(tmp_path, scenario, who, message):
    """The other process waits in a device collective (or for process 0's decision); both exit non-zero within
    60 s (JAX alone would keep it there until the shutdown barrier's 5 minutes), and its log names the failing
    process and its message (a failure inside process 0's decision is raised on both as process 0's). A failing
    process 0 hosts the coordination service: it exits only after the others have printed its message and gone."""
    codes, logs, took = job(scenario, tmp_path)
    assert codes == [1, 1] and took < 60, (codes, took, logs)  # exits, not aborts (-6) when the service goes
    other = logs[1 - who]
    assert f"process {who}: " in other and message in other, other
