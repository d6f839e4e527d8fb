"""Check a converted model against transformers: logits and LM loss on the same tokens.

`minitron parity` runs it after a round trip HF -> orbax -> HF, as the smoke test users run before
trusting an import or export. The JAX loss is the project's own chunked next-token loss
(`evaluate.lm_loss`, as in evaluation and training); the reference is transformers' `labels=` loss.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from minitron_jax.eval.evaluate import lm_loss
from minitron_jax.io.hf import from_pretrained


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
        out_t = ref_model(torch.tensor(ids), labels=torch.tensor(ids))
        ref, loss_torch = out_t.logits.float().numpy(), float(out_t.loss)
    log(f"transformers forward: {time.perf_counter() - t0:.1f}s")

    t0 = time.perf_counter()
    model = from_pretrained(model_dir, dtype="float32")
    out = np.asarray(model(jnp.asarray(ids)), np.float32)
    log(f"minitron_jax forward: {time.perf_counter() - t0:.1f}s (includes compile)")
    agree = float((out.argmax(-1) == ref.argmax(-1)).mean())
    return {"tokens": int(ids.size), "params": model.config.param_count(),
            "max_abs_err": float(np.abs(out - ref).max()),
            "rel_err": float(np.abs(out - ref).max() / np.abs(ref).max()),
            "loss_jax": lm_loss(model.params(), model.config, ids, batch_size=batch), "loss_torch": loss_torch,
            "top1_agreement": agree}
