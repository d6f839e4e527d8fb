"""HF -> JAX -> HF gives bit-identical tensors, and transformers loads what we export."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import LLAMA3_ROPE, read_all, rel_err, save_tiny
from transformers import AutoModelForCausalLM

import minitron_jax as mj
from minitron_jax.io.safetensors import SafetensorsFile


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
