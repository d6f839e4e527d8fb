"""Mistral, Qwen2 and Qwen3 (model/family.py) in the one model function, against transformers (PyTorch,
fp32, CPU) on tiny random models of each family saved by transformers, with random norm weights and biases:
logits (plain, left-padded, packed), parameter counts and specs, export, pruning to a model transformers loads
(same model_type), and the refusals (sliding window, family pairs, unsupported fields)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import read_config, rel_err, save_tiny, write_config
from transformers import AutoModelForCausalLM

import minitron_jax as mj
from minitron_jax.core.errors import ConfigError
from minitron_jax.io.hf import expected_tensors, save_params
from minitron_jax.model.llama import forward
from minitron_jax.prune.pruning import prune

TOL = 1e-5  # max |jax - torch| / max |torch| on fp32 logits

# explicit head_dim with hidden != heads x head_dim (48 vs 4 x 16) for mistral and qwen3, as in Mistral-NeMo
FAMILIES = {
    "mistral": dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=None,
                    rope_theta=1e6),
    "qwen2": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6),  # q/k/v biases
    "qwen3": dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1e6),
}
ARCH = {"mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tiny(request, tmp_path_factory):
    family = request.param
    path = tmp_path_factory.mktemp(family)
    ref = save_tiny(path, family=family, **FAMILIES[family])
    return family, path, ref


def torch_logits(model, ids, mask=None, positions=None):
    kw = {}
    if mask is not None:
        kw["attention_mask"] = torch.tensor(mask)
    if positions is not None:
        kw["position_ids"] = torch.tensor(positions)
    with torch.no_grad():
        return model(torch.tensor(ids), **kw).logits.numpy()


def test_config_and_tensors_are_the_family(tiny):
    family, path, ref = tiny
    cfg = mj.LlamaConfig.from_file(path)
    assert cfg.model_type == family and (cfg.qkv_bias, cfg.qk_norm) == (family == "qwen2", family == "qwen3")
    assert cfg.param_count() == sum(p.numel() for p in ref.parameters())
    assert expected_tensors(cfg) == {n: tuple(p.shape) for n, p in ref.state_dict().items()}
    extras = {"qwen2": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
              "qwen3": ("self_attn.q_norm.weight", "self_attn.k_norm.weight"), "mistral": ()}[family]
    assert {f"model.layers.0.{e}" for e in extras} <= set(expected_tensors(cfg))
    # FLOPs count the matmul weights only: biases and q/k norms are not matmuls
    matmul = sum(p.numel() for n, p in ref.named_parameters() if p.ndim == 2 and "embed_tokens" not in n)
    attn = 2 * cfg.num_hidden_layers * 32 * cfg.num_attention_heads * cfg.head_dim
    assert cfg.flops_per_token(32) == 2.0 * matmul + attn


def test_logits_match_transformers_plain_padded_and_packed(tiny):
    family, path, ref = tiny
    model = mj.from_pretrained(path)
    rng = np.random.RandomState(1)
    ids = rng.randint(0, 128, (3, 40))
    assert rel_err(model(jnp.asarray(ids)), torch_logits(ref, ids)) <= TOL
    mask = np.ones((3, 40), np.int64)  # left padding, as generate() pads
    mask[1, :13] = mask[2, :31] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    out = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    assert rel_err(out, torch_logits(ref, ids, mask, positions), mask.astype(bool)) <= TOL
    docs = [rng.randint(0, 128, n) for n in (11, 20, 9)]  # packed documents equal each run alone
    seg = np.concatenate([np.full(len(d), i) for i, d in enumerate(docs)])[None]
    packed = np.asarray(model(jnp.asarray(np.concatenate(docs)[None]), segment_ids=jnp.asarray(seg)))[0]
    start = 0
    for d in docs:
        assert rel_err(packed[start:start + len(d)], torch_logits(ref, d[None])[0]) <= TOL
        start += len(d)


def test_export_is_bit_identical_and_keeps_the_family(tiny, tmp_path):
    from helpers import read_all
    family, path, ref = tiny
    mj.save_pretrained(mj.from_pretrained(path), tmp_path / "out")
    got, want = read_all(tmp_path / "out"), read_all(path)
    assert set(got) == set(want) and all(got[n].tobytes() == want[n].tobytes() for n in want)
    written = read_config(tmp_path / "out")
    assert (written["model_type"], written["architectures"]) == (family, [ARCH[family]])
    assert mj.LlamaConfig.from_file(tmp_path / "out") == mj.LlamaConfig.from_file(path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(hf).__name__ == ARCH[family]
    ids = np.random.RandomState(2).randint(0, 128, (1, 24))
    np.testing.assert_array_equal(torch_logits(hf, ids), torch_logits(ref, ids))


def rand_scores(cfg, seed=1):
    r = np.random.RandomState(seed)
    L = cfg.num_hidden_layers
    return {"mlp": r.rand(L, cfg.intermediate_size), "heads": r.rand(L, cfg.num_attention_heads),
            "kv_groups": r.rand(L, cfg.num_key_value_heads), "hidden": r.rand(cfg.hidden_size), "layer_bi": r.rand(L)}


def test_pruned_model_is_the_family_and_transformers_agrees(tiny, tmp_path):
    """Heads, KV groups, hidden, MLP and depth at once: transformers loads the same model_type (head_dim written
    explicitly), and its logits are the project's pruned model's."""
    family, path, _ = tiny
    model = mj.from_pretrained(path)
    hidden = 42  # not a multiple of the heads: transformers' Llama config refuses that, these families' do not
    target = f"hidden_size={hidden},intermediate_size=64,num_key_value_heads=1,num_attention_heads=1,drop_layers=1"
    new_p, new_cfg = prune(model.params(), model.config, rand_scores(model.config), target)
    assert (new_cfg.model_type, new_cfg.head_dim, new_cfg.num_hidden_layers) == (family, 16, 2)
    save_params(new_p, new_cfg, tmp_path / "out", source=path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert (type(hf).__name__, hf.config.model_type, hf.config.hidden_size) == (ARCH[family], family, hidden)
    assert sum(p.numel() for p in hf.parameters()) == new_cfg.param_count()
    ids = np.random.RandomState(3).randint(0, 128, (2, 16))
    assert rel_err(forward(new_p, new_cfg, jnp.asarray(ids)), torch_logits(hf, ids)) <= TOL


# ---------------------------------------------------------------------------- refusals
def test_sliding_window_shorter_than_the_sequence_is_refused(tmp_path):
    save_tiny(tmp_path, family="mistral", **{**FAMILIES["mistral"], "sliding_window": 16})
    model = mj.from_pretrained(tmp_path)
    assert model.config.sliding_window == 16
    model(jnp.zeros((1, 16), jnp.int32))  # up to the window, full attention is the model
    with pytest.raises(ConfigError, match="17 positions.*sliding window of 16.*at most 16 tokens"):
        model(jnp.zeros((1, 17), jnp.int32))


@pytest.mark.parametrize("family,change,window", [
    ("mistral", {}, 4096),  # transformers' MistralConfig default when the key is absent
    ("mistral", {"sliding_window": None}, None),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 32, "max_window_layers": 1}, 32),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 32, "max_window_layers": 3}, None),  # no layer slides
    ("qwen3", {"use_sliding_window": False, "sliding_window": 32}, None),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 32, "layer_types": ["full_attention"] * 2
               + ["sliding_attention"]}, 32)])
def test_sliding_window_is_read_as_transformers_reads_it(tiny, family, change, window):
    """Which config.json keys make a layer slide: our window is set exactly when transformers slides a layer."""
    import transformers
    d = {**read_config(tiny[1]), "model_type": family, "architectures": [ARCH[family]]}
    d.pop("sliding_window", None)
    d.pop("layer_types", None)
    d.update(change)
    assert mj.LlamaConfig.from_hf_dict(d).sliding_window == window
    hf = transformers.AutoConfig.for_model(**{k: v for k, v in d.items() if k != "architectures"})
    slides = {"mistral": lambda: hf.sliding_window is not None}.get(
        family, lambda: hf.sliding_window is not None and "sliding_attention" in hf.layer_types)()
    assert slides == (window is not None)


@pytest.mark.parametrize("family,key", [("qwen3", "attention_bias"), ("qwen2", "mlp_bias"), ("mistral", "mlp_bias")])
def test_unsupported_bias_fields_refused(tmp_path, no_weight_reads, family, key):
    save_tiny(tmp_path, family=family, **FAMILIES[family])
    d = read_config(tmp_path)
    d[key] = True
    write_config(tmp_path, d)
    with pytest.raises(ConfigError, match=f"field {key}=true is not supported: {ARCH[family]}"):
        mj.from_pretrained(tmp_path)


def test_teacher_and_student_of_different_families_refused(tiny, tmp_path):
    from minitron_jax.core.errors import TrainingError
    from minitron_jax.train.preflight import check_pair
    from minitron_jax.train.run_config import RunConfig
    family, path, _ = tiny
    other = "qwen3" if family != "qwen3" else "mistral"
    save_tiny(tmp_path / "other", family=other, **FAMILIES[other])
    rc = RunConfig(teacher=str(path), student=str(tmp_path / "other"), data=str(tmp_path), out=str(tmp_path / "o"),
                   seq_len=16)
    with pytest.raises(TrainingError, match=f"teacher .* is a {ARCH[family]} and the student .* a {ARCH[other]}"):
        check_pair(rc)
