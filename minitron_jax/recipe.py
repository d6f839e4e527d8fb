"""Run configuration: one dataclass, filled from YAML and `key=value` command-line overrides.

`minitron distill configs/x.yaml steps=200 out=runs/a` or with no file at all:
`minitron distill teacher=DIR student=DIR data=DIR steps=200 out=DIR`. Unknown keys and values of the
wrong type fail before any work, naming the valid keys.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml


class RecipeError(ValueError):
    pass


@dataclasses.dataclass
class RunConfig:
    # what to train
    mode: str = "distill"  # "distill" (KD from teacher) or "finetune" (LM loss: teacher correction)
    teacher: str | None = None  # HF directory of the teacher (distill)
    student: str | None = None  # HF directory of the student, or of the model to fine-tune
    data: str | None = None  # text dir / .txt / .jsonl / .parquet / saved dataset
    out: str = "runs/distill"
    resume: bool = False
    # data
    seq_len: int = 256
    packing: str = "concat"  # or "first_fit" (segment ids, attention reset per document)
    holdout: list[str] = dataclasses.field(default_factory=list)  # document names held out for eval
    holdout_fraction: float = 0.05  # used when `holdout` is empty
    text_field: str = "text"
    # optimisation (spec section 5: Llama-3.1-Minitron-4B recipe)
    steps: int = 200
    batch_size: int = 8  # global batch in sequences
    grad_accum: int = 1  # micro-batches per step (batch_size must divide by it)
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup: int = 40
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

    def validate(self) -> "RunConfig":
        if self.mode not in ("distill", "finetune"):
            raise RecipeError(f"mode={self.mode!r}: choose 'distill' or 'finetune'")
        if self.student is None:
            raise RecipeError("student=DIR is required (the model to train)")
        if self.mode == "distill" and self.teacher is None:
            raise RecipeError("teacher=DIR is required for distillation")
        if self.data is None:
            raise RecipeError("data=PATH is required (text files, JSONL, parquet or a saved dataset)")
        for k in ("steps", "batch_size", "grad_accum", "seq_len", "save_every", "eval_every", "log_every", "keep"):
            if getattr(self, k) <= 0:
                raise RecipeError(f"{k}={getattr(self, k)} must be positive")
        if self.batch_size % self.grad_accum:
            raise RecipeError(f"batch_size={self.batch_size} must be a multiple of grad_accum={self.grad_accum}")
        if self.warmup >= self.steps:
            self.warmup = max(0, self.steps // 10)
        if self.packing not in ("concat", "first_fit"):
            raise RecipeError(f"packing={self.packing!r}: choose 'concat' or 'first_fit'")
        if len(self.mesh) != 3:
            raise RecipeError(f"mesh={self.mesh}: give [data, fsdp, tensor]")
        return self


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


def _bool(v) -> bool:
    if isinstance(v, bool):
        return v
    if str(v).lower() in ("true", "1", "yes"):
        return True
    if str(v).lower() in ("false", "0", "no"):
        return False
    raise ValueError(v)


def _coerce(key: str, value: Any) -> Any:
    """Check / convert one value against its field's annotation (e.g. 'int', 'str | None', 'list[int]')."""
    hint = str(FIELDS[key].type)
    if value is None:
        if "None" in hint:
            return None
        raise RecipeError(f"{key} needs a value")
    kind = hint.split("|")[0].strip()
    try:
        if kind.startswith("list"):
            items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v]
            conv = int if kind == "list[int]" else str
            return [conv(v) for v in items]
        conv = {"int": int, "float": float, "str": str, "bool": _bool}[kind]
        if conv is int and (isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())):
            raise ValueError(value)
        return conv(value)
    except (TypeError, ValueError):
        raise RecipeError(f"{key}={value!r} is not a valid {kind}") from None


def load_recipe(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> RunConfig:
    """YAML file (optional) + overrides ("key=value" strings or a dict) -> validated RunConfig."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise RecipeError(f"cannot read recipe {path}: {e}") from e
        if not isinstance(loaded, dict):
            raise RecipeError(f"recipe {path} must be a mapping of key: value")
        values.update(loaded)
    if isinstance(overrides, dict):
        values.update(overrides)
    else:
        for item in overrides or []:
            if "=" not in item:
                raise RecipeError(f"override {item!r} must look like key=value")
            k, v = item.split("=", 1)
            values[k.strip()] = yaml.safe_load(v) if v.strip() else None
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise RecipeError(f"unknown recipe keys {unknown}; valid keys: {', '.join(FIELDS)}")
    cfg = RunConfig(**{k: _coerce(k, v) for k, v in values.items()})
    return cfg.validate()


def dump(cfg: RunConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=2)
