"""What runs after a training step: the `Run` the hooks see, the hooks themselves (evaluation, metrics, the
stop agreement, checkpointing) and `Hooks`, the ordered list the loop runs, each hook registered with its
cadence (`add_hook(fn, every=N)`: after every N-th step and the last one).

SIGTERM on any process stops every process after the same step (`stop_hook` combines the flag across
processes each step); `checkpoint_hook` then saves that step. Orbax checkpoints (async, keep last N) hold the
student parameters, optimizer state, step and data-loader state, so `resume=true` continues exactly.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from minitron_jax.core.progress import Progress
from minitron_jax.train.run_config import RunConfig


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


class Hooks:
    """The hooks the loop runs after each step, in the order they were added. `add_hook(fn, every=N, also=)`:
    `fn(run)` runs after every N-th step, after the last step, and after any step where `also(run)` holds."""

    def __init__(self):
        self.hooks: list[tuple[Hook, int, Callable[[Run], Any] | None]] = []

    def add_hook(self, fn: Hook, every: int = 1, also: Callable[[Run], Any] | None = None) -> None:
        self.hooks.append((fn, every, also))

    def __call__(self, run: Run) -> None:
        for fn, every, also in self.hooks:
            if run.step % every == 0 or run.step == run.rc.steps or (also is not None and also(run)):
                fn(run)


def evaluation_hook(evaluate: Callable[[Any], dict]) -> Hook:
    """Held-out loss (and KL) into the step's record (every eval_every steps)."""
    def hook(run: Run):
        run.record.update(evaluate(run.state["trainable"]["model"]))
    return hook


def metrics_hook(prog: Progress, tb) -> Hook:
    """metrics.jsonl, TensorBoard and the progress line (every log_every steps, and with held-out results)."""
    def hook(run: Run):
        rc, rec = run.rc, run.record
        prog.update(steps=run.step - prog.step, tokens=rc.batch_size * rc.seq_len * (run.step - prog.step), **rec)
        if tb is not None:
            for k, v in rec.items():
                tb.add_scalar(k, v, run.step)
    return hook


def has_held_out(run: Run) -> bool:
    return "held_out_loss" in run.record


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


def stopping(run: Run) -> bool:
    return bool(run.stop)


def checkpoint_hook(run: Run) -> None:
    """Save the step (every save_every steps, and when the run stops early: preemption)."""
    run.checkpoints.save(run.step, args=ocp.args.Composite(state=ocp.args.StandardSave(run.state),
                                                           loader=ocp.args.JsonSave(run.loader.get_state())))
    run.last_saved = run.step
    if run.stop:
        run.checkpoints.wait_until_finished()
        run.log(f"{run.stop}: saved step {run.step} to {run.out / 'checkpoints'}; rerun with resume=true to continue")


def run_hooks(rc: RunConfig, evaluate: Callable[[Any], dict], prog: Progress, tb, hooks=()) -> Hooks:
    """The loop's hooks in order: evaluation, metrics, the caller's `hooks` (each `hook(run: Run)`, every
    step), the stop agreement (every step), checkpointing."""
    h = Hooks()
    h.add_hook(evaluation_hook(evaluate), every=rc.eval_every)
    h.add_hook(metrics_hook(prog, tb), every=rc.log_every, also=has_held_out)
    for fn in hooks:
        h.add_hook(fn)
    h.add_hook(stop_hook)
    h.add_hook(checkpoint_hook, every=rc.save_every, also=stopping)
    return h
