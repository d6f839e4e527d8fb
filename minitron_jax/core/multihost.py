"""One job on every host of a slice: joining it (`join`), deciding once (`decided`, `agree`), failing
together (`fail`) and checking that an output is storage every host shares (`check_shared`).

Every `minitron` command joins a multi-process job from MINITRON_COORDINATOR / MINITRON_NUM_PROCESSES /
MINITRON_PROCESS_ID (or the recipe's keys; `auto`: JAX detects a TPU slice or SLURM). The messages between
processes go through the job's coordination service (the key-value store `jax.distributed` starts on
process 0), not through device collectives: a decision of process 0 reaches the others even while its
devices are busy, and a failure reaches them while they wait in a collective.

Fail together: a process that fails publishes its message under one key and exits at once (`fail`, called by
`cli.main`), without the shutdown barrier that would keep every process waiting for minutes; every process of
the job runs a watcher thread (started by `join`) that, on seeing the key, prints the failing process's message
and exits non-zero. A process killed outright is found by JAX's own heartbeat (`HEARTBEAT_S`).

Single-process runs take none of these paths: `decided(fn)` is `fn()`, `agree` returns the one value.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from minitron_jax.core import errors, storage
from minitron_jax.core.errors import MinitronError

FAILED = "minitron/failed"  # the key a failing process writes its message to
HEARTBEAT_S = 60  # a process that stops answering (killed, hung host) stops the job within this
WAIT_MS = 24 * 3600 * 1000  # how long a process waits for process 0's decision (a failure ends it sooner)
_deciding = False  # process 0 is running a decision's fn (`decided`)
_calls = itertools.count()  # every process makes the same calls in the same order: the keys line up
SEEN_S = 10  # how long a failing process 0 waits for the others to read its message
GRACE_S = 1.0  # then for them to exit
_watching = False
_failing = False


def _client():
    from jax._src import distributed
    return distributed.global_state.client


def joined() -> bool:
    """Whether this process is one of several in a job. Several processes without `jax.distributed` (no
    coordination service to decide through) is an error naming the fix."""
    import jax
    if jax.process_count() == 1:
        return False
    if _client() is None:
        raise MinitronError(f"this process is one of {jax.process_count()} but did not join the job through "
                            "jax.distributed; set MINITRON_COORDINATOR=auto (TPU VMs, SLURM) or HOST:PORT with "
                            "MINITRON_NUM_PROCESSES and MINITRON_PROCESS_ID")
    return True


def _detected() -> bool:
    """A cluster JAX can join by itself: a multi-host TPU slice or a SLURM job of several tasks."""
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "") or (
        "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1)


def join(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None) -> None:
    """Join the job named by the arguments, else by MINITRON_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID; nothing
    to do without a coordinator or when already joined. `auto`: JAX detects the cluster (TPU VMs, SLURM)."""
    import jax
    addr = coordinator or os.environ.get("MINITRON_COORDINATOR") or ("auto" if _detected() else None)
    if not addr or jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts; ignored by GPU/TPU
    if addr == "auto":
        jax.distributed.initialize(heartbeat_timeout_seconds=HEARTBEAT_S)
    else:
        n = num_processes or int(os.environ.get("MINITRON_NUM_PROCESSES", "0"))
        pid = process_id if process_id is not None else int(os.environ.get("MINITRON_PROCESS_ID", "-1"))
        if n < 1 or not 0 <= pid < n:
            raise errors.RecipeError(f"coordinator {addr}: give the job's process count and this process's id in [0, n) "
                              "(num_processes= / process_id=, or MINITRON_NUM_PROCESSES / MINITRON_PROCESS_ID)")
        jax.distributed.initialize(coordinator_address=addr, num_processes=n, process_id=pid,
                                   heartbeat_timeout_seconds=HEARTBEAT_S)
    if jax.process_count() > 1:
        _watch()


def _watch() -> None:
    """Start the thread that stops this process when another one fails (`fail`). It asks the coordination
    service once a second and is stopped and joined at exit, before JAX shuts the job down (a thread left inside
    the client's call at interpreter exit would abort the process)."""
    global _watching
    if _watching:
        return
    _watching = True
    import jax
    client, stop = _client(), threading.Event()

    def run():
        while not stop.is_set():
            try:
                message = client.blocking_key_value_get(FAILED, 1000)
            except Exception:  # not set within the second: ask again
                continue
            if _failing:  # this process's own failure: `fail` exits
                return
            # the message first: once process 0 (the service's host) hears back it exits, and JAX's error poller
            # aborts this process when the service goes away
            print(f"minitron: stopping, another process of the job failed: {message}", file=sys.stderr, flush=True)
            with contextlib.suppress(Exception):  # tell a failing process 0 it was heard
                client.key_value_set(f"{FAILED}-seen/{jax.process_index()}", "1")
            os._exit(1)

    thread = threading.Thread(target=run, name="minitron-fail-together", daemon=True)
    thread.start()

    def end():
        stop.set()
        thread.join()

    atexit.register(end)  # runs before jax.distributed's own exit hook (registered earlier, run later)


def fail(message: str, code: int = 1) -> None:
    """In a multi-process job: publish `message` (prefixed with this process's id) so that every other process
    stops, print it, and exit with `code` at once (no shutdown barrier). Single-process: returns."""
    if not joined():
        return
    import jax
    global _failing
    _failing = True
    text = f"process {jax.process_index()}: {message}"
    client = _client()
    print(text, file=sys.stderr, flush=True)
    try:
        client.key_value_set(FAILED, text)
    except Exception:  # another process failed first: its message is already out
        pass
    else:
        if jax.process_index() == 0:  # the coordination service ends with this process: let the others read first
            end = time.monotonic() + SEEN_S
            for i in range(1, jax.process_count()):
                with contextlib.suppress(Exception):
                    client.blocking_key_value_get(f"{FAILED}-seen/{i}", max(1, int(1000 * (end - time.monotonic()))))
            time.sleep(GRACE_S)  # the others exit (code 1) before the service they poll goes away (an abort)
    sys.stdout.flush()
    os._exit(code)


def _error(name: str, message: str) -> Exception:
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, MinitronError):
        return cls(message)
    return MinitronError(f"process 0: {name}: {message}")


def decided(fn: Callable[[], Any], what: str) -> Any:
    """`fn()` run by process 0 alone; its result (JSON) reaches every process. A MinitronError or OSError on
    process 0 is raised there and, as the same class with the same message, on every other process; anything
    else fails process 0 (and so the job, through `fail`). `what` names the decision in the key. Called inside
    another decision's `fn` (process 0 alone runs that), `fn` just runs: the other processes never make that call,
    and a key of its own would put process 0's keys out of step with theirs."""
    global _deciding
    if not joined() or _deciding:
        return fn()
    import jax
    key = f"minitron/decided/{next(_calls)}/{what}"
    if jax.process_index() == 0:
        _deciding = True
        try:
            value = fn()
        except (MinitronError, OSError) as e:
            _client().key_value_set(key, json.dumps({"error": type(e).__name__, "message": str(e)}))
            raise
        finally:
            _deciding = False
        _client().key_value_set(key, json.dumps({"value": value}))
        return value
    got = json.loads(_client().blocking_key_value_get(key, WAIT_MS))
    if "error" in got:
        raise _error(got["error"], got["message"])
    return got["value"]


def agree(value: str, what: str) -> list[str]:
    """Every process's `value` (a short string: a hash, "ok"), in process order; every process gets them all."""
    if not joined():
        return [value]
    import jax
    n = next(_calls)
    client = _client()
    client.key_value_set(f"minitron/agree/{n}/{what}/{jax.process_index()}", value)
    return [client.blocking_key_value_get(f"minitron/agree/{n}/{what}/{i}", WAIT_MS)
            for i in range(jax.process_count())]


def same_everywhere(values: dict[str, str], what: str) -> None:
    """Refuse, on every process, inputs that differ between processes (`values`: name -> hash as this process
    sees it, e.g. the config and tokenizer of the model it is about to load)."""
    seen = [json.loads(v) for v in agree(json.dumps(values, sort_keys=True), what)]
    differ = [f"{k} (process {i})" for i, s in enumerate(seen) for k in values if s.get(k) != seen[0].get(k)]
    if differ:
        raise errors.DataError(f"the processes of the job do not see the same {what}: {', '.join(differ)} differ "
                               "from process 0's; give every host the same files (a shared mount or gs://)")


def check_shared(out: str | Path, what: str = "out") -> None:
    """Refuse, on every process and before any weights load, an output directory that the processes of a
    multi-process job do not share: process 0 writes a token there, every process must read it back."""
    if not joined() or "://" in str(out):
        return
    import jax
    out = Path(out)

    def write() -> str:
        token = secrets.token_hex(8)
        out.mkdir(parents=True, exist_ok=True)
        (out / f".minitron-shared-{token}").write_text(token)
        return token

    token = decided(write, "shared-token")
    path = out / f".minitron-shared-{token}"
    try:
        mine = "ok" if path.read_text() == token else "other"
    except OSError:
        mine = "missing"
    answers = agree(mine, "shared-check")
    if jax.process_index() == 0:
        path.unlink(missing_ok=True)
    blind = [str(i) for i, a in enumerate(answers) if a != "ok"]
    if blind:
        raise errors.StorageError(f"{what}={out} is not storage every host shares: process(es) {', '.join(blind)} cannot "
                           f"read a file process 0 wrote there; put {what} on a mount every host sees (NFS, "
                           "Filestore, gcsfuse) or in a bucket (gs://)")


def file_hashes(directory: str | Path, names: tuple[str, ...]) -> dict[str, str]:
    """sha256 of each of `names` in `directory` ("missing" where absent): what `same_everywhere` compares."""
    import hashlib
    out = {}
    for name in names:
        path = storage.path(directory) / name
        out[name] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"
    return out
