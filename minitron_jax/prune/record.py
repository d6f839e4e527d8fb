"""The prune record (`prune.json` beside a pruned model): which teacher channels, heads and layers the
student kept, so that the hidden-state loss can map student layers onto the teacher's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from minitron_jax.core import multihost, storage
from minitron_jax.core.atomic import write_text
from minitron_jax.core.errors import PruneError
from minitron_jax.model.config import LlamaConfig
from minitron_jax.prune.pruning import keep_sets
from minitron_jax.prune.targets import SIZES, PruneTarget, validate

PRUNE_RECORD = "minitron_prune.json"  # beside a pruned student's config.json


def prune_record(cfg: LlamaConfig, scores: dict, target, *, source=None) -> dict[str, Any]:
    """What `prune(params, cfg, scores, target)` keeps, as JSON-able data (indices of the source `cfg`):
    `layers` [L'] is the source layer each student layer came from and `hidden` [H'] the kept hidden
    channels (always listed); `mlp` [L', F'], `q_heads` [L', Hq'] and `kv_groups` [L', Hkv'] per
    student layer, None where that axis was not pruned. The distiller pairs hidden states by
    `layers` and starts its projection as the selection of `hidden`."""
    t, new = PruneTarget.parse(target), validate(cfg, target)
    p = keep_sets(cfg, scores, t)
    full = {"layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size}
    rec = {k: (np.arange(full[k]) if p[k] is None and k in full else p[k]) for k in p}
    return {"source": None if source is None else str(source), "target": str(t),
            "source_config": {f: getattr(cfg, f) for f in SIZES},
            "pruned_config": {f: getattr(new, f) for f in SIZES},
            **{k: None if v is None else np.asarray(v).tolist() for k, v in rec.items()}}


def save_prune_record(directory, record: dict[str, Any]) -> Path:
    """Write `record` (from `prune_record`) as `directory/minitron_prune.json`: process 0 writes it, and every process
    of a multi-host job goes on once it is there (`multihost.decided`)."""
    path = storage.path(directory) / PRUNE_RECORD
    multihost.decided(lambda: str(write_text(path, json.dumps(record) + "\n")), "prune-record")
    return path


def load_prune_record(directory) -> dict[str, Any] | None:
    """The record saved beside a pruned student, or None if the directory has none."""
    path = storage.path(directory) / PRUNE_RECORD
    if not path.exists():
        return None
    try:
        rec = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PruneError(f"{path} is not valid JSON ({e}); re-run the prune, or delete the file to pair "
                         "layers by depth instead") from e
    if missing := [k for k in ("layers", "hidden", "source_config") if k not in (rec if isinstance(rec, dict) else {})]:
        raise PruneError(f"{path} lacks {missing}; re-run the prune, or delete the file to pair layers by depth instead")
    return rec
