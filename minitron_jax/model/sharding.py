"""Device mesh and the one table that maps logical axis names onto it.

Every parameter and major activation names its axes logically ("embed", "mlp", "batch", ...);
`RULES` decides which mesh axis (data, fsdp, tensor) each lands on. The same model code runs on
one CPU, 8 fake CPU devices, a GPU or a TPU slice: only the mesh changes.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from minitron_jax.core.errors import DataError

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


def resolve_mesh_shape(sizes: Sequence[int], devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes with the one -1 (if any) filled so that the product is `devices`."""
    sizes = [int(s) for s in sizes]
    if len(sizes) != len(MESH_AXES):
        raise ValueError(f"mesh {sizes}: give {len(MESH_AXES)} sizes ({', '.join(MESH_AXES)}), e.g. [1, -1, 1]")
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh sizes {sizes}: at most one of data/fsdp/tensor may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes {sizes} must be positive (or -1 to fill)")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes and devices % known == 0:
        sizes[sizes.index(-1)] = devices // known
    if -1 in sizes or math.prod(sizes) != devices:
        got = "x".join(str(s) for s in sizes)
        raise ValueError(f"mesh {got} (data x fsdp x tensor) does not fit {devices} devices: {devices} are "
                         f"available; make the product equal {devices} or use -1 for one axis")
    return tuple(sizes)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence | None = None) -> Mesh:
    """Mesh over ("data", "fsdp", "tensor"); one size may be -1 to take the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = resolve_mesh_shape((data, fsdp, tensor), len(devices))
    auto = (jax.sharding.AxisType.Auto,) * 3
    return jax.make_mesh(sizes, MESH_AXES, axis_types=auto, devices=devices)


def mesh_axes_for(name: str | None) -> tuple[str, ...]:
    """The mesh axes that logical axis `name` maps to (none: replicated); unknown names are an error."""
    if name is None:
        return ()
    if name not in RULES:
        raise KeyError(f"logical axis {name!r} is not in sharding.RULES; known axes: {', '.join(RULES)}. "
                       "Fix the name, or add it to RULES (None = replicated)")
    target = RULES[name]
    return (target,) if isinstance(target, str) else tuple(target or ())


def spec_for(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
    """PartitionSpec for an array of `shape` whose axes have these logical names.

    A dimension that its mesh axes do not divide evenly uses the longest prefix of them that does,
    or stays replicated (e.g. 3 KV heads on tensor=2); a mesh axis is used at most once per array.
    """
    used: set[str] = set()
    out = []
    for name, dim in zip(logical, shape):
        axes = tuple(a for a in mesh_axes_for(name) if a not in used and mesh.shape[a] > 1)
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


# ---------------------------------------------------------------------------- batch placement
def to_host(x) -> np.ndarray:
    """The whole value of `x` on this host: a global array whose shards other processes hold is gathered from
    every process (`process_allgather`; every process must call this, as for any collective), anything else is
    fetched. Never a read of a shard this process does not own."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    if isinstance(x, jax.Array) and not x.is_fully_addressable:  # replicated: this process holds a whole copy
        return np.asarray(x.addressable_data(0))
    return np.asarray(jax.device_get(x))


def batch_rows(mesh) -> int:
    """The devices a batch's rows split over: data x fsdp (1 without a mesh)."""
    return 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]


def fitting_batch(mesh, at_least: int = 8) -> int:
    """The smallest batch of at least `at_least` rows that splits over the mesh's data x fsdp devices."""
    rows = batch_rows(mesh)
    return rows * -(-at_least // rows)


def check_batch_rows(what: str, batch_size: int, rows: int, error: type[Exception] = DataError) -> None:
    """Refuse a batch of `batch_size` rows that does not split evenly over `rows` = the mesh's data x fsdp
    devices (`batch_rows`): `put` (`spec_for`) would replicate its rows over some or all of those devices
    rather than split them (8 rows on fsdp=64: every device computes every row), so each device would hold
    that many times the activations `minitron plan --compile` reports. `what` names the setting, e.g. "--batch-size 8" or "score.batch_size=8"."""
    if batch_size < 1:
        raise error(f"{what}: give at least 1 row (a multiple of the mesh's data x fsdp = {rows} devices)")
    if batch_size % rows:
        lo, hi = batch_size // rows * rows, -(-batch_size // rows) * rows
        sizes = " or ".join(str(b) for b in (lo, hi) if b > 0)
        raise error(f"{what} does not split over the mesh's data x fsdp = {rows} devices (its rows would be "
                    f"replicated, not split); give a multiple of {rows}, e.g. {sizes}")


def put(x, mesh):
    """Host batch -> device, split over the mesh's batch axes when there is a mesh."""
    if mesh is None:
        return jnp.asarray(x)
    return jax.device_put(x, named_sharding(("batch", "seq"), x.shape, mesh))


def batch_sharding(mesh, shape) -> NamedSharding:
    """[A, b, S] batches: micro-batch axis replicated, rows over the batch axes."""
    spec = named_sharding(("batch", "seq"), shape[1:], mesh).spec
    return NamedSharding(mesh, P(None, *spec))


def to_global(local: dict[str, np.ndarray], mesh, lead: bool) -> dict[str, jax.Array]:
    """Process-local numpy batch -> global sharded arrays (each process holds its own rows)."""
    out = {}
    for k, v in local.items():
        if v is None:
            out[k] = None
            continue
        gshape = list(v.shape)
        gshape[1 if lead else 0] *= jax.process_count()
        sh = batch_sharding(mesh, gshape) if lead else named_sharding(("batch", "seq"), gshape, mesh)
        out[k] = jax.make_array_from_process_local_data(sh, v, tuple(gshape))
    return out
