"""eval/sampling.py: temperature, top-k and top-p keep the tokens and give the probabilities a NumPy
re-derivation of transformers' rules gives; greedy is argmax; a seeded sample is reproducible and follows the
filtered distribution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minitron_jax.core.errors import DataError
from minitron_jax.eval.sampling import Sampling, filter_logits, next_token


def numpy_probs(logits, temperature, top_k, top_p):
    """transformers' warpers in NumPy: temperature, then top-k (ties kept), then top-p (sorted ascending, drop
    the tokens whose cumulative probability is <= 1 - p, keep the most probable)."""
    x = logits.astype(np.float64) / (temperature or 1.0)
    if top_k:
        kth = np.sort(x)[-top_k]
        x = np.where(x < kth, -np.inf, x)
    if top_p < 1:
        order = np.argsort(x, kind="stable")
        p = np.exp(x[order] - x.max())
        p /= p.sum()
        drop = np.cumsum(p) <= 1 - top_p
        drop[-1] = False
        x[order[drop]] = -np.inf
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 10, 1.0), (1.0, 0, 0.8), (1.3, 25, 0.6),
                                                     (0.5, 1, 1.0), (1.0, 0, 0.01)])
def test_kept_set_and_probabilities_equal_numpy(temperature, top_k, top_p):
    logits = np.random.default_rng(0).normal(0, 3, (4, 200)).astype(np.float32)
    s = Sampling(temperature, top_k, top_p)
    got = np.asarray(jax.nn.softmax(filter_logits(jnp.asarray(logits), s), axis=-1), np.float64)
    for r in range(4):
        want = numpy_probs(logits[r], temperature, top_k, top_p)
        assert ((got[r] > 0) == (want > 0)).all()
        np.testing.assert_allclose(got[r], want, rtol=1e-5, atol=1e-7)
    if top_k == 1 or top_p == 0.01:
        assert ((got > 0).sum(-1) == 1).all()


def test_greedy_is_argmax_and_samples_are_seeded():
    logits = jnp.asarray(np.random.default_rng(1).normal(0, 2, (3, 50)), jnp.float32)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    assert next_token(logits, keys, Sampling()).tolist() == np.argmax(logits, -1).tolist()
    s = Sampling(temperature=1.0, top_k=5)
    a, b = next_token(logits, keys, s), next_token(logits, keys, s)
    assert a.tolist() == b.tolist()
    top5 = np.argsort(-np.asarray(logits), -1)[:, :5]
    assert all(a[r] in top5[r] for r in range(3))
    draws = np.stack([next_token(logits, jax.random.split(jax.random.PRNGKey(i), 3), s) for i in range(400)])
    want = numpy_probs(np.asarray(logits[0]), 1.0, 5, 1.0)
    freq = np.bincount(draws[:, 0], minlength=50) / 400
    assert np.abs(freq - want).max() < 0.08


@pytest.mark.parametrize("kw,match", [(dict(temperature=-1), "temperature"), (dict(top_k=-2), "top-k"),
                                      (dict(top_p=0.0), "top-p"), (dict(top_p=1.5), "top-p")])
def test_bad_settings_are_refused(kw, match):
    with pytest.raises(DataError, match=match):
        Sampling(**kw)
