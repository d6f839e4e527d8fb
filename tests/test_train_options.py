"""Trainer options: YAML recipes + overrides, gradient accumulation and remat leave the update unchanged,
bf16 compute and the intermediate hidden-state loss run, teacher correction lowers the LM loss."""


import numpy as np
import pytest

from minitron_jax.distill import train
from minitron_jax.hf import open_checkpoint
from minitron_jax.recipe import RecipeError, load_recipe
from distill_helpers import make_pair, metrics, short_documents

QUIET = lambda m: None  # noqa: E731


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("pair"), sharpen=8.0)


def recipe(pair, out, *extra):
    t, s, d = pair
    return load_recipe(None, [f"teacher={t}", f"student={s}", f"data={d}", f"out={out}", "batch_size=4",
                              "seq_len=64", "holdout=[tempest]", "eval_every=100", "save_every=100",
                              "peak_tflops=1", "mesh=[1,1,8]", "warmup=0", *extra])


def losses(out):
    return [r["loss"] for r in metrics(out)]


def test_yaml_recipe_and_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("teacher: /t\nstudent: /s\ndata: /d\nsteps: 50\nwarmup: 5\nlr: 2.0e-4\nmesh: [2, 2, 2]\n")
    rc = load_recipe(path, ["steps=7", "compute_dtype=bfloat16"])
    assert (rc.steps, rc.lr, rc.mesh, rc.compute_dtype, rc.batch_size) == (7, 2e-4, [2, 2, 2], "bfloat16", 8)
    with pytest.raises(RecipeError, match="unknown recipe keys \\['stepz'\\]"):
        load_recipe(path, ["stepz=3"])
    with pytest.raises(RecipeError, match="lr='fast' is not a valid float"):
        load_recipe(path, ["lr=fast"])
    with pytest.raises(RecipeError, match="teacher=DIR is required"):
        load_recipe(None, ["student=/s", "data=/d"])
    (tmp_path / "bad.yaml").write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(tmp_path / "bad.yaml")


def test_grad_accum_and_remat_do_not_change_the_update(pair, tmp_path):
    train(recipe(pair, tmp_path / "a", "steps=3"), log=QUIET)
    train(recipe(pair, tmp_path / "b", "steps=3", "grad_accum=2", "remat=full"), log=QUIET)
    np.testing.assert_allclose(losses(tmp_path / "b"), losses(tmp_path / "a"), rtol=1e-5)


def exported(out) -> dict[str, np.ndarray]:
    ck = open_checkpoint(out / "student_hf")
    return {name: np.asarray(ck[name].tensor(name)) for name in ck}


@pytest.mark.parametrize("hidden", [0.0, 1.0])
def test_grad_accum_with_first_fit_equals_the_full_batch(pair, tmp_path, hidden):
    """first_fit rows hold different numbers of real tokens: 4 micro-batches must give the full batch's
    token-mean update (loss sums and token counts accumulated, divided once), not the mean of 4 means."""
    data = short_documents(pair[2], tmp_path / "short")
    # eps=1e-6: AdamW's g / (sqrt(v) + eps) would otherwise turn fp32 summation-order noise in near-zero
    # gradients (rare tokens' embedding rows) into parameter differences above 1e-6
    common = ("steps=3", "packing=first_fit", "batch_size=8", "lr=1e-3", "warmup=0", "eps=1e-6",
              f"hidden_weight={hidden}", f"data={data}")
    train(recipe(pair, tmp_path / "full", *common), log=QUIET)
    train(recipe(pair, tmp_path / "acc", *common, "grad_accum=4"), log=QUIET)
    full, acc = exported(tmp_path / "full"), exported(tmp_path / "acc")
    for key in ("loss", "kl", "ce", "grad_norm") + (("hidden_loss",) if hidden else ()):
        np.testing.assert_allclose([r[key] for r in metrics(tmp_path / "acc")],
                                   [r[key] for r in metrics(tmp_path / "full")], rtol=1e-6, err_msg=key)
    for name in full:
        np.testing.assert_allclose(acc[name], full[name], rtol=0, atol=1e-6, err_msg=name)


def test_bf16_compute_runs_close_to_fp32(pair, tmp_path):
    s = train(recipe(pair, tmp_path / "bf16", "steps=3", "compute_dtype=bfloat16"), log=QUIET)
    ref = train(recipe(pair, tmp_path / "fp32", "steps=3"), log=QUIET)
    np.testing.assert_allclose(losses(tmp_path / "bf16"), losses(tmp_path / "fp32"), rtol=0.05)
    assert s["step"] == 3 and ref["step"] == 3


def test_ce_only_distillation_trains_and_evaluates(pair, tmp_path):
    """kl_weight=0, ce_weight=1: no crash at the first evaluation; the loss is the CE; the held-out KL and
    loss of the untouched student are those a KL-weighted run reports."""
    s = train(recipe(pair, tmp_path / "ce", "steps=2", "kl_weight=0", "ce_weight=1", "eval_every=1"), log=QUIET)
    ref = train(recipe(pair, tmp_path / "kl", "steps=1"), log=QUIET)
    rows = metrics(tmp_path / "ce")
    assert [r["step"] for r in rows] == [1, 2] and all("held_out_kl" in r for r in rows)
    assert all(abs(r["loss"] - r["ce"]) <= 1e-6 * r["ce"] for r in rows)
    for k in ("held_out_loss", "held_out_kl"):
        np.testing.assert_allclose(s["start_eval"][k], ref["start_eval"][k], rtol=1e-6)


def torch_layer_outputs(model_dir, ids, mask) -> np.ndarray:
    """[L, B, S, H] outputs of every decoder layer after the final norm, from transformers (forward hooks)."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    outs = []
    hooks = [layer.register_forward_hook(lambda m, i, o: outs.append(o[0] if isinstance(o, tuple) else o))
             for layer in model.model.layers]
    with torch.no_grad():
        model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long))
        states = np.stack([model.model.norm(o).numpy() for o in outs]).astype(np.float64)
    for h in hooks:
        h.remove()
    return states


def test_hidden_loss_pairs_the_layers_and_channels_pruning_kept(tmp_path):
    """A 32-layer teacher pruned to layers 0..14 and 31 and 12 of 16 hidden channels: the prune record
    beside the student gives the layer map and the initial projection (the selection of the kept
    channels), and the trainer's hidden loss equals a NumPy computation on transformers' hidden states."""
    import jax
    import jax.numpy as jnp

    import minitron_jax as mj
    from minitron_jax.distill import hidden_init, make_objective
    from minitron_jax.hf import save_params
    from minitron_jax.losses import KDConfig
    from minitron_jax.prune import prune, prune_record, save_prune_record
    from minitron_jax.recipe import RunConfig
    from helpers import save_tiny

    save_tiny(tmp_path / "t", vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=32,
              num_attention_heads=4, num_key_value_heads=2, head_dim=4)
    teacher = mj.from_pretrained(tmp_path / "t")
    t_cfg = teacher.config
    hidden_scores = np.random.default_rng(0).random(16)
    target = "drop_layers=15-30,hidden_size=12"
    s_params, s_cfg = prune(teacher.params(), t_cfg, {"hidden": hidden_scores}, target)
    save_params(s_params, s_cfg, tmp_path / "s", source=tmp_path / "t")
    save_prune_record(tmp_path / "s", prune_record(t_cfg, {"hidden": hidden_scores}, target, source=tmp_path / "t"))

    layers, proj = hidden_init(tmp_path / "s", s_cfg, t_cfg)
    kept = np.sort(np.argsort(-hidden_scores)[:12])  # the 12 highest-scored channels, in their order
    assert layers.tolist() == list(range(15)) + [31]
    expected_proj = np.zeros((12, 16), np.float32)
    expected_proj[np.arange(12), kept] = 1.0
    np.testing.assert_array_equal(proj, expected_proj)
    # no record: proportional depth and eye (today's fallback)
    (tmp_path / "s" / "minitron_prune.json").unlink()
    fallback = hidden_init(tmp_path / "s", s_cfg, t_cfg)
    assert fallback[0].tolist() == [2 * i + 1 for i in range(16)] and np.array_equal(fallback[1], np.eye(12, 16))

    rng = np.random.default_rng(1)
    ids = rng.integers(0, 64, (2, 10)).astype(np.int32)
    mask = np.ones((2, 10), np.float32)
    mask[1, 7:] = 0  # right padding
    rc = RunConfig(teacher=str(tmp_path / "t"), student=str(tmp_path / "s"), data="-", hidden_weight=1.0)
    objective = make_objective(rc, s_cfg, t_cfg, KDConfig(hidden_weight=1.0), layers)
    mb = {"input_ids": jnp.asarray(ids), "segment_ids": jnp.asarray(mask.astype(np.int32)), "mask": jnp.asarray(mask)}
    tmask = mask * np.concatenate([mask[:, 1:], np.zeros((2, 1))], 1)  # a real next token
    parts, _ = jax.jit(objective)({"model": s_params, "proj": jnp.asarray(proj)}, teacher.params(), mb,
                                  jnp.float32(tmask.sum()))

    s_states = torch_layer_outputs(tmp_path / "s", ids, mask)        # [16, B, S, 12]
    t_states = torch_layer_outputs(tmp_path / "t", ids, mask)[layers]  # [16, B, S, 16]: teacher layers 0..14, 31
    sp = s_states @ expected_proj.astype(np.float64)
    cos = (sp * t_states).sum(-1) / (np.linalg.norm(sp, axis=-1) * np.linalg.norm(t_states, axis=-1))
    ref = ((1 - cos) * tmask).sum() / (16 * tmask.sum())
    np.testing.assert_allclose(float(parts["hidden"]), ref, rtol=1e-5)


def test_teacher_correction_lowers_lm_loss(pair, tmp_path):
    t, _, d = pair
    rc = load_recipe(None, [f"student={t}", f"data={d}", f"out={tmp_path / 'ft'}", "mode=finetune", "steps=20",
                            "lr=1e-3", "warmup=2", "batch_size=8", "seq_len=64", "holdout=[tempest]",
                            "eval_every=20", "save_every=100", "peak_tflops=1", "mesh=[1,1,8]"])
    s = train(rc, log=QUIET)
    assert s["held_out_loss"] < s["start_eval"]["held_out_loss"] - 0.5
    assert "held_out_kl" not in s and (tmp_path / "ft" / "student_hf" / "config.json").exists()
