"""`minitron run` as one job on several hosts (issue 21): 2 processes x 2 fake CPU devices joined on 127.0.0.1 give
the results of 1 process x 4 devices, with no peak_tflops given (every stage: the architecture search's short
runs, the teacher's responses and the align stage, lm-eval tasks too); processes that do not share `out` (each its own
disk: a private tmpfs in its own mount namespace) stop together within seconds, naming shared storage."""

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from distill_helpers import make_pair, run_cli, two_processes

from minitron_jax.io.hf import open_checkpoint
from minitron_jax.prune.importance import load_scores


def args(teacher, data, out) -> list[str]:
    return ["run", f"teacher={teacher}", f"data={data}", "holdout=[tempest]", f"out={out}",
            "score.samples=8", "score.seq_len=64", "score.batch_size=4",
            "prune.target=hidden_size=54,intermediate_size=64", "distill.steps=4", "distill.warmup=0",
            "distill.batch_size=4", "distill.seq_len=64", "distill.eval_every=2", "distill.save_every=2",
            "eval.samples=8", "eval.seq_len=64", "eval.task_items=8"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("pair"), sharpen=4.0)


def test_two_processes_run_as_one(pair, tmp_path, monkeypatch):
    """Every stage, with the parts that read results back on the host: the search (prune.params, 2 candidates
    distilled and ranked on validation rows), align.prompts (the teacher answers, the student is SFT'd on the
    answers) and a local lm-eval task on each model."""
    from distill_helpers import with_chat_template

    from minitron_jax.model.config import LlamaConfig

    monkeypatch.chdir(Path(__file__).parents[2])  # the local lm-eval task names its JSONL from the repository root
    teacher, _, data = pair
    teacher = with_chat_template(teacher, tmp_path / "chat_teacher")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Speak of {w}, {i}."}]}) + "\n"
                               for i in range(4) for w in ("love", "time", "death", "kings")))
    budget = int(0.6 * LlamaConfig.from_file(teacher).param_count())
    every = ["prune.target=null", f"prune.params={budget}", "prune.calib_samples=4", "search.candidates=2",
             "search.steps=2", "search.samples=4", f"align.prompts={prompts}", "align.steps=2", "align.warmup=0",
             "align.max_new_tokens=8", "align.holdout_fraction=0.25",
             "eval.lm_eval_tasks=[shakespeare_passages]", "eval.lm_eval_include_path=configs/lm_eval_tasks",
             "eval.lm_eval_limit=2"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli(args(teacher, data, one) + every, devices=4)
    done = two_processes(["-m", "minitron_jax.run.cli"], args(teacher, data, two) + every, devices=2)
    assert [d.returncode for d in done] == [0, 0], done[0].stderr[-3000:] + done[1].stderr[-3000:]
    (a, _), (b, _) = (load_scores(d / "score" / "scores.safetensors") for d in (one, two))
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=0, err_msg=k)
    pa, pb = (open_checkpoint(d / "prune" / "student_hf") for d in (one, two))
    assert sorted(pa) == sorted(pb)
    for name in pa:
        np.testing.assert_array_equal(pb[name].tensor(name), pa[name].tensor(name), err_msg=name)
    ra, rb = (json.loads((d / "evaluate" / "done.json").read_text()) for d in (one, two))
    for model in ("teacher", "pruned", "distilled", "aligned"):
        assert abs(rb[model]["held_out_loss"] - ra[model]["held_out_loss"]) <= 1e-4, model
        assert rb[model]["next_line_acc"] == ra[model]["next_line_acc"], model
        (task,) = ra[model]["lm_eval"]
        assert rb[model]["lm_eval"][task] == pytest.approx(ra[model]["lm_eval"][task], rel=1e-5), model
    assert (two / "report" / "report.md").is_file()
    lines = (two / "distill" / "metrics.jsonl").read_text().splitlines()  # one writer: each step once
    assert len([r for r in map(json.loads, lines) if "loss" in r]) == 4
    sa, sb = (json.loads((d / "prune" / "search" / "search.json").read_text()) for d in (one, two))
    assert [r["spec"] for r in sb] == [r["spec"] for r in sa] and len(sa) == 2
    for x, y in zip(sa, sb):
        np.testing.assert_allclose(np.array(y["validation_curve"]), np.array(x["validation_curve"]), rtol=0, atol=1e-4)
    aa, ab = (d / "align" / "responses.jsonl" for d in (one, two))
    assert ab.read_text() == aa.read_text() and len(aa.read_text().splitlines()) == 16  # one writer, greedy: same
    la, lb = (json.loads((d / "align" / "done.json").read_text())["response_loss"] for d in (one, two))
    assert lb == pytest.approx(la, abs=1e-4)
    assert json.loads((two / "evaluate" / "lm_eval" / "aligned.json").read_text())["results"]  # process 0 wrote it


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux) and root")
def test_hosts_without_shared_storage_stop_together(pair, tmp_path):
    """Each process gets its own tmpfs at the same path for `out` (as hosts with their own disks): both stop
    within seconds, before any weights load, with a message that names shared storage and gs://."""
    teacher, _, data = pair
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = ("unshare", "-m", "sh", "-c", f'mount -t tmpfs tmpfs {disk} && exec "$0" "$@"')
    t = time.monotonic()
    done = two_processes(["-m", "minitron_jax.run.cli"], args(teacher, data, disk / "run"), devices=2, prefix=mount,
                         timeout=300)
    took = time.monotonic() - t
    assert [d.returncode for d in done] == [1, 1], done[0].stderr[-3000:] + done[1].stderr[-3000:]
    assert took < 60, took
    for d in done:
        assert "is not storage every host shares: process(es) 1 cannot read a file process 0 wrote" in d.stderr
        assert "gs://" in d.stderr
    assert not list(disk.iterdir())  # nothing on the real disk: each process wrote into its own tmpfs


def test_score_prune_and_eval_as_two_processes(pair, tmp_path):
    """Each subcommand on its own as 2 processes x 2 devices (default mesh: every device of both on fsdp) gives
    what it gives as 1 process x 4 devices: scores to 1e-5, identical pruned weights, losses to 1e-4."""
    teacher, _, data = pair
    for name, devices in (("one", 4), ("two", 2)):
        d = tmp_path / name

        def cli(*argv):
            if name == "one":
                return [run_cli(list(argv), devices=devices)]
            done = two_processes(["-m", "minitron_jax.run.cli"], list(argv), devices=devices)
            assert [x.returncode for x in done] == [0, 0], done[0].stderr[-3000:] + done[1].stderr[-3000:]
            return done
        cli("score", "--model", str(teacher), "--data", str(data), "--out", str(d / "score"), "--samples", "8",
            "--seq-len", "64", "--batch-size", "4", "--holdout", "tempest")
        cli("prune", "--model", str(teacher), "--scores", str(d / "score" / "scores.safetensors"), "--out",
            str(d / "pruned"), "--target", "hidden_size=54,intermediate_size=64")
        cli("eval", "--model", str(d / "pruned"), "--data", str(data), "--holdout", "tempest", "--samples", "8",
            "--seq-len", "64", "--task-items", "8", "--json", str(d / "eval.json"))
    (a, _), (b, _) = (load_scores(tmp_path / d / "score" / "scores.safetensors") for d in ("one", "two"))
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=0, err_msg=k)
    wa, wb = (open_checkpoint(tmp_path / d / "pruned") for d in ("one", "two"))
    assert sorted(wa) == sorted(wb)
    for n in wa:
        np.testing.assert_array_equal(wb[n].tensor(n), wa[n].tensor(n), err_msg=n)
    ea, eb = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("one", "two"))
    assert abs(ea["loss"] - eb["loss"]) <= 1e-4 and ea["acc"] == eb["acc"]


def test_convert_and_export_as_two_processes(pair, tmp_path):
    """`convert` (every process writes its shards of the orbax checkpoint) and `export` (process 0 writes the
    safetensors of the gathered weights) as 2 processes x 2 devices: the exported tensors equal the source's
    bit for bit, and the checkpoint equals one converted by 1 process x 4 devices."""
    import jax

    from minitron_jax.io.orbax_model import load_model

    teacher, _, _ = pair
    run_cli(["convert", str(teacher), str(tmp_path / "one")], devices=4)
    for argv in (["convert", str(teacher), str(tmp_path / "ckpt")], ["export", str(tmp_path / "ckpt"), str(tmp_path / "hf")]):
        done = two_processes(["-m", "minitron_jax.run.cli"], argv, devices=2)
        assert [d.returncode for d in done] == [0, 0], done[0].stderr[-3000:] + done[1].stderr[-3000:]
    src, out = open_checkpoint(teacher), open_checkpoint(tmp_path / "hf")
    assert sorted(out) == sorted(src)
    for name in src:
        np.testing.assert_array_equal(out[name].tensor(name), src[name].tensor(name), err_msg=name)
    a, b = (jax.tree_util.tree_flatten_with_path(load_model(tmp_path / d).params())[0] for d in ("one", "ckpt"))
    assert [p for p, _ in a] == [p for p, _ in b]
    for (path, x), (_, y) in zip(a, b):
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x), err_msg=str(path))


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux) and root")
def test_a_run_with_everything_in_cloud_storage_on_hosts_that_share_no_disk(pair, gs_dir, tmp_path):
    """Issue 22: teacher, data (a token store) and out in Cloud Storage (the emulator); 2 processes x 2 devices,
    each in its own mount namespace with its own tmpfs HOME and TMPDIR (hosts that share no local disk). It gives
    what 1 process x 4 devices on local disk gives (scores to 1e-5, identical pruned weights, held-out losses to
    1e-4); metrics and report are in the bucket; the student, downloaded, loads in transformers."""
    import torch
    from helpers import gs_files, tokenize_store, upload
    from transformers import AutoModelForCausalLM

    from minitron_jax.core import storage
    from minitron_jax.io.hf import from_pretrained

    teacher, _, data = pair
    store = tokenize_store(data, teacher, tmp_path / "store")
    t_url, s_url, out = upload(teacher, f"{gs_dir}/teacher"), upload(store, f"{gs_dir}/store"), f"{gs_dir}/run"
    run_cli(args(teacher, store, tmp_path / "one"), devices=4)
    host = tmp_path / "host"
    host.mkdir()
    private = ("unshare", "-m", "sh", "-c", f'mount -t tmpfs tmpfs {host} && mkdir {host}/home {host}/tmp && '
               f'HOME={host}/home TMPDIR={host}/tmp exec "$0" "$@"')
    done = two_processes(["-m", "minitron_jax.run.cli"], args(t_url, s_url, out), devices=2, prefix=private)
    assert [d.returncode for d in done] == [0, 0], done[0].stderr[-3000:] + done[1].stderr[-3000:]
    assert not list(host.iterdir())  # each process wrote its temporaries into its own tmpfs

    one, files = tmp_path / "one", gs_files(out)
    for f in ("score/scores.safetensors", "score/scores.png", "prune/student_hf/model.safetensors",
              "distill/metrics.jsonl", "distill/student_hf/config.json", "report/report.md", "report/loss_curves.png"):
        assert f in files, (f, [x for x in files if "/checkpoints/" not in x])
    with storage.path(f"{out}/score/scores.safetensors").open("rb") as f, open(tmp_path / "scores.safetensors", "wb") as g:
        g.write(f.read())
    (a, _), (b, _) = (load_scores(p) for p in (one / "score" / "scores.safetensors", tmp_path / "scores.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=0, err_msg=k)
    pa, pb = open_checkpoint(one / "prune" / "student_hf"), open_checkpoint(f"{out}/prune/student_hf")
    assert sorted(pa) == sorted(pb)
    for name in pa:
        np.testing.assert_array_equal(pb[name].tensor(name), pa[name].tensor(name), err_msg=name)
    ra, rb = json.loads((one / "evaluate" / "done.json").read_text()), json.loads(
        storage.path(f"{out}/evaluate/done.json").read_text())
    for model in ("teacher", "pruned", "distilled"):
        assert abs(rb[model]["held_out_loss"] - ra[model]["held_out_loss"]) <= 1e-4, model
    lines = storage.path(f"{out}/distill/metrics.jsonl").read_text().splitlines()  # process 0 wrote each step once
    assert [r["step"] for r in map(json.loads, lines) if "loss" in r] == [1, 2, 3, 4]

    local = storage.download(f"{out}/distill/student_hf")
    hf = AutoModelForCausalLM.from_pretrained(local, dtype=torch.float32).eval()
    ids = np.random.RandomState(0).randint(0, hf.config.vocab_size, (1, 16))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(from_pretrained(f"{out}/distill/student_hf", dtype="float32")(ids))
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
