"""Paired bootstrap intervals of loss differences over rows (eval/bootstrap.py), against exact cases and the
normal approximation (central limit theorem) on many rows."""

import numpy as np
import pytest

from minitron_jax.eval.bootstrap import paired_intervals


def test_a_shift_on_every_row_gives_a_point_interval():
    """Model 1 = model 0 + 0.03 nats on every target of every row: the difference is 0.03 in every resample."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(100, 256, 50)
    base = rng.uniform(3, 5, 50) * tokens
    iv = paired_intervals(np.stack([base, base + 0.03 * tokens, base]), tokens, 0)
    np.testing.assert_allclose(iv[1], [0.03, 0.03, 0.03], rtol=1e-12)
    np.testing.assert_allclose(iv[0], 0, atol=1e-12)
    np.testing.assert_allclose(iv[2], 0, atol=1e-12)


def test_pairing_cancels_row_difficulty():
    """Rows of very different difficulty shared by both models: the paired interval is set by the per-row
    differences (small), not by the spread of the rows' losses (large)."""
    rng = np.random.default_rng(1)
    tokens = np.full(40, 255)
    hard = rng.uniform(2, 8, 40) * tokens  # the rows' own losses spread over 6 nats
    other = hard + (0.01 + 0.002 * rng.standard_normal(40)) * tokens
    d, lo, hi = paired_intervals(np.stack([hard, other]), tokens, 0)[1]
    assert 0 < lo < d < hi and hi - lo < 0.003


def test_interval_agrees_with_the_normal_approximation():
    """Equal token counts and 2,000 rows of iid differences: the 95% interval is mean +- 1.96 sd / sqrt(N) to
    within 5% of its half-width, and its centre is the mean difference."""
    rng = np.random.default_rng(2)
    n = 2000
    tokens = np.full(n, 255)
    a = rng.uniform(3, 5, n) * tokens
    per_token = 0.004 + 0.05 * rng.standard_normal(n)
    b = a + per_token * tokens
    d, lo, hi = paired_intervals(np.stack([a, b]), tokens, 0, resamples=4000)[1]
    half = 1.959964 * per_token.std(ddof=1) / np.sqrt(n)
    assert d == pytest.approx(per_token.mean(), rel=1e-9)
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.05)
    assert (lo + hi) / 2 == pytest.approx(d, abs=0.1 * half)


def test_seeded_and_shape_checked():
    tokens = np.full(5, 10)
    nll = np.arange(10.0).reshape(2, 5)
    assert np.array_equal(paired_intervals(nll, tokens, 0, seed=3), paired_intervals(nll, tokens, 0, seed=3))
    with pytest.raises(ValueError, match="rows"):
        paired_intervals(nll, np.full(4, 10), 0)
