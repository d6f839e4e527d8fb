"""Real SmolLM2-135M scored on Shakespeare, pruned to ~60% by width and by depth: the exported
directories load in transformers with equal logits, and importance-chosen pruning beats a random
choice of the same shape on held-out Shakespeare."""

import json

import numpy as np
import pytest
import torch
from helpers import rel_err
from transformers import AutoModelForCausalLM, AutoTokenizer

import minitron_jax as mj
from minitron_jax.core.assets import fetch_shakespeare, fetch_smollm2
from minitron_jax.data.text import pack, read_documents, split_documents, tokenize_documents
from minitron_jax.eval.evaluate import lm_loss
from minitron_jax.io.hf import save_params
from minitron_jax.prune.importance import compute_scores
from minitron_jax.prune.pruning import prune

pytestmark = pytest.mark.slow
HELD_OUT = ("hamlet", "sonnets", "tempest")


@pytest.fixture(scope="module")
def setup():
    model_dir = fetch_smollm2()
    tok = AutoTokenizer.from_pretrained(model_dir)
    train, held = split_documents(read_documents(fetch_shakespeare()), holdout=HELD_OUT)
    calib = pack(tokenize_documents(train, tok), 256, 32, seed=0)
    evals = pack(tokenize_documents(held, tok), 256, 12, seed=1)
    model = mj.from_pretrained(model_dir)
    scores = compute_scores(model.params(), model.config, calib, batch_size=8)
    return model_dir, model, scores, evals


@pytest.mark.parametrize("target,params", [("hidden_size=432,intermediate_size=1024", 80_979_696),
                                           ("num_hidden_layers=15", 81_413_568)])
def test_pruned_smollm2_exports_and_beats_random(setup, tmp_path, target, params):
    model_dir, model, scores, evals = setup
    pruned, cfg = prune(model.params(), model.config, scores, target)
    assert cfg.param_count() == params

    out = save_params(pruned, cfg, tmp_path / "pruned", source=model_dir)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert sum(p.numel() for p in hf.parameters()) == params
    ids = evals[:2]
    with torch.no_grad():
        ref = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    assert rel_err(mj.Llama(cfg, params=pruned)(ids), ref) <= 1e-5

    rng = np.random.default_rng(0)
    random_scores = {k: rng.random(v.shape).astype(np.float32) for k, v in scores.items()}
    rand, rand_cfg = prune(model.params(), model.config, random_scores, target)
    assert rand_cfg == cfg
    loss = {"teacher": lm_loss(model.params(), model.config, evals),
            "importance": lm_loss(pruned, cfg, evals), "random": lm_loss(rand, cfg, evals)}
    print(f"\nheld-out Shakespeare loss, {target}: " + json.dumps({k: round(v, 4) for k, v in loss.items()}))
    assert loss["teacher"] < loss["importance"]
    assert loss["importance"] < loss["random"] - 0.25  # clearly lower, not noise
