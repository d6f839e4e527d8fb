"""The papers' architecture search with short distillation (spec section 1, step 5; arXiv 2407.14679 4.3).

`pruning.rank_shapes` enumerates the shapes within +-5% of a parameter budget and ranks them by LM loss right
after pruning. This module takes the `candidates` best of them, distills each for a short budget
(`steps`, the papers' ~400 steps at 8B scale, during which their rankings settled after ~300) from the
teacher with the final distillation's objective (spec section 1.5: the online teacher, full-vocabulary KD;
stored top-k teacher logits, `run/teacher_pass.py`, are an option that saves the teacher passes, at the cost
the spec's section 5 names for top-k with K <= 100), and ranks them again by the loss after that distillation
(`metric`):

* `validation_loss`: next-token loss on rows of the validation documents (never the held-out rows a report
  is computed on);
* `distill_loss`: the distillation objective, mean of the last 10% of the steps (training rows).

The validation loss is also measured every `steps / 4` steps, so the table shows when the ranking settles.
Each candidate's final validation loss is kept per row, and the table gives each candidate's difference to
the winner with a paired bootstrap interval over those rows (`eval/bootstrap.py`); the summary warns when
the runner-up's interval reaches 0, that is when the rows do not separate the winner.
Every candidate is pruned and saved first; the teacher is then released, and each short run is an
ordinary `trainer.train` run (its own directory and metrics). A finished candidate leaves `result.json` (its
checkpoints are deleted); a search interrupted part-way reruns only the candidates without one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

from minitron_jax.core import multihost
from minitron_jax.core.atomic import write_text
from minitron_jax.core.errors import Preempted
from minitron_jax.eval import evaluate
from minitron_jax.eval.bootstrap import paired_intervals
from minitron_jax.io.hf import save_params
from minitron_jax.model.config import LlamaConfig
from minitron_jax.prune.pruning import prune
from minitron_jax.prune.record import prune_record, save_prune_record
from minitron_jax.train import trainer

METRICS = ("validation_loss", "distill_loss")
LEVEL = 0.95  # of the bootstrap intervals


def _rank(values: list[float]) -> list[int]:
    order = sorted(range(len(values)), key=lambda i: (math.isnan(values[i]), values[i]))
    ranks = [0] * len(values)
    for r, i in enumerate(order, 1):
        ranks[i] = r
    return ranks


def save_candidates(table: list[dict], params, cfg, scores, teacher_dir, out: Path, n: int) -> list[dict]:
    """Prune and save the `n` best candidates of `pruning.rank_shapes`' table (sorted by post-pruning loss) under
    out/candidate_I/student_hf (with their prune records); returns their rows with "student" added."""
    rows = []
    for i, r in enumerate(table[:n]):
        p, c = prune(params, cfg, scores, r["target"])
        d = out / f"candidate_{i}" / "student_hf"
        save_params(p, c, d, source=teacher_dir, overwrite=True)
        save_prune_record(d, prune_record(cfg, scores, r["target"], source=teacher_dir))
        rows.append({**{k: r[k] for k in ("spec", "params", "loss")}, "student": str(d)})
    return rows


def _earlier(out: Path, done: Path) -> dict | None:
    """The result of a short run finished before an interruption of the search, else None: an interrupted run's
    directory is removed, so that it starts again and its curve is whole."""
    if done.is_file():
        return json.loads(done.read_text())
    shutil.rmtree(out, ignore_errors=True)
    return None


def _finish(out: Path, done: Path, curve: list, last: dict) -> dict:
    """A finished short run's result (its validation curve, the mean of the last tenth of its distillation
    losses), written to `done`; the checkpoints are removed (the weights are not needed)."""
    losses = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in losses if "loss" in r]
    tail = losses[-max(1, len(losses) // 10):]
    res = json.loads(json.dumps({"distill_loss": sum(tail) / len(tail), "validation_curve": curve,
                                 "validation_loss": curve[-1][1], **last}))
    write_text(done, json.dumps(res))
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return res


def distill_candidates(rows: list[dict], rc, valid_rows, *, metric: str = "validation_loss", mesh=None,
                       batch_size: int = 8, log: Callable[[str], Any] = print) -> list[dict]:
    """Short distillation of every candidate (`rc`: the run's recipe; its student and out are replaced), then
    the table ranked by `metric`. Each row gains "distilled" (the metric), "validation_curve" [(step, loss)],
    "validation_nll" / "validation_tokens" (per validation row, after the last step), "distill_loss",
    "rank_pruned", "rank_distilled", "rank_change" (positive: moved up) and, with metric validation_loss,
    "vs_winner" [difference, low, high] (`LEVEL` paired bootstrap interval over the validation rows)."""

    if metric not in METRICS:
        raise ValueError(f"search.metric={metric!r}: choose one of {', '.join(METRICS)}")
    every = max(1, rc.steps // 4)
    for i, row in enumerate(rows):
        cfg = LlamaConfig.from_file(row["student"])
        curve: list[tuple[int, float]] = []
        last: dict[str, list] = {}

        def hook(run, cfg=cfg, curve=curve, last=last):
            if run.step % every == 0 or run.step == run.rc.steps:
                nll, tok = evaluate.row_losses(run.state["trainable"]["model"], cfg, valid_rows,
                                               batch_size=batch_size, mesh=mesh, attention=run.rc.attention)
                curve.append((run.step, float(nll.sum() / tok.sum())))
                last.update(validation_nll=nll.tolist(), validation_tokens=tok.tolist())
        out = Path(row["student"]).parent / "distill"
        done = out / "result.json"
        earlier = multihost.decided(lambda: _earlier(out, done), f"search-{i}-start")  # process 0's disk decides
        if earlier is not None:  # finished before an interruption of the search
            row.update(earlier)
        else:
            run_rc = dataclasses.replace(rc, student=row["student"], out=str(out), export=False, resume=False)
            log(f"[search {i + 1}/{len(rows)}] {row['spec']}: {rc.steps} distillation steps")
            summary = trainer.train(run_rc, log, hooks=[hook])
            if "preempted_at" in summary:
                raise Preempted(f"the search's distillation of {row['spec']} was preempted at step "
                                f"{summary['preempted_at']}; rerun to continue", summary["preempted_at"])
            # process 0 wrote the metrics: it reads them and writes the result, which every process takes
            row.update(multihost.decided(lambda: _finish(out, done, curve, last), f"search-{i}-result"))
        row["distilled"] = row[metric]
        log(f"  {row['spec']}: pruned {row['loss']:.4f} -> {metric} {row['distilled']:.4f}")
    pr, dr = _rank([r["loss"] for r in rows]), _rank([r["distilled"] for r in rows])
    for r, a, b in zip(rows, pr, dr):
        r["rank_pruned"], r["rank_distilled"], r["rank_change"] = a, b, a - b
    rows = sorted(rows, key=lambda r: r["rank_distilled"])
    if metric == "validation_loss" and all("validation_nll" in r for r in rows):
        iv = paired_intervals(np.array([r["validation_nll"] for r in rows]), np.array(rows[0]["validation_tokens"]),
                              0, level=LEVEL)
        for r, x in zip(rows, iv):
            r["vs_winner"] = [float(v) for v in x]
    return rows


def separated(rows: list[dict]) -> bool | None:
    """Whether the runner-up's interval lies wholly above the winner's loss (None: no intervals)."""
    if len(rows) < 2 or "vs_winner" not in rows[1]:
        return None
    return rows[1]["vs_winner"][1] > 0


def table_markdown(rows: list[dict], metric: str, steps: int) -> str:
    iv = "vs_winner" in rows[0]
    n = len(rows[0].get("validation_tokens", ()))
    head = (f"| rank after {steps} steps | rank after pruning | change | shape | params | loss after pruning | "
            f"{metric} after {steps} steps |" + (f" minus the winner's ({LEVEL:.0%} paired bootstrap over {n} rows) |"
                                                 if iv else "") + " validation loss by step |")
    lines = [head, "|---|---|---|---|---|---|---|" + "---|" * iv + "---|"]
    for r in rows:
        curve = ", ".join(f"{s}: {v:.3f}" for s, v in r.get("validation_curve", []))
        d = r.get("vs_winner")
        gap = (f" {d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}] |" if d and r["rank_distilled"] > 1 else " - |") if iv else ""
        lines.append(f"| {r['rank_distilled']} | {r['rank_pruned']} | {r['rank_change']:+d} | `{r['spec']}` | "
                     f"{r['params']:,} | {r['loss']:.4f} | {r['distilled']:.4f} |{gap} {curve} |")
    return "\n".join(lines)


def summary_text(rows: list[dict], steps: int) -> str:
    changed = any(r["rank_change"] for r in rows)
    text = (f"The ranking after {steps} distillation steps {'differs from' if changed else 'equals'} the ranking "
            f"right after pruning; best after pruning: `{min(rows, key=lambda r: r['rank_pruned'])['spec']}`, "
            f"best after distillation: `{rows[0]['spec']}`.")
    sep = separated(rows)
    if sep is False:
        lo, hi = rows[1]["vs_winner"][1:]
        text += (f" WARNING: the winner is not separated from the runner-up `{rows[1]['spec']}` on these "
                 f"{len(rows[0]['validation_tokens'])} validation rows (the {LEVEL:.0%} interval of their difference, "
                 f"[{lo:+.4f}, {hi:+.4f}], reaches 0): more rows (search.samples) or more steps would be needed "
                 "to choose between them.")
    elif sep:
        text += f" The runner-up's {LEVEL:.0%} interval lies above the winner's loss: the winner is separated."
    return text


def write_report(rows: list[dict], out: Path, metric: str, steps: int) -> dict[str, str]:
    """search.json, search.md (the table) and search.png (validation loss per candidate by step) in `out`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    md = table_markdown(rows, metric, steps)
    summary = summary_text(rows, steps)
    write_text(out / "search.md", md + "\n\n" + summary + "\n")
    write_text(out / "search.json", json.dumps(rows, indent=2, default=str))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in rows:
        pts = [(0, r["loss"])] + [tuple(p) for p in r.get("validation_curve", [])]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{r['spec']} ({r['params'] / 1e6:.1f}M)")
    ax.set(xlabel="distillation step", ylabel="validation loss", title="candidates: validation loss while distilling")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "search.png", dpi=90)
    plt.close(fig)
    return {"table": str(out / "search.md"), "plot": str(out / "search.png"), "summary": summary}
