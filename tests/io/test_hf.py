"""Loading and exporting HF checkpoints (io/hf.py): every way an HF checkpoint or an export
can be wrong is refused early, with a message that names the problem and the fix.

Fixtures are a tiny random `transformers.LlamaForCausalLM` saved as safetensors and then corrupted
(`tiny_dirs`, `ckpt` and `no_weight_reads` are in conftest.py). Load-side tests run under
`no_weight_reads`, which makes any read of tensor bytes fail the test, so each error is proven to come
*before* weights are read (not from a crash half-way through a load). The round trip HF -> JAX -> HF gives
bit-identical tensors, and transformers loads what we export.
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
import torch
from helpers import (
    LLAMA3_ROPE,
    TINY,
    load,
    read_all,
    read_config,
    rel_err,
    save_tiny,
    transformers_refuses,
    upload,
    write_config,
)
from safetensors.numpy import load_file, save_file
from transformers import AutoModelForCausalLM

import minitron_jax
import minitron_jax as mj
from minitron_jax import CheckpointError, ConfigError, LlamaConfig
from minitron_jax.io import hf as hf_mod
from minitron_jax.io.safetensors import SafetensorsFile
from minitron_jax.model.llama import is_param_spec, param_specs


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture
def tied_ckpt(tiny_dirs, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_dirs["tied"], tmp_path / "tied"))


@pytest.fixture
def no_export_fetch(monkeypatch):
    """Any attempt to pull a parameter to the host for export fails the test."""
    def boom(*args, **kwargs):
        raise AssertionError("parameters were fetched for export before the problem was reported")
    monkeypatch.setattr(hf_mod, "to_host", boom)


def rewrite_weights(d: Path, drop=(), add=None) -> None:
    tensors = load_file(d / "model.safetensors")
    for name in drop:
        del tensors[name]
    tensors.update(add or {})
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


def tiny_model(cfg: LlamaConfig, seed: int = 0) -> minitron_jax.Llama:
    """A random `Llama` for `cfg`, built from host arrays. (`Llama(cfg, rngs=nnx.Rngs(0))` gives the same
    kind of model but compiles one random op per parameter shape: ~3.5 s on CPU per new config.)"""
    rng = np.random.default_rng(seed)
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


# ---------------------------------------------------------------------------- tensors vs config
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


# ---------------------------------------------------------------------------- pickle weights
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


# ---------------------------------------------------------------------------- damaged files (sharded)
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


# ---------------------------------------------------------------------------- export
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
    from minitron_jax.core.errors import OutputError
    with pytest.raises(OutputError, match=r"exists and was not written by minitron"):
        minitron_jax.save_pretrained(model, ckpt)
    assert tree_listing(ckpt) == before
    assert {p: p.stat().st_mtime_ns for p in ckpt.rglob("*")} == mtimes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary directory left behind


def test_save_overwrite_and_empty_dir_are_allowed(ckpt, tmp_path):
    model = tiny_model(LlamaConfig(**TINY))
    empty = tmp_path / "empty"
    empty.mkdir()
    minitron_jax.save_pretrained(model, empty)
    prev = minitron_jax.save_pretrained(tiny_model(LlamaConfig(**TINY), seed=1), tmp_path / "prev")
    minitron_jax.save_pretrained(model, prev, overwrite=True)  # a minitron output may be replaced
    for d in (empty, prev):
        assert not (d / "pytorch_model.bin").exists()
        np.testing.assert_array_equal(np.asarray(load(d).params()["layers"]["q_proj"]),
                                      np.asarray(model.params()["layers"]["q_proj"]))


# ---------------------------------------------------------------------------- malformed index files
@pytest.mark.parametrize("text,match", [
    ("[1, 2]", r"is malformed \(a JSON list, not an object\): it needs a 'weight_map' object"),
    ('{"weight_map": ["model.norm.weight"]}', r"is malformed \(weight_map=\['model\.norm\.weight'\]\)"),
    ('{"weight_map": {"model.norm.weight": 3}}', r"weight_map\['model\.norm\.weight'\] = 3 is not a shard file name"),
    ('{"weight_map": {"model.norm.weight": ""}}', r"weight_map\['model\.norm\.weight'\] = '' is not a shard file name"),
    ("{\"weight_map\": {}}\xff", r"cannot be read as JSON"),
])
def test_index_not_a_weight_map(ckpt, no_weight_reads, text, match):
    _shard(ckpt)
    index = ckpt / "model.safetensors.index.json"
    index.write_bytes(text.encode("latin-1"))
    with pytest.raises(CheckpointError, match=re.escape(str(index)) + ".*" + match):
        load(ckpt)


# ---------------------------------------------------------------------------- shards outside the directory
def _point_shard(ckpt: Path, index: dict, fname: str) -> None:
    """Make the index place every tensor of shard 2 in `fname` instead."""
    index["weight_map"] = {n: (fname if f.startswith("model-00002") else f) for n, f in index["weight_map"].items()}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink", "symlinked dir"])
def test_shard_outside_model_dir_refused(ckpt, tmp_path, no_weight_reads, how):
    index = _shard(ckpt)
    outside = tmp_path / "other"
    outside.mkdir()
    shutil.move(ckpt / "model-00002-of-00002.safetensors", outside / "stolen.safetensors")  # a readable, valid file
    if how == "dotdot":
        fname, match = "../other/stolen.safetensors", r"not absolute or '\.\.' paths; refusing to read outside"
    elif how == "absolute":
        fname, match = str(outside / "stolen.safetensors"), r"not absolute or '\.\.' paths"
    elif how == "symlink":
        fname, match = "model-00002-of-00002.safetensors", r"resolves through a symlink to .*other/stolen\.safetensors"
        (ckpt / fname).symlink_to(outside / "stolen.safetensors")
    else:
        fname, match = "sub/stolen.safetensors", r"resolves through a symlink to .*other/stolen\.safetensors"
        (ckpt / "sub").symlink_to(outside)
    _point_shard(ckpt, index, fname)
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json names shard .*" + match):
        load(ckpt)


def test_single_file_symlinked_outside_refused(ckpt, tmp_path, no_weight_reads):
    shutil.move(ckpt / "model.safetensors", tmp_path / "elsewhere.safetensors")
    (ckpt / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors, which resolves through a symlink to "
                                              r".*elsewhere\.safetensors, outside the model directory; copy the file"):
        load(ckpt)


def test_shards_linked_inside_and_hf_hub_snapshot_allowed(ckpt, tmp_path):
    """Controls: a link within the directory, and the HF hub cache layout (snapshots/<rev>/* -> ../../blobs/*)."""
    index = _shard(ckpt)
    ref = np.asarray(load(ckpt).params()["norm"])
    shutil.move(ckpt / "model-00002-of-00002.safetensors", ckpt / "real.safetensors")
    (ckpt / "model-00002-of-00002.safetensors").symlink_to("real.safetensors")
    np.testing.assert_array_equal(np.asarray(load(ckpt).params()["norm"]), ref)
    hub = tmp_path / "models--x--y"
    snap, blobs = hub / "snapshots" / "abc123", hub / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in [*ckpt.iterdir(), ckpt / "real.safetensors"]:
        if f.is_file() and not f.is_symlink():
            shutil.copy(f, blobs / f.name)
    for name in [*index["weight_map"].values(), "model.safetensors.index.json", "config.json"]:
        if not (snap / name).exists():
            (snap / name).symlink_to(f"../../blobs/{'real.safetensors' if name.startswith('model-00002') else name}")
    np.testing.assert_array_equal(np.asarray(load(snap).params()["norm"]), ref)


# ---------------------------------------------------------------------------- tokenizers
def _save_tokenizer(d: Path, n: int) -> None:
    """A word-level tokenizer of `n` tokens (4 of them special), saved as transformers saves one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(n - 4)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(d)


def test_tokenizer_files_missing(ckpt):
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(ckpt))} has no tokenizer \(looked for tokenizer\.json or "
                                              r"tokenizer\.model or vocab\.json\+merges\.txt, and tokenizer_config\.json\); "
                                              r"copy the tokenizer files of the model it came from"):
        hf_mod.load_tokenizer(ckpt)
    _save_tokenizer(ckpt, TINY["vocab_size"])
    (ckpt / "tokenizer_config.json").unlink()
    with pytest.raises(CheckpointError, match=r"has no tokenizer"):
        hf_mod.load_tokenizer(ckpt)


def test_tokenizer_larger_than_embedding_refused(ckpt):
    _save_tokenizer(ckpt, TINY["vocab_size"] + 1)
    with pytest.raises(CheckpointError, match=rf"the tokenizer of {re.escape(str(ckpt))} has 65 tokens but the model's "
                                              r"embedding has only 64 rows"):
        hf_mod.load_tokenizer(ckpt, vocab_size=TINY["vocab_size"])
    _save_tokenizer(ckpt, TINY["vocab_size"])  # control: exactly the embedding's size
    tok = hf_mod.load_tokenizer(ckpt, vocab_size=TINY["vocab_size"])
    assert len(tok) == 64 and tok("w0 w59")["input_ids"][-2:] == [4, 63]


def test_tokenizer_unreadable(ckpt):
    _save_tokenizer(ckpt, 8)
    (ckpt / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"cannot load the tokenizer of .*; copy the tokenizer files"):
        hf_mod.load_tokenizer(ckpt)


# ---------------------------------------------------------------------------- the round trip HF -> JAX -> HF
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [False, True])
def test_roundtrip_bit_identical(tmp_path, dtype, tied):
    src, out = tmp_path / "src", tmp_path / "out"
    save_tiny(src, dtype=dtype, tie_word_embeddings=tied, head_dim=24, rope_theta=500000.0,
              rope_scaling=LLAMA3_ROPE)
    model = mj.from_pretrained(src)  # default: the dtype the checkpoint stores
    assert str(model.embed_tokens[...].dtype) == str(dtype).replace("torch.", "")
    mj.save_pretrained(model, out, max_shard_size="40KB")
    assert (out / "model.safetensors.index.json").exists()  # sharded output
    a, b = read_all(src), read_all(out)
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary directory left behind

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["head_dim"] == 24 and cfg["tie_word_embeddings"] is tied
    assert cfg["rope_parameters"]["rope_type"] == "llama3" and cfg["rope_scaling"]["factor"] == 8.0
    assert (out / "generation_config.json").exists()  # side files copied from the source

    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    orig = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = torch.tensor(np.random.RandomState(0).randint(0, 128, (2, 24)))
    with torch.no_grad():
        np.testing.assert_array_equal(ref(ids).logits.numpy(), orig(ids).logits.numpy())


def test_cast_on_import_and_export(tmp_path):
    """fp32 checkpoint loaded as bf16 rounds like torch's .to(bfloat16); exported as bf16 on request."""
    ref = save_tiny(tmp_path / "src")
    model = mj.from_pretrained(tmp_path / "src", dtype="bfloat16")
    np.testing.assert_array_equal(
        np.asarray(model.params()["layers"]["q_proj"][1], np.float32),
        ref.model.layers[1].self_attn.q_proj.weight.detach().to(torch.bfloat16).float().numpy())
    mj.save_pretrained(model, tmp_path / "out")
    f = SafetensorsFile(tmp_path / "out" / "model.safetensors")
    assert {str(f.dtype(n)) for n in f.names()} == {"bfloat16"}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_pruned_shape_exports_with_explicit_head_dim(tmp_path):
    """hidden != heads * head_dim (a width-pruned shape) survives export and loads in transformers."""
    model = mj.Llama(mj.LlamaConfig(vocab_size=96, hidden_size=40, intermediate_size=56, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16))
    mj.save_pretrained(model, tmp_path / "out")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert hf.config.head_dim == 16 and hf.config.hidden_size == 40
    ids = np.random.RandomState(0).randint(0, 96, (1, 20))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    assert rel_err(model(jnp.asarray(ids)), ref) <= 1e-5


# ---------------------------------------------------------------------------- Cloud Storage (emulator)
def test_checkpoint_in_cloud_storage_loads_as_from_disk(ckpt, gs_dir):
    """An index-sharded HF checkpoint uploaded to gs:// loads onto an 8-device mesh bit for bit as from disk, its
    config and tokenizer-free header reads included; the load reads its bytes by ranges and never more than the
    files hold."""
    from minitron_jax.core import storage
    from minitron_jax.model.sharding import make_mesh
    _shard(ckpt)
    url = upload(ckpt, gs_dir + "/model")
    mesh = make_mesh(1, -1, 1)
    before = storage.bytes_read()
    remote, cfg = hf_mod.load_params(url, mesh=mesh)
    read = storage.bytes_read() - before
    local, cfg_local = hf_mod.load_params(ckpt, mesh=mesh)
    assert cfg == cfg_local
    flat_r, flat_l = jax.tree.leaves_with_path(remote), jax.tree.leaves(local)
    for (path, a), b in zip(flat_r, flat_l):
        assert a.sharding == b.sharding and np.array_equal(np.asarray(a), np.asarray(b)), path
    weights = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    assert read == weights  # every row splits over the 8 devices: each byte read once, header and data
    assert mj.from_pretrained(url).source == url


def test_two_hosts_each_read_their_half_of_a_checkpoint_in_cloud_storage(ckpt, gs_dir, tmp_path):
    """A gs:// checkpoint loaded as 2 processes x 2 devices (fsdp): each process reads the headers and exactly
    half of the tensor bytes (its devices' rows, counted in the storage layer), never the whole file, and the
    loaded weights equal a local load's (the weight fingerprint)."""
    from distill_helpers import two_processes

    from minitron_jax.model.sharding import make_mesh
    from minitron_jax.prune.importance import model_fingerprint
    _shard(ckpt)
    url = upload(ckpt, gs_dir + "/model")
    script = Path(__file__).parents[1] / "gcs_load.py"
    done = two_processes([str(script)], [url, str(tmp_path)], devices=2, timeout=300)
    assert [p.returncode for p in done] == [0, 0], "\n".join(p.stdout + p.stderr for p in done)
    got = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2)]
    files = sorted(ckpt.glob("*.safetensors"))
    headers = sum(8 + int.from_bytes(f.read_bytes()[:8], "little") for f in files)
    total = sum(f.stat().st_size for f in files)
    assert [g["bytes_read"] for g in got] == [headers + (total - headers) // 2] * 2, (got, headers, total)
    local = mj.from_pretrained(ckpt, mesh=make_mesh(1, -1, 1, devices=jax.devices()[:4]))
    assert got[0]["fingerprint"] == got[1]["fingerprint"] == model_fingerprint(local.config, local.params())


def download(url: str, local: Path) -> Path:
    """Copy every object under a gs:// prefix to a local directory (what a user does before `transformers`)."""
    from minitron_jax.core import storage
    local.mkdir(parents=True)
    for f in storage.path(url).iterdir():
        (local / f.name).write_bytes(f.read_bytes())
    return local


def test_export_to_cloud_storage_equals_a_local_export_and_loads_in_transformers(tmp_path, gs_dir):
    """save_pretrained to gs:// writes the bytes a local export writes (shards, index, config, side files), under
    the same ownership marker, leaves no temporary prefix, and the download loads in transformers with the
    source's logits; an export over it replaces only what it wrote before (a shard fewer: the old ones go)."""
    from minitron_jax.core import storage
    from minitron_jax.core.atomic import MARKER
    from minitron_jax.core.errors import OutputError
    src = tmp_path / "src"
    save_tiny(src)
    model = mj.from_pretrained(src)
    mj.save_pretrained(model, tmp_path / "local", max_shard_size="40KB")
    url = gs_dir + "/student_hf"
    mj.save_pretrained(model, url, max_shard_size="40KB")
    got = download(url, tmp_path / "down")
    names = sorted(p.name for p in (tmp_path / "local").iterdir())
    assert sorted(p.name for p in got.iterdir()) == names and "model.safetensors.index.json" in names
    for n in names:
        if n != MARKER:  # its time and pid differ
            assert (got / n).read_bytes() == (tmp_path / "local" / n).read_bytes(), n
    assert [p.name for p in storage.path(gs_dir).iterdir()] == ["student_hf"]  # no temporary prefix left
    hf = AutoModelForCausalLM.from_pretrained(got, dtype=torch.float32).eval()
    orig = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = torch.tensor(np.random.RandomState(0).randint(0, 128, (2, 24)))
    with torch.no_grad():
        np.testing.assert_array_equal(hf(ids).logits.numpy(), orig(ids).logits.numpy())
    with pytest.raises(OutputError, match="exists; choose another path or pass --overwrite"):
        mj.save_pretrained(model, url)
    mj.save_pretrained(model, url, overwrite=True)  # one shard now
    assert sorted(p.name for p in storage.path(url).iterdir()) == sorted([MARKER, "config.json", "model.safetensors",
                                                                        "generation_config.json"])


def test_a_prefix_left_half_committed_is_refused_by_readers_and_written_again(tmp_path, gs_dir, monkeypatch):
    """A commit to gs:// that stops half-way (here: the 2nd server-side copy fails) leaves the flag object; loading
    the prefix is refused naming it, a user's upload there is not mistaken for it, and the same export with
    overwrite replaces it whole."""
    from minitron_jax.core import storage
    from minitron_jax.core.errors import OutputError
    src = tmp_path / "src"
    save_tiny(src)
    model = mj.from_pretrained(src)
    url = gs_dir + "/student_hf"
    fs = storage.filesystem()  # the client the commit uses (fsspec keeps one per set of arguments)
    real, calls = fs.copy, []

    def copy_then_fail(*a, **k):
        calls.append(a)
        if len(calls) == 2:
            raise OSError("injected: connection reset during the commit")
        return real(*a, **k)
    monkeypatch.setattr(fs, "copy", copy_then_fail)
    with pytest.raises(OSError, match="injected"):
        mj.save_pretrained(model, url, max_shard_size="40KB")
    monkeypatch.setattr(fs, "copy", real)
    with pytest.raises(OutputError, match=r"student_hf is half-written \(it holds "
                                                       r"\.minitron-incomplete\.json"):
        mj.from_pretrained(url)
    with pytest.raises(OutputError, match="exists; choose another path or pass --overwrite"):
        mj.save_pretrained(model, url)
    mj.save_pretrained(model, url, overwrite=True)
    assert np.array_equal(np.asarray(mj.from_pretrained(url).params()["embed_tokens"]),
                          np.asarray(model.params()["embed_tokens"]))
    assert sorted(p.name for p in storage.path(gs_dir).iterdir()) == ["student_hf"]
