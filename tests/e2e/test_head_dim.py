"""A model whose head_dim (32) is not hidden / heads (64 / 4 = 16): scoring equals torch hooks on
transformers' model, pruning slices whole 32-wide heads, and export round-trips and loads in
transformers with equal logits."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import LLAMA3_ROPE, numpy_scores, read_all, rel_err, save_tiny, torch_activations
from transformers import AutoModelForCausalLM

import minitron_jax as mj
from minitron_jax.prune.importance import ScoreConfig, compute_scores
from minitron_jax.prune.pruning import prune

CFG = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=96,
           num_hidden_layers=3, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("hd")
    ref = save_tiny(path, **CFG)
    model = mj.from_pretrained(path)
    assert model.config.head_dim * model.config.num_attention_heads == 128 != model.config.hidden_size
    samples = np.random.RandomState(0).randint(0, 128, (6, 20)).astype(np.int32)
    return path, ref, model, samples


def test_head_dim_scores_match_torch_hooks(tiny):
    _, ref, model, samples = tiny
    got = compute_scores(model.params(), model.config, samples, batch_size=4)
    want = numpy_scores(torch_activations(ref, samples), model.config, "l2", "mean", "down_proj_in")
    assert got["heads"].shape == (3, 4) and got["kv_groups"].shape == (3, 2)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-7 * np.abs(want[k]).max(), err_msg=k)


def test_prune_and_export_match_transformers(tiny, tmp_path):
    path, ref, model, samples = tiny
    scores = compute_scores(model.params(), model.config, samples, batch_size=4, score_config=ScoreConfig())
    params, cfg = prune(model.params(), model.config, scores, "num_attention_heads=2,hidden_size=48")
    assert (cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size) == (2, 32, 48)
    out = tmp_path / "out"
    pruned = mj.Llama(cfg, params=params)
    mj.save_pretrained(pruned, out)
    assert json.loads((out / "config.json").read_text())["head_dim"] == 32

    # whole 32-row heads: in every layer the better head of each KV group, hidden channels by score
    hidden = np.sort(np.argsort(-scores["hidden"], kind="stable")[:48])
    teacher, student = read_all(path), read_all(out)
    for layer in range(3):
        keep = [2 * g + int(np.argmax(scores["heads"][layer, 2 * g:2 * g + 2])) for g in range(2)]
        rows = np.concatenate([np.arange(32 * h, 32 * h + 32) for h in keep])
        name = f"model.layers.{layer}.self_attn.q_proj.weight"
        np.testing.assert_array_equal(student[name], teacher[name][rows][:, hidden])
        name = f"model.layers.{layer}.self_attn.o_proj.weight"
        np.testing.assert_array_equal(student[name], teacher[name][hidden][:, rows])

    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.config.head_dim == 32 and hf.config.hidden_size == 48
    with torch.no_grad():
        want = hf(torch.tensor(samples, dtype=torch.long)).logits.numpy()
    assert rel_err(pruned(jnp.asarray(samples)), want) <= 1e-5
    assert rel_err(mj.from_pretrained(out)(jnp.asarray(samples)), want) <= 1e-5


def test_export_round_trip(tiny, tmp_path):
    path, ref, model, samples = tiny
    mj.save_pretrained(model, tmp_path / "out")
    a, b = read_all(path), read_all(tmp_path / "out")
    assert set(a) == set(b) and all(a[n].tobytes() == b[n].tobytes() for n in a)
    with torch.no_grad():
        want = ref(torch.tensor(samples, dtype=torch.long)).logits.numpy()
    assert rel_err(model(jnp.asarray(samples)), want) <= 1e-5
