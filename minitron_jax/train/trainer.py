"""Knowledge distillation (and teacher-correction fine-tuning) under SPMD.

One jitted step with explicit shardings and a donated train state: the frozen teacher (no gradient,
no optimizer state) and the student are sharded by the same logical rules over the
(data, fsdp, tensor) mesh; AdamW with warm-up + cosine decay and global-norm clipping.

The loss is built from small objective terms chosen once from the recipe (`lm_term` for teacher
correction; `kd_term`, plus `hidden_term` when hidden_weight > 0, for distillation). Gradient
accumulation scans over micro-batches and sums each term's token sums divided by the whole step's
token count, so the update is the full batch's token mean whatever the packing or process count.

`train` is a linear loop (batch, step, check that the loss and gradient norm are finite) followed by
hooks: evaluation, metrics (JSONL, TensorBoard, progress line), the caller's hooks, the stop agreement,
checkpointing. SIGTERM on any process stops every process after the same step (the flag is combined
across processes each step). Orbax checkpoints (async, keep last N, every N steps and on SIGTERM) hold
the student parameters, optimizer state, step and data-loader state, so `resume=true` continues exactly.

Before any weights or data load, `train` checks the recipe, the mesh against the devices, the batch
against the mesh and the model pair, then holds `out` for the whole run (`lock.output_lock`: a second
run into it is refused). A resume (resume.py) first compares the recipe with the checkpoints'
recipe.json (`recipe.check_resume`) and the student's shapes with the checkpoint's; it restores the
newest checkpoint that reads, moving damaged newer ones aside. recipe.json is (re)written only once the
run has started or resumed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from minitron_jax.core.atomic import check_output, write_text
from minitron_jax.core.errors import TrainingError
from minitron_jax.core.lock import output_lock
from minitron_jax.core.progress import Progress
from minitron_jax.data.loader import Loader, eval_batches, training_data
from minitron_jax.data.token_store import read_json
from minitron_jax.io.hf import from_pretrained, save_params
from minitron_jax.io.orbax_model import abstract_params
from minitron_jax.model.config import LlamaConfig
from minitron_jax.model.llama import forward, lm_head_weight, rms_norm
from minitron_jax.model.losses import (
    KDConfig,
    add_hidden_loss,
    dynamic_hidden_weight,
    hidden_cosine_loss,
    kd_loss,
    kd_loss_stored,
    lm_loss_from_hidden,
    next_token_targets,
)
from minitron_jax.model.sharding import batch_sharding, make_mesh, named_sharding, to_global
from minitron_jax.prune.record import PRUNE_RECORD, load_prune_record
from minitron_jax.train.preflight import check_mesh, check_pair, maybe_initialize_distributed
from minitron_jax.train.resume import (
    check_checkpoint_shapes,
    check_resume_recipe,
    checkpoint_manager,
    restore_newest,
    write_recipe,
)
from minitron_jax.train.run_config import RunConfig
from minitron_jax.train.stored_logits import MANIFEST as LOGITS_MANIFEST
from minitron_jax.train.stored_logits import TeacherLogits, logits_batch


# ---------------------------------------------------------------------------- FLOPs / MFU
def measure_peak_flops(n: int = 2048, reps: int = 8) -> float:
    """FLOP/s of a large fp32 matmul on the first device, best of `reps` (the MFU denominator when
    `peak_tflops` is not given), times the device count. A busy machine makes it an underestimate."""
    x = jax.device_put(jnp.ones((n, n), jnp.float32), jax.devices()[0])
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best * jax.device_count()


# ---------------------------------------------------------------------------- optimizer and state
def make_optimizer(rc: RunConfig) -> tuple[optax.GradientTransformation, Callable]:
    base = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=rc.lr, warmup_steps=rc.warmup, decay_steps=rc.steps, end_value=rc.min_lr)
    schedule = lambda count: base(count + 1)  # noqa: E731  (update 1 uses lr/warmup, not 0; the last ends at min_lr)

    def decay_mask(params):  # no weight decay on norm weights
        return jax.tree_util.tree_map_with_path(lambda path, _: "norm" not in jax.tree_util.keystr(path), params)

    clip = optax.clip_by_global_norm(rc.clip) if rc.clip > 0 else optax.identity()  # clip=0: no clipping
    tx = optax.chain(clip,
                     optax.adamw(schedule, b1=rc.b1, b2=rc.b2, eps=rc.eps, weight_decay=rc.weight_decay,
                                 mask=decay_mask))
    return tx, schedule


def layer_map(student_layers: int, teacher_layers: int) -> np.ndarray:
    """Teacher layer matched to each student layer when the pruning is not recorded (proportional depth)."""
    return np.asarray([round((i + 1) * teacher_layers / student_layers) - 1 for i in range(student_layers)])


def hidden_init(student_dir, s_cfg: LlamaConfig, t_cfg: LlamaConfig) -> tuple[np.ndarray, np.ndarray]:
    """(teacher layer of each student layer [Ls], initial projection [Hs, Ht]) for the hidden-state loss.

    From the student's `minitron_prune.json` (written at prune time) when it has one: the teacher layer
    each student layer was cut from, and the selection of the kept hidden channels (proj[i, kept[i]] = 1,
    so the projected student state starts as the teacher's state on those channels). Without a record:
    proportional depth and eye(Hs, Ht)."""
    rec = load_prune_record(student_dir)
    if rec is None:
        return layer_map(s_cfg.num_hidden_layers, t_cfg.num_hidden_layers), np.eye(s_cfg.hidden_size, t_cfg.hidden_size,
                                                                                    dtype=np.float32)
    layers, kept, src = np.asarray(rec["layers"], np.int64), np.asarray(rec["hidden"], np.int64), rec["source_config"]
    fix = (f"; distil from the teacher it was pruned from ({rec.get('source')}), or delete "
           f"{Path(student_dir) / PRUNE_RECORD} to pair layers by depth")
    if (src.get("num_hidden_layers"), src.get("hidden_size")) != (t_cfg.num_hidden_layers, t_cfg.hidden_size):
        raise TrainingError(f"the student was pruned from a model with {src.get('num_hidden_layers')} layers and hidden "
                            f"size {src.get('hidden_size')}, but the teacher has {t_cfg.num_hidden_layers} and "
                            f"{t_cfg.hidden_size}" + fix)
    if len(layers) != s_cfg.num_hidden_layers or len(kept) != s_cfg.hidden_size:
        raise TrainingError(f"{PRUNE_RECORD} lists {len(layers)} layers and {len(kept)} hidden channels, but the "
                            f"student has {s_cfg.num_hidden_layers} and {s_cfg.hidden_size}" + fix)
    if not (0 <= layers.min() and layers.max() < t_cfg.num_hidden_layers and 0 <= kept.min()
            and kept.max() < t_cfg.hidden_size):
        raise TrainingError(f"{PRUNE_RECORD} holds indices outside the teacher's layers or hidden channels" + fix)
    proj = np.zeros((s_cfg.hidden_size, t_cfg.hidden_size), np.float32)
    proj[np.arange(len(kept)), kept] = 1.0
    return layers, proj


# ---------------------------------------------------------------------------- objectives
# Each objective term is a small function of one micro-batch's forward outputs `o` and `n`, the whole
# step's real-target count: it returns (value, logged metrics), sums over the micro-batch divided by n,
# so that micro-batch values add up to the step's token means whatever the packing or process count.
def lm_term(o: dict, kd: KDConfig, n):
    """Next-token cross-entropy of the student (teacher correction)."""
    ce = lm_loss_from_hidden(o["h_s"], o["head_s"], o["targets"], o["tmask"], kd.chunk_size, normalizer=n)
    return ce, {"ce": ce}


def kd_term(o: dict, kd: KDConfig, n):
    """kl_weight x KL(teacher || student) + ce_weight x CE on the logits (from stored top-k when given)."""
    if "t_values" in o:
        loss, m = kd_loss_stored(o["h_s"], o["head_s"], o["t_values"], o["t_indices"], o["targets"], o["tmask"], kd,
                                 normalizer=n)
        return loss, {"kl": m["kl"], "ce": m["ce"]}
    loss, m = kd_loss(o["h_s"], o["h_t"], o["head_s"], o["head_t"], o["targets"], o["tmask"], kd, normalizer=n)
    return loss, {"kl": m["kl"], "ce": m["ce"]}


def hidden_term(o: dict, kd: KDConfig, n):
    """1 - cosine between each student layer's output (after the final norm, projected by the learned
    `proj`) and the output of its teacher layer, mean over layers and tokens."""
    h = hidden_cosine_loss(o["states_s"], o["states_t"], o["proj"], o["tmask"], normalizer=n)
    return h, {"hidden_loss": h}


def combine(parts: dict, kd: KDConfig):
    """The step's loss from its summed terms: logit + hidden_weight x dynamic weight x hidden, where the
    dynamic weight (logit / hidden, no gradient) is taken from the whole step's sums."""
    return add_hidden_loss(parts["logit"], parts["hidden"], kd) if "hidden" in parts else parts["logit"]


def make_objective(rc: RunConfig, s_cfg: LlamaConfig, t_cfg: LlamaConfig | None, kd: KDConfig,
                   teacher_layers=None) -> Callable:
    """objective(trainable, teacher, mb, n) -> ({"logit": ., ["hidden": .]}, metrics) for one [b, S]
    micro-batch; the terms are chosen once here from the recipe (LM for finetune; KD, plus the hidden
    term when hidden_weight > 0, for distill)."""
    cdt = rc.compute_dtype
    hidden = rc.hidden_weight > 0 and rc.mode == "distill"
    terms = {"logit": lm_term} if rc.mode == "finetune" else {"logit": kd_term}
    if hidden:
        terms["hidden"] = hidden_term
        tmap = jnp.asarray(layer_map(s_cfg.num_hidden_layers, t_cfg.num_hidden_layers)
                           if teacher_layers is None else teacher_layers)
    grab = (lambda acts, m: acts["layer_out"]) if hidden else None  # noqa: E731

    def run(params, cfg, mb, dtype):
        out = forward(params, cfg, mb["input_ids"], attention_mask=mb["mask"], segment_ids=mb["segment_ids"],
                      remat=rc.remat, return_hidden=True, compute_dtype=dtype, capture=grab, attention=rc.attention)
        if not hidden:
            return out, None
        h, states = out  # layer outputs [L, B, S, H], compared after the model's final norm
        return h, jax.vmap(lambda x: rms_norm(x, params["norm"], cfg.rms_norm_eps))(states)

    def objective(trainable, teacher, mb, n):
        student = trainable["model"]
        targets, tmask = next_token_targets(mb["input_ids"], mb["mask"], mb["segment_ids"])
        o = {"targets": targets, "tmask": tmask, "head_s": lm_head_weight(student, s_cfg)}
        o["h_s"], o["states_s"] = run(student, s_cfg, mb, cdt)
        if "t_values" in mb:  # stored teacher top-k logits: no teacher forward
            o["t_values"], o["t_indices"] = mb["t_values"], mb["t_indices"]
        elif rc.mode == "distill":
            teacher = jax.lax.stop_gradient(teacher)
            o["h_t"], states_t = run(teacher, t_cfg, mb, rc.teacher_dtype or cdt)
            o["head_t"] = lm_head_weight(teacher, t_cfg)
            if hidden:
                o["states_t"], o["proj"] = states_t[tmap], trainable["proj"]
        parts, metrics = {}, {}
        for name, term in terms.items():
            parts[name], m = term(o, kd, n)
            metrics.update(m)
        return parts, metrics

    return objective


# ---------------------------------------------------------------------------- the jitted step
def make_train_step(rc: RunConfig, s_cfg: LlamaConfig, t_cfg: LlamaConfig | None, tx, kd: KDConfig,
                    teacher_layers=None) -> Callable:
    """step(state, teacher_params, batch) -> (state, metrics); batch arrays are [A, b, S].

    Gradient accumulation scans the A micro-batches, summing each term's value and gradient with every
    micro-batch normalised by the whole step's real-target count: the update equals the full batch's
    token mean. With the hidden-state loss and A > 1 the two terms' gradients are kept apart (one more
    gradient buffer, two backward passes per micro-batch) and combined once the step's dynamic weight
    is known."""
    objective = make_objective(rc, s_cfg, t_cfg, kd, teacher_layers)
    hidden = rc.hidden_weight > 0 and rc.mode == "distill"

    def step(state, teacher, batch):
        A = batch["input_ids"].shape[0]
        separate = hidden and A > 1
        _, tmask = jax.vmap(next_token_targets)(batch["input_ids"], batch["mask"], batch["segment_ids"])
        n = jnp.maximum(jnp.sum(tmask), 1.0)  # global: the same on every process

        def micro(acc, mb):
            if separate:
                parts, vjp, m = jax.vjp(lambda tr: objective(tr, teacher, mb, n), state["trainable"], has_aux=True)
                g = {k: vjp({j: jnp.asarray(float(j == k), jnp.float32) for j in parts})[0] for k in parts}
            else:
                def total(tr):
                    parts, m = objective(tr, teacher, mb, n)
                    return combine(parts, kd), (parts, m)
                (_, (parts, m)), g = jax.value_and_grad(total, has_aux=True)(state["trainable"])
                g = {"total": g}
            return jax.tree.map(jnp.add, acc, (g, parts, m)), None

        zeros = lambda tree: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)  # noqa: E731
        shapes = jax.eval_shape(lambda: objective(state["trainable"], teacher, jax.tree.map(lambda x: x[0], batch), n))
        g0 = {k: zeros(state["trainable"]) for k in (shapes[0] if separate else ("total",))}
        (g, parts, metrics), _ = jax.lax.scan(micro, (g0, zeros(shapes[0]), zeros(shapes[1])), batch)
        if separate:
            w = kd.hidden_weight * dynamic_hidden_weight(parts["logit"], parts["hidden"])
            grads = jax.tree.map(lambda a, b: a + w * b, g["logit"], g["hidden"])
        else:
            grads = g["total"]
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state["trainable"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
        trainable = optax.apply_updates(state["trainable"], updates)
        metrics = {**metrics, "loss": combine(parts, kd), "grad_norm": optax.tree.norm(grads)}
        return {"trainable": trainable, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    return step


def make_eval_step(rc: RunConfig, s_cfg: LlamaConfig, t_cfg: LlamaConfig | None, kd: KDConfig) -> Callable:
    """eval(student, teacher, batch) -> sums of (kl, ce, tokens) on one [b, S] batch (the logged KL and CE do
    not depend on the training weights: any kl_weight / ce_weight works, CE-only included)."""

    def ev(student, teacher, mb):
        ids, seg, mask = mb["input_ids"], mb["segment_ids"], mb["mask"]
        targets, tmask = next_token_targets(ids, mask, seg)
        kw = dict(attention_mask=mask, segment_ids=seg, return_hidden=True, attention=rc.attention)
        h_s = forward(student, s_cfg, ids, compute_dtype=rc.compute_dtype, **kw)
        n = tmask.sum()
        if teacher is None:
            ce = lm_loss_from_hidden(h_s, lm_head_weight(student, s_cfg), targets, tmask, kd.chunk_size, normalizer=1.0)
            return {"ce": ce, "kl": jnp.zeros(()), "tokens": n}
        h_t = forward(teacher, t_cfg, ids, compute_dtype=rc.teacher_dtype or rc.compute_dtype, **kw)
        _, m = kd_loss(h_s, h_t, lm_head_weight(student, s_cfg), lm_head_weight(teacher, t_cfg), targets, tmask,
                       kd, normalizer=1.0)
        return {"ce": m["ce"], "kl": m["kl"], "tokens": n}

    return ev


def tree_shardings(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


# ---------------------------------------------------------------------------- the steps, built once
BATCH_DTYPES = {"input_ids": jnp.int32, "segment_ids": jnp.int32, "mask": jnp.float32}  # loader.py's rows


def kd_config(rc: RunConfig) -> KDConfig:
    return KDConfig(temperature=rc.temperature, kl_weight=rc.kl_weight, ce_weight=rc.ce_weight, top_k=rc.top_k,
                    chunk_size=rc.chunk_size, hidden_weight=rc.hidden_weight)


@dataclasses.dataclass
class Steps:
    """The run's jitted steps and their abstract arguments (ShapeDtypeStruct + NamedSharding): `train`
    executes them, `aot.compile_steps` lowers and compiles exactly these functions for a TPU topology."""
    train: Callable  # jitted (state, teacher, batch [A, b, S]) -> (state, metrics); state donated, sharded in and out
    eval: Callable  # jitted (student, teacher, batch [b, S]) -> sums of (kl, ce, tokens)
    tx: Any
    schedule: Callable
    state: dict[str, Any]  # {"trainable": {"model", ["proj"]}, "opt_state", "step"}
    teacher: Any  # abstract teacher parameters, or None (fine-tuning)
    batch: dict[str, Any]  # one step's [A, b, S] batch
    eval_batch: dict[str, Any]  # one held-out [b, S] batch


def stored_spec(rc: RunConfig) -> tuple[int, str] | None:
    """(k, values dtype) of the run's stored teacher logits: from their manifest, or (planning a run whose
    logits are not written yet) top_k (64 if 0) and bfloat16; None for an online teacher."""
    if rc.teacher_logits is None:
        return None
    try:
        m = read_json(rc.teacher_logits, LOGITS_MANIFEST)
    except Exception:  # noqa: BLE001 - not there yet
        m = None
    return (int(m["k"]), m["values_dtype"]) if m else (rc.top_k or 64, "bfloat16")


def build_steps(rc: RunConfig, s_cfg: LlamaConfig, t_cfg: LlamaConfig | None, mesh, kd: KDConfig,
                teacher_layers=None) -> Steps:
    """The train and eval steps of a run on `mesh`, with explicit in/out shardings: student parameters
    (fp32 master), AdamW state and gradients stay sharded by the logical rules (no replicated gradient);
    the train state is donated. Needs no weights: shapes come from the configs."""
    tx, schedule = make_optimizer(rc)
    rep = NamedSharding(mesh, P())
    trainable = {"model": abstract_params(s_cfg, mesh, jnp.float32)}
    if rc.hidden_weight > 0 and rc.mode == "distill":
        trainable["proj"] = jax.ShapeDtypeStruct((s_cfg.hidden_size, t_cfg.hidden_size), jnp.float32, sharding=rep)
    opt = jax.eval_shape(tx.init, trainable)
    opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, opt, tree_shardings(trainable),
                                   transform_non_params=lambda _: rep)
    opt = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), opt, opt_sh)
    state = {"trainable": trainable, "opt_state": opt, "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)}
    stored = stored_spec(rc)
    teacher = (abstract_params(t_cfg, mesh, rc.teacher_dtype or rc.compute_dtype or t_cfg.dtype)
               if rc.mode == "distill" and stored is None else None)
    A = rc.grad_accum
    micro_shape = (A, rc.batch_size // A, rc.seq_len)
    batch = {k: jax.ShapeDtypeStruct(micro_shape, d, sharding=batch_sharding(mesh, micro_shape))
             for k, d in BATCH_DTYPES.items()}
    if stored is not None:  # the teacher's stored top-k, [A, b, S, k], rows split like the tokens
        k_shape = (*micro_shape, stored[0])
        for name, d in (("t_values", jnp.dtype(stored[1])), ("t_indices", jnp.int32)):
            batch[name] = jax.ShapeDtypeStruct(k_shape, d, sharding=batch_sharding(mesh, k_shape))
    e_sh = named_sharding(("batch", "seq"), micro_shape[1:], mesh)
    eval_batch = {k: jax.ShapeDtypeStruct(micro_shape[1:], d, sharding=e_sh) for k, d in BATCH_DTYPES.items()}
    sh = tree_shardings(state)
    train_fn = jax.jit(make_train_step(rc, s_cfg, t_cfg, tx, kd, teacher_layers),
                       in_shardings=(sh, tree_shardings(teacher) if teacher is not None else None, tree_shardings(batch)),
                       out_shardings=(sh, None), donate_argnums=0)
    return Steps(train=train_fn, eval=jax.jit(make_eval_step(rc, s_cfg, t_cfg, kd)), tx=tx, schedule=schedule,
                 state=state, teacher=teacher, batch=batch, eval_batch=eval_batch)


# ---------------------------------------------------------------------------- the run






@dataclasses.dataclass
class Run:
    """What hooks see after each step: the recipe, the output directory, the checkpoint manager, the
    step just taken, the new state (do not keep it: the next step donates it) and this step's record
    (hooks add to it). A hook sets `stop` to end the run after this step's hooks with a checkpoint.
    The SIGTERM handler only sets `signal` (at any moment); `stop_hook` turns it into `stop` at a step
    that every process agrees on."""
    rc: RunConfig
    out: Path
    checkpoints: ocp.CheckpointManager
    loader: Any
    log: Callable[[str], Any]
    step: int = 0
    state: Any = None
    record: dict[str, Any] = dataclasses.field(default_factory=dict)
    last_saved: int | None = None
    stop: str | None = None  # why the run ends early ("SIGTERM"), None while it goes on
    signal: str | None = None  # set by the SIGTERM handler; read only by stop_hook


Hook = Callable[[Run], Any]


def evaluation_hook(evaluate: Callable[[Any], dict]) -> Hook:
    """Held-out loss (and KL) every eval_every steps and at the last step."""
    def hook(run: Run):
        if run.step % run.rc.eval_every == 0 or run.step == run.rc.steps:
            run.record.update(evaluate(run.state["trainable"]["model"]))
    return hook


def metrics_hook(prog: Progress, tb) -> Hook:
    """metrics.jsonl, TensorBoard and the progress line every log_every steps (and with held-out results)."""
    def hook(run: Run):
        rc, rec = run.rc, run.record
        if run.step % rc.log_every == 0 or run.step == rc.steps or "held_out_loss" in rec:
            prog.update(steps=run.step - prog.step, tokens=rc.batch_size * rc.seq_len * (run.step - prog.step), **rec)
            if tb is not None:
                for k, v in rec.items():
                    tb.add_scalar(k, v, run.step)
    return hook


def stop_hook(run: Run) -> None:
    """Sets `stop` on every process when any process has `stop` or `signal` set: with several processes
    their flags are combined (one small all-gather per step), so all stop after the same step and save
    the same checkpoint together (orbax saves are collective). One process: no collective."""
    sig = run.signal  # read once: the handler may set it at any moment
    mine = 2 if sig else 1 if run.stop else 0
    run.stop = run.stop or sig
    if jax.process_count() == 1:
        return
    from jax.experimental.multihost_utils import process_allgather
    flags = np.asarray(process_allgather(np.int32(mine)))
    if not run.stop and flags.any():
        who = int(np.flatnonzero(flags)[0])
        run.stop = f"{'SIGTERM' if flags[who] == 2 else 'stop'} on process {who}"


def checkpoint_hook(run: Run) -> None:
    """Save every save_every steps, at the last step, and when the run stops early (preemption)."""
    if run.step % run.rc.save_every == 0 or run.step == run.rc.steps or run.stop:
        run.checkpoints.save(run.step, args=ocp.args.Composite(state=ocp.args.StandardSave(run.state),
                                                               loader=ocp.args.JsonSave(run.loader.get_state())))
        run.last_saved = run.step
    if run.stop:
        run.checkpoints.wait_until_finished()
        run.log(f"{run.stop}: saved step {run.step} to {run.out / 'checkpoints'}; rerun with resume=true to continue")


def train(rc: RunConfig, log: Callable[[str], Any] | None = None, hooks: tuple[Hook, ...] | list[Hook] = ()
          ) -> dict[str, Any]:
    """Run distillation (or fine-tuning) as the recipe says; returns a summary dict.

    The recipe, the mesh and the model pair are checked first, then `out` is held for the whole run
    (a second run into it is refused). The loop is linear: next batch, jitted step, check that the loss
    and gradient norm are finite, then the hooks in order: evaluation, metrics, the caller's `hooks` (each
    `hook(run: Run)`), the stop agreement (`stop_hook`), checkpointing. SIGTERM (preemption) on any
    process stops every process after the same step, which is checkpointed; `train` returns with
    `preempted_at` (the CLI then exits 143, see `Preempted`)."""
    log = log or (lambda m: print(m, flush=True) if jax.process_index() == 0 else None)
    rc.validate()
    maybe_initialize_distributed(rc)
    check_mesh(rc)
    s_cfg, t_cfg, tok = check_pair(rc)  # also the batch against the mesh
    with output_lock(rc.out, f"minitron {rc.mode}"), contextlib.ExitStack() as stack:
        return _train(rc, s_cfg, t_cfg, tok, log, hooks, stack)


def _train(rc: RunConfig, s_cfg: LlamaConfig, t_cfg: LlamaConfig | None, tok, log: Callable[[str], Any],
           hooks, stack: contextlib.ExitStack) -> dict[str, Any]:
    """`train` once `out` is held; `stack` closes the checkpoint manager."""

    out = Path(rc.out)
    ckpt_dir = out / "checkpoints"
    if ckpt_dir.exists() and any(ckpt_dir.iterdir()) and not rc.resume:
        raise TrainingError(f"{ckpt_dir} already holds checkpoints: pass resume=true to continue, or choose another "
                            "out")
    if rc.export:  # the end of the run must be able to write it
        check_output(out / "student_hf", inputs=(rc.student, rc.teacher), overwrite=True)
    def manager() -> ocp.CheckpointManager:  # creates ckpt_dir: a fresh run does so once its inputs have loaded
        return stack.enter_context(contextlib.closing(checkpoint_manager(ckpt_dir, rc)))

    mngr = manager() if ckpt_dir.is_dir() else None
    resuming = rc.resume and mngr is not None and bool(mngr.all_steps())
    if resuming:  # before any weights or data load
        check_resume_recipe(rc, out, log)
        check_checkpoint_shapes(mngr, rc, s_cfg, t_cfg)
    elif rc.resume:
        log(f"resume=true but {ckpt_dir} has no checkpoint: starting at step 0")
    hidden = rc.hidden_weight > 0 and rc.mode == "distill"
    teacher_layers, proj = hidden_init(rc.student, s_cfg, t_cfg) if hidden else (None, None)
    out.mkdir(parents=True, exist_ok=True)
    train_rows, held, stream = training_data(rc, tok, s_cfg.vocab_size, out / "data_cache")
    loader = Loader(train_rows, rc.batch_size, seed=rc.seed, stream=stream)

    mesh = make_mesh(*rc.mesh)
    student = from_pretrained(rc.student, mesh=mesh, dtype="float32")  # fp32 master weights
    stored = None
    if rc.teacher_logits is not None:  # checked in check_pair
        stored = TeacherLogits(rc.teacher_logits)
    teacher = (from_pretrained(rc.teacher, mesh=mesh, dtype=rc.teacher_dtype or rc.compute_dtype)
               if rc.mode == "distill" and stored is None else None)
    t_params = teacher.params() if teacher is not None else None
    kd = kd_config(rc)
    steps = build_steps(rc, s_cfg, t_cfg, mesh, kd, teacher_layers)  # the functions aot.py compiles
    tx, schedule, shardings = steps.tx, steps.schedule, tree_shardings(steps.state)
    trainable = {"model": student.params()}
    if hidden:
        trainable["proj"] = jax.device_put(jnp.asarray(proj), shardings["trainable"]["proj"])
    with jax.set_mesh(mesh):
        state = {"trainable": trainable, "opt_state": jax.jit(tx.init, out_shardings=shardings["opt_state"])(trainable),
                 "step": jax.device_put(jnp.zeros((), jnp.int32), shardings["step"])}

    mngr = mngr or manager()
    if resuming:
        state, loader_state, step0 = restore_newest(mngr, state, out, log)
        loader.set_state(loader_state)
        log(f"resumed from {ckpt_dir} at step {step0}")
    write_recipe(rc, out)  # the run has started: recipe.json describes the checkpoints it will write

    A = rc.grad_accum
    b_local = rc.batch_size // jax.process_count()
    step_fn, eval_fn = steps.train, steps.eval

    def evaluate(params) -> dict[str, float]:
        if held is None:
            return {}
        tot = {"ce": 0.0, "kl": 0.0, "tokens": 0.0}
        p = jax.process_index()
        for gb in eval_batches(held, rc.batch_size // A, rc.eval_batches):
            n = len(gb["input_ids"]) // jax.process_count()
            local = {k: v[p * n:(p + 1) * n] for k, v in gb.items()}
            with jax.set_mesh(mesh):
                r = jax.device_get(eval_fn(params, t_params, to_global(local, mesh, lead=False)))
            tot = {k: tot[k] + float(r[k]) for k in tot}
        res = {"held_out_loss": tot["ce"] / tot["tokens"], "held_out_ppl": math.exp(tot["ce"] / tot["tokens"])}
        if t_params is not None:
            res["held_out_kl"] = tot["kl"] / tot["tokens"]
        return res

    run = Run(rc=rc, out=out, checkpoints=mngr, loader=loader, log=log, step=int(jax.device_get(state["step"])),
              state=state, last_saved=mngr.latest_step())
    try:  # SIGTERM (preemption): finish the step, agree on it with the other processes, checkpoint, return
        prev = signal.signal(signal.SIGTERM, lambda s, f: setattr(run, "signal", "SIGTERM"))
    except ValueError:  # not the main thread: no handler
        prev = None
    tb = None
    if jax.process_index() == 0:
        from tensorboardX import SummaryWriter
        tb = SummaryWriter(str(out / "tensorboard"))
    flops_step = rc.batch_size * rc.seq_len * (3 * s_cfg.flops_per_token(rc.seq_len)
                                                + (t_cfg.flops_per_token(rc.seq_len) if teacher is not None else 0.0))
    peak = rc.peak_tflops * 1e12 if rc.peak_tflops else measure_peak_flops()
    prog = Progress(rc.steps, rc.mode, metrics_path=(out / "metrics.jsonl") if jax.process_index() == 0 else None)
    prog.step = run.step
    start_eval = evaluate(state["trainable"]["model"]) if run.step == 0 else {}
    if start_eval:
        log(f"step 0 held-out: {json.dumps({k: round(v, 4) for k, v in start_eval.items()})}")
        prog.record({"stage": rc.mode, "step": 0, **start_eval})
    all_hooks = [evaluation_hook(evaluate), metrics_hook(prog, tb), *hooks, stop_hook, checkpoint_hook]
    summary: dict[str, Any] = {"start_eval": start_eval}
    try:
        while run.step < rc.steps and not run.stop:
            local = loader.next()
            fingerprint = zlib.crc32(local["input_ids"].tobytes())  # which rows this process saw
            if stored is not None:
                local.update(logits_batch(stored, loader.peek_step - 1, rc.batch_size, local, jax.process_index(),
                                          jax.process_count()))
            local = {k: v.reshape(A, b_local // A, *v.shape[1:]) for k, v in local.items()}
            with jax.set_mesh(mesh):
                batch = to_global(local, mesh, lead=True)
                t0 = time.perf_counter()
                state, metrics = step_fn(state, t_params, batch)
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            dt = time.perf_counter() - t0
            bad = next((k for k in ("loss", "grad_norm") if not math.isfinite(metrics[k])), None)
            if bad:  # before any hook: the state this step made is never saved
                raise TrainingError(
                    f"{bad} is {metrics[bad]} at step {run.step + 1}: stopped without saving this state. The last "
                    f"good checkpoint is step {run.last_saved} in {ckpt_dir} (resume=true continues from it); "
                    "lower lr, check the data, or use fp32 compute")
            run.step, run.state = run.step + 1, state
            run.record = {**metrics, "lr": float(schedule(run.step - 1)), "step_time_s": dt,
                          "mfu": flops_step / dt / peak, "batch_fingerprint": fingerprint}
            for hook in all_hooks:
                hook(run)
            summary.update(run.record)
    finally:
        mngr.wait_until_finished()
        prog.close()
        if tb is not None:
            tb.close()
        if prev is not None:
            signal.signal(signal.SIGTERM, prev)
    if run.stop:
        summary["preempted_at"] = run.step
        return summary
    summary["step"] = run.step
    if rc.export:
        params = state["trainable"]["model"]
        summary["student_hf"] = str(save_params(params, s_cfg, out / "student_hf", source=rc.student,
                                                dtype=s_cfg.dtype, overwrite=True))
        log(f"student written to {summary['student_hf']}")
    if jax.process_index() == 0:
        write_text(out / "summary.json", json.dumps(summary, indent=2, default=str))
    return summary
