"""`train`: knowledge distillation (or teacher-correction fine-tuning) as a recipe says, in two parts.

`setup` does everything before step 1: before any weights or data load, `train` checks the recipe, the
devices (`preflight.check_devices`: mesh, batch) and the model pair (`preflight.check_pair`), then holds `out`
for the whole run (`lock.output_lock`: a second run into it is refused). A resume (resume.py) first compares
the recipe with the checkpoints' recipe.json and the student's shapes with the checkpoint's; it restores the
newest checkpoint that reads, moving damaged newer ones aside. Then the data, the models, the jitted steps
(steps.py) and the train state; recipe.json is (re)written only once the run has started or resumed.

`loop` is a short linear story: next batch, jitted step, check that the loss and gradient norm are finite,
then the hooks (hooks.py: evaluation, metrics, the caller's hooks, the stop agreement, checkpointing, each at
its cadence). SIGTERM on any process stops every process after the same step, which is checkpointed; the run
then returns with `preempted_at`. At the end: the student as an HF directory (export) and summary.json.
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
import orbax.checkpoint as ocp

from minitron_jax.core import multihost, storage
from minitron_jax.core.atomic import check_output, write_text
from minitron_jax.core.errors import TrainingError
from minitron_jax.core.lock import output_lock
from minitron_jax.core.progress import MIRROR_EVERY_S, Progress
from minitron_jax.data.loader import Loader, data_fingerprint, eval_batches, training_data
from minitron_jax.io import hf
from minitron_jax.io.hf import save_params
from minitron_jax.model.config import LlamaConfig
from minitron_jax.model.sharding import make_mesh, to_global
from minitron_jax.train.hooks import Hook, Run, run_hooks
from minitron_jax.train.objective import hidden_init, kd_config, uses_hidden
from minitron_jax.train.preflight import check_devices, check_pair
from minitron_jax.train.resume import (
    check_checkpoint_shapes,
    check_resume_recipe,
    checkpoint_manager,
    restore_newest,
    write_recipe,
)
from minitron_jax.train.run_config import RunConfig
from minitron_jax.train.steps import Steps, build_steps, make_eval_step, tree_shardings
from minitron_jax.train.stored_logits import TeacherLogits, logits_batch


def measure_peak_flops(n: int = 2048, reps: int = 8) -> float:
    """FLOP/s of a large fp32 matmul on this process's first device (a device of another host cannot take
    an array from here), best of `reps` (the MFU denominator when `peak_tflops` is not given), times the device
    count. A busy machine makes it an underestimate."""
    x = jax.device_put(jnp.ones((n, n), jnp.float32), jax.local_devices()[0])
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best * jax.device_count()


def train(rc: RunConfig, log: Callable[[str], Any] | None = None, hooks: tuple[Hook, ...] | list[Hook] = ()
          ) -> dict[str, Any]:
    """Run distillation (or fine-tuning) as the recipe says; returns a summary dict.

    The recipe, the devices and the model pair are checked first, then `out` is held for the whole run
    (a second run into it is refused). The loop is linear: next batch, jitted step, check that the loss
    and gradient norm are finite, then the hooks in order: evaluation, metrics, the caller's `hooks` (each
    `hook(run: Run)`, every step), the stop agreement (`stop_hook`), checkpointing. SIGTERM (preemption) on
    any process stops every process after the same step, which is checkpointed; `train` returns with
    `preempted_at` (the CLI then exits 143, see `Preempted`)."""
    log = log or (lambda m: print(m, flush=True) if jax.process_index() == 0 else None)
    rc.validate()
    check_devices(rc)  # joins a multi-process job; the mesh against the devices, the batch against the mesh
    s_cfg, t_cfg, tok = check_pair(rc)
    models = {"student": rc.student, "teacher": rc.teacher if rc.has_teacher else None}
    multihost.same_everywhere({f"{who} {name}": h for who, path in models.items() if path is not None
                               for name, h in multihost.file_hashes(path, ("config.json", "tokenizer.json")).items()},
                              "models")  # before any weights load: every host the same files
    with output_lock(rc.out, f"minitron {rc.mode}"), contextlib.ExitStack() as stack:
        return loop(setup(rc, s_cfg, t_cfg, tok, log, stack), hooks)


# ---------------------------------------------------------------------------- setup
@dataclasses.dataclass
class Job:
    """What `setup` made for the loop: the run's data, models, jitted steps, state and checkpoints."""
    rc: RunConfig
    s_cfg: LlamaConfig
    t_cfg: LlamaConfig | None
    log: Callable[[str], Any]
    out: Path
    mesh: Any
    loader: Loader
    held: Any  # held-out rows, or None
    stored: TeacherLogits | None  # the teacher's stored top-k logits (teacher_logits=), read batch by batch
    t_params: Any  # the online teacher's parameters, or None
    steps: Steps
    state: dict[str, Any]
    checkpoints: ocp.CheckpointManager


def setup(rc: RunConfig, s_cfg: LlamaConfig, t_cfg: LlamaConfig | None, tok, log: Callable[[str], Any],
          stack: contextlib.ExitStack) -> Job:
    """Everything before step 1, once `out` is held; `stack` closes the checkpoint manager."""
    out = storage.path(rc.out)  # a local folder or a gs:// prefix
    multihost.check_shared(out)  # a multi-host job: every host must see the checkpoints process 0's writes
    ckpt_dir = out / "checkpoints"
    # decided once: hosts that each read their own listing would not agree on restoring or starting at step 0
    listing = multihost.decided(lambda: {"dir": ckpt_dir.is_dir(), "entries": ckpt_dir.is_dir() and any(ckpt_dir.iterdir())},
                                "checkpoint-listing")
    if listing["entries"] and not rc.resume:
        raise TrainingError(f"{ckpt_dir} already holds checkpoints: pass resume=true to continue, or choose another "
                            "out")
    if rc.export:  # the end of the run must be able to write it
        check_output(out / "student_hf", inputs=(rc.student, rc.teacher), overwrite=True)

    def manager() -> ocp.CheckpointManager:  # creates ckpt_dir: a fresh run does so once its inputs have loaded
        return stack.enter_context(contextlib.closing(checkpoint_manager(ckpt_dir, rc)))

    mngr = manager() if listing["dir"] else None
    resuming = rc.resume and mngr is not None and bool(multihost.decided(lambda: list(mngr.all_steps()), "checkpoint-steps"))
    if resuming:  # before any weights or data load
        check_resume_recipe(rc, out, log)
        check_checkpoint_shapes(mngr, rc, s_cfg, t_cfg)
    elif rc.resume:
        log(f"resume=true but {ckpt_dir} has no checkpoint: starting at step 0")
    teacher_layers, proj = hidden_init(rc.student, s_cfg, t_cfg) if uses_hidden(rc) else (None, None)
    out.mkdir(parents=True, exist_ok=True)
    cache = None if storage.is_url(out) else out / "data_cache"  # tokenized text: cached on local disks only
    train_rows, held, stream = training_data(rc, tok, s_cfg.vocab_size, cache, log=log)
    # every host derives the splits and rows from the data itself: they must come out the same everywhere
    multihost.same_everywhere(data_fingerprint(train_rows, held), "training data (rows and splits)")
    loader = Loader(train_rows, rc.batch_size, seed=rc.seed, stream=stream)

    mesh = make_mesh(*rc.mesh)
    student = hf.from_pretrained(rc.student, mesh=mesh, dtype="float32")  # fp32 master weights
    stored = TeacherLogits(rc.teacher_logits) if rc.teacher_logits is not None else None  # checked in check_pair
    teacher = (hf.from_pretrained(rc.teacher, mesh=mesh, dtype=rc.teacher_compute_dtype())
               if rc.has_teacher and stored is None else None)
    steps = build_steps(rc, s_cfg, t_cfg, mesh, kd_config(rc), teacher_layers)  # the functions aot.py compiles
    state = initial_state(steps, student.params(), proj, mesh)

    mngr = mngr or manager()
    if resuming:
        state, loader_state, step0 = restore_newest(mngr, state, out, log)
        loader.set_state(loader_state)
        log(f"resumed from {ckpt_dir} at step {step0}")
    write_recipe(rc, out)  # the run has started: recipe.json describes the checkpoints it will write
    return Job(rc=rc, s_cfg=s_cfg, t_cfg=t_cfg, log=log, out=out, mesh=mesh, loader=loader, held=held, stored=stored,
               t_params=teacher.params() if teacher is not None else None, steps=steps, state=state,
               checkpoints=mngr)


def initial_state(steps: Steps, student_params, proj, mesh) -> dict[str, Any]:
    """The step-0 train state, sharded as `steps.state`: the student (and the hidden loss's projection `proj`),
    fresh AdamW state, step 0."""
    shardings = tree_shardings(steps.state)
    trainable = {"model": student_params}
    if proj is not None:
        trainable["proj"] = jax.device_put(jnp.asarray(proj), shardings["trainable"]["proj"])
    with jax.set_mesh(mesh):
        return {"trainable": trainable,
                "opt_state": jax.jit(steps.tx.init, out_shardings=shardings["opt_state"])(trainable),
                "step": jax.device_put(jnp.zeros((), jnp.int32), shardings["step"])}


def held_out_sums(eval_step, params, t_params, held, rc: RunConfig, mesh) -> dict[str, float]:
    """Sums of (ce, kl, tokens) of `eval_step` (steps.eval) over the first eval_batches micro-batches of `held`,
    each process feeding its rows."""
    tot = {"ce": 0.0, "kl": 0.0, "tokens": 0.0}
    p = jax.process_index()
    for gb in eval_batches(held, rc.batch_size // rc.grad_accum, rc.eval_batches):
        n = len(gb["input_ids"]) // jax.process_count()
        local = {k: v[p * n:(p + 1) * n] for k, v in gb.items()}
        with jax.set_mesh(mesh):
            r = jax.device_get(eval_step(params, t_params, to_global(local, mesh, lead=False)))
        tot = {k: tot[k] + float(r[k]) for k in tot}
    return tot


def make_evaluate(job: Job) -> Callable[[Any], dict[str, float]]:
    """evaluate(student params) -> held-out loss, perplexity (and KL with an online teacher), token means over
    eval_batches held-out batches ({} without held-out rows)."""
    rc, mesh, t_params = job.rc, job.mesh, job.t_params

    def evaluate(params) -> dict[str, float]:
        if job.held is None:
            return {}
        tot = held_out_sums(job.steps.eval, params, t_params, job.held, rc, mesh)
        res = {"held_out_loss": tot["ce"] / tot["tokens"], "held_out_ppl": math.exp(tot["ce"] / tot["tokens"])}
        if t_params is not None:
            res["held_out_kl"] = tot["kl"] / tot["tokens"]
        return res

    return evaluate


def held_out_loss(rc: RunConfig, model_dir, mesh=None, log: Callable[[str], Any] | None = None) -> float:
    """The held-out loss (CE per trained token) of the model in `model_dir` on the recipe's held-out rows, as a
    run of `rc` evaluates its student (the same rows, batches and loss; no teacher): to compare other models
    with a run's student, e.g. the teacher on an SFT run's held-out responses."""
    cfg = LlamaConfig.from_file(model_dir)
    tok = hf.load_tokenizer(model_dir, vocab_size=cfg.vocab_size)
    _, held, _ = training_data(rc, tok, cfg.vocab_size, log=log)
    if held is None:
        raise TrainingError(f"the recipe holds nothing out (holdout_fraction={rc.holdout_fraction}): no held-out loss")
    mesh = mesh if mesh is not None else make_mesh(*rc.mesh)
    alone = dataclasses.replace(rc, mode="finetune" if rc.mode == "distill" else rc.mode, teacher=None,
                                teacher_logits=None, hidden_weight=0.0)
    step = jax.jit(make_eval_step(alone, cfg, None, kd_config(alone)))
    params = hf.from_pretrained(model_dir, mesh=mesh, dtype="float32").params()
    tot = held_out_sums(step, params, None, held, alone, mesh)
    return tot["ce"] / tot["tokens"]


# ---------------------------------------------------------------------------- the loop
def next_batch(job: Job) -> tuple[dict, int]:
    """This process's rows of the next step, [A, b, S] (with the teacher's stored top-k when the run reads
    them), and their fingerprint (which rows this process saw)."""
    rc, loader = job.rc, job.loader
    local = loader.next()
    fingerprint = zlib.crc32(local["input_ids"].tobytes())
    if job.stored is not None:
        local.update(logits_batch(job.stored, loader.peek_step - 1, rc.batch_size, local, jax.process_index(),
                                  jax.process_count()))
    b_local = rc.batch_size // jax.process_count()
    return {k: v.reshape(rc.grad_accum, b_local // rc.grad_accum, *v.shape[1:]) for k, v in local.items()}, fingerprint


def check_finite(metrics: dict[str, float], run: Run) -> None:
    """Before any hook: the state a non-finite step made is never saved."""
    bad = next((k for k in ("loss", "grad_norm") if not math.isfinite(metrics[k])), None)
    if bad:
        raise TrainingError(
            f"{bad} is {metrics[bad]} at step {run.step + 1}: stopped without saving this state. The last "
            f"good checkpoint is step {run.last_saved} in {run.out / 'checkpoints'} (resume=true continues from "
            "it); lower lr, check the data, or use fp32 compute")


@contextlib.contextmanager
def sigterm_stops(run: Run):
    """While the loop runs, SIGTERM (preemption) only sets `run.signal`: the step finishes, the processes agree
    on it (`stop_hook`), it is checkpointed and `train` returns."""
    try:
        prev = signal.signal(signal.SIGTERM, lambda s, f: setattr(run, "signal", "SIGTERM"))
    except ValueError:  # not the main thread: no handler
        prev = None
    try:
        yield
    finally:
        if prev is not None:
            signal.signal(signal.SIGTERM, prev)


def start_evaluation(job: Job, evaluate, run: Run, prog: Progress) -> dict[str, float]:
    """The held-out results of the starting weights (a fresh run only), logged and recorded."""
    start_eval = evaluate(run.state["trainable"]["model"]) if run.step == 0 else {}
    if start_eval:
        job.log(f"step 0 held-out: {json.dumps({k: round(v, 4) for k, v in start_eval.items()})}")
        prog.record({"stage": job.rc.mode, "step": 0, **start_eval})
    return start_eval


def loop(job: Job, hooks=()) -> dict[str, Any]:
    """Steps from the state's step to rc.steps (or a stop), each followed by the hooks; then the summary."""
    rc, mesh, state, mngr = job.rc, job.mesh, job.state, job.checkpoints
    run = Run(rc=rc, out=job.out, checkpoints=mngr, loader=job.loader, log=job.log,
              step=int(jax.device_get(state["step"])), state=state, last_saved=mngr.latest_step())
    flops_step = rc.batch_size * rc.seq_len * (3 * job.s_cfg.flops_per_token(rc.seq_len) + (
        job.t_cfg.flops_per_token(rc.seq_len) if job.t_params is not None else 0.0))
    peak = rc.peak_tflops * 1e12 if rc.peak_tflops else measure_peak_flops()
    tb = mirror = None
    if jax.process_index() == 0:  # metrics.jsonl and TensorBoard: appended files, so on gs:// a mirrored local folder
        from tensorboardX import SummaryWriter
        mirror = storage.Mirror(job.out, fetch=("metrics.jsonl",)) if storage.is_url(job.out) else None
        logs = mirror.local if mirror is not None else job.out
        tb = SummaryWriter(str(logs / "tensorboard"), flush_secs=MIRROR_EVERY_S)
    prog = Progress(rc.steps, rc.mode, metrics_path=(logs / "metrics.jsonl") if jax.process_index() == 0 else None)
    prog.step = run.step
    if mirror is not None:
        hooks = (*hooks, lambda run: mirror.sync(every_s=MIRROR_EVERY_S))
    with sigterm_stops(run):
        try:
            evaluate = make_evaluate(job)
            summary: dict[str, Any] = {"start_eval": start_evaluation(job, evaluate, run, prog)}
            after_step = run_hooks(rc, evaluate, prog, tb, hooks)
            while run.step < rc.steps and not run.stop:
                local, fingerprint = next_batch(job)
                with jax.set_mesh(mesh):
                    batch = to_global(local, mesh, lead=True)
                    t0 = time.perf_counter()
                    state, metrics = job.steps.train(state, job.t_params, batch)
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                dt = time.perf_counter() - t0
                check_finite(metrics, run)
                run.step, run.state = run.step + 1, state
                run.record = {**metrics, "lr": float(job.steps.schedule(run.step - 1)), "step_time_s": dt,
                              "mfu": flops_step / dt / peak, "batch_fingerprint": fingerprint}
                after_step(run)
                summary.update(run.record)
        finally:
            mngr.wait_until_finished()
            prog.close()
            if tb is not None:
                tb.close()
            if mirror is not None:
                mirror.close()  # the last lines reach the bucket, also when the run fails
    return finish(job, run, summary)


def finish(job: Job, run: Run, summary: dict[str, Any]) -> dict[str, Any]:
    """The summary: `preempted_at` for a run stopped early; else the student as an HF directory (export) and
    out/summary.json."""
    if run.stop:
        summary["preempted_at"] = run.step
        return summary
    summary["step"] = run.step
    if job.rc.export:
        params = run.state["trainable"]["model"]
        summary["student_hf"] = str(save_params(params, job.s_cfg, job.out / "student_hf", source=job.rc.student,
                                                dtype=job.s_cfg.dtype, overwrite=True))
        job.log(f"student written to {summary['student_hf']}")
    if jax.process_index() == 0:
        write_text(job.out / "summary.json", json.dumps(summary, indent=2, default=str))
    return summary
