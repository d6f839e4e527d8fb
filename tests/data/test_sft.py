"""SFT examples (data/sft.py): a chat trains on its assistant turns, a prompt/response line (minitron generate's
output) on the response only, tokenized as generate tokenized the prompt and with the teacher's own token ids when
the line has them; examples are packed first-fit with segment ids and a loss mask, cut to seq_len, held out by a
seeded fraction; bad lines are refused naming the file and line."""

import json

import numpy as np
import pytest

from minitron_jax.core.errors import DataError
from minitron_jax.data.chat import prompt_ids, tokenize_chat
from minitron_jax.data.sft import Example, example, pack_examples, read_examples, sft_corpus

CHAT = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Green, like grass."}]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from minitron_jax.core.assets import fetch_smollm2
    return AutoTokenizer.from_pretrained(fetch_smollm2())


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_chat_trains_on_assistant_turns(tok):
    ex = example("c.jsonl", 1, {"messages": CHAT}, tok)
    ids, mask = tokenize_chat(tok, CHAT, "c.jsonl:1")
    assert ex.ids.tolist() == ids.tolist() and ex.loss.tolist() == mask.tolist()
    assert tok.decode(ex.ids[ex.loss].tolist()) == "Blue.<|im_end|>\nGreen, like grass.<|im_end|>\n"


def test_prompt_response_trains_on_the_response_tokens(tok):
    # text prompt, text response that stopped: prompt tokens as `generate` feeds them, then the response + eos
    row = {"prompt": "Once upon a time", "response": " there was a king.", "finish_reason": "stop"}
    ex = example("r.jsonl", 2, row, tok)
    p = tok("Once upon a time")["input_ids"]
    r = tok(" there was a king.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex.ids.tolist() == p + r and ex.loss.tolist() == [False] * len(p) + [True] * len(r)
    # the teacher's own ids win over the text (re-tokenizing need not give the same ids); "length": no eos added
    ex = example("r.jsonl", 3, {**row, "finish_reason": "length", "response_ids": [5, 6, 7]}, tok)
    assert ex.ids.tolist() == p + [5, 6, 7] and ex.loss.sum() == 3
    # a chat prompt: rendered with the generation prompt, as generate did
    chat = {"messages": CHAT[:3], "response": "Red.", "response_ids": [9, 10]}
    ex = example("r.jsonl", 4, chat, tok)
    assert ex.ids.tolist() == prompt_ids("x", {"messages": CHAT[:3]}, tok) + [9, 10]
    assert tok.decode(ex.ids[:-2].tolist()).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("row,match", [
    ({"text": "x"}, r"r.jsonl:7 has keys \['text'\]; an SFT line needs 'messages'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, r"r.jsonl:7: the chat has no assistant message"),
    ({"prompt": "hi", "response": 3}, r"r.jsonl:7: 'response' is a int, not text"),
    ({"prompt": "hi", "response": "", "finish_reason": "length"}, r"r.jsonl:7: the response has no tokens"),
    ({"prompt": "hi", "response": "x", "response_ids": ["a"]}, r"'response_ids' must be a list of token ids"),
    ({"prompt": "hi", "messages": CHAT, "response": "x"}, r"needs exactly one of 'prompt' \(text\) or 'messages'"),
])
def test_bad_lines_are_refused(tok, row, match):
    with pytest.raises(DataError, match=match):
        example("r.jsonl", 7, row, tok)


def test_files_are_checked(tok, tmp_path):
    with pytest.raises(DataError, match="holds no examples"):
        read_examples(write(tmp_path / "empty.jsonl", []), tok)
    with pytest.raises(DataError, match="is not a file; SFT data is one JSONL file"):
        read_examples(tmp_path, tok)
    with pytest.raises(DataError, match=r"big.jsonl:1: the largest token id 99,999 is outside the model.s vocabulary"):
        read_examples(write(tmp_path / "big.jsonl", [{"prompt": "a", "response": "b", "response_ids": [99999]}]), tok,
                      vocab_size=49152)


def test_packing_keeps_examples_apart_and_counts_cuts():
    rng = np.random.default_rng(0)
    lens = [5, 9, 3, 12, 7, 20, 2]
    exs = [Example(rng.integers(10, 100, n).astype(np.int32), (rng.random(n) < 0.5) | (np.arange(n) == 1))
           for n in lens]  # each trains on its second token at least
    exs[6] = Example(np.array([1, 2], np.int32), np.array([True, False]))  # only its first token: nothing to predict
    rows, stats = pack_examples(exs, seq_len=16, seed=0, pad_id=0)
    assert stats == {"examples": 6, "truncated": 1, "dropped": 1,
                     "loss_tokens": int(sum(e.loss[1:16].sum() for e in exs[:6]))}
    # every kept example (the 20-token one cut to 16) is one segment of one row, in order, with its own mask
    seen = []
    for r in range(len(rows)):
        item = rows[r]
        assert item["mask"].tolist() == (item["segment_ids"] > 0).tolist()
        for s in range(1, item["segment_ids"].max() + 1):
            at = item["segment_ids"] == s
            seen.append((item["input_ids"][at].tolist(), item["loss_mask"][at].astype(bool).tolist()))
        assert item["loss_mask"][item["segment_ids"] == 0].sum() == 0
    want = [(e.ids[:16].tolist(), e.loss[:16].tolist()) for e in exs[:6]]
    assert sorted(seen) == sorted(want)
    assert len(rows) == 4  # first-fit-decreasing of 16, 12, 9, 7, 5, 3 into 16: [16] [12, 3] [9, 7] [5]


def test_corpus_holds_out_a_seeded_fraction(tok, tmp_path):
    lines = [{"prompt": f"Question {i}?", "response": f"Answer {i}.", "finish_reason": "stop"} for i in range(20)]
    path = write(tmp_path / "qa.jsonl", lines)
    train, held = sft_corpus(path, tok, 64, holdout_fraction=0.2, split_seed=3)
    again = sft_corpus(path, tok, 64, holdout_fraction=0.2, split_seed=3)[1]
    other = sft_corpus(path, tok, 64, holdout_fraction=0.2, split_seed=4)[1]

    def answers(rows):
        return {a for r in range(len(rows)) for a in range(20)
                if f"Answer {a}." in tok.decode(rows[r]["input_ids"][rows[r]["loss_mask"] > 0].tolist())}

    assert len(answers(held)) == 4 and answers(held) == answers(again) and answers(held) != answers(other)
    assert answers(train) == set(range(20)) - answers(held)
    with pytest.raises(DataError, match=r"none of its 20 training examples has a trained token within seq_len=4"):
        sft_corpus(path, tok, 4)
