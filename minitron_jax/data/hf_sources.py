"""`datasets.load_dataset` sources: `hf:PATH[?key=value&...]`, read by `data.iter_documents` (so by
`minitron tokenize` and every text reader).

    hf:json?data_files=corpus/*.jsonl                    # a packaged builder over local files, streamed
    hf:parquet?data_files=a.parquet,b.parquet&split=train
    hf:/data/my_dataset?name=CONFIG&streaming=false       # a local dataset directory load_dataset opens

Keys: `data_files` (comma-separated paths or globs, relative to PATH when PATH is a local dataset directory,
as `load_dataset` reads them, else to the working directory), `split` (default `train`), `name` (a config),
`data_dir`, `streaming` (default `true`: rows are read as they stream, nothing is cached and the corpus
never sits in memory; `false` lets `load_dataset` build its Arrow cache under its usual cache directory
first). Loading scripts are refused (`.py` paths): no code from a dataset is ever run, and
`trust_remote_code` is never passed. Hub names need the network, which this tool does not assume:
`load_dataset`'s error is reported with the hint to use local files. Document names are `SPLIT:INDEX`.
Values are taken literally (no %-decoding); a path holding `&`, `,` or `?` cannot be written.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Iterator

from minitron_jax.core.errors import FIELD_HINT, DataError

PREFIX = "hf:"
KEYS = ("data_files", "split", "name", "data_dir", "streaming")


def is_hf_source(source) -> bool:
    return isinstance(source, str) and source.startswith(PREFIX)


def parse(source: str) -> tuple[str, dict]:
    """`hf:PATH?k=v&...` -> (PATH, load_dataset keyword arguments); refuses unknown keys and scripts."""
    rest = source[len(PREFIX):]
    path, _, query = rest.partition("?")
    if not path:
        raise DataError(f"{source}: name a builder (json, parquet, text, csv) or a dataset directory after hf:, "
                        f"e.g. hf:json?data_files=corpus/*.jsonl")
    if path.endswith(".py") or (Path(path).is_dir() and any(Path(path).glob("*.py"))):
        raise DataError(f"{source}: dataset loading scripts are refused (they would run code); convert the data to "
                        "JSONL or parquet and use hf:json?data_files=... or hf:parquet?data_files=...")
    kw = dict(part.partition("=")[::2] for part in query.split("&") if part)
    if unknown := sorted(set(kw) - set(KEYS)):
        raise DataError(f"{source}: unknown key{'s' * (len(unknown) > 1)} {', '.join(unknown)}; valid keys: "
                        f"{', '.join(KEYS)}")
    streaming = kw.pop("streaming", "true").lower()
    if streaming not in ("true", "false"):
        raise DataError(f"{source}: streaming={streaming!r}; write streaming=true or streaming=false")
    kw["streaming"] = streaming == "true"
    kw.setdefault("split", "train")
    if "data_files" in kw:
        kw["data_files"] = [f for f in kw["data_files"].split(",") if f]
    return path, kw


def _base(path: str) -> Path:
    """Where relative data_files are: inside PATH if it is a local directory (load_dataset's rule), else here."""
    return Path(path) if Path(path).is_dir() else Path(".")


def normalize(source: str) -> str:
    """`source` with its local PATH and data_files made absolute, so a resumed run from another working
    directory reads the same files; refuses what `parse` refuses."""
    path, _ = parse(source)
    query = source[len(PREFIX):].partition("?")[2]
    if Path(path).is_dir():  # data_files stay relative to it
        return PREFIX + str(Path(path).absolute()) + ("?" + query if query else "")
    parts = [("data_files=" + ",".join(str(Path(f).absolute()) for f in q[len("data_files="):].split(",") if f))
             if q.startswith("data_files=") else q for q in query.split("&") if q]
    return PREFIX + path + ("?" + "&".join(parts) if parts else "")


def _globs(path: str, kw: dict) -> list[str]:
    base = _base(path)
    return [str(base / f) for f in kw["data_files"]]


def data_files(source: str) -> list[Path]:
    """The local files a source reads (its data_files globs, or the files of its directory): for sizes."""
    path, kw = parse(source)
    if "data_files" in kw:
        return [Path(p) for f in _globs(path, kw) for p in sorted(glob.glob(f, recursive=True)) if Path(p).is_file()]
    return [p for p in Path(path).rglob("*") if p.is_file()] if Path(path).is_dir() else []


def iter_hf(source: str, field: str = "text") -> Iterator[tuple[str, Iterator[str]]]:
    """(name, text chunks) per row of the dataset, in its order (`data.iter_documents`' contract)."""
    import datasets
    path, kw = parse(source)
    if "data_files" in kw:
        missing = [f for f in _globs(path, kw) if not glob.glob(f, recursive=True)]
        if missing:
            raise DataError(f"{source}: data_files {', '.join(missing)} match no file")
    try:
        ds = datasets.load_dataset(path, **kw)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as e:
        raise DataError(f"{source}: datasets.load_dataset could not open it ({type(e).__name__}: {e}); give local "
                        "files (hf:json?data_files=PATH) or a local dataset directory (hub names need the network)") from e
    split = kw["split"]
    columns = getattr(ds, "column_names", None)
    if columns is not None and field not in columns:
        raise DataError(f"{source} has no {field!r} column (columns: {columns}); " + FIELD_HINT)
    for i, row in enumerate(ds):
        if field not in row:
            raise DataError(f"{source}: row {i} has no {field!r} field (keys: {sorted(row)}); " + FIELD_HINT)
        yield f"{split}:{i}", iter((row[field],))
