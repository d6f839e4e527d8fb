"""The papers' architecture search with short distillation (run/search.py, `search:` in `minitron run`): the best
candidates after pruning are each distilled (online teacher by default, stored teacher logits as an option) and
re-ranked on validation rows, with paired bootstrap intervals to the winner."""

import json

import numpy as np
import pytest
from distill_helpers import make_pair


def small_search(tmp_path, *search):
    """A budget search over a tiny random pair: 3 candidates, the `search` keys given, 8 x 32-token steps."""
    from minitron_jax.model.config import LlamaConfig
    from minitron_jax.run.pipeline import load_pipeline

    teacher, _, data = make_pair(tmp_path / "pair", sharpen=4.0)
    budget = int(0.6 * LlamaConfig.from_file(teacher).param_count())
    out = tmp_path / "run"
    return load_pipeline(None, [f"teacher={teacher}", f"data={data}", "holdout=[tempest]", f"out={out}",
                                "score.samples=8", "score.seq_len=32", "score.batch_size=8", "prune.target=null",
                                f"prune.params={budget}", "prune.calib_samples=4", "search.candidates=3", *search,
                                "distill.batch_size=8", "distill.seq_len=32", "distill.steps=6", "distill.warmup=0",
                                "distill.peak_tflops=1", "distill.lr=1e-3"]), out


def test_search_distills_candidates_from_stored_logits_and_ranks_on_validation_rows(tmp_path, monkeypatch):
    import minitron_jax.eval.evaluate as E
    from minitron_jax.data.store_reader import VALIDATION, SplitMap
    from minitron_jax.data.token_store import open_store
    from minitron_jax.run.pipeline import Pipeline
    from minitron_jax.train.stored_logits import TeacherLogits

    cfg, out = small_search(tmp_path, "search.steps=4", "search.samples=6", "search.teacher_logits=true")
    seen = []
    for name in ("lm_loss", "row_losses"):
        real = getattr(E, name)
        monkeypatch.setattr(E, name, lambda p, c, rows, real=real, **kw: seen.append(np.asarray(rows)) or real(p, c, rows,
                                                                                                           **kw))
    logs = []
    info = Pipeline(cfg, log=logs.append).run(until="prune")

    store = TeacherLogits(out / "logits" / "store")  # one teacher pass: the search's 4 steps x 8 rows
    assert store.rows == 32 and store.k == 64
    rows = json.loads((out / "prune" / "search" / "search.json").read_text())
    assert len(rows) == 3
    assert sorted(r["rank_distilled"] for r in rows) == [1, 2, 3] == sorted(r["rank_pruned"] for r in rows)
    assert [r["rank_distilled"] for r in rows] == [1, 2, 3]
    assert all(r["rank_change"] == r["rank_pruned"] - r["rank_distilled"] for r in rows)
    assert all(a["validation_loss"] <= b["validation_loss"] for a, b in zip(rows, rows[1:]))
    assert all([s for s, _ in r["validation_curve"]] == [1, 2, 3, 4] for r in rows)
    for r in rows:  # each short run read the stored logits, never ran the teacher
        rec = json.loads(open(r["student"].replace("student_hf", "distill/recipe.json")).read())
        assert rec["teacher_logits"] == str(out / "logits" / "store") and rec["steps"] == 4
    assert info["target"] == rows[0]["spec"]  # the winner after distillation is the pruned student written
    report = json.loads((out / "prune" / "student_hf" / "prune_report.json").read_text())
    assert report["target"] == rows[0]["spec"] and report["search"][0]["rank_distilled"] == 1
    for f in ("search.md", "search.png"):
        assert (out / "prune" / "search" / f).is_file()
    # every row any ranking saw (after pruning and while distilling) comes from the validation documents
    st = open_store(out / "data" / "store")
    off = st.document_offsets()
    tokens = st.read(0, st.n_tokens)
    val = np.flatnonzero(SplitMap(st, Pipeline(cfg).splits()).of(np.arange(st.n_documents)) == VALIDATION)
    stream = np.concatenate([tokens[off[d]:off[d + 1]] for d in val]).tobytes()
    assert len(seen) >= 3 + 3 * 4
    for batch in seen:
        for r in batch:
            assert r.astype(np.uint32).tobytes() in stream
    # finished candidates keep their result, not their checkpoints; an interrupted search (here: the prune stage
    # not marked done, one candidate's result missing) reruns only that candidate and gives the same table
    for r in rows:
        d = out / "prune" / "search" / r["student"].split("/")[-2] / "distill"
        assert (d / "result.json").is_file() and not (d / "checkpoints").exists()
    (out / "prune" / "done.json").unlink()
    (out / "prune" / "search" / "candidate_1" / "distill" / "result.json").unlink()
    logs = []
    Pipeline(cfg, log=logs.append).run(until="prune")
    assert sum(m.startswith("[search ") for m in logs) == 1
    again = json.loads((out / "prune" / "search" / "search.json").read_text())
    assert [r["spec"] for r in again] == [r["spec"] for r in rows]
    for a, b in zip(again, rows):
        assert abs(a["validation_loss"] - b["validation_loss"]) <= 1e-6 * abs(b["validation_loss"])


def test_search_runs_the_distillation_objective_by_default_and_gives_intervals(tmp_path):
    """Without search.teacher_logits the short runs distil from the online teacher with the distill section's
    objective (no logits stage); the table gives each candidate's difference to the winner with a paired
    bootstrap interval over the search.samples validation rows, equal to one recomputed from the stored rows."""
    from minitron_jax.eval.bootstrap import paired_intervals
    from minitron_jax.run.pipeline import Pipeline

    cfg, out = small_search(tmp_path, "search.steps=3", "search.samples=10")
    Pipeline(cfg, log=lambda m: None).run(until="prune")
    assert not (out / "logits").exists()
    rows = json.loads((out / "prune" / "search" / "search.json").read_text())
    for r in rows:
        rec = json.loads(open(r["student"].replace("student_hf", "distill/recipe.json")).read())
        assert rec["teacher_logits"] is None and rec["top_k"] == cfg.distill.top_k and rec["steps"] == 3
        assert len(r["validation_nll"]) == 10 and r["validation_tokens"] == [31] * 10
        assert sum(r["validation_nll"]) / 310 == pytest.approx(r["validation_loss"], rel=1e-12)
    want = paired_intervals(np.array([r["validation_nll"] for r in rows]), np.array(rows[0]["validation_tokens"]), 0)
    np.testing.assert_allclose([r["vs_winner"] for r in rows], want, rtol=1e-12)
    assert rows[0]["vs_winner"] == [0.0, 0.0, 0.0] and all(r["vs_winner"][0] >= 0 for r in rows)
    md = (out / "prune" / "search" / "search.md").read_text()
    assert "95% paired bootstrap over 10 rows" in md
    assert f"{rows[1]['vs_winner'][0]:+.4f} [{rows[1]['vs_winner'][1]:+.4f}, {rows[1]['vs_winner'][2]:+.4f}]" in md
    warned = "WARNING: the winner is not separated" in md
    assert warned == (rows[1]["vs_winner"][1] <= 0)
    report = json.loads((out / "prune" / "student_hf" / "prune_report.json").read_text())
    assert report["search"][1]["vs_winner"] == rows[1]["vs_winner"]


def test_summary_warns_when_the_winner_is_not_separated():
    from minitron_jax.run.search import summary_text

    def rows(lo):
        return [{"spec": "a", "rank_pruned": 1, "rank_distilled": 1, "rank_change": 0, "vs_winner": [0, 0, 0],
                 "validation_tokens": [255] * 4},
                {"spec": "b", "rank_pruned": 2, "rank_distilled": 2, "rank_change": 0, "vs_winner": [0.01, lo, 0.02],
                 "validation_tokens": [255] * 4}]
    assert "WARNING: the winner is not separated from the runner-up `b`" in summary_text(rows(-0.001), 40)
    assert "[-0.0010, +0.0200]" in summary_text(rows(-0.001), 40)
    text = summary_text(rows(0.001), 40)
    assert "WARNING" not in text and "the winner is separated" in text


def test_more_validation_rows_than_the_documents_hold_is_refused_before_scoring(tmp_path):
    """search.samples beyond the validation documents' rows is refused after the data stage, before the score
    stage, naming the rows they hold (counted here from the documents themselves)."""
    from minitron_jax.core.errors import DataError
    from minitron_jax.data.store_reader import VALIDATION, SplitMap
    from minitron_jax.data.token_store import open_store
    from minitron_jax.model.config import LlamaConfig
    from minitron_jax.run.pipeline import Pipeline, load_pipeline

    teacher, _, data = make_pair(tmp_path / "pair", sharpen=4.0)
    budget = int(0.6 * LlamaConfig.from_file(teacher).param_count())
    out = tmp_path / "run"
    cfg = load_pipeline(None, [f"teacher={teacher}", f"data={data}", "holdout=[tempest]", f"out={out}",
                               "score.seq_len=32", "prune.target=null", f"prune.params={budget}",
                               "search.candidates=2", "search.samples=100000"])
    with pytest.raises(DataError) as e:
        Pipeline(cfg, log=lambda m: None).run(until="prune")
    st = open_store(out / "data" / "store")
    val = np.flatnonzero(SplitMap(st, Pipeline(cfg).splits()).of(np.arange(st.n_documents)) == VALIDATION)
    rows = sum(len(st.document(int(d))) for d in val) // 32
    assert f"the validation documents hold {rows} rows of score.seq_len=32" in str(e.value)
    assert "search.samples=100000" in str(e.value) and f"at most {rows}" in str(e.value)
    assert not (out / "score").exists()
