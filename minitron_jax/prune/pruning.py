"""Minitron structured pruning (spec sections 3-4): slice a Llama by importance scores, plus a small
architecture search over shapes within a parameter budget.

Scores (from `importance.py`, indices of the ORIGINAL model, higher = more important):
`mlp` [L,F], `heads` [L,Hq], `kv_groups` [L,Hkv], `hidden` [H], `layer_bi` [L] and optionally
`layer_loss` [L] (LM loss with the layer skipped: low = skipping it hurts little = least important).

Targets: `PruneTarget(hidden_size=3072, intermediate_size=9216)`, `PruneTarget.parse("hidden_size=432,
intermediate_size=1024")`, `PruneTarget.parse({"num_hidden_layers": 16})` or
`PruneTarget.parse("drop_layers=16-30")` (layers are 0-INDEXED, ranges inclusive; "16,17,18" works too).
Layers are dropped first (explicitly, or the lowest by `depth_metric`); every width keep-set is then
chosen with the kept layers' scores, and kept channels / heads / layers stay in their original order.
Every target is validated against the config before any array is touched.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from minitron_jax.core.errors import PruneError
from minitron_jax.model.config import LlamaConfig
from minitron_jax.model.llama import is_param_spec, param_specs
from minitron_jax.model.sharding import named_sharding

SIZES = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers")
ALIASES = {"hidden": "hidden_size", "ffn": "intermediate_size", "heads": "num_attention_heads",
           "kv_heads": "num_key_value_heads", "layers": "num_hidden_layers", "drop": "drop_layers"}
# lowest score is dropped first; "window" scores contiguous blocks: layer_window[i] is the loss (or
# 1 - task accuracy) with layers i .. i+k-1 skipped, and the best block is dropped whole
DEPTH_METRICS = {"bi": "layer_bi", "loss": "layer_loss", "window": "layer_window"}
HIDDEN_IN = ("input_layernorm", "post_attention_layernorm", "q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
HIDDEN_OUT = ("o_proj", "down_proj")




def _layer_list(v) -> tuple[int, ...]:
    if not isinstance(v, str):
        return (int(v),) if isinstance(v, (int, np.integer)) else tuple(int(i) for i in (v or ()))
    out = []
    for part in filter(None, v.replace(" ", "").split(",")):
        a, sep, b = part.partition("-")
        if not (a.isdigit() and (b.isdigit() if sep else True)) or (sep and int(b) < int(a)):
            raise PruneError(f"drop_layers: cannot read {part!r}; write 0-indexed layers as '16-30' or '16,17,18'")
        out += range(int(a), int(b) + 1) if sep else [int(a)]
    return tuple(out)


def _ranges(ix) -> str:  # (1, 2, 3, 7) -> "1-3,7"
    runs = [[i for _, i in g] for _, g in itertools.groupby(enumerate(sorted(ix)), lambda p: p[1] - p[0])]
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


@dataclasses.dataclass(frozen=True)
class PruneTarget:
    """Target shape; None keeps the source's size. `drop_layers` are 0-indexed layers of the source.
    `num_key_value_heads` alone keeps every query head of the kept groups."""
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    num_hidden_layers: int | None = None
    drop_layers: tuple[int, ...] = ()
    depth_metric: str = "bi"  # "bi" | "loss" | "window": used when num_hidden_layers is given without drop_layers

    def __post_init__(self):
        object.__setattr__(self, "drop_layers", _layer_list(self.drop_layers))

    @classmethod
    def parse(cls, spec: "str | dict | PruneTarget") -> "PruneTarget":
        if isinstance(spec, cls):
            return spec
        if isinstance(spec, str):  # split at commas followed by "key=", so drop_layers=1,2,5-7 stays whole
            items = [tok.split("=", 1) for tok in re.split(r",\s*(?=\w+\s*=)", spec.strip()) if tok]
            if bad := [tok[0] for tok in items if len(tok) != 2]:
                raise PruneError(f"cannot read {bad[0]!r} in target {spec!r}: write key=value pairs, "
                                 "e.g. 'hidden_size=432,intermediate_size=1024,drop_layers=16-29'")
            keys = [ALIASES.get(k.strip(), k.strip()) for k, _ in items]
            if len(set(keys)) < len(keys):
                raise PruneError(f"target {spec!r} sets a key twice")
            spec = {k: v.strip() for k, (_, v) in zip(keys, items)}
        if not isinstance(spec, dict):
            raise PruneError(f"a pruning target is a string, dict or PruneTarget, not {type(spec).__name__}")
        valid = SIZES + ("drop_layers", "depth_metric")
        kw = {}
        for k, v in spec.items():
            k = ALIASES.get(k, k)
            if k not in valid:
                raise PruneError(f"unknown target key {k!r}; valid keys: {', '.join(valid)} "
                                 f"(short forms: {', '.join(ALIASES)})")
            if k in SIZES and isinstance(v, str):
                if not v.strip().lstrip("-").isdigit():
                    raise PruneError(f"{k}={v!r} is not an integer")
                v = int(v)
            kw[k] = int(v) if isinstance(v, np.integer) else v
        return cls(**kw)

    def __str__(self) -> str:  # parse(str(t)) == t
        parts = [f"{k}={getattr(self, k)}" for k in SIZES if getattr(self, k) is not None]
        parts += [f"drop_layers={_ranges(self.drop_layers)}"] * bool(self.drop_layers)
        parts += [f"depth_metric={self.depth_metric}"] * (self.depth_metric != "bi")
        return ",".join(parts) or "(unchanged)"


# ---------------------------------------------------------------------------- validation
def validate(cfg: LlamaConfig, target) -> LlamaConfig:
    """Check `target` against `cfg` (no arrays needed) and return the pruned config."""
    t = PruneTarget.parse(target)
    L, group = cfg.num_hidden_layers, cfg.num_kv_groups
    for f in SIZES:
        v, src = getattr(t, f), getattr(cfg, f)
        if v is None:
            continue
        if not isinstance(v, int) or isinstance(v, bool):
            raise PruneError(f"{f}={v!r} is not an integer")
        if f == "num_hidden_layers" and v <= 0:
            raise PruneError(f"num_hidden_layers={v} would drop all layers; keep 1..{L}")
        if not 1 <= v <= src:
            raise PruneError(f"{f}={v} is impossible: pruning only shrinks, valid values are 1..{src} (the source's)")
    if t.depth_metric not in DEPTH_METRICS:
        raise PruneError(f"depth_metric={t.depth_metric!r}: choose one of {sorted(DEPTH_METRICS)}")
    drop = t.drop_layers
    if bad := sorted(i for i in drop if not 0 <= i < L):
        raise PruneError(f"drop_layers {bad} out of range: layers are 0-indexed, valid indices 0..{L - 1}")
    if dups := sorted({i for i in drop if drop.count(i) > 1}):
        raise PruneError(f"drop_layers lists {dups} more than once")
    if len(drop) >= L:
        raise PruneError(f"drop_layers drops all {L} layers; keep at least one")
    n_layers = L - len(drop) if drop else (t.num_hidden_layers or L)
    if drop and t.num_hidden_layers not in (None, n_layers):
        raise PruneError(f"num_hidden_layers={t.num_hidden_layers} disagrees with drop_layers: dropping "
                         f"{len(drop)} of {L} layers leaves {n_layers}; set num_hidden_layers={n_layers} or omit it")
    kv = t.num_key_value_heads or cfg.num_key_value_heads
    heads = t.num_attention_heads or kv * group
    valid_heads = [kv * g for g in range(1, group + 1)]
    if heads % kv:
        raise PruneError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}: every KV "
                         f"group keeps the same number of query heads; valid num_attention_heads: {valid_heads}")
    if heads // kv > group:
        kvs = [k for k in range(1, cfg.num_key_value_heads + 1) if heads % k == 0 and heads // k <= group]
        raise PruneError(f"num_attention_heads={heads} with num_key_value_heads={kv} needs {heads // kv} query heads "
                         f"per KV group, but the source has {group} per group and heads are kept within their "
                         f"groups; valid num_attention_heads for {kv} KV heads: {valid_heads}"
                         + (f"; or keep num_key_value_heads in {kvs}" if kvs else ""))
    hidden = t.hidden_size or cfg.hidden_size
    if hidden % heads:
        lo = hidden // heads * heads
        near = [s for s in (lo - heads, lo, lo + heads, lo + 2 * heads) if 0 < s <= cfg.hidden_size]
        alt = [h for h in valid_heads if hidden % h == 0]
        raise PruneError(f"hidden_size={hidden} is not a multiple of num_attention_heads={heads}: transformers "
                         f"refuses such a config even with head_dim set; nearby valid hidden sizes: {near}"
                         + (f", or num_attention_heads in {alt}" if alt else ""))
    return cfg.replace(hidden_size=hidden, intermediate_size=t.intermediate_size or cfg.intermediate_size,
                       num_attention_heads=heads, num_key_value_heads=kv, num_hidden_layers=n_layers)



def dry_run(config: "str | LlamaConfig", target) -> tuple[LlamaConfig, int]:
    """Pruned config and its parameter count from a config.json (or LlamaConfig) alone."""
    cfg = config if isinstance(config, LlamaConfig) else LlamaConfig.from_file(config)
    return (new := validate(cfg, target)), new.param_count()


def required_scores(cfg: LlamaConfig, target) -> dict[str, tuple[int, ...]]:
    """Score keys (with their shapes) that pruning `cfg` to `target` needs."""
    t, new, L = PruneTarget.parse(target), validate(cfg, target), cfg.num_hidden_layers
    need = {"hidden": (new.hidden_size < cfg.hidden_size, (cfg.hidden_size,)),
            "mlp": (new.intermediate_size < cfg.intermediate_size, (L, cfg.intermediate_size)),
            "kv_groups": (new.num_key_value_heads < cfg.num_key_value_heads, (L, cfg.num_key_value_heads)),
            "heads": (new.num_kv_groups < cfg.num_kv_groups, (L, cfg.num_attention_heads)),
            DEPTH_METRICS[t.depth_metric]: (new.num_hidden_layers < L and not t.drop_layers,
                                            (new.num_hidden_layers + 1,) if t.depth_metric == "window" else (L,))}
    return {k: shape for k, (needed, shape) in need.items() if needed}


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


def plan(cfg: LlamaConfig, scores: dict, target) -> dict[str, np.ndarray | None]:
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
    idx = idx[:, :, None] if axis == 1 else idx[:, None, :]
    return (np if isinstance(x, np.ndarray) else jnp).take_along_axis(x, idx, axis=axis)


def prune(params: dict[str, Any], cfg: LlamaConfig, scores: dict, target) -> tuple[dict[str, Any], LlamaConfig]:
    """Pure: slice `params` (NumPy or JAX arrays, layout of `model.param_specs`) to `target`; returns
    (params, pruned config). NumPy in gives NumPy out; sharded JAX arrays come back sharded on the same
    mesh by the same logical rules. Arrays on an axis that is not pruned are passed through, not copied."""
    new = validate(cfg, target)
    p = plan(cfg, scores, target)  # every check happens before this line touches an array
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
    if p["kv_groups"] is not None:
        kv = np.stack([_blocks(r, cfg.head_dim) for r in p["kv_groups"]])
        lay.update({k: _take_per_layer(lay[k], kv, 1) for k in ("k_proj", "v_proj")})
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


# ---------------------------------------------------------------------------- what pruning kept








# ---------------------------------------------------------------------------- budget search
def parse_count(x) -> int:
    """80M -> 80_000_000; also 1.5B, 4.5e9, 800k, 2T, plain integers."""
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return int(x)
    if isinstance(x, float) and math.isfinite(x):
        return int(round(x))
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)([kmbgt]?)", str(x).strip().lower().replace("_", ""))
    if not m:
        raise PruneError(f"cannot read a parameter count from {x!r}; write e.g. 80M, 1.5B, 4.5e9 or 800k")
    return int(round(float(m[1]) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}[m[2]]))


def _spread(items: list, k: int) -> list:  # k items evenly spaced through the list
    return list(items) if len(items) <= k else [items[i] for i in np.linspace(0, len(items) - 1, k).round().astype(int)]


def candidate_targets(cfg: LlamaConfig, budget, tol: float = 0.05, max_candidates: int = 24, *,
                      ffn_multiple: int | None = None, hidden_multiple: int | None = None,
                      min_layers: int | None = None, max_ratio_change: float = 2.0,
                      depth_metric: str = "bi") -> list[PruneTarget]:
    """Shapes within +-tol of `budget` params: width-only, depth-only and mixed, capped with a spread.

    Hidden sizes step by lcm(heads, 8) (by `heads` if that gives < 8 sizes); FFN by 64 (32 below
    2048); query heads per KV group from the source's down to half of it (KV groups kept); layers
    from L down to `min_layers` (default L/2); the FFN/hidden ratio stays within `max_ratio_change`x
    of the source's. For each (layers, heads, hidden) the FFN size closest to the budget is taken.
    """
    budget = parse_count(budget)
    L, H, F, kv, G = (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size,
                      cfg.num_key_value_heads, cfg.num_kv_groups)
    if budget <= 0 or budget * (1 - tol) > cfg.param_count():
        raise PruneError(f"budget {budget:,} is not below the source's {cfg.param_count():,} parameters")
    fm = ffn_multiple or (64 if F >= 2048 else 32)
    lo, hi, ratio = budget * (1 - tol), budget * (1 + tol), F / H
    fams: dict[str, list] = {"depth": [], "width": [], "mixed": []}
    for n in range(L, (min_layers or max(1, (L + 1) // 2)) - 1, -1):
        if n < L and lo <= cfg.replace(num_hidden_layers=n).param_count() <= hi:
            fams["depth"].append(PruneTarget(num_hidden_layers=n, depth_metric=depth_metric))
        for g in range(G, max(1, (G + 1) // 2) - 1, -1):
            heads = kv * g
            step = hidden_multiple or math.lcm(heads, 8)
            if not hidden_multiple and H // step < 8:
                step = heads
            for hid in sorted({*range(step, H + 1, step), *([H] if H % heads == 0 else [])}, reverse=True):
                base = cfg.replace(num_hidden_layers=n, num_attention_heads=heads, hidden_size=hid, intermediate_size=fm)
                per_f = 3 * n * hid  # params per FFN channel
                f_star = fm + (budget - base.param_count()) / per_f
                f = min(F, max(fm, round(f_star / fm) * fm))  # the FFN size closest to the budget
                count = base.param_count() + (f - fm) * per_f
                shape = (n, heads, hid, f)
                if (not lo <= count <= hi or not 1 / max_ratio_change <= (f / hid) / ratio <= max_ratio_change
                        or shape == (n, cfg.num_attention_heads, H, F)):
                    continue  # out of budget, odd MLP ratio, or depth-only / unchanged (handled above)
                fams["width" if n == L else "mixed"].append(PruneTarget(
                    hidden_size=hid if hid < H else None, intermediate_size=f if f < F else None,
                    num_attention_heads=heads if heads < cfg.num_attention_heads else None,
                    num_hidden_layers=n if n < L else None, depth_metric=depth_metric))
    quota, left = {k: 0 for k in fams}, max_candidates  # share the cap evenly among the families
    while left and any(quota[k] < len(v) for k, v in fams.items()):
        for k in (k for k, v in fams.items() if quota[k] < len(v) and left):
            quota[k], left = quota[k] + 1, left - 1
    out = [t for k, v in fams.items() for t in _spread(v, quota[k])]
    if not out:
        emb = cfg.vocab_size * H * (1 if cfg.tie_word_embeddings else 2)
        raise PruneError(f"no candidate shapes within +-{tol:.0%} of {budget:,} params (source {cfg.param_count():,}, "
                         f"of which embeddings {emb:,}); widen tol, lower min_layers or use finer "
                         "hidden_multiple / ffn_multiple")
    return out


def _nan_last(loss: float) -> float:
    return math.inf if math.isnan(loss) else loss


def search(params: dict[str, Any], cfg: LlamaConfig, scores: dict, budget,
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
