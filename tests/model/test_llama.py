"""The model (model/llama.py): logits of the Flax model equal transformers' (PyTorch, fp32, CPU) on
tiny random Llamas; capture sites equal its hidden states; param_specs match its tensors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import LLAMA3_ROPE, rel_err, save_tiny

import minitron_jax as mj

TOL = 1e-5  # max |jax - torch| / max |torch| on fp32 logits

CONFIGS = {
    "gqa_untied_llama3_headdim": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                      rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
    "mha_tied_default": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
                             rope_theta=10000.0),
    "gqa_tied_llama3": dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True,
                            rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
    "mqa_untied_headdim": dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                               intermediate_size=80, rope_theta=100000.0),
}


def torch_logits(model, ids, mask=None, positions=None):
    with torch.no_grad():
        kw = {}
        if mask is not None:
            kw["attention_mask"] = torch.tensor(mask)
        if positions is not None:
            kw["position_ids"] = torch.tensor(positions)
        return model(torch.tensor(ids), **kw).logits.numpy()


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(tmp_path, name):
    ref_model = save_tiny(tmp_path, **CONFIGS[name])
    model = mj.from_pretrained(tmp_path)
    ids = np.random.RandomState(1).randint(0, 128, (2, 48))
    out = np.asarray(model(jnp.asarray(ids)))
    assert out.shape == (2, 48, 128)
    assert rel_err(out, torch_logits(ref_model, ids)) <= TOL


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_matches_transformers(tmp_path, side):
    ref_model = save_tiny(tmp_path, **CONFIGS["gqa_untied_llama3_headdim"])
    model = mj.from_pretrained(tmp_path)
    ids = np.random.RandomState(2).randint(0, 128, (3, 40))
    mask = np.ones((3, 40), np.int64)
    for row, n_pad in ((1, 13), (2, 31)):
        if side == "right":
            mask[row, 40 - n_pad:] = 0
        else:
            mask[row, :n_pad] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # what generate() passes for left padding
    out = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    ref = torch_logits(ref_model, ids, mask, positions)
    real = mask.astype(bool)
    assert rel_err(out, ref, real) <= TOL


def test_packed_segments_equal_separate_documents(tmp_path):
    """Segment ids reset attention and positions: a packed row equals each document run alone."""
    ref_model = save_tiny(tmp_path, **CONFIGS["gqa_tied_llama3"])
    model = mj.from_pretrained(tmp_path)
    rng = np.random.RandomState(3)
    docs = [rng.randint(0, 128, n) for n in (11, 20, 9)]
    packed = np.concatenate(docs)[None]
    seg = np.concatenate([np.full(len(d), i) for i, d in enumerate(docs)])[None]
    out = np.asarray(model(jnp.asarray(packed), segment_ids=jnp.asarray(seg)))[0]
    start = 0
    for d in docs:
        ref = torch_logits(ref_model, d[None])[0]
        assert rel_err(out[start:start + len(d)], ref) <= TOL
        start += len(d)


def test_llama3_rope_changes_logits(tmp_path):
    """The llama3 frequency scaling matters (the spec's pitfall): dropping it moves logits beyond tolerance."""
    save_tiny(tmp_path, **CONFIGS["gqa_untied_llama3_headdim"])
    model = mj.from_pretrained(tmp_path)
    ids = jnp.asarray(np.random.RandomState(4).randint(0, 128, (1, 64)))
    plain = mj.Llama(model.config.replace(rope_type="default", rope_scaling=()), params=model.params())
    assert rel_err(plain(ids), model(ids)) > 100 * TOL


def test_capture_is_free_and_matches_transformers_hidden_states(tmp_path):
    """Capture leaves logits unchanged, covers every site, and its per-layer inputs/outputs are
    transformers' hidden states (so importance statistics read the right activations)."""
    ref_model = save_tiny(tmp_path, **CONFIGS["gqa_untied_llama3_headdim"])
    model = mj.from_pretrained(tmp_path)
    cfg = model.config
    ids = np.random.RandomState(5).randint(0, 128, (2, 16))
    logits, stats = model(jnp.asarray(ids), capture=lambda acts, m: acts)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(model(jnp.asarray(ids))))
    q, f, h, L = cfg.num_attention_heads * cfg.head_dim, cfg.intermediate_size, cfg.hidden_size, cfg.num_hidden_layers
    expect = {"layer_in": h, "attn_norm": h, "o_proj_in": q, "mlp_norm": h, "mlp_pre": f, "down_proj_in": f, "layer_out": h}
    assert {k: v.shape for k, v in stats.items()} == {k: (L, 2, 16, c) for k, c in expect.items()}
    with torch.no_grad():
        hs = ref_model(torch.tensor(ids), output_hidden_states=True).hidden_states
    for layer in range(L):
        assert rel_err(stats["layer_in"][layer], hs[layer].numpy()) <= TOL
    for layer in range(L - 1):
        assert rel_err(stats["layer_out"][layer], hs[layer + 1].numpy()) <= TOL


@pytest.mark.parametrize("tied", [False, True])
def test_param_specs_match_transformers(tied):
    """param_specs: one ParamSpec per HF tensor, with HF's shape and HF's initialiser (ones = norms)."""
    from helpers import tiny_hf_config
    from transformers import LlamaForCausalLM

    from minitron_jax.io.hf import hf_name
    from minitron_jax.model.llama import ParamSpec, init_params, is_param_spec, param_specs

    hf_cfg = tiny_hf_config(head_dim=24, tie_word_embeddings=tied)
    torch.manual_seed(0)
    hf = dict(LlamaForCausalLM(hf_cfg).named_parameters())
    cfg = mj.LlamaConfig.from_hf_dict(hf_cfg.to_dict())
    specs = param_specs(cfg)
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_param_spec)[0]
    assert all(isinstance(s, ParamSpec) for _, s in flat)
    seen = set()
    for path, s in flat:
        keys = [p.key for p in path]
        for i in range(cfg.num_hidden_layers) if keys[0] == "layers" else [None]:
            name = hf_name(keys[-1], i)
            seen.add(name)
            t = hf[name].detach().numpy()
            assert s.shape == ((cfg.num_hidden_layers,) if i is not None else ()) + t.shape, name
            assert s.init == ("ones" if np.all(t == 1) else "normal"), name
    assert seen == set(hf)
    params = init_params(cfg, jax.random.key(0))
    for (path, s), x in zip(flat, jax.tree.leaves(params)):
        assert x.shape == s.shape and (np.all(np.asarray(x) == 1) == (s.init == "ones")), path
