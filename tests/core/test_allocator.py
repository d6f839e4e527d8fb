"""The `minitron` command re-executes itself under mimalloc (core/allocator.py)."""

import os
import subprocess
import sys

import pytest

from minitron_jax.core import allocator

SCRIPT = "from minitron_jax.core import allocator; allocator.ensure(); import sys; print(allocator.current(), sys.argv[1:])"


def _run(env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.ENV, allocator._DONE)}
    env.update(env_extra)
    r = subprocess.run([sys.executable, "-c", SCRIPT, "a", "b c"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.mark.skipif(allocator.library() is None or not sys.platform.startswith("linux"),
                    reason="cmeel-mimalloc is installed only on x86_64 Linux")
def test_reexec_preloads_mimalloc_and_keeps_the_command_line():
    assert _run({}) == "libmimalloc.so ['a', 'b c']"
    assert _run({allocator.ENV: "system"}) == "glibc ['a', 'b c']"


def test_preload_env_rules():
    lib = allocator.library()
    env = allocator.preload_env({"PATH": "/bin"})
    if lib is None:
        assert env is None
    else:
        assert env["LD_PRELOAD"] == str(lib) and env["MIMALLOC_PURGE_DELAY"] == "-1" and env["PATH"] == "/bin"
        assert allocator.preload_env(env) is None  # never re-executes twice
    assert allocator.preload_env({"LD_PRELOAD": "/x/libtcmalloc.so"}) is None  # the user's choice wins
    assert allocator.preload_env({allocator.ENV: "system"}) is None
    with pytest.raises(SystemExit, match="MINITRON_ALLOCATOR='jemalloc'"):
        allocator.preload_env({allocator.ENV: "jemalloc"})
