"""Resuming a training run from its orbax checkpoints (out/checkpoints).

Before any weights or data load: the recipe is compared with the checkpoints' recipe.json
(`recipe.check_resume`: free, forced and never-changing keys) and the student's shapes with the newest
checkpoint's. Then the newest checkpoint that restores is used; damaged newer ones are logged and moved
to out/checkpoints_skipped. recipe.json is (re)written only once a run has started or resumed.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from minitron_jax.core import multihost, storage
from minitron_jax.core.atomic import write_text
from minitron_jax.core.errors import ResumeError
from minitron_jax.core.yaml_config import dump
from minitron_jax.model.config import LlamaConfig
from minitron_jax.model.llama import is_param_spec, param_specs
from minitron_jax.train.run_config import RunConfig, check_resume


def checkpoint_manager(path: Path, rc: RunConfig) -> ocp.CheckpointManager:
    """orbax writes local folders and gs:// prefixes alike (through epath)."""
    opts = ocp.CheckpointManagerOptions(max_to_keep=rc.keep, enable_async_checkpointing=True, create=True)
    return ocp.CheckpointManager(storage.absolute(path), options=opts, item_handlers={
        "state": ocp.StandardCheckpointHandler(), "loader": ocp.JsonCheckpointHandler()})


def _everywhere(ok: bool) -> bool:
    """`ok` on every process (a collective on multi-process runs, so that all of them take the same branch)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils
    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def check_resume_recipe(rc: RunConfig, out: Path, log: Callable[[str], Any]) -> None:
    """Compare the recipe with out/recipe.json, the settings its checkpoints were made with (before any load)."""
    path = out / "recipe.json"
    if not path.exists():
        log(f"warning: {path} is missing: cannot compare this run's settings with its checkpoints'")
        return
    try:
        recorded = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ResumeError(f"cannot read {path} ({_short(e)}), the settings of the checkpoints in "
                            f"{out / 'checkpoints'}; delete it to resume with this run's settings (it is rewritten), "
                            "or choose another out") from None
    for line in check_resume(recorded, rc, path):
        log(f"resume: {line}")


def check_checkpoint_shapes(mngr: ocp.CheckpointManager, rc: RunConfig, s_cfg: LlamaConfig,
                            t_cfg: LlamaConfig | None) -> None:
    """The trainable arrays of the newest readable checkpoint have the shapes this student (and the hidden
    loss's projection) would have: a ResumeError naming the differences, not an orbax traceback."""
    want = {f"['model']{jax.tree_util.keystr(p)}": tuple(spec.shape)
            for p, spec in jax.tree_util.tree_leaves_with_path(param_specs(s_cfg), is_leaf=is_param_spec)}
    if rc.hidden_weight > 0 and rc.mode == "distill":
        want["['proj']"] = (s_cfg.hidden_size, t_cfg.hidden_size)
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            meta = mngr.item_metadata(step)["state"]["trainable"]
            have = {jax.tree_util.keystr(p): tuple(a.shape) for p, a in jax.tree_util.tree_leaves_with_path(meta)}
        except Exception:  # unreadable: the restore decides what to do with it
            continue
        if diff := [k for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)]:
            shown = "; ".join(f"{k}: {have.get(k, 'absent')} in the checkpoint, {want.get(k, 'absent')} now"
                              for k in diff[:3]) + (f"; {len(diff) - 3} more" if len(diff) > 3 else "")
            raise ResumeError(f"checkpoint step {step} in {mngr.directory} holds other arrays than {rc.student} "
                                f"(config.json) and this recipe make ({shown}): resume with the student (and "
                                "hidden_weight) the run started with, or choose another out")
        return


def restore_newest(mngr: ocp.CheckpointManager, state, out: Path, log: Callable[[str], Any]) -> tuple[Any, dict, int]:
    """(state, loader state, step) of the newest checkpoint that restores. Damaged newer ones are logged
    and moved to out/checkpoints_skipped (else the run could not save those steps again); none restoring
    is a ResumeError."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    ckpt_dir, skipped = storage.path(str(mngr.directory)), []
    # decided once: every process tries the same steps in the same order (its own listing could differ)
    for step in multihost.decided(lambda: sorted(mngr.all_steps(), reverse=True), "restore-steps"):
        try:
            restored, error = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                         loader=ocp.args.JsonRestore())), None
        except Exception as e:  # orbax / tensorstore raise many types for damaged files
            restored, error = None, e
        if _everywhere(error is None):
            break
        skipped.append((step, _short(error) if error is not None else "damaged on another process"))
        log(f"warning: checkpoint {ckpt_dir / str(step)} does not restore ({skipped[-1][1]}); skipping it")
    else:
        tried = "; ".join(f"step {s}: {e}" for s, e in skipped) or "none found"
        raise ResumeError(f"no checkpoint in {mngr.directory} restores ({tried}): the files are damaged; restore "
                            f"them from a copy, or start again in another out (or delete {mngr.directory})")
    if skipped:
        if jax.process_index() == 0:
            aside = out / "checkpoints_skipped"
            aside.mkdir(exist_ok=True)
            for s, _ in skipped:
                storage.move(ckpt_dir / str(s), aside / f"{s}-{time.strftime('%Y%m%d-%H%M%S')}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("minitron: damaged checkpoints moved aside")
        mngr.reload()
        log(f"moved the checkpoints that do not restore ({', '.join(str(s) for s, _ in skipped)}) to "
            f"{out / 'checkpoints_skipped'}; resuming from step {step}")
    return restored["state"], restored["loader"], step


def write_recipe(rc: RunConfig, out: Path) -> None:
    """out/recipe.json, whole or not at all (process 0)."""
    if jax.process_index() == 0:
        write_text(out / "recipe.json", dump(rc))
