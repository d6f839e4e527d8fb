"""Minitron activation-importance scores (spec section 2), from jitted, sharded forward passes.

Per layer, the model's `capture` hook reduces each activation over the sequence to one value per
sample and channel (`seq_agg`; `var` is centred: two passes over the masked sequence), inside the
layer loop; across samples we keep the count n, the mean and M2 = sum_b (x_b - mean)^2 per channel in
fp32 on device, merged batch by batch with Chan's centred update (no E[x^2] - E[x]^2 cancellation on
activations with a large mean), so one compile serves all batches. The batch aggregation (`batch_agg`):
  l2: sqrt(sum_b x_b^2) = sqrt(M2 + n mean^2)   mean: mean   var: M2 / n
Default (l2, mean) is ModelOpt's: score[c] = sqrt(sum_b (mean_s |a[b,s,c]|)^2).

Files: `save_scores` refuses non-finite scores (nothing written) and records the scored model's
fingerprint (`model_fingerprint`: a hash of its config and one of a small corner of every weight);
`check_scores_match` refuses scores of another model before pruning with them. Every path may be `gs://`
(`core.storage`): scores are read by ranged reads and written as whole objects.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from minitron_jax.core import multihost, storage
from minitron_jax.core.atomic import atomic_file
from minitron_jax.core.errors import ScoresError
from minitron_jax.core.progress import Progress
from minitron_jax.data.spec import DataSpec
from minitron_jax.data.text import check_token_ids, parse_holdout, warn
from minitron_jax.eval.evaluate import batches, gated_losses, mesh_context, multiple_choice
from minitron_jax.io.safetensors import SafetensorsFile, write_file
from minitron_jax.model.config import LlamaConfig
from minitron_jax.model.llama import forward
from minitron_jax.model.sharding import batch_rows, check_batch_rows, put, to_host

SEQ_AGGS = ("mean", "l2", "var")
BATCH_AGGS = ("l2", "mean", "var")
MLP_SITES = {"down_proj_in": "down_proj_in", "pre_activation": "mlp_pre"}




@dataclasses.dataclass(frozen=True)
class ScoreConfig:
    batch_agg: str = "l2"
    seq_agg: str = "mean"
    mlp_site: str = "down_proj_in"  # or "pre_activation" (the paper's X W1^T)

    def __post_init__(self):
        if self.batch_agg not in BATCH_AGGS:
            raise ValueError(f"batch_agg={self.batch_agg!r}: choose one of {BATCH_AGGS}")
        if self.seq_agg not in SEQ_AGGS:
            raise ValueError(f"seq_agg={self.seq_agg!r}: choose one of {SEQ_AGGS}")
        if self.mlp_site not in MLP_SITES:
            raise ValueError(f"mlp_site={self.mlp_site!r}: choose one of {sorted(MLP_SITES)}")


def seq_reduce(a: jax.Array, mask: jax.Array, how: str) -> jax.Array:
    """[B, S, C] -> [B, C] over real tokens (mask [B, S]), in fp32."""
    a = a.astype(jnp.float32)
    n = jnp.maximum(mask.sum(1), 1.0)[:, None]
    msum = lambda x: jnp.einsum("bsc,bs->bc", x, mask)  # noqa: E731  (masked sum over the sequence)
    if how == "mean":
        return msum(jnp.abs(a)) / n
    if how == "l2":
        return jnp.sqrt(msum(a * a))
    mean = msum(a) / n  # centred second pass: no cancellation when |mean| >> std
    d = a - mean[:, None, :]
    return msum(d * d) / n


def _capture_fn(sc: ScoreConfig) -> Callable:
    site = MLP_SITES[sc.mlp_site]

    def capture(acts, mask):
        red = {"mlp": seq_reduce(acts[site], mask, sc.seq_agg),
               "o_proj_in": seq_reduce(acts["o_proj_in"], mask, sc.seq_agg),
               "attn_norm": seq_reduce(acts["attn_norm"], mask, sc.seq_agg),
               "mlp_norm": seq_reduce(acts["mlp_norm"], mask, sc.seq_agg)}
        x, y = acts["layer_in"].astype(jnp.float32), acts["layer_out"].astype(jnp.float32)
        cos = (x * y).sum(-1) / jnp.maximum(jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(y, axis=-1), 1e-12)
        return red, ((1.0 - cos) * mask).sum()

    return capture


def init_state(cfg: LlamaConfig) -> dict[str, Any]:
    L, H, F = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
    Q = cfg.num_attention_heads * cfg.head_dim
    widths = {"mlp": F, "o_proj_in": Q, "attn_norm": H, "mlp_norm": H}
    z = lambda c: jnp.zeros((L, c), jnp.float32)  # noqa: E731
    return {"mean": {k: z(c) for k, c in widths.items()}, "m2": {k: z(c) for k, c in widths.items()},
            "n": jnp.zeros((), jnp.float32), "bi": jnp.zeros((L,), jnp.float32), "tokens": jnp.zeros((), jnp.float32)}


def merge_moments(n, mean, m2, x, w):
    """Chan's parallel update of (count, mean, M2) with the rows of x [..., B, C] weighted 0/1 by w [B].

    Centred throughout: the batch's own M2 is taken about its own mean, then combined by the shift of
    the means, so fp32 keeps the precision of the spread even when |mean| >> std."""
    nb = w.sum()
    wx = w[:, None]
    mean_b = (x * wx).sum(-2) / jnp.maximum(nb, 1.0)
    d = (x - mean_b[..., None, :]) * wx
    m2_b = (d * d).sum(-2)
    n_new = n + nb
    delta = mean_b - mean
    frac = nb / jnp.maximum(n_new, 1.0)
    return n_new, mean + delta * frac, m2 + m2_b + delta * delta * n * frac


def make_step(cfg: LlamaConfig, sc: ScoreConfig, compute_dtype=None, attention: str = "xla") -> Callable:
    """step(params, state, ids, mask) -> state: one forward, statistics merged on device."""
    capture = _capture_fn(sc)

    def step(params, state, ids, mask):
        _, (red, bi) = forward(params, cfg, ids, attention_mask=mask, capture=capture, return_hidden=True,
                               compute_dtype=compute_dtype, attention=attention)
        real = (mask.sum(1) > 0).astype(jnp.float32)  # rows that are all padding count for nothing
        mean, m2 = {}, {}
        for k, v in red.items():  # v [L, B, C]
            n, mean[k], m2[k] = merge_moments(state["n"], state["mean"][k], state["m2"][k], v, real)
        return {"mean": mean, "m2": m2, "n": n, "bi": state["bi"] + bi, "tokens": state["tokens"] + mask.sum()}

    return step


def batch_aggregate(n, mean, m2, how: str):
    """(count, mean, M2) of the per-sample values -> the `batch_agg` statistic."""
    if how == "l2":
        return np.sqrt(m2 + n * mean * mean)
    return mean if how == "mean" else m2 / n


def finalize(state: dict[str, Any], cfg: LlamaConfig, sc: ScoreConfig) -> dict[str, np.ndarray]:
    """Accumulated statistics -> per-axis scores (spec section 2 table)."""
    st = jax.tree.map(lambda x: to_host(x).astype(np.float64), state)  # sharded statistics: gathered
    agg = {k: batch_aggregate(st["n"], st["mean"][k], st["m2"][k], sc.batch_agg) for k in st["mean"]}
    L, d = cfg.num_hidden_layers, cfg.head_dim
    heads = np.sqrt((agg["o_proj_in"].reshape(L, cfg.num_attention_heads, d) ** 2).sum(-1))
    kv = np.sqrt((heads.reshape(L, cfg.num_key_value_heads, cfg.num_kv_groups) ** 2).sum(-1))
    scores = {"mlp": agg["mlp"], "heads": heads, "kv_groups": kv,
              "hidden": (agg["attn_norm"] + agg["mlp_norm"]).sum(0),
              "layer_bi": st["bi"] / st["tokens"]}
    return {k: v.astype(np.float32) for k, v in scores.items()}


def compute_scores(params, cfg: LlamaConfig, samples: np.ndarray, *, batch_size: int = 8,
                   score_config: ScoreConfig = ScoreConfig(), mesh=None, compute_dtype=None,
                   stream=None, metrics_path=None, attention: str = "xla") -> dict[str, np.ndarray]:
    """Scores for every axis from `samples` [N, S] (packed token rows), sharded over `mesh` if given (whose data x
    fsdp devices must divide `batch_size`: `sharding.check_batch_rows`)."""
    check_batch_rows(f"batch_size={batch_size}", batch_size, batch_rows(mesh))
    check_token_ids(samples, cfg.vocab_size, "the calibration rows")
    step = jax.jit(make_step(cfg, score_config, compute_dtype, attention), donate_argnums=1)
    n_batches = -(-len(samples) // batch_size)
    prog = Progress(n_batches, "score", metrics_path=metrics_path, stream=stream)
    with mesh_context(mesh):
        state = init_state(cfg)
        for ids, mask in batches(samples, batch_size):
            state = step(params, state, put(ids, mesh), put(mask, mesh))
            jax.block_until_ready(state["n"])
            prog.update(tokens=int(mask.sum()))
    prog.close()
    return finalize(state, cfg, score_config)


# ---------------------------------------------------------------------------- depth metrics by LM loss
def layer_skip_losses(params, cfg: LlamaConfig, samples: np.ndarray, **kw) -> np.ndarray:
    """[L]: LM loss with layer l skipped (higher = more important)."""
    L = cfg.num_hidden_layers
    return gated_losses(params, cfg, samples, 1.0 - np.eye(L, dtype=np.float32), **kw)


def window_gates(num_layers: int, k: int) -> np.ndarray:
    """[L-k+1, L]: row i skips the contiguous layers i .. i+k-1."""
    if not 0 < k < num_layers:
        raise ValueError(f"window of {k} layers: must be between 1 and {num_layers - 1}")
    g = np.ones((num_layers - k + 1, num_layers), np.float32)
    for i in range(num_layers - k + 1):
        g[i, i:i + k] = 0.0
    return g


# ---------------------------------------------------------------------------- files
_NOT_SHAPE = ("dtype", "torch_dtype", "bos_token_id", "eos_token_id", "pad_token_id", "use_cache",
              "initializer_range", "pretraining_tp")  # config.json keys that do not change what a model computes


def model_fingerprint(cfg: LlamaConfig, params=None) -> dict[str, str]:
    """{"model_config_sha256"[, "model_weights_sha256"]}: the config (without dtype and token ids) and, with
    `params`, a corner of every weight (all layers, the first 8 indices of every other axis), sliced on
    device, fetched (a few KB) and rounded to bfloat16, so the storage / load dtype does not matter."""
    import ml_dtypes
    canon = {k: v for k, v in cfg.to_hf_dict().items() if k not in _NOT_SHAPE}
    out = {"model_config_sha256": hashlib.sha256(json.dumps(canon, sort_keys=True).encode()).hexdigest()}
    if params is not None:
        h = hashlib.sha256()
        for path, x in sorted(jax.tree_util.tree_flatten_with_path(params)[0], key=lambda e: jax.tree_util.keystr(e[0])):
            name = jax.tree_util.keystr(path)
            corner = tuple(slice(None) if name.startswith("['layers']") and a == 0 else slice(0, 8) for a in range(x.ndim))
            v = to_host(x[corner]).astype(np.float32).astype(ml_dtypes.bfloat16)  # whole on every host
            h.update(f"{name}{tuple(x.shape)}".encode())
            h.update(v.view(np.uint16).tobytes())
        out["model_weights_sha256"] = h.hexdigest()
    return out


def check_finite_scores(scores: dict[str, np.ndarray], path: str | Path) -> None:
    """Refuse scores holding NaN or inf, naming the arrays and the likely cause."""
    bad = {k: int((~np.isfinite(np.asarray(v, np.float32))).sum()) for k, v in scores.items()}
    bad = {k: n for k, n in bad.items() if n}
    if bad:
        arrays = ", ".join(f"{k} ({n} of {np.size(scores[k])})" for k, n in bad.items())
        raise ScoresError(f"{path} not written: the scores {arrays} are NaN or inf; the model's activations are not "
                          f"finite: check its weights for NaN/inf, score in float32 (compute_dtype), and use the "
                          f"tokenizer saved with the model")


def save_scores(path: str | Path, scores: dict[str, np.ndarray], metadata: dict[str, Any], *,
                cfg: LlamaConfig | None = None, params=None) -> Path:
    """One scores.safetensors (one fp32 array per score key, e.g. mlp, heads, layer_window) with string metadata.

    Non-finite scores are refused (ScoresError, nothing written). `cfg` (and `params`) of the scored model
    add its `model_fingerprint` to the metadata, which `check_scores_match` compares before pruning."""
    path = storage.path(path)
    check_finite_scores(scores, path)
    if cfg is not None:
        metadata = {**metadata, **model_fingerprint(cfg, params)}
    entries = [(k, v.shape, np.dtype(np.float32), (lambda v=v: np.asarray(v, np.float32))) for k, v in scores.items()]

    def write() -> None:  # process 0 (the scores are whole on every host); its failure stops every process
        with atomic_file(path) as tmp:
            write_file(tmp, entries, {"format": "minitron-scores", **{k: str(v) for k, v in metadata.items()}})

    multihost.decided(write, "scores")
    return path


def check_scores_match(meta: dict[str, str], cfg: LlamaConfig, params=None, force: bool = False, *,
                       model: str = "this model", force_hint: str = "force=True") -> None:
    """Refuse (ScoresError) scores whose recorded fingerprint is not that of the model `cfg` (and `params`,
    when given: call once with the config before loading weights, once with the weights after). `force`
    turns a mismatch into a warning; a scores file without a fingerprint (older) gets a warning."""
    source = meta.get("source_model") or "an unnamed model"
    if "model_config_sha256" not in meta:
        warn(f"the scores (of {source}) record no model fingerprint (an older scores file), so they cannot be "
             f"checked against {model}; re-score it to be sure")
        return
    mine = model_fingerprint(cfg, params)
    differs = [k for k in ("model_config_sha256", "model_weights_sha256") if k in mine and k in meta and meta[k] != mine[k]]
    if not differs:
        return
    what = "config" if "model_config_sha256" in differs else "weights"
    detail = ""
    if what == "config" and "config" in meta:
        theirs = json.loads(meta["config"])
        keys = [k for k, v in cfg.to_hf_dict().items() if k not in _NOT_SHAPE and theirs.get(k) != v]
        detail = " (" + ", ".join(f"{k} {theirs.get(k)} vs {cfg.to_hf_dict()[k]}" for k in keys[:4]) + ")" if keys else ""
    msg = (f"the scores were computed on {source}, whose {what} differ{'s' * (what == 'config')} from those of "
           f"{model}{detail}; re-score "
           f"{model}, or pass {force_hint} to prune with these scores anyway")
    if not force:
        raise ScoresError(msg)
    warn(msg.split("; re-score")[0] + f"; used anyway ({force_hint})")


def load_scores(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    f = SafetensorsFile(path)
    return {n: np.array(f.tensor(n)) for n in f.names()}, dict(f.metadata)


def plot_scores(scores: dict[str, np.ndarray], path: str | Path, title: str = "") -> Path:
    """PNG: per-layer head and neuron maps, layer importance, sorted hidden-channel scores."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(12, 8))
    for a, key, name in ((ax[0, 0], "heads", "query heads"), (ax[0, 1], "mlp", "MLP neurons")):
        im = a.imshow(np.maximum(scores[key], 1e-8), aspect="auto", interpolation="nearest", cmap="viridis",
                      norm=matplotlib.colors.LogNorm())
        a.set(title=f"{name} importance (log scale)", xlabel="index", ylabel="layer")
        fig.colorbar(im, ax=a)
    a = ax[1, 0]
    a.bar(np.arange(len(scores["layer_bi"])), scores["layer_bi"], label="Block Influence")
    a.set(title="layer importance", xlabel="layer", ylabel="BI = mean(1 - cos)")
    if "layer_loss" in scores:
        b = a.twinx()
        b.plot(scores["layer_loss"], "r.-", label="LM loss with layer skipped")
        b.set_ylabel("loss", color="r")
    a = ax[1, 1]
    a.plot(np.sort(scores["hidden"])[::-1])
    a.set(title="hidden channels (sorted)", xlabel="rank", ylabel="score", yscale="log")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_file(path) as tmp:  # the temporary name keeps the .png suffix that savefig reads
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
    return storage.path(path)


def add_depth_scores(scores: dict, params, cfg, rows: np.ndarray, *, batch_size: int, layer_loss_samples: int = 0,
                     window: int = 0, tokenizer=None, task_items=None, mesh=None, compute_dtype=None,
                     metrics_path=None, window_samples: int = 0, attention: str = "xla") -> dict:
    """Add the depth scores that need one forward per candidate (in place; returns `scores`).

    `layer_loss_samples` > 0 adds `layer_loss` [L] (LM loss with each layer skipped, on that many rows).
    `window` = k > 0 adds `layer_window` [L-k+1]: for each contiguous block of k layers, the LM loss
    with the block skipped (on `window_samples` rows if > 0, else `layer_loss_samples`, else up to 32),
    or 1 - acc_norm on `task_items` (multiple-choice) when given."""
    kw = dict(mesh=mesh, compute_dtype=compute_dtype, attention=attention)
    if layer_loss_samples:
        prog = Progress(cfg.num_hidden_layers, "layer-loss", metrics_path=metrics_path)
        scores["layer_loss"] = layer_skip_losses(params, cfg, rows[:layer_loss_samples], batch_size=batch_size,
                                                 progress=prog, **kw)
        prog.close()
    if window:
        gates = window_gates(cfg.num_hidden_layers, window)
        prog = Progress(len(gates), f"window-{window}", metrics_path=metrics_path)
        if task_items:
            res = multiple_choice(params, cfg, tokenizer, task_items, gate_sets=gates, batch_size=batch_size,
                                  progress=prog, **kw)
            scores["layer_window"] = np.asarray([1.0 - r["acc_norm"] for r in res], np.float32)
        else:
            n = window_samples or layer_loss_samples or min(len(rows), 32)
            scores["layer_window"] = gated_losses(params, cfg, rows[:n], gates, batch_size=batch_size, progress=prog,
                                                  **kw)
        prog.close()
    return scores


def calibration_samples(data, tokenizer, samples: int, seq_len: int, seed: int = 0, *, text_field: str = "text",
                        vocab_size: int | None = None, exclude=(), splits=None, split: int = 0):
    """Calibration rows (`spec.DataSpec.calibration_rows`) from text (`data.load_samples`, documents named in
    `exclude` skipped) or from a token store or blend (`store_reader.calibration_rows` over the documents of
    `split`, default training, as `splits` splits them; the store's tokenizer checked against `tokenizer`'s
    directory)."""
    spec = DataSpec.of_splits(data, splits, exclude=exclude, seed=seed, text_field=text_field)
    return spec.calibration_rows(tokenizer, samples, seq_len, seed, split=split, vocab_size=vocab_size)


def score_model(model, tokenizer, data: str | Path, out_dir: str | Path, *, samples: int = 1024, seq_len: int = 4096,
                batch_size: int = 8, seed: int = 0, score_config: ScoreConfig = ScoreConfig(), mesh=None,
                layer_loss_samples: int = 0, window: int = 0, task_items=None, text_field: str = "text",
                exclude: str | list[str] = (), window_samples: int = 0, attention: str = "xla", splits=None) -> Path:
    """Calibration data -> `out_dir/scores.safetensors` (+ scores.png, metrics.jsonl); returns the file.
    `minitron score` and the score stage of `minitron run` both call it.

    `layer_loss_samples` > 0 adds `layer_loss` [L] (LM loss with each layer skipped, on that many rows).
    `window` = k > 0 adds `layer_window` [L-k+1]: for each contiguous block of k layers, the LM loss
    with the block skipped (on `window_samples` rows, else as `add_depth_scores`), or 1 - acc_norm on
    `task_items` (multiple-choice) when given. `exclude`: document names (as `holdout`) never used for
    calibration; for a token store, `splits` (`store_reader.Splits`) may name the held-out and validation
    documents instead, and calibration reads only training documents. Forward passes are sharded over `mesh`
    with the `attention` implementation; a `batch_size` that the mesh's data x fsdp devices do not divide is
    refused before any data is read."""

    check_batch_rows(f"batch_size={batch_size}", batch_size, batch_rows(mesh))
    out_dir = storage.path(out_dir)
    params, cfg = model.params(), model.config
    exclude = parse_holdout(exclude)
    rows = calibration_samples(data, tokenizer, samples, seq_len, seed, text_field=text_field,
                               vocab_size=cfg.vocab_size, exclude=exclude, splits=splits)  # fails fast
    if not storage.is_url(out_dir):  # object storage has no directories to make
        out_dir.mkdir(parents=True, exist_ok=True)
    # gs://: Progress appends to a local copy of metrics.jsonl and uploads it (objects cannot be appended to)
    kw = dict(mesh=mesh, compute_dtype=model.compute_dtype, metrics_path=out_dir / "metrics.jsonl", attention=attention)
    scores = compute_scores(params, cfg, rows, batch_size=batch_size, score_config=score_config, **kw)
    add_depth_scores(scores, params, cfg, rows, batch_size=batch_size, layer_loss_samples=layer_loss_samples,
                     window=window, tokenizer=tokenizer, task_items=task_items, window_samples=window_samples, **kw)
    meta = {"samples": samples, "seq_len": seq_len, "seed": seed, "batch_agg": score_config.batch_agg,
            "seq_agg": score_config.seq_agg, "mlp_site": score_config.mlp_site, "data": str(data),
            "source_model": model.source or "", "layer_loss_samples": layer_loss_samples,
            "window": window, "window_metric": ("task" if task_items else "loss") if window else "",
            "window_samples": window_samples, "exclude": ",".join(exclude), "config": json.dumps(cfg.to_hf_dict())}
    if splits is not None and (splits.holdout_fraction or splits.validation_fraction):  # names are in "exclude"
        meta["splits"] = json.dumps(dataclasses.asdict(splits))
    path = save_scores(out_dir / "scores.safetensors", scores, meta, cfg=cfg, params=params)
    title = (f"{Path(model.source or 'model').name}: {samples} x {seq_len} tokens, ({score_config.batch_agg}, "
             f"{score_config.seq_agg})")
    multihost.decided(lambda: str(plot_scores(scores, out_dir / "scores.png", title=title)), "scores-plot")
    return path
