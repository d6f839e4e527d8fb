"""Documents from local files -> tokenized, packed, fixed-length samples.

Sources: a directory of `.txt` files (one document per file), `.txt`, `.jsonl` (a `text` field per
line), `.parquet` (a `text` column), or a dataset saved with `datasets.save_to_disk`. Documents are
packed (BOS + tokens + EOS, concatenated, split into rows): no padding noise in calibration.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


class DataError(ValueError):
    """Input data that cannot give what was asked for."""


def read_jsonl(path: str | Path):
    """(line number, object) for each non-blank line; a line that is not a JSON object is a DataError."""
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i + 1} is not valid JSON ({e}); JSONL needs one object per line") from e
        if not isinstance(row, dict):
            raise DataError(f"{path}:{i + 1} is a JSON {type(row).__name__}, not an object; JSONL needs one object per line")
        yield i + 1, row


def _read_file(path: Path, field: str) -> list[tuple[str, str]]:
    if path.suffix == ".txt":
        return [(path.name, path.read_text(errors="replace"))]
    if path.suffix in (".jsonl", ".json"):
        out = []
        for n, row in read_jsonl(path):
            if field not in row:
                raise DataError(f"{path}:{n} has no {field!r} field (keys: {sorted(row)}); pass text_field=...")
            out.append((f"{path.name}:{n}", row[field]))
        return out
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        table = pq.read_table(path)
        if field not in table.column_names:
            raise DataError(f"{path} has no {field!r} column (columns: {table.column_names}); pass text_field=...")
        return [(f"{path.name}:{i}", t) for i, t in enumerate(table.column(field).to_pylist())]
    raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {TEXT_SUFFIXES}")


def read_documents(path: str | Path, text_field: str = "text") -> list[tuple[str, str]]:
    """(name, text) pairs, in a stable order, from a file, a directory of files, or a saved dataset."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data path {path} does not exist")
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()
                          or (path / "dataset_dict.json").exists()):
        import datasets
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
        if text_field not in ds.column_names:
            raise DataError(f"dataset {path} has no {text_field!r} column (columns: {ds.column_names})")
        docs = [(f"{path.name}:{i}", t) for i, t in enumerate(ds[text_field])]
    elif path.is_dir():
        # .json files in a directory are metadata (markers, configs), not JSONL data
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl", ".parquet"))
        docs = [d for f in files for d in _read_file(f, text_field)]
    else:
        docs = _read_file(path, text_field)
    docs = [(n, t) for n, t in docs if isinstance(t, str) and t.strip()]
    if not docs:
        raise DataError(f"no non-empty documents found in {path} (looked for {TEXT_SUFFIXES} or a saved dataset)")
    return docs


def split_documents(docs: Sequence[tuple[str, str]], holdout: Sequence[str] = (), holdout_fraction: float = 0.0,
                    seed: int = 0) -> tuple[list, list]:
    """(train, held_out): documents whose name contains one of `holdout`, else a seeded fraction."""
    if holdout:
        held = [d for d in docs if any(h in d[0] for h in holdout)]
        if not held:
            raise DataError(f"no document name matches the held-out names {list(holdout)}")
        return [d for d in docs if d not in held], held
    n = int(round(len(docs) * holdout_fraction))
    if holdout_fraction > 0 and (n == 0 or n == len(docs)):
        raise DataError(f"{len(docs)} documents cannot be split with holdout_fraction={holdout_fraction}")
    order = np.random.default_rng(seed).permutation(len(docs))
    held = set(order[:n].tolist())
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


def tokenize_documents(docs: Sequence[tuple[str, str]], tokenizer, add_bos: bool = True, add_eos: bool = True) -> list[np.ndarray]:
    """Token ids per document with BOS/EOS added once per document (no special tokens inside)."""
    enc = tokenizer([t for _, t in docs], add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    out = []
    for ids in enc:
        ids = ([bos] if add_bos and bos is not None else []) + list(ids) + ([eos] if add_eos and eos is not None else [])
        out.append(np.asarray(ids, np.int32))
    return out


def pack(token_docs: Sequence[np.ndarray], seq_len: int, n_samples: int | None = None, seed: int = 0) -> np.ndarray:
    """Concatenate documents (in a seeded order) and cut [n, seq_len] rows; rows drawn by seed."""
    if seq_len <= 0:
        raise DataError(f"seq_len={seq_len} must be positive")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(token_docs))
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


def load_samples(path: str | Path, tokenizer, n_samples: int, seq_len: int, seed: int = 0,
                 text_field: str = "text") -> np.ndarray:
    """[n_samples, seq_len] int32 packed token rows from `path`, deterministic for `seed`."""
    docs = read_documents(path, text_field)
    return pack(tokenize_documents(docs, tokenizer), seq_len, n_samples, seed)
