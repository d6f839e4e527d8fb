"""`minitron generate` (run/generate_job.py): the output JSONL, resuming past finished lines (and a partial last
line), and each refusal before any weights load. A tiny random Llama with SmolLM2's tokenizer (and chat
template) and a context of 64 positions."""

import json
import shutil

import pytest
from helpers import save_tiny

from minitron_jax.run.cli import main
from minitron_jax.run.generate_job import generate_file

LINES = [{"prompt": "To be, or not to be,", "id": 1},
         {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]},
         {"prompt": "Once"},
         {"messages": [{"role": "user", "content": "What is 2 + 2?"}]},
         {"prompt": "The sea"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok_dir):
    d = tmp_path_factory.mktemp("gen") / "model"
    save_tiny(d, vocab_size=49152, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, eos_token_id=2, bos_token_id=1)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tok_dir / f, d / f)
    return d


def write_lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def run(model_dir, prompts, out, *extra):
    main(["generate", "--model", str(model_dir), "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "5",
          "--batch-size", "2", "--mesh", "1,2,4", *extra])  # rows over 2 of the 8 devices (the default: all 8)


def test_output_lines_and_resume(model_dir, tmp_path, capsys):
    prompts = write_lines(tmp_path / "p.jsonl", LINES)
    out = tmp_path / "out.jsonl"
    run(model_dir, prompts, out, "--stop-ids", "7")
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 5 and summary["skipped"] == 0 and 2 in summary["stop_ids"] and 7 in summary["stop_ids"]
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(got) == 5
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    for inp, row in zip(LINES, got):
        assert {k: row[k] for k in inp} == inp  # the input, unchanged
        assert set(row) == set(inp) | {"response", "prompt_tokens", "response_tokens", "finish_reason", "response_ids"}
        assert isinstance(row["response"], str) and row["prompt_tokens"] > 0
        assert len(row["response_ids"]) == row["response_tokens"]
        # the text is the ids decoded, the stop token (the last id when finish_reason is stop) left out
        text_ids = row["response_ids"][:-1] if row["finish_reason"] == "stop" else row["response_ids"]
        assert row["response"] == tok.decode(text_ids, skip_special_tokens=True)
        assert row["finish_reason"] in ("stop", "length")
        assert row["response_tokens"] == 5 or row["finish_reason"] == "stop"
    chat = tok.apply_chat_template(LINES[1]["messages"], add_generation_prompt=True, tokenize=False)
    assert chat.endswith("<|im_start|>assistant\n")
    assert got[1]["prompt_tokens"] == len(tok(chat, add_special_tokens=False)["input_ids"])
    assert got[0]["prompt_tokens"] == len(tok(LINES[0]["prompt"])["input_ids"])

    # a crash after two batches, in the middle of writing the next line: that partial line is dropped
    full = out.read_text().splitlines(keepends=True)
    out.write_text("".join(full[:4]) + full[4][:10])
    run(model_dir, prompts, out, "--stop-ids", "7")
    assert json.loads(capsys.readouterr().out)["skipped"] == 4
    assert out.read_text() == "".join(full)  # greedy: the same last line
    run(model_dir, prompts, out, "--stop-ids", "7")  # all done: nothing generated, the file unchanged
    assert json.loads(capsys.readouterr().out)["generated_tokens"] == 0 and out.read_text() == "".join(full)


def test_sampled_lines_do_not_depend_on_the_batch(model_dir, tmp_path):
    prompts = write_lines(tmp_path / "p.jsonl", LINES)
    kw = dict(max_new_tokens=6, seed=5, log=lambda m: None)
    from minitron_jax.eval.sampling import Sampling
    s = Sampling(temperature=1.0, top_p=0.9)
    generate_file(model_dir, prompts, tmp_path / "a.jsonl", sampling=s, batch_size=2, **kw)
    generate_file(model_dir, prompts, tmp_path / "b.jsonl", sampling=s, batch_size=5, **kw)
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()


@pytest.mark.parametrize("lines,match", [
    ([{"messages": [{"role": "wizard", "content": "hi"}]}], r"p.jsonl:1: message 0 has role 'wizard'; roles are"),
    ([{"prompt": "a"}, "{not json"], r"p.jsonl:2 is not valid JSON"),
    ([{"prompt": "a", "messages": []}], r"p.jsonl:1 needs exactly one of 'prompt'"),
    ([{"text": "a"}], r"p.jsonl:1 needs exactly one of 'prompt'"),
    ([{"prompt": "a"}, {"prompt": "word " * 70}], r"p.jsonl:2: the prompt has \d+ tokens, and with --max-new-tokens 5 "
     r"that is over the model's context of 64 positions"),
    ([{"prompt": ""}], r"p.jsonl:1: the prompt has no tokens"),
    ([], r"p.jsonl holds no prompts"),
])
def test_refusals_before_any_weights_load(model_dir, tmp_path, no_weight_reads, lines, match):
    prompts = write_lines(tmp_path / "p.jsonl", lines) if lines else tmp_path / "p.jsonl"
    if not lines:
        prompts.write_text("\n")
    with pytest.raises(SystemExit, match=r"^minitron generate: .*" + match):
        run(model_dir, prompts, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_chat_without_a_template_and_foreign_output_are_refused(model_dir, tmp_path, no_weight_reads):
    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare)
    (bare / "chat_template.jinja").unlink()
    prompts = write_lines(tmp_path / "p.jsonl", LINES)
    with pytest.raises(SystemExit, match=r"p.jsonl:2 is a chat \('messages'\) but the model's tokenizer has no chat "
                       "template"):
        run(bare, prompts, tmp_path / "out.jsonl")
    other = write_lines(tmp_path / "other.jsonl", [{"prompt": "something else", "response": "x"}])
    with pytest.raises(SystemExit, match=r"other.jsonl:1 does not answer line 1 of .*p.jsonl"):
        run(model_dir, prompts, other)
    with pytest.raises(SystemExit, match="--top-p 0.0: give a probability"):
        run(model_dir, prompts, tmp_path / "out.jsonl", "--top-p", "0")
    # rows that do not split over the mesh's data x fsdp devices would be replicated on each
    with pytest.raises(SystemExit, match=r"^minitron generate: --batch-size 2 does not split over the mesh's data x "
                                         r"fsdp = 8 devices .*give a multiple of 8, e.g. 8$"):
        run(model_dir, prompts, tmp_path / "out.jsonl", "--mesh", "1,8,1")
    assert not (tmp_path / "out.jsonl").exists()


def test_two_processes_generate_what_one_does(model_dir, tmp_path):
    """`minitron generate` as 2 processes x 2 devices (rows split over all 4, sampled) writes, through process 0,
    the lines 1 process x 4 devices writes."""
    from distill_helpers import run_cli, two_processes
    prompts = write_lines(tmp_path / "p.jsonl", LINES)
    argv = ["generate", "--model", str(model_dir), "--prompts", str(prompts), "--max-new-tokens", "5",
            "--batch-size", "4", "--temperature", "0.8", "--seed", "3"]
    run_cli([*argv, "--out", str(tmp_path / "one.jsonl")], devices=4)
    done = two_processes(["-m", "minitron_jax.run.cli"], [*argv, "--out", str(tmp_path / "two.jsonl")], devices=2)
    assert [d.returncode for d in done] == [0, 0], done[0].stderr[-3000:] + done[1].stderr[-3000:]
    one, two = ((tmp_path / f"{n}.jsonl").read_text() for n in ("one", "two"))
    assert one == two and len(one.splitlines()) == len(LINES)


def test_model_prompts_and_output_in_cloud_storage(model_dir, tmp_path, gs_dir):
    """Issue 22: model, prompts and output on gs:// (the emulator) give the local run's file, and a rerun over an
    output that answers the first lines (a stopped run's last upload) generates only the rest."""
    from helpers import upload

    from minitron_jax.core import storage

    prompts = write_lines(tmp_path / "p.jsonl", LINES)
    kw = dict(max_new_tokens=5, batch_size=2, log=lambda m: None)
    generate_file(model_dir, prompts, tmp_path / "out.jsonl", **kw)
    want = (tmp_path / "out.jsonl").read_text()
    model, out = upload(model_dir, f"{gs_dir}/model"), f"{gs_dir}/gen/out.jsonl"
    (storage.path(gs_dir) / "p.jsonl").write_bytes(prompts.read_bytes())
    s = generate_file(model, f"{gs_dir}/p.jsonl", out, **kw)
    assert s["skipped"] == 0 and storage.path(out).read_text() == want
    storage.path(out).write_text("".join(want.splitlines(keepends=True)[:3]))
    s = generate_file(model, f"{gs_dir}/p.jsonl", out, **kw)
    assert s["skipped"] == 3 and storage.path(out).read_text() == want
