"""Pruning targets (spec sections 3-4): what shape a pruned Llama has, checked against its config before any
array is touched, and the candidate shapes within a parameter budget.

`PruneTarget(hidden_size=3072, intermediate_size=9216)`, `PruneTarget.parse("hidden_size=432,
intermediate_size=1024")`, `PruneTarget.parse({"num_hidden_layers": 16})` or
`PruneTarget.parse("drop_layers=16-30")` (layers are 0-INDEXED, ranges inclusive; "16,17,18" works too).
`validate` returns the pruned config (or says why the target is impossible), `required_scores` the
importance scores pruning to it needs, `candidate_targets` the shapes within +-5% of a budget (`parse_count`:
80M, 4.5e9, ...). The slicing itself is `pruning.py`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re

import numpy as np

from minitron_jax.core.errors import PruneError
from minitron_jax.model.config import LlamaConfig

SIZES = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers")
ALIASES = {"hidden": "hidden_size", "ffn": "intermediate_size", "heads": "num_attention_heads",
           "kv_heads": "num_key_value_heads", "layers": "num_hidden_layers", "drop": "drop_layers"}
# lowest score is dropped first; "window" scores contiguous blocks: layer_window[i] is the loss (or
# 1 - task accuracy) with layers i .. i+k-1 skipped, and the best block is dropped whole
DEPTH_METRICS = {"bi": "layer_bi", "loss": "layer_loss", "window": "layer_window"}


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
    if hidden % heads and cfg.family.hidden_divisible_by_heads:
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


# ---------------------------------------------------------------------------- budget candidates
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
