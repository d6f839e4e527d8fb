"""Distillation step throughput, fp32 CPU: minitron_jax (jitted make_train_step) vs a PyTorch KD step.

    [LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4] [XLA_FLAGS=...] \
    python tools/bench_distill.py [--batch 4 --seq 256 --iters 5 --warmup 1 --threads N] \
        [--compute-dtype bfloat16] [--json PATH]
    python tools/bench_distill.py --trainer-path [--iters 8 --warmup 2]   # as users run it, see below

--trainer-path: `minitron distill` itself, started as a user starts it (its own process, no LD_PRELOAD,
so the command's default allocator, mimalloc, see minitron_jax/allocator.py) on Shakespeare with the
same teacher, student and batch; its steady-state per-step `tokens_per_s` from metrics.jsonl (loader,
jitted step, logging and hooks), next to this script's torch KD step run alone in its own process
with the default (glibc) allocator.

Teacher: SmolLM2-135M (fetch_smollm2). Student: its hidden_size=432,intermediate_size=1024 prune
(random importance scores: timing only), written to a temp HF dir so torch loads the same weights.
Both sides: batch x seq tokens, forward KL(teacher || student) at T=1 summed over the vocabulary and
averaged over the b*(S-1) target tokens, AdamW lr 1e-4, betas 0.9/0.95, eps 1e-8, wd 0.1 (not on
norms), global-norm clip 1.0. JAX: jax.jit(make_train_step(...), donate_argnums=0), one device,
no mesh, as trainer.train runs it. torch: teacher forward under no_grad, student forward,
F.kl_div(log_softmax(s), log_softmax(t), log_target=True), backward, clip_grad_norm_, AdamW.step,
zero_grad. Threads / pinning / allocator as tools/bench_forward.py; the sides are timed alternately.
torch flushes denormals (torch.set_flush_denormal) as XLA:CPU always does: without it, torch's step
runs 5-8x slower in this process once the JAX step has run (denormal fp32 arithmetic).
MFU = tokens * (3 * student + teacher forward FLOPs/token) / step time / peak, where peak is the
larger of a measured 2048^3 fp32 matmul in JAX and in torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_forward import allocator, setup_threads, summary, timeit  # noqa: E402  (imports no jax/torch)

TARGET = "hidden_size=432,intermediate_size=1024"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="0: all CPUs this process may use")
    p.add_argument("--compute-dtype", default=None, help="extra JAX row with this student compute dtype")
    p.add_argument("--chunk-size", type=int, default=256, help="KDConfig.chunk_size (KL sequence chunk)")
    p.add_argument("--remat", default="none", choices=("none", "full", "dots"))
    p.add_argument("--torch-denormals", action="store_true",
                   help="leave torch's denormal handling alone (default: flush, as XLA:CPU does)")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--skip-jax", action="store_true", help="only the torch row (used by --trainer-path)")
    p.add_argument("--trainer-path", action="store_true",
                   help="instead: `minitron distill` as a user runs it (its own process, loader, logging, hooks; "
                        "per-step tokens_per_s from metrics.jsonl) vs the torch KD step in its own process, "
                        "both with the environment's allocator (no LD_PRELOAD)")
    p.add_argument("--json", default=None, help="also append the results as one JSON line to PATH")
    return p.parse_args(argv)


def torch_peak(n: int = 2048, reps: int = 5) -> float:
    import torch
    x = torch.ones(n, n)
    x @ x
    t0 = time.perf_counter()
    for _ in range(reps):
        x @ x
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def trainer_path(args) -> dict:
    """`minitron distill` (the CLI, its default allocator) vs a torch KD step in a separate process."""
    import statistics
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    steps = args.warmup + args.iters + 2  # step 1 compiles; the last one also evaluates and saves
    with tempfile.TemporaryDirectory(prefix="bench_trainer_") as tmp:
        prep = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
                f"import bench_distill as b; print(b.prepare_student({tmp!r}))")
        t_dir, s_dir, data = subprocess.run([sys.executable, "-c", prep], env=env, check=True, capture_output=True,
                                            text=True).stdout.split()
        out = os.path.join(tmp, "run")
        cmd = [sys.executable, "-m", "minitron_jax.run.cli", "distill", f"teacher={t_dir}", f"student={s_dir}",
               f"data={data}", f"out={out}", f"steps={steps}", f"batch_size={args.batch}", f"seq_len={args.seq}",
               "warmup=1", "lr=1e-4", "min_lr=1e-4", f"chunk_size={args.chunk_size}", f"remat={args.remat}",
               f"eval_every={10 ** 6}", "eval_batches=1", f"save_every={10 ** 6}", "export=false"]
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        with open(os.path.join(out, "metrics.jsonl")) as f:
            recs = [json.loads(ln) for ln in f if '"tokens_per_s"' in ln and '"kl"' in ln]
        steady = [r["tokens_per_s"] for r in recs if 1 + args.warmup < r["step"] < steps]
        json_path = os.path.join(tmp, "torch.json")
        subprocess.run([sys.executable, os.path.abspath(__file__), "--skip-jax", "--iters", str(args.iters),
                        "--warmup", str(args.warmup), "--batch", str(args.batch), "--seq", str(args.seq),
                        "--threads", str(args.threads), "--json", json_path], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        with open(json_path) as f:
            torch_res = json.loads(f.readline())
    tr = {"tok_s_median": statistics.median(steady), "tok_s_min": min(steady), "tok_s_max": max(steady),
          "steps_timed": len(steady)}
    to = torch_res["torch"]
    res = {"trainer": tr, "torch_own_process": to, "ratio_trainer_over_torch": tr["tok_s_median"] / to["tok_s_median"],
           "env": {"LD_PRELOAD": os.environ.get("LD_PRELOAD", ""), "MINITRON_ALLOCATOR":
                   os.environ.get("MINITRON_ALLOCATOR", "mimalloc (default)"), "loadavg_end": round(os.getloadavg()[0], 2),
                   "torch_env": torch_res["env"]}}
    print(f"trainer path: `minitron distill` batch {args.batch} x seq {args.seq}, fp32, steps {args.warmup + 2}.."
          f"{steps - 1} of {steps} (per-step tokens_per_s from metrics.jsonl: loader, step, logging, hooks); "
          f"allocator {res['env']['MINITRON_ALLOCATOR']}")
    print(f"  minitron distill : {tr['tok_s_median']:7.1f} tok/s [{tr['tok_s_min']:.1f}, {tr['tok_s_max']:.1f}]")
    print(f"  torch KD step    : {to['tok_s_median']:7.1f} tok/s [{to['tok_s_min']:.1f}, {to['tok_s_max']:.1f}]  "
          f"(own process, allocator {torch_res['env']['allocator']})")
    print(f"  ratio minitron distill / torch: {res['ratio_trainer_over_torch']:.3f} (median/median)")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(res) + "\n")
    return res


def prepare_student(tmp: str) -> str:
    """Teacher dir, a random-importance student of it (timing only) and the Shakespeare corpus, as paths."""
    import jax
    import numpy as np

    from minitron_jax.core.assets import fetch_shakespeare, fetch_smollm2
    from minitron_jax.io.hf import load_params, save_params
    from minitron_jax.model.config import LlamaConfig
    from minitron_jax.prune.pruning import prune
    from minitron_jax.prune.targets import required_scores

    t_dir = str(fetch_smollm2(progress=lambda m: None))
    t_cfg = LlamaConfig.from_file(t_dir)
    rng = np.random.default_rng(0)
    scores = {k: rng.random(shape) for k, shape in required_scores(t_cfg, TARGET).items()}
    params, _ = load_params(t_dir, t_cfg, dtype="float32")
    s_np, s_cfg = prune(jax.tree.map(np.asarray, params), t_cfg, scores, TARGET)
    s_dir = save_params(s_np, s_cfg, os.path.join(tmp, "student"), source=t_dir)
    return f"{t_dir} {s_dir} {fetch_shakespeare(progress=lambda m: None)}"


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.trainer_path:
        return trainer_path(args)
    threads = setup_threads(args.threads)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    import minitron_jax as mj
    from minitron_jax.core.assets import fetch_smollm2
    from minitron_jax.io.hf import save_params
    from minitron_jax.model.losses import KDConfig
    from minitron_jax.prune.pruning import prune
    from minitron_jax.prune.targets import required_scores
    from minitron_jax.train.run_config import RunConfig
    from minitron_jax.train.steps import make_optimizer, make_train_step
    from minitron_jax.train.trainer import measure_peak_flops

    torch.set_num_threads(threads)
    ftz = not args.torch_denormals and torch.set_flush_denormal(True)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    t_dir = str(fetch_smollm2(progress=lambda m: None))
    teacher = mj.from_pretrained(t_dir, dtype="float32")
    t_cfg, t_params = teacher.config, jax.device_put(teacher.params())
    rng = np.random.default_rng(0)
    scores = {k: rng.random(shape) for k, shape in required_scores(t_cfg, TARGET).items()}
    s_np, s_cfg = prune(jax.tree.map(np.asarray, teacher.params()), t_cfg, scores, TARGET)
    tmp = tempfile.TemporaryDirectory(prefix="bench_distill_")
    s_dir = save_params(s_np, s_cfg, os.path.join(tmp.name, "student"), source=t_dir)
    B, S = args.batch, args.seq
    tokens = B * S
    ids_np = rng.integers(0, t_cfg.vocab_size, (B, S), dtype=np.int32)
    batch = {"input_ids": ids_np[None], "segment_ids": np.zeros((1, B, S), np.int32),
             "mask": np.ones((1, B, S), np.float32)}
    batch = jax.device_put(batch)
    kd = KDConfig(chunk_size=args.chunk_size)

    fns, compile_s, first_loss, rows = {}, {}, {}, [] if args.skip_jax else ["jax"]
    if args.compute_dtype and not args.skip_jax:
        rows.append(f"jax_{jnp.dtype(args.compute_dtype).name}")
    for row in rows:
        rc = RunConfig(teacher=t_dir, student=str(s_dir), lr=1e-4, min_lr=1e-4, warmup=0, steps=10 ** 6,
                       b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip=1.0, chunk_size=args.chunk_size,
                       remat=args.remat, compute_dtype=None if row == "jax" else args.compute_dtype,
                       teacher_dtype="float32")
        tx, _ = make_optimizer(rc)
        params = jax.device_put(jax.tree.map(jnp.asarray, s_np))
        state = {"trainable": {"model": params}, "opt_state": jax.jit(tx.init)({"model": params}),
                 "step": jnp.zeros((), jnp.int32)}
        t0 = time.perf_counter()
        step = jax.jit(make_train_step(rc, s_cfg, t_cfg, tx, kd), donate_argnums=0).lower(
            state, t_params, batch).compile()
        compile_s[row] = time.perf_counter() - t0
        box = {"state": state}

        def run_jax(step=step, box=box):
            box["state"], m = step(box["state"], t_params, batch)
            return float(m["loss"])  # host sync
        fns[row] = run_jax
        first_loss[row] = run_jax()

    env = {"allocator": allocator(), "LD_PRELOAD": os.environ.get("LD_PRELOAD", ""),
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""), "PJRT_NPROC": os.environ["PJRT_NPROC"],
           "cpus": sorted(os.sched_getaffinity(0)), "loadavg_start": round(os.getloadavg()[0], 2),
           "python": sys.version.split()[0], "jax": jax.__version__, "torch": torch.__version__}
    if not args.skip_torch:
        import torch.nn.functional as F
        import transformers
        load = lambda d: transformers.LlamaForCausalLM.from_pretrained(  # noqa: E731
            str(d), dtype=torch.float32, attn_implementation="sdpa")
        tt, ts = load(t_dir).eval(), load(s_dir).train()
        for p in tt.parameters():
            p.requires_grad_(False)
        named = list(ts.named_parameters())
        opt = torch.optim.AdamW([{"params": [p for n, p in named if "norm" not in n]},
                                 {"params": [p for n, p in named if "norm" in n], "weight_decay": 0.0}],
                                lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        tids = torch.from_numpy(ids_np.astype(np.int64))
        env |= {"transformers": transformers.__version__, "torch_threads": torch.get_num_threads(), "torch_ftz": ftz,
                "torch_attn": ts.config._attn_implementation}

        def run_torch():
            with torch.no_grad():
                zt = tt(input_ids=tids, use_cache=False).logits[:, :-1]
            zs = ts(input_ids=tids, use_cache=False).logits[:, :-1]
            V = zs.shape[-1]
            loss = F.kl_div(F.log_softmax(zs.reshape(-1, V), -1), F.log_softmax(zt.reshape(-1, V), -1),
                            reduction="batchmean", log_target=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(ts.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()
        fns["torch"] = run_torch
        first_loss["torch"] = run_torch()

    times = timeit(fns, max(0, args.warmup - 1), args.iters)  # the first call above was a warm-up too
    env["loadavg_end"] = round(os.getloadavg()[0], 2)
    peak_jax = measure_peak_flops()
    peak_torch = torch_peak() if not args.skip_torch else 0.0
    peak = max(peak_jax, peak_torch)
    flops = tokens * (3 * s_cfg.flops_per_token(S) + t_cfg.flops_per_token(S))
    res = {"batch": B, "seq": S, "iters": args.iters, "warmup": args.warmup, "threads": threads,
           "chunk_size": args.chunk_size, "remat": args.remat, "flops_per_step": flops,
           "peak_flops_jax": peak_jax, "peak_flops_torch": peak_torch}
    for k, ts_ in times.items():
        r = summary(ts_, tokens)
        res[k] = r | {"first_loss": first_loss[k], "mfu": flops / (r["ms_median"] / 1e3) / peak}
        if k in compile_s:
            res[k]["compile_s"] = compile_s[k]
    if "torch" in res:
        for k in rows:
            res[f"ratio_{k}_over_torch"] = res[k]["tok_s_median"] / res["torch"]["tok_s_median"]
            res[f"ratio_best_{k}_over_torch"] = res[k]["tok_s_max"] / res["torch"]["tok_s_max"]
    res["env"] = env

    print("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    print(f"KD step: teacher {t_cfg.param_count() / 1e6:.1f}M, student {s_cfg.param_count() / 1e6:.1f}M "
          f"({TARGET}); batch {B} x seq {S} = {tokens} tokens, fp32, {threads} threads, chunk {args.chunk_size}, "
          f"remat {args.remat}; {args.warmup} warmup + {args.iters} alternating iters; tok/s median [min, max]")
    print(f"  peak fp32 matmul: jax {peak_jax / 1e9:.0f}, torch {peak_torch / 1e9:.0f} GFLOP/s; "
          f"{flops / 1e9:.0f} GFLOP/step")
    for k in list(rows) + ["torch"]:
        if k in res:
            r = res[k]
            extra = f", compile {r['compile_s']:.1f} s" if "compile_s" in r else ""
            print(f"  {k:14s}: {r['tok_s_median']:7.1f} tok/s [{r['tok_s_min']:.1f}, {r['tok_s_max']:.1f}]  "
                  f"{r['ms_median']:7.0f} ms/step  MFU {100 * r['mfu']:.1f}%  first loss {r['first_loss']:.4f}{extra}")
    for k in rows:
        if f"ratio_{k}_over_torch" in res:
            print(f"  ratio {k}/torch: {res[f'ratio_{k}_over_torch']:.3f} (median/median), "
                  f"{res[f'ratio_best_{k}_over_torch']:.3f} (best/best)")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(res) + "\n")
    tmp.cleanup()
    return res


if __name__ == "__main__":
    main()
