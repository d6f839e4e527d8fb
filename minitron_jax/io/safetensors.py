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
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    self._bad(f"only {size} bytes: too short for the 8-byte header length", "re-download it")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER:
                    self._bad(f"header length {n} is implausible (limit {MAX_HEADER})", "re-download or re-export it")
                if 8 + n > size:
                    self._bad(f"file is truncated: the header alone needs {n} bytes but the file has {size}",
                              "re-download it")
                raw = f.read(n)
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
        """A read-only memory-mapped view; index it to read only what you need."""
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        info = self.header[name]
        begin, end = info["data_offsets"]
        raw = self._mmap[self.data_start + begin: self.data_start + end]
        return raw.view(DTYPES[info["dtype"]]).reshape(info["shape"])


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
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype, fetch in tensors:
            arr = np.ascontiguousarray(fetch())
            if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
                raise SafetensorsError(f"{name}: got {arr.dtype}{arr.shape}, planned {np.dtype(dtype)}{tuple(shape)}")
            f.write(arr.tobytes())
    return offset
