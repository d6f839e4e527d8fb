"""Forward throughput, fp32 CPU: minitron_jax (jax.jit) vs transformers LlamaForCausalLM (torch).

    [LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4] [XLA_FLAGS=...] \
    python tools/bench_forward.py [--batch 4 --seq 256 --iters 10 --warmup 2 --threads N] [--json PATH]

Both frameworks run in this one process, on the same cores, with the same thread count N
(default: every CPU the process may use). Before jax or torch is imported the process is pinned
(sched_setaffinity) to the first N allowed CPUs and PJRT_NPROC=N is set: XLA:CPU sizes its intra-op
pool from PJRT_NPROC when its client starts (XLA_FLAGS has no thread-count flag). torch gets
torch.set_num_threads(N), OMP_NUM_THREADS=MKL_NUM_THREADS=N and one inter-op thread. The allocator
is whatever LD_PRELOAD maps into the whole process (reported). JAX jits a pure function of
(params, ids); lower+compile time is reported apart. torch runs under inference_mode with sdpa.
After warm-up the two are timed interleaved (jax, torch, jax, ...) so both see the same machine
noise; tokens/s is reported as median [min, max]. On a shared machine the best/best ratio is
the more stable one: torch's OpenMP barriers suffer far more than XLA's pool when cores are taken.
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
    p.add_argument("--json", default=None, help="also append the results as one JSON line to PATH")
    return p.parse_args(argv)


def setup_threads(n: int) -> int:
    """Pin to n CPUs and size XLA / OpenMP / MKL pools; must run before jax or torch is imported."""
    cpus = sorted(os.sched_getaffinity(0))
    n = min(n or len(cpus), len(cpus))
    os.sched_setaffinity(0, cpus[:n])
    for var in ("PJRT_NPROC", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    return n


def allocator() -> str:
    with open("/proc/self/maps") as f:
        libs = {ln.split()[-1].rsplit("/", 1)[-1] for ln in f if "malloc" in ln.rsplit("/", 1)[-1]}
    return ",".join(sorted(libs)) or "glibc"


def timeit(fns: dict, warmup: int, iters: int) -> dict[str, list[float]]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    out = {k: [] for k in fns}
    for _ in range(iters):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            out[k].append(time.perf_counter() - t0)
    return out


def summary(times: list[float], tokens: int) -> dict:
    return {"tok_s_median": tokens / statistics.median(times), "tok_s_min": tokens / max(times),
            "tok_s_max": tokens / min(times), "ms_median": 1e3 * statistics.median(times)}


def load_model(model_dir: str | None, dtype=None):
    """(HF directory, minitron_jax model): `model_dir`, or SmolLM2-135M-Instruct from the asset cache."""
    import minitron_jax as mj
    if model_dir is None:
        from minitron_jax.core.assets import fetch_smollm2
        model_dir = fetch_smollm2()
    return str(model_dir), mj.from_pretrained(str(model_dir), dtype=dtype)


def main(argv=None) -> dict:
    args = parse_args(argv)
    threads = setup_threads(args.threads)
    import jax
    import numpy as np
    import torch

    from minitron_jax.model.llama import forward

    model_dir, model = load_model(args.model)
    cfg, params = model.config, jax.device_put(model.params())
    tokens = args.batch * args.seq
    ids_np = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq), dtype=np.int32)
    ids = jax.device_put(ids_np)

    t0 = time.perf_counter()
    compiled = jax.jit(lambda p, x: forward(p, cfg, x)).lower(params, ids).compile()
    compile_s = time.perf_counter() - t0
    fns = {"jax": lambda: compiled(params, ids).block_until_ready()}
    jax_logits = np.asarray(fns["jax"]())

    env = {"allocator": allocator(), "LD_PRELOAD": os.environ.get("LD_PRELOAD", ""),
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""), "PJRT_NPROC": os.environ["PJRT_NPROC"],
           "cpus": sorted(os.sched_getaffinity(0)), "loadavg_start": round(os.getloadavg()[0], 2),
           "python": sys.version.split()[0], "jax": jax.__version__, "torch": torch.__version__}
    if not args.skip_torch:
        import transformers
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already started by something else
            pass
        tm = transformers.LlamaForCausalLM.from_pretrained(
            str(model_dir), dtype=torch.float32, attn_implementation="sdpa").eval()
        tids = torch.from_numpy(ids_np.astype(np.int64))
        env |= {"transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
                "torch_interop_threads": torch.get_num_interop_threads(),
                "torch_attn": tm.config._attn_implementation}

        def run_torch():
            with torch.inference_mode():
                return tm(input_ids=tids, use_cache=False).logits

        fns["torch"] = run_torch
        torch_logits = run_torch().numpy()

    times = timeit(fns, args.warmup, args.iters)
    env["loadavg_end"] = round(os.getloadavg()[0], 2)
    res = {"batch": args.batch, "seq": args.seq, "iters": args.iters, "warmup": args.warmup,
           "threads": threads, "jax": summary(times["jax"], tokens) | {"compile_s": compile_s}}
    if "torch" in times:
        res["torch"] = summary(times["torch"], tokens)
        res["ratio_jax_over_torch"] = res["jax"]["tok_s_median"] / res["torch"]["tok_s_median"]
        res["ratio_best"] = res["jax"]["tok_s_max"] / res["torch"]["tok_s_max"]
        res["max_abs_logit_diff"] = float(np.max(np.abs(jax_logits - torch_logits)))
    res["env"] = env

    print("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    print(f"batch {args.batch} x seq {args.seq} = {tokens} tokens, fp32, {threads} threads, "
          f"{args.warmup} warmup + {args.iters} interleaved iters; tok/s median [min, max]")
    for name in ("jax", "torch"):
        if name in res:
            r = res[name]
            print(f"  {name:5s}: {r['tok_s_median']:8.0f} tok/s [{r['tok_s_min']:.0f}, {r['tok_s_max']:.0f}]"
                  f"  {r['ms_median']:.1f} ms/iter")
    print(f"  jax lower+compile: {compile_s:.2f} s (excluded)")
    if "torch" in res:
        print(f"  ratio jax/torch: {res['ratio_jax_over_torch']:.3f} (median/median), "
              f"{res['ratio_best']:.3f} (best/best); max |logit diff| {res['max_abs_logit_diff']:.1e}")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(res) + "\n")
    return res


if __name__ == "__main__":
    main()
