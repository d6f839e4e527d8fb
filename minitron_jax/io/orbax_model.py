"""Model checkpoints in orbax format: `params/` (orbax, sharded), `config.json` (HF), tokenizer files.

`minitron convert` writes one from an HF directory, `minitron export` turns one back into HF.
Restores go straight into the requested shardings. Either end may be `gs://` (orbax writes and reads
through `etils.epath`; a gs:// checkpoint is committed whole by `atomic_directory`).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import Mesh, SingleDeviceSharding

from minitron_jax.core import storage
from minitron_jax.core.atomic import atomic_directory, check_complete, copy_side_files
from minitron_jax.model.config import LlamaConfig
from minitron_jax.model.llama import Llama, is_param_spec, param_specs
from minitron_jax.model.sharding import named_sharding


def save_model(model: Llama, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write `model` as an orbax checkpoint directory (temporary name, renamed when complete).

    `overwrite` replaces only a previous minitron output, never `model.source` (see `atomic.check_output`)."""
    with atomic_directory(path, kind="orbax-checkpoint", inputs=(model.source,), overwrite=overwrite) as tmp:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp / "params", model.params())
        ckptr.wait_until_finished()
        if jax.process_index() == 0:
            (tmp / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2) + "\n")
            copy_side_files(model.source, tmp)
    return storage.absolute(path)


def abstract_params(cfg: LlamaConfig, mesh: Mesh | None, dtype) -> dict:
    """ShapeDtypeStructs carrying the target sharding of every parameter."""
    dev = SingleDeviceSharding(jax.devices()[0])

    def leaf(spec):
        sharding = named_sharding(spec.axes, spec.shape, mesh) if mesh is not None else dev
        return jax.ShapeDtypeStruct(spec.shape, jnp.dtype(dtype), sharding=sharding)

    return jax.tree.map(leaf, param_specs(cfg), is_leaf=is_param_spec)


def load_model(path: str | Path, *, mesh: Mesh | None = None, dtype=None, compute_dtype=None,
               remat: str = "none") -> Llama:
    """Restore a checkpoint written by `save_model` into (sharded) device arrays."""
    path = storage.absolute(path)
    check_complete(path, "checkpoint")
    if not (path / "params").is_dir() or not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a minitron checkpoint (needs params/ and config.json); "
                                "create one with `minitron convert HF_DIR OUT`")
    cfg = LlamaConfig.from_file(path / "config.json")
    dtype = jnp.dtype(dtype or cfg.dtype)
    params = ocp.StandardCheckpointer().restore(path / "params", abstract_params(cfg, mesh, dtype))
    model = Llama(cfg.replace(dtype=dtype.name), params=params, compute_dtype=compute_dtype, remat=remat)
    model.source = str(path)
    return model
