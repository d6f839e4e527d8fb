"""Progress lines (step, tokens/s, ETA) on stderr and a JSONL metrics file, for every long job.

A metrics file on gs:// is kept locally and copied to the bucket (`storage.Mirror`): objects cannot be appended to.

Each `update` record carries `tokens_per_s`, the throughput of that update's own interval (its tokens
over the wall time since the previous update), and `tokens_per_s_avg`, the average since the start."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

MIRROR_EVERY_S = 30  # a metrics file on gs:// reaches the bucket at least this often (and at close)


class Progress:
    def __init__(self, total: int, desc: str, *, metrics_path: str | Path | None = None,
                 every_s: float = 5.0, stream=None):
        self.total, self.desc, self.every_s = total, desc, every_s
        self.stream = stream or sys.stderr
        # in a multi-process job one file, written by process 0 (without importing jax: tokenize's workers)
        jax = sys.modules.get("jax")
        lead = jax is None or not jax.distributed.is_initialized() or jax.process_index() == 0
        self.metrics = self.mirror = None
        if metrics_path and lead:
            if "://" in str(metrics_path):  # gs://: appended to a local copy, which reaches the bucket every 30 s
                from minitron_jax.core import storage
                self.mirror, metrics_path = storage.Mirror.of_file(metrics_path)
            self.metrics = open(metrics_path, "a")
        self.start = self.last_print = self.last_update = time.perf_counter()
        self.step = self.tokens = 0

    def update(self, steps: int = 1, tokens: int = 0, **metrics) -> dict:
        self.step += steps
        self.tokens += tokens
        now = time.perf_counter()
        elapsed, interval = now - self.start, now - self.last_update
        self.last_update = now
        rec = {"stage": self.desc, "step": self.step, "total": self.total, "tokens": self.tokens,
               "tokens_per_s": tokens / interval if interval > 0 else 0.0,
               "tokens_per_s_avg": self.tokens / elapsed if elapsed > 0 else 0.0, "elapsed_s": elapsed, **metrics}
        self.record(rec)
        if now - self.last_print >= self.every_s or self.step >= self.total or self.step == steps:
            eta = elapsed / self.step * (self.total - self.step) if self.step else float("nan")
            extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
            print(f"[{self.desc}] {self.step}/{self.total} {rec['tokens_per_s']:.0f} tok/s "
                  f"elapsed {elapsed:.0f}s ETA {eta:.0f}s {extra}".rstrip(), file=self.stream, flush=True)
            self.last_print = now
        return rec

    def record(self, rec: dict) -> None:
        """Append one JSON object to the metrics file (if any)."""
        if self.metrics:
            self.metrics.write(json.dumps(rec) + "\n")
            self.metrics.flush()
            if self.mirror is not None:
                self.mirror.sync(every_s=MIRROR_EVERY_S)

    def close(self) -> None:
        if self.metrics:
            self.metrics.close()
        if self.mirror is not None:
            self.mirror.close()
