"""Importance scores (prune/importance.py) equal an independent re-derivation from torch forward hooks on
transformers' model (not our forward), for every axis and every aggregation option; sharded equals 1-device.
Scores are refused when a tokenizer is larger than the model, when they are not finite, and when they
belong to another model (fingerprints of config and weights)."""

import itertools
import json
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import LLAMA3_ROPE, CodePointTokenizer, nan_model, numpy_scores, save_tiny, torch_activations, write_docs

import minitron_jax as mj
from minitron_jax.core.errors import DataError, ScoresError
from minitron_jax.eval.evaluate import gated_losses
from minitron_jax.model.sharding import make_mesh
from minitron_jax.prune.importance import (
    ScoreConfig,
    check_scores_match,
    compute_scores,
    layer_skip_losses,
    load_scores,
    model_fingerprint,
    save_scores,
    score_model,
    window_gates,
)

CFG = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=500000.0,
           rope_scaling=LLAMA3_ROPE, num_hidden_layers=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    ref = save_tiny(path, **CFG)
    samples = np.random.RandomState(0).randint(0, 128, (10, 24)).astype(np.int32)
    return path, ref, samples


@pytest.mark.parametrize("batch_agg,seq_agg", list(itertools.product(["l2", "mean", "var"], ["mean", "l2", "var"])))
def test_scores_match_torch_hooks(tiny, batch_agg, seq_agg):
    path, ref, samples = tiny
    model = mj.from_pretrained(path)
    acts = torch_activations(ref, samples)
    for site in ("down_proj_in", "pre_activation") if (batch_agg, seq_agg) == ("l2", "mean") else ("down_proj_in",):
        sc = ScoreConfig(batch_agg=batch_agg, seq_agg=seq_agg, mlp_site=site)
        # batch 4 over 10 samples: three batches, the last padded with masked rows
        got = compute_scores(model.params(), model.config, samples, batch_size=4, score_config=sc)
        want = numpy_scores(acts, model.config, batch_agg, seq_agg, site)
        assert set(got) == set(want)
        for k in want:
            assert got[k].shape == want[k].shape, k
            np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-7 * np.abs(want[k]).max(), err_msg=k)


@pytest.mark.parametrize("family,extra", [("qwen2", {}), ("qwen3", {"head_dim": 16}),
                                          ("mistral", {"head_dim": 16, "sliding_window": None})])
def test_family_scores_match_torch_hooks(tmp_path, family, extra):
    """Qwen2 (q/k/v biases), Qwen3 (q/k norms) and Mistral (head_dim set, hidden 48 != 4 x 16): every axis's
    scores equal the hook re-derivation on transformers' own model of that family, sharded on 8 devices."""
    ref = save_tiny(tmp_path, family=family, hidden_size=48, num_attention_heads=4, num_key_value_heads=2,
                    num_hidden_layers=3, **extra)
    samples = np.random.RandomState(0).randint(0, 128, (10, 24)).astype(np.int32)
    model = mj.from_pretrained(tmp_path, mesh=make_mesh(2, 2, 2))
    acts = torch_activations(ref, samples)
    for site in ("down_proj_in", "pre_activation"):
        got = compute_scores(model.params(), model.config, samples, batch_size=4, mesh=make_mesh(2, 2, 2),
                             score_config=ScoreConfig(mlp_site=site))
        want = numpy_scores(acts, model.config, "l2", "mean", site)
        assert set(got) == set(want)
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-7 * np.abs(want[k]).max(), err_msg=k)


@pytest.mark.parametrize("shape,batch,n", [((2, 2, 2), 4, 8), ((1, 8, 1), 8, 10), ((8, 1, 1), 8, 6)])
def test_sharded_scores_equal_single_device(tiny, shape, batch, n):
    """Scores (and the per-layer losses) on a mesh whose data x fsdp devices split the batch equal one device's,
    fp32, also when the last batch (or the only one) holds fewer rows than the batch: it is padded with masked
    rows to the full batch, which splits like the others."""
    path, _, samples = tiny
    single = mj.from_pretrained(path)
    want = compute_scores(single.params(), single.config, samples[:n], batch_size=batch)
    mesh = make_mesh(*shape)
    model = mj.from_pretrained(path, mesh=mesh)
    got = compute_scores(model.params(), model.config, samples[:n], batch_size=batch, mesh=mesh)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, err_msg=k)
    got = layer_skip_losses(model.params(), model.config, samples[:n], batch_size=batch, mesh=mesh)
    want = layer_skip_losses(single.params(), single.config, samples[:n], batch_size=batch)
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("shape,batch,sizes", [((1, 8, 1), 12, "8 or 16"), ((8, 1, 1), 4, "8"),
                                               ((2, 2, 2), 6, "4 or 8")])
def test_scores_refuse_a_batch_that_does_not_split(tiny_pair, tmp_path, shape, batch, sizes):
    """A batch that the mesh's data x fsdp devices do not divide would be replicated (every device computing
    every row); `score_model` refuses it before reading any data or writing anything, `compute_scores` and the
    depth losses before any forward."""
    mesh, rows = make_mesh(*shape), shape[0] * shape[1]
    msg = (rf"^batch_size={batch} does not split over the mesh's data x fsdp = {rows} devices \(its rows would be "
           rf"replicated, not split\); give a multiple of {rows}, e.g. {sizes}$")
    model = mj.from_pretrained(tiny_pair[0], mesh=mesh)
    with pytest.raises(DataError, match=msg):  # the data does not exist: the batch is refused first
        score_model(model, CodePointTokenizer(), tmp_path / "no_data", tmp_path / "s", samples=16, seq_len=16,
                    batch_size=batch, mesh=mesh)
    assert not (tmp_path / "s").exists()
    x = np.zeros((4, 16), np.int32)
    for fn in (compute_scores, layer_skip_losses):
        with pytest.raises(DataError, match=msg):
            fn(model.params(), model.config, x, batch_size=batch, mesh=mesh)


def test_two_processes_score_and_fingerprint_as_one(tiny, tmp_path):
    """Two processes x 2 devices joined on 127.0.0.1, the weights split over all 4 devices (fsdp), so each
    process owns half of every weight: the weight fingerprint and the importance scores are those of one process
    (fp32, rtol 1e-5); `sharding.to_host` (which the fingerprint, the scores' statistics and HF export read
    through) returns the whole of an array whose rows the other process holds, where a plain read fails. (The
    model directory is an input both processes read.)"""
    import socket
    import subprocess
    import sys

    path = tiny[0]
    single = mj.from_pretrained(path)
    rows = np.random.default_rng(0).integers(0, single.config.vocab_size, (8, 32)).astype(np.int32)
    want = compute_scores(single.params(), single.config, rows, batch_size=4)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "PYTHONPATH": str(Path(__file__).parents[2])}
    script, out = Path(__file__).parents[1] / "multihost_reads.py", tmp_path / "result.json"
    procs = [subprocess.Popen([sys.executable, str(script), str(i), str(port), str(path), str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(x[-3000:] for x in logs)
    got = json.loads(out.read_text())
    assert (got["devices"], got["local"]) == (4, 2)
    assert got["plain_read"] != "ok" and got["to_host"] == np.arange(24.0).reshape(8, 3).tolist()
    assert got["fingerprint"] == model_fingerprint(single.config, single.params())
    for k in want:
        np.testing.assert_allclose(np.asarray(got["scores"][k], np.float32), want[k], rtol=1e-5, err_msg=k)


@pytest.mark.parametrize("attention", ["chunked", "splash"])
def test_scores_with_other_attention_equal_xla(tiny, attention):
    """`attention=` reaches the score step (and the per-layer losses): chunked and splash (interpret mode
    on CPU, in shard_map over the mesh) give xla's scores, fp32, on a (2, 2, 2) mesh."""
    path, _, samples = tiny
    if attention == "splash":  # the kernel needs a multiple of 128 tokens
        samples = np.random.RandomState(1).randint(0, 128, (8, 128)).astype(np.int32)
    mesh = make_mesh(2, 2, 2)
    model = mj.from_pretrained(path, mesh=mesh)
    kw = dict(batch_size=4, mesh=mesh)
    want = compute_scores(model.params(), model.config, samples[:8], **kw)
    got = compute_scores(model.params(), model.config, samples[:8], attention=attention, **kw)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, err_msg=k)
    np.testing.assert_allclose(layer_skip_losses(model.params(), model.config, samples[:4], attention=attention, **kw),
                               layer_skip_losses(model.params(), model.config, samples[:4], **kw), rtol=1e-5)


def test_layer_skip_losses_match_torch(tiny):
    """LM loss with layer l skipped equals transformers with that decoder layer removed."""
    path, ref, samples = tiny
    model = mj.from_pretrained(path)
    got = layer_skip_losses(model.params(), model.config, samples[:4], batch_size=2)
    ids = torch.tensor(samples[:4], dtype=torch.long)
    for layer in range(model.config.num_hidden_layers):
        keep = [m for i, m in enumerate(ref.model.layers) if i != layer]
        full = ref.model.layers
        ref.model.layers = torch.nn.ModuleList(keep)
        with torch.no_grad():
            want = float(ref(ids, labels=ids).loss)
        ref.model.layers = full
        assert abs(got[layer] - want) <= 1e-5 * abs(want), layer
    windows = gated_losses(model.params(), model.config, samples[:4], window_gates(3, 2), batch_size=2)
    assert windows.shape == (2,)


# ---------------------------------------------------------------------------- centred variances
def test_seq_var_is_centred_on_offset_activations():
    """seq_reduce(.., "var") on activations offset by 1e3 equals float64 NumPy (E[x^2] - E[x]^2 in
    fp32 loses ~all digits of a unit variance there)."""
    from minitron_jax.prune.importance import seq_reduce
    rng = np.random.RandomState(0)
    a = (1e3 + rng.randn(3, 64, 5) * np.array([1.0, 0.5, 2.0, 0.3, 1.0])).astype(np.float32).astype(np.float64)
    mask = np.ones((3, 64))
    mask[1, 40:] = 0  # a padded row: only its real tokens count
    mask[2, :] = 0    # an all-padding row
    got = np.asarray(seq_reduce(jnp.asarray(a, jnp.float32), jnp.asarray(mask, jnp.float32), "var"))
    want = np.stack([a[0].var(0), a[1, :40].var(0)])
    # fp32 holds 1e3 to ~6e-5, so ~1e-4 relative is the floor; the uncentred formula is off by ~1e-1
    np.testing.assert_allclose(got[:2], want, rtol=1e-3)
    assert np.all(got[2] == 0)


def test_batch_moments_merge_is_centred_on_offset_values():
    """Chan's merge over several batches (with padded rows and an all-padding batch) equals float64
    NumPy for every batch aggregation on values offset by 1e3."""
    from minitron_jax.prune.importance import batch_aggregate, merge_moments
    rng = np.random.RandomState(1)
    L, C = 2, 6
    batches = [(1e3 + rng.randn(L, 4, C) * 0.5).astype(np.float32).astype(np.float64) for _ in range(4)]
    weights = [np.ones(4), np.array([1.0, 1, 0, 0]), np.zeros(4), np.array([0.0, 1, 1, 1])]
    n, mean, m2 = jnp.zeros(()), jnp.zeros((L, C)), jnp.zeros((L, C))
    merge = jax.jit(merge_moments)
    for x, w in zip(batches, weights):
        n, mean, m2 = merge(n, mean, m2, jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    rows = np.concatenate([x[:, w > 0] for x, w in zip(batches, weights)], axis=1)  # [L, n, C]
    assert float(n) == rows.shape[1] == 9
    st = [np.asarray(v, np.float64) for v in (n, mean, m2)]
    # fp32 holds 1e3 to ~6e-5 (mean, shift of means): ~1e-4 relative is the floor; uncentred sums are off by > 1e-1
    np.testing.assert_allclose(batch_aggregate(*st, "var"), rows.var(1), rtol=1e-3)
    np.testing.assert_allclose(batch_aggregate(*st, "mean"), rows.mean(1), rtol=1e-6)
    np.testing.assert_allclose(batch_aggregate(*st, "l2"), np.sqrt((rows ** 2).sum(1)), rtol=1e-6)


# ---------------------------------------------------------------------------- scores refused
def test_score_model_refuses_a_larger_tokenizer_before_writing(tiny_pair, tmp_path):
    d = write_docs(tmp_path / "d", 2, text="zzzz " * 40)  # 'z' -> 122 + 10 = 132 > 127
    out = tmp_path / "scores"
    with pytest.raises(DataError, match=r"document doc0\.txt of .*: the largest token id 132 .*vocab_size=128"):
        score_model(mj.from_pretrained(tiny_pair[0]), CodePointTokenizer(offset=10), d, out, samples=2, seq_len=16, batch_size=2)
    assert not out.exists()  # nothing made, not even the directory


def test_save_scores_refuses_non_finite_scores(tmp_path):
    scores = {"mlp": np.ones((2, 3), np.float32), "heads": np.ones((2, 4), np.float32),
              "layer_bi": np.array([0.1, np.inf], np.float32), "hidden": np.ones(5, np.float32)}
    scores["mlp"][1, :2] = np.nan
    with pytest.raises(ScoresError, match=r"scores\.safetensors not written: the scores mlp \(2 of 6\), layer_bi \(1 of 2\) "
                                          r"are NaN or inf; .*weights for NaN/inf.*float32.*tokenizer saved"):
        save_scores(tmp_path / "scores.safetensors", scores, {})
    assert list(tmp_path.iterdir()) == []


def test_scores_file_writers_never_share_a_temporary(tmp_path, monkeypatch):
    """Two writers of one scores.safetensors (two hosts on a shared disk) each write their own temporary; a write
    that fails leaves the previous file as it was and no temporary behind."""
    import minitron_jax.prune.importance as importance

    path = tmp_path / "scores.safetensors"
    first = {"mlp": np.ones((2, 3), np.float32), "hidden": np.arange(5, dtype=np.float32)}
    second = {"mlp": np.zeros((2, 3), np.float32), "hidden": np.ones(5, np.float32)}
    temps, real = [], importance.write_file

    def interleaved(tmp, entries, meta):  # the second writer runs while the first is writing
        temps.append(tmp)
        if len(temps) == 1:
            save_scores(path, second, {"writer": "2"})
        real(tmp, entries, meta)

    monkeypatch.setattr(importance, "write_file", interleaved)
    save_scores(path, first, {"writer": "1"})
    assert len(set(temps)) == 2 and all(t.parent == tmp_path and t.name.startswith(".scores.safetensors.tmp-")
                                        for t in temps)
    got, meta = load_scores(path)  # the first writer finished last: its file, whole
    np.testing.assert_array_equal(got["hidden"], first["hidden"])
    assert meta["writer"] == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["scores.safetensors"]

    def failing(tmp, entries, meta):
        Path(tmp).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(importance, "write_file", failing)
    with pytest.raises(OSError, match="No space left"):
        save_scores(path, second, {"writer": "3"})
    assert load_scores(path)[1]["writer"] == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["scores.safetensors"]


def test_score_model_with_nan_weights_writes_nothing(tiny_pair, tmp_path):
    d = write_docs(tmp_path / "d", 2, text="zzzz " * 40)
    out = tmp_path / "scores"
    with pytest.raises(ScoresError, match=r"the scores .*mlp .*are NaN or inf"):
        score_model(nan_model(tiny_pair[0]), CodePointTokenizer(), d, out, samples=2, seq_len=16, batch_size=2)
    assert not (out / "scores.safetensors").exists() and not (out / "scores.png").exists()
    assert not list(out.glob("scores*"))


def test_fingerprint_tells_models_apart_not_dtypes_or_shardings(tiny_pair):
    from minitron_jax.model.sharding import make_mesh
    a, b = mj.from_pretrained(tiny_pair[0]), mj.from_pretrained(tiny_pair[1])
    fa = model_fingerprint(a.config, a.params())
    assert fa["model_config_sha256"] == model_fingerprint(b.config)["model_config_sha256"]  # same shape
    assert fa["model_weights_sha256"] != model_fingerprint(b.config, b.params())["model_weights_sha256"]
    assert model_fingerprint(a.config, mj.from_pretrained(tiny_pair[0], dtype="bfloat16").params()) == fa
    sharded = mj.from_pretrained(tiny_pair[0], mesh=make_mesh(1, 4, 2))
    assert model_fingerprint(sharded.config, sharded.params()) == fa
    p = a.params()
    p["layers"]["down_proj"] = p["layers"]["down_proj"].at[1, 3, 5].add(0.5)  # one weight of the last layer
    assert model_fingerprint(a.config, p)["model_weights_sha256"] != fa["model_weights_sha256"]


def test_scores_of_another_model_are_refused(tiny_pair, tmp_path, capsys):
    d = write_docs(tmp_path / "d", 2, text="zzzz " * 40)
    a, b = mj.from_pretrained(tiny_pair[0]), mj.from_pretrained(tiny_pair[1])
    path = score_model(a, CodePointTokenizer(), d, tmp_path / "s", samples=2, seq_len=16, batch_size=2)
    _, meta = load_scores(path)
    check_scores_match(meta, a.config)  # before loading weights: the config
    check_scores_match(meta, a.config, a.params())  # after: the weights
    with pytest.raises(ScoresError, match=rf"computed on {re.escape(str(tiny_pair[0]))}, whose weights differ from those "
                                          r"of B; re-score B, or pass --force to prune"):
        check_scores_match(meta, b.config, b.params(), model="B", force_hint="--force")
    other = mj.LlamaConfig.from_file(tiny_pair[0] / "config.json")
    import dataclasses
    other = dataclasses.replace(other, intermediate_size=64)
    with pytest.raises(ScoresError, match=r"whose config differs .*\(intermediate_size 96 vs 64\)"):
        check_scores_match(meta, other)
    capsys.readouterr()
    check_scores_match(meta, b.config, b.params(), force=True)  # forced: a warning, no error
    assert "weights differ" in capsys.readouterr().err
    old = {k: v for k, v in meta.items() if not k.startswith("model_")}  # written before fingerprints
    check_scores_match(old, b.config, b.params())
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no model fingerprint" in err
