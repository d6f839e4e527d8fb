"""Supervised fine-tuning data: JSONL examples -> token ids with a loss mask -> first-fit packed rows.

Each line is one example, in one of two forms:
- a chat, `{"messages": [{role, content}, ...]}`: rendered with the tokenizer's chat template; the loss is on
  the tokens each assistant turn adds (`chat.tokenize_chat`, derived from the rendered template);
- a prompt and its response, as `minitron generate` writes them (sequence-level distillation):
  `{"prompt": TEXT or "messages": CHAT, "response": TEXT[, "response_ids": [...], "finish_reason": ...]}`. The
  prompt is tokenized exactly as `generate` tokenized it (`chat.prompt_ids`); the response is `response_ids`
  when the line has them (the teacher's own tokens, its stop token included), else the response text's tokens
  followed by the tokenizer's eos when `finish_reason` is "stop". The loss is on the response tokens only.

Examples longer than seq_len are cut to seq_len (counted and reported); one left with no trained token is
dropped (counted). Rows are packed first-fit-decreasing with segment ids (`packing.first_fit_layout`), so
attention and targets never cross two examples, and padding is masked. A seeded fraction of the examples
(`holdout_fraction`, drawn with `split_seed`) is held out for the held-out loss.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from minitron_jax.core import storage
from minitron_jax.core.errors import DataError
from minitron_jax.data import text
from minitron_jax.data.chat import prompt_ids, tokenize_chat
from minitron_jax.data.packing import PackedRows, first_fit_layout

FORMS = "'messages' (a chat), or 'prompt' / 'messages' with a 'response' (minitron generate's output)"


@dataclasses.dataclass
class Example:
    ids: np.ndarray  # int32 [T]
    loss: np.ndarray  # bool [T]: the tokens the loss is on


def example(path, line: int, row: dict, tok) -> Example:
    """One JSONL line as token ids and its loss mask (module docstring)."""
    where = f"{path}:{line}"
    if "response" not in row:
        if "messages" not in row:
            raise DataError(f"{where} has keys {sorted(row)}; an SFT line needs {FORMS}")
        ids, mask = tokenize_chat(tok, row["messages"], where)
        if not mask.any():
            raise DataError(f"{where}: the chat has no assistant message, so nothing to train on; add the "
                            "assistant's turns (or a 'response')")
        return Example(ids, mask)
    if not isinstance(row["response"], str):
        raise DataError(f"{where}: 'response' is a {type(row['response']).__name__}, not text")
    prompt = np.asarray(prompt_ids(where, row, tok), np.int32)
    if "response_ids" in row:
        r = row["response_ids"]
        if not isinstance(r, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in r):
            raise DataError(f"{where}: 'response_ids' must be a list of token ids (integers)")
        resp = np.asarray(r, np.int32)
    else:
        resp = np.asarray(tok(row["response"], add_special_tokens=False)["input_ids"], np.int32)
        if row.get("finish_reason") == "stop":
            if tok.eos_token_id is None:
                raise DataError(f"{where}: finish_reason is 'stop' but the tokenizer has no eos token to end the "
                                "response with; give 'response_ids' (minitron generate writes them)")
            resp = np.append(resp, np.int32(tok.eos_token_id))
    if not len(resp):
        raise DataError(f"{where}: the response has no tokens, so nothing to train on; drop the line")
    return Example(np.concatenate([prompt, resp]), np.concatenate([np.zeros(len(prompt), bool),
                                                                   np.ones(len(resp), bool)]))


def read_examples(path, tok, vocab_size: int | None = None) -> list[Example]:
    """Every line of `path` as an `Example`; an empty file, a malformed line or an id outside the vocabulary
    is refused, naming the file and line."""
    path = storage.path(path)  # local or gs://
    if not path.is_file():
        raise DataError(f"data={path} is not a file; SFT data is one JSONL file whose lines are {FORMS}")
    out = []
    for line, row in text.read_jsonl(path):
        ex = example(path, line, row, tok)
        text.check_token_ids(ex.ids, vocab_size, f"{path}:{line}")
        out.append(ex)
    if not out:
        raise DataError(f"{path} holds no examples; give one JSON object per line: {FORMS}")
    return out


def pack_examples(examples: Sequence[Example], seq_len: int, seed: int = 0, pad_id: int = 0
                  ) -> tuple[PackedRows, dict[str, int]]:
    """(rows with segment ids and loss mask, {"examples", "truncated", "dropped", "loss_tokens"}): each
    example cut to seq_len (dropped if no trained token is left), packed first-fit-decreasing."""
    kept, truncated, dropped = [], 0, 0
    for ex in examples:
        if len(ex.ids) > seq_len:
            truncated += 1
            ex = Example(ex.ids[:seq_len], ex.loss[:seq_len])
        # the first token is never a target (nothing predicts it): a mask only there trains nothing
        if ex.loss[1:].any():
            kept.append(ex)
        else:
            dropped += 1
    stats = {"examples": len(kept), "truncated": truncated, "dropped": dropped,
             "loss_tokens": int(sum(ex.loss[1:].sum() for ex in kept))}
    if not kept:
        return PackedRows(np.zeros((0, seq_len), np.int32), np.zeros((0, seq_len), np.int32),
                          np.zeros((0, seq_len), np.float32)), stats
    layout = first_fit_layout([len(ex.ids) for ex in kept], seq_len, seed)
    tokens = np.full((len(layout), seq_len), pad_id, np.int32)
    segs = np.zeros((len(layout), seq_len), np.int32)
    loss = np.zeros((len(layout), seq_len), np.float32)
    for r, members in enumerate(layout):
        at = 0
        for s, i in enumerate(members, 1):
            n = len(kept[i].ids)
            tokens[r, at:at + n], segs[r, at:at + n], loss[r, at:at + n] = kept[i].ids, s, kept[i].loss
            at += n
    return PackedRows(tokens, segs, loss), stats


def sft_corpus(path, tok, seq_len: int, *, holdout_fraction: float = 0.0, split_seed: int = 0, seed: int = 0,
               vocab_size: int | None = None, log=None) -> tuple[PackedRows, PackedRows | None]:
    """(train, held-out or None) packed rows of the SFT examples in `path` (module docstring)."""
    examples = read_examples(path, tok, vocab_size)
    named = [(f"line {i}", ex) for i, ex in enumerate(examples)]
    try:
        train, held = text.split_documents(named, (), holdout_fraction, split_seed)
    except DataError as e:
        raise DataError(f"{path}: {e}".replace("document", "example")) from None
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    train_rows, stats = pack_examples([ex for _, ex in train], seq_len, seed, pad)
    if not len(train_rows):
        raise DataError(f"{path}: none of its {len(train)} training examples has a trained token within seq_len="
                        f"{seq_len} (the response or assistant turn starts after it); raise seq_len")
    held_rows = None
    if held:
        held_rows, held_stats = pack_examples([ex for _, ex in held], seq_len, seed, pad)
        if not len(held_rows):
            raise DataError(f"{path}: none of the {len(held)} held-out examples has a trained token within "
                            f"seq_len={seq_len}; raise seq_len or holdout_fraction")
    if log is not None:
        log(f"[sft] {path}: {stats['examples']} training examples in {len(train_rows)} rows of {seq_len} "
            f"({stats['loss_tokens']:,} trained tokens), {stats['truncated']} cut to seq_len, {stats['dropped']} "
            f"dropped with no trained token; {len(held)} held out")
    return train_rows, held_rows
