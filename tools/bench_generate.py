"""Generation throughput, fp32 CPU: `minitron generate`'s path (eval/generate.Generator: jitted prefill + decode
steps over the KV cache) vs transformers' `generate` (torch, sdpa, its own KV cache), same model, batch and lengths.

    [PYTHONPATH=.] python tools/bench_generate.py [--batch 4 --prompt 64 --new 64 --iters 3 --warmup 1 --threads N]

Greedy, no stop tokens (every row makes --new tokens; transformers' generation_config loses its eos id). Each side is
timed generating 1 token (the prefill and the first choice) and --new tokens, interleaved (jax, torch, ...);
decode tokens/s = batch x (new - 1) / (t(new) - t(1)), from the medians; end-to-end tokens/s = batch x new /
t(new). Threads and pinning as tools/bench_forward.py. Also reports how many generated tokens agree.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_forward import allocator, load_model, setup_threads, timeit  # noqa: E402  (imports no jax/torch)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens per row")
    p.add_argument("--new", type=int, default=64, help="generated tokens per row")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="0: all CPUs this process may use")
    p.add_argument("--model", default=None, help="HF dir (default: SmolLM2-135M-Instruct via fetch_smollm2)")
    p.add_argument("--json", default=None, help="also append the results as one JSON line to PATH")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    threads = setup_threads(args.threads)
    import jax
    import numpy as np
    import torch
    import transformers

    from minitron_jax.eval.generate import Generator

    model_dir, model = load_model(args.model, dtype="float32")
    cfg, params = model.config, jax.device_put(model.params())
    B, P, N = args.batch, args.prompt, args.new
    prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, (B, P)).tolist()
    gens = {n: Generator(cfg, max_new_tokens=n, batch_size=B, bucket=P) for n in (1, N)}

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # as XLA:CPU always does; else torch slows 5-8x after jax ran (README)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    tm = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                           attn_implementation="sdpa").eval()
    tm.generation_config.eos_token_id = None  # no stop tokens: every row makes --new tokens, as on the jax side
    tids = torch.tensor(prompts, dtype=torch.long)
    tmask = torch.ones_like(tids)

    def run_jax(n):
        return gens[n](params, prompts, range(B))[0]

    def run_torch(n):
        with torch.inference_mode():
            return tm.generate(tids, attention_mask=tmask, do_sample=False, max_new_tokens=n, pad_token_id=0)[:, P:]

    fns = {"jax_1": lambda: run_jax(1), "torch_1": lambda: run_torch(1),
           "jax_n": lambda: run_jax(N), "torch_n": lambda: run_torch(N)}
    times = timeit(fns, args.warmup, args.iters)
    jt = np.asarray([r.tokens for r in run_jax(N)])
    tt = run_torch(N).numpy()
    agree = float((jt == tt).mean())
    first_diff = int(np.argmax((jt != tt).any(0))) if (jt != tt).any() else N
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"batch": B, "prompt": P, "new": N, "iters": args.iters, "warmup": args.warmup, "threads": threads,
           "token_agreement": agree, "first_differing_step": first_diff}
    for side in ("jax", "torch"):
        res[side] = {"prefill_s": med[f"{side}_1"], "generate_s": med[f"{side}_n"],
                     "decode_tok_s": B * (N - 1) / (med[f"{side}_n"] - med[f"{side}_1"]),
                     "end_to_end_tok_s": B * N / med[f"{side}_n"],
                     "generate_s_min_max": [min(times[f"{side}_n"]), max(times[f"{side}_n"])]}
    res["decode_ratio_jax_over_torch"] = res["jax"]["decode_tok_s"] / res["torch"]["decode_tok_s"]
    res["env"] = {"allocator": allocator(), "cpus": sorted(os.sched_getaffinity(0)), "loadavg": os.getloadavg()[0],
                  "jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__}

    print("environment: " + ", ".join(f"{k}={v}" for k, v in res["env"].items()))
    print(f"batch {B}, prompt {P}, {N} new tokens, greedy, fp32, {threads} threads; medians of {args.iters} "
          f"interleaved runs after {args.warmup} warm-up")
    for side in ("jax", "torch"):
        r = res[side]
        print(f"  {side:5s}: decode {r['decode_tok_s']:7.1f} tok/s, end-to-end {r['end_to_end_tok_s']:7.1f} tok/s, "
              f"prefill + first token {1e3 * r['prefill_s']:.0f} ms, {N} tokens {r['generate_s']:.2f} s")
    print(f"  decode ratio jax/torch: {res['decode_ratio_jax_over_torch']:.2f}; generated tokens agreeing "
          f"{agree:.3f} (first difference at step {first_diff})")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(res) + "\n")
    return res


if __name__ == "__main__":
    main()
