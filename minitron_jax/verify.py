"""Check a converted model against transformers: logits and LM loss on the same tokens.

This is the conversion smoke test users run before trusting an import (and the project's main
job until the full pipeline exists): HF -> orbax -> HF, then compare.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax

from .hf import from_pretrained


def lm_loss(logits, ids) -> float:
    """Mean next-token cross-entropy in fp32."""
    logits = jnp.asarray(logits, jnp.float32)
    return float(optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], jnp.asarray(ids)[:, 1:]).mean())


def compare_with_transformers(model_dir: str | Path, text: str, *, seq_len: int = 256, batch: int = 1,
                              log=print) -> dict:
    """Logits and loss of `model_dir` in minitron_jax and in transformers (PyTorch, fp32, CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(text)["input_ids"]
    need = batch * seq_len
    if len(ids) < need:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than batch x seq_len = {need}; give more text")
    ids = np.asarray(ids[:need]).reshape(batch, seq_len)

    t0 = time.perf_counter()
    ref_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = ref_model(torch.tensor(ids)).logits.float().numpy()
    log(f"transformers forward: {time.perf_counter() - t0:.1f}s")

    t0 = time.perf_counter()
    model = from_pretrained(model_dir, dtype="float32")
    out = np.asarray(model(jnp.asarray(ids)), np.float32)
    log(f"minitron_jax forward: {time.perf_counter() - t0:.1f}s (includes compile)")
    agree = float((out.argmax(-1) == ref.argmax(-1)).mean())
    return {"tokens": int(ids.size), "params": model.config.param_count(),
            "max_abs_err": float(np.abs(out - ref).max()),
            "rel_err": float(np.abs(out - ref).max() / np.abs(ref).max()),
            "loss_jax": lm_loss(out, ids), "loss_torch": lm_loss(ref, ids), "top1_agreement": agree}
