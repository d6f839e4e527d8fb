"""One process of a 2-process `minitron` job with a failure injected into process PID only (tests of issue 21,
item 7: one host fails, every host stops with its message, none hangs).

    python tests/inject_failure.py PID WHAT minitron-args...

WHAT: `safetensors` (process PID's safetensors write fails: disk full), `tensorstore` (its teacher-logits writes
fail, as a TensorStore write error surfaces: at `.result()`), `orbax` (its checkpoint save fails, as an async
orbax error seen on that host only)."""

import os
import sys

from minitron_jax.run import cli

DISK_FULL = OSError(28, "No space left on device (injected)")


def inject(what: str) -> None:
    if what == "safetensors":
        from minitron_jax.io import hf

        def write_file(*a, **k):
            raise DISK_FULL
        hf.write_file = write_file
    elif what == "tensorstore":
        from minitron_jax.run import teacher_pass
        real = teacher_pass._arrays

        class Failing:  # a TensorStore write future that fails when awaited
            def result(self):
                raise ValueError("tensorstore: error writing local file: No space left on device (injected)")

        class Array:
            def __init__(self, a):
                self.a = a

            def __getitem__(self, sl):
                return self

            def write(self, x):
                return Failing()

        teacher_pass._arrays = lambda *a, **k: {n: Array(x) for n, x in real(*a, **k).items()}
    elif what == "orbax":
        import orbax.checkpoint as ocp

        def save(self, *a, **k):
            raise RuntimeError("orbax: async save failed on this host (injected)")
        ocp.CheckpointManager.save = save
    else:
        raise SystemExit(f"unknown failure {what}")


if __name__ == "__main__":
    pid, what = sys.argv[1], sys.argv[2]
    if os.environ["MINITRON_PROCESS_ID"] == pid:
        inject(what)
    cli.main(sys.argv[3:])
