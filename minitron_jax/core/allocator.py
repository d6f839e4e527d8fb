"""The host allocator the `minitron` command runs with.

XLA:CPU allocates and frees its large step buffers (activations, [B, chunk, V] logit chunks) on every
step. glibc serves blocks over its mmap threshold (32 MiB at most) with mmap and gives them back with
munmap, so every step page-faults its working set in again: on a 2-core EPYC that made a KD step of
SmolLM2-135M 1.5x slower than the same step under tcmalloc, with a third of the time in the kernel
(`tools/bench_distill.py`, README "Performance"). mimalloc (the `cmeel-mimalloc` wheel, a project
dependency on x86_64 Linux) with purging turned off keeps freed memory mapped and reuses it.

`ensure()` re-executes the current command line once with `LD_PRELOAD` set to that library, before JAX
is imported. It does nothing when another allocator is already preloaded, when the library is not
installed, off Linux, or when `MINITRON_ALLOCATOR=system`. The cost: freed memory is not returned to
the OS, so resident memory stays at the run's peak (a training process's usual shape).
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

ENV = "MINITRON_ALLOCATOR"  # "mimalloc" (default) or "system"
_DONE = "_MINITRON_ALLOCATOR_REEXEC"  # set in the re-executed process: never loop


def library() -> Path | None:
    """The installed libmimalloc (cmeel layout: site-packages/cmeel.prefix/lib), or None."""
    for base in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        lib = Path(base) / "cmeel.prefix" / "lib" / "libmimalloc.so"
        if lib.exists():
            return lib
    return None


def current() -> str:
    """The malloc libraries mapped into this process ("glibc" when none is)."""
    try:
        with open("/proc/self/maps") as f:
            libs = {ln.split()[-1].rsplit("/", 1)[-1] for ln in f if "malloc" in ln.rsplit("/", 1)[-1]}
    except OSError:
        return "unknown"
    return ",".join(sorted(libs)) or "glibc"


def preload_env(environ: dict[str, str]) -> dict[str, str] | None:
    """The environment to re-execute with, or None when nothing should change."""
    choice = environ.get(ENV, "mimalloc")
    if choice not in ("mimalloc", "system"):
        raise SystemExit(f"{ENV}={choice!r}: choose 'mimalloc' (default) or 'system'")
    if choice == "system" or environ.get(_DONE) or environ.get("LD_PRELOAD") or not sys.platform.startswith("linux"):
        return None
    lib = library()
    if lib is None:
        return None
    env = dict(environ)
    env["LD_PRELOAD"] = str(lib)
    env.setdefault("MIMALLOC_PURGE_DELAY", "-1")  # keep freed pages mapped: no page faults every step
    env[_DONE] = "1"
    return env


def ensure() -> None:
    """Re-execute this process's command line under mimalloc (see the module docstring)."""
    env = preload_env(dict(os.environ))
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
