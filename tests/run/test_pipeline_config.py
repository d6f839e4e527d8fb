"""The pipeline config of `minitron run` (run/pipeline.py) and the files in configs/: every YAML validates, the
8B files (base + delta) equal their explicit values, unknown pipeline keys are refused at every level,
sections are typed, a recipe file supplies the distill defaults, teacher correction has its own schedule.
The loader itself (`base:` files, dotted overrides) is tested in core/test_yaml_config.py."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest

from minitron_jax.core.errors import DataError, RecipeError
from minitron_jax.model.config import LlamaConfig
from minitron_jax.prune.targets import PruneTarget, dry_run, validate
from minitron_jax.run.pipeline import (
    FinetuneSettings,
    Pipeline,
    PipelineConfig,
    PruneSettings,
    align_recipe,
    distill_recipe,
    finetune_recipe,
    load_pipeline,
)
from minitron_jax.train.run_config import RunConfig, load_recipe

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
PIPELINES = sorted(CONFIGS.glob("pipeline_*.yaml")) + [CONFIGS / "smollm2_cpu.yaml", CONFIGS / "smollm2_cpu_align.yaml"]
PATHS = ["teacher=-", "student=-", "data=-"]


@pytest.fixture(autouse=True)
def repo_root(monkeypatch):  # the configs name their teacher / recipe files relative to the repository
    monkeypatch.chdir(ROOT)


# ---------------------------------------------------------------------------- every file in configs/
def test_every_yaml_in_configs_validates():
    files = sorted(CONFIGS.glob("*.yaml"))
    recipes = [f for f in files if f not in PIPELINES]
    assert all(f.exists() for f in PIPELINES) and len(recipes) >= 5
    for f in recipes:
        rc = load_recipe(f, PATHS)
        assert isinstance(rc, RunConfig), f
    for f in PIPELINES:
        cfg = load_pipeline(f)
        distill_recipe(cfg, teacher="-", student="-", data="-")  # the distillation settings validate
        if cfg.align.steps:  # the align recipe validates and its examples or prompts are there
            align_recipe(cfg, student="-", data="-")
            assert Path(cfg.align.prompts or cfg.align.data).is_file(), f
        if cfg.teacher.endswith("config.json"):  # the target fits the teacher
            validate(LlamaConfig.from_file(cfg.teacher), cfg.prune.target)


# the 8B files before they became base + delta: the recipe of the papers and the pipelines around it
EXPLICIT_RECIPE = """steps: 9960
batch_size: 1152
grad_accum: 18
seq_len: 8192
lr: 1.0e-4
min_lr: 1.0e-5
warmup: 40
weight_decay: 0.1
clip: 1.0
temperature: 1.0
ce_weight: 0.0
chunk_size: 512
compute_dtype: bfloat16
teacher_dtype: bfloat16
remat: full
mesh: [1, -1, 1]
save_every: 100
keep: 3
eval_every: 200
packing: concat
"""
EXPLICIT_PIPELINE = """teacher: configs/llama31_8b_config.json
data: /path/to/corpus
holdout: []
out: runs/llama31_8b_to_4b_{kind}
score: {{samples: 1024, seq_len: 8192, batch_size: 8}}
prune: {{target: "{target}"}}
recipe: {recipe}
distill: {{holdout_fraction: 0.001}}
eval: {{samples: 64, seq_len: 8192, task_items: 500}}
"""
TARGETS = {"width": "hidden_size=3072,intermediate_size=9216", "depth": "drop_layers=15-30"}


@pytest.mark.parametrize("kind", ["width", "depth"])
@pytest.mark.parametrize("hw", ["gpu", "tpu"])
def test_base_plus_delta_equals_the_explicit_values(tmp_path, kind, hw):
    (tmp_path / "recipe.yaml").write_text(EXPLICIT_RECIPE)
    assert load_recipe(CONFIGS / f"llama31_8b_to_4b_{kind}_{hw}.yaml", PATHS) == load_recipe(tmp_path / "recipe.yaml", PATHS)
    (tmp_path / "pipe.yaml").write_text(EXPLICIT_PIPELINE.format(kind=kind, target=TARGETS[kind],
                                                                 recipe=tmp_path / "recipe.yaml"))
    got, ref = load_pipeline(CONFIGS / f"pipeline_llama31_8b_{kind}_{hw}.yaml"), load_pipeline(tmp_path / "pipe.yaml")
    assert dataclasses.replace(got, recipe=None) == dataclasses.replace(ref, recipe=None)


@pytest.mark.parametrize("override,msg", [
    ("score.samplez=3", r"unknown score keys \['samplez'\]; valid keys: samples, seq_len, batch_size, layer_samples, task"),
    ("prune.targt=x", r"unknown prune keys \['targt'\]; valid keys: target, params"),
    ("eval.itemz=3", r"unknown eval keys \['itemz'\]; valid keys: samples, seq_len, task_items"),
    ("finetune.stepz=3", r"unknown finetune keys \['stepz'\]; valid keys: steps, lr, min_lr, warmup"),
    ("distill.stepz=3", r"unknown distill keys \['stepz'\]; valid keys: mode, teacher"),
    ("scor.samples=3", r"unknown pipeline keys \['scor'\]; valid keys: teacher, data"),
    ("score.samples.x=3", r"score.samples takes a value \(int\), not keys: score.samples.x= has nowhere to go"),
    ("distill.lr=fast", r"distill.lr='fast' is not a valid float"),
])
def test_pipeline_refuses_unknown_keys_and_misplaced_overrides(tmp_path, override, msg):
    with pytest.raises(RecipeError, match=msg):
        load_pipeline(None, [override])
    section, _, rest = override.partition(".")  # the same key in a YAML file
    key, _, value = rest.partition("=")
    if "." not in key:
        (tmp_path / "p.yaml").write_text(f"{section}: {{{key}: {value}}}\n")
        with pytest.raises(RecipeError, match=msg):
            load_pipeline(tmp_path / "p.yaml")


def test_pipeline_sections_are_typed_and_a_budget_replaces_the_default_target():
    cfg = load_pipeline(None, ["score.samples=8", "distill.mesh=[1,1,8]", "distill.steps=4", "distill.warmup=0",
                               "prune.target=null", "prune.params=80M", "score.task=tasks.jsonl"])
    assert (cfg.score.samples, cfg.score.task, cfg.distill.mesh, cfg.distill.steps) == (8, "tasks.jsonl", [1, 1, 8], 4)
    assert cfg.prune == PruneSettings(params="80M")
    assert dataclasses.replace(cfg.distill, mesh=[1, -1, 1], steps=200, warmup=15) == PipelineConfig().distill
    assert load_pipeline(None, ["prune.params=80M", "prune.target=null"]).prune == PruneSettings(params="80M")
    with pytest.raises(RecipeError, match=r"prune: give one of target or params \(now target='hidden_size=432,"
                       r"intermediate_size=1024', params='80M'\); set the other to null"):
        load_pipeline(CONFIGS / "smollm2_cpu.yaml", ["prune.params=80M"])  # the file names a target


def test_recipe_file_supplies_the_distill_defaults(tmp_path):
    (tmp_path / "r.yaml").write_text("steps: 50\nlr: 2.0e-4\nbatch_size: 2\n")
    cfg = load_pipeline(None, [f"recipe={tmp_path / 'r.yaml'}", "distill.steps=30"])
    assert cfg.distill == RunConfig(steps=30, lr=2e-4, batch_size=2)  # RunConfig defaults, then the file, then keys
    (tmp_path / "bad.yaml").write_text("stepz: 50\n")
    with pytest.raises(RecipeError, match=r"unknown recipe \(.*bad.yaml\) keys \['stepz'\]"):
        load_pipeline(None, [f"recipe={tmp_path / 'bad.yaml'}"])


# ---------------------------------------------------------------------------- teacher correction
def test_finetune_has_its_own_lr_and_warmup():
    f = FinetuneSettings(steps=400, lr=2e-5)  # spec: 1/5 of the pretraining peak (given), 120 warm-up steps
    assert (f.warmup, f.recipe_values()["min_lr"]) == (120, 2e-5 / 10)
    with pytest.raises(RecipeError, match=r"finetune.warmup=120 must be below finetune.steps=60: set finetune.warmup=6"):
        load_pipeline(None, ["finetune.steps=60", "finetune.lr=1e-4"])
    with pytest.raises(RecipeError, match="finetune.steps=60 needs finetune.lr"):
        load_pipeline(None, ["finetune.steps=60", "finetune.warmup=6"])
    cfg = load_pipeline(None, ["finetune.steps=400", "finetune.lr=2e-5"])
    rc = finetune_recipe(cfg, student="t", data="d")
    # the finetune section's schedule; batch and the rest from the distill section
    assert (rc.mode, rc.steps, rc.lr, rc.min_lr, rc.warmup) == ("finetune", 400, 2e-5, 2e-5 / 10, 120)
    assert rc == dataclasses.replace(cfg.distill, student="t", data="d", mode="finetune", steps=400, lr=2e-5,
                                     min_lr=2e-5 / 10, warmup=120)


def test_align_settings_are_checked_before_work(tmp_path):
    """The align stage's settings, recipe and prompts are refused at load or in `validate`, before any stage runs;
    its recipe is the distillation's with SFT's mode, packing, schedule and splits."""
    from minitron_jax.core.assets import fetch_shakespeare, fetch_smollm2

    for extra in ([], ["align.data=a.jsonl", "align.prompts=p.jsonl"]):
        with pytest.raises(RecipeError, match=r"align.steps=10 needs one of align.data .* or align.prompts"):
            load_pipeline(None, ["align.steps=10", *extra])
    with pytest.raises(RecipeError, match=r"align.warmup=10 must be below align.steps=5"):
        load_pipeline(None, ["align.steps=5", "align.data=a.jsonl"])
    cfg = load_pipeline(None, ["align.steps=50", "align.data=a.jsonl", "align.lr=2e-5", "seed=4", "split_seed=2"])
    rc = align_recipe(cfg, student="s", data="d")
    assert rc == dataclasses.replace(cfg.distill, mode="sft", packing="first_fit", student="s", data="d", steps=50,
                                     lr=2e-5, min_lr=2e-5 / 10, warmup=10, holdout=[], holdout_fraction=0.1, seed=4,
                                     split_seed=2, ce_weight=0.0)
    assert rc.teacher is None and not rc.has_teacher
    assert align_recipe(dataclasses.replace(cfg, align=dataclasses.replace(cfg.align, kd=True)), student="s", data="d",
                        teacher="t").ce_weight == 1.0
    teacher, data = fetch_smollm2(), fetch_shakespeare()
    missing = load_pipeline(None, ["align.steps=50", f"align.prompts={tmp_path / 'none.jsonl'}"])
    with pytest.raises(DataError, match=r"align.prompts=.*none.jsonl is not a file"):
        Pipeline(missing).validate(teacher, data)
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"p.jsonl:2 needs exactly one of 'prompt' \(text\) or 'messages'"):
        Pipeline(load_pipeline(None, ["align.steps=50", f"align.prompts={bad}"])).validate(teacher, data)
    with pytest.raises(DataError, match=r"p.jsonl:2 has keys \['text'\]; an SFT line needs"):
        Pipeline(load_pipeline(None, ["align.steps=50", f"align.data={bad}"])).validate(teacher, data)


def test_lm_eval_settings_are_checked_before_work(tmp_path, monkeypatch):
    """eval.lm_eval_*: bad values are refused at load; an unknown task (with the closest names), a missing include
    path and a task whose data is missing are refused in `validate`, before any stage runs; without tasks, the
    evaluate stage's settings are those of runs made before lm-eval was wired in."""
    from minitron_jax.core.assets import fetch_shakespeare, fetch_smollm2
    from minitron_jax.core.errors import EvalError

    monkeypatch.chdir(ROOT)
    with pytest.raises(RecipeError, match=r"eval.lm_eval_num_fewshot=-1 must be 0 or more"):
        load_pipeline(None, ["eval.lm_eval_tasks=[x]", "eval.lm_eval_num_fewshot=-1"])
    with pytest.raises(RecipeError, match=r"eval.lm_eval_limit: 2.5: give a whole number"):
        load_pipeline(None, ["eval.lm_eval_tasks=[x]", "eval.lm_eval_limit=2.5"])
    with pytest.raises(RecipeError, match=r"eval.lm_eval_tasks is empty: name the tasks"):
        load_pipeline(None, ["eval.lm_eval_limit=4"])
    teacher, data = fetch_smollm2(), fetch_shakespeare()
    local = ["eval.lm_eval_include_path=configs/lm_eval_tasks"]
    with pytest.raises(EvalError, match=r"'shakespeare_next_lines' \(closest: shakespeare_next_line"):
        Pipeline(load_pipeline(None, [*local, "eval.lm_eval_tasks=[shakespeare_next_lines]"])).validate(teacher, data)
    with pytest.raises(EvalError, match=r"eval.lm_eval_include_path nowhere does not exist"):
        Pipeline(load_pipeline(None, ["eval.lm_eval_include_path=nowhere", "eval.lm_eval_tasks=[x]"])).validate(
            teacher, data)
    yaml = (ROOT / "configs" / "lm_eval_tasks" / "shakespeare_passages.yaml").read_text()
    (tmp_path / "gone.yaml").write_text(yaml.replace("shakespeare_passages", "gone").replace(
        "configs/lm_eval_tasks/data/passages_test.jsonl", str(tmp_path / "missing.jsonl")))
    with pytest.raises(EvalError, match=r"cannot load lm-eval task\(s\) gone"):
        Pipeline(load_pipeline(None, [f"eval.lm_eval_include_path={tmp_path}", "eval.lm_eval_tasks=[gone]"])).validate(
            teacher, data)
    plain = Pipeline(load_pipeline(None, [])).settings("evaluate")["eval"]
    assert plain == {"samples": 16, "seq_len": 256, "task_items": 100}
    with_tasks = Pipeline(load_pipeline(None, [*local, "eval.lm_eval_tasks=[shakespeare_passages]"]))
    assert with_tasks.settings("evaluate")["eval"]["lm_eval_tasks"] == ["shakespeare_passages"]


def test_experiment_6_passes_the_schedule_it_ran():
    """tools/experiments.py gives teacher correction the values experiment 6 ran before the finetune section
    existed (then: the distillation section's schedule with steps=60): 60 steps, LR 1e-4 -> 1e-5, 15 warm-up."""
    spec = importlib.util.spec_from_file_location("experiments", ROOT / "tools" / "experiments.py")
    exp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(exp)
    args = exp.build_parser().parse_args([])
    cfg = load_pipeline(exp.BASE, [*exp.PAPER_KD, *exp.correction_overrides(args)])  # as its arms load it
    rc = finetune_recipe(cfg, student="t", data="d")
    assert (rc.mode, rc.steps, rc.lr, rc.min_lr, rc.warmup) == ("finetune", 60, 1e-4, 1e-5, 15)
    assert rc == distill_recipe(cfg, mode="finetune", steps=60, student="t", data="d")  # what ran then


# ---------------------------------------------------------------------------- score.task
@pytest.mark.parametrize("target", ["drop_layers=15-30", "num_hidden_layers=16,depth_metric=bi",
                                    "hidden_size=3072,intermediate_size=9216"])
def test_a_task_for_a_target_without_windows_is_refused(tmp_path, target):
    """score.task scores the windows of a depth_metric=window target; with any other target it would be
    silently unused, so it is refused before any work (before the task file is even read)."""
    cfg = load_pipeline(CONFIGS / "pipeline_llama31_8b_depth_gpu.yaml",
                        [f"prune.target={target}", f"score.task={tmp_path / 'missing.jsonl'}"])
    with pytest.raises(RecipeError, match=rf"score.task={tmp_path / 'missing.jsonl'} scores the layer windows of a "
                       r"depth_metric=window target; prune.target=.* has none: remove score.task or use depth_metric=window"):
        Pipeline(cfg).validate(Path(cfg.teacher), tmp_path / "no_data")
    task = tmp_path / "task.jsonl"
    task.write_text('{"context": "a", "choices": ["b", "c"], "answer": 0}\n')
    window = load_pipeline(CONFIGS / "pipeline_llama31_8b_depth_gpu.yaml",
                           ["prune.target=num_hidden_layers=16,depth_metric=window", f"score.task={task}"])
    with pytest.raises(DataError, match="data path .*no_data does not exist"):  # task accepted and read; the data check comes next
        Pipeline(window).validate(Path(window.teacher), tmp_path / "no_data")


# ---------------------------------------------------------------------------- batches over the mesh
def test_a_score_batch_that_does_not_split_over_the_mesh_is_refused(tmp_path):
    """score.batch_size (the score stage's and the prune stage's forwards) must split over the run's mesh's
    data x fsdp devices, else its rows would be replicated: refused in `validate`, before any stage runs and
    before the data is looked at; the evaluate stage's batch is chosen to split (`sharding.fitting_batch`)."""
    base = CONFIGS / "pipeline_llama31_8b_width_gpu.yaml"  # mesh [1, -1, 1]: fsdp over the 8 test devices
    for batch, extra, rows, sizes in ((12, [], 8, "8 or 16"), (6, ["distill.mesh=[2,2,2]"], 4, "4 or 8")):
        cfg = load_pipeline(base, [f"score.batch_size={batch}", *extra])
        with pytest.raises(RecipeError, match=rf"^score.batch_size={batch} does not split over the mesh's data x "
                                              rf"fsdp = {rows} devices .*give a multiple of {rows}, e.g. {sizes}$"):
            Pipeline(cfg).validate(Path(cfg.teacher), tmp_path / "no_data")
    for extra in (["score.batch_size=16"], ["score.batch_size=12", "distill.mesh=[2,2,2]"],
                  ["score.batch_size=3", "distill.mesh=[1,1,8]"]):
        cfg = load_pipeline(base, extra)
        with pytest.raises(DataError, match="data path .*no_data does not exist"):  # the batch passed
            Pipeline(cfg).validate(Path(cfg.teacher), tmp_path / "no_data")


# ---------------------------------------------------------------------------- the 8B depth pipelines
@pytest.mark.parametrize("hw", ["gpu", "tpu"])
def test_depth_pipeline_selects_the_papers_block(hw):
    cfg = load_pipeline(CONFIGS / f"pipeline_llama31_8b_depth_{hw}.yaml")
    new, n = dry_run(cfg.teacher, cfg.prune.target)
    assert new.num_hidden_layers == 16 and n == 4_540_469_248  # spec: Llama-3.1-Minitron-4B-Depth
    dropped = PruneTarget.parse(cfg.prune.target).drop_layers
    assert [l for l in range(32) if l not in dropped] == [*range(15), 31]


def test_split_seed_reaches_every_stage_and_a_changed_one_is_noticed(tmp_path):
    """The top-level split_seed (not seed) splits the documents of every stage: the stores' splits, the
    evaluation's, the training recipes'; every stage after the data stage records it, so a done stage made with
    another split_seed is refused. A marker from before split_seed was recorded compares its seed."""
    import json
    from types import SimpleNamespace

    from minitron_jax.run.pipeline import STAGES

    cfg = load_pipeline(None, [f"out={tmp_path}", "holdout=[]", "distill.holdout_fraction=0.1", "seed=5",
                               "split_seed=3"])
    p = Pipeline(cfg, log=lambda m: None)
    assert p.splits().seed == 3 and (p.split()["split_seed"], p.split()["seed"]) == (3, 5)
    rc = distill_recipe(cfg, **p.common(SimpleNamespace(store="STORE")), teacher="-", student="-")
    assert (rc.split_seed, rc.seed) == (3, 5)
    assert [st.name for st in STAGES if p.settings(st.name).get("split_seed") != 3] == ["data"]  # text -> store
    p.stage("score", lambda: {"scores": "s"})
    fail = lambda: pytest.fail("a done stage was redone")  # noqa: E731
    with pytest.raises(RecipeError, match=r"score was made with other settings \(split_seed changed: "
                                          r"\{\"split_seed\": 3\} then, \{\"split_seed\": 4\} now\)"):
        Pipeline(dataclasses.replace(cfg, split_seed=4), log=lambda m: None).stage("score", fail)
    marker = tmp_path / "score" / "done.json"
    old = json.loads(marker.read_text())
    del old["settings"]["split_seed"]  # from before split_seed: seed=5 drew its splits
    marker.write_text(json.dumps(old))
    assert Pipeline(dataclasses.replace(cfg, split_seed=5), log=lambda m: None).stage("score", fail)["scores"] == "s"
    with pytest.raises(RecipeError, match=r"split_seed changed: \{\"split_seed\": 5\} then, \{\"split_seed\": 3\}"):
        p.stage("score", fail)
