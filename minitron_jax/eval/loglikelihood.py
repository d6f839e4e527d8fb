"""Log-likelihoods of continuations given contexts, as token ids: what lm-evaluation-harness asks of a model
(`eval/lm_eval_model.py`), computed with the one model function and batched at fixed shapes.

A request is (context ids, continuation ids), both non-empty. As lm-eval's `hf` backend does, the model reads
context + continuation cut from the left to max_length + 1 tokens, less its last token; the answer is the sum of
log p(token | prefix) over the continuation's tokens and whether each of them was the most likely one
(`is_greedy`). Requests are scored longest first, `batch_size` rows a batch (the last batch filled up with copies
of its last row), right-padded to a bucketed width (`bucket_width`), so a run compiles once per width it meets, not
once per request. Rows are split over the mesh's batch axes (data x fsdp). Logits are chunked over the sequence
(`losses.token_logprob_greedy`): no [B, S, V] array.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from minitron_jax.core.errors import DataError, EvalError
from minitron_jax.data.text import check_token_ids
from minitron_jax.eval.evaluate import CHUNK, NOT_FINITE_FIX, mesh_context
from minitron_jax.model.config import LlamaConfig
from minitron_jax.model.llama import forward, lm_head_weight
from minitron_jax.model.losses import token_logprob_greedy
from minitron_jax.model.sharding import put, to_host


def bucket_width(n: int, max_length: int) -> int:
    """The padded width of a batch whose longest row has `n` tokens, never over `max_length`: 32, 64, 96, 128, 192,
    256, 384, 512, 768, 1024, 1536, 2048, ... (a multiple of a quarter of the next power of two, at least 32), so at
    most a third of a row is padding and a run compiles for few widths."""
    p = 32
    while p < n:
        p *= 2
    step = max(32, p // 4)
    return min(-(-n // step) * step, max_length)


def model_row(context: Sequence[int], continuation: Sequence[int], max_length: int) -> tuple[list[int], int]:
    """(the tokens the model reads plus the last one, how many of the last ones are scored): lm-eval's
    `(context + continuation)[-(max_length + 1):]`, of which the model reads all but the last token."""
    if not context or not continuation:
        raise DataError(f"a log-likelihood request has {len(context)} context and {len(continuation)} continuation "
                        "tokens; both need at least one (an empty context is given the prefix token before this)")
    if len(continuation) > max_length:
        raise DataError(f"a continuation of {len(continuation)} tokens is longer than max_length={max_length}; "
                        "raise --max-length (at most the model's context) or shorten the task's targets")
    return (list(context) + list(continuation))[-(max_length + 1):], len(continuation)


class TokenScorer:
    """`__call__(params, pairs)` -> [(log p(continuation | context), is_greedy)] for (context, continuation) id
    pairs, in their order (module docstring)."""

    def __init__(self, cfg: LlamaConfig, *, max_length: int, batch_size: int = 8, mesh=None, compute_dtype=None,
                 attention: str = "xla", chunk_size: int = CHUNK):
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"batch_size={batch_size}, max_length={max_length}: both must be at least 1")
        self.cfg, self.max_length, self.batch_size, self.mesh = cfg, int(max_length), int(batch_size), mesh
        self.compute_dtype, self.attention, self.chunk_size = compute_dtype, attention, chunk_size
        self.score = jax.jit(self._score)
        self.widths: set[int] = set()  # the padded widths met so far (one compile each)

    def _score(self, params, ids, mask, targets, scored):
        h = forward(params, self.cfg, ids, attention_mask=mask, compute_dtype=self.compute_dtype, return_hidden=True,
                    attention=self.attention)
        return token_logprob_greedy(h, lm_head_weight(params, self.cfg), targets, scored, self.chunk_size)

    def batch(self, rows: Sequence[tuple[list[int], int]]) -> tuple[np.ndarray, ...]:
        """(ids, mask, targets, scored) [batch_size, width] of up to `batch_size` model rows."""
        rows = list(rows) + [rows[-1]] * (self.batch_size - len(rows))
        width = bucket_width(max(len(r) - 1 for r, _ in rows), self.max_length)
        ids, mask, targets, scored = (np.zeros((self.batch_size, width), np.int32) for _ in range(4))
        for i, (row, span) in enumerate(rows):
            n = len(row) - 1
            ids[i, :n], targets[i, :n], mask[i, :n] = row[:-1], row[1:], 1
            scored[i, n - span:n] = 1
        return ids, mask, targets, scored

    def __call__(self, params, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], progress=None
                 ) -> list[tuple[float, bool]]:
        rows = [model_row(c, x, self.max_length) for c, x in pairs]
        for k, (row, _) in enumerate(rows):
            check_token_ids(row, self.cfg.vocab_size, f"log-likelihood request {k}")
        order = sorted(range(len(rows)), key=lambda i: (-len(rows[i][0]), tuple(rows[i][0])))
        out: list[tuple[float, bool] | None] = [None] * len(rows)

        def collect(idx, result):
            lp, misses = (to_host(x) for x in result)  # rows other processes hold: gathered
            for j, i in enumerate(idx):
                if not np.isfinite(lp[j]):
                    raise EvalError(f"the log-likelihood of request {i} is {lp[j]}; {NOT_FINITE_FIX}")
                out[i] = (float(lp[j]), bool(misses[j] == 0))
            if progress is not None:
                progress.update(len(idx), tokens=sum(len(rows[i][0]) - 1 for i in idx))

        pending = None  # one batch in flight: the next one is built on the host while the devices work
        with mesh_context(self.mesh):
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                arrays = self.batch([rows[i] for i in idx])
                self.widths.add(arrays[0].shape[1])
                result = self.score(params, *(put(a, self.mesh) for a in arrays))
                if pending is not None:
                    collect(*pending)
                pending = (idx, result)
            if pending is not None:
                collect(*pending)
        return out
