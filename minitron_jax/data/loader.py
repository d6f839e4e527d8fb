"""Training data: documents -> packed fixed-length rows -> a resumable, process-sharded batch stream.

The order of rows is a pure function of (seed, step), so any process count reads the same global
batches and a run resumes from nothing but ``{"step", "seed", "global_batch", "rows"}``.
Ordering uses ``grain.MapDataset.source(rows).shuffle(seed).repeat()``: with shuffle *before* repeat,
grain reshuffles every epoch (epoch e uses seed + e). Each epoch gives ``len(rows) // global_batch``
steps (the remainder is dropped, a different remainder each epoch), so a batch never spans epochs.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from minitron_jax.core.errors import DataError
from minitron_jax.data import text
from minitron_jax.data.packing import PackedRows, pack_first_fit
from minitron_jax.data.rows import RowSource
from minitron_jax.data.sft import sft_corpus
from minitron_jax.data.spec import DataSpec


def _pack(docs, tokenizer, seq_len: int, packing: str, seed: int, what: str, vocab_size: int | None,
          shuffle_documents: bool = False) -> PackedRows:
    token_docs = text.tokenize_documents(docs, tokenizer, vocab_size=vocab_size)
    if packing == "first_fit":
        pad = tokenizer.pad_token_id or 0
        text.check_token_ids([pad], vocab_size, "the tokenizer's pad id (padding of first_fit rows)")
        return pack_first_fit(token_docs, seq_len, seed, pad)
    if (n := sum(len(d) for d in token_docs)) < seq_len:
        raise DataError(f"the {what} documents have {n:,} tokens, less than one row of seq_len={seq_len}; "
                        f"add data or lower seq_len")
    return PackedRows(text.pack(token_docs, seq_len, None, seed, shuffle_documents=shuffle_documents))


def _cache_key(path: Path, tokenizer, **args) -> str:
    files = sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
    stats = [(p.relative_to(path).as_posix() if p != path else p.name, p.stat().st_size, p.stat().st_mtime_ns)
             for p in files]
    vocab = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()
    tok = [type(tokenizer).__name__, str(getattr(tokenizer, "name_or_path", "")), len(tokenizer), vocab,
           tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    blob = json.dumps(["loader-cache-v1", str(path.resolve()), stats, tok, args], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _check_rows(train: PackedRows, held: PackedRows | None, vocab_size: int | None, path: Path) -> None:
    text.check_token_ids(train.tokens, vocab_size, f"the training rows of {path}")
    if held is not None:
        text.check_token_ids(held.tokens, vocab_size, f"the held-out rows of {path}")


def build_corpus(path: str | Path, tokenizer, seq_len: int, *, packing: str = "concat",
                 holdout: str | Sequence[str] = (), holdout_fraction: float = 0.0, seed: int = 0,
                 cache_dir: str | Path | None = None, text_field: str = "text",
                 vocab_size: int | None = None, split_seed: int = 0) -> tuple[PackedRows, PackedRows | None]:
    """(train, held_out or None) packed rows of seq_len; cached as .npy under cache_dir when given.

    `holdout`: one document name, a comma list or a sequence (`data.split_documents`), else a fraction drawn
    with `split_seed` (`seed` orders the documents in the rows).
    `vocab_size` (the model's) refuses token ids its embedding does not have, cached rows included."""
    if packing not in ("concat", "first_fit"):
        raise ValueError(f"packing={packing!r}; use 'concat' or 'first_fit'")
    if seq_len <= 0:
        raise DataError(f"seq_len={seq_len} must be positive")
    holdout = text.parse_holdout(holdout)
    path, want_held = Path(path), bool(holdout) or holdout_fraction > 0
    if cache_dir is not None:
        cache = Path(cache_dir)
        key = _cache_key(path, tokenizer, seq_len=seq_len, packing=packing, holdout=holdout,
                         holdout_fraction=holdout_fraction, seed=seed, text_field=text_field, split_seed=split_seed)
        if (cache / f"{key}.json").is_file():  # the marker is written last: arrays without it are ignored
            names = json.loads((cache / f"{key}.json").read_text())
            a = {n: np.load(cache / f"{key}.{n}.npy", mmap_mode="r") for n in names}
            held = PackedRows(a["held_tokens"], a.get("held_segs")) if "held_tokens" in a else None
            train = PackedRows(a["train_tokens"], a.get("train_segs"))
            _check_rows(train, held, vocab_size, path)
            return train, held
    docs = text.read_documents(path, text_field)
    try:
        train_docs, held_docs = (text.split_documents(docs, holdout, holdout_fraction, split_seed) if want_held
                                 else (docs, []))
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
    if not train_docs:
        raise DataError(f"all {len(docs)} documents in {path} were held out by holdout={','.join(holdout)}; nothing is "
                        f"left to train on: name fewer documents")
    if want_held and not held_docs:
        raise DataError(f"the held-out split of {path} is empty (holdout={holdout}, fraction={holdout_fraction})")
    train = _pack(train_docs, tokenizer, seq_len, packing, seed, "training", vocab_size)
    held = (_pack(held_docs, tokenizer, seq_len, packing, seed, "held-out", vocab_size, shuffle_documents=True)
            if want_held else None)  # held-out rows: documents in a seeded order, as evaluate.eval_set takes them
    _check_rows(train, held, vocab_size, path)
    if cache_dir is not None:
        cache.mkdir(parents=True, exist_ok=True)
        arrays = {f"{split}_{kind}": v for split, r in (("train", train), ("held", held)) if r is not None
                  for kind, v in (("tokens", r.tokens), ("segs", r.segment_ids)) if v is not None}
        for name, arr in [*arrays.items(), ("marker", None)]:
            final = cache / (f"{key}.json" if arr is None else f"{key}.{name}.npy")
            tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
            with open(tmp, "wb") as f:
                if arr is None:
                    f.write(json.dumps(sorted(arrays)).encode())
                else:
                    np.save(f, arr)
            os.replace(tmp, final)
    return train, held


def training_data(rc, tokenizer, vocab_size: int, cache_dir: str | Path | None = None, log=None):
    """(training rows, held-out PackedRows or None, stream) for a run's recipe `rc`, as its `spec.DataSpec` splits
    them: text through `build_corpus`, a token store or a blend through `store_reader` (held-out rows: the first
    eval_batches x micro-batch rows of the held-out documents; the validation documents are in neither). SFT
    (mode=sft): the JSONL examples of `sft.sft_corpus`, their rows carrying a loss mask."""
    if getattr(rc, "mode", None) == "sft":  # (`rc` may be any object with the recipe's data keys)
        train, held = sft_corpus(rc.data, tokenizer, rc.seq_len, holdout_fraction=rc.holdout_fraction,
                                 split_seed=rc.split_seed, seed=rc.seed, vocab_size=vocab_size, log=log)
        return train, held, False
    spec = DataSpec.of_recipe(rc)
    if spec.is_text:
        train, held = build_corpus(rc.data, tokenizer, rc.seq_len, packing=rc.packing, holdout=spec.holdout,
                                   holdout_fraction=spec.holdout_fraction, seed=rc.seed, cache_dir=cache_dir,
                                   text_field=rc.text_field, vocab_size=vocab_size, split_seed=spec.split_seed)
        return train, held, False
    rows, stream = spec.training_rows(rc.seq_len, packing=rc.packing, pad_id=tokenizer.pad_token_id or 0,
                                      vocab_size=vocab_size)
    held = None
    if spec.holds_out:
        n = rc.eval_batches * (rc.batch_size // rc.grad_accum)
        held = PackedRows(spec.held_out_rows(rc.seq_len, n, vocab_size=vocab_size,
                                             what="the held-out evaluation during training"))
    return rows, held, stream


def data_fingerprint(rows: RowSource, held: PackedRows | None) -> dict[str, str]:
    """What the processes of a job must agree on before training (`multihost.same_everywhere`): the training rows
    (their identity; for finite rows also the first and last row, which the splits and packing decide) and the
    held-out rows. Cheap: two rows are read."""
    fp = {"training rows": rows.identity}
    if not rows.stream and len(rows):
        ends = np.concatenate([rows[0]["input_ids"], rows[len(rows) - 1]["input_ids"]])
        fp["training rows"] += f":{zlib.crc32(ends.tobytes()):08x}"
    if held is not None:
        fp["held-out rows"] = f"{len(held)}:{zlib.crc32(np.ascontiguousarray(held.tokens).tobytes()):08x}"
    return fp


def _stack(items: list[dict]) -> dict:
    return {k: np.stack([it[k] for it in items]) for k in items[0]}


class Loader:
    """Global batch of step t = rows of the seeded order [t*B, (t+1)*B); this process reads its 1/P slice.

    `rows` (a `rows.RowSource`) is finite (`PackedRows`, `store_reader.StoreWindows`: shuffled by grain's index
    shuffle, epoch by epoch, the remainder of each epoch dropped) or, with `stream` (default: the source's own),
    an endless sequence already in training order (`store_reader.FirstFitStream`, `store_reader.Blend`): row g
    of the stream is row g of the order. The state holds the source's own state (`RowSource.get_state`)."""

    def __init__(self, rows: RowSource, global_batch: int, *, seed: int = 0, process_index: int | None = None,
                 process_count: int | None = None, stream: bool | None = None):
        import grain
        import jax
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
        if global_batch <= 0 or global_batch % process_count:
            raise DataError(f"global_batch={global_batch} must be a positive multiple of the process count "
                            f"{process_count} (every process reads global_batch / process_count rows)")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
        stream = rows.stream if stream is None else stream
        if not stream and len(rows) < global_batch:
            raise DataError(
                f"the data has {rows.n_tokens:,} tokens in {len(rows)} rows of {rows.seq_len}, but one global batch "
                f"needs {global_batch} rows ({global_batch * rows.seq_len:,} tokens); add data, or lower the global "
                f"batch or the sequence length")
        self.rows, self.global_batch, self.seed, self.stream = rows, global_batch, seed, stream
        self.process_index, self.process_count = process_index, process_count
        self.local_batch = global_batch // process_count
        self.steps_per_epoch = None if stream else len(rows) // global_batch
        self._order = rows if stream else grain.MapDataset.source(rows).shuffle(seed=seed).repeat()
        self._step = 0

    @property
    def peek_step(self) -> int:  # the step the next batch belongs to
        return self._step

    def batch_at(self, step: int) -> dict:
        """This process's slice of global batch `step`: input_ids/segment_ids int32, mask float32, [b, S]."""
        if self.stream:
            start = step * self.global_batch + self.process_index * self.local_batch
        else:
            epoch, j = divmod(step, self.steps_per_epoch)
            start = epoch * len(self.rows) + j * self.global_batch + self.process_index * self.local_batch
        return _stack([self._order[i] for i in range(start, start + self.local_batch)])

    def __next__(self) -> dict:
        self._step += 1
        return self.batch_at(self._step - 1)

    next = __next__

    def __iter__(self) -> Iterator[dict]:
        return self

    def get_state(self) -> dict:  # JSON-able; independent of the process count
        rows = self.rows.identity if self.stream else len(self.rows)
        state = {"step": self._step, "seed": self.seed, "global_batch": self.global_batch, "rows": rows}
        return {**state, **self.rows.get_state()}  # first_fit block walks: where they are (a shortcut)

    def set_state(self, state: dict) -> None:
        mine = self.get_state()
        for k in ("seed", "global_batch", "rows"):
            if k in state and state[k] != mine[k]:
                raise DataError(f"loader state has {k}={state[k]}, but this loader has {k}={mine[k]}; resuming would "
                                f"give a different data order (use the run's original {k})")
        self._step = int(state["step"])
        self.rows.set_state(state)


def eval_batches(rows: PackedRows, batch: int, max_batches: int | None = None) -> Iterator[dict]:
    """Rows in fixed order, `batch` at a time; the last batch is padded with mask-0 rows (same shapes)."""
    n = len(rows) if max_batches is None else min(len(rows), max_batches * batch)
    pad = {k: np.zeros_like(v) for k, v in rows[0].items()} if n else {}
    for s in range(0, n, batch):
        items = [rows[i] for i in range(s, min(s + batch, n))]
        yield _stack(items + [pad] * (batch - len(items)))
