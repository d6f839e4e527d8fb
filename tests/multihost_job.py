"""One process of a 2-process job for tests/core/test_multihost.py: joins through MINITRON_COORDINATOR /
MINITRON_NUM_PROCESSES / MINITRON_PROCESS_ID (as every `minitron` command does) and runs SCENARIO inside
`cli.main`'s error handling, so that a failure takes the path a command's failure takes.

    python tests/multihost_job.py SCENARIO DIR
"""

import argparse
import json
import sys
from pathlib import Path

import jax
import numpy as np

from minitron_jax.core import multihost
from minitron_jax.core.errors import LockError
from minitron_jax.run import cli


def wait_in_collective():
    """What a process does while another is busy: a device collective that needs every process."""
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("test: waiting for every process")


def scenario(name: str, d: Path) -> None:
    pid = jax.process_index()
    if name == "decide":
        # a decision whose fn makes a decision of its own (process 0 alone): the keys after it still line up
        value = multihost.decided(lambda: multihost.decided(lambda: {"listing": sorted(p.name for p in d.iterdir()),
                                                                     "pid": pid}, "inner"), "listing")
        (d / f"decided{pid}.json").write_text(json.dumps(value))
        try:
            multihost.decided(lambda: (_ for _ in ()).throw(LockError("held by run 7 on host-a")), "lock")
        except LockError as e:
            (d / f"error{pid}.txt").write_text(f"{type(e).__name__}: {e}")
        agreed = multihost.agree(f"v{pid}", "values")
        (d / f"agree{pid}.json").write_text(json.dumps(agreed))
        return
    if name == "shared":  # DIR for both processes: their outputs are one directory
        multihost.check_shared(d / "out")
        (d / f"shared{pid}.ok").write_text("ok")
        return
    if name == "private":  # each process its own DIR/pN: as hosts with their own disks
        multihost.check_shared(d / f"p{pid}")
        return
    if name == "inputs":
        multihost.same_everywhere({"config": "c0", "tokenizer": f"t{pid}"}, "model")
        return
    if name == "atomic":  # both write into one temporary; neither leaves before the output is in place
        from minitron_jax.core.atomic import atomic_directory
        with atomic_directory(d / "out") as tmp:
            if pid == 0:
                (tmp / "weights.bin").write_bytes(b"w" * 1000)
        (d / f"atomic{pid}.json").write_text(json.dumps({"tmp": tmp.name, "installed": (d / "out" / "weights.bin").is_file()}))
        return
    if name == "mkdir-fails-on-0":  # process 0 cannot create the temporary (a read-only parent, disk full)
        from minitron_jax.core import atomic
        from minitron_jax.core.atomic import atomic_directory
        if pid == 0:
            def refuse(self, *a, **k):
                raise PermissionError(13, "Permission denied", str(self))
            atomic.Path.mkdir = refuse
        with atomic_directory(d / "out"):
            wait_in_collective()
        return
    # failures injected into one process while the other waits in a collective
    if name == "error-on-1":
        if pid == 1:
            raise OSError(28, "No space left on device", str(d / "model.safetensors"))
        wait_in_collective()
    if name == "bug-on-0":
        if pid == 0:
            raise KeyError("injected bug on process 0")
        wait_in_collective()
    if name == "exit-on-1":
        if pid == 1:
            raise SystemExit("minitron export: injected refusal")
        wait_in_collective()
    np.asarray(0)


if __name__ == "__main__":
    cli.run_command(argparse.Namespace(cmd=sys.argv[1], fn=lambda args: scenario(sys.argv[1], Path(sys.argv[2]))))
