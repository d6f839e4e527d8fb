"""Packing token documents into fixed-length rows: first-fit-decreasing layouts with segment ids
(`PackedRows`, the in-memory `rows.RowSource`), used by the in-memory loader and by token-store first-fit blocks."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from minitron_jax.data.rows import RowSource


class PackedRows(RowSource):
    """[N, S] int32 token rows, optional [N, S] int32 segment ids (None: one segment, no padding) and optional
    [N, S] float32 loss mask (SFT, `sft.py`: 1 on the tokens the loss is on; rows then carry "loss_mask"). A
    finite `RowSource` that keeps no position (a resume checks its length)."""

    stream = False

    def __init__(self, tokens: np.ndarray, segment_ids: np.ndarray | None = None, loss_mask: np.ndarray | None = None):
        self.tokens, self.segment_ids, self.loss_mask = tokens, segment_ids, loss_mask
        self.seq_len = int(tokens.shape[1])

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def identity(self) -> str:
        return f"rows:{len(self)}:{self.seq_len}"

    @property
    def n_tokens(self) -> int:  # real (non-padding) tokens
        return self.tokens.size if self.segment_ids is None else int(np.count_nonzero(self.segment_ids))

    def __getitem__(self, i: int) -> dict:
        seg = np.ones(self.seq_len, np.int32) if self.segment_ids is None else np.array(self.segment_ids[i], np.int32)
        row = {"input_ids": np.array(self.tokens[i], np.int32), "segment_ids": seg, "mask": (seg > 0).astype(np.float32)}
        if self.loss_mask is not None:
            row["loss_mask"] = np.array(self.loss_mask[i], np.float32)
        return row


def first_fit_layout(lengths, seq_len: int, seed: int = 0) -> list[list[int]]:
    """First-fit-decreasing bins of capacity seq_len for pieces of `lengths` (each <= seq_len): the piece
    indices of each row, rows in the order they opened; seeded order among equal lengths."""
    lengths = [int(n) for n in lengths]
    tie = np.random.default_rng(seed).permutation(len(lengths))
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], tie[i]))
    n = 1 << max(1, (len(lengths) - 1).bit_length())
    tree = [seq_len] * (2 * n)  # max free space per subtree; unopened rows are empty (free = seq_len)
    rows: dict[int, list[int]] = {}  # rows open left to right, so insertion order = row order
    for i in order:
        need, j = lengths[i], 1
        while j < n:  # leftmost row with room: first fit in O(log n)
            j = 2 * j if tree[2 * j] >= need else 2 * j + 1
        rows.setdefault(j - n, []).append(i)
        tree[j] -= need
        while j > 1:
            j //= 2
            tree[j] = max(tree[2 * j], tree[2 * j + 1])
    return list(rows.values())


def pack_first_fit(token_docs: Sequence[np.ndarray], seq_len: int, seed: int = 0, pad_id: int = 0) -> PackedRows:
    """Split documents into <= seq_len pieces, pack by first-fit-decreasing; segment ids 1..n per row, 0 = pad."""
    pieces = [d[k:k + seq_len] for d in token_docs for k in range(0, len(d), seq_len)]
    rows = first_fit_layout([len(p) for p in pieces], seq_len, seed)
    tokens = np.full((len(rows), seq_len), pad_id, np.int32)
    segs = np.zeros((len(rows), seq_len), np.int32)
    for r, members in enumerate(rows):
        at = 0
        for s, i in enumerate(members, 1):
            tokens[r, at:at + len(pieces[i])], segs[r, at:at + len(pieces[i])] = pieces[i], s
            at += len(pieces[i])
    return PackedRows(tokens, segs)
