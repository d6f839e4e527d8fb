"""Chat conversations (data/chat.py): the assistant-token mask derived from the rendered template (no
`{% generation %}` markers) covers exactly each assistant turn's content and its end-of-turn marker, on two
templates (SmolLM2's ChatML and a Llama-3 style one), and never a user or system token; bad chats are refused."""

import copy

import pytest

from minitron_jax.core.errors import DataError
from minitron_jax.data.chat import tokenize_chat

LLAMA3_STYLE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
                "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
# the end each template closes an assistant turn with
ENDS = {"chatml": "<|im_end|>\n", "llama3": "<|eot_id|>"}
CHAT = [{"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "parrot parrot parrot parrot"},
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "user", "content": "parrot parrot"},
        {"role": "assistant", "content": "Forty-two, as always."}]


@pytest.fixture(scope="module", params=sorted(ENDS))
def tok(request):
    from transformers import AutoTokenizer

    from minitron_jax.core.assets import fetch_smollm2
    t = AutoTokenizer.from_pretrained(fetch_smollm2())
    if request.param == "llama3":  # its markers are special tokens, as in Llama-3's own tokenizer
        t = copy.deepcopy(t)
        t.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
        t.chat_template = LLAMA3_STYLE
    return request.param, t


def test_mask_is_the_assistant_turns_exactly(tok):
    name, t = tok
    ids, mask = tokenize_chat(t, CHAT, "chat.jsonl:1")
    assert len(ids) == len(mask) and ids.tolist() == t(t.apply_chat_template(CHAT, tokenize=False),
                                                          add_special_tokens=False)["input_ids"]
    want = "".join(m["content"] + ENDS[name] for m in CHAT if m["role"] == "assistant")
    assert t.decode(ids[mask].tolist()) == want
    # every other token is the template, the system prompt or the user's: none of it is trained on
    rest = t.decode(ids[~mask].tolist())
    assert rest.count("parrot") == 6 and "You answer briefly." in rest and "Paris" not in rest


@pytest.mark.parametrize("msgs,match", [
    ([{"role": "robot", "content": "hi"}], r"chat.jsonl:3: message 0 has role 'robot'; roles are system, user"),
    ([{"role": "user"}], r"message 0 must be an object with a text 'content'"),
    ([], r"'messages' must be a non-empty list")])
def test_bad_chats_are_refused(tok, msgs, match):
    with pytest.raises(DataError, match=match):
        tokenize_chat(tok[1], msgs, "chat.jsonl:3")


def test_tokenizer_without_template_and_unstable_template_are_refused(tok):
    t = copy.deepcopy(tok[1])
    t.chat_template = None
    with pytest.raises(DataError, match="has no chat template"):
        tokenize_chat(t, CHAT, "c.jsonl:1")
    t.chat_template = "{% for m in messages | reverse %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(DataError, match=r"c.jsonl:1: the chat template renders message 2 \(assistant\)"):
        tokenize_chat(t, CHAT, "c.jsonl:1")
