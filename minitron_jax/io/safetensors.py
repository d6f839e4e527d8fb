"""Minimal streaming safetensors reader and writer (no torch, no pickle, bf16 included).

The reader memory-maps a file and returns lazy NumPy views, so slicing one device's shard of one
tensor reads only those bytes. The writer emits one tensor at a time from a callable, so export
never holds more than one tensor on the host.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

from minitron_jax.core import storage
from minitron_jax.core.errors import SafetensorsError

DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
          "BF16": np.dtype(ml_dtypes.bfloat16), "F64": np.dtype(np.float64),
          "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "U8": np.dtype(np.uint8),
          "BOOL": np.dtype(np.bool_)}
CODES = {v: k for k, v in DTYPES.items()}




MAX_HEADER = 100 * 2**20  # the safetensors library's own limit


class SafetensorsFile:
    """Header of one .safetensors file plus lazy, memory-mapped access to its tensors.

    Opening validates the whole header (JSON object, known dtypes, integer shapes and offsets that agree
    with each other, lie inside the file and do not overlap) so a damaged file is refused up front."""

    def __init__(self, path: str | Path):
        self.path = storage.path(path)
        self.remote = storage.is_url(path)  # gs://: the header, then each tensor slice, by ranged reads
        try:
            size = storage.size(self.path)
            head = storage.read_range(self.path, 0, min(8, size))
            if len(head) < 8:
                self._bad(f"only {size} bytes: too short for the 8-byte header length", "re-download it")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER:
                self._bad(f"header length {n} is implausible (limit {MAX_HEADER})", "re-download or re-export it")
            if 8 + n > size:
                self._bad(f"file is truncated: the header alone needs {n} bytes but the file has {size}",
                          "re-download it")
            raw = storage.read_range(self.path, 8, 8 + n)
        except IsADirectoryError as e:
            raise SafetensorsError(f"{self.path} is a directory, not a .safetensors file") from e
        except OSError as e:
            raise SafetensorsError(f"cannot read {self.path} ({e.strerror or e})") from e
        try:
            header = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            self._bad(f"header is not JSON ({e})", "re-download or re-export it")
        if not isinstance(header, dict):
            self._bad(f"header is a JSON {type(header).__name__}, not an object", "re-download or re-export it")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            self._bad(f"__metadata__ is a JSON {type(metadata).__name__}, not an object", "re-export it")
        self.metadata = metadata
        self.header = header
        self.data_start = 8 + n
        spans = []
        for name, info in header.items():
            begin, end = self._check_entry(name, info, size - self.data_start)
            spans.append((begin, end, name))
        spans.sort()
        for (_, end0, a), (begin1, _, b) in zip(spans, spans[1:]):
            if begin1 < end0:
                self._bad(f"tensors {a} and {b} overlap", "re-export it")
        self._mmap = None

    def _bad(self, what: str, fix: str):
        raise SafetensorsError(f"{self.path} is not a valid safetensors file: {what}; {fix}")

    def _check_entry(self, name: str, info, data_size: int) -> tuple[int, int]:
        """(begin, end) of one header entry, after checking its dtype, shape and offsets."""
        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool) and v >= 0

        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            self._bad(f"entry {name!r} is {info!r}, not an object with dtype, shape and data_offsets", "re-export it")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise SafetensorsError(f"{self.path}: tensor {name} has unsupported dtype {dtype!r}; supported: "
                                   f"{', '.join(DTYPES)}")
        if not isinstance(shape, list) or not all(is_int(d) for d in shape):
            self._bad(f"tensor {name} has shape {shape!r}, not a list of non-negative integers", "re-export it")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) for o in offsets)):
            self._bad(f"tensor {name} has data_offsets {offsets!r}, not [begin, end] integers", "re-export it")
        begin, end = offsets
        want = math.prod(shape) * DTYPES[dtype].itemsize
        if begin > end or end - begin != want:
            raise SafetensorsError(
                f"{self.path}: tensor {name} is {dtype}{shape} ({want} bytes) but its data_offsets "
                f"{offsets} span {end - begin} bytes; the file is corrupt, re-export it")
        if end > data_size:
            raise SafetensorsError(f"{self.path} is truncated: tensor {name} ends past the end of the file; re-download it")
        return begin, end

    def names(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self.header[name]["dtype"]]

    def tensor(self, name: str) -> np.ndarray:
        """A read-only memory-mapped view (a `RangedTensor` for gs://); index it to read only what you need."""
        if self.remote:
            return RangedTensor(self, name)
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        info = self.header[name]
        begin, end = info["data_offsets"]
        raw = self._mmap[self.data_start + begin: self.data_start + end]
        return raw.view(DTYPES[info["dtype"]]).reshape(info["shape"])


class RangedTensor:
    """One tensor of a safetensors file in Cloud Storage: indexing it with slices reads only the byte runs of
    that block (ranged GETs, `core.storage.read_ranges`), never the whole object. Runs closer than
    `MERGE_GAP` are read as one (a GET costs about as much as that many bytes), and no read is larger than
    `MAX_SPAN`, so host memory stays about the block asked for plus one span."""

    MERGE_GAP = 1 << 20
    MAX_SPAN = 64 << 20

    def __init__(self, file: SafetensorsFile, name: str):
        info = file.header[name]
        self.file, self.name = file, name
        self.shape, self.dtype = tuple(info["shape"]), DTYPES[info["dtype"]]
        self.ndim = len(self.shape)
        self.begin = file.data_start + info["data_offsets"][0]

    def __array__(self, dtype=None, copy=None):
        out = self[()]
        return out if dtype is None else out.astype(dtype)

    def __getitem__(self, index) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        if any(not isinstance(i, slice) for i in index) or len(index) > self.ndim:
            return self[()][index]  # integers, steps, arrays: the whole tensor, then NumPy's indexing
        bounds = [i.indices(n) if k < len(index) else (0, n, 1) for k, (i, n) in
                  enumerate(zip(index + (slice(None),) * (self.ndim - len(index)), self.shape))]
        if any(step != 1 for _, _, step in bounds):
            return self[()][index]
        lo = np.array([a for a, _, _ in bounds], dtype=np.int64)
        hi = np.maximum(lo, [b for _, b, _ in bounds])
        out = np.empty(tuple(hi - lo), self.dtype)
        if out.size == 0:
            return out
        item = self.dtype.itemsize
        # the block is contiguous from dimension j on: one run of bytes per index of dimensions [0, j)
        j = self.ndim - 1
        while j > 0 and lo[j] == 0 and hi[j] == self.shape[j]:
            j -= 1
        strides = np.array([math.prod(self.shape[k + 1:]) for k in range(self.ndim)], dtype=np.int64) * item
        run = int((hi[j] - lo[j]) * strides[j])
        grids = np.meshgrid(*[np.arange(lo[k], hi[k], dtype=np.int64) for k in range(j)], indexing="ij")
        starts = (self.begin + int(lo[j] * strides[j]) + sum((g * strides[k] for k, g in enumerate(grids)),
                                                             np.zeros((), np.int64))).reshape(-1)
        flat = out.reshape(-1, run // item)  # one row per run, in order
        spans = self._spans(starts, run)
        for (a, b, first, last), data in zip(spans, storage.read_ranges(self.file.path, [(a, b) for a, b, _, _ in spans])):
            buf = np.frombuffer(data, dtype=np.uint8)
            for r in range(first, last):
                o = int(starts[r]) - a
                flat[r] = buf[o: o + run].view(self.dtype)
        return out

    def _spans(self, starts: np.ndarray, run: int) -> list[tuple[int, int, int, int]]:
        """(begin, end, first run, last run + 1) of the reads covering the runs at `starts` (ascending)."""
        spans, first = [], 0
        for r in range(1, len(starts) + 1):
            if r == len(starts) or starts[r] - (starts[r - 1] + run) > self.MERGE_GAP \
                    or starts[r] + run - starts[first] > self.MAX_SPAN:
                spans.append((int(starts[first]), int(starts[r - 1]) + run, first, r))
                first = r
        return spans


TensorSource = tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]


def write_file(path: str | Path, tensors: Iterable[TensorSource], metadata: dict[str, str] | None = None) -> int:
    """Write (name, shape, dtype, fetch) entries, calling each `fetch` only when its bytes are due."""
    tensors = list(tensors)
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape, dtype, _ in tensors:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": CODES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with storage.path(path).open("wb") as f:  # local or gs:// (a streamed upload)
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype, fetch in tensors:
            arr = np.ascontiguousarray(fetch())
            if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
                raise SafetensorsError(f"{name}: got {arr.dtype}{arr.shape}, planned {np.dtype(dtype)}{tuple(shape)}")
            f.write(arr.tobytes())
    return offset
