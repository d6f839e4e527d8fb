"""The one configuration loader (core/yaml_config.py): YAML files with `base:` files relative to the YAML,
merged section by section, and dotted `key=value` overrides that reach any depth of nested dataclasses,
typed from `typing.get_type_hints`. The recipe and pipeline configs it loads are tested in
train/test_run_config.py and run/test_pipeline_config.py."""

from __future__ import annotations

import dataclasses

import pytest

from minitron_jax.core.errors import RecipeError
from minitron_jax.core.yaml_config import load
from minitron_jax.run.pipeline import PipelineConfig, load_pipeline
from minitron_jax.train.run_config import load_recipe

PATHS = ["teacher=-", "student=-", "data=-"]


def test_base_files_are_relative_to_the_yaml_and_merge_by_section(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "root.yaml").write_text("out: r\nscore: {samples: 5, seq_len: 32}\ndistill: {steps: 9, warmup: 1}\n")
    (tmp_path / "a" / "mid.yaml").write_text("base: ../root.yaml\nscore: {seq_len: 64}\nseed: 3\n")
    (tmp_path / "a" / "leaf.yaml").write_text("base: mid.yaml\nscore: {batch_size: 2}\ndistill: {lr: 2.0e-4}\n")
    cfg = load_pipeline(tmp_path / "a" / "leaf.yaml", ["score.samples=6"])
    ref = PipelineConfig()
    assert (cfg.out, cfg.seed) == ("r", 3)
    assert dataclasses.astuple(cfg.score) == (6, 64, 2, ref.score.layer_samples, None)
    assert dataclasses.replace(cfg.distill, steps=ref.distill.steps, warmup=ref.distill.warmup, lr=ref.distill.lr) \
        == ref.distill and (cfg.distill.steps, cfg.distill.warmup, cfg.distill.lr) == (9, 1, 2e-4)
    (tmp_path / "x.yaml").write_text("base: y.yaml\n")
    (tmp_path / "y.yaml").write_text("base: x.yaml\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_pipeline(tmp_path / "x.yaml")
    (tmp_path / "z.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(RecipeError, match="cannot read config .*missing.yaml"):
        load_recipe(tmp_path / "z.yaml", PATHS)


@dataclasses.dataclass
class Inner:
    x: int = 1
    ids: list[int] = dataclasses.field(default_factory=list)
    name: str | None = None


@dataclasses.dataclass
class Mid:
    inner: Inner = dataclasses.field(default_factory=Inner)
    rate: float = 0.5


@dataclasses.dataclass
class Outer:
    mid: Mid = dataclasses.field(default_factory=Mid)
    flag: bool = False


def test_dotted_overrides_reach_any_depth_with_types_from_the_hints():
    cfg = load(Outer, None, ["mid.inner.x=3", "mid.inner.ids=4,5", "mid.rate=2e-4", "flag=yes", "mid.inner.name=007"])
    assert cfg == Outer(Mid(Inner(3, [4, 5], "007"), 2e-4), True)
    assert load(Outer, None, ["mid.inner.name="]) == Outer()  # an empty value is None for an optional field
    assert load(Outer, None, ["mid.inner.ids=[]"]) == Outer()
    assert load(Outer, None, {"mid.inner.x": 4, "mid": {"rate": 1.0}}) == Outer(Mid(Inner(4), 1.0))  # a dict too
    for bad, msg in (("mid.inner.x=2.5", r"mid.inner.x=2.5 is not a valid int"),
                     ("mid.inner.x.y=2", r"mid.inner.x takes a value \(int\), not keys: mid.inner.x.y= has nowhere to go"),
                     ("mid.inner.z=2", r"unknown mid.inner keys \['z'\]; valid keys: x, ids, name"),
                     ("mid=3", r"mid=3: mid is a section"),
                     ("flag=maybe", r"flag='maybe' is not a valid bool"),
                     ("mid.rate=true", r"mid.rate=True is not a valid float"),  # a bool is no number
                     ("mid.inner.ids=", r"mid.inner.ids needs a value \(an empty list is mid.inner.ids=\[\]\)"),
                     ("base=x.yaml", r"base= names a base file inside a YAML config, not on the command line")):
        with pytest.raises(RecipeError, match=msg):
            load(Outer, None, [bad])
