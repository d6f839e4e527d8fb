"""The distillation recipe (train/run_config.py): YAML recipes + overrides, every bad value refused by
`validate` with the valid range, the limits themselves accepted, and validation never changing a value."""

import dataclasses

import pytest

from minitron_jax.core.errors import RecipeError
from minitron_jax.run.pipeline import distill_recipe, load_pipeline
from minitron_jax.train.run_config import RunConfig, load_recipe


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


# ---------------------------------------------------------------------------- validation changes nothing
def test_validate_refuses_warmup_not_below_steps_and_changes_nothing():
    rc = RunConfig(teacher="t", student="s", data="d", steps=20, warmup=40)
    before = dataclasses.asdict(rc)
    with pytest.raises(RecipeError, match=r"^warmup=40 must be below steps=20: set warmup=2 \(steps/10\) or more steps$"):
        rc.validate()
    assert dataclasses.asdict(rc) == before
    ok = RunConfig(teacher="t", student="s", data="d", steps=20, warmup=19)
    assert ok.validate() is ok and dataclasses.asdict(ok) == {**before, "warmup": 19}
    with pytest.raises(RecipeError, match=r"pipeline distill section: warmup=15 must be below steps=4"):
        distill_recipe(load_pipeline(None, ["distill.steps=4"]), teacher="t", student="s", data="d")
