"""Minimal streaming safetensors reader and writer (no torch, no pickle, bf16 included).

The reader memory-maps a file and returns lazy NumPy views, so slicing one device's shard of one
tensor reads only those bytes. The writer emits one tensor at a time from a callable, so export
never holds more than one tensor on the host.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
          "BF16": np.dtype(ml_dtypes.bfloat16), "F64": np.dtype(np.float64),
          "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "U8": np.dtype(np.uint8),
          "BOOL": np.dtype(np.bool_)}
CODES = {v: k for k, v in DTYPES.items()}


class SafetensorsError(ValueError):
    pass


class SafetensorsFile:
    """Header of one .safetensors file plus lazy, memory-mapped access to its tensors."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > 100 * 2**20:
                    raise SafetensorsError("header length is implausible")
                raw = f.read(n)
                if len(raw) < n:
                    raise SafetensorsError(f"file is truncated: the header alone needs {n} bytes")
                header = json.loads(raw)
        except (struct.error, json.JSONDecodeError, UnicodeDecodeError, SafetensorsError) as e:
            raise SafetensorsError(f"{self.path} is not a valid safetensors file ({e}); re-download or re-export it") from e
        self.metadata = header.pop("__metadata__", {}) or {}
        self.header = header
        self.data_start = 8 + n
        size = self.path.stat().st_size
        for name, info in header.items():
            if info["dtype"] not in DTYPES:
                raise SafetensorsError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            want = int(np.prod(info["shape"], dtype=np.int64)) * DTYPES[info["dtype"]].itemsize
            if not 0 <= begin <= end or end - begin != want:
                raise SafetensorsError(
                    f"{self.path}: tensor {name} is {info['dtype']}{info['shape']} ({want} bytes) but its data_offsets "
                    f"{info['data_offsets']} span {end - begin} bytes; the file is corrupt, re-export it")
            if self.data_start + end > size:
                raise SafetensorsError(f"{self.path} is truncated: tensor {name} ends past the end of the file; re-download it")
        self._mmap = None

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
