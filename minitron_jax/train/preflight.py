"""Checks before any weights or data load, shared by training (`train`), the teacher pass
(`write_teacher_logits`) and `minitron run` (`Pipeline.validate`): joining a multi-process job, the mesh against
the devices and the batch against the mesh (`check_devices`); the models (`check_model`), the teacher/student
pair (`check_pair`: configs, tokenizers, stored logits) and the token stores (`check_data`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax

from minitron_jax.core import multihost
from minitron_jax.core.errors import AOTError, RecipeError, TrainingError
from minitron_jax.data.spec import DataSpec
from minitron_jax.data.store_reader import open_stores
from minitron_jax.io.hf import load_tokenizer
from minitron_jax.model.config import LlamaConfig
from minitron_jax.model.sharding import resolve_mesh_shape
from minitron_jax.train.run_config import RunConfig
from minitron_jax.train.stored_logits import TeacherLogits

MAX_TENSOR = 8  # largest tensor axis check_batch proposes (Llama-3.1 8B has 8 KV heads)


def check_batch(rc: RunConfig, dp: int, devices: int) -> None:
    """Each micro-batch's rows must split evenly over the data-parallel devices (data x fsdp), else the
    rows would be replicated (every device computing every row); refused with sizes that work: other
    batch sizes, other grad_accum values, and the smallest tensor axis (at most MAX_TENSOR) that leaves
    gcd(rows, devices) data-parallel devices, e.g. mesh=[1,-1,4] for 64-row micro-batches on 256 chips."""
    rows = rc.batch_size // rc.grad_accum
    if rows % dp == 0:
        return
    accums = [a for a in range(1, rc.batch_size + 1) if rc.batch_size % a == 0 and (rc.batch_size // a) % dp == 0]
    step = rc.grad_accum * dp
    lo, hi = (rc.batch_size // step) * step, -(-rc.batch_size // step) * step
    sizes = " or ".join(str(b) for b in dict.fromkeys(b for b in (lo, hi) if b > 0))
    tensor = devices // math.gcd(rows, devices)
    mesh = (f", or mesh=[1,-1,{tensor}] ({devices // tensor} fsdp x {tensor} tensor, keeping grad_accum="
            f"{rc.grad_accum})" if 1 < tensor <= MAX_TENSOR else "")
    raise AOTError(f"batch_size={rc.batch_size} / grad_accum={rc.grad_accum} gives micro-batches of {rows} rows, which "
                   f"do not divide over the {dp} data-parallel devices (data x fsdp of mesh={list(rc.mesh)} on "
                   f"{devices} chips); use batch_size={sizes} with grad_accum={rc.grad_accum}"
                   + (f", or grad_accum in {{{', '.join(map(str, accums))}}}" if accums else "")
                   + (mesh or ", or a mesh with fewer data-parallel devices"))


def maybe_initialize_distributed(rc: RunConfig) -> None:
    """Join a multi-process job: from the recipe, else MINITRON_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID,
    else `coordinator_address=auto` (TPU pods, SLURM: JAX detects the cluster); see core.multihost."""
    multihost.join(rc.coordinator_address, rc.num_processes, rc.process_id)


def check_mesh(rc: RunConfig) -> tuple[int, int, int]:
    """The recipe's mesh resolved for the devices here, or a RecipeError naming their count and a mesh that fits."""
    n = jax.device_count()
    try:
        return resolve_mesh_shape(rc.mesh, n)
    except ValueError:
        pass
    keep = [1 if s == -1 else s for s in rc.mesh]
    hint = next(c for c in ([keep[0], -1, keep[2]], [1, -1, keep[2]], [keep[0], -1, 1], [1, -1, 1])
                if n % (c[0] * c[2]) == 0)
    raise RecipeError(f"mesh={rc.mesh} does not fit the {n} devices here (the sizes must multiply to {n}, with -1 "
                      f"for one axis taking what is left); e.g. mesh=[{','.join(map(str, hint))}]")


def check_devices(rc: RunConfig, batch: str | None = "train") -> tuple[int, int, int]:
    """Join the job (a multi-process one), then check the mesh against the devices and the batch against the
    mesh; returns the mesh shape (data, fsdp, tensor). Each process feeds its own rows: the batch and the
    data-parallel devices (data x fsdp) must split over the processes, and each micro-batch's rows over the
    data-parallel devices (`check_batch`). `batch`: "train" (micro-batches of batch_size / grad_accum rows),
    "forward" (the teacher pass: one forward of batch_size rows a step, each process writing its rows) or
    None (the mesh only: `minitron run`, whose stages check their own batches)."""
    maybe_initialize_distributed(rc)
    data, fsdp, tensor = check_mesh(rc)
    procs, forward = jax.process_count(), batch == "forward"
    if batch is None:
        return data, fsdp, tensor
    if forward and rc.batch_size % procs:
        raise RecipeError(f"batch_size={rc.batch_size} must divide by the {procs} processes")
    if not forward and rc.batch_size % (rc.grad_accum * procs):
        raise TrainingError(f"batch_size={rc.batch_size} must divide by grad_accum x processes = "
                            f"{rc.grad_accum} x {procs}")
    if (data * fsdp) % procs:
        if forward:
            raise RecipeError(f"mesh={list(rc.mesh)} has {data * fsdp} data-parallel devices for {procs} processes: "
                              f"each process writes its own rows, so data x fsdp must be a multiple of {procs}")
        raise RecipeError(f"mesh={list(rc.mesh)} has {data * fsdp} data-parallel devices (data x fsdp) for "
                          f"{procs} processes: each process loads its own rows, so data x fsdp must "
                          f"be a multiple of {procs}; e.g. mesh=[1,-1,{tensor}]")
    # rows that do not divide would be replicated, not split
    check_batch(dataclasses.replace(rc, grad_accum=1) if forward else rc, data * fsdp, jax.device_count())
    return data, fsdp, tensor


def check_model(rc: RunConfig, name: str, path) -> LlamaConfig:
    """The config of the `name` model ("student", "teacher") at `path`, which must reach seq_len."""
    cfg = LlamaConfig.from_file(path)
    if rc.seq_len > cfg.max_position_embeddings:
        raise TrainingError(f"seq_len={rc.seq_len} exceeds the {name}'s max_position_embeddings="
                            f"{cfg.max_position_embeddings}; lower seq_len")
    cfg.check_seq_len(rc.seq_len, f"seq_len for the {name}")  # a sliding window shorter than seq_len
    return cfg


def check_data(rc: RunConfig, model, who: str) -> None:
    """Token stores (or a blend) must hold the tokenizer of `model` (sha256); text cannot be split by
    validation_fraction."""
    if not DataSpec(rc.data).is_text:
        open_stores(rc.data, model, who)
    elif rc.validation_fraction:
        raise RecipeError(f"validation_fraction={rc.validation_fraction} splits token stores; {rc.data} is text: "
                          f"tokenize it (`minitron tokenize {rc.data} --tokenizer TEACHER --out STORE`) or set "
                          "validation_fraction=0")


def check_pair(rc: RunConfig) -> tuple[LlamaConfig, LlamaConfig | None, Any]:
    """Configs and tokenizers (which must not hold ids beyond the embedding), stored teacher logits and token
    stores, checked before any weights or data are touched (the devices: `check_devices`)."""
    s_cfg = check_model(rc, "student", rc.student)
    t_cfg = check_model(rc, "teacher", rc.teacher) if rc.has_teacher else None
    if t_cfg is not None and t_cfg.model_type != s_cfg.model_type:
        raise TrainingError(f"the teacher {rc.teacher} is a {t_cfg.family.architecture} and the student {rc.student} "
                            f"a {s_cfg.family.architecture}: minitron distils a student pruned from its teacher, of "
                            "the same family; prune the student from this teacher")
    tok = load_tokenizer(rc.student, vocab_size=s_cfg.vocab_size)
    if t_cfg is not None:
        if t_cfg.vocab_size != s_cfg.vocab_size:
            raise TrainingError(f"teacher vocabulary ({t_cfg.vocab_size}) != student vocabulary ({s_cfg.vocab_size}): "
                                "logit distillation needs one shared vocabulary; prune the student from this teacher")
        t_tok = load_tokenizer(rc.teacher, vocab_size=t_cfg.vocab_size)
        if t_tok.get_vocab() != tok.get_vocab() or (t_tok.bos_token_id, t_tok.eos_token_id) != (tok.bos_token_id, tok.eos_token_id):
            raise TrainingError(f"the tokenizers of {rc.teacher} and {rc.student} differ: the same token id would mean "
                                "different text to teacher and student; copy the teacher's tokenizer files to the student")
    if rc.teacher_logits is not None:  # their teacher, tokenizer, token store and rows must be this run's
        store = TeacherLogits(rc.teacher_logits)
        if rc.top_k and rc.top_k != store.k:
            raise TrainingError(f"top_k={rc.top_k}, but teacher_logits={rc.teacher_logits} holds the top {store.k}; "
                                f"set top_k=0 or top_k={store.k}")
        store.check_run(rc, rc.teacher, rc.steps * rc.batch_size)
    if t_cfg is not None:  # the stores' tokenizer must be the models' (sha256)
        check_data(rc, rc.teacher, "the teacher")
    else:
        check_data(rc, rc.student, "the model")
    return s_cfg, t_cfg, tok
