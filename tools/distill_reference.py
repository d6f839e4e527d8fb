"""Issue 26: the main job's distillation beside a plain reference loop on the same inputs, one difference at a time.

    python tools/distill_reference.py --run runs/smollm2_cpu --arm reference --seed 0
    python tools/distill_reference.py --run runs/smollm2_cpu --arm trainer_rows --seed 0
    python tools/distill_reference.py --run runs/smollm2_cpu --arm trainer --seed 0
    python tools/distill_reference.py --run runs/smollm2_cpu --count-targets

`--run` is a finished (or `--until prune`) `minitron run` of the built-in default: its token store, its pruned
student and its recipe. Arms:

* `reference`: a plain loop written here, as a user would write it outside the project. Rows: the training
  documents only, concatenated in store order and cut into seq_len windows, in a seeded permutation
  (`numpy.random.default_rng(seed)`). Loss: the mean over target tokens of KL(teacher || student) + CE, written
  here with `jax.nn.log_softmax` over the full vocabulary in fp32. `optax.adamw` (the recipe's b1, b2, eps,
  weight decay off the norm weights), global-norm clip, lr(s) = peak (s+1)/warmup during warm-up, then cosine
  to min_lr over the remaining updates. The model is the project's `forward` (it matches `transformers`).
* `trainer_rows`: the same loop on the trainer's rows in the trainer's order (`loader.Loader` over the store's
  concat windows, held-out documents masked in place, grain's shuffle): isolates the rows from the rest.
* `trainer`: `train.trainer.train` with the main job's distillation recipe (its own metrics.jsonl).

Every arm is scored by the trainer's held-out evaluation (`trainer.held_out_sums`, the main job's rows) every
`eval_every` steps. Each evaluation is a line of OUT/results.jsonl: {"arm", "seed", "step", "held_out_loss",
"targets" (target tokens trained on so far), "seconds"}. `--count-targets` prints the target tokens of each of
the trainer's steps (no model): what masking held-out documents in place costs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np


def recipe(run: Path, seed: int, out: Path):
    """The main job's distillation RunConfig for `run`'s store and pruned student, with `seed`."""
    from minitron_jax.core.assets import fetch_smollm2
    from minitron_jax.run.pipeline import Pipeline, distill_recipe, load_pipeline

    cfg = load_pipeline(None, [f"out={run}"])
    teacher = fetch_smollm2(progress=lambda m: None) if cfg.teacher == "smollm2" else Path(cfg.teacher)
    store = argparse.Namespace(store=str(run / "data" / "store"))  # the stages' common keys (`Pipeline.common`)
    return distill_recipe(cfg, **{**Pipeline(cfg).common(store), "seed": seed}, teacher=str(teacher),
                          student=str(run / "prune" / "student_hf"), out=str(out))


def trainer_loader(rc):
    from minitron_jax.data.loader import Loader, training_data
    from minitron_jax.io.hf import load_tokenizer
    from minitron_jax.model.config import LlamaConfig

    cfg = LlamaConfig.from_file(rc.student)
    rows, held, stream = training_data(rc, load_tokenizer(rc.student, vocab_size=cfg.vocab_size), cfg.vocab_size)
    return Loader(rows, rc.batch_size, seed=rc.seed, process_index=0, process_count=1, stream=stream), held


def reference_rows(rc) -> np.ndarray:
    """[n, S] windows of the training documents only, concatenated in store order (no masking needed)."""
    from minitron_jax.data.spec import DataSpec
    from minitron_jax.data.store_reader import TRAIN, SplitMap
    from minitron_jax.data.token_store import open_store

    spec = DataSpec.of_recipe(rc)
    st = open_store(rc.data)
    of = SplitMap(st, spec.splits).of(np.arange(st.n_documents))
    off = st.document_offsets()
    tokens = np.asarray(st.read(0, st.n_tokens)).astype(np.int32)
    kept = np.concatenate([tokens[off[d]:off[d + 1]] for d in np.flatnonzero(of == TRAIN)])
    n = len(kept) // rc.seq_len
    return kept[:n * rc.seq_len].reshape(n, rc.seq_len)


def target_count(b: dict) -> int:
    """Positions of a [b, S] batch trained on: a real token whose next token is real and in the same segment."""
    m, seg = b["mask"], b["segment_ids"]
    return int(((m[:, :-1] > 0) & (m[:, 1:] > 0) & (seg[:, :-1] == seg[:, 1:])).sum())


def lr_at(rc, s: int) -> float:
    """The reference's LR of update s (0-based)."""
    if s < rc.warmup:
        return rc.lr * (s + 1) / rc.warmup
    t = (s - rc.warmup) / max(1, rc.steps - rc.warmup)
    return rc.min_lr + (rc.lr - rc.min_lr) * 0.5 * (1 + math.cos(math.pi * t))


def plain_loop(rc, arm: str, emit) -> None:
    import jax
    import jax.numpy as jnp
    import optax

    from minitron_jax.io import hf
    from minitron_jax.model.config import LlamaConfig
    from minitron_jax.model.llama import forward
    from minitron_jax.model.sharding import make_mesh
    from minitron_jax.train.objective import kd_config
    from minitron_jax.train.steps import make_eval_step
    from minitron_jax.train.trainer import held_out_sums

    s_cfg, t_cfg = LlamaConfig.from_file(rc.student), LlamaConfig.from_file(rc.teacher)
    student = hf.from_pretrained(rc.student, dtype="float32").params()
    teacher = hf.from_pretrained(rc.teacher, dtype="float32").params()
    loader, held = trainer_loader(rc)
    rows = reference_rows(rc) if arm == "reference" else None
    order = np.random.default_rng(rc.seed).permutation(len(rows)) if rows is not None else None

    def batch(t: int) -> dict:
        if rows is None:
            b = loader.batch_at(t)
            return {k: b[k] for k in ("input_ids", "segment_ids", "mask")}
        idx = order[(np.arange(rc.batch_size) + t * rc.batch_size) % len(order)]
        ids = rows[idx]
        return {"input_ids": ids, "segment_ids": np.ones_like(ids), "mask": np.ones(ids.shape, np.float32)}

    def loss_fn(params, teacher, b):
        ids, seg, m = b["input_ids"], b["segment_ids"], b["mask"]
        valid = (m[:, :-1] > 0) & (m[:, 1:] > 0) & (seg[:, :-1] == seg[:, 1:])  # target in the same document
        w = valid.astype(jnp.float32)
        kw = dict(segment_ids=seg, attention_mask=m.astype(jnp.int32))
        ls = jax.nn.log_softmax(forward(params, s_cfg, ids, **kw)[:, :-1].astype(jnp.float32), -1)
        lt = jax.nn.log_softmax(forward(teacher, t_cfg, ids, **kw)[:, :-1].astype(jnp.float32), -1)
        lt = jax.lax.stop_gradient(lt)
        kl = jnp.sum(jnp.exp(lt) * (lt - ls), -1)
        ce = -jnp.take_along_axis(ls, ids[:, 1:, None], -1)[..., 0]
        return jnp.sum((rc.kl_weight * kl + rc.ce_weight * ce) * w) / jnp.maximum(w.sum(), 1.0)

    decay = lambda p: jax.tree_util.tree_map_with_path(lambda k, _: "norm" not in jax.tree_util.keystr(k), p)  # noqa: E731
    tx = optax.chain(optax.clip_by_global_norm(rc.clip),
                     optax.adamw(lambda c: jnp.asarray([lr_at(rc, s) for s in range(rc.steps)])[c], b1=rc.b1,
                                 b2=rc.b2, eps=rc.eps, weight_decay=rc.weight_decay, mask=decay))
    opt = tx.init(student)

    @jax.jit
    def step(params, opt, teacher, b):  # the teacher an argument, not a constant folded into the program
        loss, g = jax.value_and_grad(loss_fn)(params, teacher, b)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    alone = dataclasses.replace(rc, mode="finetune", teacher=None, teacher_logits=None, hidden_weight=0.0)
    ev = jax.jit(make_eval_step(alone, s_cfg, None, kd_config(alone)))
    mesh = make_mesh(1, -1, 1)

    def evaluate(params) -> float:
        tot = held_out_sums(ev, params, None, held, alone, mesh)
        return tot["ce"] / tot["tokens"]

    emit(0, evaluate(student), 0)
    targets, t0 = 0, time.perf_counter()
    for t in range(rc.steps):
        b = batch(t)
        targets += target_count(b)
        student, opt, loss = step(student, opt, teacher, {k: jnp.asarray(v) for k, v in b.items()})
        done = t + 1
        el = time.perf_counter() - t0
        print(f"[{arm}] {done}/{rc.steps} loss={float(loss):.4f} {done * rc.batch_size * rc.seq_len / el:.0f} tok/s "
              f"ETA {el / done * (rc.steps - done):.0f}s", file=sys.stderr, flush=True)
        if done % rc.eval_every == 0 or done == rc.steps:
            emit(done, evaluate(student), targets)


def trainer_arm(rc, emit) -> None:
    from minitron_jax.train import trainer

    rc = dataclasses.replace(rc, export=False, peak_tflops=1.0)
    trainer.train(rc, lambda m: print(m, file=sys.stderr, flush=True))
    for r in map(json.loads, (Path(rc.out) / "metrics.jsonl").read_text().splitlines()):
        if "held_out_loss" in r:
            emit(int(r["step"]), float(r["held_out_loss"]), None)


def count_targets(rc) -> None:
    loader, _ = trainer_loader(rc)
    full = rc.batch_size * (rc.seq_len - 1)
    n = []
    for t in range(rc.steps):
        b = loader.batch_at(t)
        n.append(target_count(b))
    n = np.array(n)
    print(f"seed {rc.seed}: the trainer's {rc.steps} steps train on {n.sum():,} target tokens, {n.mean():.1f} per "
          f"step of {full} ({100 * (1 - n.mean() / full):.2f}% fewer); {int((n < full).sum())} steps lose some "
          f"(fewest: {n.min()})")
    for a in range(0, rc.steps, rc.eval_every):
        print(f"  steps {a + 1}-{a + rc.eval_every}: {100 * (1 - n[a:a + rc.eval_every].mean() / full):.2f}% fewer")


def order_check(rc, seeds=range(6), bins: int = 10) -> None:
    """How uniformly the first steps x batch rows of grain's shuffle (the trainer's order) and of a numpy
    permutation (the reference's) cover the windows: counts in `bins` equal bins and their chi2."""
    import grain
    n, k = len(reference_rows(rc)), rc.steps * rc.batch_size
    for seed in seeds:
        for name, idx in (("grain", np.array(list(grain.MapDataset.source(list(range(n))).shuffle(seed=seed)[:k]))),
                          ("numpy", np.random.default_rng(seed).permutation(n)[:k])):
            h = np.histogram(idx, bins=bins, range=(0, n))[0]
            print(f"seed {seed} {name}: first {k} of {n} windows by {bins} bins {h.tolist()}, "
                  f"chi2 {((h - k / bins) ** 2 / (k / bins)).sum():.1f} ({bins - 1} dof)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a `minitron run` out (data and prune stages done)")
    ap.add_argument("--arm", choices=("reference", "trainer_rows", "trainer"), default="reference")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/issue26", help="results.jsonl and the trainer arm's runs")
    ap.add_argument("--count-targets", action="store_true")
    ap.add_argument("--order-check", action="store_true", help="how uniform the two orders' first rows are")
    ap.add_argument("--steps", type=int, default=None, help="fewer steps (a smoke test; the schedule follows)")
    args = ap.parse_args(argv)
    run, out = Path(args.run), Path(args.out)
    rc = recipe(run, args.seed, out / f"{args.arm}_seed{args.seed}")
    if args.steps:
        rc = dataclasses.replace(rc, steps=args.steps, warmup=min(rc.warmup, args.steps - 1))
    if args.count_targets:
        return count_targets(rc)
    if args.order_check:
        return order_check(rc)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def emit(step: int, loss: float, targets) -> None:
        line = {"arm": args.arm, "seed": args.seed, "step": step, "held_out_loss": round(loss, 5),
                "targets": targets, "seconds": round(time.perf_counter() - t0, 1)}
        print(json.dumps(line), flush=True)
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")

    if args.arm == "trainer":
        trainer_arm(rc, emit)
    else:
        plain_loop(rc, args.arm, emit)


if __name__ == "__main__":
    main()
