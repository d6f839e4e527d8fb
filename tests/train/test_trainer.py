"""Distillation (train/trainer.py): learning works, SPMD and multi-process runs give the 1-device trajectory,
a killed job resumes exactly, and bad input stops before work with a clear message. Options: gradient
accumulation and remat leave the update unchanged, bf16 compute, CE-only distillation and the intermediate
hidden-state loss run, clip=0 means no clipping, teacher correction lowers the LM loss. A run trains from
a token store of its teacher's tokenizer. Preemption is in test_trainer_preemption.py."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from distill_helpers import QUIET, make_pair, metrics, recipe, run_cli, short_documents, train_with_hook
from helpers import tokenize_store

from minitron_jax.core.errors import DataError
from minitron_jax.io.hf import open_checkpoint
from minitron_jax.run.cli import main
from minitron_jax.train.run_config import RunConfig, load_recipe
from minitron_jax.train.trainer import train

COMMON = ["batch_size=4", "seq_len=64", "holdout=[tempest]", "eval_every=100", "peak_tflops=1", "warmup=1"]


def args(pair, out, *extra):
    t, s, d = pair
    return [f"teacher={t}", f"student={s}", f"data={d}", f"out={out}", *COMMON, *extra]


@pytest.fixture(scope="module")
def short_pair(pair, tmp_path_factory):
    """The pair with many short documents: first_fit rows then hold very different numbers of tokens."""
    return (*pair[:2], short_documents(pair[2], tmp_path_factory.mktemp("short") / "data"))


# the reference run and the runs compared with it: first_fit packing and 2 micro-batches per step, so
# that every comparison also checks the token weighting of gradient accumulation; micro-batches of 4
# rows split over the 4 data-parallel devices (data x fsdp)
PACKED = ("steps=10", "save_every=5", "mesh=[2,2,2]", "packing=first_fit", "grad_accum=2", "batch_size=8")


def test_kd_halves_held_out_kl(tmp_path):
    """30 steps: a student with layer 2 of 4 removed recovers more than half of its held-out KL."""
    depth_pair = make_pair(tmp_path / "pair", sharpen=8.0, target="drop_layers=2")
    rc = load_recipe(None, args(depth_pair, tmp_path / "run", "steps=30", "lr=1e-3", "warmup=3", "eval_every=30",
                                "save_every=30", "batch_size=16", "mesh=[1,1,8]"))
    summary = train(rc, log=lambda m: None)
    start, end = summary["start_eval"]["held_out_kl"], summary["held_out_kl"]
    print(f"held-out KL: step 0 {start:.4f} -> step 30 {end:.4f}")
    assert end < 0.5 * start
    # the run leaves an HF student that transformers loads (exported in the stored dtype)
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student_hf") is not None
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert all({"loss", "kl", "ce", "grad_norm", "lr", "tokens_per_s", "mfu"} <= set(r) for r in rows)
    assert list((tmp_path / "run" / "tensorboard").iterdir())


@pytest.fixture(scope="module")
def reference(short_pair, tmp_path_factory):
    """10 steps on 8 devices, (2, 2, 2) mesh, in a fresh process: the trajectory the others must match."""
    out = tmp_path_factory.mktemp("ref") / "run"
    run_cli(["distill", *args(short_pair, out, *PACKED)])
    return out


def test_mesh_matches_single_device(short_pair, reference, tmp_path):
    # same recipe (the LR schedule depends on `steps`), one device
    run_cli(["distill", *args(short_pair, tmp_path / "one", *PACKED, "mesh=[1,1,1]")], devices=1)
    ref, one = metrics(reference)[:5], metrics(tmp_path / "one")[:5]
    np.testing.assert_allclose([r["loss"] for r in one], [r["loss"] for r in ref], rtol=1e-5)
    assert [r["batch_fingerprint"] for r in one] == [r["batch_fingerprint"] for r in ref]


def test_two_processes_match_one(short_pair, reference, tmp_path):
    """launch/local.sh: two processes with 4 fake devices each, joined by jax.distributed on 127.0.0.1.
    Each process's rows form its part of every micro-batch, so which rows share a micro-batch depends on
    the process count: only the token-weighted accumulation makes the losses agree."""
    out = tmp_path / "mp"
    env = {**os.environ, "PYTHON": sys.executable, "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
    proc = subprocess.run(["bash", "launch/local.sh", "2", "4", "distill", *args(short_pair, out, *PACKED)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[p0]" in proc.stdout and "[p1]" in proc.stdout
    np.testing.assert_allclose([r["loss"] for r in metrics(out)][:5], [r["loss"] for r in metrics(reference)[:5]],
                               rtol=1e-5)
    assert (out / "student_hf" / "model.safetensors").exists()


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux) and root")
def test_hosts_that_read_different_data_stop_before_training(pair, tmp_path):
    """Each process reads `data` from its own disk (a private tmpfs at the same path, in its own mount namespace),
    and process 1's copy has lost the second half of one play: both stop before any step with one message naming
    the training data, rather than train on different rows (or hang at a collective)."""
    from distill_helpers import two_processes

    t, s, d = pair
    other = shutil.copytree(d, tmp_path / "other")
    play = other / "macbeth_gut.txt"
    play.write_text(play.read_text()[: len(play.read_text()) // 2])
    disk = tmp_path / "disk"
    disk.mkdir()
    fill = f'if [ "$MINITRON_PROCESS_ID" = 0 ]; then cp {d}/* {disk}/; else cp {other}/* {disk}/; fi'
    mount = ("unshare", "-m", "sh", "-c", f'mount -t tmpfs tmpfs {disk} && {fill} && exec "$0" "$@"')
    out = tmp_path / "out"  # shared by both: only the data differs
    done = two_processes(["-m", "minitron_jax.run.cli"], ["distill", *args((t, s, disk), out, "steps=2")], devices=2,
                         prefix=mount, timeout=300)
    assert [p.returncode for p in done] == [1, 1], done[0].stderr[-3000:] + done[1].stderr[-3000:]
    for p in done:
        assert ("the processes of the job do not see the same training data (rows and splits): "
                "training rows (process 1)") in p.stderr, p.stderr[-3000:]
        assert "step 0 held-out" not in p.stdout + p.stderr  # stopped before the weights loaded
    assert not (out / "checkpoints").exists() and not (out / "student_hf").exists()
    assert not list(disk.iterdir())  # each process's data lived in its own tmpfs


def test_killed_job_resumes_exactly(short_pair, reference, tmp_path):
    out = tmp_path / "killed"
    crashed = train_with_hook("kill", 7, args(short_pair, out, *PACKED), check=False)
    assert crashed.returncode == -9, crashed.stdout[-3000:] + crashed.stderr[-3000:]  # SIGKILL: no cleanup ran
    assert not (out / "student_hf").exists()
    resumed = run_cli(["distill", *args(short_pair, out, *PACKED, "resume=true")])
    assert "at step 5" in resumed.stdout + resumed.stderr
    runs = metrics(out)  # steps 1-7 of the killed run, then 6-10 of the resumed one
    assert [r["step"] for r in runs] == [1, 2, 3, 4, 5, 6, 7, 6, 7, 8, 9, 10]
    ref = metrics(reference)
    assert [r["batch_fingerprint"] for r in runs[7:]] == [r["batch_fingerprint"] for r in ref[5:]]
    a, b = open_checkpoint(out / "student_hf"), open_checkpoint(reference / "student_hf")
    for name in a:
        np.testing.assert_allclose(np.asarray(a[name].tensor(name)), np.asarray(b[name].tensor(name)),
                                   rtol=0, atol=1e-7, err_msg=name)


def test_sigterm_checkpoints_and_resumes(short_pair, reference, tmp_path):
    """A hook raises SIGTERM at step 3 (save_every=100: no checkpoint is due): the trainer finishes the
    step, checkpoints it, `minitron distill` exits 143; the resumed run ends with the uninterrupted run's
    weights."""
    out = tmp_path / "preempted"
    stopped = train_with_hook("sigterm", 3, args(short_pair, out, *PACKED, "save_every=100"), check=False)
    log = stopped.stdout + stopped.stderr
    assert stopped.returncode == 143, log[-3000:]
    assert "SIGTERM: saved step 3" in log and '"preempted_at": 3' in log, log[-3000:]
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [3]
    assert not (out / "student_hf").exists()
    resumed = run_cli(["distill", *args(short_pair, out, *PACKED, "save_every=100", "resume=true")])
    assert "at step 3" in resumed.stdout + resumed.stderr
    assert [r["step"] for r in metrics(out)] == list(range(1, 11))
    a, b = open_checkpoint(out / "student_hf"), open_checkpoint(reference / "student_hf")
    for name in a:
        np.testing.assert_allclose(np.asarray(a[name].tensor(name)), np.asarray(b[name].tensor(name)),
                                   rtol=0, atol=1e-7, err_msg=name)


# ---------------------------------------------------------------------------- clear errors
def test_errors_before_work(pair, tmp_path):
    t, s, d = pair
    base = args(pair, tmp_path / "e", "steps=2", "mesh=[1,1,8]")
    # vocabulary mismatch
    other = tmp_path / "other"
    shutil.copytree(s, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["vocab_size"] = 49153
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SystemExit, match="vocabulary"):
        main(["distill", *base, f"student={other}"])
    # tokenizer mismatch (same size, different tokens)
    shutil.rmtree(other)
    shutil.copytree(s, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[100], list(vocab)[101]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(SystemExit, match="tokenizers .* differ"):
        main(["distill", *base, f"student={other}"])
    # data missing / empty
    with pytest.raises(SystemExit, match="does not exist"):
        main(["distill", *base, f"data={tmp_path / 'nope'}"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no non-empty documents"):
        main(["distill", *base, f"data={tmp_path / 'empty'}"])
    # sequence longer than the model's positions
    with pytest.raises(SystemExit, match="max_position_embeddings"):
        main(["distill", *base, "seq_len=100000"])
    # unknown key
    with pytest.raises(SystemExit, match="unknown recipe keys"):
        main(["distill", *base, "stepz=3"])
    assert not (tmp_path / "e" / "checkpoints").exists()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(pair, tmp_path):
    import re
    out = tmp_path / "nan"
    # here the gradient goes non-finite a step before the loss does (lr=1e30): the check on grad_norm
    # stops the run then, before the NaN parameters that step made are saved
    with pytest.raises(SystemExit, match=r"(loss|grad_norm) is (nan|inf) at step \d+: stopped without saving") as err:
        main(["distill", *args(pair, out, "steps=6", "save_every=1", "lr=1e30", "warmup=0", "clip=1e30",
                                "mesh=[1,1,8]")])
    bad, good = map(int, re.search(r"at step (\d+):.*last good checkpoint is step (\d+)", str(err.value)).groups())
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert good == bad - 1 == steps[-1]  # the NaN state was never written; the one before it was
    assert not (out / "student_hf").exists()


# ---------------------------------------------------------------------------- options
def losses(out):
    return [r["loss"] for r in metrics(out)]


def test_grad_accum_and_remat_do_not_change_the_update(pair, tmp_path):
    train(recipe(pair, tmp_path / "a", "steps=3"), log=QUIET)
    train(recipe(pair, tmp_path / "b", "steps=3", "grad_accum=2", "remat=full"), log=QUIET)
    np.testing.assert_allclose(losses(tmp_path / "b"), losses(tmp_path / "a"), rtol=1e-5)


def exported(out) -> dict[str, np.ndarray]:
    ck = open_checkpoint(out / "student_hf")
    return {name: np.asarray(ck[name].tensor(name)) for name in ck}


@pytest.mark.parametrize("hidden", [0.0, 1.0])
def test_grad_accum_with_first_fit_equals_the_full_batch(pair, tmp_path, hidden):
    """first_fit rows hold different numbers of real tokens: 4 micro-batches must give the full batch's
    token-mean update (loss sums and token counts accumulated, divided once), not the mean of 4 means."""
    data = short_documents(pair[2], tmp_path / "short")
    # eps=1e-6: AdamW's g / (sqrt(v) + eps) would otherwise turn fp32 summation-order noise in near-zero
    # gradients (rare tokens' embedding rows) into parameter differences above 1e-6
    common = ("steps=3", "packing=first_fit", "batch_size=8", "lr=1e-3", "warmup=0", "eps=1e-6",
              f"hidden_weight={hidden}", f"data={data}")
    train(recipe(pair, tmp_path / "full", *common), log=QUIET)
    train(recipe(pair, tmp_path / "acc", *common, "grad_accum=4"), log=QUIET)
    full, acc = exported(tmp_path / "full"), exported(tmp_path / "acc")
    for key in ("loss", "kl", "ce", "grad_norm") + (("hidden_loss",) if hidden else ()):
        np.testing.assert_allclose([r[key] for r in metrics(tmp_path / "acc")],
                                   [r[key] for r in metrics(tmp_path / "full")], rtol=1e-6, err_msg=key)
    for name in full:
        np.testing.assert_allclose(acc[name], full[name], rtol=0, atol=1e-6, err_msg=name)


def test_bf16_compute_runs_close_to_fp32(pair, tmp_path):
    s = train(recipe(pair, tmp_path / "bf16", "steps=3", "compute_dtype=bfloat16"), log=QUIET)
    ref = train(recipe(pair, tmp_path / "fp32", "steps=3"), log=QUIET)
    np.testing.assert_allclose(losses(tmp_path / "bf16"), losses(tmp_path / "fp32"), rtol=0.05)
    assert s["step"] == 3 and ref["step"] == 3


def test_ce_only_distillation_trains_and_evaluates(pair, tmp_path):
    """kl_weight=0, ce_weight=1: no crash at the first evaluation; the loss is the CE; the held-out KL and
    loss of the untouched student are those a KL-weighted run reports."""
    s = train(recipe(pair, tmp_path / "ce", "steps=2", "kl_weight=0", "ce_weight=1", "eval_every=1"), log=QUIET)
    ref = train(recipe(pair, tmp_path / "kl", "steps=1"), log=QUIET)
    rows = metrics(tmp_path / "ce")
    assert [r["step"] for r in rows] == [1, 2] and all("held_out_kl" in r for r in rows)
    assert all(abs(r["loss"] - r["ce"]) <= 1e-6 * r["ce"] for r in rows)
    for k in ("held_out_loss", "held_out_kl"):
        np.testing.assert_allclose(s["start_eval"][k], ref["start_eval"][k], rtol=1e-6)


def torch_layer_outputs(model_dir, ids, mask) -> np.ndarray:
    """[L, B, S, H] outputs of every decoder layer after the final norm, from transformers (forward hooks)."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    outs = []
    hooks = [layer.register_forward_hook(lambda m, i, o: outs.append(o[0] if isinstance(o, tuple) else o))
             for layer in model.model.layers]
    with torch.no_grad():
        model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long))
        states = np.stack([model.model.norm(o).numpy() for o in outs]).astype(np.float64)
    for h in hooks:
        h.remove()
    return states


def test_hidden_loss_pairs_the_layers_and_channels_pruning_kept(tmp_path):
    """A 32-layer teacher pruned to layers 0..14 and 31 and 12 of 16 hidden channels: the prune record
    beside the student gives the layer map and the initial projection (the selection of the kept
    channels), and the trainer's hidden loss equals a NumPy computation on transformers' hidden states."""
    import jax
    import jax.numpy as jnp
    from helpers import save_tiny

    import minitron_jax as mj
    from minitron_jax.io.hf import save_params
    from minitron_jax.model.losses import KDConfig
    from minitron_jax.prune.pruning import prune
    from minitron_jax.prune.record import prune_record, save_prune_record
    from minitron_jax.train.objective import hidden_init, make_objective
    from minitron_jax.train.run_config import RunConfig

    save_tiny(tmp_path / "t", vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=32,
              num_attention_heads=4, num_key_value_heads=2, head_dim=4)
    teacher = mj.from_pretrained(tmp_path / "t")
    t_cfg = teacher.config
    hidden_scores = np.random.default_rng(0).random(16)
    target = "drop_layers=15-30,hidden_size=12"
    s_params, s_cfg = prune(teacher.params(), t_cfg, {"hidden": hidden_scores}, target)
    save_params(s_params, s_cfg, tmp_path / "s", source=tmp_path / "t")
    save_prune_record(tmp_path / "s", prune_record(t_cfg, {"hidden": hidden_scores}, target, source=tmp_path / "t"))

    layers, proj = hidden_init(tmp_path / "s", s_cfg, t_cfg)
    kept = np.sort(np.argsort(-hidden_scores)[:12])  # the 12 highest-scored channels, in their order
    assert layers.tolist() == list(range(15)) + [31]
    expected_proj = np.zeros((12, 16), np.float32)
    expected_proj[np.arange(12), kept] = 1.0
    np.testing.assert_array_equal(proj, expected_proj)
    # no record: proportional depth and eye (today's fallback)
    (tmp_path / "s" / "minitron_prune.json").unlink()
    fallback = hidden_init(tmp_path / "s", s_cfg, t_cfg)
    assert fallback[0].tolist() == [2 * i + 1 for i in range(16)] and np.array_equal(fallback[1], np.eye(12, 16))

    rng = np.random.default_rng(1)
    ids = rng.integers(0, 64, (2, 10)).astype(np.int32)
    mask = np.ones((2, 10), np.float32)
    mask[1, 7:] = 0  # right padding
    rc = RunConfig(teacher=str(tmp_path / "t"), student=str(tmp_path / "s"), data="-", hidden_weight=1.0)
    objective = make_objective(rc, s_cfg, t_cfg, KDConfig(hidden_weight=1.0), layers)
    mb = {"input_ids": jnp.asarray(ids), "segment_ids": jnp.asarray(mask.astype(np.int32)), "mask": jnp.asarray(mask)}
    tmask = mask * np.concatenate([mask[:, 1:], np.zeros((2, 1))], 1)  # a real next token
    parts, _ = jax.jit(objective)({"model": s_params, "proj": jnp.asarray(proj)}, teacher.params(), mb,
                                  jnp.float32(tmask.sum()))

    s_states = torch_layer_outputs(tmp_path / "s", ids, mask)        # [16, B, S, 12]
    t_states = torch_layer_outputs(tmp_path / "t", ids, mask)[layers]  # [16, B, S, 16]: teacher layers 0..14, 31
    sp = s_states @ expected_proj.astype(np.float64)
    cos = (sp * t_states).sum(-1) / (np.linalg.norm(sp, axis=-1) * np.linalg.norm(t_states, axis=-1))
    ref = ((1 - cos) * tmask).sum() / (16 * tmask.sum())
    np.testing.assert_allclose(float(parts["hidden"]), ref, rtol=1e-5)


def test_teacher_correction_lowers_lm_loss(pair, tmp_path):
    t, _, d = pair
    rc = load_recipe(None, [f"student={t}", f"data={d}", f"out={tmp_path / 'ft'}", "mode=finetune", "steps=20",
                            "lr=1e-3", "warmup=2", "batch_size=8", "seq_len=64", "holdout=[tempest]",
                            "eval_every=20", "save_every=100", "peak_tflops=1", "mesh=[1,1,8]"])
    s = train(rc, log=QUIET)
    assert s["held_out_loss"] < s["start_eval"]["held_out_loss"] - 0.5
    assert "held_out_kl" not in s and (tmp_path / "ft" / "student_hf" / "config.json").exists()


def test_clip_zero_means_no_clipping():
    """clip=0 updates exactly as an unreachable clip does (a huge gradient passes whole: before, it zeroed
    every update); clip=1 does not. Two steps, so that Adam's moments see the clipped scale."""
    import jax.numpy as jnp

    from minitron_jax.train.steps import make_optimizer

    params = {"w": jnp.ones((3,)), "norm": jnp.ones((2,))}
    grads = [{"w": jnp.asarray([300.0, -40.0, 5.0]), "norm": jnp.asarray([1.0, 2.0])},
             {"w": jnp.asarray([0.1, 0.2, -0.3]), "norm": jnp.asarray([0.0, 0.1])}]

    def updates(clip):
        tx, _ = make_optimizer(RunConfig(clip=clip, warmup=0, steps=10, weight_decay=0.0))
        state, out = tx.init(params), []
        for g in grads:
            upd, state = tx.update(g, state, params)
            out.append(np.asarray(upd["w"]))
        return np.stack(out)
    np.testing.assert_array_equal(updates(0.0), updates(1e30))
    assert np.abs(updates(0.0)).min() > 0 and not np.allclose(updates(1.0), updates(0.0))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_weight_decay_skips_norms_and_biases(family):
    """With zero gradients AdamW's update is the decay alone (-lr x wd x w): every matrix and the embedding
    decay; the norms, Qwen3's q/k norms and Qwen2's biases do not."""
    import jax
    import jax.numpy as jnp

    from minitron_jax.model.config import LlamaConfig
    from minitron_jax.model.llama import init_params
    from minitron_jax.train.steps import make_optimizer

    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=4, model_type=family)
    params = jax.tree.map(lambda x: x + 1.0, init_params(cfg, jax.random.key(0)))  # biases too: non-zero
    tx, schedule = make_optimizer(RunConfig(warmup=0, steps=10, weight_decay=0.1, lr=1e-2, min_lr=0.0))
    upd, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    flat = {jax.tree_util.keystr(k): (np.asarray(u), np.asarray(p)) for (k, u), p in
            zip(jax.tree_util.tree_flatten_with_path(upd)[0], jax.tree.leaves(params))}
    skipped = {k for k in flat if "norm" in k or "bias" in k}
    assert len(skipped) == 3 + {"llama": 0, "qwen2": 3, "qwen3": 2}[family]  # + input/post norms, final norm
    for k, (u, p) in flat.items():
        want = np.zeros_like(p) if k in skipped else -float(schedule(0)) * 0.1 * p
        np.testing.assert_allclose(u, want, rtol=1e-6, err_msg=k)


# ---------------------------------------------------------------------------- training from a token store
def test_distill_from_a_store_and_tokenizer_agreement(tmp_path, tok_dir):
    """A run trains from a store of its teacher's tokenizer; a store of another tokenizer stops it before any
    weights load, naming both."""
    from distill_helpers import make_pair

    from minitron_jax.train.run_config import RunConfig
    from minitron_jax.train.trainer import train
    teacher, student, text = make_pair(tmp_path)
    good = tokenize_store(text, teacher, tmp_path / "good")
    bad = tokenize_store(text, tok_dir, tmp_path / "bad")
    rc = dict(teacher=str(teacher), student=str(student), seq_len=32, batch_size=8, steps=2, warmup=0,
              eval_every=1, eval_batches=1, save_every=100, holdout=["tempest"], validation_fraction=0.3,
              peak_tflops=1.0, packing="first_fit")
    s = train(RunConfig(**rc, data=str(good), out=str(tmp_path / "run")).validate(), log=lambda m: None)
    assert s["step"] == 2 and np.isfinite(s["loss"]) and "held_out_kl" in s
    with pytest.raises(DataError) as e:
        train(RunConfig(**rc, data=str(bad), out=str(tmp_path / "run2")).validate(), log=lambda m: None)
    from minitron_jax.data.token_store import tokenizer_identity
    assert tokenizer_identity(tok_dir)[:12] in str(e.value) and tokenizer_identity(teacher)[:12] in str(e.value)
    assert not (tmp_path / "run2" / "checkpoints").exists()


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_family_distills_sharded(tmp_path, family):
    """Mistral, Qwen2 (biases) and Qwen3 (q/k norms): a width-pruned student of each family distils on a
    (2, 2, 2) mesh of 8 devices (held-out KL falls), and the run's export is that family for transformers."""
    from transformers import AutoModelForCausalLM

    fam_pair = make_pair(tmp_path / "pair", sharpen=8.0, family=family)
    rc = load_recipe(None, args(fam_pair, tmp_path / "run", "steps=10", "lr=3e-4", "warmup=1", "eval_every=10",
                                "save_every=10", "batch_size=8", "mesh=[2,2,2]"))
    summary = train(rc, log=lambda m: None)
    start, end = summary["start_eval"]["held_out_kl"], summary["held_out_kl"]
    print(f"{family} held-out KL: step 0 {start:.4f} -> step 10 {end:.4f}")
    assert np.isfinite([r["loss"] for r in metrics(tmp_path / "run")]).all() and end < 0.85 * start
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student_hf")
    assert (hf.config.model_type, hf.config.hidden_size) == (family, 54)
