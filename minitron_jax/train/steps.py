"""The jitted steps of a run, built once: the optimizer, the train step (gradient accumulation over
micro-batches), the eval step, and `build_steps`, which gives both their explicit shardings over the
(data, fsdp, tensor) mesh and the abstract arguments that `aot.py` compiles.

One jitted step with explicit shardings and a donated train state: the frozen teacher (no gradient, no
optimizer state) and the student are sharded by the same logical rules; AdamW with warm-up + cosine decay and
global-norm clipping. Gradient accumulation scans over micro-batches and sums each term's token sums divided
by the whole step's token count, so the update is the full batch's token mean whatever the packing or process
count. Both steps call the loss of objective.py.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from minitron_jax.data.token_store import read_json
from minitron_jax.io.orbax_model import abstract_params
from minitron_jax.model.config import LlamaConfig
from minitron_jax.model.losses import KDConfig, dynamic_hidden_weight
from minitron_jax.model.sharding import batch_sharding, named_sharding
from minitron_jax.train.objective import batch_targets, combine, make_loss, make_objective, teacher_source, uses_hidden
from minitron_jax.train.run_config import RunConfig
from minitron_jax.train.stored_logits import MANIFEST as LOGITS_MANIFEST


# ---------------------------------------------------------------------------- the optimizer
def make_optimizer(rc: RunConfig) -> tuple[optax.GradientTransformation, Callable]:
    base = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=rc.lr, warmup_steps=rc.warmup, decay_steps=rc.steps, end_value=rc.min_lr)
    schedule = lambda count: base(count + 1)  # noqa: E731  (update 1 uses lr/warmup, not 0; the last ends at min_lr)

    def decay_mask(params):  # no weight decay on norm weights (q_norm / k_norm included) or biases
        return jax.tree_util.tree_map_with_path(
            lambda path, _: not any(w in jax.tree_util.keystr(path) for w in ("norm", "bias")), params)

    clip = optax.clip_by_global_norm(rc.clip) if rc.clip > 0 else optax.identity()  # clip=0: no clipping
    tx = optax.chain(clip,
                     optax.adamw(schedule, b1=rc.b1, b2=rc.b2, eps=rc.eps, weight_decay=rc.weight_decay,
                                 mask=decay_mask))
    return tx, schedule


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
    hidden = uses_hidden(rc)

    def step(state, teacher, batch):
        A = batch["input_ids"].shape[0]
        separate = hidden and A > 1
        _, tmask = jax.vmap(batch_targets)(batch)
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
    """eval(student, teacher, batch) -> sums of (kl, ce, tokens) on one [b, S] batch: the training loss's
    `Loss` (objective.make_loss, evaluation=True) with normaliser 1 (the logged KL and CE do not depend on the
    training weights: any kl_weight / ce_weight works, CE-only included)."""
    loss = make_loss(rc, s_cfg, t_cfg, kd, evaluation=True)

    def ev(student, teacher, mb):
        o = loss.outputs({"model": student}, teacher, mb)
        _, m = loss.terms(o, 1.0)
        return {"ce": m["ce"], "kl": m.get("kl", jnp.zeros(())), "tokens": o["tmask"].sum()}

    return ev


def tree_shardings(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


# ---------------------------------------------------------------------------- the steps, built once
BATCH_DTYPES = {"input_ids": jnp.int32, "segment_ids": jnp.int32, "mask": jnp.float32}  # loader.py's rows


def batch_dtypes(rc: RunConfig) -> dict[str, Any]:
    """The arrays of a batch of the run: loader.py's rows, and SFT's loss mask (sft.py)."""
    return {**BATCH_DTYPES, "loss_mask": jnp.float32} if rc.mode == "sft" else BATCH_DTYPES


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
    if uses_hidden(rc):
        trainable["proj"] = jax.ShapeDtypeStruct((s_cfg.hidden_size, t_cfg.hidden_size), jnp.float32, sharding=rep)
    opt = jax.eval_shape(tx.init, trainable)
    opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, opt, tree_shardings(trainable),
                                   transform_non_params=lambda _: rep)
    opt = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), opt, opt_sh)
    state = {"trainable": trainable, "opt_state": opt, "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)}
    stored = stored_spec(rc)
    teacher = (abstract_params(t_cfg, mesh, rc.teacher_compute_dtype() or t_cfg.dtype)
               if teacher_source(rc, t_cfg).loads_teacher else None)
    A = rc.grad_accum
    micro_shape = (A, rc.batch_size // A, rc.seq_len)
    batch = {k: jax.ShapeDtypeStruct(micro_shape, d, sharding=batch_sharding(mesh, micro_shape))
             for k, d in batch_dtypes(rc).items()}
    if stored is not None:  # the teacher's stored top-k, [A, b, S, k], rows split like the tokens
        k_shape = (*micro_shape, stored[0])
        for name, d in (("t_values", jnp.dtype(stored[1])), ("t_indices", jnp.int32)):
            batch[name] = jax.ShapeDtypeStruct(k_shape, d, sharding=batch_sharding(mesh, k_shape))
    e_sh = named_sharding(("batch", "seq"), micro_shape[1:], mesh)
    eval_batch = {k: jax.ShapeDtypeStruct(micro_shape[1:], d, sharding=e_sh) for k, d in batch_dtypes(rc).items()}
    sh = tree_shardings(state)
    train_fn = jax.jit(make_train_step(rc, s_cfg, t_cfg, tx, kd, teacher_layers),
                       in_shardings=(sh, tree_shardings(teacher) if teacher is not None else None, tree_shardings(batch)),
                       out_shardings=(sh, None), donate_argnums=0)
    return Steps(train=train_fn, eval=jax.jit(make_eval_step(rc, s_cfg, t_cfg, kd)), tx=tx, schedule=schedule,
                 state=state, teacher=teacher, batch=batch, eval_batch=eval_batch)
