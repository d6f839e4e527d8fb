"""Plan a distillation run without weights: parameter counts, per-device memory, FLOPs, step time.

Everything is derived from the configs and the same sharding rules the run uses (`sharding.spec_for`
on an abstract mesh), so a Llama-3.1-8B -> 4B plan is printed on a laptop in a second.
Memory per device = teacher parameters (teacher dtype) + student fp32 master weights + AdamW moments
(2 x fp32) + gradients (fp32) + activations. Activations are an estimate: with `remat=full` the
residual stream of every layer ([b, S, H] in the compute dtype) is kept and one layer is recomputed
at a time; without remat every layer keeps its intermediate activations; plus the KL chunk buffers
(4 x [b, chunk, V] fp32, see losses.py).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from minitron_jax.model.config import LlamaConfig
from minitron_jax.model.llama import is_param_spec, param_specs
from minitron_jax.model.sharding import MESH_AXES, resolve_mesh_shape, spec_for
from minitron_jax.train.run_config import RunConfig

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def mesh_sizes(mesh: list[int], devices: int) -> dict[str, int]:
    return dict(zip(MESH_AXES, resolve_mesh_shape(mesh, devices)))


def per_device_param_bytes(cfg: LlamaConfig, sizes: dict[str, int], itemsize: int) -> int:
    """Bytes of one device's shard of every parameter, under the project's sharding rules."""
    mesh = jax.sharding.AbstractMesh(tuple(sizes.values()), tuple(sizes))
    total = 0
    for p in jax.tree.leaves(param_specs(cfg), is_leaf=is_param_spec):
        spec = spec_for(p.axes, p.shape, mesh)
        local = list(p.shape)
        for i, s in enumerate(spec):
            names = (s,) if isinstance(s, str) else (s or ())
            local[i] //= math.prod(sizes[n] for n in names)
        total += int(np.prod(local)) * itemsize
    return total


def activation_bytes(cfg: LlamaConfig, rc: RunConfig, rows_per_device: float, tensor: int = 1) -> float:
    """Rough activation memory of one micro-batch on one device (see module docstring). With a `tensor`
    axis the head, MLP and vocabulary activations are split over it where their size divides (the
    `act_heads` / `act_mlp` / `act_vocab` rules), as `sharding.spec_for` splits them."""
    s, h, f, cb = rc.seq_len, cfg.hidden_size, cfg.intermediate_size, BYTES[rc.compute_dtype or "float32"]
    split = lambda n: tensor if n % tensor == 0 else 1  # noqa: E731
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    q, kv = hq * cfg.head_dim / split(hq), hkv * cfg.head_dim / split(hkv)
    per_layer = rows_per_device * s * (4 * h + 2 * q + 2 * kv + 3 * f / split(f)) * cb  # norms, q/k/v/o, gate/up/act
    per_layer += rows_per_device * hq / split(hq) * s * s * 4  # attention probabilities (fp32)
    residual = rows_per_device * s * h * cb
    layers = cfg.num_hidden_layers
    acts = layers * residual + per_layer if rc.remat == "full" else layers * per_layer
    kl = 4 * rows_per_device * min(rc.chunk_size, s) * cfg.vocab_size / split(cfg.vocab_size) * 4
    return acts + kl


def estimate(teacher: LlamaConfig | None, student: LlamaConfig, rc: RunConfig, devices: int,
             peak_flops_per_device: float, mfu: float) -> dict[str, Any]:
    sizes = mesh_sizes(rc.mesh, devices)
    batch_shards = sizes["data"] * sizes["fsdp"]
    rows = rc.batch_size / rc.grad_accum / batch_shards  # rows per device per micro-batch
    t_item = BYTES[rc.teacher_dtype or rc.compute_dtype or (teacher.dtype if teacher else "float32")]
    stored = bool(rc.teacher_logits) and teacher is not None
    online = teacher if not stored else None  # stored top-k logits: no teacher on the devices
    mem = {"teacher_params": per_device_param_bytes(online, sizes, t_item) if online else 0,
           "student_params_fp32": per_device_param_bytes(student, sizes, 4)}
    mem["optimizer_state"] = 2 * mem["student_params_fp32"]
    mem["gradients"] = mem["student_params_fp32"]
    t = sizes["tensor"]
    mem["activations"] = activation_bytes(student, rc, rows, t) + (
        activation_bytes(online, RunConfig(**{**rc.__dict__, "remat": "full"}), rows, t) / online.num_hidden_layers
        if online else 0)  # the teacher keeps nothing for backward: about one layer at a time
    if stored:  # the step's batch of stored values (bf16) and int32 ids, k per token
        k = rc.top_k or 64
        mem["stored_logits"] = rc.batch_size / batch_shards * rc.seq_len * k * (2 + 4)
    mem["total"] = sum(mem.values())
    tokens = rc.batch_size * rc.seq_len
    flops = tokens * (3 * student.flops_per_token(rc.seq_len)
                      + (online.flops_per_token(rc.seq_len) if online and rc.has_teacher else 0))
    step_s = flops / (devices * peak_flops_per_device * mfu)
    return {"mesh": sizes, "devices": devices, "teacher_params": teacher.param_count() if teacher else None,
            "stored_logits": stored,
            "student_params": student.param_count(), "tokens_per_step": tokens, "flops_per_step": flops,
            "memory_per_device_bytes": mem, "mfu": mfu, "step_time_s": step_s,
            "total_time_h": step_s * rc.steps / 3600, "total_tokens": tokens * rc.steps}


def format_plan(p: dict[str, Any]) -> str:
    gib = lambda b: f"{b / 2**30:,.2f} GiB"  # noqa: E731
    lines = [f"mesh {p['mesh']} on {p['devices']} devices",
             (f"teacher parameters: {p['teacher_params']:,}" + (" (stored top-k logits: the teacher is not on the "
                                                                 "devices)" if p.get("stored_logits") else ""))
             if p["teacher_params"] else "teacher: none (fine-tuning)",
             f"student parameters: {p['student_params']:,}",
             "memory per device:"]
    lines += [f"  {k:<22} {gib(v)}" for k, v in p["memory_per_device_bytes"].items()]
    lines += [f"tokens per step: {p['tokens_per_step']:,}; FLOPs per step: {p['flops_per_step']:.3e}",
              f"estimated step time at {p['mfu']:.0%} MFU: {p['step_time_s']:.2f} s; "
              f"{p['total_tokens']:,} tokens in {p['total_time_h']:.1f} h"]
    return "\n".join(lines)
