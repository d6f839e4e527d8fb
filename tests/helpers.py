"""Shared test fixtures: tiny random transformers Llama models saved as HF directories."""

from __future__ import annotations

import numpy as np
import torch
from transformers import LlamaConfig as HFConfig, LlamaForCausalLM

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
