"""A saved model pruned into a saved student: what `minitron prune` and the prune stage of `minitron run`
both do (one function, so the two cannot disagree on checks, calibration or what is written).

Scores are checked against the model's config before any weights load, then against its weights; a
target is pruned directly, a parameter budget is searched (`pruning.rank_shapes`) ranking candidates by LM
loss on calibration rows drawn from the validation documents of a token store given `splits` with a
`validation_fraction`, else from the training documents (`importance.calibration_samples`, held-out
documents excluded); never the rows a report is computed on. The student is written atomically (HF
safetensors or an orbax checkpoint) with its prune record and `prune_report.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from minitron_jax.core import multihost, storage
from minitron_jax.core.atomic import write_text
from minitron_jax.core.errors import PruneError
from minitron_jax.data.store_reader import TRAIN, VALIDATION
from minitron_jax.eval import evaluate
from minitron_jax.io import hf
from minitron_jax.io.hf import load_tokenizer, save_params
from minitron_jax.io.orbax_model import save_model
from minitron_jax.model.config import LlamaConfig
from minitron_jax.model.llama import Llama
from minitron_jax.model.sharding import batch_rows, check_batch_rows
from minitron_jax.prune.importance import calibration_samples, check_scores_match, load_scores
from minitron_jax.prune.pruning import prune, rank_shapes
from minitron_jax.prune.record import prune_record, save_prune_record
from minitron_jax.prune.targets import PruneTarget, parse_count, validate
from minitron_jax.run import search as short_distill


def prune_saved(model_dir: str | Path, scores_path: str | Path, out: str | Path, *, target: str | None = None,
                budget: str | int | None = None, data: str | Path | None = None, calib_samples: int = 16,
                seq_len: int = 256, batch_size: int = 8, seed: int = 0, exclude=(), text_field: str = "text",
                mesh=None, attention: str = "xla", fmt: str = "hf", overwrite: bool = False,
                force_scores: bool = False, splits=None, search_distill: dict | None = None,
                log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Prune `model_dir` to `target` (a shape) or `budget` (parameters, searched) with `scores_path`; write
    the student to `out`. Returns {"target", "params", "student", "search"} (search: the ranked table or None).
    `data` (with `calib_samples` rows of `seq_len`, drawn with `seed` + 1, skipping `exclude`d documents)
    is needed for a budget. Loading and the search's forward passes are sharded over `mesh`.
    `search_distill` {"candidates", "recipe" (RunConfig), "metric", "out", "samples"}: the budget's `candidates`
    best shapes after pruning are each distilled for recipe.steps and re-ranked by `metric` (`run/search.py`) on
    `samples` rows of the same documents as the calibration rows (drawn the same way: the first
    `calib_samples` of them are the calibration rows)."""

    if (target is None) == (budget is None):
        raise PruneError("give exactly one of a target shape or a parameter budget")
    cfg = LlamaConfig.from_file(model_dir)
    if target is not None:
        validate(cfg, target)  # fail before loading anything
    else:
        budget = parse_count(budget)
        if data is None:
            raise PruneError("a parameter budget needs calibration data to rank the candidates by loss (--data)")
        check_batch_rows(f"batch_size={batch_size}", batch_size, batch_rows(mesh))  # the ranking's forwards
    scores, meta = load_scores(scores_path)
    match = dict(force=force_scores, model=str(model_dir), force_hint="--force-scores")
    check_scores_match(meta, cfg, **match)  # the config, before any weights load
    rows = valid_rows = None
    if budget is not None:  # calibration rows before the weights: bad data fails fast
        split = VALIDATION if splits is not None and splits.validation_fraction > 0 else TRAIN
        n_valid = search_distill["samples"] if search_distill else 0
        drawn = calibration_samples(data, load_tokenizer(model_dir, vocab_size=cfg.vocab_size),
                                    max(calib_samples, n_valid), seq_len, seed + 1, text_field=text_field,
                                    vocab_size=cfg.vocab_size, exclude=exclude, splits=splits, split=split)
        rows, valid_rows = drawn[:calib_samples], drawn[:n_valid]
        where = f"from the {('training', 'validation')[split]} documents"
        log(f"budget search: {calib_samples} rows of {seq_len} {where}"
            + (f"; the short distillation ranks on {n_valid} rows {where}" if n_valid else ""))
    model = hf.from_pretrained(model_dir, mesh=mesh)
    check_scores_match(meta, cfg, model.params(), **match)  # and the weights
    if target is not None:
        target = str(PruneTarget.parse(target))
        params, new = prune(model.params(), cfg, scores, target)
        table = None
    else:
        params, new, table = rank_shapes(model.params(), cfg, scores, budget,
                                          lambda p, c: evaluate.lm_loss(p, c, rows, batch_size=batch_size, mesh=mesh,
                                                               attention=attention), log=log)
        target = str(table[0]["spec"])
        if search_distill:
            sd = search_distill
            cands = short_distill.save_candidates(table, model.params(), cfg, scores, model_dir, Path(sd["out"]), sd["candidates"])
            del params, model  # the short runs need the devices; the winner is pruned again below
            ranked = short_distill.distill_candidates(cands, sd["recipe"], valid_rows, metric=sd["metric"], mesh=mesh,
                                            batch_size=batch_size, log=log)
            report = multihost.decided(lambda: short_distill.write_report(ranked, Path(sd["out"]), sd["metric"],
                                                                          sd["recipe"].steps), "search-report")
            log(report["summary"])
            target = ranked[0]["spec"]
            model = hf.from_pretrained(model_dir, mesh=mesh)
            params, new = prune(model.params(), cfg, scores, target)
            done = {c["spec"] for c in ranked}
            table = ranked + [r for r in table if r["spec"] not in done]
    out = storage.path(out)  # local or gs://
    if fmt == "hf":
        save_params(params, new, out, source=model_dir, overwrite=overwrite)
    else:
        pruned = Llama(new, params=params)
        pruned.source = storage.source_name(model_dir)
        save_model(pruned, out, overwrite=overwrite)
    record = prune_record(cfg, scores, target, source=model_dir)
    keys = ("spec", "params", "loss", "distilled", "validation_loss", "distill_loss", "rank_pruned", "rank_distilled",
            "rank_change", "validation_curve", "vs_winner")
    search = [{k: r[k] for k in keys if k in r} for r in table] if table else None
    report = {"source": str(model_dir), "scores": str(scores_path),
              "score_metadata": {k: v for k, v in meta.items() if k != "config"},
              "params_before": cfg.param_count(), "params_after": new.param_count(), "target": target,
              "config": new.to_hf_dict(), "search": search}

    def write() -> None:  # process 0; every host goes on once the student directory is complete
        save_prune_record(out, record)
        write_text(out / "prune_report.json", json.dumps(report, indent=2, default=str))
    multihost.decided(write, "prune-report")
    log(f"pruned {cfg.param_count():,} -> {new.param_count():,} parameters: {out}")
    return {"target": target, "params": new.param_count(), "student": str(out), "search": search}
