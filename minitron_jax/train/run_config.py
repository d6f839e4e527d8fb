"""Run configuration: typed dataclasses filled from YAML and `key=value` command-line overrides.

`minitron distill configs/x.yaml steps=200 out=runs/a` or with no file at all:
`minitron distill teacher=DIR student=DIR data=DIR steps=200 out=DIR`. Unknown keys and values of the
wrong type fail before any work, naming the valid keys.

The YAML / override loader itself is core/yaml_config.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from minitron_jax.core.errors import RecipeError
from minitron_jax.core.yaml_config import DataArg, dump, load
from minitron_jax.data.spec import with_split_seed

DTYPES = ("float32", "bfloat16", "float16")  # compute_dtype / teacher_dtype
REMAT = ("none", "full", "dots")  # model.REMAT_POLICIES (run_config.py does not import JAX)
MODES = ("distill", "finetune", "sft")
ATTENTION = ("auto", "xla", "splash", "cudnn", "chunked")  # attention.IMPLEMENTATIONS

# Resuming (`resume=true` with checkpoints in out/checkpoints) compares the recipe with the out/recipe.json
# the checkpoints were made with, key by key (`check_resume`); see RunConfig's docstring.
RESUME_FREE = ("out", "resume", "resume_allow", "save_every", "keep", "eval_every", "eval_batches", "log_every",
               "peak_tflops", "export", "mesh", "coordinator_address", "num_processes", "process_id", "remat",
               "grad_accum", "chunk_size", "attention")
RESUME_NEVER = ("mode", "seq_len", "batch_size", "packing", "seed", "split_seed", "holdout", "holdout_fraction",
                "text_field", "validation_fraction")


@dataclasses.dataclass
class RunConfig:
    """One distillation / fine-tuning run; `validate` refuses values that cannot work, before any work.

    Resuming (resume=true, checkpoints in out/checkpoints) compares every key with the recipe.json of
    the checkpoints, before any weights or data load, and sorts the changes in three kinds:
    - free (RESUME_FREE): bookkeeping, paths and how the same update is computed, which restore
      into any layout (orbax reshards; the loader state does not depend on the process count): out,
      resume, resume_allow, save_every, keep, eval_every, eval_batches, log_every, peak_tflops, export,
      mesh, coordinator_address, num_processes, process_id, remat, grad_accum, chunk_size, attention. Logged
      only.
    - forced: the checkpoint restores, but the run no longer equals an uninterrupted one: steps (the
      cosine schedule), lr, min_lr, warmup, weight_decay, b1, b2, eps, clip, temperature, kl_weight,
      ce_weight, top_k, hidden_weight (between positive values), compute_dtype, teacher_dtype, and the
      paths teacher, student, data, teacher_logits (a moved model, corpus or logits store; the student's
      shape is still compared with the checkpoint's, and the loader still refuses a corpus with another
      row count). Refused unless
      listed in `resume_allow` (resume_allow=[lr,temperature]).
    - never (RESUME_NEVER): mode, seq_len, batch_size, packing, seed, split_seed, holdout, holdout_fraction,
      validation_fraction, text_field, and hidden_weight turned on or off: they change the rows, their order or what a
      checkpoint holds (the hidden-loss projection), so the checkpoint's data position or state means
      nothing. Start a new run in another out instead.
    """
    # what to train
    # "distill" (KD from teacher), "finetune" (LM loss: teacher correction) or "sft" (supervised fine-tuning
    # on JSONL chats or prompt/response pairs, the loss on the assistant / response tokens only: data/sft.py)
    mode: str = "distill"
    teacher: str | None = None  # HF directory of the teacher (distill; sft: optional, adds the KD term)
    # stored teacher top-k logits (`minitron teacher-logits`): the teacher is not run, only checked against them
    teacher_logits: str | None = None
    student: str | None = None  # HF directory of the student, or of the model to fine-tune
    # text dir / .txt / .jsonl / .parquet / saved dataset, a token store, or a blend {STORE: weight, ...}
    data: DataArg | None = None
    out: str = "runs/distill"
    resume: bool = False
    # data
    seq_len: int = 256
    packing: str = "concat"  # or "first_fit" (segment ids, attention reset per document)
    holdout: list[str] = dataclasses.field(default_factory=list)  # document names held out for eval
    holdout_fraction: float = 0.05  # used when `holdout` is empty
    # token stores: a seeded fraction of the non-held-out documents kept out of training for model selection
    validation_fraction: float = 0.0
    # draws the holdout_fraction / validation_fraction documents; `seed` (row order, init) plays no part, so
    # runs with other seeds hold out the same documents
    split_seed: int = 0
    text_field: str = "text"
    # optimisation (spec section 5: Llama-3.1-Minitron-4B recipe)
    steps: int = 200
    batch_size: int = 8  # global batch in sequences
    grad_accum: int = 1  # micro-batches per step (batch_size must divide by it)
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup: int = 40  # must be below steps (refused otherwise, never changed)
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip: float = 1.0
    # distillation loss
    temperature: float = 1.0
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    top_k: int = 0
    chunk_size: int = 256
    hidden_weight: float = 0.0
    # numerics and memory
    compute_dtype: str | None = None  # e.g. "bfloat16" (master weights stay fp32)
    teacher_dtype: str | None = None  # default: compute_dtype, else the stored dtype
    remat: str = "none"  # "none" | "full" | "dots"
    attention: str = "xla"  # "auto" | "xla" | "splash" | "cudnn" | "chunked" (model/attention.py)
    # parallelism
    mesh: list[int] = dataclasses.field(default_factory=lambda: [1, -1, 1])  # data, fsdp, tensor
    coordinator_address: str | None = None  # multi-host; else env / auto-detection
    num_processes: int | None = None
    process_id: int | None = None
    # bookkeeping
    seed: int = 0
    save_every: int = 100
    keep: int = 3
    eval_every: int = 50
    eval_batches: int = 4
    log_every: int = 1
    peak_tflops: float | None = None  # for MFU; measured with a matmul if not given
    export: bool = True  # write the final student as an HF directory in out/student_hf
    resume_allow: list[str] = dataclasses.field(default_factory=list)  # keys that may change on resume (see above)

    @property
    def has_teacher(self) -> bool:
        """A teacher model takes part (distill; sft with teacher=): its config is checked, and it runs in the
        step unless its logits are stored."""
        return self.mode == "distill" or (self.mode == "sft" and self.teacher is not None)

    def teacher_compute_dtype(self) -> str | None:
        """The dtype the teacher runs at (its weights and its forward): teacher_dtype, else compute_dtype, else
        None (the checkpoint's own)."""
        return self.teacher_dtype or self.compute_dtype

    def validate(self) -> "RunConfig":
        """Check the run can start; raises RecipeError naming the fix. Never changes a value."""
        if self.mode not in MODES:
            raise RecipeError(f"mode={self.mode!r}: choose one of {', '.join(MODES)}")
        if self.student is None:
            raise RecipeError("student=DIR is required (the model to train)")
        if self.mode == "distill" and self.teacher is None:
            raise RecipeError("teacher=DIR is required for distillation")
        if self.data is None:
            raise RecipeError("data=PATH is required (text files, JSONL, parquet or a saved dataset)")
        for k in ("steps", "batch_size", "grad_accum", "seq_len", "save_every", "eval_every", "log_every", "keep",
                  "eval_batches", "chunk_size"):
            if getattr(self, k) <= 0:
                raise RecipeError(f"{k}={getattr(self, k)} must be positive")
        for f in dataclasses.fields(self):  # nan / inf never make sense
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise RecipeError(f"{f.name}={v} must be a finite number")
        if self.batch_size % self.grad_accum:
            raise RecipeError(f"batch_size={self.batch_size} must be a multiple of grad_accum={self.grad_accum}")
        check_warmup(self.warmup, self.steps)
        if self.packing not in ("concat", "first_fit"):
            raise RecipeError(f"packing={self.packing!r}: choose 'concat' or 'first_fit'")
        _check_range("lr", self.lr, 0, None, "e.g. lr=1e-4", low_ok=False)
        _check_range("min_lr", self.min_lr, 0, self.lr, f"the end of the decay, at most lr={self.lr}")
        _check_range("clip", self.clip, 0, None, "the global gradient-norm limit; 0 = no clipping")
        _check_range("weight_decay", self.weight_decay, 0, None, "0 = none")
        for k in ("b1", "b2"):
            _check_range(k, getattr(self, k), 0, 1, "Adam's moment decay", high_ok=False)
        _check_range("eps", self.eps, 0, None, "e.g. eps=1e-8", low_ok=False)
        _check_range("temperature", self.temperature, 0, None, "1 = the plain distributions", low_ok=False)
        for k in ("kl_weight", "ce_weight", "hidden_weight"):
            _check_range(k, getattr(self, k), 0, None, "0 = the term is off")
        if self.has_teacher and self.kl_weight == 0 and self.ce_weight == 0:
            raise RecipeError("kl_weight=0 and ce_weight=0 leave no logit loss to train on: set kl_weight=1 "
                              "(distillation) or ce_weight=1")
        if self.mode == "sft":
            self._validate_sft()
        if self.teacher_logits is not None and (self.mode != "distill" or self.hidden_weight > 0):
            raise RecipeError(f"teacher_logits={self.teacher_logits} replaces the teacher's logits in distillation "
                              "only; the hidden-state loss (hidden_weight > 0) and fine-tuning need no stored logits: "
                              "drop teacher_logits or set hidden_weight=0")
        if self.top_k < 0:
            raise RecipeError(f"top_k={self.top_k} must be 0 (the whole vocabulary) or more")
        _check_range("holdout_fraction", self.holdout_fraction, 0, 1, "0 = no random held-out split", high_ok=False)
        _check_range("validation_fraction", self.validation_fraction, 0, 1, "0 = no validation split", high_ok=False)
        if self.peak_tflops is not None:
            _check_range("peak_tflops", self.peak_tflops, 0, None, "or leave it unset to measure", low_ok=False)
        for k in ("compute_dtype", "teacher_dtype"):
            if getattr(self, k) not in (None, *DTYPES):
                raise RecipeError(f"{k}={getattr(self, k)!r}: choose one of {', '.join(DTYPES)} (or leave it unset)")
        if self.remat not in REMAT:
            raise RecipeError(f"remat={self.remat!r}: choose one of {', '.join(REMAT)}")
        if self.attention not in ATTENTION:
            raise RecipeError(f"attention={self.attention!r}: choose one of {', '.join(ATTENTION)}")
        if len(self.mesh) != 3:
            raise RecipeError(f"mesh={self.mesh}: give [data, fsdp, tensor]")
        if any(s == 0 or s < -1 for s in self.mesh) or self.mesh.count(-1) > 1:
            raise RecipeError(f"mesh={self.mesh}: each size must be positive, or -1 for at most one axis (it takes "
                              "the remaining devices), e.g. mesh=[1,-1,1]")
        keys = [f.name for f in dataclasses.fields(self)]
        if unknown := [k for k in self.resume_allow if k not in keys]:
            raise RecipeError(f"resume_allow={self.resume_allow}: {', '.join(unknown)} is not a recipe key; valid "
                              f"keys: {', '.join(keys)}")
        if never := [k for k in self.resume_allow if k in RESUME_NEVER]:
            raise RecipeError(f"resume_allow={self.resume_allow}: {', '.join(never)} can never change on resume (they "
                              "decide the rows, their order or what a checkpoint holds); start a new run in another "
                              "out instead")
        return self


    def _validate_sft(self) -> None:
        if self.packing != "first_fit":
            raise RecipeError(f"mode=sft packs whole examples first-fit with segment ids, but packing={self.packing!r}; "
                              "set packing=first_fit (minitron sft does)")
        if self.holdout:
            raise RecipeError(f"holdout={self.holdout} names documents of text data; SFT examples are held out by "
                              "holdout_fraction (a seeded fraction of the lines): drop holdout")
        if self.validation_fraction:
            raise RecipeError(f"validation_fraction={self.validation_fraction} splits token stores; SFT data is one "
                              "JSONL file: set validation_fraction=0")
        if self.hidden_weight > 0:
            raise RecipeError(f"hidden_weight={self.hidden_weight}: the hidden-state loss is for distillation; mode=sft "
                              "takes the logit KD term only (teacher=, kl_weight, ce_weight): set hidden_weight=0")


def _check_range(key: str, value: float, low: float, high: float | None, what: str, low_ok: bool = True,
                 high_ok: bool = True) -> None:
    """`value` within [low, high] (open ends where not `_ok`; no upper bound for None), else RecipeError."""
    above = value >= low if low_ok else value > low
    inside = above and (high is None or (value <= high if high_ok else value < high))
    if not inside:
        span = f"{'[' if low_ok else '('}{low:g}, {'inf)' if high is None else f'{high:g}' + (']' if high_ok else ')')}"
        raise RecipeError(f"{key}={value:g} must be in {span} ({what})")


def check_resume(recorded: Any, rc: RunConfig, where: str | Path) -> list[str]:
    """Compare `rc` with the settings recorded in `where` (the recipe.json of the checkpoints it resumes).

    Raises RecipeError naming every refused change (old -> new) and its fix; returns one line per
    accepted change (free ones, and forced ones listed in resume_allow) for the log."""
    now = json.loads(dump(rc))
    if not isinstance(recorded, dict):
        raise RecipeError(f"{where} is not a JSON object of recipe keys; delete it to resume with this run's settings "
                          "as the checkpoints' (it is rewritten), or choose another out")
    recorded = with_split_seed(recorded)
    # a key this version added is missing from older recipe.json files; its default (None) is what they did
    missing = sorted(k for k in set(now) - set(recorded) if k not in RESUME_FREE and now[k] is not None)
    unknown = sorted(set(recorded) - set(now))
    if missing or unknown:
        what = "; ".join(([f"it lacks {', '.join(missing)}"] if missing else [])
                         + ([f"it has keys this version does not know: {', '.join(unknown)}"] if unknown else []))
        raise RecipeError(f"{where} was written by another minitron version ({what}), so the checkpoints' settings "
                          "cannot be compared with this run's; if you know they match, delete it (resuming rewrites "
                          "it), or choose another out")
    changed = {k: (recorded[k], v) for k, v in now.items() if recorded.get(k, v) != v}
    never = [k for k in changed if k in RESUME_NEVER]
    if ("hidden_weight" in changed and now["mode"] == "distill"
            and (changed["hidden_weight"][0] > 0) != (now["hidden_weight"] > 0)):
        never.append("hidden_weight")  # turns the hidden loss (its projection in the checkpoint) on or off
    forced = [k for k in changed if k not in RESUME_FREE and k not in never]
    refused = never + [k for k in forced if k not in rc.resume_allow]
    if refused:
        fixes = []
        if never:
            fixes.append(f"{', '.join(never)} cannot change on resume (the rows, their order or what a checkpoint "
                         "holds): set them back, or start a new run in another out")
        if todo := [k for k in forced if k not in rc.resume_allow]:
            fixes.append(f"to go on with the new {', '.join(todo)} anyway (the result will differ from an "
                         f"uninterrupted run), add resume_allow=[{','.join(todo)}]")
        shown = ", ".join(f"{k} {json.dumps(changed[k][0])} -> {json.dumps(changed[k][1])}" for k in refused)
        raise RecipeError(f"resume=true, but this run's settings differ from those of its checkpoints ({where}): "
                          f"{shown}; " + "; ".join(fixes))
    return [f"{k} {json.dumps(a)} -> {json.dumps(b)}" + (" (resume_allow)" if k in forced else "")
            for k, (a, b) in changed.items()]


def check_warmup(warmup: int, steps: int, prefix: str = "") -> None:
    """Warm-up must be shorter than the run; `prefix` names the section ("finetune.")."""
    if warmup < 0:
        raise RecipeError(f"{prefix}warmup={warmup} must be 0 or more")
    if warmup >= steps:
        raise RecipeError(f"{prefix}warmup={warmup} must be below {prefix}steps={steps}: set "
                          f"{prefix}warmup={steps // 10} (steps/10) or more {prefix}steps")


def load_recipe(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> RunConfig:
    """YAML file (optional) + overrides ("key=value" strings or a dict) -> validated RunConfig."""
    return load(RunConfig, path, overrides, "recipe").validate()
