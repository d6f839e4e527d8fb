"""`minitron run` as one job on several hosts (issue 21): 2 processes x 2 fake CPU devices joined on 127.0.0.1 give
the results of 1 process x 4 devices, with no peak_tflops given; processes that do not share `out` (each its own
disk: a private tmpfs in its own mount namespace) stop together within seconds, naming shared storage."""

import json
import shutil
import time

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


def test_two_processes_run_as_one(pair, tmp_path):
    teacher, _, data = pair
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli(args(teacher, data, one), devices=4)
    done = two_processes(["-m", "minitron_jax.run.cli"], args(teacher, data, two), devices=2)
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
    for model in ("teacher", "pruned", "distilled"):
        assert abs(rb[model]["held_out_loss"] - ra[model]["held_out_loss"]) <= 1e-4, model
        assert rb[model]["next_line_acc"] == ra[model]["next_line_acc"], model
    assert (two / "report" / "report.md").is_file()
    lines = (two / "distill" / "metrics.jsonl").read_text().splitlines()  # one writer: each step once
    assert len([r for r in map(json.loads, lines) if "loss" in r]) == 4


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
