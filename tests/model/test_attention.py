"""attention.py: every implementation equals `jax.nn.dot_product_attention` (xla, the model's original
computation) in fp32, forward and gradients w.r.t. q, k, v, to 1e-5 relative (max abs error over the
max abs reference value), with left padding, packed segment ids, GQA / MHA / MQA and head_dim 64 / 128;
and chunked attention never materialises S x S (checked on its jaxpr)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minitron_jax.core.errors import RecipeError
from minitron_jax.model.attention import attend, resolve, splash_block
from minitron_jax.model.config import LlamaConfig
from minitron_jax.model.llama import forward, init_params
from minitron_jax.train.run_config import RunConfig

TOL = 1e-5  # relative, fp32


def _inputs(b, s, hq, hkv, d, pad=True, seg=True, seed=0):
    """Row 0 left-padded (37 pad tokens); row 1 three packed documents; the rest plain."""
    r = np.random.default_rng(seed)
    q, k, v, w = (jnp.asarray(r.normal(size=(b, s, h, d)), jnp.float32) for h in (hq, hkv, hkv, hq))
    am = np.ones((b, s), np.float32)
    am[0, :37] = 0
    sg = np.ones((b, s), np.int32)
    sg[1, s // 3:] = 2
    sg[1, 2 * s // 3:] = 3
    am = jnp.asarray(am) if pad else None
    sg = jnp.asarray(sg) if seg else None
    real = np.ones((b, s), bool) if am is None else np.asarray(am, bool)
    return q, k, v, am, sg, w * jnp.asarray(real, jnp.float32)[:, :, None, None], real


def _rel(a, b, rows=None):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if rows is not None:
        a, b = a[rows], b[rows]
    return float(np.abs(a - b).max() / np.abs(b).max())


def _check_equal(impl, b, s, hq, hkv, d, block=None, pad=True, seg=True):
    q, k, v, am, sg, w, real = _inputs(b, s, hq, hkv, d, pad, seg)

    def loss(impl):  # a loss over real tokens only (the model's losses mask padding)
        return lambda q, k, v: (attend(q, k, v, attention_mask=am, segment_ids=sg, impl=impl, block=block) * w).sum()

    ref = attend(q, k, v, attention_mask=am, segment_ids=sg, impl="xla")
    out = attend(q, k, v, attention_mask=am, segment_ids=sg, impl=impl, block=block)
    assert out.shape == ref.shape and bool(jnp.isfinite(out).all())
    assert _rel(out, ref, real) < TOL
    g_ref = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    g = jax.grad(loss(impl), argnums=(0, 1, 2))(q, k, v)
    for name, a, r in zip("qkv", g, g_ref):
        assert _rel(a, r) < TOL, f"d{name}"


# (hq, hkv, head_dim): GQA, MHA, MQA, head_dim 64 and 128
SHAPES = [(4, 2, 64), (4, 4, 64), (4, 1, 128), (4, 2, 128)]


@pytest.mark.parametrize("hq,hkv,d", SHAPES)
def test_chunked_equals_xla(hq, hkv, d):
    _check_equal("chunked", 2, 256, hq, hkv, d, block=64)


@pytest.mark.parametrize("pad,seg", [(True, False), (False, True), (False, False)])
def test_chunked_equals_xla_padding_or_segments_alone_and_ragged_length(pad, seg):
    _check_equal("chunked", 2, 200, 4, 2, 64, block=64, pad=pad, seg=seg)  # 200: last block padded inside


@pytest.mark.parametrize("hq,hkv,d", [(4, 2, 64), (2, 1, 128), (2, 2, 64)])
def test_splash_interpret_equals_xla(hq, hkv, d):
    _check_equal("splash", 2, 256, hq, hkv, d, block=128)


def test_splash_under_mesh_shard_map_equals_xla():
    """8 fake devices, mesh data=2 x fsdp=2 x tensor=2: batch, query heads and K/V heads split by the
    shard_map."""
    from minitron_jax.model.sharding import make_mesh
    mesh = make_mesh(2, 2, 2)
    q, k, v, am, sg, w, real = _inputs(4, 256, 4, 2, 64)
    ref = attend(q, k, v, attention_mask=am, segment_ids=sg, impl="xla")
    with jax.set_mesh(mesh):
        out = jax.jit(lambda q, k, v: attend(q, k, v, attention_mask=am, segment_ids=sg, impl="splash", block=128))(
            q, k, v)
    assert _rel(out, ref, real) < TOL


def test_chunked_fully_masked_rows_are_finite_with_zero_gradients():
    """Left-padding positions see no key. xla gives them the mean of all values (a finite but meaningless
    row); chunked gives 0 and no gradient flows from them."""
    q, k, v, am, sg, w, real = _inputs(2, 128, 4, 2, 64, seg=False)
    out = attend(q, k, v, attention_mask=am, impl="chunked", block=32)
    pad = ~real
    assert bool(jnp.isfinite(out).all()) and float(jnp.abs(out[pad]).max()) == 0.0
    g = jax.grad(lambda q, k, v: (attend(q, k, v, attention_mask=am, impl="chunked", block=32)
                                  * jnp.asarray(pad, jnp.float32)[:, :, None, None]).sum(), argnums=(0, 1, 2))(q, k, v)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in g)


def test_cudnn_needs_a_gpu_and_falls_back_with_segment_ids():
    q, k, v, am, sg, w, real = _inputs(2, 64, 4, 2, 64)
    with pytest.warns(UserWarning, match="segment ids.*chunked"):
        out = attend(q, k, v, attention_mask=am, segment_ids=sg, impl="cudnn")
    assert _rel(out, attend(q, k, v, attention_mask=am, segment_ids=sg, impl="xla"), real) < TOL
    if jax.default_backend() != "gpu":
        pytest.skip("cuDNN attention needs an NVIDIA GPU: its equality with xla is untested here")
    _check_equal("cudnn", 2, 256, 4, 2, 64, seg=False)


def test_auto_and_errors():
    assert jax.default_backend() == "cpu"
    assert resolve("auto", 1024) == "xla" and resolve("auto", 2048) == "chunked"
    with pytest.raises(ValueError, match="attention='flash'"):
        resolve("flash", 16)
    with pytest.raises(ValueError, match="multiple of 128.*seq_len=256"):
        splash_block(200)
    assert splash_block(1024) == 512 and splash_block(384) == 128
    with pytest.raises(RecipeError, match="attention='flash'"):
        RunConfig(student="s", data="d", mode="finetune", attention="flash").validate()
    assert RunConfig(student="s", data="d", mode="finetune", attention="chunked").validate()
    from minitron_jax.model.attention import IMPLEMENTATIONS
    from minitron_jax.train.run_config import ATTENTION
    assert ATTENTION == IMPLEMENTATIONS  # run_config.py does not import JAX: the same list twice


# ---------------------------------------------------------------------------- never S x S
def _shapes(jaxpr, out):
    """Every intermediate's shape in `jaxpr` and its sub-jaxprs (scan / while / custom_vjp / pjit bodies)."""
    for eqn in jaxpr.eqns:
        out.extend(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else [p]):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    _shapes(sub.jaxpr, out)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    _shapes(sub, out)
    return out


def _square(fn, *args, s):
    return [sh for sh in _shapes(jax.make_jaxpr(fn)(*args).jaxpr, []) if list(sh).count(s) >= 2]


def test_chunked_never_materialises_s_by_s():
    s = 1024
    q, k, v, am, sg, w, real = _inputs(2, s, 4, 2, 16)

    def grads(impl):
        def loss(q, k, v):
            return (attend(q, k, v, attention_mask=am, segment_ids=sg, impl=impl, block=128) * w).sum()
        return jax.grad(loss, argnums=(0, 1, 2))

    assert _square(grads("xla"), q, k, v, s=s)  # the check can see S x S: xla holds it
    assert not _square(grads("chunked"), q, k, v, s=s)  # forward and backward


# ---------------------------------------------------------------------------- through the model
CFG = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16)


def _batch(s):
    r = np.random.default_rng(1)
    ids = jnp.asarray(r.integers(0, CFG.vocab_size, (2, s)), jnp.int32)
    mask = np.ones((2, s), np.float32)
    mask[0, :5] = 0
    seg = np.ones((2, s), np.int32)
    seg[1, s // 2:] = 2
    return ids, jnp.asarray(mask), jnp.asarray(seg)


@pytest.mark.parametrize("impl", ["chunked", "splash"])
def test_forward_logits_equal_xla(impl):
    params = init_params(CFG, jax.random.key(0))
    ids, mask, seg = _batch(128)
    kw = dict(attention_mask=mask, segment_ids=seg)
    ref = forward(params, CFG, ids, **kw)
    out = forward(params, CFG, ids, attention=impl, **kw)
    assert _rel(out, ref, np.asarray(mask, bool)) < TOL


def test_forward_gradients_equal_xla_chunked_under_remat():
    """The custom_vjp inside the layer scan and a full-remat checkpoint: parameter gradients equal xla's."""
    params = init_params(CFG, jax.random.key(0))
    ids, mask, seg = _batch(128)

    def grad(impl):
        def loss(p):
            out = forward(p, CFG, ids, attention_mask=mask, segment_ids=seg, attention=impl, remat="full")
            return (out * mask[:, :, None]).sum()
        return jax.grad(loss)(params)["layers"]

    ref, got = grad("xla"), grad("chunked")
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert _rel(got[name], ref[name]) < TOL, name


def test_distill_steps_use_the_recipe_attention():
    """make_eval_step / make_objective pass rc.attention to forward: chunked gives the same eval sums and
    its traced step holds no S x S array, which xla's does."""
    from minitron_jax.train.objective import kd_config, make_objective
    from minitron_jax.train.steps import make_eval_step
    s = 1024  # above chunked's default block (512)
    params = init_params(CFG, jax.random.key(0))
    ids, mask, seg = _batch(s)
    mb = {"input_ids": ids, "mask": mask, "segment_ids": seg}
    res = {}
    for impl in ("xla", "chunked"):
        rc = RunConfig(student="s", data="d", mode="finetune", attention=impl)
        ev = make_eval_step(rc, CFG, None, kd_config(rc))
        res[impl] = ev(params, None, mb)
        assert bool(_square(lambda p: ev(p, None, mb), params, s=s)) == (impl == "xla")
        obj = make_objective(rc, CFG, None, kd_config(rc))
        train = jax.grad(lambda p: obj({"model": p}, None, mb, jnp.float32(100.0))[0]["logit"])
        assert bool(_square(train, params, s=s)) == (impl == "xla")
    assert abs(float(res["chunked"]["ce"]) - float(res["xla"]["ce"])) <= TOL * abs(float(res["xla"]["ce"]))


# ---------------------------------------------------------------------------- TPU, compiled here without one
def _tpu_devices():
    try:
        from jax.experimental import topologies
        return topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu", chip_config_name="megacore",
                                            chips_per_host_bounds=(2, 2, 1), num_slices=1).devices
    except Exception as e:  # no libtpu
        pytest.skip(f"compiling for a TPU topology needs libtpu (pip install -e '.[tpu]'): {type(e).__name__}")


def test_splash_aot_for_tpu_temp_memory_below_xla_at_8192():
    """4 v5p chips (AOT, no TPU here), one row of 8192 tokens per chip, 8 query / 2 KV heads, bf16, packed
    segment ids: forward + backward. Splash compiles to the Mosaic kernel (not interpret mode) under the
    mesh's shard_map, and its temp memory is a small fraction of xla's S x S."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P
    devs = _tpu_devices()
    mesh = jax.make_mesh((1, len(devs), 1), ("data", "fsdp", "tensor"), devices=devs,
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    sh = NamedSharding(mesh, P(("data", "fsdp")))
    b, s = len(devs), 8192
    q = jax.ShapeDtypeStruct((b, s, 8, 128), jnp.bfloat16, sharding=sh)
    kv = jax.ShapeDtypeStruct((b, s, 2, 128), jnp.bfloat16, sharding=sh)
    seg = jax.ShapeDtypeStruct((b, s), jnp.int32, sharding=sh)
    temp, text = {}, {}
    for impl in ("xla", "splash"):
        def loss(q, k, v, seg, impl=impl):
            return attend(q, k, v, segment_ids=seg, impl=impl).astype(jnp.float32).sum()
        # conftest's "highest" matmul precision asks Mosaic for fp32 contractions of bf16 operands, which it
        # refuses ("Bad lhs type"); the package leaves JAX's default
        with jax.set_mesh(mesh), jax.default_matmul_precision("default"):
            c = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, seg).compile()
        temp[impl], text[impl] = c.memory_analysis().temp_size_in_bytes, c.as_text()
    assert "tpu_custom_call" in text["splash"] and "tpu_custom_call" not in text["xla"]
    assert temp["xla"] > 2 ** 30 and temp["splash"] < temp["xla"] / 20, temp
