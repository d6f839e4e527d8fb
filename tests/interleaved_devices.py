"""One process of a 2-process job whose meshes order the devices INTERLEAVED across the processes, as a TPU
slice's torus order can (tests/run/test_teacher_pass.py): every `make_mesh` without explicit devices gets
p0d0, p1d0, p0d1, p1d1, ... (each process's k-th device, process by process), so a process's rows of a batch
are not one contiguous block of it. Then runs `minitron COMMAND ARGS` (`cli.main`) and records, per process,
the mesh's device order and the global row blocks of the first batch this process holds (lead=False: a
[B, S] batch; lead=True: a [A, b, S] micro-batched one) in RECORD_DIR/pN.json.

    python tests/interleaved_devices.py RECORD_DIR COMMAND ARGS...
"""

import json
import sys
from pathlib import Path

import jax

import minitron_jax.run.cli as cli
import minitron_jax.run.teacher_pass  # noqa: F401  (imported, so that its make_mesh / to_global are patched)
import minitron_jax.train.trainer  # noqa: F401
from minitron_jax.model import sharding

REAL_MAKE_MESH, REAL_TO_GLOBAL = sharding.make_mesh, sharding.to_global
RECORD: dict = {}


def record(key: str, value) -> None:
    if key not in RECORD:
        RECORD[key] = value
        d = Path(sys.argv[1])
        d.mkdir(parents=True, exist_ok=True)
        (d / f"p{jax.process_index()}.json").write_text(json.dumps(RECORD))


def interleaved() -> list:
    """Every device, ordered by (its rank among its process's devices, its process): p0d0, p1d0, p0d1, p1d1."""
    rank: dict = {}
    key = {}
    for d in sorted(jax.devices(), key=lambda d: d.id):
        key[d.id] = (rank.setdefault(d.process_index, 0), d.process_index)
        rank[d.process_index] += 1
    return sorted(jax.devices(), key=lambda d: key[d.id])


def make_mesh(data=1, fsdp=-1, tensor=1, devices=None):
    mesh = REAL_MAKE_MESH(data, fsdp, tensor, devices=interleaved() if devices is None else devices)
    record("mesh", [d.process_index for d in mesh.devices.flat])
    return mesh


def to_global(local, mesh, lead):
    out = REAL_TO_GLOBAL(local, mesh, lead)
    x, axis = out["input_ids"], 1 if lead else 0
    blocks = {(s.index[axis].start or 0, s.index[axis].stop or x.shape[axis]) for s in x.addressable_shards}
    record(f"rows_lead{int(lead)}", sorted(blocks))
    return out


def patch() -> None:
    """Every loaded minitron_jax module's make_mesh / to_global (imported by name) -> the recording ones."""
    for name, mod in list(sys.modules.items()):
        if name.startswith("minitron_jax") and mod is not None:
            if getattr(mod, "make_mesh", None) is REAL_MAKE_MESH:
                mod.make_mesh = make_mesh
            if getattr(mod, "to_global", None) is REAL_TO_GLOBAL:
                mod.to_global = to_global


if __name__ == "__main__":
    patch()
    cli.main(sys.argv[2:])
