"""Shared test helpers: tiny random transformers Llama models saved as HF directories, and the
config.json / loading helpers of the checkpoint-corruption tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig as HFConfig
from transformers import LlamaForCausalLM

import minitron_jax

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


def tiny_hf_config(**overrides) -> HFConfig:
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              rms_norm_eps=1e-5, tie_word_embeddings=False)
    kw.update(overrides)
    return HFConfig(**kw)


def save_tiny(path, seed: int = 0, dtype=torch.float32, **overrides):
    """Random-init LlamaForCausalLM (with non-trivial norm weights) saved to `path`; returns the torch model."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_hf_config(**overrides)).eval()
    with torch.no_grad():  # random norm weights so a wrong norm cannot hide behind ones
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model = model.to(dtype)
    model.save_pretrained(path)
    return model


def rel_err(a, b, mask=None) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if mask is not None:
        a, b = a[mask], b[mask]
    return float(np.abs(a - b).max() / np.abs(b).max())


# ---------------------------------------------------------------------------- checkpoints to corrupt
# (test_config.py, test_hf.py, test_safetensors_io.py: the `tiny_dirs` / `ckpt` / `no_weight_reads`
# fixtures in conftest.py save a tiny random `transformers.LlamaForCausalLM` with TINY's shape)
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128)


def read_config(d: Path) -> dict:
    return json.loads((d / "config.json").read_text())


def write_config(d: Path, cfg: dict) -> None:
    (d / "config.json").write_text(json.dumps(cfg, indent=2))


def load(d: Path):
    return minitron_jax.from_pretrained(d)


def transformers_refuses(**shape) -> bool:
    import transformers
    try:
        transformers.LlamaConfig(**{**TINY, **shape})
    except Exception as e:  # huggingface_hub StrictDataclassClassValidationError (not a ValueError)
        assert "not a multiple of the number of attention heads" in str(e)
        return True
    return False
