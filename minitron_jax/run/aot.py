"""Ahead-of-time compilation of a run's steps for a Cloud TPU topology, on any machine (no TPU needed).

With the `tpu` extra (`pip install -e .[tpu]`, which brings libtpu), `jax.experimental.topologies`
describes a TPU slice's devices; the run's own mesh is built over them and the exact jitted functions
`trainer.train` and `importance.compute_scores` execute are lowered with abstract arguments
(ShapeDtypeStruct + NamedSharding, from `distill.build_steps`) and compiled. XLA then reports each step's
per-device argument / output / temp / alias bytes (`memory_analysis`) and FLOPs (`cost_analysis`), which
`compile_steps` puts next to the chip's HBM and the analytic FLOP count (`LlamaConfig.flops_per_token`).

Figures are per device and per optimizer step (the train step holds all grad_accum micro-batches; the
score and eval steps one [b, S] batch of b = batch_size / grad_accum rows). The decode step is one token of
`minitron generate` (`eval.generate.Generator.decode`) for the student, b rows, a KV cache of S slots in the
compute dtype; its `kv_cache_bytes` is the cache's share of each device (`kv_cache.cache_bytes`).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import time
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from minitron_jax.core.errors import AOTError
from minitron_jax.eval.generate import Generator
from minitron_jax.io.orbax_model import abstract_params
from minitron_jax.model.config import LlamaConfig
from minitron_jax.model.kv_cache import cache_bytes
from minitron_jax.model.llama import unrolled_layers
from minitron_jax.model.sharding import make_mesh, named_sharding, resolve_mesh_shape
from minitron_jax.prune.importance import ScoreConfig, init_state, make_step
from minitron_jax.train.objective import kd_config
from minitron_jax.train.preflight import check_batch
from minitron_jax.train.run_config import RunConfig
from minitron_jax.train.steps import build_steps


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # get_topology_desc's topology_name
    chip_config: str  # "megacore" (v4 / v5p: one device per chip) or "default"
    chips_per_host: tuple[int, int, int]
    hbm_bytes: int  # per chip
    peak_tflops: float  # bf16 dense, per chip (for the analytic plan's step time)


GB, GiB = 10**9, 2**30
# HBM per chip from the Cloud TPU system-architecture pages (docs.cloud.google.com/tpu/docs/v5p, /v5e, /v6e,
# /v4): v5p "95 GB", v5e "16 GB", v6e "32 GB", v4 "32 GiB". GB is read as 10^9 bytes (the smaller reading).
# Peak bf16 per chip from the same pages: 459, 197, 918, 275 TFLOPS.
TOPOLOGIES: dict[str, Topology] = {
    "v5p-128": Topology("v5p:4x4x4", "megacore", (2, 2, 1), 95 * GB, 459.0),  # 64 chips
    "v5e-256": Topology("v5e:16x16", "default", (2, 2, 1), 16 * GB, 197.0),  # 256 chips
    "v6e-256": Topology("v6e:16x16", "default", (2, 2, 1), 32 * GB, 918.0),  # 256 chips
    "v4-128": Topology("v4:4x4x4", "megacore", (2, 2, 1), 32 * GiB, 275.0),  # 64 chips
}


def topology_devices(topology: str) -> list:
    """The devices of a named TPU slice, described by libtpu (no TPU hardware involved)."""
    if topology not in TOPOLOGIES:
        raise AOTError(f"--compile {topology}: unknown topology; choose one of {', '.join(TOPOLOGIES)}")
    if importlib.util.find_spec("libtpu") is None:
        raise AOTError(f"--compile {topology} needs libtpu to compile for a TPU: install the extra with "
                       "`pip install -e .[tpu]` (no TPU is needed)")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no cloud metadata server: this is not a TPU VM
    from jax.experimental import topologies
    t = TOPOLOGIES[topology]
    try:
        return list(topologies.get_topology_desc(topology_name=t.name, platform="tpu", chip_config_name=t.chip_config,
                                                 chips_per_host_bounds=t.chips_per_host, num_slices=1).devices)
    except Exception as e:  # libtpu / PJRT raise several types
        if "lockfile" in str(e):
            raise AOTError(f"--compile {topology}: another process here is using libtpu (/tmp/libtpu_lockfile); wait "
                           "for it to end, or set ALLOW_MULTIPLE_LIBTPU_LOAD=1 when it only compiles") from e
        raise AOTError(f"--compile {topology}: libtpu could not describe {t.name} ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}); reinstall the extra with `pip install -e .[tpu]`"
                       ) from e






def analytic_flops(rc: RunConfig, s_cfg: LlamaConfig, t_cfg: LlamaConfig | None, devices: int) -> dict[str, float]:
    """Matmul FLOPs per device per step from `LlamaConfig.flops_per_token`: the student's forward, its
    backward (2x forward), and with remat=full one more forward recomputed in each backward; with the
    hidden-state loss and grad_accum > 1 the train step runs two backward passes per micro-batch
    (distill.make_train_step). The frozen teacher runs one forward."""
    S, rows = rc.seq_len, rc.batch_size // rc.grad_accum
    f_s = s_cfg.flops_per_token(S)
    f_t = t_cfg.flops_per_token(S) if t_cfg is not None and rc.has_teacher and not rc.teacher_logits else 0.0
    backwards = 2 if rc.hidden_weight > 0 and rc.mode == "distill" and rc.grad_accum > 1 else 1
    # one decode token attends over all S cached keys (QK^T and AV: 4 x L x S x heads x head_dim), which is
    # flops_per_token's causal average at 2S
    decode = rows * s_cfg.flops_per_token(2 * S) / devices
    recompute = 1 if rc.remat == "full" else 0
    train = rc.batch_size * S * (f_s * (1 + backwards * (2 + recompute)) + f_t)
    score_cfg = t_cfg if t_cfg is not None else s_cfg  # scoring runs the teacher, stored logits or not
    return {"distill": train / devices, "score": rows * S * score_cfg.flops_per_token(S) / devices,
            "eval": rows * S * (f_s + f_t) / devices, "decode": decode}


def xla_step_flops(rc: RunConfig, teacher_cfg: LlamaConfig, student_cfg: LlamaConfig, mesh, name: str,
                   ) -> dict[str, float]:
    """XLA's own FLOP count of one optimizer step of `name`, per device.

    `cost_analysis` counts a loop body once, so the compiled step's figure is about 1/(L x A) of the work.
    This compiles loop-free variants of the same step on the same mesh: one micro-batch (grad_accum 1),
    one loss chunk (chunk_size = seq_len), layers unrolled (`model.unrolled_layers`), with 1 or 2 student
    and teacher layers; the count is linear in each layer count, so per step it is
    A x (f(1, 1) + (Ls - 1) (f(2, 1) - f(1, 1)) + (Lt - 1) (f(1, 2) - f(1, 1))). Attention is counted as
    `xla` computes it (the whole S x S, masked half included) whatever the run's `attention`; the
    optimizer update is counted once per micro-batch (elementwise, well under 0.1% at 8B).
    Returns {"flops", "per_student_layer", "per_teacher_layer", "rest"} (per device, per micro-batch
    for the last three)."""
    t_cfg = teacher_cfg if rc.has_teacher else None
    micro = dataclasses.replace(rc, batch_size=rc.batch_size // rc.grad_accum, grad_accum=1, chunk_size=rc.seq_len,
                                attention="xla")
    with_teacher = (t_cfg is not None and name != "decode"  # the student generates; stored logits: no teacher
                    and (name == "score" or not rc.teacher_logits))
    with_student = name != "score" or t_cfg is None  # the score step runs the teacher (the student when fine-tuning)

    def count(ls: int, lt: int) -> float:
        s = dataclasses.replace(student_cfg, num_hidden_layers=ls)
        t = dataclasses.replace(t_cfg, num_hidden_layers=lt) if t_cfg is not None else None
        with unrolled_layers():
            compiled = lower_steps(micro, t or s, s, mesh, (name,))[name].compile()
        cost = compiled.cost_analysis()
        return float((cost[0] if isinstance(cost, (list, tuple)) else cost).get("flops", 0.0))

    f11 = count(1, 1)
    per_s = count(2, 1) - f11 if with_student else 0.0
    per_t = count(1, 2) - f11 if with_teacher else 0.0
    ls = student_cfg.num_hidden_layers if with_student else 1
    lt = t_cfg.num_hidden_layers if with_teacher else 1
    rest = f11 - per_s - per_t
    A = rc.grad_accum if name == "distill" else 1
    return {"flops": A * (f11 + (ls - 1) * per_s + (lt - 1) * per_t), "per_student_layer": per_s,
            "per_teacher_layer": per_t, "rest": rest}


_COLLECTIVE = re.compile(r" = (.*?) (all-reduce|reduce-scatter|all-gather|all-to-all|collective-permute)(?:-start)?\(")
_WHILE = re.compile(r"condition=%([\w.\-]+), body=%([\w.\-]+)")
_CONSTANT = re.compile(r"s32\[\]\S* constant\((\d+)\)")
_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "f64": 8, "s64": 8}


def collective_bytes(hlo_text: str) -> dict[str, float]:
    """Bytes each kind of collective moves in one run of a compiled program (`compiled.as_text()`), per
    device: each collective's result size times the trip counts of the while loops around it (read from
    the constant bound in each loop's condition; loops run from 0, as `lax.scan`'s do)."""
    own: dict[str, dict[str, float]] = {}
    loops: dict[str, list[tuple[str, str]]] = {}
    bound: dict[str, int] = {}
    entry = comp = None
    for line in hlo_text.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            comp = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%").split("(")[0]
            entry = comp if line.startswith("ENTRY") else entry
            continue
        if comp not in bound and (c := _CONSTANT.search(line)) is not None:
            bound[comp] = int(c.group(1))
        if " while(" in line and (w := _WHILE.search(line)) is not None:
            loops.setdefault(comp, []).append((w.group(2), w.group(1)))
        elif (m := _COLLECTIVE.search(line)) is not None:
            size = sum(_DTYPE_BYTES.get(dt, 4) * math.prod(int(x) for x in dims.split(",") if x)
                       for dt, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)))
            kinds = own.setdefault(comp, {})
            kinds[m.group(2)] = kinds.get(m.group(2), 0.0) + size

    def total(c: str, seen=()) -> dict[str, float]:
        out = dict(own.get(c, {}))
        for body, cond in loops.get(c, []):
            if body not in seen:
                for k, v in total(body, seen + (c,)).items():
                    out[k] = out.get(k, 0.0) + bound.get(cond, 1) * v
        return out

    return total(entry) if entry else {}


def figures(compiled, analytic: float) -> dict[str, Any]:
    m = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out = {"argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
           "temp_bytes": int(m.temp_size_in_bytes), "alias_bytes": int(m.alias_size_in_bytes),
           "code_bytes": int(m.generated_code_size_in_bytes)}
    # live at once: inputs, outputs not written into donated inputs, scratch, and the program
    out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
                         + out["code_bytes"])
    out["flops_loop_bodies_once"] = float(cost.get("flops", 0.0))  # replaced by the per-step count in compile_steps
    out["analytic_flops"] = float(analytic)
    return out


STEPS = ("distill", "score", "eval", "decode")


def decode_generator(rc: RunConfig, student_cfg: LlamaConfig, mesh) -> Generator:
    """The generator whose decode step `plan --compile` compiles: b = batch_size / grad_accum rows (the eval batch)."""
    return Generator(student_cfg, max_new_tokens=rc.seq_len, batch_size=rc.batch_size // rc.grad_accum, mesh=mesh,
                     compute_dtype=rc.compute_dtype)


def lower_steps(rc: RunConfig, teacher_cfg: LlamaConfig, student_cfg: LlamaConfig, mesh,
                steps: tuple[str, ...] = STEPS[:3]) -> dict[str, Any]:
    """{name: jax.stages.Lowered} of the run's steps on `mesh`: the train and eval steps `distill.build_steps`
    builds for `train`, the score step jitted as `importance.compute_scores` jits it (the teacher's,
    or the student's when fine-tuning), and the student's decode step of `minitron generate` with a cache of
    seq_len slots, each with abstract sharded arguments."""

    t_cfg = teacher_cfg if rc.has_teacher else None
    built = build_steps(rc, student_cfg, t_cfg, mesh, kd_config(rc))
    out = {}
    with jax.set_mesh(mesh):
        for name in steps:
            if name == "distill":
                out[name] = built.train.lower(built.state, built.teacher, built.batch)
            elif name == "eval":
                out[name] = built.eval.lower(built.state["trainable"]["model"], built.teacher, built.eval_batch)
            elif name == "score":
                cfg = t_cfg or student_cfg
                params = (built.teacher if built.teacher is not None else  # stored logits: the step still scores
                          abstract_params(cfg, mesh, (rc.teacher_dtype if t_cfg is not None else None)
                                          or rc.compute_dtype or cfg.dtype))
                shape = built.eval_batch["input_ids"].shape
                ids = jax.ShapeDtypeStruct(shape, "int32", sharding=named_sharding(("batch", "seq"), shape, mesh))
                mask = jax.ShapeDtypeStruct(shape, "float32", sharding=ids.sharding)
                rep = NamedSharding(mesh, PartitionSpec())  # compute_scores makes its state under the mesh
                state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                                     jax.eval_shape(lambda: init_state(cfg)))
                step = jax.jit(make_step(cfg, ScoreConfig(), rc.compute_dtype, rc.attention), donate_argnums=1)
                out[name] = step.lower(params, state, ids, mask)
            elif name == "decode":
                gen = decode_generator(rc, student_cfg, mesh)
                dtype = rc.compute_dtype or student_cfg.dtype
                params = abstract_params(student_cfg, mesh, dtype)
                out[name] = gen.decode.lower(params, *gen.abstract_decode_args(params, gen.batch_size, rc.seq_len,
                                                                               dtype))
            else:
                raise AOTError(f"unknown step {name!r}; choose from {', '.join(STEPS)}")
    return out


def topology_mesh(rc: RunConfig, topology: str):
    """The recipe's mesh over a TPU slice's devices, after the mesh and batch checks."""
    devices = topology_devices(topology)
    try:
        sizes = resolve_mesh_shape(rc.mesh, len(devices))
    except ValueError as e:
        raise AOTError(f"mesh={list(rc.mesh)}: {e}") from e
    check_batch(rc, sizes[0] * sizes[1], len(devices))
    return make_mesh(*sizes, devices=devices)


def compile_steps(rc: RunConfig, teacher_cfg: LlamaConfig, student_cfg: LlamaConfig, topology: str,
                  steps: tuple[str, ...] = STEPS) -> dict[str, Any]:
    """Compile the run's steps for `topology`; returns the figures `minitron plan --compile` prints and writes:
    {"topology", "devices", "mesh", "hbm_per_device_bytes", "steps": {name: {...}}, "fits", "compile_s"}.

    `collective_bytes` is what the step's collectives move per device (`collective_bytes`, loops counted
    by their trip counts). `flops` is XLA's count for the whole optimizer step (`xla_step_flops`: loop-free variants, since the
    compiled step's own count, kept as `flops_loop_bodies_once`, visits each loop body once);
    `analytic_flops` is `LlamaConfig.flops_per_token`'s. They agree to within ~30% (XLA also counts the
    masked half of causal attention and elementwise work)."""
    rc.validate()
    mesh = topology_mesh(rc, topology)
    n = mesh.size
    analytic = analytic_flops(rc, student_cfg, teacher_cfg if rc.has_teacher else None, n)
    res: dict[str, Any] = {"topology": topology, "devices": n, "mesh": dict(mesh.shape),
                           "hbm_per_device_bytes": TOPOLOGIES[topology].hbm_bytes, "steps": {}, "compile_s": {}}
    for name in steps:
        t0 = time.perf_counter()
        lowered = lower_steps(rc, teacher_cfg, student_cfg, mesh, (name,))[name]
        compiled = lowered.compile()
        res["steps"][name] = figures(compiled, analytic[name])
        res["steps"][name]["collective_bytes"] = sum(collective_bytes(compiled.as_text()).values())
        res["steps"][name]["flops"] = xla_step_flops(rc, teacher_cfg, student_cfg, mesh, name)["flops"]
        if name == "decode":
            res["steps"][name]["kv_cache_bytes"] = kv_cache_per_device(rc, student_cfg, compiled)
        res["compile_s"][name] = round(time.perf_counter() - t0, 1)
    hbm = res["hbm_per_device_bytes"]
    res["fits"] = all(s["peak_bytes"] <= hbm for s in res["steps"].values())
    return res


def kv_cache_per_device(rc: RunConfig, cfg: LlamaConfig, compiled) -> int:
    """The KV cache's bytes on each device: 2 x L x B x S x Hkv x D x itemsize over the shards its compiled
    input sharding splits it into (batch over data x fsdp, KV heads over tensor where they divide)."""
    k = compiled.input_shardings[0][1].k  # (params, cache, state)
    rows = rc.batch_size // rc.grad_accum
    shape = (cfg.num_hidden_layers, rows, rc.seq_len, cfg.num_key_value_heads, cfg.head_dim)
    shards = math.prod(shape) // math.prod(k.shard_shape(shape))
    return cache_bytes(cfg, rows, rc.seq_len, rc.compute_dtype or cfg.dtype, shards)


def advice(res: dict[str, Any], rc: RunConfig) -> list[str]:
    """What to change for each step that does not fit."""
    out = []
    hbm = res["hbm_per_device_bytes"]
    for name, s in res["steps"].items():
        if s["peak_bytes"] <= hbm:
            continue
        tips = []
        if name == "decode":
            tips.append(f"a shorter seq_len (the cache's {rc.seq_len} slots) or fewer eval rows per device")
        elif rc.remat != "full":
            tips.append("remat=full")
        rows = rc.batch_size // rc.grad_accum // (res["mesh"]["data"] * res["mesh"]["fsdp"])
        if rows > 1:
            tips.append(f"fewer rows per device (now {rows}): a larger grad_accum (now {rc.grad_accum}) "
                        "or a smaller batch_size")
        if res["mesh"]["tensor"] == 1:
            tips.append("a mesh with a tensor axis (e.g. mesh=[1,-1,4]) to split heads, MLP and vocabulary")
        tips.append("a larger topology")
        out.append(f"{name} step needs {s['peak_bytes'] / GiB:.1f} GiB per device, over the chip's "
                   f"{hbm / GiB:.1f} GiB: try " + "; ".join(tips))
    return out


def format_compiled(res: dict[str, Any]) -> str:
    gib = lambda b: f"{b / GiB:,.2f}"  # noqa: E731
    lines = [f"{res['topology']}: {res['devices']} devices, mesh {res['mesh']}, HBM {gib(res['hbm_per_device_bytes'])} "
             "GiB per device; XLA figures per device per optimizer step",
             f"  {'step':<8} {'args GiB':>9} {'out GiB':>9} {'temp GiB':>9} {'peak GiB':>9} {'coll GiB':>9} "
             f"{'XLA TFLOP':>10} {'analytic':>9} {'compile s':>9}  fits"]
    for name, s in res["steps"].items():
        lines.append(f"  {name:<8} {gib(s['argument_bytes']):>9} {gib(s['output_bytes']):>9} {gib(s['temp_bytes']):>9} "
                     f"{gib(s['peak_bytes']):>9} {gib(s.get('collective_bytes', 0)):>9} {s['flops'] / 1e12:>10.2f} "
                     f"{s['analytic_flops'] / 1e12:>9.2f} {res['compile_s'][name]:>9}  {'yes' if s['peak_bytes'] <= res['hbm_per_device_bytes'] else 'NO'}")
    if "decode" in res["steps"]:
        s = res["steps"]["decode"]
        lines.append(f"  decode: one token of `minitron generate`; KV cache {gib(s['kv_cache_bytes'])} GiB per device "
                     f"(2 x L x B x S x Hkv x D x itemsize / shards) of XLA's {gib(s['argument_bytes'])} GiB of "
                     "arguments")
    return "\n".join(lines)
