"""LlamaConfig <-> config.json (model/config.py): both RoPE key styles are read as transformers
reads them, FLOPs per token are counted by hand, and every config this project cannot build, or that
transformers would not load, is refused before any weights are read, with a message that names the
problem and the fix.

The checkpoint fixtures (`ckpt`, `no_weight_reads`) are in conftest.py: a tiny random
`transformers.LlamaForCausalLM` whose config.json each test corrupts.
"""

from __future__ import annotations

import re

import pytest
from helpers import TINY, load, read_config, transformers_refuses, write_config

from minitron_jax import ConfigError, LlamaConfig


# ---------------------------------------------------------------------------- counting
@pytest.mark.parametrize("tied", [False, True])
def test_flops_per_token_matches_a_hand_count(tied):
    # head_dim (12) != hidden / heads (64 / 4 = 16): the attention widths come from head_dim
    c = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=12, tie_word_embeddings=tied)
    L, H, F, V, S = 3, 64, 96, 100, 50
    q, kv = 4 * 12, 2 * 12
    per_layer = H * q + 2 * H * kv + q * H + 3 * H * F  # q, k, v, o; gate, up, down
    matmuls = L * per_layer + V * H                        # + the lm_head (tied or not, it is one matmul)
    attention = L * 2 * (S / 2) * q * 2                    # QK^T and AV, each 2 FLOPs per MAC, causal half
    assert c.flops_per_token(S) == 2 * matmuls + attention


# ---------------------------------------------------------------------------- positive control
@pytest.mark.parametrize("variant", ["4.x", "5.x"])
def test_llama3_rope_accepted_in_both_key_styles(ckpt, variant):
    """The RoPE checks refuse unknown types, not the supported ones in either key style."""
    cfg = read_config(ckpt)
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64}
    if variant == "4.x":
        del cfg["rope_parameters"]
        cfg.update(rope_theta=500000.0, rope_scaling=llama3)
    else:
        cfg["rope_parameters"] = {**llama3, "rope_theta": 500000.0}
    write_config(ckpt, cfg)
    c = LlamaConfig.from_file(ckpt)
    assert (c.rope_type, c.rope_theta, c.rope_scaling_dict["factor"]) == ("llama3", 500000.0, 8.0)


# ---------------------------------------------------------------------------- config content
@pytest.mark.parametrize("change", [{"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"]},
                                    {"model_type": "mistral"},
                                    {"architectures": ["MistralForCausalLM"]}])
def test_unsupported_or_inconsistent_architecture(ckpt, no_weight_reads, change):
    """An unknown family, or a model_type whose architecture disagrees, is refused before weights load."""
    cfg = read_config(ckpt)
    cfg.update(change)
    write_config(ckpt, cfg)
    with pytest.raises(ConfigError, match=r"unsupported checkpoint \(model_type='(gemma2|mistral|llama)', architectures="
                                          r"\['(Gemma2|Llama|Mistral)ForCausalLM'\]\).*supports LlamaForCausalLM.*"
                                          r"MistralForCausalLM.*Qwen2ForCausalLM.*Qwen3ForCausalLM"):
        load(ckpt)


@pytest.mark.parametrize("key,value", [("num_local_experts", 8), ("num_experts", 64), ("moe_intermediate_size", 768)])
def test_mixture_of_experts_fields_refused(ckpt, no_weight_reads, key, value):
    cfg = read_config(ckpt)
    cfg[key] = value
    write_config(ckpt, cfg)
    with pytest.raises(ConfigError, match=rf"field {key}={value} describes a mixture of experts"):
        load(ckpt)


@pytest.mark.parametrize("flag", ["attention_bias", "mlp_bias"])
def test_projection_bias_refused(ckpt, no_weight_reads, flag):
    cfg = read_config(ckpt)
    cfg[flag] = True
    write_config(ckpt, cfg)
    with pytest.raises(ConfigError, match=rf"{flag}=true is not supported.*no projection biases.*bias-free checkpoint"):
        load(ckpt)


@pytest.mark.parametrize("variant", ["4.x rope_type", "4.x legacy type", "5.x rope_parameters"])
def test_unknown_rope_type(ckpt, no_weight_reads, variant):
    cfg = read_config(ckpt)
    yarn = {"factor": 4.0, "original_max_position_embeddings": 64}
    if variant.startswith("4.x"):
        del cfg["rope_parameters"]
        key = "rope_type" if variant == "4.x rope_type" else "type"
        cfg.update(rope_theta=10000.0, rope_scaling={key: "yarn", **yarn})
    else:
        cfg.pop("rope_theta", None)
        cfg.pop("rope_scaling", None)
        cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, **yarn}
    write_config(ckpt, cfg)
    where = "rope_parameters" if variant.startswith("5.x") else "rope_scaling"
    with pytest.raises(ConfigError, match=rf"{where}\.rope_type='yarn' is not implemented; supported RoPE types: "
                                          r"\('default', 'llama3'\)"):
        load(ckpt)


def test_heads_not_divisible_by_kv_heads(ckpt, no_weight_reads):
    cfg = read_config(ckpt)
    cfg["num_key_value_heads"] = 3  # 4 query heads
    write_config(ckpt, cfg)
    with pytest.raises(ConfigError, match=r"num_attention_heads=4 is not a multiple of num_key_value_heads=3.*"
                                          r"valid num_key_value_heads: \[1, 2, 4\]"):
        load(ckpt)


# ---------------------------------------------------------------------------- config.json itself
def test_malformed_config_json(ckpt, no_weight_reads):
    (ckpt / "config.json").write_text(read_config(ckpt).__repr__())  # a Python dict is not JSON
    with pytest.raises(ConfigError, match=r"config\.json is not valid JSON \(.*\); fix or re-export the config"):
        load(ckpt)


def test_missing_config_json(ckpt, no_weight_reads):
    (ckpt / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"config\.json does not exist: point at an HF model directory or its config\.json"):
        load(ckpt)
    with pytest.raises(ConfigError, match=r"does not exist"):
        LlamaConfig.from_file(ckpt)


def test_config_missing_required_field(ckpt, no_weight_reads):
    cfg = read_config(ckpt)
    del cfg["num_hidden_layers"]
    write_config(ckpt, cfg)
    with pytest.raises(ConfigError, match=r"config\.json lacks required field 'num_hidden_layers'"):
        load(ckpt)


def test_config_json_not_an_object(ckpt, no_weight_reads):
    (ckpt / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(ConfigError, match=r"config\.json"):
        load(ckpt)


# ---------------------------------------------------------------------------- what transformers would refuse
@pytest.mark.parametrize("hidden,heads,refused", [(36, 8, True), (34, 4, True), (36, 4, False), (32, 4, False)])
def test_check_transformers_loadable_tracks_transformers(hidden, heads, refused):
    """minitron refuses exactly the (hidden, heads) pairs that transformers' own LlamaConfig refuses,
    head_dim set explicitly (as a width-pruned model always has it)."""
    assert transformers_refuses(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=2,
                                head_dim=8) is refused
    cfg = LlamaConfig(**{**TINY, "hidden_size": hidden, "num_attention_heads": heads})
    if refused:
        with pytest.raises(ConfigError, match=rf"hidden_size={hidden} is not a multiple of num_attention_heads={heads}"):
            cfg.check_transformers_loadable()
    else:
        cfg.check_transformers_loadable()


# ---------------------------------------------------------------------------- config edge cases, as transformers reads them
def test_missing_tie_key_follows_transformers(ckpt):
    import transformers
    cfg = read_config(ckpt)
    del cfg["tie_word_embeddings"]
    assert transformers.LlamaConfig.from_dict(cfg).tie_word_embeddings is False
    assert LlamaConfig.from_hf_dict(cfg).tie_word_embeddings is False


def test_rope_scaling_wins_over_rope_parameters_like_transformers(ckpt):
    import transformers
    cfg = read_config(ckpt)  # has rope_parameters {"rope_type": "default"}
    cfg["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 64}
    assert transformers.LlamaConfig.from_dict(cfg).rope_parameters["rope_type"] == "llama3"
    assert LlamaConfig.from_hf_dict(cfg).rope_type == "llama3"


# ---------------------------------------------------------------------------- values of the wrong type
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


@pytest.mark.parametrize("key,value,match", [
    ("rms_norm_eps", "abc", r"field rms_norm_eps='abc' must be a positive finite number"),
    ("rms_norm_eps", -1e-5, r"field rms_norm_eps=-1e-05 must be a positive finite number"),
    ("max_position_embeddings", "big", r"field max_position_embeddings='big' must be a positive integer"),
    ("max_position_embeddings", 128.0, r"field max_position_embeddings=128\.0 must be a positive integer"),
    ("hidden_size", True, r"field hidden_size=True must be a positive integer"),
    ("vocab_size", "64", r"field vocab_size='64' must be a positive integer"),
    ("num_key_value_heads", 0, r"field num_key_value_heads=0 must be a positive integer"),
    ("head_dim", 8.5, r"field head_dim=8\.5 must be a positive integer"),
    ("rope_theta", "1e4", r"field rope_theta='1e4' must be a positive finite number"),
    ("rope_parameters", {"rope_type": "default", "rope_theta": "1e4"},
     r"field rope_parameters\.rope_theta='1e4' must be a positive finite number"),
    ("rope_parameters", "default", r"field rope_parameters='default' must be a JSON object"),
    ("rope_parameters", {**LLAMA3, "factor": "8"}, r"field rope_parameters\.factor='8' must be a positive finite number"),
    ("rope_parameters", {**LLAMA3, "original_max_position_embeddings": 64.5},
     r"field rope_parameters\.original_max_position_embeddings=64\.5 must be a positive integer"),
    ("tie_word_embeddings", "false", r"field tie_word_embeddings='false' must be a boolean"),
    ("attention_bias", "false", r"field attention_bias='false' must be a boolean"),
    ("bos_token_id", -1, r"field bos_token_id=-1 must be a non-negative integer"),
    ("eos_token_id", [2, "x"], r"field eos_token_id\[1\]='x' must be a non-negative integer"),
    ("dtype", 32, r"field dtype=32 must be a string"),
    ("architectures", "LlamaForCausalLM", r"field architectures='LlamaForCausalLM' must be a list"),
    ("vocab_size", None, r"lacks required field 'vocab_size' \(it is null\)"),
])
def test_config_value_of_wrong_type(ckpt, no_weight_reads, key, value, match):
    cfg = read_config(ckpt)
    cfg[key] = value
    write_config(ckpt, cfg)
    with pytest.raises(ConfigError, match=rf"{re.escape(str(ckpt / 'config.json'))} {match}"):
        load(ckpt)


def test_config_null_optionals_take_defaults(ckpt):
    """Control: null optional fields mean 'default', as transformers reads them."""
    cfg = read_config(ckpt)
    cfg.update(head_dim=None, num_key_value_heads=None, rms_norm_eps=None, pad_token_id=None, eos_token_id=[2, 3])
    write_config(ckpt, cfg)
    c = LlamaConfig.from_file(ckpt)
    assert (c.head_dim, c.num_key_value_heads, c.rms_norm_eps, c.eos_token_id) == (8, 4, 1e-6, [2, 3])


def test_problems_from_validate_name_the_file(ckpt, no_weight_reads):
    cfg = read_config(ckpt)
    cfg["head_dim"] = 7
    write_config(ckpt, cfg)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(ckpt / 'config.json'))}: head_dim=7 must be even"):
        load(ckpt)
