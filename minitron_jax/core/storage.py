"""Where a file lives: a local path or Cloud Storage (`gs://bucket/prefix`), behind one path API.

`path(p)` gives a `pathlib.Path` for a local path and an `etils.epath.Path` for `gs://` (the path library
orbax itself uses; its gs:// backend is fsspec's `gcsfs`), so code that reads and writes through the
`Path` methods (`/`, `read_bytes`, `write_text`, `exists`, `iterdir`, `open`) serves both. Chosen over
hand-written clients and over TensorStore's kvstores for files: epath + gcsfs is what orbax writes
checkpoints through, and gcsfs gives ranged reads (`read_range`) and listings; TensorStore stays the
store for token and logit arrays (its own gs:// driver).

`STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT` alone points every client at a local emulator: gcsfs reads
it itself; `configure` sets TensorStore's endpoint and test token from it and turns off gcsfs's bucket-type
probe (a gRPC call the emulator never answers, about 60 s per bucket).

Bytes read by ranged reads are counted (`bytes_read`): what a sharded load costs each host.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Union

from minitron_jax.core.errors import StorageError

SCHEMES = ("gs",)  # besides local paths
_lock = threading.Lock()
_read = 0  # bytes read by `read_range` in this process


def configure() -> None:
    """Every gcsfs client lists afresh (no listings cache: other hosts, and other clients in this process such
    as epath's own, write objects a cached listing would not show); and with `STORAGE_EMULATOR_HOST` set,
    TensorStore (and so orbax's array writes) and gcsfs go to the emulator. Idempotent; call before the first
    Cloud Storage client is made (`path` and `filesystem` do)."""
    import fsspec.config
    for proto in ("gs", "gcs"):
        fsspec.config.conf.setdefault(proto, {})["use_listings_cache"] = False
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if not host:
        return
    host = host if "://" in host else "http://" + host
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", host)
    os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def is_url(p) -> bool:
    return "://" in str(p)


def scheme(p) -> str:
    return str(p).split("://", 1)[0] if is_url(p) else ""


def key(p) -> str:
    """The object name gcsfs uses for a gs:// path: `bucket/prefix/name`."""
    return str(p).split("://", 1)[1]


def bucket(p) -> str:
    return key(p).split("/", 1)[0]


def path(p: Union[str, os.PathLike]) -> "Path":
    """A `pathlib.Path` for a local path, an `etils.epath.Path` for `gs://bucket/...`; any other scheme is
    refused with the ones that work."""
    if not is_url(p):
        return Path(p)
    s = str(p)
    if scheme(s) not in SCHEMES:
        raise StorageError(f"{s}: the scheme {scheme(s)}:// is not supported; give a local path or "
                           f"{' or '.join(f'{k}://bucket/path' for k in SCHEMES)} (mount other storage locally)")
    if len(bucket(s)) < 3:
        raise StorageError(f"{s}: '{bucket(s)}' is not a bucket name (3 to 63 characters); give gs://BUCKET/path")
    configure()
    from etils import epath
    return epath.Path(s)


def filesystem():
    """The gcsfs filesystem epath uses for gs:// (fsspec caches one instance per set of arguments)."""
    configure()
    import fsspec
    return fsspec.filesystem("gs")


def bytes_read() -> int:
    """Bytes this process has read through `read_range` so far."""
    return _read


def read_range(p, start: int, end: int) -> bytes:
    """Bytes [start, end) of the file `p` (local or gs://): a ranged GET on Cloud Storage, never the whole object."""
    global _read
    if end <= start:
        return b""
    if is_url(p):
        data = filesystem().cat_file(str(p), start=start, end=end)
    else:
        with open(p, "rb") as f:
            f.seek(start)
            data = f.read(end - start)
    with _lock:
        _read += len(data)
    return data


def read_ranges(p, spans: list[tuple[int, int]]) -> list[bytes]:
    """Several [start, end) spans of one file: concurrent ranged GETs on Cloud Storage."""
    global _read
    if not is_url(p):
        return [read_range(p, a, b) for a, b in spans]
    out = filesystem().cat_ranges([str(p)] * len(spans), [a for a, _ in spans], [b for _, b in spans])
    for d in out:
        if isinstance(d, BaseException):
            raise d
    with _lock:
        _read += sum(len(d) for d in out)
    return out


def size(p) -> int:
    """The size in bytes of the file `p`."""
    if is_url(p):
        return int(filesystem().info(str(p))["size"])
    return os.stat(p).st_size


def upload(local, url) -> None:
    """The local file `local` as the object `url`, in one upload (whole or absent)."""
    filesystem().put_file(str(local), key(url))


class Mirror:
    """A local folder copied to the gs:// prefix `url` by `sync` (the files changed since the last one): for files
    that grow by appends (metrics.jsonl, TensorBoard's event files), which objects cannot do. The files named in
    `fetch` are first copied down, so that a resumed run appends to them. `close` syncs and removes the folder."""

    def __init__(self, url, fetch=()):
        import atexit
        import shutil
        import tempfile
        self.url = str(url)
        self.local = Path(tempfile.mkdtemp(prefix="minitron-mirror-"))
        atexit.register(shutil.rmtree, self.local, ignore_errors=True)  # also when `close` is never reached
        self._sent: dict[str, tuple[int, int]] = {}
        self._last = time.monotonic()
        for name in fetch:
            with contextlib.suppress(FileNotFoundError):
                (self.local / name).write_bytes((path(self.url) / name).read_bytes())
                self._sent[name] = self._stamp(self.local / name)

    @staticmethod
    def _stamp(f: Path) -> tuple[int, int]:
        st = f.stat()
        return st.st_size, st.st_mtime_ns

    def sync(self, every_s: float = 0.0) -> None:
        if every_s and time.monotonic() - self._last < every_s:
            return
        self._last = time.monotonic()
        for f in sorted(self.local.rglob("*")):
            rel = f.relative_to(self.local).as_posix()
            if f.is_file() and self._sent.get(rel) != (stamp := self._stamp(f)):
                upload(f, f"{self.url}/{rel}")
                self._sent[rel] = stamp

    @classmethod
    def of_file(cls, url) -> tuple["Mirror", Path]:
        """A mirror of the folder of the one gs:// file `url` (its current content fetched), and the local file to
        append to."""
        parent, name = str(url).rsplit("/", 1)
        mirror = cls(parent, fetch=(name,))
        return mirror, mirror.local / name

    def close(self) -> None:
        import shutil
        try:
            self.sync()
        finally:
            shutil.rmtree(self.local, ignore_errors=True)


def absolute(p):
    """`p` as an absolute local `pathlib.Path`, or the `epath.Path` of a gs:// URL (which is absolute)."""
    return path(p) if is_url(p) else Path(p).absolute()


def source_name(p) -> str:
    """The name a model records for where it came from: a local path resolved (symlinks too), a gs:// URL as given."""
    return str(p) if is_url(p) else str(Path(p).resolve())


def files(p) -> list:
    """Every file under the directory `p`, recursively, sorted (gs://: one listing of the prefix; epath's rglob
    refuses gs://)."""
    if is_url(p):
        return sorted(path(f"gs://{k}") for k in filesystem().find(key(p).rstrip("/") + "/"))
    return sorted(f for f in Path(p).rglob("*") if f.is_file())


def move(src, dst) -> None:
    """Rename the file or directory `src` to `dst` (gs://: copies of every object, then deletes)."""
    if is_url(src):
        filesystem().mv(key(src), key(dst), recursive=True)
    else:
        os.replace(src, dst)


def check_access(p, what: str = "path") -> None:
    """Refuse, in one line naming `p` and the fix and before any weights load, a gs:// path whose bucket
    cannot be used: no credentials, a bucket that does not exist, permission denied. Local paths pass."""
    if not is_url(p):
        return
    path(p)  # the scheme and bucket name
    s, b = str(p), bucket(p)
    if not os.environ.get("STORAGE_EMULATOR_HOST"):
        import google.auth
        from google.auth.exceptions import DefaultCredentialsError
        try:
            google.auth.default()
        except DefaultCredentialsError as e:
            raise StorageError(f"{what}={s}: no Google Cloud credentials ({str(e).splitlines()[0]}); on a TPU VM "
                               "the VM's service account is used, elsewhere run `gcloud auth application-default "
                               "login` or set GOOGLE_APPLICATION_CREDENTIALS to a key file") from e
    try:
        filesystem().ls(f"{b}/", detail=False)
    except FileNotFoundError as e:
        raise StorageError(f"{what}={s}: the bucket gs://{b} does not exist; create it (`gcloud storage "
                           f"buckets create gs://{b}`) or fix the name") from e
    except Exception as e:  # gcsfs: OSError("Forbidden: ...") for 403, HttpError for 401, others for the network
        said = " ".join(str(e).split())
        if isinstance(e, PermissionError) or any(k in said for k in ("Forbidden", "403", "401", "Unauthorized")):
            raise StorageError(f"{what}={s}: permission denied on gs://{b} ({said}); grant this host's account "
                               "roles/storage.objectUser on the bucket") from e
        raise StorageError(f"{what}={s}: cannot reach gs://{b} ({type(e).__name__}: {said})") from e


def download(url, what: str = "directory") -> Path:
    """A local temporary copy of every object under the gs:// prefix `url` (for readers of whole local folders:
    `transformers.from_pretrained`); removed at exit. A local `url` is returned as it is."""
    if not is_url(url):
        return Path(url)
    import atexit
    import shutil
    import tempfile
    check_access(url, what)
    d = Path(tempfile.mkdtemp(prefix="minitron-gs-"))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    filesystem().get(key(url).rstrip("/") + "/", str(d) + "/", recursive=True)
    if not any(d.iterdir()):
        raise StorageError(f"{what} {url} holds no files; give the prefix that holds them")
    return d


def local_copy(url, names, what: str = "directory") -> Path:
    """A local temporary copy of the small files `names` (those that exist) of the gs:// directory `url`, for
    readers that take local paths only (a tokenizer: `transformers` and `tokenizers` read files); removed at
    exit. A local `url` is returned as it is."""
    if not is_url(url):
        return Path(url)
    import atexit
    import shutil
    import tempfile
    src = path(url)
    check_access(url, what)
    d = Path(tempfile.mkdtemp(prefix="minitron-gs-"))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    got = 0
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            (d / name).write_bytes((src / name).read_bytes())
            got += 1
    if not got:
        raise StorageError(f"{what} {url} holds none of {', '.join(names)}; give the directory that holds them")
    return d
