"""Trainer options: YAML recipes + overrides, gradient accumulation and remat leave the update unchanged,
bf16 compute and the intermediate hidden-state loss run, teacher correction lowers the LM loss."""


import numpy as np
import pytest

from minitron_jax.distill import train
from minitron_jax.recipe import RecipeError, load_recipe
from distill_helpers import make_pair, metrics

QUIET = lambda m: None  # noqa: E731


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("pair"), sharpen=8.0)


def recipe(pair, out, *extra):
    t, s, d = pair
    return load_recipe(None, [f"teacher={t}", f"student={s}", f"data={d}", f"out={out}", "batch_size=4",
                              "seq_len=64", "holdout=[tempest]", "eval_every=100", "save_every=100",
                              "peak_tflops=1", "mesh=[1,1,8]", *extra])


def losses(out):
    return [r["loss"] for r in metrics(out)]


def test_yaml_recipe_and_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("teacher: /t\nstudent: /s\ndata: /d\nsteps: 50\nlr: 2.0e-4\nmesh: [2, 2, 2]\n")
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


def test_bf16_compute_and_hidden_loss_run(pair, tmp_path):
    s = train(recipe(pair, tmp_path / "bf16", "steps=3", "compute_dtype=bfloat16"), log=QUIET)
    ref = train(recipe(pair, tmp_path / "fp32", "steps=3"), log=QUIET)
    np.testing.assert_allclose(losses(tmp_path / "bf16"), losses(tmp_path / "fp32"), rtol=0.05)
    assert s["step"] == 3 and ref["step"] == 3
    h = train(recipe(pair, tmp_path / "hid", "steps=2", "hidden_weight=1.0"), log=QUIET)
    rows = metrics(tmp_path / "hid")
    assert all(r["hidden_loss"] > 0 for r in rows)
    # the dynamic weight makes the hidden term as large as the logit term: loss = 2 x kl
    assert all(abs(r["loss"] - 2 * r["kl"]) <= 1e-5 * r["loss"] for r in rows) and h["step"] == 2


def test_teacher_correction_lowers_lm_loss(pair, tmp_path):
    t, _, d = pair
    rc = load_recipe(None, [f"student={t}", f"data={d}", f"out={tmp_path / 'ft'}", "mode=finetune", "steps=20",
                            "lr=1e-3", "warmup=2", "batch_size=8", "seq_len=64", "holdout=[tempest]",
                            "eval_every=20", "save_every=100", "peak_tflops=1", "mesh=[1,1,8]"])
    s = train(rc, log=QUIET)
    assert s["held_out_loss"] < s["start_eval"]["held_out_loss"] - 0.5
    assert "held_out_kl" not in s and (tmp_path / "ft" / "student_hf" / "config.json").exists()
