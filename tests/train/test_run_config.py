"""Trainer options: YAML recipes + overrides, gradient accumulation and remat leave the update unchanged,
bf16 compute and the intermediate hidden-state loss run, teacher correction lowers the LM loss."""


import numpy as np
import pytest
from distill_helpers import make_pair, metrics, short_documents

from minitron_jax.core.errors import RecipeError
from minitron_jax.io.hf import open_checkpoint
from minitron_jax.train.run_config import RunConfig, load_recipe
from minitron_jax.train.trainer import train

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
    from helpers import save_tiny

    import minitron_jax as mj
    from minitron_jax.io.hf import save_params
    from minitron_jax.prune.record import prune_record, save_prune_record
    from minitron_jax.model.losses import KDConfig
    from minitron_jax.prune.pruning import prune
    from minitron_jax.train.run_config import RunConfig
    from minitron_jax.train.trainer import hidden_init, make_objective

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


# ---------------------------------------------------------------------------- values refused before work
BASE = ["teacher=/t", "student=/s", "data=/d"]


@pytest.mark.parametrize("override, message", [
    ("lr=-1", r"lr=-1 must be in \(0, inf\)"),
    ("lr=0", r"lr=0 must be in \(0, inf\)"),
    ("min_lr=-1e-5", r"min_lr=-1e-05 must be in \[0, 0.0001\]"),
    ("min_lr=1e-3", r"min_lr=0.001 must be in \[0, 0.0001\]"),
    ("clip=-1", r"clip=-1 must be in \[0, inf\) \(the global gradient-norm limit; 0 = no clipping\)"),
    ("warmup=-10", r"warmup=-10 must be 0 or more"),
    ("remat=bogus", r"remat='bogus': choose one of none, full, dots"),
    ("compute_dtype=fp8", r"compute_dtype='fp8': choose one of float32, bfloat16, float16"),
    ("eval_batches=0", r"eval_batches=0 must be positive"),
    ("chunk_size=0", r"chunk_size=0 must be positive"),
    ("top_k=-5", r"top_k=-5 must be 0 \(the whole vocabulary\) or more"),
    ("temperature=0", r"temperature=0 must be in \(0, inf\)"),
    ("weight_decay=-0.1", r"weight_decay=-0.1 must be in \[0, inf\)"),
    ("b1=1", r"b1=1 must be in \[0, 1\)"),
    ("b2=-0.5", r"b2=-0.5 must be in \[0, 1\)"),
    ("eps=0", r"eps=0 must be in \(0, inf\)"),
    ("kl_weight=-1", r"kl_weight=-1 must be in \[0, inf\)"),
    ("ce_weight=-1", r"ce_weight=-1 must be in \[0, inf\)"),
    ("kl_weight=0", r"kl_weight=0 and ce_weight=0 leave no logit loss"),
    ("hidden_weight=-1", r"hidden_weight=-1 must be in \[0, inf\)"),
    ("holdout_fraction=1", r"holdout_fraction=1 must be in \[0, 1\)"),
    ("holdout_fraction=-0.1", r"holdout_fraction=-0.1 must be in \[0, 1\)"),
    ("peak_tflops=0", r"peak_tflops=0 must be in \(0, inf\)"),
    ("lr=.nan", r"lr=nan must be a finite number"),
    ("mesh=[1,-1,-1]", r"mesh=\[1, -1, -1\]: each size must be positive, or -1 for at most one axis"),
    ("mesh=[1,0,8]", r"mesh=\[1, 0, 8\]: each size must be positive"),
    ("mesh=[1,-2,8]", r"mesh=\[1, -2, 8\]: each size must be positive"),
])
def test_bad_values_are_refused_by_validate(override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(None, [*BASE, override])


def test_edge_values_still_validate():
    """The limits themselves are valid: clip=0 (no clipping), min_lr=0 and min_lr=lr, b1=0, CE-only
    distillation, fine-tuning with both KD weights 0 (unused there)."""
    for extra in (["clip=0"], ["min_lr=0"], ["min_lr=1e-4"], ["b1=0"], ["kl_weight=0", "ce_weight=1"],
                  ["mode=finetune", "kl_weight=0"], ["holdout_fraction=0"], ["mesh=[2,2,2]"], ["top_k=0"]):
        load_recipe(None, [*BASE, *extra])


def test_remat_choices_are_the_models():
    from minitron_jax.model.llama import REMAT_POLICIES
    from minitron_jax.train.run_config import REMAT
    assert set(REMAT) == set(REMAT_POLICIES)


def test_clip_zero_means_no_clipping():
    """clip=0 updates exactly as an unreachable clip does (a huge gradient passes whole: before, it zeroed
    every update); clip=1 does not. Two steps, so that Adam's moments see the clipped scale."""
    import jax.numpy as jnp

    from minitron_jax.train.trainer import make_optimizer

    params = {"w": jnp.ones((3,)), "norm": jnp.ones((2,))}
    grads = [{"w": jnp.asarray([300.0, -40.0, 5.0]), "norm": jnp.asarray([1.0, 2.0])},
             {"w": jnp.asarray([0.1, 0.2, -0.3]), "norm": jnp.asarray([0.0, 0.1])}]

    def updates(clip):
        tx, _ = make_optimizer(RunConfig(clip=clip, warmup=0, steps=10, weight_decay=0.0))
        state, out = tx.init(params), []
        for g in grads:
            upd, state = tx.update(g, state, params)
            out.append(np.asarray(upd["w"]))
        return np.stack(out)
    np.testing.assert_array_equal(updates(0.0), updates(1e30))
    assert np.abs(updates(0.0)).min() > 0 and not np.allclose(updates(1.0), updates(0.0))


def test_mesh_that_does_not_fit_the_devices_is_refused_before_loading(pair, tmp_path, no_weight_reads):
    """8 devices here: 3 does not divide them; the message names the count and a mesh that fits."""
    import jax

    from minitron_jax.train.preflight import check_mesh
    assert jax.device_count() == 8
    with pytest.raises(RecipeError, match=r"mesh=\[1, -1, 3\] does not fit the 8 devices here .*e.g. mesh=\[1,-1,1\]"):
        train(recipe(pair, tmp_path / "m", "mesh=[1,-1,3]", "steps=2"), log=QUIET)
    with pytest.raises(RecipeError, match=r"mesh=\[2, 2, 4\] does not fit the 8 devices .*e.g. mesh=\[2,-1,4\]"):
        check_mesh(RunConfig(mesh=[2, 2, 4]))
    assert check_mesh(RunConfig(mesh=[2, -1, 2])) == (2, 2, 2)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("who", ["student", "teacher"])
def test_tokenizer_larger_than_the_embedding_is_refused_before_loading(pair, tmp_path, no_weight_reads, who):
    """A tokenizer that can emit ids beyond vocab_size (here 512 rows, 520 tokens) gave NaN losses that
    the trainer blamed on the learning rate; now check_pair refuses it, naming both numbers."""
    import shutil

    from transformers import AutoTokenizer

    from minitron_jax.core.errors import CheckpointError
    t, s, d = pair
    big = shutil.copytree(t if who == "teacher" else s, tmp_path / who)
    tok = AutoTokenizer.from_pretrained(big)
    tok.add_tokens([f"<extra_{i}>" for i in range(8)])
    tok.save_pretrained(big)
    assert len(tok) == 520
    paths = {"teacher": t, "student": s, who: big}
    with pytest.raises(CheckpointError, match=f"the tokenizer of {big} has 520 tokens but the model's embedding has "
                                              "only 512 rows"):
        train(recipe((paths["teacher"], paths["student"], d), tmp_path / "tok", "steps=2"), log=QUIET)
    assert not (tmp_path / "tok").exists()
