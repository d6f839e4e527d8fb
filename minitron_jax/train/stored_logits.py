"""Reading offline teacher logits: the store layout, its identity (teacher, tokenizer, token stores, row
settings) and the checks a distillation run makes before it trains from them.

Layout under LOGITS (zarr3 arrays, one chunk = the rows one process computes in one step):

* `tokens/`   uint32 [N, S]: each row's token ids (to line the logits up with their tokens; a run checks them).
* `values/`   bfloat16 (or float32) [N, S, k]: the k largest teacher logits per position, descending.
* `indices/`  int32 [N, S, k]: their vocabulary ids.
* `lse/`      float32 [N, S] (lse=true): log-sum-exp of the position's whole logit row, so the exact teacher
  log-probabilities of the kept entries are `values - lse` (and `exp(values - lse)` sums to the mass the
  top k cover, reported in the manifest).
* `manifest.json`, written last: the store is complete only once it exists. It records what the rows
  depend on (`identity`: `ROW_KEYS`, the teacher (a sha256 of its config and of every byte of its weights),
  the dtype the teacher ran at (`teacher_dtype`), the tokenizer and token stores) and k, the dtypes and the
  row count.
* `state.json` while writing: the rows committed so far (0 from before the arrays exist), the resume point
  of an interrupted run.

`TeacherLogits.check_run` refuses, before step 0, a distillation run whose identity differs: another
teacher (any changed weight byte), a teacher that would run at another dtype, other rows.

The writer is `run/teacher_pass.py` (`minitron teacher-logits`)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import mmap
from pathlib import Path
from typing import Any

import numpy as np

from minitron_jax.core import storage
from minitron_jax.core.errors import LogitsError, RecipeError
from minitron_jax.data.spec import DataSpec, with_split_seed
from minitron_jax.data.token_store import MANIFEST as STORE_MANIFEST
from minitron_jax.data.token_store import kvstore_url, open_store, read_json, tokenizer_identity
from minitron_jax.io.hf import open_checkpoint
from minitron_jax.model.config import LlamaConfig
from minitron_jax.prune.importance import model_fingerprint

FORMAT, VERSION = "minitron-teacher-logits", 2  # 2: the teacher dtype, every weight byte hashed


MANIFEST, STATE = "manifest.json", "state.json"


VALUE_DTYPES = ("bfloat16", "float32")


# the recipe keys the stored rows depend on: a run that differs in any of them reads other rows
ROW_KEYS = ("seq_len", "packing", "seed", "split_seed", "batch_size", "holdout", "holdout_fraction",
            "validation_fraction", "text_field")


@dataclasses.dataclass
class LogitsConfig:
    """The keys `minitron teacher-logits` adds to a recipe's."""
    k: int = 64
    samples: int = 0  # rows to write; 0 = one epoch of a concat store (a first_fit / blend stream needs samples)
    lse: bool = True  # also store each position's log-sum-exp
    values_dtype: str = "bfloat16"
    commit_every: int = 8  # steps between resume points

    def validate(self, vocab_size: int | None = None) -> "LogitsConfig":
        if self.k < 1 or (vocab_size is not None and self.k > vocab_size):
            raise RecipeError(f"k={self.k} must be between 1 and the vocabulary size ({vocab_size})")
        if self.samples < 0:
            raise RecipeError(f"samples={self.samples} must be >= 0 (0 = one epoch)")
        if self.values_dtype not in VALUE_DTYPES:
            raise RecipeError(f"values_dtype={self.values_dtype!r}: choose one of {', '.join(VALUE_DTYPES)}")
        if self.commit_every < 1:
            raise RecipeError(f"commit_every={self.commit_every} must be positive")
        return self


def teacher_identity(path: str | Path) -> dict[str, str]:
    """{"config_sha256", "weights_sha256"} of an HF directory, without loading it: the config's hash (as
    `importance.model_fingerprint`) and a sha256 over every tensor's name, dtype, shape and every stored byte,
    read through a memory map of each safetensors file in `HASH_PIECE` slices (no copy of a whole tensor):
    any changed weight changes it."""
    out = {"config_sha256": model_fingerprint(LlamaConfig.from_file(path))["model_config_sha256"]}
    h = hashlib.sha256()
    files = open_checkpoint(path)
    with contextlib.ExitStack() as stack:
        maps = {}
        for name, f in sorted(files.items()):
            remote = storage.is_url(f.path)  # gs://: ranged reads of HASH_PIECE bytes, never the whole object
            if f.path not in maps and not remote:
                maps[f.path] = stack.enter_context(_mapped(f.path))
            info = f.header[name]
            a, b = info["data_offsets"]
            h.update(f"{name}|{info['dtype']}|{info['shape']}|".encode())
            if remote:
                for at in range(f.data_start + a, f.data_start + b, HASH_PIECE):
                    h.update(storage.read_range(f.path, at, min(f.data_start + b, at + HASH_PIECE)))
            else:
                _hash_bytes(h, maps[f.path], f.data_start + a, f.data_start + b)
    out["weights_sha256"] = h.hexdigest()
    return out


HASH_PIECE = 64 << 20  # bytes per sha256 update: a slice of the memory map, never a copy


@contextlib.contextmanager
def _mapped(path: Path):
    """A read-only memoryview of the whole file through mmap (released before the map closes)."""
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm, memoryview(mm) as view:
        yield view


def _hash_bytes(h, view: memoryview, start: int, stop: int) -> None:
    for at in range(start, stop, HASH_PIECE):
        with view[at:min(stop, at + HASH_PIECE)] as piece:
            h.update(piece)


def data_identity(data) -> dict[str, Any]:
    """{store path: sha256 of its manifest.json} (and the blend weights) for STORE or a blend."""
    import tensorstore as ts
    out = {}
    for k, w in DataSpec(data).weights.items():
        open_store(k)  # complete, or refused naming why
        raw = ts.KvStore.open(kvstore_url(k) + "/").result().read(STORE_MANIFEST).result().value
        out[str(Path(k).absolute()) if "://" not in k else k] = {"manifest_sha256": hashlib.sha256(raw).hexdigest(),
                                                                 "weight": round(w, 6)}
    return out


def identity(rc, t_dir: str | Path) -> dict[str, Any]:
    """What the stored rows depend on, for the manifest and for the check before a run reads them."""
    return {"teacher": teacher_identity(t_dir), "teacher_dtype": teacher_dtype(rc, t_dir),
            "tokenizer": tokenizer_identity(t_dir), "data": data_identity(rc.data),
            **{k: getattr(rc, k) for k in ROW_KEYS},
            "holdout_fraction": DataSpec.of_recipe(rc).holdout_fraction}  # 0 with holdout names


def teacher_dtype(rc, t_dir: str | Path) -> str:
    """The dtype the teacher runs at, its weights and its forward, as the online teacher does: teacher_dtype,
    else compute_dtype, else the checkpoint's own. Stored logits are computed (and checked) at it."""
    return rc.teacher_compute_dtype() or LlamaConfig.from_file(t_dir).dtype


def _spec(out, name: str, dtype: str, shape=None, chunk=None) -> dict:
    spec = {"driver": "zarr3", "kvstore": kvstore_url(out) + "/" + name + "/"}
    if shape is not None:
        spec["metadata"] = {
            "shape": list(shape), "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunk)}},
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                       {"name": "zstd", "configuration": {"level": 1, "checksum": False}}]}
    return spec


def _open(out, name: str, dtype: str, shape=None, chunk=None):
    import tensorstore as ts
    if shape is not None:
        return ts.open(_spec(out, name, dtype, shape, chunk), create=True, open=True).result()
    return ts.open(_spec(out, name, dtype)).result()


def _arrays(out, n: int, seq_len: int, k: int, values_dtype: str, lse: bool, chunk_rows: int | None) -> dict:
    mk = (lambda shape: (shape, (chunk_rows, *shape[1:]))) if chunk_rows else (lambda shape: (None, None))  # noqa: E731
    arrs = {"tokens": _open(out, "tokens", "uint32", *mk((n, seq_len))),
            "values": _open(out, "values", values_dtype, *mk((n, seq_len, k))),
            "indices": _open(out, "indices", "int32", *mk((n, seq_len, k)))}
    if lse:
        arrs["lse"] = _open(out, "lse", "float32", *mk((n, seq_len)))
    return arrs


class TeacherLogits:
    """A complete store: `manifest`, `rows`, `k`, and `read(start, stop)` -> {tokens, values, indices[, lse]}."""

    def __init__(self, path: str | Path):
        self.path = path
        try:
            m = read_json(path, MANIFEST)
        except Exception as e:  # noqa: BLE001 - not a kvstore at all
            raise LogitsError(f"cannot read teacher logits at {path} ({e})") from e
        if m is None:
            partial = read_json(path, STATE) is not None
            raise LogitsError(f"{path} has no {MANIFEST}: " + (
                "its `minitron teacher-logits` run did not finish; rerun the same command to complete it"
                if partial else "not a teacher-logits store; write one with `minitron teacher-logits`"))
        if m.get("format") != FORMAT or m.get("version") != VERSION:
            raise LogitsError(f"{path}/{MANIFEST} is format {m.get('format')!r} version {m.get('version')!r}, not "
                              f"{FORMAT!r} version {VERSION}; rewrite it with this minitron's `teacher-logits`")
        self.manifest, self.rows, self.k = m, int(m["rows"]), int(m["k"])
        self.arrays = _arrays(path, self.rows, m["seq_len"], self.k, m["values_dtype"], m["lse"], None)

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        if not 0 <= start <= stop <= self.rows:
            raise LogitsError(f"rows [{start}, {stop}) are outside the {self.rows} rows of {self.path}")
        futs = {name: a[start:stop].read() for name, a in self.arrays.items()}
        return {name: f.result() for name, f in futs.items()}

    def check_run(self, rc, t_dir: str | Path, rows_needed: int) -> None:
        """Refuse (before step 0) a run whose teacher (any weight byte), teacher dtype, tokenizer, token store or
        row settings differ from the store's, or that reads more rows than it holds."""
        want, have = identity(rc, t_dir), with_split_seed(self.manifest["identity"])
        if want["teacher_dtype"] != have.get("teacher_dtype"):
            raise LogitsError(f"teacher_logits={self.path} holds the teacher's logits computed at "
                              f"{have.get('teacher_dtype')}, but this run's teacher runs at {want['teacher_dtype']} "
                              "(teacher_dtype, else compute_dtype, else the checkpoint's dtype): set "
                              f"teacher_dtype={have.get('teacher_dtype')} to train on them, or rerun `minitron "
                              f"teacher-logits` with teacher_dtype={want['teacher_dtype']}")
        bad = [k for k in want if json.dumps(want[k], sort_keys=True) != json.dumps(have.get(k), sort_keys=True)]
        if bad:
            what = {"teacher": "the teacher's weights or config", "tokenizer": "the tokenizer",
                    "data": "the token store(s)"}
            shown = "; ".join(f"{what.get(k, k)}: store {json.dumps(have.get(k))}, run {json.dumps(want[k])}"
                              for k in bad)
            raise LogitsError(f"teacher_logits={self.path} was written for other rows or another teacher ({shown}); "
                              "rerun `minitron teacher-logits` with this run's recipe, or drop teacher_logits")
        if rows_needed > self.rows:
            raise LogitsError(f"teacher_logits={self.path} holds {self.rows} rows but this run reads {rows_needed} "
                              f"(steps x batch_size); rerun `minitron teacher-logits` with samples={rows_needed}, or "
                              "lower steps")


def logits_batch(store: TeacherLogits, step: int, global_batch: int, local: dict, process_index: int,
                 process_count: int) -> dict[str, np.ndarray]:
    """This process's stored rows of global batch `step` ({"t_values", "t_indices"}), checked against the rows
    the loader gave (`local`, [b, S]): other tokens mean the store belongs to other rows. They are the
    loader's rows p*b .. p*b + b of the batch, in its order (as `teacher_pass` writes them, whatever the devices'
    order); the trainer places them with the same `to_global` as the tokens, so they stay lined up with their
    tokens on any mesh."""
    b = global_batch // process_count
    start = step * global_batch + process_index * b
    got = store.read(start, start + b)
    if not np.array_equal(got["tokens"].astype(np.int64), local["input_ids"].astype(np.int64)):
        raise LogitsError(f"teacher_logits={store.path}: stored rows [{start}, {start + b}) hold other tokens than "
                          f"the loader's rows of step {step}; the store was written for another data order. Rerun "
                          "`minitron teacher-logits` with this run's recipe")
    return {"t_values": got["values"], "t_indices": got["indices"]}


def storage_bytes_per_token(k: int, values_dtype: str = "bfloat16", lse: bool = True) -> int:
    """Uncompressed bytes per token: values + int32 indices (+ fp32 lse) + the uint32 token id."""
    return k * ({"bfloat16": 2, "float32": 4}[values_dtype] + 4) + (4 if lse else 0) + 4
