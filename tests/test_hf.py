"""Loading and exporting HF checkpoints (minitron_jax/hf.py): every way an HF checkpoint or an export
can be wrong is refused early, with a message that names the problem and the fix.

Fixtures are a tiny random `transformers.LlamaForCausalLM` saved as safetensors and then corrupted
(`tiny_dirs`, `ckpt` and `no_weight_reads` are in conftest.py). Load-side tests run under
`no_weight_reads`, which makes any read of tensor bytes fail the test, so each error is proven to come
*before* weights are read (not from a crash half-way through a load). The round trip HF -> JAX -> HF
itself is in test_roundtrip.py.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import minitron_jax
from minitron_jax import CheckpointError, ConfigError, LlamaConfig
from minitron_jax import hf as hf_mod
from minitron_jax.model import is_param_spec, param_specs
from helpers import TINY, load, read_config, transformers_refuses, write_config


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture
def tied_ckpt(tiny_dirs, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_dirs["tied"], tmp_path / "tied"))


@pytest.fixture
def no_export_fetch(monkeypatch):
    """Any attempt to pull a parameter to the host for export fails the test."""
    def boom(*args, **kwargs):
        raise AssertionError("parameters were fetched for export before the problem was reported")
    monkeypatch.setattr(hf_mod, "_host", boom)


def rewrite_weights(d: Path, drop=(), add=None) -> None:
    tensors = load_file(d / "model.safetensors")
    for name in drop:
        del tensors[name]
    tensors.update(add or {})
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


def tiny_model(cfg: LlamaConfig) -> minitron_jax.Llama:
    """A random `Llama` for `cfg`, built from host arrays. (`Llama(cfg, rngs=nnx.Rngs(0))` gives the same
    kind of model but compiles one random op per parameter shape: ~3.5 s on CPU per new config.)"""
    rng = np.random.default_rng(0)
    specs, treedef = jax.tree.flatten(param_specs(cfg), is_leaf=is_param_spec)
    leaves = [jnp.asarray(0.02 * rng.standard_normal(s.shape, dtype=np.float32)) for s in specs]
    params = jax.tree.unflatten(treedef, leaves)
    return minitron_jax.Llama(cfg, params=params)


def tree_listing(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------- positive controls
def test_unmodified_fixture_loads(ckpt):
    model = load(ckpt)
    cfg = model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (32, 48, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 8)
    assert not cfg.tie_word_embeddings
    ref = load_file(ckpt / "model.safetensors")
    p = model.params()
    np.testing.assert_array_equal(np.asarray(p["embed_tokens"]), ref["model.embed_tokens.weight"])
    np.testing.assert_array_equal(np.asarray(p["lm_head"]), ref["lm_head.weight"])
    np.testing.assert_array_equal(np.asarray(p["layers"]["down_proj"][1]), ref["model.layers.1.mlp.down_proj.weight"])
    np.testing.assert_array_equal(np.asarray(p["layers"]["k_proj"][0]), ref["model.layers.0.self_attn.k_proj.weight"])


def test_tied_checkpoint_with_lm_head_copy_loads(tied_ckpt):
    assert "lm_head.weight" not in load_file(tied_ckpt / "model.safetensors")
    emb = load_file(tied_ckpt / "model.safetensors")["model.embed_tokens.weight"]
    # some exporters also write the tied copy (and an old rotary buffer); both are harmless
    rewrite_weights(tied_ckpt, add={"lm_head.weight": emb.copy(),
                                    "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)})
    model = load(tied_ckpt)
    assert model.config.tie_word_embeddings and "lm_head" not in model.params()
    np.testing.assert_array_equal(np.asarray(model.params()["embed_tokens"]), emb)


# ---------------------------------------------------------------------------- 1-3: tensors vs config
def test_missing_tensor_is_named(ckpt, no_weight_reads):
    rewrite_weights(ckpt, drop=["model.layers.1.mlp.up_proj.weight"])
    with pytest.raises(CheckpointError, match=r"(?s)missing tensors \(1\): model\.layers\.1\.mlp\.up_proj\.weight"
                                              r".*re-export the checkpoint") as e:
        load(ckpt)
    assert "unexpected" not in str(e.value) and "disagree" not in str(e.value)


def test_missing_lm_head_hints_at_tie_flag(ckpt, no_weight_reads):
    rewrite_weights(ckpt, drop=["lm_head.weight"])
    with pytest.raises(CheckpointError, match=r"lm_head\.weight is missing: is tie_word_embeddings wrongly false"):
        load(ckpt)


def test_unexpected_tensor_is_named(ckpt, no_weight_reads):
    rewrite_weights(ckpt, add={"model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)})
    with pytest.raises(CheckpointError, match=r"(?s)unexpected tensors \(1\): model\.layers\.0\.self_attn\.q_proj\.bias"
                                              r".*Fix config\.json"):
        load(ckpt)


def test_shape_disagreeing_with_config_names_tensor_and_both_shapes(ckpt, no_weight_reads):
    cfg = read_config(ckpt)
    cfg["intermediate_size"] = 40  # weights are 48 wide
    write_config(ckpt, cfg)
    with pytest.raises(CheckpointError) as e:
        load(ckpt)
    msg = str(e.value)
    assert "shapes that disagree with config.json" in msg and "ffn 40" in msg
    assert re.search(r"model\.layers\.0\.mlp\.gate_proj\.weight: file \(48, 32\), config expects \(40, 32\)", msg)
    assert re.search(r"model\.layers\.0\.mlp\.down_proj\.weight: file \(32, 48\), config expects \(32, 40\)", msg)
    assert "Fix config.json to describe these weights, or re-export" in msg


def test_integer_weights_refused(ckpt, no_weight_reads):
    rewrite_weights(ckpt, add={"model.norm.weight": np.ones(32, np.int32)})
    with pytest.raises(CheckpointError, match=r"weights must be floating point, found \['int32'\]"):
        load(ckpt)


# ---------------------------------------------------------------------------- 7: pickle weights
class _Trap:
    """Unpickling this creates `marker`: proof that somebody unpickled the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_bin_refused_and_never_unpickled(ckpt, tmp_path, monkeypatch, no_weight_reads):
    import torch

    marker = tmp_path / "UNPICKLED"
    weights = {k: torch.from_numpy(v) for k, v in load_file(ckpt / "model.safetensors").items()}
    torch.save({**weights, "trap": _Trap(marker)}, ckpt / "pytorch_model.bin")
    (ckpt / "model.safetensors").unlink()

    def forbidden(*args, **kwargs):
        raise AssertionError("a pickle file was unpickled")
    for mod, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(mod, name, forbidden)

    with pytest.raises(CheckpointError, match=r"(?s)holds only pickle weights \(pytorch_model\.bin\)\. minitron_jax "
                                              r"never unpickles model files.*save_pretrained\(out, safe_serialization=True\)"):
        load(ckpt)
    assert not marker.exists()

    monkeypatch.undo()  # the trap is real: unpickling the file the way torch would does spring it
    torch.load(ckpt / "pytorch_model.bin", weights_only=False)
    assert marker.exists()


def test_no_weights_at_all(ckpt, no_weight_reads):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"has no model\.safetensors or model\.safetensors\.index\.json"):
        load(ckpt)


# ---------------------------------------------------------------------------- 9-10: damaged files (sharded)
def _shard(ckpt: Path) -> dict:
    """Split the single file into two shards plus an index, as transformers does for big models."""
    tensors = load_file(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, ckpt / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    return index


def test_sharded_control_loads(ckpt):
    _shard(ckpt)
    ref = load_file(ckpt / "model-00002-of-00002.safetensors")
    name, arr = next((n, a) for n, a in ref.items() if n.startswith("model.layers.1.mlp.up_proj"))
    assert np.array_equal(np.asarray(load(ckpt).params()["layers"]["up_proj"][1]), arr), name


def test_index_names_missing_shard(ckpt, no_weight_reads):
    _shard(ckpt)
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json names shard "
                                              r"model-00002-of-00002\.safetensors, which is missing from .*re-download"):
        load(ckpt)


def test_index_places_tensor_in_wrong_shard(ckpt, no_weight_reads):
    index = _shard(ckpt)
    name = "model.norm.weight"
    other = next(f for f in set(index["weight_map"].values()) if f != index["weight_map"][name])
    index["weight_map"][name] = other
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"places model\.norm\.weight in {re.escape(other)}, but that file "
                                              r"does not contain it"):
        load(ckpt)


def test_malformed_index(ckpt, no_weight_reads):
    _shard(ckpt)
    (ckpt / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match=r"index\.json is malformed .*it needs a 'weight_map'"):
        load(ckpt)


# ---------------------------------------------------------------------------- 8, 13: export
def test_export_of_config_transformers_refuses(tmp_path, no_export_fetch):
    # 36 % 8 != 0 (NB: 36 with 4 heads would be fine: 36 % 4 == 0, and transformers accepts it)
    cfg = LlamaConfig(**{**TINY, "hidden_size": 36, "num_attention_heads": 8, "num_key_value_heads": 4})
    assert transformers_refuses(hidden_size=36, num_attention_heads=8, num_key_value_heads=4, head_dim=8)
    model = tiny_model(cfg)
    out = tmp_path / "export"
    with pytest.raises(ConfigError, match=r"hidden_size=36 is not a multiple of num_attention_heads=8: transformers "
                                          r".*refuses this even with head_dim=8.*Nearby valid hidden sizes: \[32, 40\]"):
        minitron_jax.save_pretrained(model, out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary directory left behind either


def test_save_into_nonempty_dir_without_overwrite(ckpt, tmp_path, no_export_fetch):
    model = tiny_model(LlamaConfig(**TINY))
    before = tree_listing(ckpt)
    mtimes = {p: p.stat().st_mtime_ns for p in ckpt.rglob("*")}
    with pytest.raises(FileExistsError, match=r"exists and is not empty; choose another path or pass overwrite=True"):
        minitron_jax.save_pretrained(model, ckpt)
    assert tree_listing(ckpt) == before
    assert {p: p.stat().st_mtime_ns for p in ckpt.rglob("*")} == mtimes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary directory left behind


def test_save_overwrite_and_empty_dir_are_allowed(ckpt, tmp_path):
    model = tiny_model(LlamaConfig(**TINY))
    empty = tmp_path / "empty"
    empty.mkdir()
    minitron_jax.save_pretrained(model, empty)
    minitron_jax.save_pretrained(model, ckpt, overwrite=True)
    for d in (empty, ckpt):
        assert not (d / "pytorch_model.bin").exists()
        np.testing.assert_array_equal(np.asarray(load(d).params()["layers"]["q_proj"]),
                                      np.asarray(model.params()["layers"]["q_proj"]))
