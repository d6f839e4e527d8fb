"""Checks before any work (train/preflight.py): a mesh that does not fit the devices, a tokenizer larger than
the embedding and a batch that does not split over the data-parallel devices are refused before any
weights or data load, with a message that names what would fit."""

import pytest
from distill_helpers import QUIET, recipe

from minitron_jax.core.errors import RecipeError
from minitron_jax.run.cli import main
from minitron_jax.train.run_config import RunConfig
from minitron_jax.train.trainer import train

# `minitron distill` words of a short run (as in train/test_trainer_preemption.py)
COMMON = ["seq_len=64", "holdout=[tempest]", "eval_every=100", "peak_tflops=1", "warmup=1", "save_every=100"]


def args(pair, out, *extra):
    t, s, d = pair
    return [f"teacher={t}", f"student={s}", f"data={d}", f"out={out}", *COMMON, *extra]


def test_mesh_that_does_not_fit_the_devices_is_refused_before_loading(pair, tmp_path, no_weight_reads):
    """8 devices here: 3 does not divide them; the message names the count and a mesh that fits."""
    import jax

    from minitron_jax.train.preflight import check_mesh
    assert jax.device_count() == 8
    with pytest.raises(RecipeError, match=r"mesh=\[1, -1, 3\] does not fit the 8 devices here .*e.g. mesh=\[1,-1,1\]"):
        train(recipe(pair, tmp_path / "m", "mesh=[1,-1,3]", "steps=2"), log=QUIET)
    with pytest.raises(RecipeError, match=r"mesh=\[2, 2, 4\] does not fit the 8 devices .*e.g. mesh=\[2,-1,4\]"):
        check_mesh(RunConfig(mesh=[2, 2, 4]))
    assert check_mesh(RunConfig(mesh=[2, -1, 2])) == (2, 2, 2)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("who", ["student", "teacher"])
def test_tokenizer_larger_than_the_embedding_is_refused_before_loading(pair, tmp_path, no_weight_reads, who):
    """A tokenizer that can emit ids beyond vocab_size (here 512 rows, 520 tokens) gave NaN losses that
    the trainer blamed on the learning rate; now check_pair refuses it, naming both numbers."""
    import shutil

    from transformers import AutoTokenizer

    from minitron_jax.core.errors import CheckpointError
    t, s, d = pair
    big = shutil.copytree(t if who == "teacher" else s, tmp_path / who)
    tok = AutoTokenizer.from_pretrained(big)
    tok.add_tokens([f"<extra_{i}>" for i in range(8)])
    tok.save_pretrained(big)
    assert len(tok) == 520
    paths = {"teacher": t, "student": s, who: big}
    with pytest.raises(CheckpointError, match=f"the tokenizer of {big} has 520 tokens but the model's embedding has "
                                              "only 512 rows"):
        train(recipe((paths["teacher"], paths["student"], d), tmp_path / "tok", "steps=2"), log=QUIET)
    assert not (tmp_path / "tok").exists()


@pytest.mark.parametrize("extra, message", [
    (["batch_size=4"], r"batch_size=4 / grad_accum=1 gives micro-batches of 4 rows, which do not divide over the 8 "
                       r"data-parallel devices \(data x fsdp of mesh=\[1, -1, 1\] on 8 chips\); use batch_size=8 with "
                       r"grad_accum=1, or mesh=\[1,-1,2\] \(4 fsdp x 2 tensor, keeping grad_accum=1\)"),
    (["batch_size=8", "grad_accum=4", "mesh=[2,2,2]"],
     r"micro-batches of 2 rows, which do not divide over the 4 .*mesh=\[2, 2, 2\].*use batch_size=16 with grad_accum=4, "
     r"or grad_accum in \{1, 2\}"),
    (["batch_size=16", "grad_accum=4"], r"micro-batches of 4 rows.* over the 8 .*use batch_size=32 with grad_accum=4, "
                                        r"or grad_accum in \{1, 2\}"),
])
def test_batch_that_does_not_split_over_the_mesh_is_refused(pair, tmp_path, extra, message):
    """`minitron distill` on 8 fake devices: rows that do not divide over data x fsdp would be computed
    on several devices each (sharding.spec_for replicates what does not divide); refused before any
    weights or data load, with sizes that work."""
    import jax
    assert jax.device_count() == 8
    with pytest.raises(SystemExit, match=message):
        main(["distill", *args(pair, tmp_path / "b", "steps=2", *extra)])
    assert not (tmp_path / "b").exists()
