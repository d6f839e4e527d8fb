"""One run per output directory (lock.output_lock): a live holder refuses a second run naming itself;
the lock of a dead process never blocks; `distill` takes it before touching `out`."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
from distill_helpers import make_pair

from minitron_jax.core.errors import LockError
from minitron_jax.core.lock import LOCK_NAME, output_lock

HOLD = textwrap.dedent("""
    import sys, time
    from minitron_jax.core.lock import output_lock
    with output_lock(sys.argv[1], "minitron distill"):
        print("held", flush=True)
        time.sleep(600)
""")


@pytest.fixture
def holder(tmp_path):
    """Another process holding tmp_path/out; yields (its Popen, the directory)."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.stdout.readline().strip() == "held"
    yield proc, out
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_second_holder_is_refused_naming_the_first(holder):
    proc, out = holder
    recorded = json.loads((out / LOCK_NAME).read_text())
    assert recorded["pid"] == proc.pid and recorded["host"] == socket.gethostname() and recorded["start"]
    with pytest.raises(LockError) as err:
        with output_lock(out, "minitron distill"):
            pass
    msg = str(err.value)
    assert f"pid {proc.pid} on host {socket.gethostname()}" in msg and recorded["start"] in msg
    assert "choose another output directory" in msg and str(out) in msg


def test_a_killed_holder_does_not_block(holder):
    """SIGKILL leaves the lock file (no cleanup ran); the kernel released the flock, so the next run goes."""
    proc, out = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stale = json.loads((out / LOCK_NAME).read_text())
    assert stale["pid"] == proc.pid  # the file of the dead holder is still there
    with output_lock(out, "test"):
        mine = json.loads((out / LOCK_NAME).read_text())
        assert mine["pid"] == os.getpid() and mine["what"] == "test"
    assert not (out / LOCK_NAME).exists()


def test_released_on_exit_and_error_and_reusable(tmp_path):
    out = tmp_path / "a" / "out"
    with pytest.raises(RuntimeError):
        with output_lock(out, "test"):
            (out / "kept").write_text("x")
            raise RuntimeError("boom")
    assert (out / "kept").exists() and not (out / LOCK_NAME).exists()
    with output_lock(out, "test"):  # free again
        with pytest.raises(LockError, match=f"pid {os.getpid()}"):  # one holder even within a process
            with output_lock(out, "test"):
                pass
    # a garbage lock file (no live holder) is no obstacle either
    (out / LOCK_NAME).write_text("not json")
    with output_lock(out, "test"):
        pass
    # a directory the lock created and nothing else used is removed again (a failed start leaves nothing)
    fresh = tmp_path / "fresh"
    with output_lock(fresh, "test"):
        assert fresh.is_dir()
    assert not fresh.exists()


def test_unwritable_output_is_one_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(LockError, match="cannot create the lock file .*file/out"):
        with output_lock(tmp_path / "file" / "out", "test"):
            pass


def test_distill_into_a_held_directory_is_refused_before_work(holder, tmp_path, monkeypatch):
    """A second `minitron distill` into a held out= stops at once (no model or data loaded) and writes
    nothing there."""
    from minitron_jax.data import loader
    from minitron_jax.io import hf
    from minitron_jax.run.cli import main

    proc, out = holder
    t, s, d = make_pair(tmp_path / "pair", vocab=512)
    for mod, name in ((hf, "from_pretrained"), (loader, "build_corpus")):
        monkeypatch.setattr(mod, name, lambda *a, **k: pytest.fail("loaded before the lock was checked"))
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(SystemExit, match=f"minitron distill: .*out is in use by minitron distill \\(pid {proc.pid}"):
        main(["distill", f"teacher={t}", f"student={s}", f"data={d}", f"out={out}", "steps=2", "warmup=0",
              "seq_len=32"])
    assert sorted(p.name for p in out.iterdir()) == before == [LOCK_NAME]


# ---------------------------------------------------------------------------- gs:// (emulator)
def _record(url):
    from minitron_jax.core import storage
    return json.loads((storage.path(url) / LOCK_NAME).read_text())


def test_a_lock_in_cloud_storage_refuses_a_second_run_and_goes_at_exit(gs_dir):
    """The lock object names its holder; a second run is refused naming it; at exit the object is gone and the
    next run takes it."""
    from minitron_jax.core import storage
    with output_lock(gs_dir, "minitron distill"):
        rec = _record(gs_dir)
        assert rec["pid"] == os.getpid() and rec["what"] == "minitron distill"
        with pytest.raises(LockError, match=rf"^{gs_dir} is in use by minitron distill \(pid {os.getpid()} on host "):
            with output_lock(gs_dir, "minitron run"):
                pass
    assert not (storage.path(gs_dir) / LOCK_NAME).exists()
    with output_lock(gs_dir, "minitron run"):
        assert _record(gs_dir)["what"] == "minitron run"


def test_a_dead_runs_lock_in_cloud_storage_is_taken_over_and_a_live_one_is_refreshed(gs_dir, monkeypatch):
    """A lock whose record stopped being refreshed STALE_S ago (its run died) is taken over; the holder's
    heartbeat keeps its own record fresh."""
    import time

    from minitron_jax.core import lock, storage
    (storage.path(gs_dir) / LOCK_NAME).write_text(json.dumps({"what": "minitron run", "pid": 1, "host": "dead",
                                                              "alive_s": time.time() - lock.STALE_S - 1}))
    monkeypatch.setattr(lock, "HEARTBEAT_S", 0.2)
    with output_lock(gs_dir, "minitron distill"):
        first = _record(gs_dir)
        assert first["pid"] == os.getpid()
        time.sleep(1.0)
        assert _record(gs_dir)["alive_s"] > first["alive_s"]


def test_a_run_that_loses_the_race_to_create_the_lock_is_refused(gs_dir, monkeypatch):
    """The lock is created only if absent (ifGenerationMatch=0). When another run's lock appears between this run's
    look and its create, Cloud Storage answers 412 (the test emulator too, tests/gcs_emulator.py): this run is
    refused naming the winner, whose record is left as it was (an unconditional write would have replaced it)."""
    import time

    from minitron_jax.core import storage
    winner = {"what": "minitron run", "pid": 4242, "host": "host-b", "alive_s": time.time()}
    (storage.path(gs_dir) / LOCK_NAME).write_text(json.dumps(winner))
    fs, looks = storage.filesystem(), []
    real_info = fs.info

    def info_misses_once(path, **k):
        looks.append(path)
        if len(looks) == 1:
            raise FileNotFoundError(path)  # not there yet when this run looked
        return real_info(path, **k)
    monkeypatch.setattr(fs, "info", info_misses_once)
    with pytest.raises(LockError, match=r"is in use by minitron run \(pid 4242 on host host-b"):
        with output_lock(gs_dir, "minitron distill"):
            pass
    assert _record(gs_dir) == winner and len(looks) == 2
