"""Hugging Face Llama / Mistral / Qwen2 / Qwen3 checkpoints <-> sharded JAX parameters, one tensor at a time.

Import checks every tensor name and shape against the config before reading any weights, then
builds each (layer-stacked) parameter with `jax.make_array_from_callback`: every device reads
only its own slice straight from the memory-mapped safetensors files, cast on the way. Export
writes sharded safetensors tensor by tensor into a temporary directory that is renamed when
complete. Pickle (`.bin`) checkpoints are refused, never unpickled; shard files that resolve outside
the model directory are refused, never read. `load_tokenizer` checks the tokenizer files and size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from minitron_jax.core import storage
from minitron_jax.core.atomic import SIDE_FILES, atomic_directory, check_complete, check_output, copy_side_files
from minitron_jax.core.errors import CheckpointError, clip_repr
from minitron_jax.io.safetensors import SafetensorsFile, write_file
from minitron_jax.model.config import LlamaConfig
from minitron_jax.model.llama import Llama, param_specs
from minitron_jax.model.sharding import named_sharding, to_host

LAYER_HF = {"input_layernorm": "input_layernorm.weight", "q_proj": "self_attn.q_proj.weight",
            "k_proj": "self_attn.k_proj.weight", "v_proj": "self_attn.v_proj.weight",
            "o_proj": "self_attn.o_proj.weight", "post_attention_layernorm": "post_attention_layernorm.weight",
            "gate_proj": "mlp.gate_proj.weight", "up_proj": "mlp.up_proj.weight", "down_proj": "mlp.down_proj.weight",
            "q_bias": "self_attn.q_proj.bias", "k_bias": "self_attn.k_proj.bias", "v_bias": "self_attn.v_proj.bias",
            "q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight"}
TOP_HF = {"embed_tokens": "model.embed_tokens.weight", "norm": "model.norm.weight", "lm_head": "lm_head.weight"}
# Non-parameter buffers some exporters leave behind; safe to ignore.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)



def hf_name(key: str, layer: int | None = None) -> str:
    return TOP_HF[key] if layer is None else f"model.layers.{layer}.{LAYER_HF[key]}"


def expected_tensors(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, for this config."""
    specs = param_specs(cfg)
    out = {}
    for key in ("embed_tokens", "norm", "lm_head"):
        if key in specs:
            out[hf_name(key)] = specs[key].shape
    for key, spec in specs["layers"].items():
        for i in range(cfg.num_hidden_layers):
            out[hf_name(key, i)] = spec.shape[1:]
    return out


# ---------------------------------------------------------------------------- reading
def open_checkpoint(path: str | Path) -> dict[str, SafetensorsFile]:
    """Tensor name -> the file that holds it, for a single or index-sharded safetensors checkpoint (a local
    directory or a gs:// prefix: then every tensor is read by ranged reads)."""
    path = storage.path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory: expected an HF model directory")
    check_complete(path)
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.exists():
        weight_map = _read_index(index)
        files = {}
        for fname in sorted(set(weight_map.values())):
            files[fname] = SafetensorsFile(_inside(path, fname, index))
        out = {}
        for name, fname in weight_map.items():
            if name not in files[fname].header:
                raise CheckpointError(f"{index} places {name} in {fname}, but that file does not contain it")
            out[name] = files[fname]
        return out
    if single.exists():
        f = SafetensorsFile(_inside(path, single.name, None))
        return {name: f for name in f.names()}
    pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
    if pickles:
        raise CheckpointError(
            f"{path} holds only pickle weights ({', '.join(pickles)}). minitron_jax never unpickles model "
            "files (they can run arbitrary code). Convert them to safetensors once, in an environment you "
            "trust: `LlamaForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)`.")
    raise CheckpointError(f"{path} has no model.safetensors or model.safetensors.index.json")


def _read_index(index: Path) -> dict[str, str]:
    """The weight_map of a model.safetensors.index.json, checked to be a mapping of tensor name -> file name."""
    try:
        d = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index} cannot be read as JSON ({e}); re-download it or delete it if the "
                              "directory holds a single model.safetensors") from e
    if not isinstance(d, dict) or not isinstance(d.get("weight_map"), dict):
        what = (f"a JSON {type(d).__name__}, not an object" if not isinstance(d, dict) else "no weight_map"
                if "weight_map" not in d else f"weight_map={clip_repr(d['weight_map'])}")
        raise CheckpointError(f"{index} is malformed ({what}): it needs a 'weight_map' object mapping tensor names "
                              "to shard file names; re-download it")
    bad = [(k, v) for k, v in d["weight_map"].items() if not isinstance(v, str) or not v]
    if bad:
        raise CheckpointError(f"{index} is malformed: weight_map[{bad[0][0]!r}] = {clip_repr(bad[0][1])} is not a shard "
                              "file name; re-download it")
    return d["weight_map"]


def _inside(path: Path, fname: str, index: Path | None) -> Path:
    """`path/fname`, refused unless it is a plain name that stays inside `path` once symlinks are resolved
    (an HF hub snapshot's links into its sibling `blobs/` folder are allowed)."""
    where = f"{index} names shard {fname}" if index else f"{path / fname}"
    rel = Path(fname)
    if rel.is_absolute() or ".." in rel.parts:
        raise CheckpointError(f"{where}: shard names must be file names inside {path}, not absolute or '..' "
                              "paths; refusing to read outside the model directory")
    target = path / rel
    if not target.exists():
        raise CheckpointError(f"{where}, which is missing from {path}; re-download it")
    if storage.is_url(path):  # object storage: no links to leave the prefix through
        return target
    root = path.resolve()
    roots = [root] + ([root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [])
    real = target.resolve()
    if not any(real.is_relative_to(r) for r in roots):
        raise CheckpointError(f"{where}, which resolves through a symlink to {real}, outside the model directory; copy the file "
                              f"into {path} if it is really meant to be read")
    if not real.is_file():
        raise CheckpointError(f"{where}: {target} is not a file")
    return target


def check_tensors(tensors: dict[str, SafetensorsFile], cfg: LlamaConfig, path) -> None:
    """Missing / unexpected tensors and shape mismatches, all reported at once, before any reading."""
    expected = expected_tensors(cfg)
    present = {n for n in tensors if not n.endswith(IGNORED_SUFFIXES)}
    if cfg.tie_word_embeddings:
        present.discard("lm_head.weight")  # some exporters write the tied copy too; transformers ignores it
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    wrong = [f"{n}: file {tensors[n].shape(n)}, config expects {expected[n]}"
             for n in sorted(set(expected) & present) if tensors[n].shape(n) != tuple(expected[n])]
    problems = []
    if missing:
        hint = " (lm_head.weight is missing: is tie_word_embeddings wrongly false?)" if missing == ["lm_head.weight"] else ""
        problems.append(f"missing tensors ({len(missing)}): {_short(missing)}{hint}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {_short(unexpected)}")
    if wrong:
        problems.append("shapes that disagree with config.json: " + "; ".join(wrong[:8]))
    if problems:
        raise CheckpointError(
            f"{path} does not match its config.json ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
            f"ffn {cfg.intermediate_size}, {cfg.num_attention_heads}/{cfg.num_key_value_heads} heads, "
            f"head_dim {cfg.head_dim}, tie={cfg.tie_word_embeddings}):\n  - " + "\n  - ".join(problems)
            + "\nFix config.json to describe these weights, or re-export the checkpoint.")
    bad_dtype = sorted({str(tensors[n].dtype(n)) for n in expected if tensors[n].dtype(n).kind != "f"
                        and str(tensors[n].dtype(n)) != "bfloat16"})
    if bad_dtype:
        raise CheckpointError(f"{path}: weights must be floating point, found {bad_dtype}")


def _short(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f" ... (+{len(names) - n} more)" if len(names) > n else "")


def load_params(path: str | Path, cfg: LlamaConfig | None = None, *, mesh: Mesh | None = None,
                dtype=None) -> tuple[dict[str, Any], LlamaConfig]:
    """Stream an HF checkpoint into (sharded) arrays. Returns (params, config). Each process reads only the
    blocks its own devices hold (from gs://: by ranged reads, `core.storage.bytes_read` counts them)."""
    path = storage.path(path)
    cfg = cfg or LlamaConfig.from_file(path)
    tensors = open_checkpoint(path)
    check_tensors(tensors, cfg, path)
    target = np.dtype(jnp.dtype(dtype or cfg.dtype))
    remote = storage.is_url(path)

    def build(key: str, shape, axes, stacked: bool):
        sharding = (named_sharding(axes, shape, mesh) if mesh is not None
                    else SingleDeviceSharding(jax.devices()[0]))
        blocks: dict[str, np.ndarray] = {}  # a block that several local devices hold is read once

        def read(index):
            if not stacked:
                return np.asarray(tensors[hf_name(key)].tensor(hf_name(key))[index], dtype=target)
            layers = range(cfg.num_hidden_layers)[index[0]]
            return np.stack([np.asarray(tensors[hf_name(key, i)].tensor(hf_name(key, i))[index[1:]], dtype=target)
                             for i in layers])

        def once(index):
            k = repr(index)
            if k not in blocks:
                blocks[k] = read(index)
            return blocks[k]

        rows = _row_blocks(shape, stacked, mesh) if remote else None
        if rows is None or rows == sharding:
            return jax.make_array_from_callback(shape, sharding, once)
        # from gs://: each device reads a block of whole rows (one byte range per layer, no two devices the
        # same bytes), then the devices exchange them into the parameter's own sharding
        return _reshard(rows, sharding)(jax.make_array_from_callback(shape, rows, once))

    specs = param_specs(cfg)
    params: dict[str, Any] = {k: build(k, s.shape, s.axes, stacked=False) for k, s in specs.items() if k != "layers"}
    params["layers"] = {k: build(k, s.shape, s.axes, stacked=True) for k, s in specs["layers"].items()}
    return params, cfg.replace(dtype=target.name)


def _row_blocks(shape, stacked: bool, mesh: Mesh | None) -> NamedSharding | None:
    """The sharding that gives each device of `mesh` a block of whole rows of each stored tensor (axis 1 of a
    stacked [L, ...] parameter, else axis 0): contiguous bytes, read once per job. None when the rows do not
    split evenly over the devices (then each device reads its own block of the parameter's sharding)."""
    if mesh is None or mesh.size == 1:
        return None
    axis = 1 if stacked else 0
    if len(shape) <= axis or shape[axis] % mesh.size:
        return None
    return NamedSharding(mesh, PartitionSpec(*([None] * axis), tuple(mesh.axis_names)))


def _reshard(src: NamedSharding, dst) -> Any:
    return jax.jit(lambda x: x, in_shardings=src, out_shardings=dst)


def from_pretrained(path: str | Path, *, mesh: Mesh | None = None, dtype=None, compute_dtype=None,
                    remat: str = "none") -> Llama:
    """Load an HF Llama (Mistral, Qwen2, Qwen3) directory into a (sharded) `Llama`; `dtype` defaults to the stored dtype."""
    params, cfg = load_params(path, mesh=mesh, dtype=dtype)
    model = Llama(cfg, params=params, compute_dtype=compute_dtype, remat=remat)
    model.source = storage.source_name(path)
    return model


# The vocabulary (one of these) and tokenizer_config.json (special tokens, tokenizer class) must exist.
TOKENIZER_VOCAB_FILES = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"))
TOKENIZER_CONFIG = "tokenizer_config.json"


def load_tokenizer(path: str | Path, vocab_size: int | None = None):
    """The tokenizer of an HF model directory (`AutoTokenizer`, never remote code). Checks its files
    first, and with `vocab_size` (the model's embedding rows) refuses one that can emit larger ids. From gs://:
    a local copy of its tokenizer files (`transformers` reads local files)."""
    if storage.is_url(path):
        check_complete(path)
        path = storage.local_copy(path, SIDE_FILES, "model directory")
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory: expected an HF model directory with tokenizer files")
    has_vocab = any(all((path / f).is_file() for f in group) for group in TOKENIZER_VOCAB_FILES)
    if not has_vocab or not (path / TOKENIZER_CONFIG).is_file():
        wanted = " or ".join("+".join(g) for g in TOKENIZER_VOCAB_FILES) + f", and {TOKENIZER_CONFIG}"
        raise CheckpointError(f"{path} has no tokenizer (looked for {wanted}); copy the tokenizer files of "
                              "the model it came from into it")
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as e:  # tokenizers / transformers raise many types for unreadable files
        raise CheckpointError(f"cannot load the tokenizer of {path} ({type(e).__name__}: {e}); copy the "
                              "tokenizer files of the model it came from into it") from e
    if vocab_size is not None and len(tok) > vocab_size:
        raise CheckpointError(
            f"the tokenizer of {path} has {len(tok)} tokens but the model's embedding has only {vocab_size} rows: "
            "ids beyond it would give NaN everywhere; use the tokenizer of the model these weights came from")
    return tok


# ---------------------------------------------------------------------------- writing
def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def save_params(params: dict[str, Any], cfg: LlamaConfig, path: str | Path, *, source: str | Path | None = None,
                max_shard_size: int | str = "5GB", dtype=None, overwrite: bool = False) -> Path:
    """Write an HF directory (safetensors shards, config.json, side files copied from `source`).

    `overwrite` replaces only a previous minitron output, never `source` (see `atomic.check_output`)."""
    cfg.check_transformers_loadable()
    path = check_output(path, inputs=(source,), overwrite=overwrite)
    out_dtype = np.dtype(jnp.dtype(dtype)) if dtype else None
    specs = param_specs(cfg)
    entries = []  # (hf name, shape, dtype, fetch)
    for key in ("embed_tokens", "layers", "norm", "lm_head"):
        if key not in specs:
            continue
        if key == "layers":
            for i in range(cfg.num_hidden_layers):
                for k in specs["layers"]:
                    arr = params["layers"][k]
                    entries.append((hf_name(k, i), arr.shape[1:], out_dtype or arr.dtype, _fetch(arr, i, out_dtype)))
        else:
            arr = params[key]
            entries.append((hf_name(key), arr.shape, out_dtype or arr.dtype, _fetch(arr, None, out_dtype)))
    expected = expected_tensors(cfg)
    for name, shape, _, _ in entries:
        if tuple(shape) != tuple(expected[name]):
            raise CheckpointError(f"{name} has shape {tuple(shape)} but the config implies {expected[name]}")

    limit = parse_size(max_shard_size)
    shards, cur, cur_bytes = [], [], 0
    for e in entries:
        nbytes = int(np.prod(e[1])) * np.dtype(e[2]).itemsize
        if cur and cur_bytes + nbytes > limit:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(e)
        cur_bytes += nbytes
    shards.append(cur)

    with atomic_directory(path, kind="hf", inputs=(source,), overwrite=overwrite) as tmp:
        weight_map, total = {}, 0
        for n, shard in enumerate(shards):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
            if jax.process_index() == 0:
                total += write_file(tmp / fname, shard)
            else:  # other processes take part in the all-gathers only
                for e in shard:
                    e[3]()
            weight_map.update({e[0]: fname for e in shard})
        if jax.process_index() == 0:
            if len(shards) > 1:
                (tmp / "model.safetensors.index.json").write_text(json.dumps(
                    {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
            hf_cfg = cfg.to_hf_dict()
            hf_cfg["dtype"] = hf_cfg["torch_dtype"] = (out_dtype or np.dtype(entries[0][2])).name
            (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
            copy_side_files(source, tmp)
    return path


def _fetch(arr: jax.Array, layer: int | None, out_dtype):
    def fetch():
        x = to_host(arr if layer is None else arr[layer])
        return x if out_dtype is None else x.astype(out_dtype)
    return fetch


def save_pretrained(model: Llama, path: str | Path, *, max_shard_size: int | str = "5GB", dtype=None,
                    source: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write `model` as an HF directory that `transformers` loads unchanged."""
    return save_params(model.params(), model.config, path, source=source or model.source,
                       max_shard_size=max_shard_size, dtype=dtype, overwrite=overwrite)
