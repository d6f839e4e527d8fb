"""One run per output directory: `output_lock(out, what)` holds `out/.minitron.lock` for a run's lifetime.

The lock is `fcntl.flock` on that file, which holds a JSON record of the holder (what, host, pid, start
time, command). A second run into the same directory is refused at once with a `LockError` naming the
holder. The kernel releases a flock when its process ends, however it ends (SIGKILL included), so a file
left behind by a dead run never blocks: only a live holder does, and the file's content is informative
only. A clean exit removes the file (and the directory, when the lock created it and nothing else was
written).

On Cloud Storage (`gs://`) there is no flock: the lock is the object `out/.minitron.lock`, created with a
generation precondition (create only if absent: of two runs that race, Cloud Storage lets one create it), whose
record the holder refreshes every `HEARTBEAT_S`. A run that died leaves it behind: one whose record is older
than `STALE_S` is taken over (deleted only at the generation read, so that two runs taking it over cannot
delete each other's fresh lock).

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
import threading
import time
import warnings
from pathlib import Path
from typing import Iterator

from minitron_jax.core import multihost, storage
from minitron_jax.core.errors import LockError

LOCK_NAME = ".minitron.lock"
HEARTBEAT_S = 60  # gs://: the holder rewrites its record this often
STALE_S = 600  # gs://: a record this old is a dead run's
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


def _taken_url(directory, info: dict, what: str) -> LockError:
    who = (f"{info.get('what', 'a run')} (pid {info.get('pid', '?')} on host {info.get('host', '?')}, started "
           f"{info.get('start', '?')}, alive at {info.get('alive', '?')}: {info.get('command', '?')})")
    return LockError(f"{directory} is in use by {who}; wait for it to end or choose another output directory for "
                     f"this {what} (a lock whose holder stopped refreshing it {STALE_S} s ago is taken over)")


def _acquire_url(directory, what: str) -> tuple[threading.Event, threading.Thread]:
    """Create the gs:// lock object (only if absent), or take over a dead run's; start its heartbeat."""
    fs = storage.filesystem()
    key = storage.key(directory / LOCK_NAME)

    def record() -> bytes:
        now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        return (json.dumps({**holder, "alive": now, "alive_s": time.time()}) + "\n").encode()

    holder = _holder(what)
    for _ in range(3):
        try:
            info = fs.info(key)
        except FileNotFoundError:
            info = None
        if info is not None:
            try:
                rec = json.loads(fs.cat_file(key))
            except (FileNotFoundError, ValueError):
                continue  # released or being written: look again
            rec = rec if isinstance(rec, dict) else {}
            if time.time() - float(rec.get("alive_s", 0)) < STALE_S:
                raise _taken_url(directory, rec, what)
            bucket, name = key.split("/", 1)
            with contextlib.suppress(FileNotFoundError, FileExistsError):  # a dead run's: delete only the object
                fs.call("DELETE", "b/{}/o/{}", bucket, name, ifGenerationMatch=str(info["generation"]))  # we read
        try:
            fs.pipe_file(key, record(), mode="create")  # ifGenerationMatch=0: Cloud Storage lets one run create it
            break
        except FileExistsError:  # another run created it since we looked
            continue
    else:
        raise LockError(f"{directory}: could not take the lock {LOCK_NAME} (other runs keep creating it); try again")
    stop = threading.Event()

    def beat():
        while not stop.wait(HEARTBEAT_S):
            with contextlib.suppress(Exception):  # a missed beat only ages the record
                fs.pipe_file(key, record())
    thread = threading.Thread(target=beat, name="minitron-lock-heartbeat", daemon=True)
    thread.start()
    return stop, thread


@contextlib.contextmanager
def output_lock(directory: str | Path, what: str = "run") -> Iterator[Path]:
    """Hold `directory` (created if needed) for the body of the `with`; `what` names the run in messages
    ("minitron distill"). Raises LockError, naming the holder, when another live run holds it."""
    import jax
    if storage.is_url(directory):
        yield from _output_lock_url(storage.path(directory), what)
        return
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


def _output_lock_url(directory, what: str) -> Iterator:
    import jax
    held: dict = {}

    def take() -> bool:
        storage.check_access(directory, "out")
        held["stop"], held["thread"] = _acquire_url(directory, what)
        return True

    multihost.decided(take, "output-lock")
    try:
        yield directory
    finally:
        if jax.process_index() == 0:
            held["stop"].set()
            held["thread"].join()
            with contextlib.suppress(FileNotFoundError):
                storage.filesystem().rm_file(storage.key(directory / LOCK_NAME))
