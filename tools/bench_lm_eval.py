"""lm-eval throughput, fp32 CPU: `minitron lm-eval`'s backend (eval/lm_eval_model.MinitronLM over the JAX model)
beside lm-eval's own `hf` backend (HFLM: transformers in PyTorch) on the same model, tasks and batch size.

    [PYTHONPATH=.] python tools/bench_lm_eval.py [--tasks shakespeare_next_line,...] [--batch 8 --limit N --iters 2 --threads N]

Runs from the repository root (the tasks of configs/lm_eval_tasks read their JSONL from there). Each task runs
through `lm_eval.simple_evaluate` on each backend: once as a warm-up (for the JAX side this holds the compiles,
reported as `first_s`), then --iters times interleaved (jax, hf, jax, hf, ...); requests/s = the task's requests
(one per choice, per generation, per passage) / the median time. The task's data is loaded outside the timing.
Also prints each side's metrics (they agree: tests/eval/test_lm_eval.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_forward import allocator, load_model, setup_threads  # noqa: E402  (imports no jax/torch)

TASKS = "configs/lm_eval_tasks"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="shakespeare_next_line,shakespeare_complete_line,shakespeare_passages")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="0: all CPUs this process may use")
    p.add_argument("--model", default=None, help="HF dir (default: SmolLM2-135M-Instruct via fetch_smollm2)")
    p.add_argument("--json", default=None, help="also append the results as one JSON line to PATH")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    threads = setup_threads(args.threads)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import jax
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from minitron_jax.eval.lm_eval_model import MinitronLM
    from minitron_jax.io.hf import load_tokenizer
    from minitron_jax.run.generate_job import context_limit, stop_ids

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # as XLA:CPU always does; else torch slows 5-8x after jax ran (README)
    model_dir, model = load_model(args.model, dtype="float32")
    cfg, tok = model.config, load_tokenizer(model_dir, vocab_size=model.config.vocab_size)
    lms = {"jax": MinitronLM(jax.device_put(model.params()), cfg, tok, max_length=context_limit(cfg),
                             stop_ids=stop_ids(model_dir, cfg, tok), batch_size=args.batch),
           "hf": HFLM(pretrained=model_dir, device="cpu", dtype="float32", batch_size=args.batch)}

    def run(side: str, task: str) -> tuple[float, dict]:
        tm = TaskManager(include_path=TASKS, include_defaults=False)
        loaded = tm.load([task])
        tm.load = lambda _names: loaded
        t0 = time.perf_counter()
        res = lm_eval.simple_evaluate(model=lms[side], tasks=[task], task_manager=tm, num_fewshot=args.num_fewshot,
                                      limit=args.limit, bootstrap_iters=0, log_samples=True)
        return time.perf_counter() - t0, res

    out = {"model": model_dir, "batch": args.batch, "limit": args.limit, "iters": args.iters, "threads": threads,
           "dtype": "float32", "allocator": allocator(), "tasks": {}}
    for task in args.tasks.split(","):
        first = {side: run(side, task) for side in lms}
        times = {side: [] for side in lms}
        for _ in range(args.iters):
            for side in lms:
                times[side].append(run(side, task)[0])
        res = first["jax"][1]
        requests = sum(len(s["arguments"]) for s in res["samples"][task])
        row = {"requests": requests}
        for side in lms:
            med = statistics.median(times[side])
            metrics = {k: round(float(v), 6) for k, v in first[side][1]["results"][task].items()
                       if "," in k and "stderr" not in k}
            row[side] = {"first_s": first[side][0], "median_s": med, "requests_per_s": requests / med,
                         "metrics": metrics}
        row["jax_over_hf"] = row["jax"]["requests_per_s"] / row["hf"]["requests_per_s"]
        out["tasks"][task] = row
        print(f"{task}: {requests} requests; jax {row['jax']['requests_per_s']:.1f} req/s (first run "
              f"{row['jax']['first_s']:.1f} s), hf {row['hf']['requests_per_s']:.1f} req/s (first run "
              f"{row['hf']['first_s']:.1f} s), jax / hf {row['jax_over_hf']:.2f}; metrics jax {row['jax']['metrics']} "
              f"hf {row['hf']['metrics']}", flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(out) + "\n")
    return out


if __name__ == "__main__":
    main()
