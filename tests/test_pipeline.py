"""A CI-sized `minitron run`: tiny random teacher, a few steps. The exported student loads in
transformers with logits equal to the JAX student's, every stage leaves its output, and a re-run
resumes (skips finished stages)."""

import json

import numpy as np
import torch
from transformers import AutoModelForCausalLM

import minitron_jax as mj
from minitron_jax.cli import main
from distill_helpers import make_pair
from helpers import rel_err


def test_tiny_pipeline_end_to_end(tmp_path, capsys):
    teacher, _, data = make_pair(tmp_path / "pair", sharpen=4.0)
    out = tmp_path / "run"
    args = ["run", f"teacher={teacher}", f"data={data}", "holdout=[tempest]", f"out={out}",
            "score.samples=8", "score.seq_len=64", "prune.target=hidden_size=54,intermediate_size=64",
            "distill.steps=4", "distill.batch_size=4", "distill.seq_len=64", "distill.eval_every=2",
            "distill.save_every=2", "distill.mesh=[1,1,8]", "distill.peak_tflops=1",
            "eval.samples=4", "eval.seq_len=64", "eval.task_items=8"]
    main(args)
    printed = capsys.readouterr().out
    results = json.loads((out / "evaluate" / "done.json").read_text())
    assert {"teacher", "pruned", "distilled"} <= set(results)
    assert results["pruned"]["params"] == results["distilled"]["params"] < results["teacher"]["params"]
    assert results["distilled"]["distill_tokens"] == 4 * 4 * 64
    assert (out / "score" / "scores.png").exists() and (out / "report" / "loss_curves.png").exists()
    report = (out / "report" / "report.md").read_text()
    assert "| distilled |" in report and "| distilled |" in printed
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
    assert again.count("done earlier") == 5
