"""On 8 fake CPU devices with a (data=2, fsdp=2, tensor=2) mesh the forward equals the 1-device
forward and the parameters really are split across devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import LLAMA3_ROPE, rel_err, save_tiny
from jax.sharding import PartitionSpec as P

import minitron_jax as mj
from minitron_jax.model.llama import forward
from minitron_jax.model.sharding import constrain, make_mesh, named_sharding, spec_for

CFG = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=500000.0,
           rope_scaling=LLAMA3_ROPE, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    save_tiny(path, **CFG)
    return path


def test_mesh_sizes_and_errors():
    assert jax.device_count() == 8
    assert dict(make_mesh(2, 2, 2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(make_mesh(1, -1, 2).shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    with pytest.raises(ValueError, match="8 are available"):
        make_mesh(2, 2, 1)
    with pytest.raises(ValueError, match="at most one"):
        make_mesh(-1, -1, 2)


def test_sharded_forward_equals_single_device(ckpt):
    single = mj.from_pretrained(ckpt)
    ids = np.random.RandomState(0).randint(0, 128, (4, 32))
    mask = np.ones((4, 32), np.int32)
    mask[3, 20:] = 0
    ref = np.asarray(single(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))

    mesh = make_mesh(2, 2, 2)
    model = mj.from_pretrained(ckpt, mesh=mesh)
    params = model.params()
    # the parameters really are split: each device holds 1/4 of q_proj (tensor x fsdp)
    q = params["layers"]["q_proj"]
    assert q.sharding.spec == P(None, "tensor", "fsdp")
    assert q.addressable_shards[0].data.shape == (3, 32, 32)
    assert params["embed_tokens"].sharding.spec == P("tensor", "fsdp")
    assert params["layers"]["down_proj"].sharding.spec == P(None, "fsdp", "tensor")
    assert len({s.device for s in q.addressable_shards}) == 8
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(single.params())):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    cfg = model.config
    with jax.set_mesh(mesh):
        batch = named_sharding(("batch", "seq"), ids.shape, mesh)
        fn = jax.jit(lambda p, x, m: forward(p, cfg, x, attention_mask=m))
        out = fn(params, jax.device_put(jnp.asarray(ids), batch), jax.device_put(jnp.asarray(mask), batch))
    assert out.sharding.spec[0] == ("data", "fsdp")
    assert rel_err(out, ref, mask.astype(bool)) <= 1e-5


def test_indivisible_dims_stay_replicated():
    mesh = make_mesh(2, 2, 2)
    # 63 rows do not split over tensor=2: that axis stays replicated instead of failing
    assert spec_for(("layers", "q_heads", "embed"), (30, 63, 576), mesh) == P(None, None, "fsdp")
    assert spec_for(("batch", "seq"), (4, 8), mesh) == P(("data", "fsdp"), None)
    assert spec_for(("batch", "seq"), (2, 8), mesh) == P("data", None)
    assert spec_for(("batch", "seq"), (1, 8), mesh) == P(None, None)


def test_batch_placement_lives_in_sharding():
    """put / batch_sharding / to_global: rows split over (data, fsdp); values unchanged."""
    from minitron_jax.eval import evaluate
    from minitron_jax.model.sharding import batch_sharding, put, to_global
    from minitron_jax.prune import importance

    assert evaluate.put is put and importance.put is put  # one home, no copies
    mesh = make_mesh(2, 2, 2)
    x = np.arange(4 * 8, dtype=np.int32).reshape(4, 8)
    y = put(x, mesh)
    assert y.sharding.spec == P(("data", "fsdp"), None)
    np.testing.assert_array_equal(np.asarray(y), x)
    assert isinstance(put(x, None), jax.Array)
    assert batch_sharding(mesh, (2, 4, 8)).spec == P(None, ("data", "fsdp"), None)
    lead = np.arange(2 * 4 * 8, dtype=np.int32).reshape(2, 4, 8)
    g = to_global({"input_ids": lead, "segment_ids": None}, mesh, lead=True)
    assert g["segment_ids"] is None and g["input_ids"].sharding.spec == P(None, ("data", "fsdp"), None)
    np.testing.assert_array_equal(np.asarray(g["input_ids"]), lead)  # one process: global == local
    g = to_global({"mask": x}, mesh, lead=False)
    assert g["mask"].sharding.spec == P(("data", "fsdp"), None)
    np.testing.assert_array_equal(np.asarray(g["mask"]), x)


def test_batches_that_do_not_split_over_data_x_fsdp_are_refused():
    """`put` replicates rows that the data x fsdp devices do not divide (P("data") or P(None) above): every device
    would compute every row. Score, eval, prune's ranking and lm-eval refuse such batches instead
    (`check_batch_rows`, naming sizes that split); the pipeline's evaluate stage picks one (`fitting_batch`)."""
    from minitron_jax.core.errors import DataError, RecipeError
    from minitron_jax.model.sharding import batch_rows, check_batch_rows, fitting_batch

    assert [batch_rows(m) for m in (None, make_mesh(2, 2, 2), make_mesh(1, 8, 1), make_mesh(8, 1, 1),
                                    make_mesh(1, 1, 8))] == [1, 4, 8, 8, 1]
    for rows, ok in ((1, 1), (1, 7), (4, 4), (4, 12), (8, 8), (8, 64)):
        check_batch_rows("batch_size", ok, rows)
    with pytest.raises(DataError, match=r"^--batch-size 12 does not split over the mesh's data x fsdp = 8 devices "
                                        r"\(its rows would be replicated, not split\); give a multiple of 8, "
                                        r"e.g. 8 or 16$"):
        check_batch_rows("--batch-size 12", 12, 8)
    with pytest.raises(RecipeError, match=r"^score.batch_size=8 does not split over the mesh's data x fsdp = "
                                          r"64 devices .*give a multiple of 64, e.g. 64$"):
        check_batch_rows("score.batch_size=8", 8, 64, RecipeError)
    with pytest.raises(DataError, match=r"^--batch-size 0: give at least 1 row"):
        check_batch_rows("--batch-size 0", 0, 1)
    assert [fitting_batch(m) for m in (None, make_mesh(2, 2, 2), make_mesh(1, 8, 1))] == [8, 8, 8]
    assert fitting_batch(make_mesh(1, 8, 1), at_least=12) == 16 and fitting_batch(make_mesh(2, 2, 2), 5) == 8


@pytest.mark.parametrize("module,name", [("model.sharding", "describe"), ("model.sharding", "local_shard_bytes"),
                                         ("prune.importance", "SCORE_KEYS")])
def test_dead_code_is_gone(module, name):
    import importlib
    assert not hasattr(importlib.import_module(f"minitron_jax.{module}"), name)


def test_unknown_logical_axis_is_an_error():
    """RULES lookups are strict: a misspelled logical axis raises (None still means replicated)."""
    mesh = make_mesh(2, 2, 2)
    assert spec_for((None, "embed"), (4, 8), mesh) == P(None, "fsdp")
    with pytest.raises(KeyError, match="'emebd' is not in sharding.RULES; known axes: layers, vocab, embed"):
        spec_for(("layers", "emebd"), (4, 8), mesh)
    with jax.set_mesh(mesh), pytest.raises(KeyError, match="'act_emb' is not in sharding.RULES"):
        jax.jit(lambda x: constrain(x, ("batch", "act_emb")))(jnp.zeros((4, 8)))


@pytest.mark.parametrize("sizes,n", [((1, -1, 2), 8), ((2, 2, 2), 8), ((-1, 1, 1), 4), ((2, 2, 1), 8),
                                     ((-1, -1, 2), 8), ((3, -1, 1), 8), ((0, 2, 4), 8), ((1, 1, 1), 2)])
def test_one_mesh_shape_resolver(sizes, n):
    """make_mesh and plan.mesh_sizes resolve (data, fsdp, tensor) the same way, errors included."""
    from minitron_jax.run.plan import mesh_sizes
    try:
        want = make_mesh(*sizes, devices=jax.devices()[:n]).shape
    except ValueError as e:
        with pytest.raises(ValueError) as got:
            mesh_sizes(list(sizes), n)
        assert str(got.value) == str(e)
        return
    assert mesh_sizes(list(sizes), n) == dict(want)
