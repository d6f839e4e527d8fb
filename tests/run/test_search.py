"""The papers' architecture search with short distillation (run/search.py, `search:` in `minitron run`): the best
candidates after pruning are each distilled from stored teacher logits and re-ranked on validation rows."""

import json

import numpy as np
from distill_helpers import make_pair


def test_search_distills_candidates_from_stored_logits_and_ranks_on_validation_rows(tmp_path, monkeypatch):
    import minitron_jax.eval.evaluate as E
    from minitron_jax.data.store_reader import VALIDATION, SplitMap
    from minitron_jax.data.token_store import open_store
    from minitron_jax.model.config import LlamaConfig
    from minitron_jax.run.pipeline import Pipeline, load_pipeline
    from minitron_jax.train.stored_logits import TeacherLogits

    teacher, _, data = make_pair(tmp_path / "pair", sharpen=4.0)
    budget = int(0.6 * LlamaConfig.from_file(teacher).param_count())
    out = tmp_path / "run"
    cfg = load_pipeline(None, [f"teacher={teacher}", f"data={data}", "holdout=[tempest]", f"out={out}",
                               "score.samples=8", "score.seq_len=32", "score.batch_size=4", "prune.target=null",
                               f"prune.params={budget}", "prune.calib_samples=4", "search.candidates=3",
                               "search.steps=4", "distill.batch_size=8", "distill.seq_len=32", "distill.steps=6",
                               "distill.warmup=0", "distill.peak_tflops=1", "distill.lr=1e-3"])
    seen = []
    real = E.lm_loss
    monkeypatch.setattr(E, "lm_loss", lambda p, c, rows, **kw: seen.append(np.asarray(rows)) or real(p, c, rows, **kw))
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
