"""Attention forward + backward on CPU, fp32: XLA's compiled temp memory and wall time, xla vs chunked.

    python tools/bench_attention.py [--seqs 1024 2048 4096 --batch 1 --heads 8 --kv-heads 8 --head-dim 64
                                     --block 512 --iters 3] [--json PATH]

For each sequence length both implementations jit the gradient (w.r.t. q, k, v) of a loss over the
attention output, with left padding and packed segment ids as in training. `memory_analysis()` of the
compiled executable gives XLA's temp bytes (the S x S scores and probabilities for xla); time is the
best of `--iters` runs after one warm-up call.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from minitron_jax.model.attention import attend


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block", type=int, default=None, help="chunked block (default: attention.chunk_size)")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--json", default=None, help="also append the results as JSON lines to PATH")
    return p.parse_args(argv)


def measure(impl, s, a):
    r = np.random.default_rng(0)
    q = jnp.asarray(r.normal(size=(a.batch, s, a.heads, a.head_dim)), jnp.float32)
    k, v = (jnp.asarray(r.normal(size=(a.batch, s, a.kv_heads, a.head_dim)), jnp.float32) for _ in range(2))
    mask = np.ones((a.batch, s), np.float32)
    mask[:, : s // 16] = 0  # left padding
    seg = np.ones((a.batch, s), np.int32)
    seg[:, s // 2:] = 2  # two packed documents
    mask, seg = jnp.asarray(mask), jnp.asarray(seg)

    def loss(q, k, v):
        out = attend(q, k, v, attention_mask=mask, segment_ids=seg, impl=impl, block=a.block)
        return (out * mask[:, :, None, None]).sum()

    t0 = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
    compile_s = time.perf_counter() - t0
    temp = compiled.memory_analysis().temp_size_in_bytes
    jax.block_until_ready(compiled(q, k, v))
    times = []
    for _ in range(a.iters):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(q, k, v))
        times.append(time.perf_counter() - t0)
    return {"impl": impl, "seq": s, "temp_bytes": int(temp), "seconds": min(times), "compile_s": compile_s}


def main(argv=None):
    a = parse_args(argv)
    print(f"attention fwd+bwd, fp32, {jax.devices()[0].platform}: batch {a.batch}, {a.heads} heads "
          f"({a.kv_heads} kv), head_dim {a.head_dim}, best of {a.iters}")
    print(f"{'S':>6} | {'xla temp MiB':>12} {'chunked temp MiB':>16} {'ratio':>6} | {'xla s':>8} {'chunked s':>9} "
          f"{'ratio':>6}")
    rows = []
    for s in a.seqs:
        x, c = measure("xla", s, a), measure("chunked", s, a)
        rows += [x, c]
        mib = 2 ** 20
        print(f"{s:>6} | {x['temp_bytes'] / mib:>12.1f} {c['temp_bytes'] / mib:>16.1f} "
              f"{x['temp_bytes'] / max(c['temp_bytes'], 1):>6.1f} | {x['seconds']:>8.3f} {c['seconds']:>9.3f} "
              f"{c['seconds'] / x['seconds']:>6.2f}", flush=True)
    if a.json:
        with open(a.json, "a") as f:
            for r in rows:
                f.write(json.dumps({**r, "batch": a.batch, "heads": a.heads, "kv_heads": a.kv_heads,
                                    "head_dim": a.head_dim}) + "\n")


if __name__ == "__main__":
    main()
