"""Chat conversations: checked, rendered with the tokenizer's own chat template, and tokenized with a mask
of the tokens each assistant turn adds (the tokens an SFT loss trains on).

The mask is derived from the rendered template itself, so it needs no `{% generation %}` markers: for each
assistant message i, the conversation up to i rendered with the generation prompt is a prefix of the
conversation up to and including i; the characters between the two ends are that turn's (its content and
whatever the template closes it with, such as `<|im_end|>` or `<|eot_id|>`). Tokens are marked by the
character offset where they start in the whole rendered conversation. A template whose renders are not prefixes of each
other (one that rewrites earlier turns) is refused, naming the turn.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from minitron_jax.core.errors import DataError

ROLES = ("system", "user", "assistant", "tool")


def check_messages(msgs: Any, where: str, tok=None) -> list[dict[str, str]]:
    """`msgs` if it is a non-empty list of {role, content} with known roles (and `tok` has a chat template)."""
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} must be an object with a text 'content', got {json.dumps(m)[:80]}")
        if m.get("role") not in ROLES:
            raise DataError(f"{where}: message {i} has role {m.get('role')!r}; roles are {', '.join(ROLES)}")
    if tok is not None and not getattr(tok, "chat_template", None):
        raise DataError(f"{where} is a chat ('messages') but the model's tokenizer has no chat template; give "
                        "'prompt' text instead, or use a model whose tokenizer_config.json / chat_template.jinja "
                        "has one")
    return msgs


def render(tok, msgs: list[dict[str, str]], *, add_generation_prompt: bool = False) -> str:
    return tok.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tokenize=False)


def assistant_spans(tok, msgs: list[dict[str, str]], where: str) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, [(start, end) character span of each assistant turn])."""
    check_messages(msgs, where, tok)
    text, spans = render(tok, msgs), []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = render(tok, msgs[:i], add_generation_prompt=True) if i else ""
        upto = render(tok, msgs[:i + 1])
        if not upto.startswith(before) or not text.startswith(upto):
            raise DataError(f"{where}: the chat template renders message {i} (assistant) so that the conversation "
                            "before it is not a prefix of the conversation with it; its assistant tokens cannot be "
                            "told apart from the template, so this template cannot be used for SFT")
        spans.append((len(before), len(upto)))
    return text, spans


def tokenize_chat(tok, msgs: list[dict[str, str]], where: str) -> tuple[np.ndarray, np.ndarray]:
    """(token ids [T] int32, assistant mask [T] bool) of the rendered conversation; a token is an assistant
    token when its first character lies inside an assistant turn's span (a token that merges the turn's last
    characters with the template's next ones is the one the model must emit there: it is trained on)."""
    text, spans = assistant_spans(tok, msgs, where)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], np.int32)
    offsets = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)
    mask = np.zeros(len(ids), bool)
    for start, end in spans:
        mask |= (offsets[:, 0] >= start) & (offsets[:, 0] < end) & (offsets[:, 1] > offsets[:, 0])
    return ids, mask


def prompt_ids(where: str, row: dict[str, Any], tok) -> list[int]:
    """The token ids of a prompt line (`prompt` text, tokenized as the tokenizer does by default, BOS included
    where it adds one; or chat `messages`, rendered with the generation prompt), as `minitron generate` feeds
    them to the model; `where` names the line in errors."""
    if ("prompt" in row) == ("messages" in row):
        raise DataError(f"{where} needs exactly one of 'prompt' (text) or 'messages' (a chat), has keys {sorted(row)}")
    if "prompt" in row:
        if not isinstance(row["prompt"], str):
            raise DataError(f"{where}: 'prompt' is a {type(row['prompt']).__name__}, not text")
        return list(tok(row["prompt"])["input_ids"])
    text = render(tok, check_messages(row["messages"], where, tok), add_generation_prompt=True)
    return list(tok(text, add_special_tokens=False)["input_ids"])
