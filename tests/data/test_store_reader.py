"""Training from token stores (data/store_reader.py): windows, splits, first_fit blocks, blends, and the
Loader over them (resume, process slices). The token-store fixtures (`store`, `store_b`, `corpus`) are in
conftest.py; the runs that read stores are tested with their modules (train/test_trainer.py,
run/test_prune_job.py, eval/test_evaluate.py)."""

import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from helpers import store_reference

from minitron_jax.core.errors import DataError
from minitron_jax.data import store_reader as SL
from minitron_jax.data import text as D
from minitron_jax.data.loader import Loader, build_corpus
from minitron_jax.data.token_store import open_store

S = 64


def _batches(loader, steps):
    return [loader.batch_at(t) for t in range(steps)]


def test_concat_loader_with_held_out_documents_equals_the_text_loader(corpus, store, tokenizer):
    """Held-out documents by name: the store's training rows are the text path's (build_corpus packs the
    training documents alone), batch for batch."""
    st = open_store(store)
    names = [n for n in st.names(0, st.n_documents) if "doc03" in n or "doc1" in n]
    train, held = build_corpus(corpus, tokenizer, S, holdout=names)
    rows, _ = SL.training_rows(str(store), S, splits=SL.Splits(tuple(names)))
    assert held is not None and len(rows) == len(train)
    a, b = (Loader(r, 8, seed=5, process_index=0, process_count=1) for r in (train, rows))
    for x, y in zip(_batches(a, a.steps_per_epoch + 2), _batches(b, a.steps_per_epoch + 2)):
        for k in ("input_ids", "segment_ids", "mask"):
            np.testing.assert_array_equal(x[k], y[k])


def test_concat_loader_equals_todays_loader(corpus, store, tokenizer):
    """One store, concat packing, no split: the same global batches as build_corpus + Loader on the text."""
    train, held = build_corpus(corpus, tokenizer, S)
    rows, stream = SL.training_rows(str(store), S)
    assert held is None and not stream and len(rows) == len(train)
    a, b = Loader(train, 8, seed=5, process_index=0, process_count=1), Loader(rows, 8, seed=5, process_index=0,
                                                                              process_count=1)
    steps = 3 * a.steps_per_epoch + 2  # across epoch boundaries (reshuffled each epoch)
    for x, y in zip(_batches(a, steps), _batches(b, steps)):
        for k in ("input_ids", "segment_ids", "mask"):
            np.testing.assert_array_equal(x[k], y[k])


def test_splits_are_disjoint_and_windows_train_only_on_training_documents(store):
    """Issue 26: windows over the store with the other splits' documents masked in place lost 7-8% of the main
    job's targets; they are cut from the training documents alone."""
    st, off, tokens, doc_of = store_reference(store)
    for splits in (SL.Splits((), 0.2, 0.2, seed=3), SL.Splits(("doc03", "doc1"), 0.0, 0.3, seed=1)):
        sm = SL.SplitMap(st, splits)
        of = sm.of(np.arange(st.n_documents))
        held, val, train = (set(np.flatnonzero(of == s).tolist()) for s in (SL.HOLDOUT, SL.VALIDATION, SL.TRAIN))
        assert held and val and train and not (held & val) and not (held & train) and not (val & train)
        assert len(held | val | train) == st.n_documents and sm.counts() == [len(train), len(val), len(held)]
        if splits.holdout:  # the named documents (doc03, doc1x) and nothing else
            names = st.names(0, st.n_documents)
            assert held == {i for i, n in enumerate(names) if "doc03" in n or "doc1" in n}
        # training windows: the training documents only, concatenated in store order and cut (data.pack), so
        # every token of every row is one to train on; read through blocks of 2 documents (KeptTokens' block
        # boundaries inside rows and runs of kept documents across blocks)
        train_docs = [tokens[off[d]:off[d + 1]].astype(np.int32) for d in sorted(train)]
        want = D.pack(train_docs, S, None, shuffle_documents=False)
        for block in (4096, 2):
            w = SL.StoreWindows(st, S, sm)
            if block != 4096:
                w.kept = SL.KeptTokens(st, sm, SL.TRAIN, block=block, cache=2)
            assert len(w) == len(want) > 0
            for i in range(len(w)):
                r = w[i]
                np.testing.assert_array_equal(r["input_ids"], want[i])
                assert (r["mask"] == 1).all() and (r["segment_ids"] == 1).all()
        # evaluation rows: the held-out documents in a seeded order, concatenated and cut (as data.pack does)
        held_docs = [tokens[off[d]:off[d + 1]].astype(np.int32) for d in sorted(held)]
        n = sum(map(len, held_docs)) // S
        np.testing.assert_array_equal(SL.split_rows(str(store), S, n, SL.HOLDOUT, splits, seed=6),
                                      D.pack(held_docs, S, None, seed=6))
        # calibration rows of the validation split = data.pack over those documents, as load_samples packs
        val_docs = [tokens[off[d]:off[d + 1]].astype(np.int32) for d in sorted(val)]
        k = sum(map(len, val_docs)) // S // 2
        np.testing.assert_array_equal(SL.calibration_rows(str(store), k, S, seed=4, split=SL.VALIDATION, splits=splits),
                                      D.pack(val_docs, S, k, seed=4))


def test_tiny_fractions_take_one_document_and_empty_splits_are_refused(store):
    st = open_store(store)
    u = SL._uniform(9, np.arange(st.n_documents))
    sm = SL.SplitMap(st, SL.Splits((), 1e-9, 1e-9, seed=9))  # the hash test selects nothing: one document each
    of = sm.of(np.arange(st.n_documents))
    first, second = np.argsort(u)[:2]
    assert sm.counts()[1:] == [1, 1] and of[first] == SL.HOLDOUT and of[second] == SL.VALIDATION
    with pytest.raises(DataError, match="train split"):  # every document is named: nothing left to train on
        SL.SplitMap(st, SL.Splits(("doc",))).check([SL.TRAIN])
    with pytest.raises(DataError, match="leaves no training"):
        SL.Splits((), 0.6, 0.5)


def test_first_fit_stream_packs_each_training_piece_once_per_epoch(store):
    st, off, tokens, doc_of = store_reference(store)
    splits = SL.Splits((), 0.25, 0.0, seed=2)
    sm = SL.SplitMap(st, splits)
    of = sm.of(np.arange(st.n_documents))
    pieces = Counter(tuple(tokens[k:min(k + S, off[d + 1])].tolist()) for d in np.flatnonzero(of == SL.TRAIN)
                     for k in range(off[d], off[d + 1], S))
    ff = SL.FirstFitStream(st, S, sm, seed=7, block_tokens=1024)
    assert ff.n_blocks > 5
    per_epoch = sum(ff._count(0, b) for b in range(ff.n_blocks))
    rows = [ff[g] for g in range(2 * per_epoch)]
    for epoch in (0, 1):
        found = Counter()
        for r in rows[epoch * per_epoch:(epoch + 1) * per_epoch]:
            seg = r["segment_ids"]
            k = int((seg > 0).sum())
            assert (seg[:k] > 0).all() and (seg[k:] == 0).all() and (r["mask"] == (seg > 0)).all()
            for s in range(1, seg[k - 1] + 1):
                found[tuple(r["input_ids"][seg == s].tolist())] += 1
        assert found == pieces  # every piece of every training document exactly once, tokens in order
    assert any((x["input_ids"] != y["input_ids"]).any() for x, y in zip(rows[:per_epoch], rows[per_epoch:]))
    fresh = SL.FirstFitStream(st, S, sm, seed=7, block_tokens=1024)  # random access, backwards: same rows
    for g in range(2 * per_epoch - 1, -1, -7):
        np.testing.assert_array_equal(fresh[g]["input_ids"], rows[g]["input_ids"])


@pytest.mark.parametrize("packing", ["concat", "first_fit"])
def test_loader_over_stores_resumes_and_splits_over_processes(store, store_b, packing):
    blend = {str(store): 0.3, str(store_b): 0.7}
    splits = SL.Splits((), 0.1, 0.1, seed=0)

    def rows_of(data, block_tokens=1024):
        return SL.training_rows(data, S, packing=packing, splits=splits, seed=3, block_tokens=block_tokens)[0]
    for data in (str(store), blend):
        rows, stream = SL.training_rows(data, S, packing=packing, splits=splits, seed=3, block_tokens=1024)
        full = Loader(rows, 8, seed=3, process_index=0, process_count=1, stream=stream)
        want = [next(full) for _ in range(9)]
        state = json.loads(json.dumps(full.get_state()))
        want += [next(full) for _ in range(3)]
        for p in (0, 1):  # process slices of the same global batches
            part = Loader(rows_of(data), 8, seed=3, process_index=p, process_count=2, stream=stream)
            for t in (0, 4, 8):
                np.testing.assert_array_equal(part.batch_at(t)["input_ids"], want[t]["input_ids"][p * 4:(p + 1) * 4])
        resumed = Loader(rows_of(data), 8, seed=3, process_index=0, process_count=1, stream=stream)
        resumed.set_state({**state, "step": 5})  # a cursor past step 5's rows is not used: the walk restarts
        for t in range(5, 12):
            np.testing.assert_array_equal(next(resumed)["segment_ids"], want[t]["segment_ids"])
            np.testing.assert_array_equal(resumed.batch_at(t)["input_ids"], want[t]["input_ids"])
        fresh = rows_of(data)
        cont = Loader(fresh, 8, seed=3, process_index=0, process_count=1, stream=stream)
        cont.set_state(state)  # step 9, with the block cursors: the blocks before them are not laid out again
        for t in range(9, 12):
            np.testing.assert_array_equal(next(cont)["input_ids"], want[t]["input_ids"])
        if packing == "first_fit":
            for st, (epoch, pos, _) in zip(fresh.streams, state["cursors"]):  # the blocks walked past before
                before = set(st._order(0)[:pos].tolist()) if epoch == 0 else set(range(st.n_blocks))
                assert before and not any(e == 0 and b in before for e, b in st._counts)
            with pytest.raises(DataError, match="rows"):  # another layout is another order: refused on resume
                Loader(rows_of(data, 2048), 8, seed=3, process_index=0, process_count=1, stream=True).set_state(state)


def test_blend_proportions_and_determinism(store, store_b):
    sa, sb = (SL.StoreWindows(open_store(s), S) for s in (store, store_b))
    from_a = {sa[i]["input_ids"].tobytes() for i in range(len(sa))}
    from_b = {sb[i]["input_ids"].tobytes() for i in range(len(sb))}
    assert not from_a & from_b
    blend = {str(store): 0.3, str(store_b): 0.7}
    mixed, stream = SL.training_rows(blend, S, seed=1)
    assert stream
    n = 10_000
    src = []
    for g in range(n):
        b = mixed[g]["input_ids"].tobytes()
        assert (b in from_a) != (b in from_b)
        src.append(b in from_a)
    share = np.mean(src)
    assert abs(share - 0.3) < 3 * np.sqrt(0.3 * 0.7 / n), share  # 3 sigma of a binomial over 10k windows
    again, _ = SL.training_rows({str(store_b): 7, str(store): 3}, S, seed=1)  # weights normalized; same order
    twice, _ = SL.training_rows(blend, S, seed=1)
    for g in range(0, n, 97):
        np.testing.assert_array_equal(twice[g]["input_ids"], mixed[g]["input_ids"])
    assert again.identity != mixed.identity  # the order of the components is part of the data order
    with pytest.raises(DataError, match="positive number"):
        SL.parse_blend({str(store): 0.0, str(store_b): 1})
    with pytest.raises(DataError, match="not a token store"):
        SL.parse_blend({str(store): 1, "/nonexistent/text": 1})


def test_blend_evaluation_rows_never_allocate_a_negative_count(store, store_b, tmp_path):
    """Four stores weighted .3/.3/.3/.1 share 2 rows as largest-remainder rounding does: 1, 1, 0, 0 (per-store
    rounding gave 1, 1, 1 and -1 to the last). Each store's rows are its own first rows."""
    copies = [tmp_path / "a2", tmp_path / "b2"]  # the same stores under other names: four blend components
    copies[0].symlink_to(store, target_is_directory=True)
    copies[1].symlink_to(store_b, target_is_directory=True)
    blend = {str(store): 0.3, str(store_b): 0.3, str(copies[0]): 0.3, str(copies[1]): 0.1}
    assert SL.apportion(2, list(blend.values())).tolist() == [1, 1, 0, 0]
    got = SL.split_rows(blend, S, 2, SL.TRAIN, SL.Splits(), seed=2)
    want = [SL.split_rows(str(s), S, 1, SL.TRAIN, SL.Splits(), seed=2) for s in (store, store_b)]
    np.testing.assert_array_equal(got, np.concatenate(want))


def _largest_remainder(total, w):
    """The Hamilton apportionment, derived again: floors of the quotas, then one more to the `total - sum`
    largest remainders (ties: the earlier index)."""
    quota = total * np.asarray(w, float) / np.sum(w)
    base = np.floor(quota).astype(int)
    winners = np.lexsort((np.arange(len(w)), -(quota - base)))[:total - base.sum()]
    return base + np.isin(np.arange(len(w)), winners)


def test_apportion_equals_largest_remainder_rounding_over_random_weights():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        w = rng.exponential(size=rng.integers(1, 9)) ** rng.choice([1, 3])  # some very uneven
        total = int(rng.integers(0, 60))
        got = SL.apportion(total, w)
        assert got.sum() == total and (got >= 0).all(), (total, w, got)
        assert (np.abs(got - total * w / w.sum()) < 1).all(), (total, w, got)
        np.testing.assert_array_equal(got, _largest_remainder(total, w))
    assert SL.apportion(3, [1, 1, 1, 1]).tolist() == [1, 1, 1, 0]  # ties: the earlier stores
    assert SL.apportion(10, [0.25, 0.75]).tolist() == [3, 7]  # 2.5 / 7.5: the tie to the first


PROC = r"""
import json, sys
import numpy as np
from minitron_jax.data import store_reader as SL
from minitron_jax.data.loader import Loader
data, p, out = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rows, stream = SL.training_rows(data, 64, packing="first_fit", splits=SL.Splits((), 0.1, 0.1), seed=3)
loader = Loader(rows, 8, seed=3, process_index=p, process_count=2, stream=stream)
np.save(out, np.stack([next(loader)["input_ids"] for _ in range(6)]))
"""


def test_two_processes_read_their_slices_of_the_same_global_batches(store, store_b, tmp_path):
    blend = {str(store): 0.5, str(store_b): 0.5}
    procs = [subprocess.Popen([sys.executable, "-c", PROC, json.dumps(blend), str(p), str(tmp_path / f"p{p}.npy")])
             for p in (0, 1)]
    assert [pr.wait(timeout=300) for pr in procs] == [0, 0]
    rows, stream = SL.training_rows(blend, S, packing="first_fit", splits=SL.Splits((), 0.1, 0.1), seed=3)
    one = Loader(rows, 8, seed=3, process_index=0, process_count=1, stream=stream)
    want = np.stack([next(one)["input_ids"] for _ in range(6)])
    got = np.concatenate([np.load(tmp_path / "p0.npy"), np.load(tmp_path / "p1.npy")], axis=1)
    np.testing.assert_array_equal(got, want)
