"""Minitron structured pruning (spec sections 3-4): slice a Llama (or Mistral / Qwen2 / Qwen3) by importance scores to a target shape
(`targets.py`), and rank the candidate shapes of a parameter budget by pruning each.

Scores (from `importance.py`, indices of the ORIGINAL model, higher = more important):
`mlp` [L,F], `heads` [L,Hq], `kv_groups` [L,Hkv], `hidden` [H], `layer_bi` [L] and optionally
`layer_loss` [L] (LM loss with the layer skipped: low = skipping it hurts little = least important).

Layers are dropped first (explicitly, or the lowest by `depth_metric`); every width keep-set is then
chosen with the kept layers' scores, and kept channels / heads / layers stay in their original order.
Every target is validated against the config before any array is touched.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from minitron_jax.core.errors import PruneError
from minitron_jax.model.config import LlamaConfig
from minitron_jax.model.llama import is_param_spec, param_specs
from minitron_jax.model.sharding import named_sharding
from minitron_jax.prune.targets import (
    DEPTH_METRICS,
    PruneTarget,
    candidate_targets,
    parse_count,
    required_scores,
    validate,
)

HIDDEN_IN = ("input_layernorm", "post_attention_layernorm", "q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
HIDDEN_OUT = ("o_proj", "down_proj")


def _check_scores(cfg, target, scores) -> dict[str, np.ndarray]:
    scores, out = scores or {}, {}
    for key, shape in required_scores(cfg, target).items():
        if key not in scores:
            raise PruneError(f"scores lack {key!r} (shape {list(shape)}), needed for target {PruneTarget.parse(target)}; "
                             f"scores present: {sorted(scores)}. Compute it with minitron_jax.prune.importance")
        s = np.asarray(scores[key], np.float64)
        if s.shape != shape:
            raise PruneError(f"scores[{key!r}] has shape {list(s.shape)}, the source model needs {list(shape)}: "
                             "were the scores computed on another model?")
        if not np.isfinite(s).all():
            raise PruneError(f"scores[{key!r}] contains NaN/inf; recompute the importance scores")
        out[key] = s
    return out


# ---------------------------------------------------------------------------- slicing
def _top(s: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores (ties: lower index first), in ascending order."""
    return np.sort(np.argsort(-s, kind="stable")[:k])


def _blocks(ix, d: int) -> np.ndarray:
    return (np.asarray(ix)[:, None] * d + np.arange(d)).ravel()


def keep_sets(cfg: LlamaConfig, scores: dict, target) -> dict[str, np.ndarray | None]:
    """Keep-sets (original indices, ascending): layers [L'], hidden [H'], mlp [L',F'], q_heads [L',Hq'],
    kv_groups [L',Hkv']; None where that axis is not pruned."""
    t, new = PruneTarget.parse(target), validate(cfg, target)
    sc = _check_scores(cfg, t, scores)
    L, G, Gt = cfg.num_hidden_layers, cfg.num_kv_groups, new.num_kv_groups
    # explicit drop_layers, else the (L - target) lowest by the depth metric (lowest = least important)
    metric = sc.get(DEPTH_METRICS[t.depth_metric], np.zeros(L))
    k = L - new.num_hidden_layers
    if t.depth_metric == "window" and k and not t.drop_layers:
        start = int(np.argmin(metric))
        drop = set(range(start, start + k))
    else:
        drop = set(t.drop_layers or np.argsort(metric, kind="stable")[:k].tolist())
    layers = np.array([i for i in range(L) if i not in drop])
    p = {"layers": layers if len(layers) < L else None, "hidden": None, "mlp": None, "q_heads": None, "kv_groups": None}
    if new.hidden_size < cfg.hidden_size:
        p["hidden"] = _top(sc["hidden"], new.hidden_size)
    if new.intermediate_size < cfg.intermediate_size:
        p["mlp"] = np.stack([_top(sc["mlp"][i], new.intermediate_size) for i in layers])
    if new.num_attention_heads < cfg.num_attention_heads:
        kv, heads = [], []
        for i in layers:
            groups = (_top(sc["kv_groups"][i], new.num_key_value_heads)
                      if new.num_key_value_heads < cfg.num_key_value_heads else np.arange(new.num_key_value_heads))
            members = [g * G + np.arange(G) for g in groups]
            heads.append(np.concatenate([m[_top(sc["heads"][i][m], Gt)] if Gt < G else m for m in members]))
            kv.append(groups)
        p["q_heads"] = np.stack(heads)
        p["kv_groups"] = np.stack(kv) if new.num_key_value_heads < cfg.num_key_value_heads else None
    return p


def _take(x, idx, axis):  # NumPy stays NumPy, JAX stays JAX
    return (np if isinstance(x, np.ndarray) else jnp).take(x, idx, axis=axis)


def _take_per_layer(x, idx, axis):  # idx [L', k]: a different keep-set in every layer
    if x.ndim == 3:  # [L, out, in] matrices; [L, n] biases take idx as it is
        idx = idx[:, :, None] if axis == 1 else idx[:, None, :]
    return (np if isinstance(x, np.ndarray) else jnp).take_along_axis(x, idx, axis=axis)


def prune(params: dict[str, Any], cfg: LlamaConfig, scores: dict, target) -> tuple[dict[str, Any], LlamaConfig]:
    """Pure: slice `params` (NumPy or JAX arrays, layout of `model.param_specs`) to `target`; returns
    (params, pruned config). NumPy in gives NumPy out; sharded JAX arrays come back sharded on the same
    mesh by the same logical rules. Arrays on an axis that is not pruned are passed through, not copied."""
    new = validate(cfg, target)
    p = keep_sets(cfg, scores, target)  # every check happens before this line touches an array
    out = {k: v for k, v in params.items() if k != "layers"}
    lay = dict(params["layers"])
    if p["layers"] is not None:
        lay = {k: _take(v, p["layers"], 0) for k, v in lay.items()}
    if (h := p["hidden"]) is not None:  # lm_head is absent when tied: one matrix, sliced once
        out.update({k: _take(out[k], h, 1) for k in ("embed_tokens", "lm_head") if k in out})
        out["norm"] = _take(out["norm"], h, 0)
        lay.update({k: _take(lay[k], h, lay[k].ndim - 1) for k in HIDDEN_IN})
        lay.update({k: _take(lay[k], h, 1) for k in HIDDEN_OUT})
    if (n := p["mlp"]) is not None:
        lay.update({k: _take_per_layer(lay[k], n, 1) for k in ("gate_proj", "up_proj")})
        lay["down_proj"] = _take_per_layer(lay["down_proj"], n, 2)
    if p["q_heads"] is not None:
        q = np.stack([_blocks(r, cfg.head_dim) for r in p["q_heads"]])
        lay["q_proj"], lay["o_proj"] = _take_per_layer(lay["q_proj"], q, 1), _take_per_layer(lay["o_proj"], q, 2)
        if "q_bias" in lay:
            lay["q_bias"] = _take_per_layer(lay["q_bias"], q, 1)
    if p["kv_groups"] is not None:  # q_norm / k_norm act within a head: kept whole
        kv = np.stack([_blocks(r, cfg.head_dim) for r in p["kv_groups"]])
        lay.update({k: _take_per_layer(lay[k], kv, 1) for k in ("k_proj", "v_proj", "k_bias", "v_bias") if k in lay})
    out["layers"] = lay
    return _reshard(out, params, new), new


def _reshard(new: dict, old: dict, cfg: LlamaConfig) -> dict:
    """Sliced arrays whose source had a NamedSharding go back onto that mesh by the logical rules."""
    def fix(n, o, spec):
        sh = getattr(o, "sharding", None)
        if n is o or not isinstance(n, jax.Array) or not isinstance(sh, NamedSharding):
            return n
        return jax.device_put(n, named_sharding(spec.axes, n.shape, sh.mesh))
    if not any(isinstance(getattr(x, "sharding", None), NamedSharding) for x in jax.tree.leaves(old)):
        return new  # NumPy or single-device input: nothing to restore
    return jax.tree.map(fix, new, old, param_specs(cfg), is_leaf=lambda x: x is None or is_param_spec(x))


# ---------------------------------------------------------------------------- budget ranking
def _nan_last(loss: float) -> float:
    return math.inf if math.isnan(loss) else loss


def rank_shapes(params: dict[str, Any], cfg: LlamaConfig, scores: dict, budget,
                evaluate: Callable[[dict[str, Any], LlamaConfig], float], log: Callable[[str], Any] = print, *,
                candidates: list | None = None, **candidate_kw) -> tuple[dict[str, Any], LlamaConfig, list[dict]]:
    """Prune every candidate, score it with `evaluate(params, cfg)` (lower is better), keep the best.
    Returns (best_params, best_cfg, table) with table rows {target, spec, params, loss, config} by loss."""
    cands = [PruneTarget.parse(c) for c in candidates] if candidates is not None else \
        candidate_targets(cfg, budget, **candidate_kw)
    if not cands:
        raise PruneError(f"no candidate shapes within +-{candidate_kw.get('tol', 0.05):.0%} of {parse_count(budget):,} "
                         f"params (source {cfg.param_count():,}); widen tol, lower min_layers or use finer multiples")
    for c in cands:  # all targets and scores checked before any pruning
        _check_scores(cfg, c, scores)
    best, table = None, []
    for i, t in enumerate(cands):
        p, c = prune(params, cfg, scores, t)
        loss = float(evaluate(p, c))
        table.append({"target": t, "spec": str(t), "params": c.param_count(), "loss": loss, "config": c})
        log(f"[{i + 1}/{len(cands)}] {t}: {c.param_count():,} params, loss {loss:.4f}")
        if best is None or _nan_last(loss) < _nan_last(best[0]):
            best = (loss, p, c)  # only the best pruned model is kept in memory
    table.sort(key=lambda r: _nan_last(r["loss"]))
    width = max(len(r["spec"]) for r in table)
    log(f"{'target':<{width}}  {'params':>15}  loss")
    for r in table:
        log(f"{r['spec']:<{width}}  {r['params']:>15,}  {r['loss']:.4f}")
    if best is None or math.isnan(best[0]):
        raise PruneError("evaluate returned NaN for every candidate")
    return best[1], best[2], table
