"""Outputs appear whole or not at all, and never at the cost of data minitron did not write.

`check_output` is every check on an output directory (cheap: call it before loading models);
`atomic_directory` repeats it, writes into a hidden sibling `.<name>.tmp-<token>` and, when complete,
marks it as ours (`MARKER`), renames any previous output aside, renames the new one into place and
only then deletes the old one. A directory without the marker is never replaced.

On Cloud Storage (`gs://`) there are no renames: the finished temporary prefix is committed by server-side
copies under a flag object (`INCOMPLETE`, written first and deleted last, after `MARKER`), and readers refuse
a prefix that holds the flag (`check_complete`): no half-written output is ever taken for a whole one.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Iterable, Iterator

import jax

from minitron_jax.core import multihost, storage
from minitron_jax.core.errors import OutputError

SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "chat_template.jinja", "chat_template.json",
              "added_tokens.json", "vocab.json", "merges.txt")
MARKER = ".minitron-output.json"
INCOMPLETE = ".minitron-incomplete.json"  # gs://: on a prefix while a commit replaces its objects
WRITER = "minitron_jax"




def _ours(file) -> bool:
    try:
        rec = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(rec, dict) and rec.get("written_by") == WRITER


def is_minitron_output(path: str | Path) -> bool:
    """Whether `path` is a directory that `atomic_directory` wrote (it holds a valid `MARKER`), or a gs://
    prefix that one of its commits left half-done (`INCOMPLETE`)."""
    d = storage.path(path)
    return _ours(d / MARKER) or (storage.is_url(path) and _ours(d / INCOMPLETE))


def check_complete(path: str | Path, what: str = "model") -> None:
    """Refuse a gs:// prefix that a commit left half-written (local outputs are renamed into place whole)."""
    if storage.is_url(path) and (storage.path(path) / INCOMPLETE).exists():
        raise OutputError(f"{what} {path} is half-written (it holds {INCOMPLETE}: a writer stopped while "
                          "committing it, or is committing it now); write it again (with --overwrite)")


def _listing(path: Path, n: int = 5) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    return ", ".join(names[:n]) + (f", ... ({len(names)} entries)" if len(names) > n else "")


def _check_existing(path: Path, overwrite: bool) -> None:
    """Refuse replacing a file, a directory minitron did not write, or (without overwrite) any non-empty one."""
    if not path.exists():
        return
    if not path.is_dir():
        raise OutputError(f"output {path} is an existing file; choose another path (outputs are directories)")
    if not any(path.iterdir()):
        return  # an empty directory: nothing to lose
    if not is_minitron_output(path):
        raise OutputError(f"output {path} exists and was not written by minitron (no {MARKER}); --overwrite only "
                          f"replaces minitron outputs, and this would delete {_listing(path)}: choose another "
                          "path, or delete it by hand")
    if not overwrite:
        raise OutputError(f"output {path} exists; choose another path or pass --overwrite (overwrite=True)")


def check_output(path: str | Path, *, inputs: Iterable[str | Path | None] = (), overwrite: bool = False) -> Path:
    """Every check on output directory `path`, before any work; returns it absolute, or raises OutputError.

    Refused: an existing file; an existing non-empty directory without `overwrite`, and even with it one
    that lacks `MARKER`; `path` equal to, inside, or holding one of `inputs` (None entries are ignored);
    a path under a regular file; a parent directory that cannot be written.
    """
    if storage.is_url(path):
        return _check_url_output(storage.path(path), inputs, overwrite)
    path = Path(path).absolute()
    anc = next(a for a in (path, *path.parents) if a.exists() or a == a.parent)
    if anc != path:
        if not anc.is_dir():
            raise OutputError(f"output {path} is under {anc}, which is a file, not a directory; choose an --out "
                              "that is not under a file")
        if not os.access(anc, os.W_OK | os.X_OK):
            raise OutputError(f"output {path}: cannot create it in {anc} (read-only directory); choose a writable "
                              "--out or fix the permissions")
    elif not os.access(path.parent, os.W_OK | os.X_OK):
        raise OutputError(f"output {path}: cannot replace it, its parent {path.parent} is a read-only directory; "
                          "choose a writable --out or fix the permissions")
    real = path.resolve()
    for inp in inputs:
        if inp is None or storage.is_url(inp):  # a gs:// input never overlaps a local output
            continue
        src = Path(inp).absolute().resolve()
        if src == real:
            raise OutputError(f"output {path} is the input {inp}; choose a different --out")
        if real.is_relative_to(src):
            raise OutputError(f"output {path} is inside the input {inp}; choose an --out outside the inputs")
        if src.is_relative_to(real):
            raise OutputError(f"the input {inp} is inside output {path}, which would be replaced; choose an --out "
                              "that holds none of the inputs")
    _check_existing(path, overwrite)
    return path


def _check_url_output(path, inputs, overwrite: bool):
    """check_output for a gs:// prefix: the bucket is usable, the prefix is not one of the inputs nor holds or
    lies in one, and an existing one is replaced only with `overwrite` and only if minitron wrote it."""
    storage.check_access(path, "out")
    url = str(path).rstrip("/")
    for inp in inputs:
        if inp is None or not storage.is_url(inp):
            continue
        src = str(inp).rstrip("/")
        if src == url or url.startswith(src + "/") or src.startswith(url + "/"):
            raise OutputError(f"output {url} and the input {inp} overlap; choose an --out outside the inputs")
    _check_existing(path, overwrite)
    return path


def _commit_url(tmp, path, overwrite: bool) -> None:
    """gs://: make the complete temporary prefix `tmp` the output `path`. The flag goes up first; the previous
    output's objects are deleted; `tmp`'s objects are copied in (server-side), `MARKER` last; the flag comes
    down last. A reader (`check_complete`) never takes the prefix for whole while the flag is there."""
    _check_existing(path, overwrite)
    fs = storage.filesystem()
    flag = path / INCOMPLETE
    flag.write_text(json.dumps({"written_by": WRITER, "from": str(tmp)}) + "\n")
    key = storage.key
    old = [f for f in fs.find(key(path)) if not f.endswith("/" + INCOMPLETE)]
    if old:
        fs.rm(old)
    new = sorted(fs.find(key(tmp)), key=lambda f: f.endswith("/" + MARKER))  # MARKER last
    for f in new:
        fs.copy(f, key(path) + f[len(key(tmp)):])
    flag.unlink()


def _install(tmp: Path, path: Path, token: str, overwrite: bool) -> None:
    """Move the complete `tmp` to `path`; a previous output is set aside first, deleted last, restored on failure."""
    _check_existing(path, overwrite)  # again: something may have appeared while we were writing
    old = path.parent / f".{path.name}.old-{token}"
    try:
        os.replace(path, old)
        moved = True
    except FileNotFoundError:
        moved = False
    try:
        os.replace(tmp, path)
    except OSError as e:
        if moved:
            try:
                os.replace(old, path)
            except OSError as e2:
                raise OutputError(f"output {path}: could not move the finished output into place ({e}) nor "
                                  f"the previous one back ({e2}); it is intact in {old}: rename it back by hand") from e2
        raise OutputError(f"output {path}: could not move the finished output into place ({e}); "
                          f"{'the previous output is back in place' if moved else 'nothing was replaced'}") from e
    if moved:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str | Path, *, kind: str = "output", inputs: Iterable[str | Path | None] = (),
                     overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh `.<name>.tmp-<token>` beside `path`; on normal exit it replaces `path`, on error it
    is removed and `path` is untouched. `check_output(path, inputs=, overwrite=)` runs first.

    The token is the same on every process (multi-host writers such as orbax share the directory);
    process 0 does the file-system operations and decides (`multihost.decided`): its refusal, a failed
    `mkdir` or a failed install is raised on every process, and no process leaves the `with` before the
    output is in place (the next stage, on every host, reads it).
    """
    remote = storage.is_url(path)

    def prepare() -> list[str]:  # the checks, a token unique to this writer, its temporary
        out = check_output(path, inputs=tuple(inputs), overwrite=overwrite)
        token = f"{os.getpid() % 2**31}-{secrets.randbits(31):08x}"
        if not remote:  # object storage has no directories to make
            (out.parent / f".{out.name}.tmp-{token}").mkdir(parents=True)
        return [str(out), token]

    out, token = multihost.decided(prepare, "output-prepare")
    path = storage.path(out)
    tmp = path.parent / f".{path.name}.tmp-{token}"
    lead = jax.process_index() == 0
    try:
        yield tmp

        def install() -> None:
            (tmp / MARKER).write_text(json.dumps(
                {"written_by": WRITER, "version": _version(), "kind": kind, "host": socket.gethostname(),
                 "pid": os.getpid(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2) + "\n")
            if remote:
                _commit_url(tmp, path, overwrite)
            else:
                _install(tmp, path, token, overwrite)

        multihost.decided(install, "output-install")
    finally:
        if lead and remote:
            with contextlib.suppress(FileNotFoundError):
                storage.filesystem().rm(storage.key(tmp), recursive=True)
        elif lead and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("minitron-jax")
    except Exception:  # not installed as a distribution
        return "unknown"


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary name beside `path`, unique to this writer (process id and a random token: two processes
    or hosts writing the same file on a shared disk never write into one temporary); on normal exit it replaces
    `path`, on error it is removed and `path` is left as it was. For gs:// the temporary is a local file, uploaded
    as one object on normal exit (an object upload is whole or absent: readers never see part of it)."""
    if storage.is_url(path):
        import tempfile
        with tempfile.TemporaryDirectory(prefix="minitron-upload-") as d:
            tmp = Path(d) / storage.path(path).name
            yield tmp
            storage.upload(tmp, path)
        return
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    """One small file, whole or not at all: written under a name unique to this writer, then renamed (gs://: one
    object upload)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return storage.path(path)


def copy_side_files(source: str | Path | None, dest: Path) -> None:
    """Tokenizer and generation-config files travel with the weights."""
    if source is None:
        return
    src = storage.path(source)
    for name in SIDE_FILES:
        if (src / name).exists():
            if storage.is_url(source) or storage.is_url(dest):
                (dest / name).write_bytes((src / name).read_bytes())
            else:
                shutil.copy2(src / name, dest / name)
