"""Token store: a tokenized corpus on disk (or any TensorStore kvstore), read by random access.

Layout under STORE (a local path or a kvstore URL such as `gs://bucket/path`):

* `tokens/`      zarr3 array, uint32 [n_tokens]: every document's BOS + tokens + EOS, concatenated.
* `doc_offsets/` zarr3 array, int64 [n_documents + 1]: document i is `tokens[off[i]:off[i + 1]]`;
  off[0] = 0 and off[-1] = n_tokens.
* `doc_names/`   JSON files `doc_names/000000.json`, ...: the names of documents [k*B, (k+1)*B) as
  `data.iter_documents` gave them (`hamlet_gut.txt`, `file.jsonl:3`), B = `layout.names_block`.
* `manifest.json` written LAST: the store is complete only once it exists (`MANIFEST_FIELDS`).
* `state.json`   only while a `tokenize` run is in progress or was interrupted (resume point); deleted
  when the manifest is written.

Both arrays are sharded (`sharding_indexed`): shards of `shard` elements hold zstd-compressed inner
chunks of `chunk` elements, so a window read touches one or two small inner chunks, and a store of
1e11 tokens is 1e11 / 4 Mi = ~24k shard files. Shards are written whole, once (`Appender`); the
bytes of a store depend only on its contents, not on how its writes were split.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from minitron_jax.core import storage
from minitron_jax.core.errors import StoreError

FORMAT = "minitron-token-store"
VERSION = 1
MANIFEST, STATE = "manifest.json", "state.json"
TOKENS, OFFSETS, NAMES = "tokens", "doc_offsets", "doc_names"
NAMES_BLOCK = 1 << 16  # document names per JSON file
READ_CACHE = 16 << 20  # bytes of decoded chunks and shard indexes a reader keeps per array
TOKEN_SHARD, TOKEN_CHUNK = 1 << 22, 1 << 14  # 16 MiB shards of 64 KiB chunks (uint32)
OFFSET_SHARD, OFFSET_CHUNK = 1 << 16, 1 << 12  # 512 KiB shards of 32 KiB chunks (int64)
CAPACITY = 1 << 42  # the arrays' shape while writing (sparse: nothing is stored for it); cut to size at the end
MANIFEST_FIELDS = ("format", "version", "tokens", "documents", "dtype", "tokenizer", "sources", "field",
                   "skipped_documents", "layout")




def kvstore_url(store: str | Path) -> str:
    """`file:///abs/path` for a local path; a URL (`scheme://...`) unchanged (gs://: TensorStore is pointed at
    `STORAGE_EMULATOR_HOST` when that is set, `core.storage.configure`)."""
    s = str(store)
    if s.startswith("gs://"):
        storage.configure()
    return s.rstrip("/") if "://" in s else "file://" + str(Path(s).absolute())


def _kv(store):
    import tensorstore as ts
    return ts.KvStore.open(kvstore_url(store) + "/").result()


def read_json(store, key: str) -> dict | None:
    """A JSON file of the store, or None when it does not exist."""
    r = _kv(store).read(key).result()
    return json.loads(r.value) if r.state == "value" else None


def write_json(store, key: str, obj: dict) -> None:
    """One small file, replaced whole (the file kvstore writes a temporary and renames it)."""
    _kv(store).write(key, json.dumps(obj, indent=1, sort_keys=True).encode() + b"\n").result()


def list_keys(store) -> list[str]:
    return [k.decode() for k in _kv(store).list().result()]


LOCK_SUFFIX = ".__lock"  # TensorStore's file kvstore writes KEY through KEY.__lock, then renames it to KEY


def clear_stale_locks(store) -> int:
    """Remove the `KEY.__lock` files that a writer killed mid-write left in the local store `store` (a URL has
    none); returns how many. TensorStore's file kvstore reuses such a file without truncating it, so the next
    write of KEY keeps the stale tail, and the shard then fails its checksum on every read ("DATA_LOSS: ...
    Digest mismatch"). Call it only where no process is writing the store: before a resumed write starts."""
    if "://" in str(store) or not Path(store).is_dir():
        return 0
    stale = [f for f in Path(store).rglob(f"*{LOCK_SUFFIX}") if f.is_file()]
    for f in stale:
        f.unlink(missing_ok=True)
    return len(stale)


def delete_all(store) -> None:
    import tensorstore as ts
    _kv(store).delete_range(ts.KvStore.KeyRange()).result()


def delete_key(store, key: str) -> None:
    import tensorstore as ts
    _kv(store).delete_range(ts.KvStore.KeyRange(key, key + "\0")).result()


def delete_prefix(store, prefix: str) -> None:
    """Every key that starts with `prefix` (e.g. `parts/`)."""
    import tensorstore as ts
    _kv(store).delete_range(ts.KvStore.KeyRange(prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1))).result()
    s = str(store)
    local = s[len("file://"):] if s.startswith("file://") else None if "://" in s else s
    if local is not None and (d := Path(local) / prefix).is_dir():  # the file kvstore leaves the directories
        for sub, _, _ in sorted(os.walk(d), key=lambda w: -len(w[0])):
            with contextlib.suppress(OSError):  # only empty ones go
                os.rmdir(sub)


def array_spec(store, name: str, dtype: str, shard: int, chunk: int, shape: int | None = None) -> dict:
    """The zarr3 spec of one array of the store; `shape` given: the metadata to create it."""
    spec = {"driver": "zarr3", "kvstore": kvstore_url(store) + "/" + name + "/"}
    if shape is not None:
        spec["metadata"] = {
            "shape": [shape], "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [shard]}},
            "codecs": [{"name": "sharding_indexed", "configuration": {
                "chunk_shape": [chunk],
                "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                           {"name": "zstd", "configuration": {"level": 3, "checksum": False}}],
                "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]}}]}
    return spec


def open_array(store, name: str, dtype: str = "uint32", shard: int = TOKEN_SHARD, chunk: int = TOKEN_CHUNK,
               create: bool = False):
    import tensorstore as ts
    if create:
        return ts.open(array_spec(store, name, dtype, shard, chunk, CAPACITY), create=True, open=True).result()
    # reading: shard indexes and recently read chunks stay in a bounded cache (READ_CACHE bytes per array)
    return ts.open(array_spec(store, name, dtype, shard, chunk),
                   context=ts.Context({"cache_pool": {"total_bytes_limit": READ_CACHE}})).result()


def tokenizer_identity(path: str | Path) -> str:
    """sha256 of `tokenizer.json` (in directory `path`, or `path` itself): the store's tokenizer identity."""
    p = storage.path(path)
    p = p / "tokenizer.json" if p.is_dir() else p
    if not p.is_file():
        raise StoreError(f"{p} does not exist: a token store needs a fast (tokenizers) tokenizer saved as "
                         f"tokenizer.json; save it with AutoTokenizer.from_pretrained(...).save_pretrained(DIR)")
    return hashlib.sha256(p.read_bytes()).hexdigest()


class Appender:
    """Appends to a 1-D array in whole shards: values are held until their shard is full (`write`), or
    written with the partial last shard (`write(partial=True)`). Reopened at `count` elements, it reads
    the partial shard back, so the next write of that shard rewrites it whole."""

    def __init__(self, array, shard: int, count: int, dtype):
        self.array, self.shard, self.dtype = array, shard, np.dtype(dtype)
        self.start = count // shard * shard  # the first element held (shard-aligned)
        held = array[self.start:count].read().result() if count > self.start else np.zeros(0, self.dtype)
        self.parts, self.n = [np.asarray(held, self.dtype)], count - self.start

    @property
    def count(self) -> int:
        return self.start + self.n

    def append(self, values) -> None:
        a = np.asarray(values, self.dtype)
        self.parts.append(a)
        self.n += len(a)

    def write(self, partial: bool = False) -> int:
        """Write every full shard held (and with `partial` the rest); returns the elements now on storage."""
        full = self.n // self.shard * self.shard
        upto = self.n if partial else full
        if upto == 0:
            return self.start
        buf = np.concatenate(self.parts)
        self.array[self.start:self.start + upto].write(buf[:upto]).result()
        self.parts, self.start, self.n = [buf[full:].copy()], self.start + full, self.n - full
        return self.start + (self.n if partial else 0)


def names_key(k: int) -> str:
    return f"{NAMES}/{k:06d}.json"


class NameAppender:
    """Document names in blocks of `block` per JSON file; reopened at `count` documents, it reads the partial
    block back (cut to `count`), so the next `write` rewrites that block whole."""

    def __init__(self, store, block: int, count: int):
        self.store, self.block = store, block
        self.first = count // block * block
        held = (read_json(store, names_key(count // block)) or {"names": []})["names"] if count > self.first else []
        self.names = list(held[:count - self.first])

    def append(self, name: str) -> None:
        self.names.append(name)

    def write(self) -> None:
        """Every block held, the partial last one included; then hold only that partial block."""
        for k in range(0, len(self.names), self.block):
            write_json(self.store, names_key((self.first + k) // self.block), {"names": self.names[k:k + self.block]})
        full = len(self.names) // self.block * self.block
        self.first, self.names = self.first + full, self.names[full:]


def finish(store, n_tokens: int, n_docs: int, manifest: dict) -> dict:
    """Cut both arrays to size and write the manifest (last): the store is complete."""
    tokens, offsets = open_array(store, TOKENS), open_array(store, OFFSETS, "int64")
    tokens.resize(exclusive_max=[n_tokens], shrink_only=True, resize_metadata_only=True).result()
    offsets.resize(exclusive_max=[n_docs + 1], shrink_only=True, resize_metadata_only=True).result()
    manifest = {"format": FORMAT, "version": VERSION, "tokens": n_tokens, "documents": n_docs, "dtype": "uint32",
                **manifest}
    missing = [k for k in MANIFEST_FIELDS if k not in manifest]
    assert not missing, missing
    write_json(store, MANIFEST, manifest)
    return manifest


class TokenStore:
    """A complete store: `manifest`, `tokens` and `offsets` (TensorStore arrays), `read(a, b)`, `document(i)`."""

    def __init__(self, store, manifest: dict):
        self.store, self.manifest = store, manifest
        self.tokens, self.offsets = open_array(store, TOKENS), open_array(store, OFFSETS, "int64")
        self.n_tokens, self.n_documents = manifest["tokens"], manifest["documents"]

    def __len__(self) -> int:
        return self.n_tokens

    def read(self, start: int, stop: int) -> np.ndarray:
        """uint32 tokens [start, stop) of the token stream."""
        return self.tokens[start:stop].read().result()

    def document_offsets(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """int64 offsets of documents start..stop (stop included: stop - start + 1 values)."""
        stop = self.n_documents if stop is None else stop
        return self.offsets[start:stop + 1].read().result()

    def document(self, i: int) -> np.ndarray:
        a, b = self.document_offsets(i, i + 1)
        return self.read(int(a), int(b))

    def names(self, start: int, stop: int) -> list[str]:
        """Names of documents [start, stop), as the sources named them (`data.iter_documents`)."""
        block = self.manifest["layout"].get("names_block")
        if block is None:
            raise StoreError(f"token store {self.store} records no document names; tokenize the sources again")
        out = []
        for k in range(start // block, (max(stop, start + 1) - 1) // block + 1):
            names = read_json(self.store, names_key(k))["names"]
            out += names[max(start - k * block, 0):max(stop - k * block, 0)]
        return out

    def find_documents(self, substrings) -> np.ndarray:
        """Sorted indices of the documents whose name contains any of `substrings` (one name file at a time);
        StoreError naming the substrings that match no document."""
        block = self.manifest["layout"].get("names_block")
        if block is None:
            raise StoreError(f"token store {self.store} records no document names, so documents cannot be held out "
                             "by name; tokenize the sources again, or use holdout_fraction")
        found, matched, some = [], set(), []
        for k in range(0, self.n_documents, block):
            names = self.names(k, min(k + block, self.n_documents))
            some += names[:8 - len(some)]
            for i, n in enumerate(names):
                hit = [h for h in substrings if h in n]
                if hit:
                    found.append(k + i)
                    matched.update(hit)
        if missing := [h for h in substrings if h not in matched]:
            raise StoreError(f"no document name of token store {self.store} matches the held-out name"
                             f"{'s' * (len(missing) > 1)} {', '.join(map(repr, missing))}; the documents are: "
                             f"{', '.join(some)}{', ...' if self.n_documents > len(some) else ''} "
                             f"({self.n_documents:,} documents); give part of a document name")
        return np.asarray(found, np.int64)


def open_store(store) -> TokenStore:
    """Open a complete store; StoreError (naming the fix) when it is missing, unfinished or inconsistent."""
    try:
        manifest = read_json(store, MANIFEST)
    except ValueError as e:  # a kvstore URL tensorstore cannot open, or bad JSON
        raise StoreError(f"token store {store}: cannot read its {MANIFEST} ({e})") from e
    if manifest is None:
        state = read_json(store, STATE)
        if state is not None:
            raise StoreError(f"token store {store} is unfinished ({state['documents']:,} documents written); run "
                             "the same `minitron tokenize` command again to finish it")
        raise StoreError(f"{store} is not a token store (no {MANIFEST}); create one with `minitron tokenize "
                         f"SOURCE --tokenizer HF_DIR --out {store}`")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise StoreError(f"token store {store}: format {manifest.get('format')!r} version {manifest.get('version')!r}"
                         f", this code reads {FORMAT!r} version {VERSION}; tokenize the sources again")
    ts_ = TokenStore(store, manifest)
    shapes = (ts_.tokens.shape[0], ts_.offsets.shape[0])
    if shapes != (ts_.n_tokens, ts_.n_documents + 1) or int(ts_.document_offsets(ts_.n_documents - 1)[-1]) != ts_.n_tokens:
        raise StoreError(f"token store {store} is inconsistent: arrays of shape {shapes} for a manifest of "
                         f"{ts_.n_tokens:,} tokens and {ts_.n_documents:,} documents; tokenize the sources again "
                         "(--overwrite)")
    return ts_
