"""Structured pruning (prune/pruning.py): exact equivalences with masked originals, slicing rules, counts from
config.json alone, infeasible targets refused before any work, budget search, and transformers loading the
result."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import LLAMA3_ROPE, rel_err, save_tiny
from jax.sharding import NamedSharding
from transformers import AutoModelForCausalLM

import minitron_jax as mj
from minitron_jax.core.errors import PruneError
from minitron_jax.io.hf import save_params
from minitron_jax.model.config import LlamaConfig
from minitron_jax.model.llama import forward, is_param_spec, param_specs
from minitron_jax.model.sharding import make_mesh
from minitron_jax.prune.pruning import keep_sets, prune, rank_shapes
from minitron_jax.prune.targets import PruneTarget, candidate_targets, dry_run, parse_count, validate


def tiny_cfg(tied=False, **kw):
    base = dict(vocab_size=64, hidden_size=48, intermediate_size=80, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=2, head_dim=8, rope_theta=500000.0, rope_type="llama3",
                rope_scaling=tuple(sorted((k, float(v)) for k, v in LLAMA3_ROPE.items() if k != "rope_type")),
                tie_word_embeddings=tied)
    return LlamaConfig(**{**base, **kw})


def tiny_params(cfg, seed=0):
    """NumPy parameters in the layout of param_specs; norms around 1 so that a wrong norm slice shows."""
    rng = np.random.RandomState(seed)
    init = lambda s: ((1 if s.init == "ones" else 0) + 0.2 * rng.randn(*s.shape)).astype(np.float32)  # noqa: E731
    return jax.tree.map(init, param_specs(cfg), is_leaf=is_param_spec)


def rand_scores(cfg, seed=1):
    r = np.random.RandomState(seed)
    L = cfg.num_hidden_layers
    f = lambda *s: r.rand(*s).astype(np.float32)
    return {"mlp": f(L, cfg.intermediate_size), "heads": f(L, cfg.num_attention_heads),
            "kv_groups": f(L, cfg.num_key_value_heads), "hidden": f(cfg.hidden_size), "layer_bi": f(L),
            "layer_loss": f(L)}


IDS = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 12)))


_forward = jax.jit(forward, static_argnums=1)


def logits(params, cfg, **kw):
    return np.asarray(_forward(jax.tree.map(jnp.asarray, params), cfg, IDS, **kw))


def masked(params, layer_key, cols_by_layer):
    """Copy of params with the given input columns of `layer_key` zeroed, per layer."""
    out = jax.tree.map(np.array, params)
    for l, cols in enumerate(cols_by_layer):
        out["layers"][layer_key][l][:, cols] = 0
    return out


def dropped(keep, n):
    return [np.setdiff1d(np.arange(n), k) for k in keep]


# ---------------------------------------------------------------------------- exact equivalences
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])  # qwen2: q biases go with their heads
def test_heads_equal_zeroed_o_proj_columns(family):
    cfg = tiny_cfg(model_type=family)
    params, scores = tiny_params(cfg), rand_scores(cfg)
    new_p, new_cfg = prune(params, cfg, scores, "num_attention_heads=4")
    assert (new_cfg.num_attention_heads, new_cfg.num_key_value_heads, new_cfg.head_dim) == (4, 2, 8)
    keep = keep_sets(cfg, scores, "num_attention_heads=4")["q_heads"]
    for l, heads in enumerate(keep):  # two per group, the best of each group, in order
        for g in range(2):
            members = np.arange(4 * g, 4 * g + 4)
            assert list(heads[2 * g:2 * g + 2]) == sorted(members[np.argsort(-scores["heads"][l][members])[:2]])
    cols = [np.concatenate([np.arange(h * 8, h * 8 + 8) for h in d]) for d in dropped(keep, 8)]
    assert rel_err(logits(new_p, new_cfg), logits(masked(params, "o_proj", cols), cfg)) <= 1e-5
    assert new_p["layers"]["k_proj"] is params["layers"]["k_proj"]  # KV untouched


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])  # qwen2: k/v biases go with their groups
def test_kv_groups_equal_zeroed_o_proj_columns(family):
    cfg = tiny_cfg(num_key_value_heads=4, num_attention_heads=8, model_type=family)  # 2 heads per group
    params, scores = tiny_params(cfg), rand_scores(cfg)
    for target, heads in [("num_key_value_heads=2", 4), ("num_key_value_heads=2,num_attention_heads=2", 2)]:
        new_p, new_cfg = prune(params, cfg, scores, target)
        assert (new_cfg.num_key_value_heads, new_cfg.num_attention_heads) == (2, heads)
        p = keep_sets(cfg, scores, target)
        for l in range(4):
            groups = np.sort(np.argsort(-scores["kv_groups"][l])[:2])
            assert list(p["kv_groups"][l]) == list(groups)
            assert set(p["q_heads"][l] // 2) == set(groups)
            rows = np.concatenate([np.arange(g * 8, g * 8 + 8) for g in groups])
            np.testing.assert_array_equal(new_p["layers"]["k_proj"][l], params["layers"]["k_proj"][l][rows])
            np.testing.assert_array_equal(new_p["layers"]["v_proj"][l], params["layers"]["v_proj"][l][rows])
            if family == "qwen2":
                np.testing.assert_array_equal(new_p["layers"]["k_bias"][l], params["layers"]["k_bias"][l][rows])
        cols = [np.concatenate([np.arange(h * 8, h * 8 + 8) for h in d]) for d in dropped(p["q_heads"], 8)]
        assert rel_err(logits(new_p, new_cfg), logits(masked(params, "o_proj", cols), cfg)) <= 1e-5


def test_mlp_equals_zeroed_down_proj_columns():
    cfg = tiny_cfg(tied=True)
    params, scores = tiny_params(cfg), rand_scores(cfg)
    new_p, new_cfg = prune(params, cfg, scores, {"intermediate_size": 40})
    keep = [np.sort(np.argsort(-scores["mlp"][l])[:40]) for l in range(4)]
    for l in range(4):
        np.testing.assert_array_equal(new_p["layers"]["gate_proj"][l], params["layers"]["gate_proj"][l][keep[l]])
        np.testing.assert_array_equal(new_p["layers"]["down_proj"][l], params["layers"]["down_proj"][l][:, keep[l]])
    assert rel_err(logits(new_p, new_cfg), logits(masked(params, "down_proj", dropped(keep, 80)), cfg)) <= 1e-5


@pytest.mark.parametrize("target,metric_drop", [  # all leave 2 layers: one compile of the pruned forward
    ("drop_layers=1-2", [1, 2]), (PruneTarget(drop_layers=(3, 0)), [0, 3]),
    ("num_hidden_layers=2", "layer_bi"), ("num_hidden_layers=2,depth_metric=loss", "layer_loss")])
def test_layers_equal_skipped_layers(target, metric_drop):
    cfg = tiny_cfg()
    params, scores = tiny_params(cfg), rand_scores(cfg)
    new_p, new_cfg = prune(params, cfg, scores, target)
    n_drop = 4 - new_cfg.num_hidden_layers
    drop = metric_drop if isinstance(metric_drop, list) else np.argsort(scores[metric_drop])[:n_drop]
    gates = np.ones(4, np.float32)
    gates[list(drop)] = 0
    ref = logits(params, cfg, layer_gates=jnp.asarray(gates))
    assert rel_err(logits(new_p, new_cfg), ref) <= 1e-5


@pytest.mark.parametrize("tied,family", [(False, "llama"), (True, "llama"), (False, "qwen2"), (True, "qwen3"),
                                         (False, "mistral")])
def test_source_sizes_are_identity(tied, family):
    cfg = tiny_cfg(tied, model_type=family)
    params = tiny_params(cfg)
    target = {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                           "num_key_value_heads", "num_hidden_layers")}
    new_p, new_cfg = prune(params, cfg, {}, target)  # nothing shrinks, so no scores are needed
    assert new_cfg == cfg
    for a, b in zip(jax.tree.leaves(new_p), jax.tree.leaves(params)):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("tied,family", [(False, "llama"), (True, "llama"), (False, "qwen2"), (True, "qwen3")])
def test_hidden_slicing_matches_numpy(tied, family):
    cfg = tiny_cfg(tied, model_type=family)
    params, scores = tiny_params(cfg), rand_scores(cfg)
    target = "hidden_size=32,intermediate_size=48,num_attention_heads=4,drop_layers=2"
    new_p, new_cfg = prune(params, cfg, scores, target)
    H = np.sort(np.argsort(-scores["hidden"])[:32])
    assert list(keep_sets(cfg, scores, target)["hidden"]) == list(H) and np.all(np.diff(H) > 0)
    L = [0, 1, 3]
    lay, new = params["layers"], new_p["layers"]
    np.testing.assert_array_equal(new_p["embed_tokens"], params["embed_tokens"][:, H])
    np.testing.assert_array_equal(new_p["norm"], params["norm"][H])
    assert ("lm_head" in new_p) == (not tied)
    if not tied:
        np.testing.assert_array_equal(new_p["lm_head"], params["lm_head"][:, H])
    for i, l in enumerate(L):
        N = np.sort(np.argsort(-scores["mlp"][l])[:48])
        q = np.concatenate([np.arange(h * 8, h * 8 + 8) for g in range(2) for h in
                            np.sort(4 * g + np.argsort(-scores["heads"][l][4 * g:4 * g + 4])[:2])])
        for k in ("input_layernorm", "post_attention_layernorm"):
            np.testing.assert_array_equal(new[k][i], lay[k][l][H])
        for k in ("k_proj", "v_proj"):
            np.testing.assert_array_equal(new[k][i], lay[k][l][:, H])
        np.testing.assert_array_equal(new["q_proj"][i], lay["q_proj"][l][q][:, H])
        np.testing.assert_array_equal(new["o_proj"][i], lay["o_proj"][l][H][:, q])
        for k in ("gate_proj", "up_proj"):
            np.testing.assert_array_equal(new[k][i], lay[k][l][N][:, H])
        np.testing.assert_array_equal(new["down_proj"][i], lay["down_proj"][l][H][:, N])
        if family == "qwen2":  # biases follow the heads (q) and the groups (k, v: none pruned here)
            np.testing.assert_array_equal(new["q_bias"][i], lay["q_bias"][l][q])
            for k in ("k_bias", "v_bias"):
                np.testing.assert_array_equal(new[k][i], lay[k][l])
        if family == "qwen3":  # per-head norms over head_dim: kept whole
            for k in ("q_norm", "k_norm"):
                np.testing.assert_array_equal(new[k][i], lay[k][l])
    assert set(new) == set(lay)
    # validate's count equals the arrays prune() returns (tied embeddings counted once)
    assert sum(x.size for x in jax.tree.leaves(new_p)) == new_cfg.param_count()
    assert isinstance(new_p["layers"]["q_proj"], np.ndarray)  # NumPy in, NumPy out


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: biases resharded with their heads
def test_sharded_input_stays_sharded(tmp_path, family):
    save_tiny(tmp_path / "m", hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, family=family)
    mesh = make_mesh(2, 2, 2)
    model = mj.from_pretrained(tmp_path / "m", mesh=mesh)
    cfg, params = model.config, model.params()
    scores = rand_scores(cfg)
    target = "hidden_size=48,intermediate_size=64,num_attention_heads=2,num_hidden_layers=2"
    new_p, new_cfg = prune(params, cfg, scores, target)
    ref_p, _ = prune(jax.tree.map(np.asarray, params), cfg, scores, target)
    for a, b in zip(jax.tree.leaves(new_p), jax.tree.leaves(ref_p)):
        assert isinstance(a.sharding, NamedSharding) and a.sharding.mesh == mesh
        np.testing.assert_array_equal(np.asarray(a), b)
    assert new_p["layers"]["gate_proj"].sharding.spec == jax.sharding.PartitionSpec(None, "tensor", "fsdp")


# ---------------------------------------------------------------------------- counts from config.json
LLAMA31_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
              "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 8, "head_dim": 128, "rope_theta": 500000.0, "max_position_embeddings": 131072,
              "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}, "tie_word_embeddings": False}
SMOLLM2 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
           "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
           "head_dim": 64, "rope_theta": 100000.0, "tie_word_embeddings": True}


@pytest.mark.parametrize("hf,target,count", [
    (LLAMA31_8B, {}, 8_030_261_248),
    (LLAMA31_8B, "hidden_size=3072,intermediate_size=9216", 4_512_746_496),
    (LLAMA31_8B, "num_hidden_layers=16", 4_540_469_248),
    (LLAMA31_8B, "drop_layers=15-30", 4_540_469_248),
    (SMOLLM2, {}, 134_515_008),
    (SMOLLM2, "hidden_size=432,intermediate_size=1024", 80_979_696),
    (SMOLLM2, {"num_hidden_layers": 15}, 81_413_568)])
def test_counts_from_config_json_alone(tmp_path, hf, target, count):
    (tmp_path / "config.json").write_text(json.dumps(hf))
    new, n = dry_run(tmp_path, target)
    assert n == count and new.head_dim == hf["head_dim"]
    assert dry_run(tmp_path / "config.json", target)[1] == count


@pytest.mark.parametrize("config,target", [("mistral_nemo_12b_config.json", "hidden_size=4096,intermediate_size=11520"),
                                           ("qwen3_8b_config.json", "hidden_size=3584,intermediate_size=9216"),
                                           ("qwen3_8b_config.json", "num_hidden_layers=24")])
def test_recipe_counts_equal_transformers_models(config, target):
    """The new families' recipes (MN-Minitron-8B, Qwen3-8B -> 6B): teacher and pruned counts from config.json
    alone equal transformers' parameter count of the same config (built on the meta device: no memory)."""
    from pathlib import Path

    from transformers import AutoConfig

    path = Path(__file__).parents[2] / "configs" / config
    cfg, (new, n) = LlamaConfig.from_file(path), dry_run(path, target)

    def hf_count(c):
        d = {k: v for k, v in c.to_hf_dict().items() if k != "architectures"}
        with torch.device("meta"):
            return sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.for_model(**d)).parameters())
    assert cfg.param_count() == hf_count(cfg) and n == hf_count(new) and new.model_type == cfg.model_type


# ---------------------------------------------------------------------------- infeasible targets
SRC = LlamaConfig.from_hf_dict(SMOLLM2)


@pytest.mark.parametrize("target,match", [
    ("hidden_size=600", r"only shrinks, valid values are 1\.\.576"),
    ("intermediate_size=0", r"valid values are 1\.\.1536"),
    ("num_attention_heads=7", r"not a multiple of num_key_value_heads=3.*\[3, 6, 9\]"),
    ("num_attention_heads=8,num_key_value_heads=2", r"4 query heads per KV group.*source has 3.*\[2, 4, 6\]"),
    ("hidden_size=500", r"multiple of num_attention_heads=9.*nearby valid hidden sizes: \[486, 495, 504"),
    ("num_attention_heads=6,hidden_size=500", r"nearby valid hidden sizes: \[492, 498, 504"),
    ("drop_layers=28-30", r"\[30\] out of range: layers are 0-indexed, valid indices 0\.\.29"),
    ("drop_layers=3,4,3", r"\[3\] more than once"),
    ("num_hidden_layers=20,drop_layers=0-4", r"leaves 25; set num_hidden_layers=25"),
    ("drop_layers=0-29", r"drops all 30 layers"),
    ("num_hidden_layers=0", r"would drop all layers"),
    ("depth_metric=ppl,num_hidden_layers=3", r"choose one of \['bi', 'loss', 'window'\]"),
    ("hiden_size=3", r"unknown target key 'hiden_size'"),
    ("drop_layers=5-2", r"cannot read '5-2'"),
    ("hidden_size=4.5", r"not an integer")])
def test_infeasible_targets_fail_before_work(target, match):
    with pytest.raises(PruneError, match=match):
        validate(SRC, target)
    with pytest.raises(PruneError, match=match):
        prune(None, SRC, None, target)  # no arrays, no scores: validation comes first


@pytest.mark.parametrize("target,key", [("hidden_size=432", "hidden"), ("intermediate_size=1024", "mlp"),
                                        ("num_attention_heads=6", "heads"), ("num_key_value_heads=1", "kv_groups"),
                                        ("num_hidden_layers=20", "layer_bi"),
                                        ("num_hidden_layers=20,depth_metric=loss", "layer_loss")])
def test_missing_score_key_is_named(target, key):
    scores = {k: v for k, v in rand_scores(SRC).items() if k != key}
    with pytest.raises(PruneError, match=f"scores lack '{key}'"):
        prune(None, SRC, scores, target)
    prune_ok = {**scores, key: np.zeros(7)}
    with pytest.raises(PruneError, match=f"scores\\['{key}'\\] has shape \\[7\\]"):
        prune(None, SRC, prune_ok, target)


# ---------------------------------------------------------------------------- parsing
def test_parse_targets_and_counts():
    t = PruneTarget.parse("hidden_size=432,intermediate_size=1024")
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers) == (432, 1024, None)
    t = PruneTarget.parse("drop_layers=16,17,18, 20-22,hidden=48")
    assert t.drop_layers == (16, 17, 18, 20, 21, 22) and t.hidden_size == 48
    assert PruneTarget.parse(str(t)) == t and str(t) == "hidden_size=48,drop_layers=16-18,20-22"
    assert PruneTarget.parse({"num_hidden_layers": 16, "depth_metric": "loss"}) == \
        PruneTarget(num_hidden_layers=16, depth_metric="loss")
    assert PruneTarget.parse({"drop_layers": [3, 1], "ffn": "64"}) == PruneTarget(intermediate_size=64, drop_layers=(3, 1))
    assert parse_count("80M") == 80_000_000 and parse_count("1.5B") == 1_500_000_000
    assert parse_count("4.5e9") == 4_500_000_000 and parse_count("800k") == 800_000 and parse_count(12) == 12
    with pytest.raises(PruneError, match="80M, 1.5B"):
        parse_count("eighty")


def test_no_dead_aliases():
    """One name per function: PruneTarget.parse and prune.validate (the aliases and count_params are gone)."""
    import minitron_jax.prune.pruning as prune_module
    assert not hasattr(PruneTarget, "from_dict")
    assert not [n for n in ("pruned_config", "count_params") if hasattr(prune_module, n)]


# ---------------------------------------------------------------------------- budget search
def test_candidates_for_llama_and_smollm2():
    for hf, budget in [(LLAMA31_8B, "4.5B"), (SMOLLM2, "80M")]:
        cfg = LlamaConfig.from_hf_dict(hf)
        cands = candidate_targets(cfg, budget)
        assert 10 <= len(cands) <= 24 and len(set(cands)) == len(cands)
        b = parse_count(budget)
        for t in cands:
            new = validate(cfg, t)
            assert abs(new.param_count() - b) <= 0.05 * b
            new.check_transformers_loadable()
        kinds = {(t.num_hidden_layers is None, t.hidden_size is None) for t in cands}
        assert {(True, False), (False, True), (False, False)} <= kinds  # width-only, depth-only, mixed
    with pytest.raises(PruneError, match="not below the source"):
        candidate_targets(cfg, "200M")


def test_search_picks_best_by_callback():
    cfg = tiny_cfg(num_hidden_layers=6, hidden_size=64, intermediate_size=192, num_attention_heads=4)
    params, scores = tiny_params(cfg), rand_scores(cfg)
    budget = int(0.7 * cfg.param_count())
    seen, lines = [], []

    def evaluate(p, c):  # toy calibration loss that depends on the arrays it is handed
        assert p["layers"]["q_proj"].shape == (c.num_hidden_layers, c.num_attention_heads * 8, c.hidden_size)
        seen.append(c)
        return float(np.abs(p["layers"]["down_proj"]).mean() * 100 + np.abs(p["norm"]).sum() / c.hidden_size)

    best_p, best_cfg, table = rank_shapes(params, cfg, scores, budget, evaluate, log=lines.append, ffn_multiple=16)
    assert len(table) == len(seen) >= 5 and len(lines) == 2 * len(table) + 1
    assert all(abs(r["params"] - budget) <= 0.05 * budget for r in table)
    assert [r["loss"] for r in table] == sorted(r["loss"] for r in table)
    assert best_cfg == table[0]["config"] and evaluate(best_p, best_cfg) == table[0]["loss"]
    assert table[0]["loss"] == min(evaluate(*prune(params, cfg, scores, r["target"])) for r in table)
    with pytest.raises(PruneError, match="scores lack 'hidden'"):
        rank_shapes(None, cfg, {}, budget, evaluate, candidates=["hidden_size=32"])


# ---------------------------------------------------------------------------- export
def test_pruned_model_loads_in_transformers(tmp_path):
    save_tiny(tmp_path / "src", hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=2, head_dim=16, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)
    model = mj.from_pretrained(tmp_path / "src")
    target = "hidden_size=40,intermediate_size=64,num_attention_heads=4,drop_layers=1"
    new_p, new_cfg = prune(model.params(), model.config, rand_scores(model.config), target)
    assert (new_cfg.hidden_size, new_cfg.num_hidden_layers, new_cfg.head_dim) == (40, 3, 16)
    save_params(new_p, new_cfg, tmp_path / "out")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert hf.config.hidden_size == 40 and hf.config.head_dim == 16 and hf.config.num_attention_heads == 4
    ids = np.random.RandomState(0).randint(0, 128, (2, 16))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    assert rel_err(forward(new_p, new_cfg, jnp.asarray(ids)), ref) <= 1e-5


def test_window_depth_metric_drops_the_best_contiguous_block():
    """depth_metric=window drops the whole block whose removal scored best (lowest)."""
    from minitron_jax.prune.pruning import keep_sets
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=6,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    window = np.array([3.0, 2.5, 1.0, 4.0])  # k = 3 -> 4 windows; window 2 (layers 2,3,4) is best
    p = keep_sets(cfg, {"layer_window": window}, "num_hidden_layers=3,depth_metric=window")
    assert p["layers"].tolist() == [0, 1, 5]
    with pytest.raises(PruneError, match="layer_window"):
        keep_sets(cfg, {"layer_window": window[:3]}, "num_hidden_layers=3,depth_metric=window")
