"""Progress records: `tokens_per_s` is each interval's own throughput; the running average has its own name."""

import io
import json

from minitron_jax.core import progress
from minitron_jax.core.progress import Progress


def test_tokens_per_s_is_the_interval_throughput(tmp_path, monkeypatch):
    clock = iter([10.0, 11.0, 13.0, 17.0])  # start, then three updates 1 s, 2 s and 4 s apart
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    p = Progress(6, "t", metrics_path=tmp_path / "m.jsonl", stream=io.StringIO())
    recs = [p.update(steps=2, tokens=t) for t in (100, 100, 400)]
    p.close()
    assert [r["tokens_per_s"] for r in recs] == [100 / 1, 100 / 2, 400 / 4]
    assert [r["tokens_per_s_avg"] for r in recs] == [100 / 1, 200 / 3, 600 / 7]
    assert [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()] == recs
