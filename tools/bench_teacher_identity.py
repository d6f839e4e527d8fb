"""The teacher's identity hash (`train/stored_logits.teacher_identity`) on SmolLM2-135M, next to the old hash of
each tensor's first and last 4 KiB, and the time it implies for Llama-3.1-8B:

    PYTHONPATH=. .venv/bin/python tools/bench_teacher_identity.py [--repeat 3] [--json PATH]

(PYTHONPATH=. measures this checkout's package, not another installed one; the script prints which.)

Both hash name|dtype|shape of every tensor; the full hash reads every byte of the safetensors files through a
memory map in 64 MiB slices. Each is run `--repeat` times in this process and the median is reported; the first
full pass brings the file into the page cache, so the figures measure sha256 over cached pages (a cold disk
adds its read time: the hash is then bounded by the disk). The 8B estimate is its 16.06 GB of bf16 weights
(8.03 B parameters) at the measured full-hash rate.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time

LLAMA31_8B_BYTES = 8.03e9 * 2  # bf16


def ends_identity(path) -> str:
    """The old weights hash: name|dtype|shape and the first and last 4 KiB of every tensor."""
    from minitron_jax.io.hf import open_checkpoint
    h = hashlib.sha256()
    for name, f in sorted(open_checkpoint(path).items()):
        info = f.header[name]
        a, b = info["data_offsets"]
        h.update(f"{name}|{info['dtype']}|{info['shape']}|".encode())
        with open(f.path, "rb") as fh:
            fh.seek(f.data_start + a)
            h.update(fh.read(min(4096, b - a)))
            fh.seek(f.data_start + max(a, b - 4096))
            h.update(fh.read(min(4096, b - a)))
    return h.hexdigest()


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    from minitron_jax.core.assets import fetch_smollm2
    from minitron_jax.io.hf import open_checkpoint
    from minitron_jax.train.stored_logits import teacher_identity
    model = fetch_smollm2()
    files = open_checkpoint(model)
    weights = sum(f.header[n]["data_offsets"][1] - f.header[n]["data_offsets"][0] for n, f in files.items())
    teacher_identity(model)  # page the file in: both hashes then read cached pages
    full = timed(lambda: teacher_identity(model), a.repeat)
    ends = timed(lambda: ends_identity(model), a.repeat)
    rate = weights / full / 1e9
    out = {"model": str(model), "weight_bytes": weights, "tensors": len(files), "full_s": round(full, 3),
           "full_GB_s": round(rate, 2), "ends_4KiB_s": round(ends, 4),
           "llama31_8b_estimate_s": round(LLAMA31_8B_BYTES / 1e9 / rate, 1)}
    import minitron_jax
    print(f"minitron_jax: {minitron_jax.__file__}")
    print(f"SmolLM2-135M: {weights / 1e9:.3f} GB in {len(files)} tensors")
    print(f"  every byte (mmap, 64 MiB slices): {full:.3f} s  ({rate:.2f} GB/s)")
    print(f"  first + last 4 KiB per tensor:    {ends:.4f} s")
    print(f"Llama-3.1-8B (16.06 GB bf16) at {rate:.2f} GB/s: ~{out['llama31_8b_estimate_s']} s per identity")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
