"""One run per output directory: `output_lock(out, what)` holds `out/.minitron.lock` for a run's lifetime.

The lock is `fcntl.flock` on that file, which holds a JSON record of the holder (what, host, pid, start
time, command). A second run into the same directory is refused at once with a `LockError` naming the
holder. The kernel releases a flock when its process ends, however it ends (SIGKILL included), so a file
left behind by a dead run never blocks: only a live holder does, and the file's content is informative
only. A clean exit removes the file (and the directory, when the lock created it and nothing else was
written).

Multi-process (multi-host) runs: process 0 takes the lock; the others wait for its outcome (a broadcast
from process 0, which doubles as the barrier) and all fail together when the directory is taken. This
assumes `out` is one directory that every host sees (as orbax checkpointing does) on a file system with
flock (local disks, NFS); where flock is not supported (some FUSE mounts) the run goes on unlocked with
a warning.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import warnings
from pathlib import Path
from typing import Iterator

from minitron_jax.core import multihost
from minitron_jax.core.errors import LockError

LOCK_NAME = ".minitron.lock"
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)




def _holder(what: str) -> dict:
    start = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return {"what": what, "host": socket.gethostname(), "pid": os.getpid(), "start": start,
            "command": shlex.join(sys.argv)}


def _taken(directory: Path, fd: int, what: str) -> str:
    try:
        info = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
    except ValueError:
        info = {}
    info = info if isinstance(info, dict) else {}
    who = (f"{info.get('what', 'a run')} (pid {info.get('pid', '?')} on host {info.get('host', '?')}, started "
           f"{info.get('start', '?')}: {info.get('command', '?')})" if info
           else "a run that has not recorded itself yet")
    return (f"{directory} is in use by {who}; wait for it to end or choose another output directory for this "
            f"{what} (a lock left by a process that died does not block: this holder is alive)")


def _acquire(directory: Path, what: str) -> tuple[int | None, bool]:
    """(file descriptor holding the lock or None where flock is unsupported, whether the directory was created)."""
    path = directory / LOCK_NAME
    created = False
    while True:
        try:
            created = created or not directory.exists()
            directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # the directory was removed between mkdir and open (a holder's clean exit)
            continue
        except OSError as e:
            raise LockError(f"cannot create the lock file {path} ({e.strerror or e}): the output directory must be "
                            "a writable directory; choose another one or fix its permissions") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            message = _taken(directory, fd, what)
            os.close(fd)
            raise LockError(message) from None
        except OSError as e:
            os.close(fd)
            if e.errno not in _UNSUPPORTED:
                raise
            warnings.warn(f"{directory}: the file system does not support file locks ({e.strerror}); nothing stops "
                          "another run from writing into this directory at the same time")
            return None, created
        try:  # the holder before us removes the file on release: make sure we locked the file that is there now
            st, now = os.fstat(fd), os.stat(path)
            if (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(_holder(what)) + "\n").encode(), 0)
    os.fsync(fd)
    return fd, created


def _release(directory: Path, fd: int | None, created: bool) -> None:
    if fd is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(directory / LOCK_NAME)  # while still holding it (see the inode check in _acquire)
        os.close(fd)
    if created:
        with contextlib.suppress(OSError):  # only when empty: a failed start leaves nothing behind
            directory.rmdir()


@contextlib.contextmanager
def output_lock(directory: str | Path, what: str = "run") -> Iterator[Path]:
    """Hold `directory` (created if needed) for the body of the `with`; `what` names the run in messages
    ("minitron distill"). Raises LockError, naming the holder, when another live run holds it."""
    import jax
    directory = Path(directory)
    held: dict = {"fd": None, "created": False}

    def take() -> bool:
        held["fd"], held["created"] = _acquire(directory, what)
        return True

    multihost.decided(take, "output-lock")  # process 0 takes it; its LockError is raised on every process
    fd, created = held["fd"], held["created"]
    try:
        yield directory
    finally:
        if jax.process_index() == 0:
            _release(directory, fd, created)
