"""Forward-pass throughput: minitron_jax (jax.jit) vs transformers LlamaForCausalLM (torch), fp32, CPU.

    python tools/bench_forward.py [--batch 4 --seq 256 --iters 10 --warmup 2 --threads N] [--json out.json]

Both frameworks run in this one process on the same cores with the same thread count:
  * the process is pinned (sched_setaffinity) to the first N allowed CPUs, before jax/torch load;
  * XLA:CPU sizes its intra-op pool from PJRT_NPROC (read at backend init; set here unless already set);
  * torch.set_num_threads(N) (+ OMP_NUM_THREADS / MKL_NUM_THREADS), interop threads 1.
An allocator is chosen for the whole process with LD_PRELOAD, e.g.
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python tools/bench_forward.py
XLA_FLAGS is passed through and printed. The JAX side jits a pure function of (params, ids);
compile time is reported separately. Timings are medians over --iters runs (min/max shown).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="0: all CPUs this process may use")
    p.add_argument("--model", default=None, help="HF dir (default: SmolLM2-135M via fetch_smollm2)")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--json", default=None, help="also write the results as one JSON line to PATH")
    return p.parse_args(argv)


def setup_threads(n: int) -> int:
    """Pin to n CPUs and tell XLA / torch / OpenMP / MKL; must run before jax or torch is imported."""
    cpus = sorted(os.sched_getaffinity(0))
    n = n or len(cpus)
    os.sched_setaffinity(0, cpus[:n])
    os.environ.setdefault("PJRT_NPROC", str(n))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(n))
    return n


def timeit(fn, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def summary(times: list[float], tokens: int) -> dict:
    return {"tok_s_median": tokens / statistics.median(times), "tok_s_min": tokens / max(times),
            "tok_s_max": tokens / min(times), "ms_median": 1e3 * statistics.median(times)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    threads = setup_threads(args.threads)
    import numpy as np
    import jax
    import jax.numpy as jnp
    import minitron_jax as mj
    from minitron_jax.model import forward

    model_dir = args.model
    if model_dir is None:
        from minitron_jax.assets import fetch_smollm2
        model_dir = fetch_smollm2()
    model = mj.from_pretrained(str(model_dir))
    cfg, params = model.config, jax.device_put(model.params())
    tokens = args.batch * args.seq
    ids_np = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq), dtype=np.int32)
    ids = jnp.asarray(ids_np)

    fwd = jax.jit(lambda p, x: forward(p, cfg, x))
    t0 = time.perf_counter()
    compiled = fwd.lower(params, ids).compile()
    compile_s = time.perf_counter() - t0
    jax_logits = compiled(params, ids).block_until_ready()
    jax_times = timeit(lambda: compiled(params, ids).block_until_ready(), args.warmup, args.iters)
    res = {"batch": args.batch, "seq": args.seq, "iters": args.iters, "threads": threads,
           "jax": summary(jax_times, tokens) | {"compile_s": compile_s}}

    import torch
    env = {"LD_PRELOAD": os.environ.get("LD_PRELOAD", ""), "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
           "PJRT_NPROC": os.environ["PJRT_NPROC"], "cpus": sorted(os.sched_getaffinity(0)),
           "python": sys.version.split()[0], "jax": jax.__version__, "torch": torch.__version__}
    if not args.skip_torch:
        import transformers
        from transformers import LlamaForCausalLM
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass
        env |= {"transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
                "torch_interop_threads": torch.get_num_interop_threads()}
        tm = LlamaForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32,
                                              attn_implementation="sdpa").eval()
        env["torch_attn"] = tm.config._attn_implementation
        tids = torch.from_numpy(ids_np.astype(np.int64))

        def run_torch():
            with torch.inference_mode():
                return tm(input_ids=tids, use_cache=False).logits

        torch_logits = run_torch().numpy()
        res["torch"] = summary(timeit(run_torch, args.warmup, args.iters), tokens)
        res["max_abs_logit_diff"] = float(np.max(np.abs(np.asarray(jax_logits) - torch_logits)))
        res["ratio_jax_over_torch"] = res["jax"]["tok_s_median"] / res["torch"]["tok_s_median"]
    res["env"] = env

    print("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    print(f"batch {args.batch} x seq {args.seq} = {tokens} tokens, fp32, {threads} threads, "
          f"{args.warmup} warmup + {args.iters} timed iters (median [min, max])")
    for name in ("jax", "torch"):
        if name in res:
            r = res[name]
            print(f"  {name:5s}: {r['tok_s_median']:9.0f} tok/s  [{r['tok_s_min']:.0f}, {r['tok_s_max']:.0f}]"
                  f"  {r['ms_median']:.1f} ms/iter")
    print(f"  jax compile: {compile_s:.2f} s")
    if "ratio_jax_over_torch" in res:
        print(f"  ratio jax/torch: {res['ratio_jax_over_torch']:.3f}   "
              f"(max |logit diff| {res['max_abs_logit_diff']:.2e})")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(res) + "\n")
    return res


if __name__ == "__main__":
    main()
