"""A distillation whose teacher, student, data and out are all in Cloud Storage (the emulator, tests/conftest.py
`gcs`): preempted (SIGTERM, exit 143) with its checkpoint in the bucket, then resumed from the bucket with
resume=true; it ends with the weights of the same uninterrupted run on local disk, and nothing is written
to local disk instead (no `gs:` folder)."""

from pathlib import Path

import numpy as np
from distill_helpers import metrics, run_cli, train_with_hook
from helpers import gs_files, tokenize_store, upload

from minitron_jax.core import storage
from minitron_jax.io.hf import open_checkpoint

COMMON = ["seq_len=64", "holdout=[tempest]", "eval_every=3", "peak_tflops=1", "warmup=1", "save_every=100",
          "steps=6", "batch_size=4", "mesh=[1,1,8]"]


def weights(model) -> dict[str, np.ndarray]:
    ck = open_checkpoint(model)
    return {name: np.asarray(ck[name].tensor(name)) for name in ck}


def gs_metrics(url: str) -> list[dict]:
    import json
    return [r for r in map(json.loads, storage.path(f"{url}/metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_a_run_in_cloud_storage_is_preempted_and_resumes_from_the_bucket(pair, gs_dir, tmp_path, monkeypatch):
    teacher, student, data = pair
    monkeypatch.chdir(tmp_path)  # a path mistaken for a local one would appear here as ./gs:/...
    store = tokenize_store(data, student, tmp_path / "store")
    gs = {"teacher": upload(teacher, f"{gs_dir}/teacher"), "student": upload(student, f"{gs_dir}/student"),
          "data": upload(store, f"{gs_dir}/store")}
    out = f"{gs_dir}/run"
    argv = [f"{k}={v}" for k, v in gs.items()] + [f"out={out}", *COMMON]

    stopped = train_with_hook("sigterm", 3, argv, check=False)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert f"saved step 3 to {out}/checkpoints" in stopped.stderr, stopped.stderr[-3000:]
    files = gs_files(out)
    assert {f.split("/")[1] for f in files if f.startswith("checkpoints/")} == {"3"}, files
    assert [r["step"] for r in gs_metrics(out)] == [1, 2, 3]  # metrics.jsonl reached the bucket at the stop
    assert "recipe.json" in files and any(f.startswith("tensorboard/") for f in files), files
    assert not any(f.startswith("student_hf") for f in files)

    resumed = run_cli(["distill", *argv, "resume=true"])
    assert "at step 3" in resumed.stdout + resumed.stderr
    assert [r["step"] for r in gs_metrics(out)] == [1, 2, 3, 4, 5, 6]  # appended to the bucket's file
    assert not Path("gs:").exists() and not (tmp_path / "gs:").exists()

    ref = tmp_path / "ref"  # the same run, uninterrupted, all on local disk
    run_cli(["distill", f"teacher={teacher}", f"student={student}", f"data={store}", f"out={ref}", *COMMON])
    assert [r["batch_fingerprint"] for r in gs_metrics(out)] == [r["batch_fingerprint"] for r in metrics(ref)]
    assert [r.get("held_out_loss") for r in gs_metrics(out)] == [r.get("held_out_loss") for r in metrics(ref)]
    a, b = weights(f"{out}/student_hf"), weights(ref / "student_hf")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-7, err_msg=name)
