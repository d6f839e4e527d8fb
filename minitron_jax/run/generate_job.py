"""`minitron generate`: responses to a JSONL file of prompts, appended to an output JSONL, resumable.

Each input line holds `prompt` (text, tokenized as the tokenizer does by default, BOS included where it adds
one) or `messages` (a chat: [{role, content}], rendered with the tokenizer's chat template and
add_generation_prompt=True). Each output line is the input object plus `response` (the text, without the stop
token), `prompt_tokens`, `response_tokens` (the stop token included), `finish_reason` ("stop" or "length") and
`response_ids` (the generated token ids, the stop token included: what `minitron sft` trains a student on for
sequence-level distillation).

Everything is checked before the weights load: the prompt file (malformed JSON, neither field, unknown roles,
a chat without a chat template, prompts that leave no room for max_new_tokens in the context), and the output
already there. Finished batches are appended as whole lines and flushed; a rerun skips the lines the output
holds (each must answer the same input line) and drops a partial last line left by a crash.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import jax

from minitron_jax.core import multihost, storage
from minitron_jax.core.errors import DataError, OutputError
from minitron_jax.core.progress import Progress
from minitron_jax.data.chat import prompt_ids
from minitron_jax.data.text import read_jsonl
from minitron_jax.eval.generate import Generator
from minitron_jax.eval.sampling import Sampling
from minitron_jax.io.hf import from_pretrained, load_tokenizer
from minitron_jax.model.config import LlamaConfig
from minitron_jax.model.sharding import batch_rows, check_batch_rows

INPUT_KEYS = ("prompt", "messages")


def context_limit(cfg: LlamaConfig) -> int:
    """Positions a sequence may take: max_position_embeddings, or the sliding window when smaller."""
    return min(cfg.max_position_embeddings, cfg.sliding_window or cfg.max_position_embeddings)


def read_prompts(path, tok, *, limit: int, max_new_tokens: int) -> list[tuple[dict[str, Any], list[int]]]:
    """[(input object, token ids)] of every line, each checked (module docstring)."""
    rows = []
    for line, row in read_jsonl(path):
        ids = prompt_ids(f"{path}:{line}", row, tok)
        if not ids:
            raise DataError(f"{path}:{line}: the prompt has no tokens; give some text")
        if len(ids) + max_new_tokens > limit:
            raise DataError(f"{path}:{line}: the prompt has {len(ids)} tokens, and with --max-new-tokens "
                            f"{max_new_tokens} that is over the model's context of {limit} positions "
                            f"(max_position_embeddings or sliding window); shorten it to at most "
                            f"{limit - max_new_tokens} tokens or lower --max-new-tokens")
        rows.append((row, ids))
    if not rows:
        raise DataError(f"{path} holds no prompts; give one JSON object per line with 'prompt' or 'messages'")
    return rows


def stop_ids(model_dir, cfg: LlamaConfig, tok, extra: Sequence[int] = ()) -> tuple[int, ...]:
    """The eos ids of config.json, generation_config.json and the tokenizer, and `extra`."""
    ids = set(int(i) for i in extra)
    gen = storage.path(model_dir) / "generation_config.json"
    for eos in (cfg.eos_token_id, json.loads(gen.read_text()).get("eos_token_id") if gen.is_file() else None,
                tok.eos_token_id):
        ids.update(int(i) for i in (eos if isinstance(eos, list) else [eos]) if i is not None)
    return tuple(sorted(ids))


def finished_lines(out: Path, rows: Sequence[tuple[dict[str, Any], list[int]]], prompts_path) -> int:
    """How many input lines `out` already answers; a partial last line (a crash while writing) is cut off."""
    if not out.exists():
        return 0
    data = out.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(out, "r+b") as f:
            f.truncate(end)
    done = 0
    for n, raw in enumerate(data[:end].splitlines(), 1):
        try:
            got = json.loads(raw)
        except json.JSONDecodeError:
            raise OutputError(f"--out {out}:{n} is not a JSON line written by minitron generate; choose another "
                              "--out") from None
        if n > len(rows) or not isinstance(got, dict) or any(got.get(k) != rows[n - 1][0].get(k) for k in INPUT_KEYS):
            raise OutputError(f"--out {out}:{n} does not answer line {n} of {prompts_path}: it was written for other "
                              "prompts; choose another --out (or delete it)")
        done = n
    return done


def generate_file(model_dir, prompts_path, out, *, sampling: Sampling = Sampling(), max_new_tokens: int = 128,
                  batch_size: int = 8, mesh=None, seed: int = 0, extra_stop_ids: Sequence[int] = (), dtype=None,
                  attention: str = "xla", log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write the responses to `prompts_path`'s lines into `out` (module docstring); returns a summary."""
    if max_new_tokens < 1:
        raise DataError(f"--max-new-tokens {max_new_tokens}: generate at least one token")
    if batch_size < 1:
        raise DataError(f"--batch-size {batch_size}: give at least 1")
    check_batch_rows(f"--batch-size {batch_size}", batch_size, batch_rows(mesh))  # split over the mesh, not replicated
    if storage.path(out).is_dir():
        raise OutputError(f"--out {out} is a directory; give a .jsonl file path")
    lead = jax.process_index() == 0  # every process runs every batch (SPMD); process 0 writes the file
    # gs://: process 0 appends to a local copy and uploads it after each batch (objects cannot be appended to)
    mirror, local = storage.Mirror.of_file(out) if lead and storage.is_url(out) else (None, Path(out))
    cfg = LlamaConfig.from_file(model_dir)
    tok = load_tokenizer(model_dir, vocab_size=cfg.vocab_size)
    limit = context_limit(cfg)
    rows = read_prompts(prompts_path, tok, limit=limit, max_new_tokens=max_new_tokens)
    stops = stop_ids(model_dir, cfg, tok, extra_stop_ids)
    skip = multihost.decided(lambda: finished_lines(local, rows, prompts_path), "generate-resume")  # process 0's file
    summary = {"out": str(out), "rows": len(rows), "skipped": skip, "generated_tokens": 0, "stop_ids": list(stops)}
    if skip == len(rows):
        log(f"[generate] {out} already answers all {len(rows)} prompts")
        return summary
    if lead:
        local.parent.mkdir(parents=True, exist_ok=True)
    model = from_pretrained(model_dir, mesh=mesh, dtype=dtype)
    params = model.params()
    gen = Generator(cfg, sampling, max_new_tokens=max_new_tokens, stop_ids=stops, batch_size=batch_size, mesh=mesh,
                    attention=attention, max_len=limit)
    progress = Progress(len(rows) - skip, "generate")
    with open(local, "a", encoding="utf-8") if lead else contextlib.nullcontext() as f:
        for start in range(skip, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            results, _ = gen(params, [ids for _, ids in batch], range(start, start + len(batch)), seed=seed)
            lines = []
            for (row, ids), res in zip(batch, results):
                text_ids = res.tokens[:-1] if res.finish_reason == "stop" else res.tokens
                lines.append(json.dumps({**row, "response": tok.decode(text_ids, skip_special_tokens=True),
                                         "prompt_tokens": len(ids), "response_tokens": len(res.tokens),
                                         "finish_reason": res.finish_reason,
                                         "response_ids": [int(t) for t in res.tokens]}, ensure_ascii=False) + "\n")
            if lead:
                f.write("".join(lines))
                f.flush()
                os.fsync(f.fileno())
                if mirror is not None:
                    mirror.sync()
            tokens = sum(len(r.tokens) for r in results)
            summary["generated_tokens"] += tokens
            progress.update(len(batch), tokens=tokens)
    progress.close()
    if mirror is not None:
        mirror.close()
    multihost.decided(lambda: None, "generate-written")  # every host goes on once process 0's file is complete
    return summary
