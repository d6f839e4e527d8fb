"""Documents from local files -> tokenized, packed, fixed-length samples.

Sources: a directory of `.txt` files (one document per file), `.txt`, `.jsonl` (a `text` field per
line), `.parquet` (a `text` column), or a dataset saved with `datasets.save_to_disk`. Documents are
packed (BOS + tokens + EOS, concatenated, split into rows): no padding noise in calibration.

Reading is lazy (`iter_documents`): files are read in chunks, one at a time, so `load_samples` stops
once it holds what its samples need (`sample_budget` tokens) and tokenizes long documents in pieces
of at most `PIECE_CHARS` characters, cut where a tokenizer splits anyway (before the space that
follows a word). `.txt` is decoded as UTF-8: a file whose undecodable bytes became more than
`MAX_REPLACED` (1%) of its characters is refused, fewer are counted in a one-line warning.
Token ids are checked against the model's `vocab_size` wherever rows are built (`check_token_ids`).
"""

from __future__ import annotations

import codecs
import contextlib
import io
import json
import sys
import threading
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from minitron_jax.core import storage
from minitron_jax.core.errors import FIELD_HINT, DataError
from minitron_jax.data.hf_sources import iter_hf

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
MAX_REPLACED = 0.01  # refuse a .txt file once more than 1% of the characters read are U+FFFD replacements
PIECE_CHARS = 1 << 18  # 256 Ki characters: the most text handed to the tokenizer at once by load_samples
MIN_SAMPLE_POOL = 1 << 21  # load_samples reads at least 2 Mi tokens (when the data has them) ...
SAMPLE_POOL_FACTOR = 2  # ... and at least twice samples x seq_len, then draws its rows from those




def warn(message: str) -> None:
    """One line on stderr."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- reading
_replaced = threading.local()


def _count_replace(e: UnicodeDecodeError):  # "replace", counting each replacement character it emits
    _replaced.n = getattr(_replaced, "n", 0) + 1
    return "\ufffd", e.end


codecs.register_error("minitron_count_replace", _count_replace)


def _read_txt(path: Path, chunk_chars: int = PIECE_CHARS) -> Iterator[str]:
    """The text of a .txt file, `chunk_chars` characters at a time: UTF-8, universal newlines, undecodable
    bytes replaced by U+FFFD (as `read_text(errors="replace")`). Refused (DataError) as soon as more than
    MAX_REPLACED of the characters read are replacements; a warning names fewer, when the file is closed."""
    bad = chars = 0
    try:
        with storage.path(path).open("rb") as raw, io.TextIOWrapper(raw, encoding="utf-8",
                                                                    errors="minitron_count_replace", newline=None) as f:
            while True:
                before = getattr(_replaced, "n", 0)
                text = f.read(chunk_chars)
                bad += getattr(_replaced, "n", 0) - before
                chars += len(text)
                if bad > MAX_REPLACED * chars:
                    raise DataError(
                        f"{path} is not UTF-8 text: {bad:,} of the first {chars:,} characters ({bad / chars:.1%}) are "
                        f"undecodable bytes (more than the {MAX_REPLACED:.0%} allowed); convert the file to UTF-8 "
                        f"(e.g. iconv -f latin1 -t utf-8) or remove it from the data")
                if not text:
                    return
                yield text
    finally:
        if 0 < bad <= MAX_REPLACED * chars:
            warn(f"{path}: {bad:,} of {chars:,} characters read ({bad / chars:.3%}) were undecodable bytes, "
                 f"replaced by U+FFFD; convert the file to UTF-8 to keep them")


def read_jsonl(path: str | Path):
    """(line number, object) for each non-blank line, read lazily; a line that is not UTF-8 or not a JSON
    object is a DataError naming the file and line."""
    with storage.path(path).open("rb") as f:
        for i, raw in enumerate(f):
            try:
                line = raw.decode("utf-8-sig" if i == 0 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{i + 1} is not UTF-8 (byte {e.start + 1} of the line: {e.reason}); "
                                f"convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i + 1} is not valid JSON ({e}); JSONL needs one object per line") from e
            if not isinstance(row, dict):
                raise DataError(f"{path}:{i + 1} is a JSON {type(row).__name__}, not an object; JSONL needs one "
                                f"object per line")
            yield i + 1, row


def _file_documents(path: Path, field: str) -> Iterator[tuple[str, Iterator[str]]]:
    if path.suffix == ".txt":
        yield path.name, _read_txt(path)
    elif path.suffix in (".jsonl", ".json"):
        for n, row in read_jsonl(path):
            if field not in row:
                raise DataError(f"{path}:{n} has no {field!r} field (keys: {sorted(row)}); "
                                + FIELD_HINT)
            yield f"{path.name}:{n}", iter((row[field],))
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq
        f = pq.ParquetFile(path.open("rb") if storage.is_url(path) else path)
        if field not in f.schema_arrow.names:
            raise DataError(f"{path} has no {field!r} column (columns: {f.schema_arrow.names}); "
                            + FIELD_HINT)
        i = 0
        for batch in f.iter_batches(batch_size=1024, columns=[field]):
            for t in batch.column(0).to_pylist():
                yield f"{path.name}:{i}", iter((t,))
                i += 1
    else:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {TEXT_SUFFIXES}")


def iter_documents(path: str | Path, text_field: str = "text") -> Iterator[tuple[str, Iterator[str]]]:
    """(name, text chunks) per document, lazily, in a stable order, from a file, a directory of files, or a
    saved dataset, or a `datasets.load_dataset` source `hf:...` (`hf_sources`). Consume each document's chunks
    before the next document. Blank documents included."""
    if isinstance(path, str) and path.startswith("hf:"):
        yield from iter_hf(path, text_field)
        return
    path = storage.path(path)  # local or gs://
    if not path.exists():
        raise DataError(f"data path {path} does not exist")
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()
                          or (path / "dataset_dict.json").exists()):
        import datasets
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
        if text_field not in ds.column_names:
            raise DataError(f"dataset {path} has no {text_field!r} column (columns: {ds.column_names}); " + FIELD_HINT)
        i = 0
        for batch in ds.select_columns([text_field]).iter(batch_size=1024):
            for t in batch[text_field]:
                yield f"{path.name}:{i}", iter((t,))
                i += 1
    elif path.is_dir():
        # .json files in a directory are metadata (markers, configs), not JSONL data
        for f in (p for p in storage.files(path) if p.suffix in (".txt", ".jsonl", ".parquet")):
            yield from _file_documents(f, text_field)
    else:
        yield from _file_documents(path, text_field)


def read_documents(path: str | Path, text_field: str = "text") -> list[tuple[str, str]]:
    """(name, text) pairs, in a stable order, from a file, a directory of files, or a saved dataset."""
    docs = []
    with contextlib.closing(iter_documents(path, text_field)) as it:
        for name, chunks in it:
            with contextlib.closing(chunks) if hasattr(chunks, "close") else contextlib.nullcontext():
                parts = list(chunks)
            if parts and all(isinstance(t, str) for t in parts) and (text := "".join(parts)).strip():
                docs.append((name, text))
    if not docs:
        raise DataError(f"no non-empty documents found in {path} (looked for {TEXT_SUFFIXES} or a saved dataset)")
    return docs


# ---------------------------------------------------------------------------- held-out split
def parse_holdout(holdout: str | Iterable[str] | None) -> list[str]:
    """Held-out document names: one name, a comma-separated list, or a sequence of either."""
    if not holdout:
        return []
    items = [holdout] if isinstance(holdout, str) else list(holdout)
    if not all(isinstance(h, str) for h in items):
        raise DataError(f"holdout={holdout!r}: give document names, e.g. holdout=hamlet or holdout=hamlet,tempest")
    return [n.strip() for h in items for n in h.split(",") if n.strip()]


def _some_names(docs: Sequence[tuple[str, str]], k: int = 8) -> str:
    names = [n for n, _ in docs[:k]]
    return ", ".join(names) + (f", ... ({len(docs)} documents)" if len(docs) > k else "")


def split_documents(docs: Sequence[tuple[str, str]], holdout: str | Sequence[str] = (), holdout_fraction: float = 0.0,
                    seed: int = 0) -> tuple[list, list]:
    """(train, held_out): documents whose name contains one of the `holdout` names (one name, a comma
    list or a sequence; each must match a document), else a seeded fraction. A fraction in (0, 1) holds
    out round(n * fraction) documents, but at least one and never all (so 2 to 10 documents hold out 1)."""
    names = parse_holdout(holdout)
    if names:
        missing = [h for h in names if not any(h in n for n, _ in docs)]
        if missing:
            raise DataError(f"no document name matches the held-out name{'s' * (len(missing) > 1)} "
                            f"{', '.join(map(repr, missing))}; the documents are: {_some_names(docs)}; "
                            f"give part of a document name, e.g. holdout={Path(docs[0][0]).stem if docs else 'NAME'}")
        is_held = [any(h in n for h in names) for n, _ in docs]
        return [d for d, h in zip(docs, is_held) if not h], [d for d, h in zip(docs, is_held) if h]
    if not 0 <= holdout_fraction < 1:
        raise DataError(f"holdout_fraction={holdout_fraction} must be at least 0 and below 1")
    if holdout_fraction == 0:
        return list(docs), []
    if len(docs) < 2:
        raise DataError(f"{len(docs)} document cannot be split into training and held-out documents "
                        f"(holdout_fraction={holdout_fraction}); add documents, or hold none out (holdout_fraction=0)")
    n = min(max(int(round(len(docs) * holdout_fraction)), 1), len(docs) - 1)
    order = np.random.default_rng(seed).permutation(len(docs))
    held = set(order[:n].tolist())
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


# ---------------------------------------------------------------------------- tokens
def check_token_ids(ids, vocab_size: int | None, what: str) -> None:
    """Refuse token ids outside [0, vocab_size): the embedding lookup would give NaN, not an error."""
    if vocab_size is None:
        return
    ids = np.asarray(ids)
    if ids.size == 0:
        return
    hi, lo = int(ids.max()), int(ids.min())
    if hi >= vocab_size or lo < 0:
        kind, bad = ("the largest token id", hi) if hi >= vocab_size else ("token id", lo)
        raise DataError(f"{what}: {kind} {bad:,} is outside the model's vocabulary (vocab_size={vocab_size:,}, ids "
                        f"0..{vocab_size - 1:,}): the tokenizer does not belong to this model; use the tokenizer saved "
                        f"with the model")


def tokenize_documents(docs: Sequence[tuple[str, str]], tokenizer, add_bos: bool = True, add_eos: bool = True,
                       vocab_size: int | None = None) -> list[np.ndarray]:
    """Token ids per document with BOS/EOS added once per document (no special tokens inside)."""
    enc = tokenizer([t for _, t in docs], add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    out = []
    for (name, _), ids in zip(docs, enc):
        ids = ([bos] if add_bos and bos is not None else []) + list(ids) + ([eos] if add_eos and eos is not None else [])
        out.append(np.asarray(ids, np.int32))
        check_token_ids(out[-1], vocab_size, f"document {name}")
    return out


def _cut(text: str, limit: int) -> int:
    """Where to cut `text` at or before `limit`: before a space that follows a word (where BPE pre-tokenizers
    split anyway), else before any whitespace after non-whitespace, else at `limit`."""
    lo = limit // 2
    i = text.rfind(" ", lo, limit + 1)
    while i > lo and not text[i - 1].isalnum():
        i = text.rfind(" ", lo, i)
    if i > lo:
        return i
    for i in range(limit, lo, -1):
        if text[i].isspace() and not text[i - 1].isspace():
            return i
    return limit


def split_pieces(chunks: Iterable[str], limit: int = PIECE_CHARS) -> Iterator[str]:
    """Re-cut a document's text chunks into pieces of at most `limit` characters (`_cut`)."""
    buf = ""
    for chunk in chunks:
        buf += chunk
        at = 0
        while len(buf) - at > limit:
            k = _cut(buf[at:at + limit + 1], limit)
            yield buf[at:at + k]
            at += k
        buf = buf[at:]
    if buf:
        yield buf


def stream_token_documents(path: str | Path, tokenizer, max_tokens: int, text_field: str = "text",
                           vocab_size: int | None = None, piece_chars: int = PIECE_CHARS,
                           exclude: Sequence[str] = ()) -> list[np.ndarray]:
    """Token ids per document (BOS/EOS as `tokenize_documents`), reading documents in order until at least
    `max_tokens` are held: the last document may be cut short there (no EOS), and nothing after it is read.
    Text reaches the tokenizer in batches of at most about `piece_chars` characters (long documents in
    pieces, `split_pieces`), so memory follows `max_tokens` and `piece_chars`, not the data. Documents
    whose name contains one of `exclude` (held-out names, as `split_documents` matches them) are skipped."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    check_token_ids([i for i in (bos, eos) if i is not None], vocab_size, "the tokenizer's BOS/EOS ids")
    docs: list[list[np.ndarray]] = []
    names: list[str] = []
    pending: list[tuple[int, str | None]] = []  # (document, piece) to tokenize; None: the document's EOS
    pending_chars = total = 0

    def flush() -> None:
        nonlocal total, pending_chars
        texts = [t for _, t in pending if t is not None]
        enc = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
        for d, t in pending:
            a = np.asarray([eos] if t is None else next(enc), np.int32)
            check_token_ids(a, vocab_size, f"document {names[d]} of {path}")
            docs[d].append(a)
            total += len(a)
        pending.clear()
        pending_chars = 0

    with contextlib.closing(iter_documents(path, text_field)) as it:
        for name, chunks in it:
            if any(h in name for h in exclude):
                if hasattr(chunks, "close"):
                    chunks.close()
                continue
            lead: list[str] = []  # blank pieces before the first text: kept only if text follows
            started = cut = False
            with contextlib.closing(chunks) if hasattr(chunks, "close") else contextlib.nullcontext():
                for piece in split_pieces((c for c in chunks if isinstance(c, str)), piece_chars):
                    if not started:
                        if not piece.strip():
                            lead.append(piece)
                            continue
                        started = True
                        docs.append([np.asarray([bos], np.int32)] if bos is not None else [])
                        names.append(name)
                        total += bos is not None
                        pending.extend((len(docs) - 1, p) for p in lead)
                        pending_chars += sum(map(len, lead))
                    pending.append((len(docs) - 1, piece))
                    pending_chars += len(piece)
                    if pending_chars >= piece_chars:
                        flush()
                        if total >= max_tokens:
                            cut = True
                            break
            if started and not cut and eos is not None:
                pending.append((len(docs) - 1, None))
            if cut:
                break
    if pending:
        flush()
    return [np.concatenate(d) if d else np.zeros(0, np.int32) for d in docs]


def pack(token_docs: Sequence[np.ndarray], seq_len: int, n_samples: int | None = None, seed: int = 0,
         shuffle_documents: bool = True) -> np.ndarray:
    """Concatenate documents (in a seeded order, or in their order without `shuffle_documents`: the order a
    token store keeps) and cut [n, seq_len] rows; `n_samples` rows drawn by seed (None: all, in order)."""
    if seq_len <= 0:
        raise DataError(f"seq_len={seq_len} must be positive")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(token_docs)) if shuffle_documents else np.arange(len(token_docs))
    stream = np.concatenate([token_docs[i] for i in order]) if len(token_docs) else np.zeros(0, np.int32)
    rows = len(stream) // seq_len
    if rows == 0 or (n_samples is not None and rows < n_samples):
        raise DataError(
            f"the data has {len(stream):,} tokens = {rows} rows of {seq_len}, but {n_samples or 1} were asked for; "
            f"add data, or lower the sample count / sequence length (at most {rows} rows of {seq_len})")
    table = stream[: rows * seq_len].reshape(rows, seq_len)
    if n_samples is None:
        return table
    pick = np.sort(rng.choice(rows, size=n_samples, replace=False))
    return table[pick]


def sample_budget(n_samples: int, seq_len: int) -> int:
    """Tokens `load_samples` reads at most (plus the rest of one tokenizer batch)."""
    return max(SAMPLE_POOL_FACTOR * n_samples * seq_len, MIN_SAMPLE_POOL)


def load_samples(path: str | Path, tokenizer, n_samples: int, seq_len: int, seed: int = 0,
                 text_field: str = "text", vocab_size: int | None = None, exclude: Sequence[str] = ()) -> np.ndarray:
    """[n_samples, seq_len] int32 packed token rows from `path`, deterministic for `seed`.

    Reads documents in order only until `sample_budget(n_samples, seq_len)` tokens are held, then packs
    those (`pack`): data smaller than that gives the rows `pack(tokenize_documents(read_documents(path)))`
    gives (documents over PIECE_CHARS characters are tokenized in pieces); larger data is never read past
    that point. `vocab_size` (the model's) refuses token ids the model's embedding does not have. Documents
    named by `exclude` (held-out names) are skipped."""
    if seq_len <= 0:
        raise DataError(f"seq_len={seq_len} must be positive")
    if n_samples <= 0:
        raise DataError(f"n_samples={n_samples} must be positive")
    docs = stream_token_documents(path, tokenizer, sample_budget(n_samples, seq_len), text_field, vocab_size,
                                  exclude=exclude)
    if not docs:
        left = f" outside the held-out {', '.join(exclude)}" if exclude else ""
        raise DataError(f"no non-empty documents found in {path}{left} (looked for {TEXT_SUFFIXES} or a saved dataset)")
    return pack(docs, seq_len, n_samples, seed)
