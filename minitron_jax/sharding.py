"""Device mesh and the one table that maps logical axis names onto it.

Every parameter and major activation names its axes logically ("embed", "mlp", "batch", ...);
`RULES` decides which mesh axis (data, fsdp, tensor) each lands on. The same model code runs on
one CPU, 8 fake CPU devices, a GPU or a TPU slice: only the mesh changes.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None for replicated)
RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "norm": None,
    # activations
    "batch": ("data", "fsdp"),
    "seq": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    "head_dim": None,
}


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence | None = None) -> Mesh:
    """Mesh over ("data", "fsdp", "tensor"); one size may be -1 to take the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh sizes {sizes}: at most one of data/fsdp/tensor may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes {sizes} must be positive (or -1 to fill)")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split into a mesh with fixed sizes {sizes}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} devices, "
            f"but {len(devices)} are available; make the product equal {len(devices)} or use -1 for one axis")
    auto = (jax.sharding.AxisType.Auto,) * 3
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=auto, devices=devices)


def spec_for(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
    """PartitionSpec for an array of `shape` whose axes have these logical names.

    A dimension that its mesh axes do not divide evenly uses the longest prefix of them that does,
    or stays replicated (e.g. 3 KV heads on tensor=2); a mesh axis is used at most once per array.
    """
    used: set[str] = set()
    out = []
    for name, dim in zip(logical, shape):
        target = RULES.get(name) if name else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        while axes and dim % math.prod(mesh.shape[a] for a in axes):
            axes = axes[:-1]  # keep the longest prefix of mesh axes that divides the dimension
        if not axes:
            out.append(None)
            continue
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    return P(*out)


def named_sharding(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, spec_for(logical, shape, mesh))


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical names under the mesh set by `jax.set_mesh`; no-op without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, spec_for(logical, x.shape, mesh))


def describe(tree, mesh: Mesh | None = None) -> dict[str, str]:
    """Path -> sharding spec string, for logs and tests."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(k): str(getattr(v, "sharding", None).spec if hasattr(getattr(v, "sharding", None), "spec") else "-")
            for k, v in flat}


def local_shard_bytes(x: jax.Array) -> int:
    """Bytes of `x` held by its first addressable shard (what one device stores)."""
    shard = x.addressable_shards[0]
    return int(np.prod(shard.data.shape)) * x.dtype.itemsize
