"""run/aot.py, `minitron plan --compile`: the run's own jitted steps compiled for a TPU topology on this CPU
machine. Refusals (unknown topology, missing libtpu, a batch that does not divide the slice) need no
libtpu; the compile tests are skipped without the `tpu` extra (`pip install -e .[tpu]`)."""

import dataclasses
import importlib.util
import json
import os

import jax
import pytest

from minitron_jax.core.errors import AOTError
from minitron_jax.model.config import LlamaConfig
from minitron_jax.model.sharding import resolve_mesh_shape
from minitron_jax.run import aot
from minitron_jax.run.aot import analytic_flops, compile_steps, lower_steps, topology_mesh
from minitron_jax.run.cli import main
from minitron_jax.train.preflight import check_batch
from minitron_jax.train.run_config import RunConfig

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed: `pip install -e .[tpu]` to compile for TPU topologies")


TINY_HF = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 256, "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 16, "max_position_embeddings": 512, "torch_dtype": "bfloat16"}


os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # these tests only compile: they may share libtpu


def cfg(layers=1, inter=128):
    return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)


def recipe(**kw):
    base = dict(teacher="-", student="-", data="-", batch_size=64, grad_accum=1, seq_len=128, steps=10, warmup=1,
                compute_dtype="bfloat16")
    return RunConfig(**{**base, **kw})


def test_unknown_topology_is_refused_with_the_known_ones():
    with pytest.raises(AOTError, match="unknown topology; choose one of v5p-128, v5e-256, v6e-256, v4-128"):
        aot.topology_devices("v9-8")


def test_missing_libtpu_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(aot.importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    with pytest.raises(AOTError, match=r"pip install -e \.\[tpu\]"):
        aot.topology_devices("v5p-128")


def test_batch_that_does_not_divide_the_slice_is_refused_with_sizes_that_do():
    rc = recipe(batch_size=1152, grad_accum=8)  # the TPU recipe: 144 rows per micro-batch on 64 chips
    with pytest.raises(AOTError) as e:
        check_batch(rc, 64, 64)
    msg = str(e.value)
    assert "micro-batches of 144 rows" in msg and "batch_size=1024 or 1536" in msg
    assert "grad_accum in {1, 2, 3, 6, 9, 18}" in msg
    for b, a in ((1024, 8), (1536, 8), (1152, 18), (1152, 9)):  # every size it proposes works
        check_batch(recipe(batch_size=b, grad_accum=a), 64, 64)


def test_refusal_on_v5e_256_proposes_a_tensor_axis_that_works():
    """The TPU recipe (64-row micro-batches) on v5e-256's 256 chips: no grad_accum divides, and the
    proposed mesh, 64 fsdp x 4 tensor, passes the same check."""
    rc = recipe(batch_size=1152, grad_accum=18)
    with pytest.raises(AOTError) as e:
        check_batch(rc, 256, 256)
    msg = str(e.value)
    assert "micro-batches of 64 rows" in msg and "batch_size=4608 with grad_accum=18" in msg
    assert "grad_accum in" not in msg and "or mesh=[1,-1,4] (64 fsdp x 4 tensor, keeping grad_accum=18)" in msg
    data, fsdp, _ = resolve_mesh_shape((1, -1, 4), 256)
    check_batch(dataclasses.replace(rc, mesh=[1, -1, 4]), data * fsdp, 256)
    with pytest.raises(AOTError) as e:  # 2 rows on 256 chips would need tensor=128: no mesh proposed
        check_batch(recipe(batch_size=4, grad_accum=2), 256, 256)
    assert "or mesh=[1,-1," not in str(e.value) and "or a mesh with fewer data-parallel devices" in str(e.value)


def test_analytic_flops_count_remat_and_the_teacher():
    s, t = cfg(), cfg(inter=256)
    f = lambda **kw: analytic_flops(recipe(**kw), s, t, 64)["distill"]  # noqa: E731
    tokens = 64 * 128
    assert f() == pytest.approx(tokens * (3 * s.flops_per_token(128) + t.flops_per_token(128)) / 64)
    assert f(remat="full") - f() == pytest.approx(tokens * s.flops_per_token(128) / 64)  # one more forward
    assert f(mode="finetune") == pytest.approx(tokens * 3 * s.flops_per_token(128) / 64)


@needs_libtpu
def test_train_step_keeps_params_and_opt_state_sharded_in_and_out():
    rc = recipe(remat="full")
    mesh = topology_mesh(rc, "v5p-128")
    assert mesh.size == 64
    lowered = lower_steps(rc, cfg(2), cfg(2, 96), mesh, ("distill",))["distill"]
    compiled = lowered.compile()
    state_in, state_out = compiled.input_shardings[0][0], compiled.output_shardings[0]
    flat_in, flat_out = jax.tree.leaves(state_in), jax.tree.leaves(state_out)
    assert len(flat_in) == len(flat_out) and all(a.is_equivalent_to(b, 3) for a, b in zip(flat_in, flat_out))
    gate_in = state_in["trainable"]["model"]["layers"]["gate_proj"]
    assert "fsdp" in str(gate_in.spec)  # the student's matrices are split over the 64 chips, not replicated
    mu = state_out["opt_state"]
    assert any("fsdp" in str(x.spec) for x in jax.tree.leaves(mu)) and "fsdp" in str(
        state_out["trainable"]["model"]["embed_tokens"].spec)


@needs_libtpu
def test_compiled_figures_and_flops_against_the_analytic_count(tmp_path):
    rc = recipe(remat="full")
    res = compile_steps(rc, cfg(), cfg(inter=96), "v5p-128")
    assert res["devices"] == 64 and res["hbm_per_device_bytes"] == 95 * 10**9 and res["fits"]
    for name in ("distill", "score", "eval"):
        s = res["steps"][name]
        assert s["argument_bytes"] > 0 and s["temp_bytes"] > 0 and s["peak_bytes"] >= s["temp_bytes"]
        # one layer, one micro-batch: XLA counts every loop once, like the analytic count; it also counts
        # the masked half of causal attention and elementwise work, hence the upper margin
        assert 0.8 < s["flops"] / s["analytic_flops"] < 1.5, (name, s)
    assert res["steps"]["distill"]["alias_bytes"] > 0  # the train state is donated


@needs_libtpu
@pytest.mark.parametrize("mesh", [(1, -1, 1), (1, 16, 4)])
def test_decode_step_compiles_with_its_kv_cache_per_chip(mesh):
    """The decode step of `minitron generate` (the eval batch: 64 rows, a cache of seq_len 128 slots, bf16) on
    v5p-128: the analytic KV cache per chip (2 x L x B x S x Hkv x D x 2 bytes / shards: rows over the 64 fsdp
    chips, or over 16 with the 2 KV heads replicated over the 4 tensor chips, which they do not divide) is what the
    compiled input sharding holds, within XLA's argument bytes, and donated."""
    rc = recipe(mesh=mesh)
    s = cfg(layers=2, inter=96)
    res = compile_steps(rc, cfg(), s, "v5p-128", steps=("decode",))
    d = res["steps"]["decode"]
    shards = 64 if mesh[2] == 1 else 16
    assert d["kv_cache_bytes"] == 2 * 2 * 64 * 128 * 2 * 16 * 2 // shards
    assert d["argument_bytes"] >= d["kv_cache_bytes"] and res["fits"]
    assert d["alias_bytes"] >= d["kv_cache_bytes"]  # the cache is donated: written in place
    # XLA also counts the per-token elementwise work (norms, masks, the choice over the vocabulary), which on a
    # 64-wide model is as large as its matmuls (1.25x at 4096 slots)
    assert 1.0 < d["flops"] / d["analytic_flops"] < 3.0, d


@needs_libtpu
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_family_steps_compile_with_biases_and_norms(family):
    """Qwen2's q/k/v biases and Qwen3's q/k norms go through the compiled steps for v5p-128: the biases split
    over the chips with their heads' rule, the norms replicated, and XLA's FLOPs near the analytic count
    (which leaves the biases and norms out: they are not matmuls)."""
    t, s = (dataclasses.replace(c, model_type=family) for c in (cfg(), cfg(inter=96)))
    rc = recipe(remat="full", mesh=(1, 16, 4))
    res = compile_steps(rc, t, s, "v5p-128")
    assert res["fits"]
    for name in ("distill", "score", "eval"):
        assert 0.8 < res["steps"][name]["flops"] / res["steps"][name]["analytic_flops"] < 1.5, name
    state = lower_steps(rc, t, s, topology_mesh(rc, "v5p-128"), ("distill",))["distill"].compile().input_shardings[0][0]
    layers = state["trainable"]["model"]["layers"]
    if family == "qwen2":
        assert "tensor" in str(layers["q_bias"].spec) and "tensor" in str(layers["k_bias"].spec)
    else:
        assert layers["q_norm"].is_fully_replicated and layers["k_norm"].is_fully_replicated


# the papers' second teacher and ModelOpt's Qwen3 reference, as in the README (minutes each on 2 cores):
# `.venv/bin/python -m pytest -m full_compile tests/run/test_aot.py`
NEW_RECIPES = [("mistral_nemo_12b_to_8b_width_tpu.yaml", "mistral_nemo_12b_config.json", "hidden_size=4096,intermediate_size=11520"),
               ("qwen3_8b_to_6b_width_tpu.yaml", "qwen3_8b_config.json", "hidden_size=3584,intermediate_size=9216")]


@needs_libtpu
@pytest.mark.full_compile
@pytest.mark.parametrize("recipe_file,teacher,target", NEW_RECIPES)
def test_family_recipes_compile_and_fit_v5p_128(tmp_path, recipe_file, teacher, target):
    main(["plan", f"configs/{recipe_file}", "--teacher", f"configs/{teacher}", "--target", target,
          "--compile", "v5p-128", "--json", str(tmp_path / "r.json")])
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["fits"] and r["devices"] == 64 and set(r["steps"]) == {"distill", "score", "eval", "decode"}
    assert all(s["peak_bytes"] < r["hbm_per_device_bytes"] for s in r["steps"].values())


@needs_libtpu
@pytest.mark.parametrize("name", ["distill", "score", "eval"])
def test_xla_flops_cover_every_layer_and_micro_batch(name):
    """`flops` is XLA's count for the whole optimizer step: extrapolated from 1- and 2-layer loop-free
    compiles, it equals XLA's count of the same step compiled with all 3 student / 4 teacher layers
    unrolled (one micro-batch, one loss chunk), times the 2 micro-batches, to 1% (XLA's count is linear in
    the layers only up to fusion choices: 0.01-0.4% off on this tiny model). And it is near the analytic
    count."""
    from minitron_jax.model.llama import unrolled_layers
    rc = recipe(remat="full", grad_accum=2, batch_size=128)
    s, t = cfg(layers=3, inter=96), cfg(layers=4)
    mesh = topology_mesh(rc, "v5p-128")
    got = aot.xla_step_flops(rc, t, s, mesh, name)
    micro = dataclasses.replace(rc, batch_size=64, grad_accum=1, chunk_size=rc.seq_len)
    with unrolled_layers():
        cost = lower_steps(micro, t, s, mesh, (name,))[name].compile().cost_analysis()
    full = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"] * (2 if name == "distill" else 1)
    assert got["flops"] == pytest.approx(full, rel=1e-2)
    assert 0.8 < got["flops"] / analytic_flops(rc, s, t, 64)[name] < 1.5
    assert got["per_student_layer"] > 0 if name != "score" else got["per_student_layer"] == 0


@needs_libtpu
def test_distill_step_collectives_do_not_grow_with_the_loss_chunks():
    """The chunked KD loss runs per device over the batch axes (losses._fused_chunked): compiled for v5p-128,
    the train step moves the same collective bytes with 4 loss chunks per row as with 1 (before: XLA
    all-reduced the whole fp32 head gradient and re-gathered the heads in every chunk, 2.5x the bytes here)."""
    s = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=64, max_position_embeddings=512)
    t = dataclasses.replace(s, intermediate_size=512)
    moved = []
    for chunk in (32, 128):
        rc = recipe(batch_size=128, grad_accum=2, seq_len=128, chunk_size=chunk)
        hlo = lower_steps(rc, t, s, topology_mesh(rc, "v5p-128"), ("distill",))["distill"].compile().as_text()
        moved.append(aot.collective_bytes(hlo))
    assert moved[0]["all-reduce"] > 0 and moved[0] == pytest.approx(moved[1], rel=1e-6), moved


@needs_libtpu
def test_cli_compile_writes_json_and_refuses_a_batch_that_does_not_divide(tmp_path, capsys):
    teacher = tmp_path / "config.json"
    teacher.write_text(json.dumps(TINY_HF))
    args = ["plan", "batch_size=64", "seq_len=128", "steps=10", "warmup=1", "--teacher", str(teacher),
            "--target", "intermediate_size=96", "--compile", "v5p-128"]
    main(args + ["--json", str(tmp_path / "r.json")])
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["topology"] == "v5p-128" and r["fits"] and set(r["steps"]) == {"distill", "score", "eval", "decode"}
    printed = capsys.readouterr().out
    assert "peak GiB" in printed and "decode: one token of `minitron generate`; KV cache" in printed
    with pytest.raises(SystemExit, match=r"micro-batches of 32 rows.*grad_accum in \{1, 2\}"):
        main(args[:1] + ["batch_size=128", "grad_accum=4"] + args[2:])


@needs_libtpu
def test_cli_compile_exits_non_zero_naming_what_to_change(tmp_path, monkeypatch):
    teacher = tmp_path / "config.json"
    teacher.write_text(json.dumps(TINY_HF))
    small = dataclasses.replace(aot.TOPOLOGIES["v5p-128"], hbm_bytes=10**6)  # a 1 MB chip: nothing fits
    monkeypatch.setitem(aot.TOPOLOGIES, "v5p-128", small)
    with pytest.raises(SystemExit, match=r"distill step needs .* GiB per device, over the chip's .*remat=full"):
        main(["plan", "batch_size=128", "seq_len=128", "steps=10", "warmup=1", "--teacher", str(teacher),
              "--compile", "v5p-128", "--json", str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "r.json").read_text())["fits"] is False  # the figures are written first


def test_plan_without_compile_still_needs_devices_and_peak():
    with pytest.raises(SystemExit, match="give --devices and --peak-tflops, or --compile TOPOLOGY"):
        main(["plan", "configs/llama31_8b_to_4b_width_tpu.yaml", "--teacher", "configs/llama31_8b_config.json"])


def test_train_runs_the_steps_build_steps_makes(tmp_path, monkeypatch):
    """`train` takes its jitted steps and its state's shardings from `trainer.build_steps`, the function
    aot.py compiles: the live state has exactly the abstract state's shardings."""
    from distill_helpers import make_pair

    from minitron_jax.train import trainer
    from minitron_jax.train.run_config import load_recipe
    t, s, d = make_pair(tmp_path / "pair")
    built = []
    real = trainer.build_steps
    monkeypatch.setattr(trainer, "build_steps", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    seen = []
    rc = load_recipe(None, [f"teacher={t}", f"student={s}", f"data={d}", f"out={tmp_path / 'out'}", "batch_size=4",
                            "seq_len=64", "steps=1", "warmup=0", "eval_every=100", "peak_tflops=1", "mesh=[1,-1,2]"])
    trainer.train(rc, log=lambda m: None, hooks=[lambda run: seen.append(jax.tree.map(lambda x: x.sharding, run.state))])
    assert len(built) == 1 and len(seen) == 1
    want = jax.tree.map(lambda x: x.sharding, built[0].state)
    assert jax.tree.structure(want) == jax.tree.structure(seen[0])
    assert all(a.is_equivalent_to(b, x.ndim) for a, b, x in
               zip(jax.tree.leaves(want), jax.tree.leaves(seen[0]), jax.tree.leaves(built[0].state)))


@needs_libtpu
def test_distill_from_stored_logits_compiles_without_the_teacher():
    """teacher_logits= (not written yet: k = top_k): the compiled train step takes no teacher parameters but the
    stored top-k ([A, b, S, k] values and ids) as batch arguments, needs less temp memory, and XLA's FLOPs drop by
    the teacher's forward as the analytic count does (ratio to it within 0.2 of the online step's)."""
    t, s = cfg(layers=2), cfg(layers=2, inter=96)
    rc_on, rc_off = recipe(), recipe(teacher_logits="/nonexistent/logits", top_k=16)
    mesh = aot.topology_mesh(rc_on, "v5p-128")
    args_on = lower_steps(rc_on, t, s, mesh, ("distill",))["distill"].args_info
    args_off = lower_steps(rc_off, t, s, mesh, ("distill",))["distill"].args_info
    assert args_off[0][1] is None and args_on[0][1] is not None  # (state, teacher, batch)
    assert args_off[0][2]["t_values"].shape == (1, 64, 128, 16) and args_off[0][2]["t_indices"].dtype == "int32"
    on = compile_steps(rc_on, t, s, "v5p-128", steps=("distill",))["steps"]["distill"]
    res = compile_steps(rc_off, t, s, "v5p-128", steps=("distill", "score"))
    off = res["steps"]["distill"]
    assert off["temp_bytes"] < on["temp_bytes"] and off["flops"] < on["flops"]
    assert off["analytic_flops"] < on["analytic_flops"]
    assert abs(off["flops"] / off["analytic_flops"] - on["flops"] / on["analytic_flops"]) < 0.2
    assert res["steps"]["score"]["flops"] > 0  # scoring still runs the teacher
