"""`minitron plan` (run/plan.py): the 8B -> 4B recipes planned from config.json alone agree with the spec's counts,
and per-device parameter memory follows the sharding rules; the weights-free planner does not import the
trainer."""

import json
import subprocess
import sys

import pytest

from minitron_jax.model.config import LlamaConfig
from minitron_jax.prune.targets import validate
from minitron_jax.run.cli import main
from minitron_jax.run.plan import estimate, per_device_param_bytes
from minitron_jax.train.run_config import load_recipe

LLAMA = "configs/llama31_8b_config.json"


@pytest.mark.parametrize("recipe,target,student", [
    ("configs/llama31_8b_to_4b_width_tpu.yaml", "hidden_size=3072,intermediate_size=9216", 4_512_746_496),
    ("configs/llama31_8b_to_4b_depth_gpu.yaml", "num_hidden_layers=16", 4_540_469_248),
])
def test_8b_recipes_plan(tmp_path, recipe, target, student):
    main(["plan", recipe, "--teacher", LLAMA, "--target", target, "--devices", "64", "--peak-tflops", "459",
          "--mfu", "0.4", "--json", str(tmp_path / "p.json")])
    p = json.loads((tmp_path / "p.json").read_text())
    assert p["teacher_params"] == 8_030_261_248 and p["student_params"] == student
    assert p["tokens_per_step"] == 1152 * 8192 and round(p["total_tokens"] / 1e9) == 94  # the papers' 94B tokens
    mem = p["memory_per_device_bytes"]
    # FSDP over 64 devices: each holds ~1/64 of every matrix (norm vectors are replicated)
    assert 4 * student / 64 <= mem["student_params_fp32"] <= 1.01 * 4 * student / 64
    assert 2 * 8_030_261_248 / 64 <= mem["teacher_params"] <= 1.01 * 2 * 8_030_261_248 / 64
    assert mem["optimizer_state"] == 2 * mem["student_params_fp32"]
    # both modes: from stored top-64 logits the teacher's parameters, activations and forward FLOPs are gone,
    # and the step carries the stored values and ids (bf16 + int32 per kept entry) of its rows
    off = p["other_mode"]
    m2 = off["memory_per_device_bytes"]
    assert off["stored_logits"] and not p["stored_logits"] and m2["teacher_params"] == 0
    assert m2["stored_logits"] == 1152 / 64 * 8192 * 64 * 6 and m2["activations"] < mem["activations"]
    assert m2["total"] == mem["total"] - mem["teacher_params"] - (mem["activations"] - m2["activations"]) + m2["stored_logits"]
    t_flops = 1152 * 8192 * LlamaConfig.from_file(LLAMA).flops_per_token(8192)
    assert abs(p["flops_per_step"] - off["flops_per_step"] - t_flops) <= 1e-9 * t_flops


def test_param_bytes_follow_sharding_rules():
    cfg = LlamaConfig.from_file(LLAMA)
    one = per_device_param_bytes(cfg, {"data": 1, "fsdp": 1, "tensor": 1}, 4)
    assert one == 4 * cfg.param_count()
    tp = per_device_param_bytes(cfg, {"data": 2, "fsdp": 1, "tensor": 8}, 4)  # data parallel replicates
    assert 4 * cfg.param_count() / 8 <= tp <= 1.01 * 4 * cfg.param_count() / 8


def test_plan_rejects_a_mesh_that_does_not_fit():
    cfg = LlamaConfig.from_file(LLAMA)
    rc = load_recipe(None, ["teacher=-", "student=-", "data=-", "mesh=[2,3,1]"])
    with pytest.raises(ValueError, match="does not fit 64 devices"):
        estimate(cfg, validate(cfg, "num_hidden_layers=16"), rc, 64, 1e15, 0.4)


@pytest.mark.parametrize("kind,student", [("width", "4,512,746,496"), ("depth", "4,540,469,248")])
def test_run_dry_run_of_8b_pipelines(capsys, kind, student):
    for hw in ("tpu", "gpu"):
        main(["run", f"configs/pipeline_llama31_8b_{kind}_{hw}.yaml", "--dry-run", "--devices", "64",
              "--peak-tflops", "459"])
        out = capsys.readouterr().out
        assert "teacher parameters: 8,030,261,248" in out and f"student parameters: {student}" in out
        assert "93,994,352,640 tokens" in out  # 9960 steps x 1152 x 8192: the papers' 94B tokens


def test_plan_does_not_import_the_trainer():
    code = "import sys, minitron_jax.run.plan; assert 'minitron_jax.train.trainer' not in sys.modules, 'plan imports distill'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_tensor_axis_splits_head_mlp_and_vocab_activations():
    """With mesh [1,-1,4] (v5e-256's) the planner's activations per device split what the sharding rules
    split over `tensor` (query / KV heads, MLP, vocabulary: all divisible by 4 here) and keep the hidden
    residual whole; rows per device are the same as mesh [1,-1,1] on 64 devices."""
    from minitron_jax.run.plan import activation_bytes
    t = LlamaConfig.from_file(LLAMA)
    s = validate(t, "hidden_size=3072,intermediate_size=9216")
    rc = load_recipe("configs/llama31_8b_to_4b_width_tpu.yaml", ["teacher=-", "student=-", "data=-"])
    flat = estimate(t, s, rc, 64, 1e12, 0.4)["memory_per_device_bytes"]["activations"]
    tp_rc = load_recipe("configs/llama31_8b_to_4b_width_tpu.yaml", ["teacher=-", "student=-", "data=-", "mesh=[1,-1,4]"])
    tp = estimate(t, s, tp_rc, 256, 1e12, 0.4)["memory_per_device_bytes"]["activations"]
    S, cb = 8192, 2
    # only the residual stream ([S, H] per layer, kept by remat) and the norms' 4 H per position stay whole
    whole = s.num_hidden_layers * S * s.hidden_size * cb + S * 4 * s.hidden_size * cb
    whole += S * t.hidden_size * cb + S * 4 * t.hidden_size * cb / t.num_hidden_layers  # the teacher's (one layer's)
    assert tp == pytest.approx(whole + (flat - whole) / 4, rel=1e-9)
    # 3 divides the MLP (9216) and the vocabulary (128256), not the 32 / 8 heads
    assert activation_bytes(s, rc, 1.0, tensor=3) == pytest.approx(activation_bytes(s, rc, 1.0) - (
        S * 3 * s.intermediate_size * cb + 4 * rc.chunk_size * s.vocab_size * 4) * (1 - 1 / 3), rel=1e-12)
