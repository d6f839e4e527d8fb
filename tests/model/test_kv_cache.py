"""model/kv_cache.py and `forward(..., cache=)`: a prefill of left-padded rows, then one token per step, gives
the logits of a full forward without a cache at every step (fp32, 1e-5 relative), for every family's flags and
with the prefill on each CPU attention implementation; positions skip left padding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import rel_err

from minitron_jax.model.config import LlamaConfig
from minitron_jax.model.kv_cache import cache_bytes, init_cache
from minitron_jax.model.llama import forward, init_params

CFG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=64)


@pytest.mark.parametrize("family,attention", [("llama", "xla"), ("llama", "chunked"), ("qwen2", "xla"),
                                              ("qwen3", "xla"), ("mistral", "xla")])
def test_cached_decode_equals_full_forward_at_every_step(family, attention):
    cfg = dataclasses.replace(CFG, model_type=family)
    params = init_params(cfg, jax.random.PRNGKey(0))
    if cfg.qkv_bias:  # non-zero biases, so that a wrong position cannot hide
        params["layers"] = {**params["layers"], **{k: 0.1 * jax.random.normal(jax.random.PRNGKey(i), v.shape)
                                                    for i, (k, v) in enumerate(params["layers"].items())
                                                    if k.endswith("_bias")}}
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 128, (3, 20)).astype(np.int32)
    mask = np.ones((3, 20), np.int32)
    mask[1, :6] = mask[2, :11] = 0  # left padding of 6 and 11
    prompt = 12

    @jax.jit
    def prefill(p, ids, mask):
        return forward(p, cfg, ids, attention_mask=mask, cache=init_cache(cfg, 3, 24), attention=attention)

    step = jax.jit(lambda p, c, tok: forward(p, cfg, tok, cache=c))
    logits, cache = prefill(params, ids[:, :prompt], mask[:, :prompt])
    full = forward(params, cfg, ids[:, :prompt], attention_mask=mask[:, :prompt])
    real = mask[:, :prompt] == 1
    assert rel_err(logits, full, real) < 1e-5
    for t in range(prompt, 20):
        logits, cache = step(params, cache, ids[:, t:t + 1])
        full = forward(params, cfg, ids[:, :t + 1], attention_mask=mask[:, :t + 1])[:, -1]
        assert rel_err(logits[:, 0], full) < 1e-5, t
    assert int(cache.index) == 20 and cache.lengths.tolist() == mask.sum(1).tolist()
    assert cache.mask[:, :20].tolist() == mask.astype(bool).tolist() and not cache.mask[:, 20:].any()


def test_positions_skip_left_padding():
    """A left-padded row gives the logits of the same tokens unpadded, step after step."""
    params = init_params(CFG, jax.random.PRNGKey(1))
    ids = np.random.default_rng(1).integers(0, 128, (1, 9)).astype(np.int32)
    padded = np.concatenate([np.zeros((1, 5), np.int32), ids], 1)
    mask = np.concatenate([np.zeros((1, 5), np.int32), np.ones((1, 9), np.int32)], 1)
    a, ca = forward(params, CFG, ids[:, :6], cache=init_cache(CFG, 1, 12))
    b, cb = forward(params, CFG, padded[:, :11], attention_mask=mask[:, :11], cache=init_cache(CFG, 1, 16))
    assert rel_err(b[:, 5:], a) < 1e-5
    for t in range(6, 9):
        (a, ca), (b, cb) = (forward(params, CFG, ids[:, t:t + 1], cache=c) for c in (ca, cb))
        assert rel_err(b, a) < 1e-5


def test_cache_bytes_and_refusals():
    assert cache_bytes(CFG, 4, 32, jnp.bfloat16, shards=8) == 2 * 3 * 4 * 32 * 2 * 16 * 2 // 8
    cache = init_cache(CFG, 1, 8)
    assert cache.k.shape == (3, 1, 8, 2, 16) and cache.index == 0
    with pytest.raises(ValueError, match="neither capture nor segment ids"):
        forward(init_params(CFG, jax.random.PRNGKey(0)), CFG, jnp.zeros((1, 4), jnp.int32), cache=cache,
                segment_ids=jnp.zeros((1, 4), jnp.int32))
    windowed = dataclasses.replace(CFG, model_type="mistral", sliding_window=8)
    with pytest.raises(Exception, match="sliding window of 8"):
        forward(init_params(windowed, jax.random.PRNGKey(0)), windowed, jnp.zeros((1, 4), jnp.int32),
                cache=init_cache(windowed, 1, 16))
