"""Llama-3.1 (and Mistral, Qwen2, Qwen3: `family.py`, flags read from the config) as a pure function of a parameter dict, in Hugging Face's tensor layout, with layers
stacked on a leading axis.

One definition serves scoring, pruning, distillation and export:
- parameters are named and shaped as in HF (`q_proj` is [heads * head_dim, hidden]) with the layer
  index as a leading array axis, so import / export is a name map and pruning is array slicing;
- `forward` is a pure function of a plain parameter dict: every jitted step (score, train, eval)
  calls it directly with explicit shardings (design: functional jit). `Llama` is only a convenience
  holder for the Python API (`model(input_ids)`, `model.params()`); it subclasses `nnx.Module` so
  `nnx.state(model)` works, but nothing in the package traces through NNX;
- `capture` hands every layer's activations to a reduction *inside* the layer loop, so importance
  statistics accumulate without all layers' activations existing at once (off by default, free);
- `layer_gates` scales each layer's residual update (0 skips the layer) without recompiling.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minitron_jax.model.attention import attend, attention_mask_4d
from minitron_jax.model.attention import resolve as resolve_attention
from minitron_jax.model.config import LlamaConfig
from minitron_jax.model.kv_cache import KV_AXES, KVCache, advance, write_positions
from minitron_jax.model.sharding import constrain

LAYER_PARAMS = ("input_layernorm", "q_proj", "k_proj", "v_proj", "o_proj",
                "post_attention_layernorm", "gate_proj", "up_proj", "down_proj")
QKV_BIASES = ("q_bias", "k_bias", "v_bias")  # qwen2 (`family.py`)
QK_NORMS = ("q_norm", "k_norm")  # qwen3
CAPTURE_SITES = ("layer_in", "attn_norm", "o_proj_in", "mlp_norm", "mlp_pre", "down_proj_in", "layer_out")
_UNROLL_LAYERS = contextvars.ContextVar("minitron_unroll_layers", default=False)


@contextlib.contextmanager
def unrolled_layers():
    """Trace `forward` with its layer loop unrolled (same math): XLA's cost analysis counts a loop body
    once, so `aot.xla_step_flops` counts FLOPs on unrolled programs."""
    token = _UNROLL_LAYERS.set(True)
    try:
        yield
    finally:
        _UNROLL_LAYERS.reset(token)


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class ParamSpec(NamedTuple):
    """One parameter: its shape, the logical name of each axis (`sharding.RULES`) and how
    transformers initialises it: "normal" (N(0, 0.02)), "ones" or "zeros"."""
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    init: str = "normal"


def is_param_spec(x) -> bool:
    """`is_leaf` for trees of `ParamSpec` (a NamedTuple, which JAX would otherwise flatten)."""
    return isinstance(x, ParamSpec)


def param_specs(cfg: LlamaConfig) -> dict[str, Any]:
    """{name: ParamSpec}; layer parameters nest under "layers" with a leading [L] axis."""
    L, H, F, D = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    Q, K = cfg.num_attention_heads * D, cfg.num_key_value_heads * D
    S = ParamSpec
    layers = {
        "input_layernorm": S((L, H), ("layers", "norm"), "ones"),
        "q_proj": S((L, Q, H), ("layers", "q_heads", "embed")),
        "k_proj": S((L, K, H), ("layers", "kv_heads", "embed")),
        "v_proj": S((L, K, H), ("layers", "kv_heads", "embed")),
        "o_proj": S((L, H, Q), ("layers", "embed", "q_heads")),
        "post_attention_layernorm": S((L, H), ("layers", "norm"), "ones"),
        "gate_proj": S((L, F, H), ("layers", "mlp", "embed")),
        "up_proj": S((L, F, H), ("layers", "mlp", "embed")),
        "down_proj": S((L, H, F), ("layers", "embed", "mlp")),
    }
    if cfg.qkv_bias:  # sliced with their heads
        layers.update(q_bias=S((L, Q), ("layers", "q_heads"), "zeros"), k_bias=S((L, K), ("layers", "kv_heads"), "zeros"),
                      v_bias=S((L, K), ("layers", "kv_heads"), "zeros"))
    if cfg.qk_norm:  # over head_dim: kept whole by every pruning axis
        layers.update(q_norm=S((L, D), ("layers", "head_dim"), "ones"), k_norm=S((L, D), ("layers", "head_dim"), "ones"))
    specs: dict[str, Any] = {"embed_tokens": S((cfg.vocab_size, H), ("vocab", "embed")),
                             "layers": layers, "norm": S((H,), ("norm",), "ones")}
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = S((cfg.vocab_size, H), ("vocab", "embed"))
    return specs


def init_params(cfg: LlamaConfig, key: jax.Array, dtype=jnp.float32) -> dict[str, Any]:
    """Random init as transformers does it: normal(0, 0.02) for matrices, ones for norms."""
    leaves, treedef = jax.tree.flatten(param_specs(cfg), is_leaf=is_param_spec)
    keys = jax.random.split(key, len(leaves))
    init = {"ones": lambda spec, k: jnp.ones(spec.shape, dtype), "zeros": lambda spec, k: jnp.zeros(spec.shape, dtype),
            "normal": lambda spec, k: (0.02 * jax.random.normal(k, spec.shape, jnp.float32)).astype(dtype)}
    return jax.tree.unflatten(treedef, [init[spec.init](spec, k) for spec, k in zip(leaves, keys)])


# ---------------------------------------------------------------------------- building blocks
def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """Inverse frequencies exactly as transformers computes them (float32), llama3 scaling included."""
    dim = cfg.head_dim
    inv = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))).astype(np.float32)
    if cfg.rope_type == "llama3":
        s = cfg.rope_scaling_dict
        factor, lo, hi, old = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old / lo, old / hi
        wavelen = (2 * math.pi / inv).astype(np.float32)
        scaled = np.where(wavelen > low_wavelen, inv / np.float32(factor), inv).astype(np.float32)
        smooth = ((old / wavelen - lo) / (hi - lo)).astype(np.float32)
        smoothed = ((1 - smooth) * scaled / np.float32(factor) + smooth * scaled).astype(np.float32)
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(dtype) * x32.astype(dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """x @ w.T with w in HF layout [out, in]."""
    return _linear(x, w.astype(x.dtype))


@jax.custom_vjp
def _linear(x, w):
    return jnp.einsum("...i,oi->...o", x, w)


def _linear_fwd(x, w):
    return _linear(x, w), (x, w)


def _linear_bwd(res, g):
    """The weight gradient contracts both operands over tokens, so one of them is transposed (XLA:CPU
    copies it): transpose the narrower of x [.., in] and g [.., out], not always g."""
    x, w = res
    dx = jnp.einsum("...o,oi->...i", g, w)
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    if x.shape[-1] < g.shape[-1]:
        dw = jnp.einsum("ti,to->io", x2, g2).T
    else:
        dw = jnp.einsum("to,ti->oi", g2, x2)
    return dx, dw


_linear.defvjp(_linear_fwd, _linear_bwd)


def default_positions(attention_mask, segment_ids, shape) -> jax.Array:
    """Positions restart per packed document and skip left padding; plain arange otherwise."""
    b, s = shape
    if segment_ids is not None:
        idx = jnp.broadcast_to(jnp.arange(s), (b, s))
        starts = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
        start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
        return idx - start_idx
    if attention_mask is not None:
        return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)
    return jnp.broadcast_to(jnp.arange(s), (b, s))




# ---------------------------------------------------------------------------- forward
def forward(params: dict[str, Any], cfg: LlamaConfig, input_ids: jax.Array, *,
            attention_mask: jax.Array | None = None, segment_ids: jax.Array | None = None,
            positions: jax.Array | None = None, compute_dtype=None, remat: str = "none",
            capture: Callable[[dict[str, jax.Array], jax.Array], Any] | None = None,
            layer_gates: jax.Array | None = None, return_hidden: bool = False, attention: str = "xla",
            cache: KVCache | None = None):
    """Logits [B, S, V] (or final-norm hidden states with `return_hidden`).

    `attention` picks the implementation (`attention.IMPLEMENTATIONS`): "xla" materialises the S x S
    mask and probabilities; "chunked" / "splash" / "cudnn" do not; "auto" picks by platform.

    With `capture`, returns `(out, stats)` where `stats` stacks, over layers, whatever
    `capture(acts, token_mask)` returns for each layer; `acts` maps each of `CAPTURE_SITES` to that
    layer's activation [B, S, C] and `token_mask` is [B, S] (1 for real tokens).

    With `cache` (`kv_cache.KVCache`, generation), the tokens are written into it after those it holds
    (positions count on from each row's real tokens) and `(out, new_cache)` is returned. A fresh cache
    (`kv_cache.init_cache`) attends over the new tokens with `attention`; a written one over the whole cache
    with an explicit mask ("xla").
    """
    b, s = input_ids.shape
    cdt = jnp.dtype(compute_dtype or params["embed_tokens"].dtype)
    cached = None  # (cache mask [B, 1, s, S_max], the cache after this call but for k / v)
    if cache is not None:
        if capture is not None or segment_ids is not None:
            raise ValueError("forward: a cache takes neither capture nor segment ids")
        cfg.check_seq_len(cache.max_len, "the cache")
        new_mask = jnp.ones((b, s), jnp.int32) if attention_mask is None else attention_mask
        positions = write_positions(cache, new_mask) if positions is None else positions
        cached = advance(cache, new_mask)
    cfg.check_seq_len(s)
    if positions is None:
        positions = default_positions(attention_mask, segment_ids, (b, s))
    token_mask = (jnp.ones((b, s), jnp.float32) if attention_mask is None
                  else attention_mask.astype(jnp.float32))
    fresh = cache is None or (isinstance(cache.index, int) and cache.index == 0)  # nothing cached: attend over s
    impl = resolve_attention(attention, s, segment_ids) if fresh else "xla"
    mask = None
    if impl == "xla":  # built once
        mask = attention_mask_4d(attention_mask, segment_ids, b, s) if fresh else cached[0]

    inv_freq = jnp.asarray(rope_inv_freq(cfg))
    freqs = positions[..., None].astype(jnp.float32) * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.cos(emb).astype(cdt)[:, :, None, :], jnp.sin(emb).astype(cdt)[:, :, None, :]

    h = jnp.take(params["embed_tokens"], input_ids, axis=0).astype(cdt)
    h = constrain(h, ("batch", "seq", "act_embed"))
    nq, nk, d, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps

    def layer(h, lp, gate, kv):
        x = rms_norm(h, lp["input_layernorm"], eps)
        q, k, v = (linear(x, lp[f"{n}_proj"]) for n in "qkv")
        if cfg.qkv_bias:
            q, k, v = (y + lp[f"{n}_bias"].astype(cdt) for y, n in zip((q, k, v), "qkv"))
        q, k, v = q.reshape(b, s, nq, d), k.reshape(b, s, nk, d), v.reshape(b, s, nk, d)
        if cfg.qk_norm:
            q, k = rms_norm(q, lp["q_norm"], eps), rms_norm(k, lp["k_norm"], eps)
        q = constrain(q * cos + rotate_half(q) * sin, ("batch", "seq", "act_heads", "head_dim"))
        k = constrain(k * cos + rotate_half(k) * sin, ("batch", "seq", "act_heads", "head_dim"))
        if kv is not None:  # write the new keys / values into layer i's slots of the whole cache, in place
            *kv, i = kv
            kv = tuple(jax.lax.dynamic_update_slice(c, x_.astype(c.dtype)[None], (i, 0, cache.index, 0, 0))
                       for c, x_ in zip(kv, (k, v)))
            if not fresh:  # attend over every slot of layer i
                k, v = (jax.lax.dynamic_index_in_dim(c, i, 0, keepdims=False) for c in kv)
        a = attend(q, k, v, attention_mask=attention_mask, segment_ids=segment_ids, impl=impl, scale=d ** -0.5,
                   mask=mask)
        a = a.reshape(b, s, nq * d)
        h_mid = h + linear(a, lp["o_proj"])
        x2 = rms_norm(h_mid, lp["post_attention_layernorm"], eps)
        g = linear(x2, lp["gate_proj"])
        u = linear(x2, lp["up_proj"])
        m = constrain(jax.nn.silu(g) * u, ("batch", "seq", "act_mlp"))
        out = h_mid + linear(m, lp["down_proj"])
        if gate is not None:
            out = h + gate.astype(cdt) * (out - h)
        out = constrain(out, ("batch", "seq", "act_embed"))
        stats = None
        if capture is not None:
            stats = capture(dict(zip(CAPTURE_SITES, (h, x, a, x2, g, m, out))), token_mask)
        return out, stats, kv

    policy = REMAT_POLICIES[remat]
    if remat != "none":
        layer = jax.checkpoint(layer, policy=policy)

    def body(carry, xs):
        if cache is None:
            out, stats, _ = layer(carry, *xs, None)
            return out, stats
        (h, ck, cv), (lp, gate, i) = carry, xs  # the whole cache is carried through the layers
        out, stats, (ck, cv) = layer(h, lp, gate, (ck, cv, i))
        return (out, constrain(ck, KV_AXES), constrain(cv, KV_AXES)), stats

    xs = (params["layers"], layer_gates)
    if cache is None:
        h, stats = jax.lax.scan(body, h, xs, unroll=_UNROLL_LAYERS.get())
    else:
        (h, ck, cv), stats = jax.lax.scan(body, (h, cache.k, cache.v), (*xs, jnp.arange(cfg.num_hidden_layers)),
                                          unroll=_UNROLL_LAYERS.get())
        new_cache = cached[1]._replace(k=ck, v=cv)
    h = rms_norm(h, params["norm"], eps)
    if return_hidden:
        out = h
    else:
        head = params["embed_tokens"] if cfg.tie_word_embeddings else params["lm_head"]
        out = constrain(linear(h, head), ("batch", "seq", "act_vocab"))
    if cache is not None:
        return out, new_cache
    return (out, stats) if capture is not None else out


def lm_head_weight(params: dict[str, Any], cfg: LlamaConfig) -> jax.Array:
    return params["embed_tokens"] if cfg.tie_word_embeddings else params["lm_head"]


# ---------------------------------------------------------------------------- Python-API holder
class Llama(nnx.Module):
    """Llama-3.1 causal LM. `Llama(cfg, rngs=nnx.Rngs(0))` initialises; `Llama(cfg, params=...)`
    wraps existing arrays (import, pruning). Calling it on `input_ids` returns logits."""

    def __init__(self, config: LlamaConfig, *, params: dict[str, Any] | None = None,
                 rngs: nnx.Rngs | None = None, dtype=None, compute_dtype=None, remat: str = "none"):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat={remat!r}: choose one of {sorted(REMAT_POLICIES)}")
        self.config = config
        self.compute_dtype = None if compute_dtype is None else jnp.dtype(compute_dtype).name
        self.remat = remat
        self.source: str | None = None  # HF directory this model was loaded from (tokenizer files)
        if params is None:
            key = (rngs or nnx.Rngs(0)).params()
            params = init_params(config, key, jnp.dtype(dtype or config.dtype))
        self.embed_tokens = nnx.Param(params["embed_tokens"])
        self.layers = nnx.Dict({k: nnx.Param(params["layers"][k]) for k in param_specs(config)["layers"]})
        self.norm = nnx.Param(params["norm"])
        if not config.tie_word_embeddings:
            self.lm_head = nnx.Param(params["lm_head"])

    def params(self) -> dict[str, Any]:
        """The parameters as a plain dict of arrays in the layout of `param_specs`."""
        out = {"embed_tokens": self.embed_tokens[...],
               "layers": {k: self.layers[k][...] for k in param_specs(self.config)["layers"]},
               "norm": self.norm[...]}
        if not self.config.tie_word_embeddings:
            out["lm_head"] = self.lm_head[...]
        return out

    def __call__(self, input_ids, **kwargs):
        kwargs.setdefault("compute_dtype", self.compute_dtype)
        kwargs.setdefault("remat", self.remat)
        return forward(self.params(), self.config, input_ids, **kwargs)
