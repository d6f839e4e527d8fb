"""`minitron tokenize`: documents -> a token store (token_store.py), in parallel, resumable, bounded memory.

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
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections import deque
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from minitron_jax.core.errors import DataError
from minitron_jax.core.progress import Progress
from minitron_jax.data import token_store as S
from minitron_jax.data.hf_sources import data_files, is_hf_source, normalize
from minitron_jax.data.text import PIECE_CHARS, iter_documents, split_pieces

BATCH_CHARS = 1 << 20  # characters per worker task (about 1 MB of text, ~250k tokens)
_worker_tok = None


def _init_worker(tokenizer_json: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
    global _worker_tok
    from tokenizers import Tokenizer
    _worker_tok = Tokenizer.from_file(tokenizer_json)


def _encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated uint32 ids of `texts` (no special tokens) and the number of ids of each."""
    enc = _worker_tok.encode_batch(texts, add_special_tokens=False)
    lengths = np.fromiter((len(e.ids) for e in enc), np.int64, len(enc))
    ids = np.fromiter((i for e in enc for i in e.ids), np.uint32, int(lengths.sum()))
    return ids, lengths


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


def _items(sources: Sequence[str], field: str, skip: int, piece_chars: int, tally: dict) -> Iterator[tuple]:
    """(piece, starts a document, None or at a document's last piece (source documents consumed, skipped
    so far)). The first `skip` source documents are passed over unread; blank or non-text documents are
    skipped and counted in `tally["skipped"]`."""
    n = 0
    for src in sources:
        with contextlib.closing(iter_documents(src, field)) as it:
            for name, chunks in it:
                n += 1
                with contextlib.closing(chunks) if hasattr(chunks, "close") else contextlib.nullcontext():
                    if n <= skip:
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


def _prepare(store: str, params: dict, overwrite: bool) -> dict | None:
    """The resume state of `store`, None for a fresh start; refuses what must not be touched."""
    if "://" not in store:
        p = Path(store)
        if p.exists() and not p.is_dir():
            raise S.StoreError(f"--out {store} is an existing file; a token store is a directory: choose another path")
        for src in params["sources"]:  # an hf: source's local dataset directory too
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
        if S.MANIFEST not in keys and state is not None and state["params"] == params:
            return state
        if S.MANIFEST not in keys and state is not None and state["documents"] == 0:
            S.delete_all(store)  # an unfinished store with nothing committed: start again, nothing is lost
            return None
        if not overwrite:
            what = ("a complete token store" if S.MANIFEST in keys else
                    "an unfinished token store of other arguments ("
                    + ", ".join(k for k in params if state is None or state["params"].get(k) != params[k]) + " differ)")
            raise S.StoreError(f"--out {store} is {what}; choose another path or pass --overwrite (overwrite=True)")
        S.delete_all(store)
        return None
    raise S.StoreError(f"--out {store} exists and is not a token store ({len(keys)} files, e.g. {keys[0]}); "
                       "choose another path, or delete it by hand")


def tokenize(sources: str | Sequence[str], tokenizer: str | Path, out: str, *, workers: int = 1, field: str = "text",
             overwrite: bool = False, batch_chars: int = BATCH_CHARS, piece_chars: int = PIECE_CHARS,
             shard: int = S.TOKEN_SHARD, chunk: int = S.TOKEN_CHUNK, progress: bool = True,
             names_block: int = S.NAMES_BLOCK, _stop_after_commits: int | None = None) -> dict:
    """Tokenize `sources` (paths `data.iter_documents` reads) with the HF tokenizer directory `tokenizer`
    into the token store `out` (a path or kvstore URL); returns the manifest. Resumes an unfinished
    store of the same arguments; a complete one is replaced only with `overwrite`."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    sources = [normalize(s) if is_hf_source(s) else str(Path(s).absolute())  # hf: refuses scripts, unknown keys
               for s in ([sources] if isinstance(sources, (str, Path)) else sources)]
    for s in sources:
        if not is_hf_source(s) and not Path(s).exists():
            raise DataError(f"source {s} does not exist")
    if workers < 1:
        raise ValueError(f"workers={workers} must be at least 1")
    tokenizer = Path(tokenizer)
    sha = S.tokenizer_identity(tokenizer)
    tok_json = str(tokenizer / "tokenizer.json" if tokenizer.is_dir() else tokenizer)
    bos, eos = _special_ids(tokenizer, tok_json)
    params = {"sources": sources, "field": field,
              "tokenizer": {"sha256": sha, "bos_id": bos, "eos_id": eos, "add_bos": bos is not None, "add_eos": True},
              "layout": {"token_shard": shard, "token_chunk": chunk, "offset_shard": S.OFFSET_SHARD,
                         "offset_chunk": S.OFFSET_CHUNK, "piece_chars": piece_chars, "names_block": names_block}}
    out = str(out)
    state = _prepare(out, params, overwrite)
    if state is None:
        state = {"params": params, "documents": 0, "tokens": 0, "source_documents": 0, "skipped": 0}
        S.write_json(out, S.STATE, state)  # first: a directory with state.json is ours
    toks = S.Appender(S.open_array(out, S.TOKENS, "uint32", shard, chunk, create=True), shard, state["tokens"], np.uint32)
    offs = S.Appender(S.open_array(out, S.OFFSETS, "int64", S.OFFSET_SHARD, S.OFFSET_CHUNK, create=True),
                      S.OFFSET_SHARD, state["documents"] + 1, np.int64)
    names = S.NameAppender(out, names_block, state["documents"])
    tally = {"skipped": state["skipped"]}
    n_docs, ends, commits = state["documents"], deque(), 0  # ends: (token end, documents, source docs, skipped)
    bar = Progress(_source_chars(sources), "tokenize (characters)", stream=None if progress else io.StringIO())

    def commit(on_storage: int) -> None:
        nonlocal commits
        last = None
        while ends and ends[0][0] <= on_storage:
            last = ends.popleft()
        if last is None:
            return
        offs.write(partial=True)
        names.write()
        S.write_json(out, S.STATE, {"params": params, "tokens": last[0], "documents": last[1],
                                    "source_documents": last[2], "skipped": last[3]})
        commits += 1
        if _stop_after_commits is not None and commits >= _stop_after_commits:
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
                names.append(end[2])
                ends.append((toks.count, n_docs, *end[:2]))
        bar.update(steps=sum(len(t) for t, _, _ in batch), tokens=len(ids), documents=n_docs)
        before = toks.start
        if toks.write() > before:
            commit(toks.start)

    items = _items(sources, field, state["source_documents"], piece_chars, tally)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(tok_json,)) as pool:
        pending = deque()
        for batch in _batches(items, batch_chars):
            pending.append((batch, pool.submit(_encode, [t for t, _, _ in batch])))
            if len(pending) >= 2 * workers:
                b, f = pending.popleft()
                take(b, f.result())
        while pending:
            b, f = pending.popleft()
            take(b, f.result())
    bar.close()
    skipped = tally["skipped"]
    if n_docs == 0:
        S.delete_all(out)
        raise DataError(f"no non-empty documents found in {', '.join(sources)} ({skipped} blank or non-text "
                        f"documents; looked for .txt, .jsonl, .parquet files or a saved dataset, field {field!r})")
    toks.write(partial=True)
    offs.write(partial=True)
    names.write()
    manifest = S.finish(out, toks.count, n_docs, {**params, "skipped_documents": skipped})
    S.delete_key(out, S.STATE)
    return manifest


def _source_chars(sources: Sequence[str]) -> int:
    """About the characters to read: the bytes of the source files (the progress total)."""
    files = [p for s in sources for p in (data_files(s) if is_hf_source(s) else
                                          [Path(s)] if Path(s).is_file() else Path(s).rglob("*"))]
    return max(1, sum(p.stat().st_size for p in files if p.is_file()))
