"""A damaged safetensors file (minitron_jax/safetensors_io.py) is refused before any tensor bytes are
read, with a message that names the file and the fix.

The checkpoint fixtures (`ckpt`, `no_weight_reads`) are in conftest.py: a tiny random
`transformers.LlamaForCausalLM` whose model.safetensors each test damages.
"""

from __future__ import annotations

import json
import struct

import pytest

from minitron_jax.safetensors_io import SafetensorsError
from helpers import load


# ---------------------------------------------------------------------------- 9-10: damaged files
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
