"""Paired bootstrap intervals for loss differences between models scored on the same rows.

Each model's loss on a set of rows is sum(nll) / sum(tokens) over the rows (`evaluate.row_losses`). The
difference of two models is resampled by drawing the rows with replacement, the same draw for both models
(paired: the rows' own difficulty cancels), and the interval is the percentile interval of the resampled
differences. A candidate is *separated* from the reference when its whole interval lies above 0.
"""

from __future__ import annotations

import numpy as np


def paired_intervals(nll: np.ndarray, tokens: np.ndarray, ref: int, *, resamples: int = 2000, level: float = 0.95,
                     seed: int = 0) -> np.ndarray:
    """[M, 3] (difference, low, high) of each model's loss minus model `ref`'s, over the rows of `nll` [M, N]
    (per-row NLL sums) and `tokens` [N] (per-row target counts): the difference on all rows and its
    `level` percentile interval over `resamples` paired resamples of the rows (seeded)."""
    nll, tokens = np.asarray(nll, np.float64), np.asarray(tokens, np.float64)
    if nll.ndim != 2 or nll.shape[1] != len(tokens) or len(tokens) == 0:
        raise ValueError(f"paired_intervals: nll {nll.shape} must be [models, rows] with rows = len(tokens) "
                         f"= {len(tokens)} > 0")
    diff = nll - nll[ref]  # [M, N]: the per-row paired differences
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(len(tokens), np.full(len(tokens), 1 / len(tokens)), size=resamples)  # [R, N]
    boot = (counts @ diff.T) / (counts @ tokens)[:, None]  # [R, M]
    a = (1 - level) / 2
    low, high = np.quantile(boot, [a, 1 - a], axis=0)
    return np.stack([diff.sum(1) / tokens.sum(), low, high], axis=1)
