"""Evaluation: LM loss / perplexity on packed text, and multiple-choice log-likelihood tasks.

Tasks are JSONL lines `{"context": str, "choices": [str, ...], "answer": int}` scored as
lm-evaluation-harness does: the sum of log p(choice tokens | context) picks the answer (`acc`), and
the same divided by the choice's length in characters, `len(choice)` (`acc_norm`). `next_line_task`
builds such a task from held-out text (the true next line among four) so depth search and reports
have a downstream metric without a hub. Every function takes optional `layer_gates` (0 = skip a layer).
Rows are checked against the model's vocabulary before any forward (`data.check_token_ids`), and a
loss or choice log-probability that is NaN or inf is an `EvalError`, never a result.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from minitron_jax.core import storage
from minitron_jax.core.errors import DataError, EvalError
from minitron_jax.data.spec import DataSpec, with_split_seed
from minitron_jax.data.text import check_token_ids, read_jsonl
from minitron_jax.model.config import LlamaConfig
from minitron_jax.model.llama import forward, lm_head_weight
from minitron_jax.model.losses import lm_loss_from_hidden, next_token_targets, token_logprob_sums
from minitron_jax.model.sharding import batch_rows, check_batch_rows, put, to_host

CHUNK = 256  # sequence positions per chunk of the next-token loss
NOT_FINITE_FIX = ("check the model's weights for NaN/inf, evaluate in float32 (compute_dtype), and use the tokenizer "
                  "saved with the model")


def make_loss_fn(cfg: LlamaConfig, compute_dtype=None, chunk_size: int = CHUNK, attention: str = "xla") -> Callable:
    """loss_sum(params, ids, mask, gates) -> (sum of next-token NLL over real targets, their count).

    The training loss (`losses.lm_loss_from_hidden`, chunked over the sequence): no [B, S, V] logits.
    `attention`: the implementation (`attention.IMPLEMENTATIONS`)."""

    def loss_sum(params, ids, mask, gates):
        h = forward(params, cfg, ids, attention_mask=mask, layer_gates=gates, compute_dtype=compute_dtype,
                    return_hidden=True, attention=attention)
        targets, tmask = next_token_targets(ids, mask)
        return lm_loss_from_hidden(h, lm_head_weight(params, cfg), targets, tmask, chunk_size, normalizer=1.0), tmask.sum()

    return loss_sum


def batches(samples: np.ndarray, batch_size: int):
    """Fixed-shape (ids, mask) batches; the last one is padded with masked rows (one compile)."""
    if len(samples) == 0:
        raise DataError("no samples to evaluate")
    for i in range(0, len(samples), batch_size):
        ids = samples[i:i + batch_size]
        mask = np.ones(ids.shape, np.float32)
        pad = batch_size - len(ids)
        if pad:
            ids = np.concatenate([ids, np.zeros((pad, ids.shape[1]), ids.dtype)])
            mask = np.concatenate([mask, np.zeros((pad, ids.shape[1]), np.float32)])
        yield ids, mask


def mesh_context(mesh):
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def gated_losses(params, cfg: LlamaConfig, samples: np.ndarray, gate_sets: np.ndarray, *, batch_size: int = 8,
                 mesh=None, compute_dtype=None, progress=None, attention: str = "xla") -> np.ndarray:
    """Mean LM loss under each row of `gate_sets` [K, L]; one compile for all rows and batches, whose rows
    are split over `mesh`'s batch axes when given."""
    check_batch_rows(f"batch_size={batch_size}", batch_size, batch_rows(mesh))
    check_token_ids(samples, cfg.vocab_size, "the evaluation rows")
    fn = jax.jit(make_loss_fn(cfg, compute_dtype, attention=attention))
    with mesh_context(mesh):
        data = [(put(i, mesh), put(m, mesh)) for i, m in batches(samples, batch_size)]
        out = []
        for gates in np.asarray(gate_sets, np.float32):
            tot = cnt = 0.0
            for ids, mask in data:
                s, c = fn(params, ids, mask, jnp.asarray(gates))
                tot, cnt = tot + float(s), cnt + float(c)
            if not np.isfinite(tot / cnt):
                skipped = np.flatnonzero(gates == 0).tolist()
                raise EvalError(f"the LM loss on {len(samples)} rows of {np.shape(samples)[1]} tokens is {tot / cnt}"
                                f"{f' with layers {skipped} skipped' if skipped else ''}; {NOT_FINITE_FIX}")
            out.append(tot / cnt)
            if progress is not None:
                progress.update(tokens=int(cnt))
    return np.asarray(out, np.float32)


def lm_loss(params, cfg: LlamaConfig, samples: np.ndarray, **kw) -> float:
    """Mean next-token cross-entropy of the model on packed rows `samples` [N, S]."""
    return float(gated_losses(params, cfg, samples, np.ones((1, cfg.num_hidden_layers), np.float32), **kw)[0])


def row_losses(params, cfg: LlamaConfig, samples: np.ndarray, *, batch_size: int = 8, mesh=None, compute_dtype=None,
               attention: str = "xla") -> tuple[np.ndarray, np.ndarray]:
    """(sum of next-token NLL [N] float64, target count [N]) of each packed row of `samples` [N, S]: the terms of
    `lm_loss` (= nll.sum() / count.sum()) kept apart per row, for paired comparisons of models on the same rows
    (`eval/bootstrap.py`). Batches are split over `mesh` like `multiple_choice`'s."""
    check_batch_rows(f"batch_size={batch_size}", batch_size, batch_rows(mesh))
    check_token_ids(samples, cfg.vocab_size, "the evaluation rows")
    fn = jax.jit(make_choice_fn(cfg, compute_dtype, attention=attention))
    gates = jnp.ones((cfg.num_hidden_layers,), jnp.float32)
    nll = []
    with mesh_context(mesh):
        for ids, mask in batches(samples, batch_size):  # every position whose next token is real is scored
            lp = fn(params, put(ids, mesh), put(mask, mesh), put(mask, mesh), gates)
            nll.append(-to_host(lp).astype(np.float64))  # rows other processes hold: gathered
    nll = np.concatenate(nll)[:len(samples)]
    if not np.isfinite(nll).all():
        k = int(np.flatnonzero(~np.isfinite(nll))[0])
        raise EvalError(f"the LM loss of evaluation row {k} is {nll[k]}; {NOT_FINITE_FIX}")
    return nll, np.full(len(samples), samples.shape[1] - 1, np.int64)


# ---------------------------------------------------------------------------- multiple choice
def load_task(path: str | Path) -> list[dict[str, Any]]:
    items = []
    for n, item in read_jsonl(path):
        if (not {"context", "choices", "answer"} <= set(item)
                or not isinstance(item["answer"], int) or not 0 <= item["answer"] < len(item["choices"])
                or not all(isinstance(c, str) and c for c in item["choices"])):
            raise DataError(f"{path}:{n}: a task line needs context, non-empty string choices and a valid "
                            'integer answer index, e.g. {"context": "...", "choices": ["a", "b"], "answer": 0}')
        items.append(item)
    if not items:
        raise DataError(f"{path} holds no task items")
    return items


def next_line_task(docs: Sequence[tuple[str, str]], n_items: int, seed: int = 0, context_lines: int = 4,
                   n_choices: int = 4, min_chars: int = 20) -> list[dict[str, Any]]:
    """Pick the true next line among `n_choices` lines of the same text (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    per_doc = [[ln.strip() for ln in text.splitlines() if len(ln.strip()) >= min_chars] for _, text in docs]
    per_doc = [lines for lines in per_doc if len(lines) > context_lines + n_choices and len(set(lines)) >= n_choices]
    if not per_doc:
        raise DataError("the held-out text has too few long lines to build a next-line task")
    items = []
    for _ in range(n_items):
        lines = per_doc[rng.integers(len(per_doc))]
        i = int(rng.integers(context_lines, len(lines)))
        others = sorted(set(lines) - {lines[i]})  # distinct distractors, never the answer itself
        distractors = rng.choice(len(others), n_choices - 1, replace=False)
        choices = [lines[i]] + [others[j] for j in distractors]
        order = rng.permutation(n_choices)
        items.append({"context": "\n".join(lines[i - context_lines:i]) + "\n",
                      "choices": [choices[o] for o in order], "answer": int(np.argmin(order))})
    return items


def _encode_pairs(items, tokenizer, max_len: int):
    rows, spans = [], []
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    for item in items:
        ctx = bos + tokenizer(item["context"], add_special_tokens=False)["input_ids"]
        for choice in item["choices"]:
            cont = tokenizer(choice, add_special_tokens=False)["input_ids"]
            ids = (ctx + cont)[-max_len:]
            rows.append(ids)
            spans.append(len(cont) if len(cont) < len(ids) else len(ids) - 1)
    return rows, spans


def make_choice_fn(cfg: LlamaConfig, compute_dtype=None, chunk_size: int = CHUNK, attention: str = "xla") -> Callable:
    """choice_logprob(params, ids, mask, target_mask, gates) -> [B] sums of log p(token | prefix) over the
    tokens marked in `target_mask` (chunked: `losses.token_logprob_sums`)."""

    def choice_logprob(params, ids, mask, target_mask, gates):
        h = forward(params, cfg, ids, attention_mask=mask, layer_gates=gates, compute_dtype=compute_dtype,
                    return_hidden=True, attention=attention)
        targets, _ = next_token_targets(ids, mask)
        # position t predicts token t+1: it is scored when token t+1 belongs to the choice
        scored = jnp.concatenate([target_mask[:, 1:], jnp.zeros_like(target_mask[:, :1])], axis=1)
        return token_logprob_sums(h, lm_head_weight(params, cfg), targets, scored, chunk_size)

    return choice_logprob


def multiple_choice(params, cfg: LlamaConfig, tokenizer, items: Sequence[dict], *, gate_sets=None,
                    batch_size: int = 16, max_len: int = 256, compute_dtype=None, progress=None, mesh=None,
                    attention: str = "xla") -> list[dict[str, float]]:
    """acc and acc_norm for each row of `gate_sets` (default: the full model); batches split over `mesh`."""
    check_batch_rows(f"batch_size={batch_size}", batch_size, batch_rows(mesh))
    if not items:
        raise DataError("no multiple-choice items to evaluate")
    rows, spans = _encode_pairs(items, tokenizer, max_len)
    width = min(max_len, -(-max(len(r) for r in rows) // 32) * 32)
    ids = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), np.float32)
    tmask = np.zeros((len(rows), width), np.float32)
    for r, (row, span) in enumerate(zip(rows, spans)):
        ids[r, :len(row)] = row
        mask[r, :len(row)] = 1
        tmask[r, len(row) - span:len(row)] = 1
    if ids.max() >= cfg.vocab_size or ids.min() < 0:  # name the first item holding an id the model does not have
        r = int(np.flatnonzero((ids >= cfg.vocab_size).any(1) | (ids < 0).any(1))[0])
        n = int(np.searchsorted(np.cumsum([len(it["choices"]) for it in items]), r, side="right"))
        check_token_ids(ids[r], cfg.vocab_size, f"task item {n}")
    fn = jax.jit(make_choice_fn(cfg, compute_dtype, attention=attention))
    gate_sets = np.ones((1, cfg.num_hidden_layers), np.float32) if gate_sets is None else np.asarray(gate_sets, np.float32)
    nchars = np.asarray([len(c) for it in items for c in it["choices"]], np.float64)  # lm-eval: characters
    results = []
    for gates in gate_sets:
        lp = []
        for i in range(0, len(rows), batch_size):
            sl = slice(i, i + batch_size)
            pad = batch_size - len(ids[sl])
            b = [put(np.pad(x[sl], ((0, pad), (0, 0))), mesh) for x in (ids, mask, tmask)]
            with mesh_context(mesh):
                lp.append(to_host(fn(params, *b, jnp.asarray(gates)))[: batch_size - pad])
        lp = np.concatenate(lp)
        if not np.isfinite(lp).all():
            k = int(np.flatnonzero(~np.isfinite(lp))[0])
            n = int(np.searchsorted(np.cumsum([len(it["choices"]) for it in items]), k, side="right"))
            skipped = np.flatnonzero(gates == 0).tolist()
            raise EvalError(f"the log-probability of a choice of task item {n} is {lp[k]}"
                            f"{f' with layers {skipped} skipped' if skipped else ''}; {NOT_FINITE_FIX}")
        k = acc = acc_norm = 0
        for it in items:
            n = len(it["choices"])
            acc += int(np.argmax(lp[k:k + n]) == it["answer"])
            acc_norm += int(np.argmax(lp[k:k + n] / nchars[k:k + n]) == it["answer"])
            k += n
        results.append({"acc": acc / len(items), "acc_norm": acc_norm / len(items), "n": len(items)})
        if progress is not None:
            progress.update(tokens=int(mask.sum()))
    return results


def evaluate_model(params, cfg: LlamaConfig, tokenizer, rows: np.ndarray, items: Sequence[dict], *,
                   batch_size: int = 8, mesh=None, compute_dtype=None, attention: str = "xla") -> dict[str, float]:
    """Held-out loss / perplexity on packed `rows` plus accuracy on multiple-choice `items` (what
    `minitron eval` and the evaluate stage of `minitron run` report); batches split over `mesh`, whose data x
    fsdp devices must divide `batch_size` (else refused: `sharding.check_batch_rows`); a last batch of fewer
    rows is padded to `batch_size` with masked rows."""
    import math
    check_batch_rows(f"batch_size={batch_size}", batch_size, batch_rows(mesh))
    kw = dict(batch_size=batch_size, mesh=mesh, compute_dtype=compute_dtype, attention=attention)
    loss = lm_loss(params, cfg, rows, **kw)
    mc = multiple_choice(params, cfg, tokenizer, items, **kw)[0]
    return {"params": cfg.param_count(), "tokens": int(rows.size), "loss": loss, "perplexity": math.exp(loss), **mc}


TASK_DOCS = 1000  # a token store's next-line task is built from its first 1,000 held-out documents


def eval_set(data: str | Path, tokenizer, *, seq_len: int, samples: int, task: str | Path | None = None,
             task_items: int = 100, holdout: str | Sequence[str] = (), holdout_fraction: float = 0.0, seed: int = 0,
             text_field: str = "text", vocab_size: int | None = None,
             split_seed: int = 0) -> tuple[np.ndarray, list[dict]]:
    """(rows [samples, seq_len], multiple-choice items): what `evaluate_model` is given by `minitron eval` and
    by the evaluate stage of `minitron run`.

    The held-out documents are split off as training splits them (`loader.build_corpus` with the same
    `holdout` names, or the same `holdout_fraction` drawn with the same `split_seed`), so a distilled model is
    never evaluated on rows it trained on; with neither, every document is evaluated. Rows are the first
    `samples` of the packed held-out rows (concat packing, document order seeded by `seed`). Items come from
    `task` (JSONL) when given, else `next_line_task` over the held-out documents."""
    spec = DataSpec(data, holdout=holdout, holdout_fraction=holdout_fraction, seed=seed, text_field=text_field,
                    split_seed=split_seed)
    rows, docs = spec.evaluation_rows(tokenizer, seq_len, samples, vocab_size=vocab_size,
                                      task_docs=0 if task else TASK_DOCS)
    return rows, load_task(task) if task else next_line_task(docs, task_items, seed=seed)


def run_model(model: str | Path) -> tuple[Path, dict | None]:
    """(model directory, the run's recorded settings or None): a training run's out directory (recipe.json
    and the student_hf it exported) or that student_hf give the student and out/recipe.json; any other
    directory is a model as it is. Local or gs://."""
    model = storage.path(model)
    if (model / "recipe.json").is_file() and not (model / "config.json").is_file():
        if not (model / "student_hf").is_dir():
            raise EvalError(f"{model} is a training run's out without the student it exports ({model / 'student_hf'}):"
                            " the run has not finished, or ran with export=false; finish it (resume=true), or give "
                            "--model an HF directory")
        model = model / "student_hf"
    recipe = model.parent / "recipe.json"
    if model.name != "student_hf" or not recipe.is_file():
        return model, None
    try:
        return model, with_split_seed(json.loads(recipe.read_text()))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise EvalError(f"cannot read {recipe}, the settings of the run that trained {model} ({e}); repair or "
                        "delete it") from None


def eval_split_seed(model: str | Path, recorded: dict | None, given: int | None) -> int:
    """The split_seed to evaluate `model` with: the one its run recorded (`run_model`), else `given`, else 0.
    Another `given` than the run's is refused: its fractions would hold out other documents, some of them
    ones the model trained on."""
    have = None if recorded is None else recorded.get("split_seed")
    if have is None:
        return 0 if given is None else given
    if given is not None and given != have:
        recipe = storage.path(model).parent / "recipe.json"
        raise EvalError(f"--split-seed {given}, but {model} was trained with split_seed={have} ({recipe}): its "
                        f"held-out documents are drawn with split_seed={have}, so split_seed={given} would score it "
                        f"partly on documents it trained on; drop --split-seed (the run's is used) or pass "
                        f"--split-seed {have}")
    return have
