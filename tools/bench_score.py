"""Importance-scoring throughput vs a plain forward, and the time and memory of pruning itself.

    python tools/bench_score.py [--batch 4 --seq 256 --iters 5 --target hidden_size=432,intermediate_size=1024]

On SmolLM2-135M (fp32, CPU), in one process: tokens/s of (a) the plain jitted forward to logits,
(b) the scoring step (forward with in-loop capture + on-device accumulation, no lm_head), and the
ratio (b cost / a cost; target <= 1.15). Then one `prune()` call on the loaded parameters: wall time
and the process's peak RSS growth, next to the RSS of the loaded model as the baseline.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, iters: int) -> list[float]:
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--target", default="hidden_size=432,intermediate_size=1024")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    import minitron_jax as mj
    from minitron_jax.core.assets import fetch_smollm2
    from minitron_jax.model.llama import forward
    from minitron_jax.prune.importance import ScoreConfig, finalize, init_state, make_step
    from minitron_jax.prune.pruning import prune

    model = mj.from_pretrained(fetch_smollm2())
    params, cfg = model.params(), model.config
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq)), jnp.int32)
    mask = jnp.ones(ids.shape, jnp.float32)
    tokens = args.batch * args.seq

    fwd = jax.jit(lambda p, x: forward(p, cfg, x))
    step = jax.jit(make_step(cfg, ScoreConfig()))
    state = init_state(cfg)
    fwd(params, ids).block_until_ready()
    jax.block_until_ready(step(params, state, ids, mask))
    t_fwd = timed(lambda: fwd(params, ids).block_until_ready(), args.iters)
    t_score = timed(lambda: jax.block_until_ready(step(params, state, ids, mask)), args.iters)
    f, s = statistics.median(t_fwd), statistics.median(t_score)
    print(f"SmolLM2-135M fp32, batch {args.batch} x {args.seq}, {jax.devices()[0].platform}, median of {args.iters}")
    print("| pass | tokens/s | s/batch |\n|---|---|---|")
    print(f"| plain forward (logits) | {tokens / f:.0f} | {f:.3f} |")
    print(f"| scoring step (capture + accumulate) | {tokens / s:.0f} | {s:.3f} |")
    print(f"scoring cost / forward cost = {s / f:.3f} (target <= 1.15)")

    scores = finalize(step(params, state, ids, mask), cfg, ScoreConfig())
    base_rss, base_peak = rss_mb(), peak_mb()
    t0 = time.perf_counter()
    pruned, new = prune(params, cfg, scores, args.target)
    jax.block_until_ready(pruned)
    dt = time.perf_counter() - t0
    model_mb = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)) / 2**20
    pruned_mb = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(pruned)) / 2**20
    print(f"\nprune({args.target}): {cfg.param_count():,} -> {new.param_count():,} params in {dt:.3f}s")
    print(f"parameters: {model_mb:.0f} MiB before, {pruned_mb:.0f} MiB after (baseline: the loaded model)")
    print(f"process RSS: {base_rss:.0f} MiB before prune, {rss_mb():.0f} MiB after (pruned copy alive); "
          f"lifetime peak {base_peak:.0f} -> {peak_mb():.0f} MiB")


if __name__ == "__main__":
    main()
