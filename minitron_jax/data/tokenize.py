"""`minitron tokenize`: documents -> a token store (token_store.py), in parallel, resumable, bounded memory;
on one host or split over the P processes of a multi-host job.

Documents are read lazily (`data.iter_documents`: text files, JSONL, parquet, saved datasets), in
order, source after source; long documents are cut into pieces of at most `piece_chars` characters
(`data.split_pieces`, cut where the tokenizer splits anyway). Pieces go to `workers` spawned processes
(`tokenizers`, its own thread pool off) in batches of about `batch_chars` characters, at most
2 x workers batches in flight; results are written in submission order, so the store is the same
bytes for any number of workers. Each stored document is BOS (if the tokenizer has one) + tokens + EOS;
documents that are blank (whitespace only) or not text are skipped and counted.

Resume: `state.json` records the last document whose tokens are all on storage (written after each
full token shard). Run again with the same arguments, the job skips that many source documents and
continues; the result is byte-identical to an uninterrupted run. The manifest is written last.

Several processes (`job`: this process's index among P and core.multihost's `decided` / `agree`, passed in by
the CLI; this module never imports jax). The store is byte-identical to the one 1 process writes with the same
arguments (every file: tokens, offsets, names, manifest), whatever P. A document's token offset depends on
every earlier document, so no process can write its final place until all have tokenized; and a zarr shard
that straddles two processes' documents must not be written by both (read-modify-write of one shard by two
writers races). So the job runs in three steps:

1. Split. The source documents (blank ones included, so the split does not depend on their contents) are
   cut into stripes of `stripe_docs` consecutive documents; stripe s belongs to process s mod P. Every
   process reads through the whole document stream but passes over the other processes' documents unread
   where the format allows (a .txt file is not opened; a JSONL line is still parsed, a parquet batch read),
   and tokenizes only its own stripes into a part of its own, `STORE/parts/NNNNN/` (tokens, offsets, names,
   and the source index of each document), with the same commits and state.json as a 1-process store.
   Striping (rather than one contiguous range per process) needs no counting pass before the work starts
   and spreads long and short sources evenly over the processes.
2. Exchange. Each process counts, from its part, the documents and tokens of each of its stripes and keeps
   them in its part's state.json; the processes agree on their totals (and on the number of source
   documents, which all of them read). From the stripe counts every process knows where each stripe's
   documents and tokens go in the store.
3. Assemble. The store's token shards, offset shards and name files are dealt out in contiguous ranges,
   one range per process; each one is written whole, once, by its one process, from the parts (a shard is
   read from at most a few parts' slices). Then process 0 alone cuts the arrays to size, deletes the parts
   and writes the manifest last, and every process returns it.

Process 0 decides the start once (`_prepare`: fresh, resume, or refuse to touch a complete store without
--overwrite) and creates the store's arrays before any other process writes. Resume with P processes: run
the same command again with the same P (and stripe size): each process resumes its own part from its last
commit (a finished part is not redone) and the assembly is redone whole (it is idempotent); a store
interrupted after the assembly only finishes. An unfinished store of another process count is refused
(resuming needs the same split): pass --overwrite to start again. Every process must see the same sources
and tokenizer (checked: a hash of the arguments and the source sizes) and the store must be storage every
host shares (the CLI checks a local path with `multihost.check_shared`). A failure on one process stops every
process (the CLI's `multihost.fail`: os._exit); the tokenizer workers of a process that ends that way end with it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from minitron_jax.core import storage
from minitron_jax.core.errors import DataError
from minitron_jax.core.progress import Progress
from minitron_jax.data import token_store as S
from minitron_jax.data.hf_sources import data_files, is_hf_source, normalize
from minitron_jax.data.text import PIECE_CHARS, iter_documents, split_pieces

BATCH_CHARS = 1 << 20  # characters per worker task (about 1 MB of text, ~250k tokens)
STRIPE_DOCS = 1024  # source documents per stripe: the unit of work dealt out to the processes of a job
PARTS = "parts/"  # under the store: each process's part while a multi-process job runs
SOURCE_INDEX = "source_index"  # in a part: the source document number (from 1) of each of its documents
COUNT_BLOCK = 1 << 20  # documents of a part read at a time when counting its stripes
_worker_tok = None


def _init_worker(tokenizer_json: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
    import multiprocessing
    import threading
    parent = multiprocessing.parent_process()
    if parent is not None:  # the job process gone without shutting the pool down (os._exit when another
        # process of a multi-host job fails, SIGKILL): end too, rather than wait for work forever
        threading.Thread(target=lambda: (parent.join(), os._exit(1)), name="exit-with-parent", daemon=True).start()
    global _worker_tok
    from tokenizers import Tokenizer
    _worker_tok = Tokenizer.from_file(tokenizer_json)


def _encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated uint32 ids of `texts` (no special tokens) and the number of ids of each."""
    enc = _worker_tok.encode_batch(texts, add_special_tokens=False)
    lengths = np.fromiter((len(e.ids) for e in enc), np.int64, len(enc))
    ids = np.fromiter((i for e in enc for i in e.ids), np.uint32, int(lengths.sum()))
    return ids, lengths


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")  # what tokenize reads


def _special_ids(tokenizer: Path, tok_json: str) -> tuple[int | None, int]:
    """BOS and EOS ids as transformers reads them (tokenizer_config.json, else special_tokens_map.json),
    without importing transformers; no EOS is a DataError."""
    from tokenizers import Tokenizer
    d = tokenizer if tokenizer.is_dir() else tokenizer.parent
    cfg = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins
        if (d / name).is_file():
            cfg.update({k: v for k, v in json.loads((d / name).read_text()).items() if v is not None})
    vocab = Tokenizer.from_file(tok_json)

    def token_id(key: str) -> int | None:
        v = cfg.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        if v is None:
            return None
        if (i := vocab.token_to_id(v)) is None:
            raise DataError(f"the {key} {v!r} of the tokenizer in {d} is not in its tokenizer.json; fix "
                            "tokenizer_config.json or use the model's own tokenizer")
        return i
    eos = token_id("eos_token")
    if eos is None:
        raise DataError(f"the tokenizer in {d} has no EOS token, and a token store ends every document "
                        "with one; set it (tok.eos_token = '</s>' or the model's end-of-text token, then "
                        "tok.save_pretrained(DIR)) or use the model's own tokenizer")
    return token_id("bos_token"), eos


def _items(sources: Sequence[str], field: str, skip: int, piece_chars: int, tally: dict,
           owned: Callable[[int], bool] | None = None) -> Iterator[tuple]:
    """(piece, starts a document, None or at a document's last piece (source documents consumed, skipped
    so far, name)). The first `skip` source documents, and those that `owned(n)` (n: the source document's
    number, from 1) refuses, are passed over unread; blank or non-text documents are skipped and counted in
    `tally["skipped"]`. Once exhausted, `tally["seen"]` is the number of source documents."""
    n = 0
    for src in sources:
        with contextlib.closing(iter_documents(src, field)) as it:
            for name, chunks in it:
                n += 1
                with contextlib.closing(chunks) if hasattr(chunks, "close") else contextlib.nullcontext():
                    if n <= skip or (owned is not None and not owned(n)):
                        continue
                    prev, lead, first = None, "", True
                    for piece in split_pieces((c for c in chunks if isinstance(c, str)), piece_chars):
                        if prev is None:
                            if not piece.strip():
                                lead += piece  # blank text before the first word: kept only if text follows
                            else:
                                prev = lead + piece
                            continue
                        yield prev, first, None
                        prev, first = piece, False
                    if prev is None:
                        tally["skipped"] += 1
                    else:
                        yield prev, first, (n, tally["skipped"], name)
    tally["seen"] = n


def _batches(items: Iterator[tuple], batch_chars: int) -> Iterator[list[tuple]]:
    batch, chars = [], 0
    for item in items:
        batch.append(item)
        chars += len(item[0])
        if chars >= batch_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _run_of(state: dict) -> dict:
    """The split an unfinished store was written with (1 process: no parts)."""
    return {"processes": state.get("processes", 1), "stripe_docs": state.get("stripe_docs")}


def _prepare(store: str, params: dict, overwrite: bool, run: dict | None = None) -> dict | None:
    """The resume state of `store`, None for a fresh start; refuses what must not be touched. `run`: the
    split of this run (`_run_of`); an unfinished store resumes only under the same split."""
    run = run or {"processes": 1, "stripe_docs": None}
    if "://" not in store:
        p = Path(store)
        if p.exists() and not p.is_dir():
            raise S.StoreError(f"--out {store} is an existing file; a token store is a directory: choose another path")
        for src in params["sources"]:  # an hf: source's local dataset directory too
            if storage.is_url(src):
                continue
            src_ = Path(src[3:].partition("?")[0] if src.startswith("hf:") else src).resolve()
            if src.startswith("hf:") and not src_.is_dir():
                continue
            out_ = p.absolute().resolve()
            if out_.is_relative_to(src_) or src_.is_relative_to(out_):
                raise S.StoreError(f"--out {store} and the source {src} overlap (one is inside the other); choose an "
                                   "--out outside the sources that holds none of them")
        if not p.exists():
            return None
    keys = S.list_keys(store)
    if not keys:
        return None
    if S.MANIFEST in keys or S.STATE in keys:
        state = S.read_json(store, S.STATE)
        parts = any(k.startswith(PARTS) for k in keys)
        if S.MANIFEST not in keys and state is not None and state["params"] == params and _run_of(state) == run:
            S.clear_stale_locks(store)  # a resume: no process writes yet (`tokenize-start` is decided first)
            return state
        if S.MANIFEST not in keys and state is not None and state["documents"] == 0 and not parts:
            S.delete_all(store)  # an unfinished store with nothing committed: start again, nothing is lost
            return None
        if not overwrite:
            if S.MANIFEST in keys:
                what = "a complete token store"
            elif state is not None and state["params"] == params:
                was = _run_of(state)["processes"]
                what = (f"an unfinished token store of the same arguments written by {was} process"
                        f"{'es' * (was > 1)} (resuming needs the same split: run it again with {was} process"
                        f"{'es' * (was > 1)}{' and the same stripe size' * (was > 1)})")
            else:
                what = ("an unfinished token store of other arguments ("
                        + ", ".join(k for k in params if state is None or state["params"].get(k) != params[k])
                        + " differ)")
            raise S.StoreError(f"--out {store} is {what}; choose another path or pass --overwrite (overwrite=True)")
        S.delete_all(store)
        return None
    raise S.StoreError(f"--out {store} exists and is not a token store ({len(keys)} files, e.g. {keys[0]}); "
                       "choose another path, or delete it by hand")


@dataclass(frozen=True)
class Job:
    """This process's place in a multi-process job and the means to coordinate with the others: `decided(fn,
    what)` (process 0 runs fn, every process gets its JSON result or its error) and `agree(value, what)`
    (every process's short string, in process order), as core.multihost has them (the CLI passes those)."""
    index: int
    count: int
    decided: Callable[[Callable[[], Any], str], Any]
    agree: Callable[[str, str], list[str]]

    def __post_init__(self):
        if not 0 <= self.index < self.count:
            raise ValueError(f"process {self.index} of {self.count}: the index must be in [0, count)")


def tokenize(sources: str | Sequence[str], tokenizer: str | Path, out: str, *, workers: int = 1, field: str = "text",
             overwrite: bool = False, batch_chars: int = BATCH_CHARS, piece_chars: int = PIECE_CHARS,
             shard: int = S.TOKEN_SHARD, chunk: int = S.TOKEN_CHUNK, progress: bool = True,
             names_block: int = S.NAMES_BLOCK, job: Job | None = None, stripe_docs: int = STRIPE_DOCS,
             _stop_after_commits: int | None = None) -> dict:
    """Tokenize `sources` (paths `data.iter_documents` reads) with the HF tokenizer directory `tokenizer`
    into the token store `out` (a path or kvstore URL); returns the manifest. Resumes an unfinished
    store of the same arguments; a complete one is replaced only with `overwrite`. With `job` of several
    processes (every process calls this with the same arguments), each tokenizes its stripes of
    `stripe_docs` source documents and the store is the same bytes as 1 process writes (module docstring)."""
    sources = [normalize(s) if is_hf_source(s) else str(s) if storage.is_url(s) else str(Path(s).absolute())
               for s in ([sources] if isinstance(sources, (str, Path)) else sources)]  # hf: refuses scripts, unknown keys
    for s in sources:
        if not is_hf_source(s) and not storage.path(s).exists():  # local or gs://
            raise DataError(f"source {s} does not exist")
    if workers < 1:
        raise ValueError(f"workers={workers} must be at least 1")
    if stripe_docs < 1:
        raise ValueError(f"stripe_docs={stripe_docs} must be at least 1")
    tokenizer = storage.local_copy(tokenizer, TOKENIZER_FILES, "--tokenizer")  # gs://: its few small files
    sha = S.tokenizer_identity(tokenizer)
    tok_json = str(tokenizer / "tokenizer.json" if tokenizer.is_dir() else tokenizer)
    bos, eos = _special_ids(tokenizer, tok_json)
    params = {"sources": sources, "field": field,
              "tokenizer": {"sha256": sha, "bos_id": bos, "eos_id": eos, "add_bos": bos is not None, "add_eos": True},
              "layout": {"token_shard": shard, "token_chunk": chunk, "offset_shard": S.OFFSET_SHARD,
                         "offset_chunk": S.OFFSET_CHUNK, "piece_chars": piece_chars, "names_block": names_block}}
    out = str(out)
    w = _Writer(workers, tok_json, bos, eos, shard, chunk, names_block, batch_chars, piece_chars, progress,
                _stop_after_commits)
    if job is not None and job.count > 1:
        return _tokenize_parts(job, sources, field, out, params, overwrite, stripe_docs, w)
    state = _prepare(out, params, overwrite)
    if state is None:
        state = {"params": params, "documents": 0, "tokens": 0, "source_documents": 0, "skipped": 0}
        S.write_json(out, S.STATE, state)  # first: a directory with state.json is ours
    tally = {"skipped": state["skipped"]}
    items = _items(sources, field, state["source_documents"], piece_chars, tally)
    n_tokens, n_docs = w.write(out, {"params": params}, state, items, tally, _source_chars(sources),
                               "tokenize (characters)")
    skipped = tally["skipped"]
    if n_docs == 0:
        S.delete_all(out)
        raise _no_documents(sources, skipped, field)
    manifest = S.finish(out, n_tokens, n_docs, {**params, "skipped_documents": skipped})
    S.delete_key(out, S.STATE)
    return manifest


def _no_documents(sources: Sequence[str], skipped: int, field: str) -> DataError:
    return DataError(f"no non-empty documents found in {', '.join(sources)} ({skipped} blank or non-text "
                     f"documents; looked for .txt, .jsonl, .parquet files or a saved dataset, field {field!r})")


@dataclass
class _Writer:
    """The tokenizing loop and the store layout it writes (the whole store, or one process's part)."""
    workers: int
    tok_json: str
    bos: int | None
    eos: int
    shard: int
    chunk: int
    names_block: int
    batch_chars: int
    piece_chars: int
    progress: bool
    stop_after_commits: int | None

    def write(self, out: str, fixed: dict, state: dict, items: Iterator[tuple], tally: dict, total_chars: int,
              label: str, source_index: bool = False) -> tuple[int, int]:
        """Tokenize `items` into tokens / doc_offsets / doc_names under `out`, continuing from the counts in
        `state`; after each full token shard, state.json ({**fixed, counts}) records what is on storage. With
        `source_index`, also the source document number of each document (array SOURCE_INDEX). Returns (tokens,
        documents), everything written (the last partial shards too)."""
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        bos, eos, shard = self.bos, self.eos, self.shard
        toks = S.Appender(S.open_array(out, S.TOKENS, "uint32", shard, self.chunk, create=True), shard,
                          state["tokens"], np.uint32)
        offs = S.Appender(S.open_array(out, S.OFFSETS, "int64", S.OFFSET_SHARD, S.OFFSET_CHUNK, create=True),
                          S.OFFSET_SHARD, state["documents"] + 1, np.int64)
        srcs = S.Appender(S.open_array(out, SOURCE_INDEX, "int64", S.OFFSET_SHARD, S.OFFSET_CHUNK, create=True),
                          S.OFFSET_SHARD, state["documents"], np.int64) if source_index else None
        names = S.NameAppender(out, self.names_block, state["documents"])
        n_docs, ends, commits = state["documents"], deque(), 0  # ends: (token end, documents, source docs, skipped)
        bar = Progress(total_chars, label, stream=None if self.progress else io.StringIO())

        def commit(on_storage: int) -> None:
            nonlocal commits
            last = None
            while ends and ends[0][0] <= on_storage:
                last = ends.popleft()
            if last is None:
                return
            offs.write(partial=True)
            if srcs is not None:
                srcs.write(partial=True)
            names.write()
            S.write_json(out, S.STATE, {**fixed, "tokens": last[0], "documents": last[1],
                                        "source_documents": last[2], "skipped": last[3]})
            commits += 1
            if self.stop_after_commits is not None and commits >= self.stop_after_commits:
                raise KeyboardInterrupt(f"stopped after {commits} commits (test hook)")

        def take(batch, result) -> None:
            nonlocal n_docs
            ids, lengths = result
            at = 0
            for (text, starts, end), n in zip(batch, lengths):
                if starts and bos is not None:
                    toks.append([bos])
                toks.append(ids[at:at + n])
                at += n
                if end is not None:
                    toks.append([eos])
                    n_docs += 1
                    offs.append([toks.count])
                    if srcs is not None:
                        srcs.append([end[0]])
                    names.append(end[2])
                    ends.append((toks.count, n_docs, *end[:2]))
            bar.update(steps=sum(len(t) for t, _, _ in batch), tokens=len(ids), documents=n_docs)
            before = toks.start
            if toks.write() > before:
                commit(toks.start)

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(self.tok_json,)) as pool:
            pending = deque()
            for batch in _batches(items, self.batch_chars):
                pending.append((batch, pool.submit(_encode, [t for t, _, _ in batch])))
                if len(pending) >= 2 * self.workers:
                    b, f = pending.popleft()
                    take(b, f.result())
            while pending:
                b, f = pending.popleft()
                take(b, f.result())
        bar.close()
        toks.write(partial=True)
        offs.write(partial=True)
        if srcs is not None:
            srcs.write(partial=True)
        names.write()
        return toks.count, n_docs


def _part(store: str, p: int) -> str:
    """Where process `p` writes its part of `store` (same kvstore, under PARTS)."""
    return store.rstrip("/") + f"/{PARTS}{p:05d}"


def _tokenize_parts(job: Job, sources: list[str], field: str, out: str, params: dict, overwrite: bool,
                    stripe: int, w: _Writer) -> dict:
    """`tokenize` as process `job.index` of `job.count` (module docstring: split, exchange, assemble)."""
    P, p = job.count, job.index
    chars = _source_chars(sources)
    mine = hashlib.sha256(json.dumps([params, chars], sort_keys=True).encode()).hexdigest()[:16]
    seen = job.agree(mine, "tokenize-inputs")
    if differ := [str(i) for i, h in enumerate(seen) if h != seen[0]]:
        raise DataError(f"the processes of the job do not see the same sources, tokenizer or arguments: process(es) "
                        f"{', '.join(differ)} differ from process 0's; give every host the same files at the same "
                        "paths (a shared mount or gs://) and the same command")
    run = {"processes": P, "stripe_docs": stripe}

    def start() -> dict:
        state = _prepare(out, params, overwrite, run)
        if state is None:
            state = {"params": params, **run, "documents": 0, "tokens": 0, "source_documents": 0, "skipped": 0}
            S.write_json(out, S.STATE, state)  # first: a directory with state.json is ours
        if "assembled" not in state:  # created once, here, before any process writes into them
            S.open_array(out, S.TOKENS, "uint32", w.shard, w.chunk, create=True)
            S.open_array(out, S.OFFSETS, "int64", S.OFFSET_SHARD, S.OFFSET_CHUNK, create=True)
        return state

    state = job.decided(start, "tokenize-start")
    if "assembled" in state:  # interrupted after the assembly: only the finish is left
        n_tokens, n_docs, skipped = (state["assembled"][k] for k in ("tokens", "documents", "skipped"))
    else:
        part = _part(out, p)
        ps = S.read_json(part, S.STATE) or {"part": p, "tokens": 0, "documents": 0, "source_documents": 0,
                                             "skipped": 0}
        if not ps.get("done"):
            tally = {"skipped": ps["skipped"]}
            items = _items(sources, field, ps["source_documents"], w.piece_chars, tally,
                           owned=lambda n: (n - 1) // stripe % P == p)
            tokens, docs = w.write(part, {"part": p}, ps, items, tally, max(1, chars // P),
                                   f"tokenize, process {p} of {P} (characters)", source_index=True)
            ps = {"part": p, "tokens": tokens, "documents": docs, "skipped": tally["skipped"],
                  "source_documents": tally["seen"], "done": True,
                  "stripes": _stripe_counts(part, docs, tally["seen"], p, P, stripe)}
            S.write_json(part, S.STATE, ps)
        print(f"tokenize: process {p} of {P} tokenized {ps['documents']} documents ({ps['tokens']} tokens, "
              f"{ps['skipped']} skipped) in {len(ps['stripes'][0])} of {-(-ps['source_documents'] // stripe)} "
              f"stripes of {stripe} source documents", file=sys.stderr, flush=True)
        totals = [json.loads(s) for s in job.agree(
            json.dumps([ps[k] for k in ("documents", "tokens", "skipped", "source_documents")]), "tokenize-parts")]
        if len({t[3] for t in totals}) > 1:
            raise DataError(f"the processes of the job read different numbers of source documents "
                            f"({', '.join(str(t[3]) for t in totals)}); give every host the same files")
        n_docs, n_tokens, skipped = (sum(t[i] for t in totals) for i in range(3))
        if n_docs == 0:
            job.decided(lambda: S.delete_all(out), "tokenize-empty")
            raise _no_documents(sources, skipped, field)
        parts = [S.read_json(_part(out, q), S.STATE) for q in range(P)]
        _assemble(out, parts, n_tokens, n_docs, P, p, stripe, w)
        job.agree("assembled", "tokenize-assembled")

    def finish() -> dict:
        S.write_json(out, S.STATE, {**state, "assembled": {"tokens": n_tokens, "documents": n_docs,
                                                            "skipped": skipped}})
        S.delete_prefix(out, PARTS)
        manifest = S.finish(out, n_tokens, n_docs, {**params, "skipped_documents": skipped})
        S.delete_key(out, S.STATE)
        return manifest

    return job.decided(finish, "tokenize-finish")


def _stripe_counts(part: str, docs: int, seen: int, p: int, P: int, stripe: int) -> list[list[int]]:
    """[documents, tokens] of the part of process `p` in each of its stripes p, p + P, ... of the `seen` source
    documents (empty ones included), from its source index and offsets, a block at a time."""
    owned = len(range(p, -(-seen // stripe), P))
    counts = np.zeros((2, owned), np.int64)
    src = S.open_array(part, SOURCE_INDEX, "int64", S.OFFSET_SHARD, S.OFFSET_CHUNK)
    off = S.open_array(part, S.OFFSETS, "int64", S.OFFSET_SHARD, S.OFFSET_CHUNK)
    for a in range(0, docs, COUNT_BLOCK):
        b = min(a + COUNT_BLOCK, docs)
        n, o = src[a:b].read().result(), off[a:b + 1].read().result()
        s = (n - 1) // stripe
        assert (s % P == p).all(), "a document of another process's stripe in this part"
        j = (s - p) // P
        counts[0] += np.bincount(j, minlength=owned)
        counts[1] += np.bincount(j, weights=np.diff(o), minlength=owned).astype(np.int64)  # exact below 2**53
    return counts.tolist()


def _assemble(out: str, parts: list[dict], n_tokens: int, n_docs: int, P: int, p: int, stripe: int,
              w: _Writer) -> None:
    """Write this process's range of the store's token shards, offset shards and name files, each whole, from
    the parts (`parts`: every process's finished part state)."""
    # the stripes in store order: stripe s is the (s // P)-th of process s % P
    seg = []  # (process, part document start, documents, part token start, tokens) of each non-empty stripe
    at = [[0, 0] for _ in range(P)]
    for s in range(-(-parts[0]["source_documents"] // stripe)):
        q, j = s % P, s // P
        d, t = parts[q]["stripes"][0][j], parts[q]["stripes"][1][j]
        if d:
            seg.append((q, at[q][0], d, at[q][1], t))
        at[q][0] += d
        at[q][1] += t
    doc_at = np.cumsum([0] + [x[2] for x in seg])  # each stripe's first document in the store
    tok_at = np.cumsum([0] + [x[4] for x in seg])
    assert doc_at[-1] == n_docs and tok_at[-1] == n_tokens, (doc_at[-1], n_docs, tok_at[-1], n_tokens)

    def pieces(starts: np.ndarray, a: int, b: int) -> Iterator[tuple[int, int, int]]:
        """(stripe k, from, to) relative to stripe k's start: the stripes' share of [a, b) of the store."""
        k = int(np.searchsorted(starts, a, "right")) - 1
        while k < len(seg) and starts[k] < b:
            yield k, max(a, int(starts[k])) - int(starts[k]), min(b, int(starts[k + 1])) - int(starts[k])
            k += 1

    part_tok = [S.open_array(_part(out, q), S.TOKENS, "uint32", w.shard, w.chunk) for q in range(P)]
    part_off = [S.open_array(_part(out, q), S.OFFSETS, "int64", S.OFFSET_SHARD, S.OFFSET_CHUNK) for q in range(P)]
    tokens = S.open_array(out, S.TOKENS, "uint32", w.shard, w.chunk, create=True)
    offsets = S.open_array(out, S.OFFSETS, "int64", S.OFFSET_SHARD, S.OFFSET_CHUNK, create=True)

    for i in _share(-(-n_tokens // w.shard), P, p):
        a, b = i * w.shard, min((i + 1) * w.shard, n_tokens)
        reads = [part_tok[seg[k][0]][seg[k][3] + lo:seg[k][3] + hi].read() for k, lo, hi in pieces(tok_at, a, b)]
        tokens[a:b].write(np.concatenate([r.result() for r in reads])).result()

    for i in _share(-(-(n_docs + 1) // S.OFFSET_SHARD), P, p):  # offset x: the end of document x - 1
        a, b = i * S.OFFSET_SHARD, min((i + 1) * S.OFFSET_SHARD, n_docs + 1)
        got = [(k, part_off[seg[k][0]][seg[k][1] + lo + 1:seg[k][1] + hi + 1].read())
               for k, lo, hi in pieces(doc_at, max(a, 1) - 1, b - 1)]
        vals = [np.zeros(1, np.int64)] * (a == 0) + [r.result() - seg[k][3] + tok_at[k] for k, r in got]
        offsets[a:b].write(np.concatenate(vals)).result()

    blocks = {}  # (process, block) -> names: the part files last read

    def part_names(q: int, a: int, b: int) -> list[str]:
        names, B = [], w.names_block
        for k in range(a // B, (b - 1) // B + 1):
            if (q, k) not in blocks:
                if len(blocks) > 2 * P:
                    blocks.clear()
                blocks[q, k] = S.read_json(_part(out, q), S.names_key(k))["names"]
            names += blocks[q, k][max(a - k * B, 0):b - k * B]
        return names

    for i in _share(-(-n_docs // w.names_block), P, p):
        a, b = i * w.names_block, min((i + 1) * w.names_block, n_docs)
        names = [n for k, lo, hi in pieces(doc_at, a, b) for n in part_names(seg[k][0], seg[k][1] + lo, seg[k][1] + hi)]
        S.write_json(out, S.names_key(i), {"names": names})


def _share(n: int, P: int, p: int) -> range:
    """Process p's contiguous share of n units dealt out to P processes."""
    return range(n * p // P, n * (p + 1) // P)


def _source_chars(sources: Sequence[str]) -> int:
    """About the characters to read: the bytes of the source files (the progress total)."""
    files = [p for s in sources for p in (data_files(s) if is_hf_source(s) else [storage.path(s)]
                                          if storage.path(s).is_file() else storage.files(s))]
    return max(1, sum(storage.size(p) for p in files))  # files only: no request per object to ask again
