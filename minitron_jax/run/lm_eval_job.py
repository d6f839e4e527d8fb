"""`minitron lm-eval`: lm-evaluation-harness tasks on the JAX model (`eval/lm_eval_model.MinitronLM`), results
written whole (temporary name, then rename) in lm-eval's own JSON layout (`results[task]["acc,none"]`, ...).

Checked before the weights load, each refusal naming its fix: the model directory (config.json, tokenizer), the
output path, --include-path, the lm-eval install (the `lmeval` extra), every task name (unknown names with the
closest known ones) and every task's data (loaded here, once). Tasks come from lm-eval's own catalogue (MMLU,
HellaSwag, ... read their data from the Hugging Face hub) or from YAML files under --include-path (a local JSONL:
`dataset_path: json` with `dataset_kwargs: {data_files: ...}`; configs/lm_eval_tasks/ has three).
"""

from __future__ import annotations

import difflib
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import jax

from minitron_jax.core import multihost, storage
from minitron_jax.core.atomic import write_text
from minitron_jax.core.errors import DataError, EvalError, OutputError
from minitron_jax.io.hf import from_pretrained, load_tokenizer
from minitron_jax.model.config import LlamaConfig
from minitron_jax.model.sharding import batch_rows, check_batch_rows
from minitron_jax.run.generate_job import context_limit, stop_ids

INSTALL = "pip install -e '.[lmeval]'"


def import_lm_eval():
    """The lm_eval package and this project's model class over it, or a one-line EvalError naming the install."""
    try:
        import lm_eval  # noqa: F401
        from lm_eval.tasks import TaskManager  # noqa: F401

        from minitron_jax.eval.lm_eval_model import MinitronLM  # noqa: F401
    except ImportError as e:
        raise EvalError(f"minitron lm-eval needs lm-evaluation-harness, which is not installed here ({e}); install "
                        f"the extra: {INSTALL}") from None
    return lm_eval


def check_paths(model_dir, out) -> None:
    model_dir = storage.path(model_dir)  # local or gs://
    if not model_dir.is_dir():
        raise EvalError(f"--model {model_dir} is not a directory; give an HF model directory (config.json, "
                        "safetensors weights, tokenizer files)")
    if not (model_dir / "config.json").is_file():
        raise EvalError(f"--model {model_dir} has no config.json; give an HF model directory (minitron export or "
                        "prune --format hf write one)")
    if storage.path(out).is_dir():
        raise OutputError(f"--out {out} is a directory; give a .json file path")
    if storage.is_url(out):
        storage.check_access(out, "--out")
        return
    out = Path(out)
    parent = next(p for p in out.absolute().parents if p.exists())
    if not parent.is_dir():
        raise OutputError(f"--out {out} is under {parent}, which is a file; choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"--out {out}: {parent} is not writable by this user; choose a writable --out")


def task_manager(names: Sequence[str], include_path: Sequence[str | Path]):
    """(an lm-eval TaskManager that knows every name, the names with glob patterns expanded); unknown names are
    refused with the closest known ones. Only --include-path is indexed when it holds every name (quicker)."""
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in include_path] or None
    managers = ([lambda: TaskManager(include_path=paths, include_defaults=False)] if paths else []) + [
        lambda: TaskManager(include_path=paths)]
    for make in managers:
        tm = make()
        known, unknown = [], []
        for name in names:
            if name in tm.all_tasks or (name.endswith((".yaml", ".yml")) and Path(name).is_file()):
                known.append(name)
            elif hits := tm.match_tasks([name]):  # a glob pattern
                known.extend(hits)
            else:
                unknown.append(name)
        if not unknown:
            return tm, list(dict.fromkeys(known))
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, tm.all_tasks, n=3)
        hints.append(f"{name!r}" + (f" (closest: {', '.join(close)})" if close else ""))
    hints = "; ".join(hints)
    where = f" nor under --include-path {', '.join(paths)}" if paths else ""
    raise EvalError(f"unknown lm-eval task(s) {hints}: not in lm-eval's catalogue{where}; list the catalogue with "
                    "`lm-eval ls tasks`, or give --include-path DIR holding the task's YAML")


def load_tasks(tm, names: Sequence[str]) -> dict[str, Any]:
    """lm-eval's loaded tasks (their datasets read now, before the weights load)."""
    try:
        return tm.load(list(names))
    except Exception as e:  # datasets / lm-eval raise many types for missing files, the hub, bad YAML
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise EvalError(f"cannot load lm-eval task(s) {', '.join(names)} ({type(e).__name__}: {first}); check the "
                        "task YAML and its data: hub datasets need the network, local ones `dataset_path: json` and "
                        "`dataset_kwargs: {data_files: PATH}` (relative paths are read from the working directory)"
                        ) from None


def prepare_tasks(tasks: Sequence[str], include_path: Sequence[str | Path] = (), where: str = "--"):
    """Check that lm-eval is installed, `include_path` exists, every task name is known and every task's data
    loads: (task manager, names with patterns expanded, loaded tasks). `where` prefixes the setting names in the
    refusals (`--` for the command line, `eval.` for a pipeline)."""
    names = [t.strip() for t in tasks if t.strip()]
    if not names:
        raise DataError(f"{where}{'tasks' if where == '--' else 'lm_eval_tasks'} is empty; name lm-eval tasks, e.g. "
                        "hellaswag,arc_challenge")
    for p in include_path:
        if not Path(p).exists():
            raise EvalError(f"{where}{'include-path' if where == '--' else 'lm_eval_include_path'} {p} does not exist; "
                            "give the directory (or YAML file) of your task configs, e.g. configs/lm_eval_tasks (read "
                            "from the working directory)")
    import_lm_eval()
    tm, names = task_manager(names, include_path)
    return tm, names, load_tasks(tm, names)


def parse_limit(limit: str | float | None) -> int | float | None:
    """lm-eval's --limit: a number of documents per task, or a fraction below 1."""
    if limit is None:
        return None
    v = float(limit)
    if not v > 0 or not math.isfinite(v) or (v >= 1 and v != int(v)):
        raise DataError(f"--limit {limit}: give a whole number of documents per task, or a fraction in (0, 1)")
    return int(v) if v >= 1 else v


def lm_eval_tasks(model_dir, tasks: Sequence[str], out, *, include_path: Sequence[str | Path] = (),
                  num_fewshot: int | None = None, limit: str | float | None = None, batch_size: int = 8, mesh=None,
                  dtype: str | None = "float32", attention: str = "xla", max_length: int | None = None, seed: int = 0,
                  bootstrap_iters: int = 100000, gen_kwargs: str | None = None, log_samples: bool = False,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run lm-eval `tasks` on the model in `model_dir`; write and return lm-eval's results dict (module docstring)."""
    if not any(t.strip() for t in tasks):
        raise DataError("--tasks is empty; name lm-eval tasks, e.g. --tasks hellaswag,arc_challenge")
    if batch_size < 1:
        raise DataError(f"--batch-size {batch_size}: give at least 1")
    if num_fewshot is not None and num_fewshot < 0:
        raise DataError(f"--num-fewshot {num_fewshot}: give 0 or more")
    limit = parse_limit(limit)
    check_batch_rows(f"--batch-size {batch_size}", batch_size, batch_rows(mesh))
    check_paths(model_dir, out)
    cfg = LlamaConfig.from_file(model_dir)
    tok = load_tokenizer(model_dir, vocab_size=cfg.vocab_size)
    limit_ctx = context_limit(cfg)
    if max_length is not None and not 0 < max_length <= limit_ctx:
        raise DataError(f"--max-length {max_length}: give 1 to the model's context of {limit_ctx} positions")
    tm, names, loaded = prepare_tasks(tasks, include_path)
    lm_eval = import_lm_eval()
    from lm_eval.utils import handle_non_serializable

    from minitron_jax.eval.lm_eval_model import MinitronLM

    tm.load = lambda _names: loaded  # simple_evaluate loads the same list again: hand it what is loaded

    model = from_pretrained(model_dir, mesh=mesh, dtype=dtype)
    info = {"model_source": storage.source_name(model_dir), "model_num_parameters": cfg.param_count(),
            "model_dtype": str(jax.tree.leaves(model.params())[0].dtype)}
    lm = MinitronLM(model.params(), cfg, tok, max_length=max_length or limit_ctx, stop_ids=stop_ids(model_dir, cfg, tok),
                    batch_size=batch_size, mesh=mesh, attention=attention, seed=seed, info=info)
    results = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=tm,
                                      bootstrap_iters=bootstrap_iters, gen_kwargs=gen_kwargs, log_samples=log_samples)
    samples = results.pop("samples", None)
    results["config"]["model_args"] = {"model": str(model_dir), "dtype": dtype, "batch_size": batch_size,
                                       "mesh": None if mesh is None else dict(mesh.shape), "attention": attention,
                                       "max_length": lm.max_length, "seed": seed}
    if log_samples:
        results["samples"] = samples
    text = json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)

    def write() -> str:  # process 0 writes; every process of a multi-host job goes on once the file is there
        if not storage.is_url(out):
            Path(out).absolute().parent.mkdir(parents=True, exist_ok=True)
        return str(write_text(out, text))
    multihost.decided(write, "lm-eval-results")
    log(lm_eval.utils.make_table(results))
    return results
