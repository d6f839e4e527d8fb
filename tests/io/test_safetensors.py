"""A damaged safetensors file (io/safetensors.py) is refused before any tensor bytes are
read, with a message that names the file and the fix.

The checkpoint fixtures (`ckpt`, `no_weight_reads`) are in conftest.py: a tiny random
`transformers.LlamaForCausalLM` whose model.safetensors each test damages.
"""

from __future__ import annotations

import json
import re
import struct

import numpy as np
import pytest
from helpers import load

from minitron_jax.core.errors import SafetensorsError
from minitron_jax.io.safetensors import SafetensorsFile


# ---------------------------------------------------------------------------- damaged files
def test_truncated_safetensors(ckpt, no_weight_reads):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(SafetensorsError, match=r"model\.safetensors is truncated: tensor \S+ ends past the end of "
                                               r"the file; re-download it"):
        load(ckpt)


def test_truncated_inside_header(ckpt, no_weight_reads):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:200])
    with pytest.raises(SafetensorsError, match=r"(is not a valid safetensors file|is truncated).*re-(download|export)"):
        load(ckpt)


def test_header_size_disagreeing_with_shape(ckpt, no_weight_reads):
    f = ckpt / "model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    begin = header["model.norm.weight"]["data_offsets"][0]
    header["model.norm.weight"]["data_offsets"] = [begin, begin + 64]  # 16 floats for a (32,) tensor
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    f.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
    with pytest.raises(SafetensorsError, match=r"model\.norm\.weight"):
        load(ckpt)


# ---------------------------------------------------------------------------- every malformed header
def _with_header(f, mutate) -> None:
    """Rewrite the header of `f` through `mutate(header) -> header`, keeping the tensor bytes."""
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = mutate(json.loads(raw[8:8 + n]))
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    f.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])


def _set(name, key, value):
    def mutate(h):
        h[name][key] = value
        return h
    return mutate


def _overlap(h):
    a, b = h["model.norm.weight"], h["model.layers.0.input_layernorm.weight"]  # both (32,) float32
    b["data_offsets"] = list(a["data_offsets"])
    return h


NORM = "model.norm.weight"
DAMAGE = {  # case: (how to damage model.safetensors, what the message must say)
    "empty": (lambda f: f.write_bytes(b""), r"only 0 bytes: too short for the 8-byte header length"),
    "random bytes": (lambda f: f.write_bytes(bytes(range(256)) * 4), r"header length \d+ is implausible"),
    "header beyond file": (lambda f: f.write_bytes(struct.pack("<Q", 4096) + b"{}"),
                           r"the header alone needs 4096 bytes but the file has 10"),
    "header not JSON": (lambda f: f.write_bytes(struct.pack("<Q", 8) + b"\xff\xfenot{} "), r"header is not JSON"),
    "header a list": (lambda f: f.write_bytes(struct.pack("<Q", 8) + b"[1, 2]  "), r"header is a JSON list, not an object"),
    "metadata a list": (lambda f: _with_header(f, lambda h: {**h, "__metadata__": [1]}), r"__metadata__ is a JSON list"),
    "entry not an object": (lambda f: _with_header(f, lambda h: {**h, NORM: [1, 2]}),
                            r"entry 'model\.norm\.weight' is \[1, 2\], not an object with dtype, shape and data_offsets"),
    "entry lacks dtype": (lambda f: _with_header(f, lambda h: {**h, NORM: {"shape": [32], "data_offsets": [0, 128]}}),
                          r"entry 'model\.norm\.weight' .* not an object with dtype"),
    "unknown dtype": (lambda f: _with_header(f, _set(NORM, "dtype", "Q4")),
                      r"tensor model\.norm\.weight has unsupported dtype 'Q4'; supported: F32, F16, BF16"),
    "shape of strings": (lambda f: _with_header(f, _set(NORM, "shape", ["32"])),
                         r"tensor model\.norm\.weight has shape \['32'\], not a list of non-negative integers"),
    "negative shape": (lambda f: _with_header(f, _set(NORM, "shape", [-32])), r"shape \[-32\], not a list"),
    "offsets not a pair": (lambda f: _with_header(f, _set(NORM, "data_offsets", [0])),
                           r"data_offsets \[0\], not \[begin, end\] integers"),
    "offsets float": (lambda f: _with_header(f, _set(NORM, "data_offsets", [0.0, 128.0])), r"not \[begin, end\] integers"),
    "offsets reversed": (lambda f: _with_header(f, _set(NORM, "data_offsets", [128, 0])),
                         r"tensor model\.norm\.weight is F32\[32\] \(128 bytes\) but its data_offsets \[128, 0\]"),
    "offsets beyond the file": (lambda f: _with_header(f, _set(NORM, "data_offsets", [2**40, 2**40 + 128])),
                                r"truncated: tensor model\.norm\.weight ends past the end of the file"),
    "overlapping tensors": (lambda f: _with_header(f, _overlap), r"tensors .* and .* overlap"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_malformed_file_refused_before_reading(ckpt, no_weight_reads, case):
    damage, match = DAMAGE[case]
    f = ckpt / "model.safetensors"
    damage(f)
    with pytest.raises(SafetensorsError, match=rf"{re.escape(str(f))}(:| is).*{match}"):
        load(ckpt)
    with pytest.raises(SafetensorsError, match=match):  # the reader itself, as `--scores` uses it
        SafetensorsFile(f)


def test_directory_and_missing_file(tmp_path):
    with pytest.raises(SafetensorsError, match=rf"{re.escape(str(tmp_path))} is a directory, not a \.safetensors file"):
        SafetensorsFile(tmp_path)
    with pytest.raises(SafetensorsError, match=r"cannot read .*nope\.safetensors \(No such file or directory\)"):
        SafetensorsFile(tmp_path / "nope.safetensors")


def test_valid_file_still_reads(ckpt):
    """Control: the undamaged file passes every check and reads back what safetensors wrote."""
    from safetensors.numpy import load_file
    ref = load_file(ckpt / "model.safetensors")
    f = SafetensorsFile(ckpt / "model.safetensors")
    assert sorted(f.names()) == sorted(ref)
    for n in ref:
        np.testing.assert_array_equal(f.tensor(n), ref[n])


# ---------------------------------------------------------------------------- ranged reads (gs://)
@pytest.mark.parametrize("gap, span", [(0, 1 << 30), (1 << 20, 1 << 30), (64, 256)])
def test_ranged_tensor_blocks_equal_numpy_slices(tmp_path, monkeypatch, gap, span):
    """RangedTensor (what a gs:// checkpoint's tensors are) read block by block equals NumPy's slicing of the same
    array, for row, column, inner and empty blocks, whether nearby runs merge (gap) and however reads are cut
    (span); with gap 0 it reads exactly the block's bytes."""
    from safetensors.numpy import save_file

    from minitron_jax.core import storage
    from minitron_jax.io.safetensors import RangedTensor
    monkeypatch.setattr(RangedTensor, "MERGE_GAP", gap)
    monkeypatch.setattr(RangedTensor, "MAX_SPAN", span)
    rng = np.random.default_rng(0)
    arrays = {"a": rng.standard_normal((3, 10, 12)).astype(np.float32), "b": rng.integers(0, 9, (7, 5)).astype(np.int64)}
    save_file(arrays, tmp_path / "m.safetensors")
    f = SafetensorsFile(tmp_path / "m.safetensors")
    for name, index in [("a", (slice(1, 3),)), ("a", (slice(None), slice(None), slice(4, 8))),
                        ("a", (slice(0, 2), slice(3, 9), slice(None))), ("a", (slice(2, 3), slice(5, 6), slice(0, 1))),
                        ("a", ()), ("a", (slice(1, 1),)), ("b", (slice(None), slice(2, 5))), ("b", (slice(6, 99),)),
                        ("a", (1, slice(None), slice(None, None, 2)))]:
        t = RangedTensor(f, name)
        before = storage.bytes_read()
        got, want = t[index], arrays[name][index]
        assert got.dtype == want.dtype and np.array_equal(got, want), (name, index)
        if gap == 0 and all(isinstance(i, slice) and i.step is None for i in index):
            assert storage.bytes_read() - before == want.nbytes, (name, index)
    assert np.array_equal(np.asarray(RangedTensor(f, "b")), arrays["b"])
