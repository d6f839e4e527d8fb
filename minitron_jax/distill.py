"""Knowledge distillation (and teacher-correction fine-tuning) under SPMD.

One jitted step with explicit shardings and a donated train state: the frozen teacher (no gradient,
no optimizer state) and the student are sharded by the same logical rules over the
(data, fsdp, tensor) mesh; gradient accumulation scans over micro-batches; AdamW with warm-up +
cosine decay and global-norm clipping. Orbax checkpoints (async, keep last N, every N steps and on
SIGTERM) hold the student parameters, optimizer state, step and data-loader state, so `resume=true`
continues exactly. Metrics go to a JSONL file, TensorBoard and a progress line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
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
from jax.sharding import NamedSharding, PartitionSpec as P

from .config import LlamaConfig
from .losses import KDConfig, add_hidden_loss, hidden_cosine_loss, kd_loss, lm_loss_from_hidden
from .model import forward, lm_head_weight, rms_norm
from .progress import Progress
from .recipe import RunConfig, dump
from .sharding import named_sharding


class TrainingError(RuntimeError):
    pass


# ---------------------------------------------------------------------------- FLOPs / MFU
def forward_flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
    """Matmul FLOPs of one forward per token (weights incl. lm_head, plus causal attention)."""
    matmul_params = cfg.param_count() - cfg.vocab_size * cfg.hidden_size * (0 if cfg.tie_word_embeddings else 1)
    matmul_params -= cfg.hidden_size * (2 * cfg.num_hidden_layers + 1)  # norms
    attn = 2 * cfg.num_hidden_layers * seq_len * cfg.num_attention_heads * cfg.head_dim  # QK^T + AV, causal half
    return 2.0 * matmul_params + attn


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

    tx = optax.chain(optax.clip_by_global_norm(rc.clip),
                     optax.adamw(schedule, b1=rc.b1, b2=rc.b2, eps=rc.eps, weight_decay=rc.weight_decay,
                                 mask=decay_mask))
    return tx, schedule


def layer_map(student_layers: int, teacher_layers: int) -> np.ndarray:
    """Teacher layer matched to each student layer for the intermediate loss (proportional depth)."""
    return np.asarray([round((i + 1) * teacher_layers / student_layers) - 1 for i in range(student_layers)])


def next_token_targets(ids, mask, seg):
    """Targets shifted left by one, and the mask of positions whose target is real and in the same document."""
    targets = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)
    tmask = mask * jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
    if seg is not None:  # no target across a packed-document boundary
        tmask = tmask * jnp.concatenate([(seg[:, 1:] == seg[:, :-1]), jnp.zeros_like(seg[:, :1], bool)], 1)
    return targets, tmask


def make_train_step(rc: RunConfig, s_cfg: LlamaConfig, t_cfg: LlamaConfig | None, tx, kd: KDConfig) -> Callable:
    """step(state, teacher_params, batch) -> (state, metrics); batch arrays are [A, b, S]."""
    cdt = rc.compute_dtype
    hidden = rc.hidden_weight > 0 and rc.mode == "distill"
    tmap = jnp.asarray(layer_map(s_cfg.num_hidden_layers, t_cfg.num_hidden_layers)) if hidden else None
    grab = (lambda acts, m: acts["layer_out"]) if hidden else None  # noqa: E731

    def loss_fn(trainable, teacher, mb):
        student = trainable["model"]
        ids, seg, mask = mb["input_ids"], mb["segment_ids"], mb["mask"]
        targets, tmask = next_token_targets(ids, mask, seg)
        kw = dict(attention_mask=mask, segment_ids=seg, remat=rc.remat, return_hidden=True)
        out = forward(student, s_cfg, ids, compute_dtype=cdt, capture=grab, **kw)
        h_s, states_s = out if hidden else (out, None)
        if rc.mode == "finetune":
            loss = lm_loss_from_hidden(h_s, lm_head_weight(student, s_cfg), targets, tmask, kd.chunk_size)
            return loss, {"loss": loss, "ce": loss}
        teacher = jax.lax.stop_gradient(teacher)
        out_t = forward(teacher, t_cfg, ids, compute_dtype=rc.teacher_dtype or cdt, capture=grab, **kw)
        h_t, states_t = out_t if hidden else (out_t, None)
        loss, metrics = kd_loss(h_s, h_t, lm_head_weight(student, s_cfg), lm_head_weight(teacher, t_cfg),
                                targets, tmask, kd)
        if hidden:
            eps = s_cfg.rms_norm_eps
            s_n = jax.vmap(lambda x: rms_norm(x, student["norm"], eps))(states_s)
            t_n = jax.vmap(lambda x: rms_norm(x, teacher["norm"], t_cfg.rms_norm_eps))(states_t[tmap])
            h_loss = hidden_cosine_loss(s_n, t_n, trainable["proj"], tmask)
            loss = add_hidden_loss(loss, h_loss, kd)
            metrics = {**metrics, "hidden_loss": h_loss, "loss": loss}
        return loss, metrics

    def step(state, teacher, batch):
        A = batch["input_ids"].shape[0]

        def micro(carry, mb):
            g_acc, m_acc = carry
            (_, m), g = jax.value_and_grad(loss_fn, has_aux=True)(state["trainable"], teacher, mb)
            g_acc = jax.tree.map(lambda a, b: a + b / A, g_acc, g)
            m_acc = jax.tree.map(lambda a, b: a + b / A, m_acc, {k: v for k, v in m.items() if k != "tokens"})
            return (g_acc, m_acc), None

        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), state["trainable"])
        m0 = jax.eval_shape(lambda: loss_fn(state["trainable"], teacher,
                                            jax.tree.map(lambda x: x[0], batch))[1])
        m0 = {k: jnp.zeros((), jnp.float32) for k in m0 if k != "tokens"}
        (grads, metrics), _ = jax.lax.scan(micro, (zeros, m0), batch)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state["trainable"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
        trainable = optax.apply_updates(state["trainable"], updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return {"trainable": trainable, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    return step


def make_eval_step(rc: RunConfig, s_cfg: LlamaConfig, t_cfg: LlamaConfig | None, kd: KDConfig) -> Callable:
    """eval(student, teacher, batch) -> sums of (kl, ce, tokens) on one [b, S] batch."""

    def ev(student, teacher, mb):
        ids, seg, mask = mb["input_ids"], mb["segment_ids"], mb["mask"]
        targets, tmask = next_token_targets(ids, mask, seg)
        kw = dict(attention_mask=mask, segment_ids=seg, return_hidden=True)
        h_s = forward(student, s_cfg, ids, compute_dtype=rc.compute_dtype, **kw)
        n = tmask.sum()
        ce = lm_loss_from_hidden(h_s, lm_head_weight(student, s_cfg), targets, tmask, kd.chunk_size)
        if teacher is None:
            return {"ce": ce * n, "kl": jnp.zeros(()), "tokens": n}
        h_t = forward(teacher, t_cfg, ids, compute_dtype=rc.teacher_dtype or rc.compute_dtype, **kw)
        _, m = kd_loss(h_s, h_t, lm_head_weight(student, s_cfg), lm_head_weight(teacher, t_cfg), targets, tmask,
                       dataclasses.replace(kd, ce_weight=0.0))
        return {"ce": ce * n, "kl": m["kl"] * n, "tokens": n}

    return ev


# ---------------------------------------------------------------------------- sharding helpers
def batch_sharding(mesh, shape) -> NamedSharding:
    """[A, b, S] batches: micro-batch axis replicated, rows over the batch axes."""
    spec = named_sharding(("batch", "seq"), shape[1:], mesh).spec
    return NamedSharding(mesh, P(None, *spec))


def to_global(local: dict[str, np.ndarray], mesh, lead: bool) -> dict[str, jax.Array]:
    """Process-local numpy batch -> global sharded arrays (each process holds its own rows)."""
    out = {}
    for k, v in local.items():
        if v is None:
            out[k] = None
            continue
        gshape = list(v.shape)
        gshape[1 if lead else 0] *= jax.process_count()
        sh = batch_sharding(mesh, gshape) if lead else named_sharding(("batch", "seq"), gshape, mesh)
        out[k] = jax.make_array_from_process_local_data(sh, v, tuple(gshape))
    return out


def tree_shardings(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


# ---------------------------------------------------------------------------- the run
def maybe_initialize_distributed(rc: RunConfig) -> None:
    """Join a multi-process job: from the recipe, else MINITRON_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID,
    else `coordinator_address=auto` (TPU pods, SLURM: JAX detects the cluster)."""
    addr = rc.coordinator_address or os.environ.get("MINITRON_COORDINATOR")
    if not addr or jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts; ignored by GPU/TPU
    if addr == "auto":
        jax.distributed.initialize()
        return
    n = rc.num_processes or int(os.environ.get("MINITRON_NUM_PROCESSES", "0"))
    pid = rc.process_id if rc.process_id is not None else int(os.environ.get("MINITRON_PROCESS_ID", "-1"))
    if n < 1 or pid < 0:
        raise TrainingError("a coordinator address needs num_processes and process_id "
                            "(or MINITRON_NUM_PROCESSES / MINITRON_PROCESS_ID)")
    jax.distributed.initialize(coordinator_address=addr, num_processes=n, process_id=pid)


def check_pair(rc: RunConfig) -> tuple[LlamaConfig, LlamaConfig | None, Any]:
    """Configs and tokenizers, checked before any weights or data are touched."""
    from transformers import AutoTokenizer

    s_cfg = LlamaConfig.from_file(rc.student)
    t_cfg = LlamaConfig.from_file(rc.teacher) if rc.mode == "distill" else None
    tok = AutoTokenizer.from_pretrained(rc.student)
    for name, cfg in (("student", s_cfg), ("teacher", t_cfg)):
        if cfg is not None and rc.seq_len > cfg.max_position_embeddings:
            raise TrainingError(f"seq_len={rc.seq_len} exceeds the {name}'s max_position_embeddings="
                                f"{cfg.max_position_embeddings}; lower seq_len")
    if t_cfg is not None:
        if t_cfg.vocab_size != s_cfg.vocab_size:
            raise TrainingError(f"teacher vocabulary ({t_cfg.vocab_size}) != student vocabulary ({s_cfg.vocab_size}): "
                                "logit distillation needs one shared vocabulary; prune the student from this teacher")
        t_tok = AutoTokenizer.from_pretrained(rc.teacher)
        if t_tok.get_vocab() != tok.get_vocab() or (t_tok.bos_token_id, t_tok.eos_token_id) != (tok.bos_token_id, tok.eos_token_id):
            raise TrainingError(f"the tokenizers of {rc.teacher} and {rc.student} differ: the same token id would mean "
                                "different text to teacher and student; copy the teacher's tokenizer files to the student")
    if rc.batch_size % (rc.grad_accum * jax.process_count()):
        raise TrainingError(f"batch_size={rc.batch_size} must divide by grad_accum x processes = "
                            f"{rc.grad_accum} x {jax.process_count()}")
    return s_cfg, t_cfg, tok


def _checkpoint_manager(path: Path, rc: RunConfig) -> ocp.CheckpointManager:
    opts = ocp.CheckpointManagerOptions(max_to_keep=rc.keep, enable_async_checkpointing=True, create=True)
    return ocp.CheckpointManager(path.absolute(), options=opts, item_names=("state", "loader"))


def train(rc: RunConfig, log: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Run distillation (or fine-tuning) as the recipe says; returns a summary dict."""
    from .hf import from_pretrained, save_params
    from .loader import Loader, build_corpus, eval_batches
    from .sharding import make_mesh

    log = log or (lambda m: print(m, flush=True) if jax.process_index() == 0 else None)
    rc.validate()
    maybe_initialize_distributed(rc)
    s_cfg, t_cfg, tok = check_pair(rc)
    out = Path(rc.out)
    ckpt_dir = out / "checkpoints"
    if ckpt_dir.exists() and any(ckpt_dir.iterdir()) and not rc.resume:
        raise TrainingError(f"{ckpt_dir} already holds checkpoints: pass resume=true to continue, or choose another out")
    out.mkdir(parents=True, exist_ok=True)
    train_rows, held = build_corpus(rc.data, tok, rc.seq_len, packing=rc.packing, holdout=tuple(rc.holdout),
                                    holdout_fraction=0.0 if rc.holdout else rc.holdout_fraction, seed=rc.seed,
                                    cache_dir=out / "data_cache", text_field=rc.text_field)
    loader = Loader(train_rows, rc.batch_size, seed=rc.seed)
    if jax.process_index() == 0:
        (out / "recipe.json").write_text(dump(rc))

    mesh = make_mesh(*rc.mesh)
    student = from_pretrained(rc.student, mesh=mesh, dtype="float32")  # fp32 master weights
    teacher = (from_pretrained(rc.teacher, mesh=mesh, dtype=rc.teacher_dtype or rc.compute_dtype)
               if rc.mode == "distill" else None)
    t_params = teacher.params() if teacher is not None else None
    kd = KDConfig(temperature=rc.temperature, kl_weight=rc.kl_weight, ce_weight=rc.ce_weight, top_k=rc.top_k,
                  chunk_size=rc.chunk_size, hidden_weight=rc.hidden_weight)
    tx, schedule = make_optimizer(rc)
    trainable = {"model": student.params()}
    if rc.hidden_weight > 0 and rc.mode == "distill":
        trainable["proj"] = jax.device_put(jnp.eye(s_cfg.hidden_size, t_cfg.hidden_size, dtype=jnp.float32),
                                           NamedSharding(mesh, P()))
    with jax.set_mesh(mesh):
        state = {"trainable": trainable, "opt_state": jax.jit(tx.init)(trainable),
                 "step": jax.device_put(jnp.zeros((), jnp.int32), NamedSharding(mesh, P()))}
    shardings = tree_shardings(state)

    mngr = _checkpoint_manager(ckpt_dir, rc)
    if rc.resume and mngr.latest_step() is not None:
        step0 = mngr.latest_step()
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        restored = mngr.restore(step0, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                               loader=ocp.args.JsonRestore()))
        state = restored["state"]
        loader.set_state(restored["loader"])
        log(f"resumed from {ckpt_dir} at step {step0}")
    elif rc.resume:
        log(f"resume=true but {ckpt_dir} has no checkpoint: starting at step 0")

    A = rc.grad_accum
    b_local = rc.batch_size // jax.process_count()
    micro_shape = (A, rc.batch_size // A, rc.seq_len)
    b_sh = {k: batch_sharding(mesh, micro_shape) for k in ("input_ids", "segment_ids", "mask")}
    t_sh = tree_shardings(t_params) if t_params is not None else None
    step_fn = jax.jit(make_train_step(rc, s_cfg, t_cfg, tx, kd), in_shardings=(shardings, t_sh, b_sh),
                      out_shardings=(shardings, None), donate_argnums=0)
    eval_fn = jax.jit(make_eval_step(rc, s_cfg, t_cfg, kd))

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

    stop = {"sig": None}  # SIGTERM (preemption): finish the step, checkpoint, exit cleanly
    try:
        prev = signal.signal(signal.SIGTERM, lambda s, f: stop.update(sig=s))
    except ValueError:  # not the main thread: no handler
        prev = None
    tb = None
    if jax.process_index() == 0:
        from tensorboardX import SummaryWriter
        tb = SummaryWriter(str(out / "tensorboard"))
    step = int(jax.device_get(state["step"]))
    fwd_s = forward_flops_per_token(s_cfg, rc.seq_len)
    fwd_t = forward_flops_per_token(t_cfg, rc.seq_len) if t_cfg is not None else 0.0
    flops_step = rc.batch_size * rc.seq_len * (3 * fwd_s + fwd_t)
    peak = rc.peak_tflops * 1e12 if rc.peak_tflops else measure_peak_flops()
    prog = Progress(rc.steps, rc.mode, metrics_path=(out / "metrics.jsonl") if jax.process_index() == 0 else None)
    prog.step = step
    start_eval = evaluate(state["trainable"]["model"]) if step == 0 else {}
    if start_eval:
        log(f"step 0 held-out: {json.dumps({k: round(v, 4) for k, v in start_eval.items()})}")
        prog.record({"stage": rc.mode, "step": 0, **start_eval})
    last_saved = mngr.latest_step()
    crash_after = int(os.environ.get("MINITRON_CRASH_AFTER_STEP", "0"))
    summary: dict[str, Any] = {"start_eval": start_eval}
    try:
        while step < rc.steps:
            local = loader.next()
            fingerprint = zlib.crc32(local["input_ids"].tobytes())  # which rows this process saw
            local = {k: v.reshape(A, b_local // A, *v.shape[1:]) for k, v in local.items()}
            with jax.set_mesh(mesh):
                batch = to_global(local, mesh, lead=True)
                t0 = time.perf_counter()
                state, metrics = step_fn(state, t_params, batch)
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            dt = time.perf_counter() - t0
            if not math.isfinite(metrics["loss"]):
                raise TrainingError(
                    f"loss is {metrics['loss']} at step {step + 1}: stopped without saving this state. The last good "
                    f"checkpoint is step {last_saved} in {ckpt_dir} (resume=true continues from it); "
                    "lower lr, check the data, or use fp32 compute")
            step += 1
            rec = {**metrics, "lr": float(schedule(step - 1)), "step_time_s": dt,
                   "mfu": flops_step / dt / peak, "batch_fingerprint": fingerprint}
            if step % rc.eval_every == 0 or step == rc.steps:
                rec.update(evaluate(state["trainable"]["model"]))
            if step % rc.log_every == 0 or step == rc.steps or "held_out_loss" in rec:
                prog.update(steps=step - prog.step, tokens=rc.batch_size * rc.seq_len * (step - prog.step), **rec)
                if tb is not None:
                    for k, v in rec.items():
                        tb.add_scalar(k, v, step)
            summary.update(rec)
            if step % rc.save_every == 0 or step == rc.steps or stop["sig"]:
                mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        loader=ocp.args.JsonSave(loader.get_state())))
                last_saved = step
            if crash_after and step == crash_after:  # fault injection for tests: SIGKILL once earlier saves landed
                mngr.wait_until_finished()
                os.kill(os.getpid(), signal.SIGKILL)
            if stop["sig"]:
                mngr.wait_until_finished()
                log(f"SIGTERM: saved step {step} to {ckpt_dir}; rerun with resume=true to continue")
                summary["preempted_at"] = step
                return summary
    finally:
        mngr.wait_until_finished()
        mngr.close()
        prog.close()
        if tb is not None:
            tb.close()
        if prev is not None:
            signal.signal(signal.SIGTERM, prev)
    summary["step"] = step
    if rc.export:
        params = state["trainable"]["model"]
        summary["student_hf"] = str(save_params(params, s_cfg, out / "student_hf", source=rc.student,
                                                dtype=s_cfg.dtype, overwrite=True))
        log(f"student written to {summary['student_hf']}")
    if jax.process_index() == 0:
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
