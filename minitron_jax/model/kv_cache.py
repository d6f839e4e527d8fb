"""The key/value cache `model.forward` reads and writes when it is given one (generation: a prefill of the
prompts, then one token per decode step).

Per layer, keys and values of every position written so far, stacked like the parameters: k, v
[L, B, S_max, Hkv, D] (after RoPE, in the compute dtype), carried through the layer scan and updated in place
at slots [index, index + s). `mask` [B, S_max] marks the slots that hold a real token (left padding and
unwritten slots are False), `lengths` [B] counts each row's real tokens (the RoPE position of its next token,
so positions skip left padding as `llama.default_positions` does), and `index` is the next slot to write, the
same for every row (rows are left-padded to one length).

A fresh cache's `index` is the Python int 0: `forward` then knows at trace time that nothing is cached and
attends over the new tokens alone with any implementation (`attention.IMPLEMENTATIONS`); once written, the
index is an array and attention runs over the whole cache with an explicit [B, 1, s, S_max] mask ("xla").
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from minitron_jax.model.config import LlamaConfig
from minitron_jax.model.sharding import constrain, named_sharding

KV_AXES = ("layers", "batch", "seq", "act_heads", "head_dim")  # sharding.RULES names of k and v


class KVCache(NamedTuple):
    k: jax.Array  # [L, B, S_max, Hkv, D]
    v: jax.Array  # [L, B, S_max, Hkv, D]
    mask: jax.Array  # [B, S_max] bool: slot holds a real token
    lengths: jax.Array  # [B] int32: real tokens so far
    index: jax.Array | int  # next slot to write; the Python int 0 when nothing is written

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


def kv_shape(cfg: LlamaConfig, batch: int, max_len: int) -> tuple[int, ...]:
    return (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """An empty cache (under a mesh: k / v split over the batch axes and, where they divide, heads over tensor)."""
    kv = constrain(jnp.zeros(kv_shape(cfg, batch, max_len), dtype), KV_AXES)
    return KVCache(kv, kv, constrain(jnp.zeros((batch, max_len), bool), ("batch", "seq")),
                   constrain(jnp.zeros((batch,), jnp.int32), ("batch",)), 0)


def abstract_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype, mesh) -> KVCache:
    """ShapeDtypeStructs of a written cache with the shardings `init_cache` gives it on `mesh`."""
    def sds(shape, dt, axes):
        return jax.ShapeDtypeStruct(shape, dt, sharding=named_sharding(axes, shape, mesh))
    shape = kv_shape(cfg, batch, max_len)
    kv = sds(shape, jnp.dtype(dtype), KV_AXES)
    return KVCache(kv, kv, sds((batch, max_len), jnp.bool_, ("batch", "seq")), sds((batch,), jnp.int32, ("batch",)),
                   sds((), jnp.int32, ()))


def cache_bytes(cfg: LlamaConfig, batch: int, max_len: int, dtype, shards: int = 1) -> int:
    """k and v: 2 x L x B x S x Hkv x D x itemsize / shards (the devices each holds a 1/shards part of)."""
    return 2 * int(np.prod(kv_shape(cfg, batch, max_len))) * jnp.dtype(dtype).itemsize // shards


def write_positions(cache: KVCache, new_mask: jax.Array) -> jax.Array:
    """RoPE positions [B, s] of new tokens: each row counts on from its real tokens, skipping padding."""
    return jnp.maximum(cache.lengths[:, None] + jnp.cumsum(new_mask.astype(jnp.int32), axis=1) - 1, 0)


def advance(cache: KVCache, new_mask: jax.Array) -> tuple[jax.Array, KVCache]:
    """(the attention mask over the cache [B, 1, s, S_max], the cache's mask / lengths / index after writing s
    new tokens with `new_mask` [B, s]; k and v as they were). A query at slot index + i sees the real slots up
    to its own."""
    s = new_mask.shape[1]
    written = jax.lax.dynamic_update_slice(cache.mask, new_mask.astype(bool), (0, cache.index))
    slots = jnp.arange(cache.max_len)
    causal = slots[None, :] <= cache.index + jnp.arange(s)[:, None]  # [s, S_max]
    mask = written[:, None, None, :] & causal[None, None]
    lengths = cache.lengths + new_mask.astype(jnp.int32).sum(1)
    return mask, cache._replace(mask=written, lengths=lengths, index=jnp.asarray(cache.index + s, jnp.int32))
