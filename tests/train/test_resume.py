"""Resuming: settings are compared with the checkpoints' recipe.json before anything loads (refused,
forced with resume_allow, or free), a student of another shape is named instead of an orbax traceback,
a damaged newest checkpoint is skipped for the one before it (exactly), and recipe.json is written
only by runs that start."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
from distill_helpers import metrics

from minitron_jax.core.errors import RecipeError, ResumeError
from minitron_jax.core.yaml_config import dump
from minitron_jax.io.hf import open_checkpoint
from minitron_jax.train.run_config import RESUME_FREE, RESUME_NEVER, RunConfig, check_resume, load_recipe
from minitron_jax.train.trainer import train

COMMON = ("batch_size=4", "seq_len=64", "holdout=[tempest]", "eval_every=100", "save_every=1", "peak_tflops=1",
          "mesh=[1,1,8]", "warmup=0", "steps=3")


def recipe(pair, out, *extra):
    t, s, d = pair
    return load_recipe(None, [f"teacher={t}", f"student={s}", f"data={d}", f"out={out}", *COMMON, *extra])


@pytest.fixture(scope="module")
def base(pair, tmp_path_factory):
    """3 steps, a checkpoint after each, the exported student: the uninterrupted run."""
    out = tmp_path_factory.mktemp("base") / "run"
    train(recipe(pair, out), log=lambda m: None)
    return out


def copy_run(base, tmp_path):
    return shutil.copytree(base, tmp_path / "run")


def snapshot(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture
def no_loading(monkeypatch):
    from minitron_jax.data import loader
    from minitron_jax.io import hf
    for mod, name in ((hf, "from_pretrained"), (loader, "build_corpus")):
        monkeypatch.setattr(mod, name, lambda *a, **k: pytest.fail("weights or data loaded before the refusal"))


def corrupt(step_dir):
    """Truncate every file of the step's saved state to half its length."""
    for f in (step_dir / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


# ---------------------------------------------------------------------------- changed settings
@pytest.mark.parametrize("extra, message", [
    (["lr=2e-4"], r"lr 0.0001 -> 0.0002; to go on with the new lr anyway .* add resume_allow=\[lr\]"),
    (["temperature=2"], r"temperature 1.0 -> 2.0; .*resume_allow=\[temperature\]"),
    (["seq_len=32"], r"seq_len 64 -> 32; seq_len cannot change on resume"),
    (["seed=1", "lr=2e-4", "resume_allow=[lr]"], r"differ from those of its checkpoints .*: seed 0 -> 1; seed cannot"),
    (["hidden_weight=1", "resume_allow=[hidden_weight]"], r"hidden_weight 0.0 -> 1.0; hidden_weight cannot change"),
    (["split_seed=1"], r"differ from those of its checkpoints .*: split_seed 0 -> 1; split_seed cannot change"),
])
def test_changed_settings_are_refused_before_loading(pair, base, tmp_path, no_loading, extra, message):
    out = copy_run(base, tmp_path)
    before = snapshot(out)
    with pytest.raises(RecipeError, match=message):
        train(recipe(pair, out, "resume=true", *extra), log=lambda m: None)
    assert snapshot(out) == before  # recipe.json, checkpoints and metrics untouched


def test_resume_allow_forces_a_change_and_records_it(pair, base, tmp_path):
    out = copy_run(base, tmp_path)
    lines = []
    train(recipe(pair, out, "resume=true", "steps=4", "lr=2e-4", "eval_every=7", "resume_allow=[steps,lr]"),
          log=lines.append)
    assert "resume: steps 3 -> 4 (resume_allow)" in lines and "resume: lr 0.0001 -> 0.0002 (resume_allow)" in lines
    assert "resume: eval_every 100 -> 7" in lines  # free: logged only
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]
    recorded = json.loads((out / "recipe.json").read_text())
    assert (recorded["steps"], recorded["lr"], recorded["resume_allow"]) == (4, 2e-4, ["steps", "lr"])
    assert not list(out.glob(".recipe.json.tmp*"))


def test_student_of_another_shape_is_named_not_an_orbax_traceback(pair, base, tmp_path, no_loading):
    t, s, _ = pair
    out = copy_run(base, tmp_path)
    shapes = r"\['model'\]\['embed_tokens'\]: \(512, 54\) in the checkpoint, \(512, 72\) now"
    with pytest.raises(ResumeError, match=r"checkpoint step 3 in .* holds other arrays than .*teacher .*" + shapes):
        train(recipe(pair, out, "resume=true", f"student={t}", "resume_allow=[student]"), log=lambda m: None)


def test_recipe_json_of_another_version_is_a_clear_error(pair, base, tmp_path, no_loading):
    out = copy_run(base, tmp_path)
    old = json.loads((out / "recipe.json").read_text())
    del old["packing"], old["resume_allow"]
    old["warmup_ratio"] = 0.1
    (out / "recipe.json").write_text(json.dumps(old))
    with pytest.raises(RecipeError, match=r"recipe.json was written by another minitron version \(it lacks packing; "
                                          r"it has keys this version does not know: warmup_ratio\).*delete it"):
        train(recipe(pair, out, "resume=true"), log=lambda m: None)
    (out / "recipe.json").write_text("[1, 2]")
    with pytest.raises(RecipeError, match="is not a JSON object"):
        train(recipe(pair, out, "resume=true"), log=lambda m: None)


def test_recipe_json_from_before_split_seed_resumes_with_the_seed_that_drew_its_splits():
    """A recipe.json without split_seed drew its splits with `seed`: seed=0 resumes with today's default
    split_seed=0; seed=3 resumes only with split_seed=3."""
    for seed in (0, 3):
        rc = RunConfig(teacher="t", student="s", data="d", holdout_fraction=0.1, seed=seed)
        old = json.loads(dump(rc))
        del old["split_seed"]
        if seed == 0:
            assert check_resume(old, rc, "recipe.json") == []
            continue
        with pytest.raises(RecipeError, match="split_seed 3 -> 0; split_seed cannot change on resume"):
            check_resume(old, rc, "recipe.json")
        assert check_resume(old, dataclasses.replace(rc, split_seed=3), "recipe.json") == []


def test_resume_classification_covers_every_key():
    """Every RunConfig key is free, forced or never, as the RunConfig docstring lists them."""
    keys = {f.name for f in dataclasses.fields(RunConfig)}
    forced = {"steps", "lr", "min_lr", "warmup", "weight_decay", "b1", "b2", "eps", "clip", "temperature", "kl_weight",
              "ce_weight", "top_k", "hidden_weight", "compute_dtype", "teacher_dtype", "teacher", "student", "data",
              "teacher_logits"}
    assert not (set(RESUME_FREE) & set(RESUME_NEVER)) and not (forced & (set(RESUME_FREE) | set(RESUME_NEVER)))
    assert set(RESUME_FREE) | set(RESUME_NEVER) | forced == keys
    for k in keys:
        assert k in RunConfig.__doc__, k
    rc = RunConfig(teacher="t", student="s", data="d")
    recorded = json.loads(dump(rc))
    for k in forced - {"hidden_weight"}:  # each forced key: refused, then allowed
        changed = dataclasses.replace(rc, **{k: "other" if isinstance(getattr(rc, k), (str, type(None)))
                                             else getattr(rc, k) + 1})
        with pytest.raises(RecipeError, match=f"resume_allow=\\[{k}\\]"):
            check_resume(recorded, changed, "recipe.json")
        assert check_resume(recorded, dataclasses.replace(changed, resume_allow=[k]), "recipe.json")
    with pytest.raises(RecipeError, match="seq_len can never change on resume"):
        dataclasses.replace(rc, resume_allow=["seq_len"]).validate()
    with pytest.raises(RecipeError, match="stepz is not a recipe key"):
        dataclasses.replace(rc, resume_allow=["stepz"]).validate()


# ---------------------------------------------------------------------------- damaged checkpoints
def test_damaged_newest_checkpoint_is_skipped_and_the_run_resumes_exactly(pair, base, tmp_path):
    out = copy_run(base, tmp_path)
    corrupt(out / "checkpoints" / "3")
    lines = []
    summary = train(recipe(pair, out, "resume=true"), log=lines.append)
    log = "\n".join(lines)
    assert f"warning: checkpoint {out / 'checkpoints' / '3'} does not restore" in log, log
    assert "resumed from" in log and "at step 2" in log and summary["step"] == 3
    assert [p.name.split("-")[0] for p in (out / "checkpoints_skipped").iterdir()] == ["3"]
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [1, 2, 3]
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 3]
    assert metrics(out)[3]["batch_fingerprint"] == metrics(base)[2]["batch_fingerprint"]
    a, b = open_checkpoint(out / "student_hf"), open_checkpoint(base / "student_hf")
    for name in a:  # step 3 redone from checkpoint 2 equals the uninterrupted run's step 3
        np.testing.assert_array_equal(np.asarray(a[name].tensor(name)), np.asarray(b[name].tensor(name)), err_msg=name)


def test_no_checkpoint_restoring_is_one_clear_error(pair, base, tmp_path):
    out = copy_run(base, tmp_path)
    for step in (1, 2, 3):
        corrupt(out / "checkpoints" / str(step))
    recipe_before = (out / "recipe.json").read_text()
    with pytest.raises(ResumeError, match=r"no checkpoint in .*checkpoints restores \(step 3: .*; step 2: .*; "
                                            r"step 1: .*\): the files are damaged"):
        train(recipe(pair, out, "resume=true", "lr=2e-4", "resume_allow=[lr]"), log=lambda m: None)
    assert (out / "recipe.json").read_text() == recipe_before  # a resume that did not start records nothing
    assert not (out / "checkpoints_skipped").exists()


def test_fresh_run_writes_recipe_json_whole(base):
    assert json.loads((base / "recipe.json").read_text())["steps"] == 3
    assert not list(base.glob(".recipe.json.tmp*")) and not (base / ".minitron.lock").exists()
