"""A CI-sized `minitron run` (run/pipeline.py): tiny random teacher, a few steps. The exported student loads in
transformers with logits equal to the JAX student's, every stage leaves its output, and a re-run
resumes (skips finished stages)."""

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from distill_helpers import make_pair
from helpers import rel_err
from transformers import AutoModelForCausalLM

import minitron_jax as mj
from minitron_jax.core.errors import RecipeError
from minitron_jax.run.cli import main


def test_tiny_pipeline_end_to_end(tmp_path, capsys):
    teacher, _, data = make_pair(tmp_path / "pair", sharpen=4.0)
    out = tmp_path / "run"
    args = ["run", f"teacher={teacher}", f"data={data}", "holdout=[tempest]", f"out={out}",
            "score.samples=8", "score.seq_len=64", "prune.target=hidden_size=54,intermediate_size=64",
            "distill.steps=4", "distill.warmup=0", "distill.batch_size=4", "distill.seq_len=64", "distill.eval_every=2",
            "distill.save_every=2", "distill.mesh=[1,1,8]", "distill.peak_tflops=1",
            "eval.samples=4", "eval.seq_len=64", "eval.task_items=8"]
    main(args)
    printed = capsys.readouterr().out
    results = json.loads((out / "evaluate" / "done.json").read_text())
    assert {"teacher", "pruned", "distilled"} <= set(results)
    assert results["pruned"]["params"] == results["distilled"]["params"] < results["teacher"]["params"]
    assert results["distilled"]["distill_tokens"] == 4 * 4 * 64
    assert (out / "score" / "scores.png").exists() and (out / "report" / "loss_curves.png").exists()
    store = out / "data" / "store"  # the data stage tokenized the text; distillation read the store
    assert (store / "manifest.json").exists() and json.loads((out / "distill" / "recipe.json").read_text())["data"] == str(store)
    report = (out / "report" / "report.md").read_text()
    assert "| distilled |" in report and "| distilled |" in printed
    t, p, d = (results[k]["held_out_loss"] for k in ("teacher", "pruned", "distilled"))
    assert "| gap closed |" in report and f"| {(p - d) / (p - t):.1%} |" in report  # (pruned - x) / (pruned - teacher)
    assert f"gap closed {(p - d) / (p - t):.1%}" in printed and "s wall time" in printed
    sample = json.loads((out / "report" / "done.json").read_text())["sample"]
    assert sample.startswith("To be, or not to be,") and sample in report  # transformers generated from the export

    student = out / "distill" / "student_hf"
    hf = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
    ids = np.random.RandomState(0).randint(0, 512, (1, 24))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    assert rel_err(mj.from_pretrained(student)(ids), ref) <= 1e-5
    assert hf.generate(torch.tensor(ids[:, :4]), max_new_tokens=5, do_sample=False).shape == (1, 9)

    main(args)  # a second run finds every stage done
    again = capsys.readouterr().out
    assert again.count("done earlier") == 6


def test_pipeline_depth_targets_score_what_they_need(tmp_path):
    """A target with depth_metric=loss (or window) makes the score stage compute per-layer (per-block) LM
    losses; they equal the loss of the model with that layer (block) really removed, and the pruned
    student is exactly the teacher minus the lowest-scoring layers. `until=prune` stops before training."""
    from transformers import AutoTokenizer

    from minitron_jax.data.text import load_samples
    from minitron_jax.eval.evaluate import lm_loss
    from minitron_jax.prune.importance import load_scores
    from minitron_jax.prune.pruning import prune
    from minitron_jax.run.pipeline import Pipeline, PruneSettings, load_pipeline

    teacher, _, data = make_pair(tmp_path / "pair")
    t = mj.from_pretrained(teacher)
    tok = AutoTokenizer.from_pretrained(teacher)
    # the calibration rows `minitron score` draws (load_samples), without the held-out documents
    rows = load_samples(data, tok, 8, 64, seed=0, exclude=["tempest"])[:4]
    for metric, drop_sets in (("loss", [[l] for l in range(4)]), ("window", [[0, 1], [1, 2], [2, 3]])):
        out = tmp_path / metric
        cfg = load_pipeline(None, [f"teacher={teacher}", f"data={data}", "holdout=[tempest]", f"out={out}",
                                   "score.samples=8", "score.seq_len=64", "score.batch_size=8", "score.layer_samples=4",
                                   f"prune.target=num_hidden_layers=2,depth_metric={metric}"])
        info = Pipeline(cfg, log=lambda m: None).run(until="prune")
        assert not (out / "distill").exists() and info["params"] < t.config.param_count()
        scores, _ = load_scores(out / "score" / "scores.safetensors")
        key = "layer_loss" if metric == "loss" else "layer_window"
        removed = [lm_loss(*prune(t.params(), t.config, None, "drop_layers=" + ",".join(map(str, d))), rows,
                           batch_size=4) for d in drop_sets]
        np.testing.assert_allclose(scores[key], removed, rtol=1e-5)
        dropped = drop_sets[int(np.argmin(removed))] if metric == "window" else list(np.argsort(removed)[:2])
        ref, _ = prune(t.params(), t.config, None, "drop_layers=" + ",".join(map(str, sorted(dropped))))
        got = mj.from_pretrained(out / "prune" / "student_hf").params()
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # the same out with another width target: the cached scores are reused, the stale pruned model is refused;
    # another depth target needs other depth scores, so the cached scores are refused too
    for target, stage, key in (("num_hidden_layers=2,depth_metric=window,intermediate_size=64", "prune", "prune"),
                               ("num_hidden_layers=3,depth_metric=window", "score", "depth_scores")):
        changed = dataclasses.replace(cfg, prune=PruneSettings(target=target))
        with pytest.raises(RecipeError, match=rf"window/{stage} was made with other settings \({key} changed"):
            Pipeline(changed, log=lambda m: None).run(until="prune")


def test_pipeline_scores_windows_by_a_task(tmp_path):
    """`score.task` reaches the score stage: the windows of a depth_metric=window target are scored by
    1 - acc_norm on the task, equal to the task score of the model with that block really removed."""
    from transformers import AutoTokenizer

    from minitron_jax.data.text import read_documents, split_documents
    from minitron_jax.eval.evaluate import multiple_choice, next_line_task
    from minitron_jax.prune.importance import load_scores
    from minitron_jax.prune.pruning import prune
    from minitron_jax.run.pipeline import Pipeline, load_pipeline

    teacher, _, data = make_pair(tmp_path / "pair", sharpen=8.0)
    t = mj.from_pretrained(teacher)
    tok = AutoTokenizer.from_pretrained(teacher)
    items = next_line_task(split_documents(read_documents(data), holdout=["tempest"])[0], 64, seed=0)
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps(i) + "\n" for i in items))
    out = tmp_path / "run"
    cfg = load_pipeline(None, [f"teacher={teacher}", f"data={data}", "holdout=[tempest]", f"out={out}",
                               "score.samples=8", "score.seq_len=64", "score.batch_size=8", f"score.task={task}",
                               "prune.target=num_hidden_layers=2,depth_metric=window"])
    Pipeline(cfg, log=lambda m: None).run(until="score")
    scores, meta = load_scores(out / "score" / "scores.safetensors")
    ref = [1 - multiple_choice(*prune(t.params(), t.config, None, f"drop_layers={a},{a + 1}"), tok, items)[0]["acc_norm"]
           for a in range(3)]
    np.testing.assert_allclose(scores["layer_window"], ref, rtol=0, atol=1e-6)
    assert meta["window_metric"] == "task"


def test_a_second_run_into_the_same_out_is_refused(tmp_path):
    """Two `minitron run`s into one out would mix stage outputs: the live holder of out is named and the
    second run stops before any work (the lock is the kernel's flock: a dead holder never blocks)."""
    from minitron_jax.core.lock import output_lock
    out = tmp_path / "run"
    with output_lock(out, "minitron run (the first)"):
        with pytest.raises(SystemExit, match=r"minitron run: .*run is in use by minitron run \(the first\) \(pid \d+"):
            main(["run", "teacher=/nonexistent", f"out={out}"])
    assert not out.exists()  # released and removed: the first run wrote nothing


def test_score_stage_and_minitron_score_agree(tmp_path):
    """The score stage calls what `minitron score` calls: the same settings give the same scores and the
    same metadata (sampling, held-out documents excluded, aggregation), on the run's mesh."""
    from minitron_jax.prune.importance import load_scores
    from minitron_jax.run.pipeline import Pipeline, load_pipeline

    teacher, _, data = make_pair(tmp_path / "pair")
    cfg = load_pipeline(None, [f"teacher={teacher}", f"data={data}", "holdout=[tempest]", f"out={tmp_path / 'run'}",
                               "score.samples=8", "score.seq_len=64", "score.batch_size=4", "score.layer_samples=4",
                               "prune.target=num_hidden_layers=3,depth_metric=loss", "distill.mesh=[2,2,2]"])
    Pipeline(cfg, log=lambda m: None).run(until="score")
    store = tmp_path / "run" / "data" / "store"  # the data stage's token store of the text
    main(["score", "--model", str(teacher), "--data", str(store), "--out", str(tmp_path / "cli"), "--samples", "8",
          "--seq-len", "64", "--batch-size", "4", "--layer-loss-samples", "4", "--window-samples", "4",
          "--holdout", "tempest", "--mesh", "2,2,2"])
    (stage, s_meta), (cli, c_meta) = (load_scores(tmp_path / d / "scores.safetensors") for d in ("run/score", "cli"))
    assert sorted(stage) == sorted(cli) and "layer_loss" in stage
    for k in stage:
        np.testing.assert_array_equal(stage[k], cli[k], err_msg=k)
    assert s_meta == c_meta and s_meta["exclude"] == "tempest"


def test_preempted_distill_stage_is_not_marked_done_and_run_exits_143(tmp_path, monkeypatch, capsys):
    """SIGTERM during the distill stage (raised by a hook at step 2, as a preemption notice would be):
    `minitron run` exits 143 with the stage not marked done and step 2 checkpointed; the rerun resumes
    from step 2 and finishes every stage."""
    import signal

    from minitron_jax.train import trainer

    teacher, _, data = make_pair(tmp_path / "pair")
    out = tmp_path / "run"
    args = ["run", f"teacher={teacher}", f"data={data}", "holdout=[tempest]", f"out={out}",
            "score.samples=8", "score.seq_len=64", "prune.target=hidden_size=54,intermediate_size=64",
            "distill.steps=4", "distill.warmup=0", "distill.batch_size=4", "distill.seq_len=64",
            "distill.eval_every=100", "distill.save_every=100", "distill.mesh=[1,1,8]", "distill.peak_tflops=1",
            "eval.samples=4", "eval.seq_len=64", "eval.task_items=8"]
    real = trainer.train

    def preempted(rc, log=None, hooks=()):
        def sigterm(run):
            if run.step == 2:
                signal.raise_signal(signal.SIGTERM)
        return real(rc, log, [*hooks, sigterm])
    monkeypatch.setattr(trainer, "train", preempted)
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 143
    assert "distill stage" in capsys.readouterr().err
    assert (out / "prune" / "done.json").exists() and not (out / "distill" / "done.json").exists()
    assert sorted(p.name for p in (out / "distill" / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    monkeypatch.setattr(trainer, "train", real)
    main(args)
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "at step 2" in printed
    assert json.loads((out / "distill" / "done.json").read_text())["summary"]["step"] == 4
    assert (out / "report" / "done.json").exists()


def test_budget_search_in_run_ranks_on_validation_documents(tmp_path):
    """With a parameter budget, `minitron run` splits off validation documents (by default 5%, at least one)
    and ranks the candidates on them: neither the held-out documents it reports nor the training ones."""
    from minitron_jax.data.store_reader import HOLDOUT, TRAIN, VALIDATION, SplitMap
    from minitron_jax.data.token_store import open_store
    from minitron_jax.model.config import LlamaConfig
    from minitron_jax.run.pipeline import Pipeline, load_pipeline

    teacher, _, data = make_pair(tmp_path / "pair")
    budget = int(0.6 * LlamaConfig.from_file(teacher).param_count())
    cfg = load_pipeline(None, [f"teacher={teacher}", f"data={data}", "holdout=[tempest]", f"out={tmp_path / 'run'}",
                               "score.samples=8", "score.seq_len=64", "score.batch_size=8", "prune.target=null",
                               f"prune.params={budget}", "prune.calib_samples=4"])
    logs = []
    info = Pipeline(cfg, log=logs.append).run(until="prune")
    assert info["search"] and any("rows of 64 from the validation documents" in m for m in logs)
    st = open_store(tmp_path / "run" / "data" / "store")
    of = SplitMap(st, Pipeline(cfg).splits()).of(np.arange(st.n_documents))
    assert sorted(of.tolist()) == [TRAIN, VALIDATION, HOLDOUT] and st.names(0, 3)[int(np.argmax(of))] == "tempest_gut.txt"


def test_align_stage_sfts_the_student_on_the_teachers_responses(tmp_path, capsys, monkeypatch):
    """align.prompts: the teacher answers the prompts (minitron generate), the distilled student is SFT'd on the
    answers (minitron sft), and the report compares teacher, distilled and aligned on the held-out answers, whose
    losses equal `held_out_loss` of each model on the align recipe; the aligned student is also evaluated on the
    held-out text, and every model on a local lm-eval task (eval.lm_eval_tasks), whose score for the aligned
    student equals lm-eval's `hf` backend (transformers) on the exported model. A re-run skips every stage."""
    import lm_eval
    from distill_helpers import with_chat_template
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from minitron_jax.run.pipeline import align_recipe, load_pipeline
    from minitron_jax.train.trainer import held_out_loss

    monkeypatch.chdir(Path(__file__).parents[2])  # the local task YAMLs name their JSONL from the repository root

    teacher, _, data = make_pair(tmp_path / "pair", sharpen=4.0)
    teacher = with_chat_template(teacher, tmp_path / "chat_teacher")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Speak of {w}, {i}."}]}) + "\n"
                               for i in range(4) for w in ("love", "time", "death", "kings")))
    out = tmp_path / "run"
    base = [f"teacher={teacher}", f"data={data}", "holdout=[tempest]", f"out={out}", "score.samples=8",
            "score.seq_len=64", "prune.target=hidden_size=54,intermediate_size=64", "distill.steps=2",
            "distill.warmup=0", "distill.batch_size=4", "distill.seq_len=64", "distill.eval_every=2",
            "distill.save_every=2", "distill.mesh=[1,1,8]", "distill.peak_tflops=1", "eval.samples=4",
            "eval.seq_len=64", "eval.task_items=8"]
    args = [*base, f"align.prompts={prompts}", "align.steps=6", "align.warmup=1", "align.lr=3e-3",
            "align.max_new_tokens=8", "align.holdout_fraction=0.25", "eval.lm_eval_tasks=[shakespeare_passages]",
            "eval.lm_eval_include_path=configs/lm_eval_tasks", "eval.lm_eval_limit=2"]
    main(["run", *base])  # a finished run without align; turning align on reuses its stages up to distill
    capsys.readouterr()
    main(["run", *args])
    printed = capsys.readouterr().out
    assert printed.count("done earlier") == 4 and "== align\n" in printed
    assert "== evaluate: redone (align, eval changed" in printed and "== report: redone" in printed
    answers = [json.loads(x) for x in (out / "align" / "responses.jsonl").read_text().splitlines()]
    assert len(answers) == 16 and all(a["response_ids"] for a in answers)
    done = json.loads((out / "align" / "done.json").read_text())
    rc = align_recipe(load_pipeline(None, args), data=done["data"], student=done["student"], out=str(tmp_path / "x"))
    assert rc.mode == "sft" and rc.steps == 6 and rc.teacher is None
    for name, path in (("teacher", teacher), ("aligned", out / "align" / "sft" / "student_hf"),
                       ("distilled", out / "distill" / "student_hf")):
        np.testing.assert_allclose(done["response_loss"][name], held_out_loss(rc, path), rtol=1e-6)
    assert done["response_loss"]["aligned"] < done["response_loss"]["distilled"]
    report = (out / "report" / "report.md").read_text()
    assert "| aligned |" in report and "held-out response loss" in report and "| aligned |" in printed
    results = json.loads((out / "evaluate" / "done.json").read_text())
    assert all(set(results[m]["lm_eval"]) == {"shakespeare_passages"} for m in ("teacher", "pruned", "distilled", "aligned"))
    hf_lm = HFLM(pretrained=str(out / "align" / "sft" / "student_hf"), device="cpu", dtype="float32", batch_size=8)
    ref = lm_eval.simple_evaluate(model=hf_lm, tasks=["shakespeare_passages"], limit=2, bootstrap_iters=0,
                                  task_manager=TaskManager(include_path="configs/lm_eval_tasks", include_defaults=False))
    ref = ref["results"]["shakespeare_passages"]
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        np.testing.assert_allclose(results["aligned"]["lm_eval"]["shakespeare_passages"][metric], ref[f"{metric},none"],
                                   rtol=1e-5)
    assert results["teacher"]["lm_eval"] != results["aligned"]["lm_eval"]
    saved = json.loads((out / "evaluate" / "lm_eval" / "aligned.json").read_text())  # lm-eval's own layout
    np.testing.assert_allclose(saved["results"]["shakespeare_passages"]["word_perplexity,none"],
                               ref["word_perplexity,none"], rtol=1e-5)
    assert "| shakespeare_passages | word_perplexity |" in report and "lm-evaluation-harness" in printed
    main(["run", *args])
    assert capsys.readouterr().out.count("done earlier") == 7
