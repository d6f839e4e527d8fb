"""A sharded load of an HF checkpoint from Cloud Storage: bytes each host reads and its peak host memory.

    python tools/bench_gcs_load.py [--hidden 1024 --layers 8 --intermediate 2816 --vocab 32000 --processes 2
                                    --devices 2]

Serves the Cloud Storage API on 127.0.0.1 (tests/gcs_emulator.py, in its own process, so its memory is not
counted), uploads a random bf16 Llama checkpoint (one model.safetensors), then loads it as P processes x D fake CPU
devices (fsdp over all of them, joined by jax.distributed) with `minitron_jax.from_pretrained(gs://...)`: ranged
reads of each process's rows. Each process reports the bytes it read and its peak RSS growth over the load
(VmHWM, reset just before it; a first load warms compilation and clients) next to what it must hold anyway, its own shards of the weights (fake CPU devices
are host memory). Baseline, in the same run and the same processes: the whole object read into memory and its tensors viewed
in place (no copy), as a whole-file download does before any device gets a byte.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset VmHWM to the current RSS
        f.write("5")


def worker(url: str, out: str) -> None:
    """One process of the job: the ranged, sharded load, then the whole-object baseline."""
    import jax
    import numpy as np

    import minitron_jax as mj
    from minitron_jax.core import multihost, storage
    from minitron_jax.model.sharding import make_mesh

    multihost.join()
    mesh = make_mesh(1, -1, 1)
    import gc
    jax.block_until_ready(mj.from_pretrained(url, mesh=mesh).params())  # warm: compilation, clients, allocator
    gc.collect()
    read0, base = storage.bytes_read(), status_kb("VmRSS")
    reset_peak()
    t0 = time.perf_counter()
    model = mj.from_pretrained(url, mesh=mesh)
    params = jax.block_until_ready(model.params())
    took = time.perf_counter() - t0
    peak = status_kb("VmHWM")
    held = sum(s.data.nbytes for leaf in jax.tree.leaves(params) for s in leaf.addressable_shards)
    largest = max((leaf.nbytes for leaf in jax.tree.leaves(params)), default=0)
    got = {"process": jax.process_index(), "bytes_read": storage.bytes_read() - read0, "seconds": round(took, 2),
           "peak_growth": (peak - base) * 1024, "held_shards": held, "largest_tensor": largest}
    del model, params
    gc.collect()
    base = status_kb("VmRSS")
    reset_peak()
    t0 = time.perf_counter()
    data = storage.filesystem().cat_file(storage.key(f"{url}/model.safetensors"))  # the whole object
    n = int.from_bytes(data[:8], "little")
    tensors = {k: np.frombuffer(data, np.uint8, v["data_offsets"][1] - v["data_offsets"][0], 8 + n + v["data_offsets"][0])
               for k, v in json.loads(data[8:8 + n]).items() if k != "__metadata__"}
    got["baseline_seconds"] = round(time.perf_counter() - t0, 2)
    got["baseline_peak_growth"] = (status_kb("VmHWM") - base) * 1024
    del tensors, data
    Path(out, f"p{jax.process_index()}.json").write_text(json.dumps(got))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_checkpoint(d: Path, a) -> int:
    import numpy as np
    from safetensors.numpy import save_file
    h, i, v, L = a.hidden, a.intermediate, a.vocab, a.layers
    heads, kv = h // 64, max(1, h // 256)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "intermediate_size": i,
           "num_hidden_layers": L, "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": v,
           "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
           "torch_dtype": "bfloat16", "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2}
    rng = np.random.default_rng(0)

    def w(*shape):  # bf16 bits of small random values
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).view(np.uint32).__rshift__(16).astype(np.uint16)
    import ml_dtypes
    t = {"model.embed_tokens.weight": w(v, h), "lm_head.weight": w(v, h), "model.norm.weight": w(h)}
    for layer in range(L):
        p = f"model.layers.{layer}."
        t.update({p + "self_attn.q_proj.weight": w(h, h), p + "self_attn.k_proj.weight": w(kv * 64, h),
                  p + "self_attn.v_proj.weight": w(kv * 64, h), p + "self_attn.o_proj.weight": w(h, h),
                  p + "mlp.gate_proj.weight": w(i, h), p + "mlp.up_proj.weight": w(i, h),
                  p + "mlp.down_proj.weight": w(h, i), p + "input_layernorm.weight": w(h),
                  p + "post_attention_layernorm.weight": w(h)})
    t = {k: x.view(ml_dtypes.bfloat16) for k, x in t.items()}
    d.mkdir(parents=True, exist_ok=True)
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(cfg))
    return (d / "model.safetensors").stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--devices", type=int, default=2)
    a = ap.parse_args()
    port = free_port()
    emu = subprocess.Popen([sys.executable, str(ROOT / "tests" / "gcs_emulator.py"), str(port)])
    env = {**os.environ, "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}", "JAX_PLATFORMS": "cpu"}
    os.environ.update(env)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            size = make_checkpoint(Path(tmp) / "ckpt", a)
            time.sleep(1)
            from minitron_jax.core import storage
            url = "gs://minitron-test/bench/ckpt"
            for f in ("config.json", "model.safetensors"):
                storage.upload(Path(tmp) / "ckpt" / f, f"{url}/{f}")
            coord = free_port()
            procs = [subprocess.Popen([sys.executable, __file__, "--worker", url, tmp],
                                      env={**env, "MINITRON_COORDINATOR": f"127.0.0.1:{coord}",
                                           "MINITRON_NUM_PROCESSES": str(a.processes), "MINITRON_PROCESS_ID": str(p),
                                           "XLA_FLAGS": f"--xla_force_host_platform_device_count={a.devices}"})
                     for p in range(a.processes)]
            codes = [p.wait(timeout=1800) for p in procs]
            if any(codes):
                raise SystemExit(f"workers exited {codes}")
            rows = [json.loads((Path(tmp) / f"p{p}.json").read_text()) for p in range(a.processes)]
    finally:
        emu.kill()
    mb = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
    print(f"checkpoint: {mb(size)} (one model.safetensors, bf16), {a.processes} processes x {a.devices} devices, fsdp")
    print("| process | bytes read (ranged) | of the file | peak RSS growth | its shards of the weights | transient "
          "(growth - shards) | largest tensor | load s | baseline: whole object, peak RSS growth | baseline s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['process']} | {mb(r['bytes_read'])} | {r['bytes_read'] / size:.1%} | {mb(r['peak_growth'])} | "
              f"{mb(r['held_shards'])} | {mb(r['peak_growth'] - r['held_shards'])} | {mb(r['largest_tensor'])} | "
              f"{r['seconds']} | {mb(r['baseline_peak_growth'])} | {r['baseline_seconds']} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        main()
