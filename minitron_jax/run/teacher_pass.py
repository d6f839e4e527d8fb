"""Offline teacher logits: the teacher's top-k logits for the rows a run reads, computed once and stored.

`minitron teacher-logits [RECIPE.yaml] teacher=HF_DIR data=STORE out=LOGITS k=64 ...` runs the (sharded)
teacher over the training rows of a distillation recipe, in the order its loader gives them: row j of the
store is row j % B of global batch j // B (B = batch_size, seeded by `seed`, split by `holdout` /
`holdout_fraction` / `validation_fraction` drawn with `split_seed`, packed by `packing`). A distillation run with
`teacher_logits=LOGITS` and the same data settings then reads the teacher's distribution instead of running
the teacher: no teacher parameters or activations on the devices, and every student trained on the same
rows (search candidates, experiment arms, repeated runs) reuses one teacher pass.

Each of P processes computes and writes its loader rows p*b .. p*b + b of every global batch (b = B / P) at
those store rows, whatever the mesh's device order: the teacher's outputs are placed as the batch is (rows
over data x fsdp), and a process's rows are read back from the row blocks it holds in increasing global
index, the order `make_array_from_process_local_data` gave them (on a TPU slice a process's blocks can
interleave with another's). A distillation run reads the same rows of the store (`stored_logits.logits_batch`)
and places them as its tokens, so the store does not depend on the device order of either run.

Layout under LOGITS (zarr3 arrays, one chunk = the rows one process computes in one step):

* `tokens/`   uint32 [N, S]: each row's token ids (to line the logits up with their tokens; a run checks them).
* `values/`   bfloat16 (or float32) [N, S, k]: the k largest teacher logits per position, descending.
* `indices/`  int32 [N, S, k]: their vocabulary ids.
* `lse/`      float32 [N, S] (lse=true): log-sum-exp of the position's whole logit row, so the exact teacher
  log-probabilities of the kept entries are `values - lse` (and `exp(values - lse)` sums to the mass the
  top k cover, reported in the manifest).
* `manifest.json`, written last: the store is complete only once it exists. It records what the rows
  depend on (`stored_logits.identity`: the teacher (a sha256 of its config and of every weight byte), the
  dtype it ran at, tokenizer, token stores, seq_len, packing, seed, split_seed, batch_size, splits) and k, the dtypes and
  the row count.
* `state.json` while writing: the rows committed so far (every process's writes for them are done), the
  resume point of an interrupted run. Process 0 writes it (0 rows) before the arrays are created, so a run
  killed at any point after that is finished by the same command.

The teacher runs at the dtype the online teacher of a distillation run would (`teacher_dtype`, else
`compute_dtype`, else the checkpoint's): its weights and its forward, so the stored top-k are the logits an
online top-k run sees; a run whose teacher would run at another dtype is refused.

Distillation from stored values uses the top-k forward KL of `losses.py` (the teacher distribution
renormalised over its k entries, the student's full-vocabulary log-softmax read at those ids): the same
loss as online `top_k=k`, so a run from stored float32 values equals the online top-k run.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from minitron_jax.core import multihost
from minitron_jax.core.errors import LogitsError, RecipeError
from minitron_jax.core.lock import LOCK_NAME, output_lock
from minitron_jax.core.progress import Progress
from minitron_jax.data.loader import Loader, training_data
from minitron_jax.data.spec import DataSpec
from minitron_jax.data.token_store import _kv, clear_stale_locks, delete_key, list_keys, read_json, write_json
from minitron_jax.io.hf import from_pretrained, load_tokenizer
from minitron_jax.model.llama import forward, lm_head_weight
from minitron_jax.model.losses import _logits, _split
from minitron_jax.model.sharding import make_mesh, named_sharding, to_global
from minitron_jax.train.preflight import check_data, check_devices, check_model
from minitron_jax.train.stored_logits import FORMAT, MANIFEST, STATE, VERSION, LogitsConfig, _arrays, identity


# ---------------------------------------------------------------------------- the teacher pass
def make_topk_fn(t_cfg, k: int, chunk_size: int, attention: str, compute_dtype=None, mesh=None, rows: int = 0):
    """jitted (params, batch [b, S]) -> (values fp32 [b, S, k], indices int32 [b, S, k], lse fp32 [b, S]),
    one sequence chunk of logits at a time (never [b, S, V]). With a `mesh`, the outputs of a batch of `rows`
    rows are placed as the batch is (`to_global`: rows over data x fsdp), so that each process holds exactly
    the rows it gave, whatever sharding XLA would choose."""
    import jax
    import jax.numpy as jnp

    def fn(params, batch):
        h = forward(params, t_cfg, batch["input_ids"], attention_mask=batch["mask"], segment_ids=batch["segment_ids"],
                    return_hidden=True, compute_dtype=compute_dtype, attention=attention)
        head = lm_head_weight(params, t_cfg)
        s = h.shape[1]
        c = max(1, min(chunk_size, s))
        n = -(-s // c)

        def chunk(x):
            z = _logits(x, head)
            v, i = jax.lax.top_k(z, k)
            return v, i, jax.nn.logsumexp(z, axis=-1)

        v, i, lse = jax.lax.map(chunk, _split(h, n, c))
        back = lambda x: jnp.moveaxis(x, 0, 1).reshape(x.shape[1], n * c, *x.shape[3:])[:, :s]  # noqa: E731
        return back(v), back(i), back(lse)

    if mesh is None:
        return jax.jit(fn)
    return jax.jit(fn, out_shardings=(_rows_sharding(mesh, rows, 3), _rows_sharding(mesh, rows, 3),
                                      _rows_sharding(mesh, rows, 2)))


def _rows_sharding(mesh, rows: int, ndim: int):
    """A [rows, ...] array of `ndim` axes placed as `to_global` places a [rows, S] batch: its rows over the
    batch axes (data x fsdp), the other axes whole."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P
    spec = named_sharding(("batch",), (rows,), mesh).spec
    return NamedSharding(mesh, P(*spec, *[None] * (ndim - len(spec))))


def _local_rows(x) -> np.ndarray:
    """This process's rows of the global [B, ...] array `x` in the order of its process-local data: the row
    blocks it holds in increasing global index, as `jax.make_array_from_process_local_data` lays a process's
    rows out over them (its blocks need not be one contiguous block of `x`: a TPU mesh may interleave the
    processes' devices). `x` must be placed as the batch it was computed from (`make_topk_fn`'s mesh)."""
    blocks = {}
    for s in x.addressable_shards:
        r = s.index[0]
        blocks.setdefault((r.start or 0, x.shape[0] if r.stop is None else r.stop), s)  # replicas: one copy
    spans = sorted(blocks)
    if any(b[0] < a[1] for a, b in zip(spans, spans[1:])):  # rows over data x fsdp never overlap
        raise LogitsError(f"the teacher's outputs hold overlapping row blocks {spans} on this process")
    return np.concatenate([np.asarray(blocks[r].data) for r in spans])


def write_teacher_logits(rc, lc: LogitsConfig, log=print) -> dict[str, Any]:
    """Write (or finish) the store at rc.out; returns its manifest. Every process writes its own rows."""
    import jax

    if rc.teacher is None:
        raise RecipeError("teacher=DIR is required (the model whose logits are stored)")
    if rc.data is None or DataSpec(rc.data).is_text:
        raise RecipeError(f"data={rc.data}: teacher logits are stored for the rows of a token store; tokenize the "
                          f"text first (`minitron tokenize {rc.data} --tokenizer {rc.teacher} --out STORE`)")
    rc.student = rc.student or rc.teacher
    rc.validate()
    check_devices(rc, batch="forward")  # joins the job; the forward's batch against the mesh
    t_cfg = check_model(rc, "teacher", rc.teacher)
    lc.validate(t_cfg.vocab_size)
    P = jax.process_count()
    tok = load_tokenizer(rc.teacher, vocab_size=t_cfg.vocab_size)
    ident = identity(rc, rc.teacher)
    check_data(rc, rc.teacher, "the teacher")
    rows, _, stream = training_data(rc, tok, t_cfg.vocab_size)
    B = rc.batch_size
    if lc.samples:
        n = lc.samples
    elif stream:
        raise RecipeError(f"packing={rc.packing} / a blend gives an endless row stream: give samples=N (e.g. "
                          "steps x batch_size of the run that will read it)")
    else:
        n = (len(rows) // B) * B
    loader = Loader(rows, B, seed=rc.seed, stream=stream)
    b = B // P
    out = rc.out
    header = {"format": FORMAT, "version": VERSION, "identity": ident, "rows": n, "k": lc.k,
              "values_dtype": lc.values_dtype, "lse": lc.lse, "seq_len": rc.seq_len, "chunk_rows": b,
              "processes": P, "attention": rc.attention, "vocab_size": t_cfg.vocab_size}
    with output_lock(out, "minitron teacher-logits"):
        return _write(rc, lc, loader, header, n, b, out, t_cfg, log)


def _decide_start(out, header: dict, n: int) -> dict:
    """Process 0's decision, for every process (`multihost.decided`): {"done": manifest} for a store complete
    with these settings, else {"start": row, "note": message} after making `out` ready to write from that row
    (an unfinished store with the same header resumes at its committed rows; one for other settings is
    cleared; a new store gets its state.json at 0 rows). A store for other settings, or an `out` that holds
    something else, is a LogitsError."""
    done = read_json(out, MANIFEST)
    if done is not None:
        if {k: done.get(k) for k in header} == header:
            return {"done": done}
        raise LogitsError(f"{out} already holds teacher logits for other settings: {_differences(done, header)} "
                          "differ; choose another out or delete it")
    state = read_json(out, STATE)
    if state is not None and state.get("header") == header:
        clear_stale_locks(out)  # a resume: no process writes before this decision reaches it
        return {"start": int(state["rows_done"]), "note": f"resuming {out} at row {state['rows_done']} of {n}"}
    if state is None and [k for k in list_keys(out) if k != LOCK_NAME]:
        raise LogitsError(f"{out} exists and is not an unfinished teacher-logits store; choose another out")
    note = None
    if state is not None:
        note = f"{out} holds an unfinished store for other settings: starting it again"
        import tensorstore as ts
        kv = _kv(out)
        for name in ("tokens", "values", "indices", "lse"):  # "name/" .. "name0": every key under name/
            kv.delete_range(ts.KvStore.KeyRange(name + "/", name + "0")).result()
        delete_key(out, STATE)
    # a resume point before any array exists: a run killed from here on reruns to completion
    write_json(out, STATE, {"header": header, "rows_done": 0})
    return {"start": 0, "note": note}


def _write(rc, lc: LogitsConfig, loader, header: dict, n: int, b: int, out, t_cfg, log) -> dict[str, Any]:
    import jax

    decision = multihost.decided(lambda: _decide_start(out, header, n), "teacher-logits-start")
    if "done" in decision:
        log(f"{out} is already complete ({n} rows): nothing to do")
        return decision["done"]
    start = decision["start"]
    if decision["note"]:
        log(decision["note"])
    _sync("teacher-logits-start")
    arrays = _arrays(out, n, rc.seq_len, lc.k, lc.values_dtype, lc.lse, b)
    mesh = make_mesh(*rc.mesh)
    dtype = rc.teacher_compute_dtype()  # as the online teacher: the logits a top-k run would see
    params = from_pretrained(rc.teacher, mesh=mesh, dtype=dtype).params()
    B = rc.batch_size
    fn = make_topk_fn(t_cfg, lc.k, rc.chunk_size, rc.attention, dtype, mesh=mesh, rows=B)
    steps = -(-n // B)
    files = "://" not in str(out) or str(out).startswith("gs://")  # a folder or a gs:// prefix: metrics beside it
    prog = Progress(steps, "teacher-logits", metrics_path=f"{str(out).rstrip('/')}/metrics.jsonl"
                    if jax.process_index() == 0 and files else None)
    prog.step = start // B
    mass_sum = tok_sum = 0.0
    pending = []
    vdt = np.float32 if lc.values_dtype == "float32" else _bf16()
    for step in range(start // B, steps):
        local = loader.batch_at(step)
        with jax.set_mesh(mesh):
            v, i, lse = fn(params, to_global(local, mesh, lead=False))
        # this process's rows, in the order it gave them: rows p*b .. p*b + b of the loader's global batch
        vv, ii, ll = _local_rows(v), _local_rows(i), _local_rows(lse)
        if len(vv) != b:
            raise LogitsError(f"process {jax.process_index()} holds {len(vv)} rows of the teacher's outputs, not "
                              f"its {b} rows of the batch: the mesh {dict(mesh.shape)} shares rows between processes")
        g0 = step * B + jax.process_index() * b  # store row of local row 0: the loader's order, not the devices'
        m = min(b, n - g0)
        if m > 0:
            sl = slice(g0, g0 + m)
            pending += [arrays["tokens"][sl].write(local["input_ids"][:m].astype(np.uint32)),
                        arrays["values"][sl].write(vv[:m].astype(vdt)), arrays["indices"][sl].write(ii[:m])]
            if lc.lse:
                pending.append(arrays["lse"][sl].write(ll[:m]))
            mask = local["mask"][:m]
            mass_sum += float(np.sum(np.exp(vv[:m] - ll[:m, :, None]).sum(-1) * mask))
            tok_sum += float(mask.sum())
        prog.update(steps=1, tokens=B * rc.seq_len)
        if (step + 1) % lc.commit_every == 0 or step + 1 == steps:
            for f in pending:
                f.result()
            pending = []
            _sync(f"teacher-logits-{step}")
            if jax.process_index() == 0:
                write_json(out, STATE, {"header": header, "rows_done": min(n, (step + 1) * B)})
    prog.close()
    mass = _mean_across(mass_sum, tok_sum)
    manifest = {**header, "topk_mass": mass}
    _sync("teacher-logits-end")
    if jax.process_index() == 0:
        write_json(out, MANIFEST, manifest)
        delete_key(out, STATE)
    log(f"teacher logits written to {out}: {n} rows x {rc.seq_len} tokens, top {lc.k}"
        + (f"; mean teacher probability mass in the top {lc.k}: {mass:.4f} (rows written in this run)"
           if mass is not None else ""))
    return manifest


def _differences(have: dict, want: dict) -> str:
    """The header keys (and identity parts) where a complete store's manifest differs from this run's."""
    what = {"teacher": "the teacher (weights or config)", "tokenizer": "the tokenizer", "data": "the token store(s)"}
    ident = [what.get(k, k) for k, v in want["identity"].items() if (have.get("identity") or {}).get(k) != v]
    return ", ".join(ident + [k for k in want if k != "identity" and have.get(k) != want[k]])


def _bf16():
    import ml_dtypes
    return ml_dtypes.bfloat16


def _sync(name: str) -> None:
    import jax
    if jax.process_count() > 1:
        from jax.experimental.multihost_utils import sync_global_devices
        sync_global_devices(name)


def _mean_across(total: float, count: float) -> float | None:
    import jax
    if jax.process_count() > 1:
        from jax.experimental.multihost_utils import process_allgather
        both = np.asarray(process_allgather(np.array([total, count], np.float64)))
        total, count = float(both[:, 0].sum()), float(both[:, 1].sum())
    return total / count if count else None
