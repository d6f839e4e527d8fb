"""Token stores as training data: splits, training rows by random access, blends, evaluation rows.

Memory is O(batch), never O(corpus): rows are read from the store (`token_store.TokenStore`) when asked for,
and which documents a row touches is found by binary search in the stored document offsets (`DocIndex`,
a bounded cache of offset chunks).

* Splits (`Splits`, `SplitMap`): each document is in exactly one of train / validation / holdout. Held-out
  documents are the `holdout` names (`TokenStore.find_documents`), else a `holdout_fraction`; the
  validation documents are a `validation_fraction` of the rest. A fraction is a per-document hash test
  (`u(split_seed, i) < fraction`, at least one document), so membership needs no permutation and no I/O.
* `packing=concat` (`StoreWindows`): window w is tokens [w*S, (w+1)*S) of the training documents' tokens in
  store order (`KeptTokens`: the documents of the other splits left out, so no row loses targets to them; one
  pass over the offsets keeps one count per 4,096 documents). The loader orders the windows with grain's index
  shuffle (`loader.Loader`): no permutation of all windows is held.
* `packing=first_fit` (`FirstFitStream`): the documents that start in each block of `block_tokens` tokens
  are cut into pieces of at most S and packed by first fit (`packing.first_fit_layout`); each epoch visits
  the blocks in a seeded order and each block's rows in a seeded order. Only the offsets of a block are
  read to lay it out; a row's tokens are read when the row is asked for.
* Blends (`Blend`, `training_rows` with a dict): `{STORE: weight}`; grain's `MapDataset.mix` interleaves the
  stores' own (infinitely repeated) orders in exact proportion, a pure function of the global row index.

`StoreWindows`, `FirstFitStream` and `Blend` are `rows.RowSource`s: the first-fit block cursors travel in the
loader state through their `get_state` / `set_state`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np

from minitron_jax.core.errors import DataError, StoreError
from minitron_jax.data.packing import first_fit_layout
from minitron_jax.data.rows import RowSource
from minitron_jax.data.text import TEXT_SUFFIXES, check_token_ids, pack, sample_budget
from minitron_jax.data.token_store import MANIFEST, TokenStore, open_store, tokenizer_identity

TRAIN, VALIDATION, HOLDOUT = 0, 1, 2
SPLIT_NAMES = ("train", "validation", "holdout")
BLOCK_TOKENS = 1 << 22  # first_fit packs the documents that start in each 4 Mi-token block together
MAX_WINDOWS = 1 << 32  # grain's index shuffle takes 32-bit indices


def is_store(data) -> bool:
    """A token store (a directory or URL with a manifest or an unfinished one), not text to tokenize."""
    if isinstance(data, dict):
        return False
    s = str(data)
    if "://" in s:  # a kvstore URL; on gs:// a text file is named by its suffix (no request made here)
        return not (s.startswith("gs://") and s.rstrip("/").endswith(TEXT_SUFFIXES))
    p = Path(s)
    return p.is_dir() and ((p / MANIFEST).is_file() or (p / "state.json").is_file())


def parse_blend(data) -> dict[str, float] | None:
    """`{STORE: weight, ...}` -> normalized weights; None for one path. Refuses what cannot be mixed."""
    if not isinstance(data, dict):
        return None
    if not data:
        raise DataError("data={} names no store; give data=STORE or data={STORE_A: 0.3, STORE_B: 0.7}")
    out = {}
    for k, w in data.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0 or w != w or w == float("inf"):
            raise DataError(f"data blend weight {k}: {w!r} must be a positive number, e.g. "
                            f"data={{{k}: 0.3, OTHER: 0.7}}")
        if not is_store(k):
            raise DataError(f"data blend component {k} is not a token store: blends mix token stores; create one "
                            f"with `minitron tokenize {k} --tokenizer TEACHER_DIR --out STORE`")
        out[str(k)] = float(w)
    total = sum(out.values())
    return {k: w / total for k, w in out.items()}


def store_weights(data) -> dict[str, float]:
    """{store: normalized weight} of STORE or a blend (one store: weight 1)."""
    return parse_blend(data) or {str(data): 1.0}


def data_label(data) -> str:
    return ", ".join(f"{k}: {w:g}" for k, w in data.items()) if isinstance(data, dict) else str(data)


# ---------------------------------------------------------------------------- splits
@dataclasses.dataclass(frozen=True)
class Splits:
    """How documents are split: `holdout` names (else `holdout_fraction`), then `validation_fraction`; `seed`
    draws the fractions' documents (a run's `split_seed`, never the seed that orders its rows)."""
    holdout: tuple[str, ...] = ()
    holdout_fraction: float = 0.0
    validation_fraction: float = 0.0
    seed: int = 0

    def __post_init__(self):
        for k in ("holdout_fraction", "validation_fraction"):
            if not 0 <= getattr(self, k) < 1:
                raise DataError(f"{k}={getattr(self, k)} must be at least 0 and below 1")
        if self.holdout_fraction + self.validation_fraction >= 1:
            raise DataError(f"holdout_fraction={self.holdout_fraction} + validation_fraction="
                            f"{self.validation_fraction} leaves no training documents; lower them")

    @property
    def active(self) -> bool:
        return bool(self.holdout) or self.holdout_fraction > 0 or self.validation_fraction > 0


def _uniform(seed: int, idx: np.ndarray) -> np.ndarray:
    """A float in [0, 1) per document index: splitmix64 of (seed, index), independent of everything else."""
    with np.errstate(over="ignore"):
        z = (np.asarray(idx, np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % (1 << 64)))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class SplitMap:
    """The split of each document of one store (`of`). A fraction > 0 always gets at least one document: when
    the hash test selects none, the document with the smallest hash value of those eligible is taken (found
    by one pass over the document indices in blocks: no I/O). `check` refuses an empty split asked for."""

    def __init__(self, store: TokenStore, splits: Splits, block: int = 1 << 16):
        self.store, self.splits, self.block = store, splits, block
        self.named = store.find_documents(list(splits.holdout)) if splits.holdout else None
        self.force_held = self.force_val = None
        sp = splits
        if self.named is None and sp.holdout_fraction > 0 and not self._count(lambda d, u: u < sp.holdout_fraction):
            self.force_held = self._argmin(lambda d, u: np.ones(len(d), bool))
        if sp.validation_fraction > 0 and not self._count(lambda d, u: self._val(d, u, self._held(d, u))):
            self.force_val = self._argmin(lambda d, u: ~self._held(d, u))

    def _blocks(self):
        for a in range(0, self.store.n_documents, self.block):
            d = np.arange(a, min(a + self.block, self.store.n_documents))
            yield d, _uniform(self.splits.seed, d)

    def _count(self, pick) -> int:
        return sum(int(pick(d, u).sum()) for d, u in self._blocks())

    def _argmin(self, eligible) -> int | None:
        best = (2.0, None)
        for d, u in self._blocks():
            ok = eligible(d, u)
            if ok.any():
                i = int(np.argmin(np.where(ok, u, 2.0)))
                best = min(best, (float(u[i]), int(d[i])), key=lambda x: x[0])
        return best[1]

    def _held(self, docs: np.ndarray, u: np.ndarray) -> np.ndarray:
        if self.named is not None:
            return np.isin(docs, self.named)
        return (u < self.splits.holdout_fraction) | (docs == (-1 if self.force_held is None else self.force_held))

    def _val(self, docs: np.ndarray, u: np.ndarray, held: np.ndarray) -> np.ndarray:
        hi = self.splits.validation_fraction + (0.0 if self.named is not None else self.splits.holdout_fraction)
        return ~held & ((u < hi) | (docs == (-1 if self.force_val is None else self.force_val)))

    def of(self, docs) -> np.ndarray:
        """int8 split (TRAIN / VALIDATION / HOLDOUT) of each document index in `docs`."""
        docs = np.asarray(docs, np.int64)
        u = _uniform(self.splits.seed, docs)
        held = self._held(docs, u)
        val = self._val(docs, u, held) if self.splits.validation_fraction > 0 else np.zeros(len(docs), bool)
        return np.where(held, HOLDOUT, np.where(val, VALIDATION, TRAIN)).astype(np.int8)

    def counts(self) -> list[int]:
        """Documents per split (a pass over the document indices in blocks: no I/O)."""
        n = np.zeros(3, np.int64)
        for d, _ in self._blocks():
            n += np.bincount(self.of(d), minlength=3)
        return n.tolist()

    def tokens(self, split: int) -> int:
        """Tokens in the documents of `split` (the document offsets are read in blocks)."""
        n = 0
        for d, _ in self._blocks():
            off = self.store.document_offsets(int(d[0]), int(d[-1]) + 1)
            n += int(np.diff(off)[self.of(d) == split].sum())
        return n

    def check(self, want: Sequence[int]) -> list[int]:
        n = self.counts()
        for s in want:
            if n[s] == 0:
                sp = self.splits
                how = {HOLDOUT: f"holdout_fraction={sp.holdout_fraction}", TRAIN: "the fractions",
                       VALIDATION: f"validation_fraction={sp.validation_fraction}"}[s]
                raise DataError(f"token store {self.store.store}: {how} puts none of its {self.store.n_documents:,} "
                                f"documents in the {SPLIT_NAMES[s]} split; raise it (or add documents)")
        return n


# ---------------------------------------------------------------------------- document lookup
class DocIndex:
    """Which documents cover a token range: binary search over the first offset of each offset chunk
    (`layout.offset_chunk` entries; each first value kept once read: one integer per 4,096 documents),
    then in the one chunk found; at most `cache` whole chunks held."""

    def __init__(self, store: TokenStore, cache: int = 64):
        self.store, self.n = store, store.n_documents
        self.chunk = int(store.manifest.get("layout", {}).get("offset_chunk", 4096))
        self._chunks: OrderedDict[int, np.ndarray] = OrderedDict()
        self._firsts: dict[int, int] = {}
        self._cache = cache

    def _first(self, k: int) -> int:
        if k not in self._firsts:
            self._firsts[k] = int(self._get(k)[0])
        return self._firsts[k]

    def _get(self, k: int) -> np.ndarray:
        if k in self._chunks:
            self._chunks.move_to_end(k)
            return self._chunks[k]
        a = np.asarray(self.store.document_offsets(k * self.chunk, min((k + 1) * self.chunk, self.n + 1) - 1))
        self._chunks[k] = a
        if len(self._chunks) > self._cache:
            self._chunks.popitem(last=False)
        return a

    def offsets(self, i: int, j: int) -> np.ndarray:
        """offsets[i:j] (document starts; offsets[n] = n_tokens)."""
        parts, k = [], i // self.chunk
        while i < j:
            c = self._get(k)
            lo = i - k * self.chunk
            take = c[lo:lo + (j - i)]
            parts.append(take)
            i += len(take)
            k += 1
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def doc_at(self, pos: int) -> int:
        """The document holding token `pos` (the last document whose start is <= pos)."""
        lo, hi = 0, (self.n + 1 + self.chunk - 1) // self.chunk - 1  # last chunk whose first offset <= pos
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._first(mid) <= pos:
                lo = mid
            else:
                hi = mid - 1
        c = self._get(lo)
        return min(lo * self.chunk + int(np.searchsorted(c, pos, side="right")) - 1, self.n - 1)

    def first_starting_at(self, pos: int) -> int:
        """The first document whose start is >= pos (n when none)."""
        if pos <= 0:
            return 0
        i = self.doc_at(pos - 1)
        return i + 1

    def covering(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(document indices, their offsets [start..end]) of the documents overlapping tokens [a, b)."""
        i, j = self.doc_at(a), self.doc_at(b - 1)
        return np.arange(i, j + 1), self.offsets(i, j + 2)


# ---------------------------------------------------------------------------- rows
def _row(tokens: np.ndarray, segment_ids: np.ndarray) -> dict:
    return {"input_ids": tokens.astype(np.int32), "segment_ids": segment_ids.astype(np.int32),
            "mask": (segment_ids > 0).astype(np.float32)}


class KeptTokens:
    """The tokens of the documents of one split (`keep`), in store order, as one stream read by position. Made
    with one pass over the document offsets, in blocks of `block` documents, that keeps only each block's count
    of kept tokens (one integer per block); a read finds its block by binary search, lays out that block's kept
    documents (at most `cache` blocks held) and reads each contiguous run of kept tokens from the store."""

    def __init__(self, store: TokenStore, split_map: SplitMap, keep: int = TRAIN, block: int = 4096, cache: int = 64):
        self.store, self.split_map, self.keep, self.block, self._cache = store, split_map, keep, block, cache
        counts = [0]
        for a in range(0, store.n_documents, block):
            _, kept = self._layout(a)
            counts.append(int(kept.sum()))
        self.before = np.cumsum(counts)  # kept tokens before each block
        self.n_tokens = int(self.before[-1])
        self._blocks: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def _layout(self, a: int) -> tuple[np.ndarray, np.ndarray]:
        """(store start, kept length: 0 for a document of another split) of documents [a, a + block)."""
        b = min(a + self.block, self.store.n_documents)
        off = np.asarray(self.store.document_offsets(a, b), np.int64)
        return off[:-1], np.diff(off) * (self.split_map.of(np.arange(a, b)) == self.keep)

    def _get(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Block k's document starts and the kept tokens before each of its documents (one more: the total)."""
        if k in self._blocks:
            self._blocks.move_to_end(k)
            return self._blocks[k]
        starts, kept = self._layout(k * self.block)
        self._blocks[k] = (starts, np.concatenate([[0], np.cumsum(kept)]))
        if len(self._blocks) > self._cache:
            self._blocks.popitem(last=False)
        return self._blocks[k]

    def read(self, a: int, b: int) -> np.ndarray:
        """Kept tokens [a, b) of the stream."""
        if not 0 <= a <= b <= self.n_tokens:
            raise IndexError(f"kept tokens [{a}, {b}) of {self.n_tokens}")
        runs: list[tuple[int, int]] = []
        k = int(np.searchsorted(self.before, a, side="right")) - 1
        while a < b:
            starts, cum = self._get(k)
            lo, hi = a - int(self.before[k]), min(b, int(self.before[k + 1])) - int(self.before[k])
            js = np.flatnonzero((cum[1:] > lo) & (cum[:-1] < hi))  # kept documents overlapping [lo, hi)
            for s, e in zip(starts[js] + np.maximum(lo - cum[js], 0), starts[js] + np.minimum(hi, cum[js + 1]) - cum[js]):
                if runs and runs[-1][1] == s:  # adjacent kept documents: one read
                    runs[-1] = (runs[-1][0], int(e))
                else:
                    runs.append((int(s), int(e)))
            a += hi - lo
            k += 1
        return np.concatenate([np.asarray(self.store.read(s, e)) for s, e in runs]) if runs else np.zeros(0, np.uint32)


class StoreWindows(RowSource):
    """`packing=concat` rows by random access: window w = tokens [w*S, (w+1)*S) of the store's documents of
    the split `keep` (with a split: `KeptTokens`, the documents of the other splits left out, so every token of
    a row is one to train on), one segment per row. Without a split the same items as `packing.PackedRows`
    of `data.pack`; with one, those of `data.pack` over the kept documents in store order (what
    `loader.build_corpus` gives for text). Finite (the Loader shuffles it), no position kept."""

    stream = False

    def __init__(self, store: TokenStore, seq_len: int, split_map: SplitMap | None = None, keep: int = TRAIN,
                 vocab_size: int | None = None):
        self.store, self.seq_len, self.split_map, self.keep = store, seq_len, split_map, keep
        self.vocab_size = vocab_size
        self.kept = KeptTokens(store, split_map, keep) if split_map is not None and split_map.splits.active else None
        total = store.n_tokens if self.kept is None else self.kept.n_tokens
        self.n = total // seq_len
        if self.n == 0:
            raise DataError(f"token store {store.store} holds {total:,} tokens{'' if self.kept is None else ' to train on'}"
                            f", less than one row of seq_len={seq_len}; add data or lower seq_len")
        if self.n >= MAX_WINDOWS:
            raise DataError(f"token store {store.store} gives {self.n:,} windows of {seq_len}, more than grain's "
                            f"index shuffle takes (2^32); raise seq_len or split the store")

    def __len__(self) -> int:
        return self.n

    @property
    def n_tokens(self) -> int:  # the tokens of its windows
        return self.n * self.seq_len

    @property
    def identity(self) -> str:
        kept = "" if self.kept is None else f":{SPLIT_NAMES[self.keep]}:{self.kept.n_tokens}"
        return f"{self.store.store}:{self.store.n_tokens}:{self.seq_len}{kept}"

    def __getitem__(self, w: int) -> dict:
        a, S = int(w) * self.seq_len, self.seq_len
        tokens = np.asarray(self.store.read(a, a + S) if self.kept is None else self.kept.read(a, a + S))
        check_token_ids(tokens, self.vocab_size, f"window {w} of token store {self.store.store}")
        return _row(tokens, np.ones(S, np.int32))


def _block_seed(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def _cursor_state(streams: list) -> dict:
    """The loader-state entry of first_fit block walks: where they are (a shortcut for a resumed run)."""
    return {"cursors": [s.cursor for s in streams]} if streams else {}


def _set_cursors(streams: list, state: dict) -> None:
    if len(state.get("cursors", ())) == len(streams):  # a cursor past the rows asked for is never used
        for s, c in zip(streams, state.get("cursors", ())):
            s.cursor = c


class FirstFitStream(RowSource):
    """`packing=first_fit` over a store, as an endless ordered sequence of rows (`[g]`, g = 0, 1, ...).

    Epoch e visits the blocks in the order `rng(seed, e).permutation(n_blocks)`; a block's rows (the first-fit
    layout of the pieces of its documents of the kept split) come in the order `rng(seed, e, block)`. Row g is
    found by walking the blocks from the last position asked for (memoized row counts), so reading forward,
    as training does, costs one layout per block. Its `cursor` travels in the loader state."""

    stream = True

    def __init__(self, store: TokenStore, seq_len: int, split_map: SplitMap | None = None, keep: int = TRAIN, *,
                 seed: int = 0, block_tokens: int = BLOCK_TOKENS, pad_id: int = 0, vocab_size: int | None = None):
        self.store, self.seq_len, self.split_map, self.keep, self.seed = store, seq_len, split_map, keep, seed
        self.pad_id, self.vocab_size = pad_id, vocab_size
        self.index = DocIndex(store)
        self.block_tokens = max(block_tokens, seq_len)
        self.n_blocks = (store.n_tokens + self.block_tokens - 1) // self.block_tokens
        self._counts: dict[tuple[int, int], int] = {}
        self._layouts: OrderedDict[tuple[int, int], tuple] = OrderedDict()
        self._orders: dict[int, np.ndarray] = {}
        self._cursor = (0, 0, 0)  # (epoch, position in the epoch's block order, first row of that block)

    def __len__(self) -> int:
        return sys.maxsize

    @property
    def cursor(self) -> list[int]:
        """Where the last row asked for lies: [epoch, position in the epoch's block order, first row of that
        block]. Saved with the loader state, it lets a resumed run skip the walk over the blocks before it."""
        return list(self._cursor)

    @cursor.setter
    def cursor(self, value) -> None:
        self._cursor = tuple(int(v) for v in value)

    @property
    def identity(self) -> str:
        return f"first_fit:{self.store.store}:{self.store.n_tokens}:{self.seq_len}:{self.block_tokens}"

    @property
    def streams(self) -> list[FirstFitStream]:  # the block walks whose cursors the loader state keeps
        return [self]

    def get_state(self) -> dict:
        return _cursor_state(self.streams)

    def set_state(self, state: dict) -> None:
        _set_cursors(self.streams, state)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng(_block_seed(self.seed, epoch)).permutation(self.n_blocks)}
        return self._orders[epoch]

    def _layout(self, epoch: int, b: int) -> tuple:
        """(pieces [n, 2] token ranges, rows: list of piece-index lists, row order) of block b in epoch."""
        key = (epoch, b)
        if key in self._layouts:
            self._layouts.move_to_end(key)
            return self._layouts[key]
        i = self.index.first_starting_at(b * self.block_tokens)
        j = self.index.first_starting_at(min((b + 1) * self.block_tokens, self.store.n_tokens))
        off = self.index.offsets(i, j + 1)
        keep = np.ones(j - i, bool) if self.split_map is None else self.split_map.of(np.arange(i, j)) == self.keep
        S = self.seq_len
        pieces = np.array([(k, min(k + S, e)) for s, e, kk in zip(off[:-1], off[1:], keep) if kk
                           for k in range(int(s), int(e), S)], np.int64).reshape(-1, 2)
        rows = first_fit_layout(pieces[:, 1] - pieces[:, 0], S, seed=_block_seed(self.seed, b) % (1 << 63))
        order = np.random.default_rng(_block_seed(self.seed, epoch, b)).permutation(len(rows))
        self._layouts[key] = (pieces, rows, order)
        self._counts[key] = len(rows)
        if len(self._layouts) > 2:
            self._layouts.popitem(last=False)
        return self._layouts[key]

    def _count(self, epoch: int, b: int) -> int:
        if (epoch, b) not in self._counts:
            self._layout(epoch, b)
        return self._counts[(epoch, b)]

    def __getitem__(self, g: int) -> dict:
        g = int(g)
        epoch, pos, base = self._cursor if g >= self._cursor[2] else (0, 0, 0)
        empty = 0  # blocks in a row without rows: a whole epoch of them means nothing to pack
        while True:
            n = self._count(epoch, int(self._order(epoch)[pos]))
            if g < base + n:
                break
            base, pos, empty = base + n, pos + 1, 0 if n else empty + 1
            if empty >= self.n_blocks:
                raise DataError(f"token store {self.store.store} has no document in the "
                                f"{SPLIT_NAMES[self.keep]} split to pack")
            if pos == self.n_blocks:
                epoch, pos = epoch + 1, 0
        self._cursor = (epoch, pos, base)
        pieces, rows, order = self._layout(epoch, int(self._order(epoch)[pos]))
        tokens = np.full(self.seq_len, self.pad_id, np.int64)
        segs = np.zeros(self.seq_len, np.int32)
        at = 0
        members = rows[order[g - base]]
        reads = [self.store.tokens[int(pieces[p][0]):int(pieces[p][1])].read() for p in members]  # all in flight
        for s, (p, r) in enumerate(zip(members, reads), 1):
            a, b = pieces[p]
            tokens[at:at + b - a], segs[at:at + b - a] = r.result(), s
            at += b - a
        check_token_ids(tokens, self.vocab_size, f"a first_fit row of token store {self.store.store}")
        return _row(tokens, segs)


# ---------------------------------------------------------------------------- the training stream
def check_tokenizer(store: TokenStore, tokenizer_dir, what: str = "the teacher") -> None:
    """Stop when the store was tokenized with another tokenizer than `tokenizer_dir`'s (sha256 of
    tokenizer.json), naming both."""
    try:
        mine = tokenizer_identity(tokenizer_dir)
    except StoreError:
        mine = None
    theirs = store.manifest["tokenizer"]["sha256"]
    if mine != theirs:
        raise DataError(
            f"token store {store.store} was tokenized with the tokenizer of sha256 {theirs[:12]}... (tokenizer.json), "
            f"but {what} ({tokenizer_dir}) has " + (f"sha256 {mine[:12]}..." if mine else "no tokenizer.json")
            + f"; its token ids would mean other text. Tokenize the corpus with {what}'s tokenizer: `minitron "
            f"tokenize SOURCE --tokenizer {tokenizer_dir} --out NEW_STORE`")


def tokenizer_dir_of(tokenizer) -> str | None:
    """The directory a transformers tokenizer was loaded from, when it holds tokenizer.json."""
    d = getattr(tokenizer, "name_or_path", None)
    return d if d and Path(d, "tokenizer.json").is_file() else None


def open_stores(data, tokenizer_dir=None, what: str = "the teacher") -> dict[str, tuple[TokenStore, float]]:
    """{store: (TokenStore, weight)} for `data` = STORE or a blend, every one checked against the tokenizer."""
    out = {}
    for k, w in store_weights(data).items():
        st = open_store(k)
        if tokenizer_dir is not None:
            check_tokenizer(st, tokenizer_dir, what)
        out[k] = (st, w)
    return out


class Blend(RowSource):
    """Stores mixed in proportion, as an endless ordered sequence: grain's `MapDataset.mix` of each component's
    own order (a `FirstFitStream` as it is; `StoreWindows` shuffled with seed + c and repeated). The cursors of
    its first_fit components travel in the loader state."""

    stream = True

    def __init__(self, comps: list[tuple[RowSource, float]], seed: int = 0):
        import grain
        ds = [grain.MapDataset.source(r) if r.stream else
              grain.MapDataset.source(r).shuffle(seed=(seed + c) % (1 << 32)).repeat() for c, (r, _) in enumerate(comps)]
        self._mixed = grain.MapDataset.mix(ds, [w for _, w in comps])
        self.seq_len = comps[0][0].seq_len
        self._identity = "blend:" + ";".join(f"{r.identity}={w:.6g}" for r, w in comps)
        self.streams = [r for r, _ in comps if isinstance(r, FirstFitStream)]

    @property
    def identity(self) -> str:
        return self._identity

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, g: int) -> dict:
        return self._mixed[g]

    def get_state(self) -> dict:
        return _cursor_state(self.streams)

    def set_state(self, state: dict) -> None:
        _set_cursors(self.streams, state)


def training_rows(data, seq_len: int, *, packing: str = "concat", splits: Splits = Splits(), seed: int = 0,
                  tokenizer_dir=None, pad_id: int = 0, vocab_size: int | None = None,
                  block_tokens: int = BLOCK_TOKENS):
    """(rows, stream): the training rows of a store or blend, for `loader.Loader`. One store with concat
    packing gives `StoreWindows` (finite, the Loader shuffles and repeats it: stream False); first_fit or a
    blend give an endless ordered sequence (stream True)."""
    stores = open_stores(data, tokenizer_dir)
    comps = []
    for c, (k, (st, w)) in enumerate(stores.items()):
        sm = SplitMap(st, splits) if splits.active else None
        if sm is not None:
            sm.check([TRAIN])
        if packing == "first_fit":
            rows = FirstFitStream(st, seq_len, sm, seed=seed + c, block_tokens=block_tokens, pad_id=pad_id,
                                  vocab_size=vocab_size)
        else:
            rows = StoreWindows(st, seq_len, sm, vocab_size=vocab_size)
        comps.append((rows, w))
    if len(comps) == 1:
        return comps[0][0], comps[0][0].stream
    return Blend(comps, seed), True


def split_rows(data, seq_len: int, samples: int, split: int, splits: Splits, *, seed: int = 0, tokenizer_dir=None,
               vocab_size: int | None = None, what: str = "evaluation") -> np.ndarray:
    """[samples, seq_len] int32: the first `samples` rows of the documents of `split` concatenated in the order
    `rng(seed).permutation` gives them and cut: the rows `data.pack(docs, seq_len, None, seed)` gives for the
    same documents as text (`evaluate.eval_set`). Only the documents those rows need are read; the split's
    document indices are held (8 bytes each). Each store of a blend gives its weight's share (`apportion`)."""
    stores = open_stores(data, tokenizer_dir)
    counts = apportion(samples, [w for _, w in stores.values()])
    out = [_first_rows(st, seq_len, int(n), split, splits, seed, vocab_size, what)
           for (st, _), n in zip(stores.values(), counts) if n]
    return np.concatenate(out)


def apportion(total: int, weights: Sequence[float]) -> np.ndarray:
    """int64 counts, one per weight, that sum to `total` exactly, each >= 0 and within 1 of its share
    `total * w / sum(weights)` (largest remainder: every count is its share rounded down, then the ones with
    the largest fractional parts, the earlier one on a tie, get one more)."""
    w = np.asarray(weights, np.float64)
    share = total * w / w.sum()
    counts = np.floor(share).astype(np.int64)
    extra = int(np.clip(total - counts.sum(), 0, len(w)))
    counts[np.argsort(counts - share, kind="stable")[:extra]] += 1
    return counts


def _first_rows(st: TokenStore, seq_len: int, n: int, split: int, splits: Splits, seed: int, vocab_size,
                what) -> np.ndarray:
    sm = SplitMap(st, splits) if splits.active else None
    if sm is None:
        docs = np.arange(st.n_documents)
    else:
        sm.check([split])
        docs = np.concatenate([d[sm.of(d) == split] for d, _ in sm._blocks()])
    need, got, parts = n * seq_len, 0, []
    for i in docs[np.random.default_rng(seed).permutation(len(docs))]:
        a, b = (int(x) for x in st.document_offsets(int(i), int(i) + 1))
        parts.append(np.asarray(st.read(a, min(b, a + need - got))))
        got += len(parts[-1])
        if got >= need:
            break
    if got < need:
        raise DataError(f"token store {st.store}: the {SPLIT_NAMES[split]} documents hold {got:,} tokens, fewer than "
                        f"{n} rows of {seq_len} for {what}; lower the sample count or seq_len, or raise the fraction")
    rows = np.concatenate(parts)[:need].astype(np.int32).reshape(n, seq_len)
    check_token_ids(rows, vocab_size, f"the {SPLIT_NAMES[split]} rows of token store {st.store}")
    return rows


def split_token_docs(data, split: int, splits: Splits, *, max_tokens: int | None = None, max_docs: int | None = None,
                     tokenizer_dir=None) -> list[np.ndarray]:
    """Token ids of the documents of `split`, in store order, until `max_tokens` are held (the last document
    cut there, as `data.stream_token_documents` cuts it) or `max_docs` documents; the stores of a blend in turn."""
    out, total = [], 0
    for st, _ in open_stores(data, tokenizer_dir).values():
        sm = SplitMap(st, splits) if splits.active else None
        if sm is not None:
            sm.check([split])
        for a in range(0, st.n_documents, 1 << 14):
            b = min(a + (1 << 14), st.n_documents)
            off = st.document_offsets(a, b)
            mine = np.arange(b - a) if sm is None else np.flatnonzero(sm.of(np.arange(a, b)) == split)
            for i in mine:
                stop = off[i + 1] if max_tokens is None else min(off[i + 1], off[i] + max_tokens - total)
                out.append(np.asarray(st.read(int(off[i]), int(stop)), np.int32))
                total += len(out[-1])
                if (max_tokens is not None and total >= max_tokens) or (max_docs is not None and len(out) >= max_docs):
                    return out
    return out


def calibration_rows(data, n_samples: int, seq_len: int, seed: int = 0, *, split: int = TRAIN,
                     splits: Splits = Splits(), tokenizer_dir=None, vocab_size: int | None = None) -> np.ndarray:
    """`data.load_samples` for a store: the documents of `split` read in order until `sample_budget` tokens,
    packed in a seeded document order, `n_samples` rows drawn by seed (same rows as load_samples gives
    for the same documents as text)."""
    docs = split_token_docs(data, split, splits, max_tokens=sample_budget(n_samples, seq_len),
                            tokenizer_dir=tokenizer_dir)
    check_token_ids(np.concatenate(docs), vocab_size, f"the {SPLIT_NAMES[split]} documents of {data_label(data)}")
    return pack(docs, seq_len, n_samples, seed)
