"""core.storage against a Cloud Storage emulator on 127.0.0.1 (`gcs` in conftest.py): one path API for local
paths and gs://, ranged reads that read (and count) only their bytes, and a clear one-line refusal, naming the
path and the fix, for each way a bucket cannot be used."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from minitron_jax.core import storage
from minitron_jax.core.errors import StorageError


def test_local_paths_and_gs_urls_read_and_write_through_one_api(gs_dir, tmp_path):
    for root in (tmp_path / "local", gs_dir):
        d = storage.path(root)
        (d / "sub").mkdir(parents=True, exist_ok=True)
        (d / "sub" / "a.json").write_text(json.dumps({"x": 1}))
        (d / "b.bin").write_bytes(b"\x00\x01\x02")
        assert json.loads((d / "sub" / "a.json").read_text()) == {"x": 1}
        assert (d / "b.bin").read_bytes() == b"\x00\x01\x02" and storage.size(d / "b.bin") == 3
        assert sorted(p.name for p in d.iterdir()) == ["b.bin", "sub"]
        assert (d / "sub").is_dir() and not (d / "missing").exists()
    assert str(storage.path(gs_dir)) == gs_dir  # a URL stays a URL (pathlib would make it gs:/...)


def test_a_file_on_gs_is_written_whole_or_not_at_all(gs_dir):
    from minitron_jax.core.atomic import atomic_file, write_text
    target = f"{gs_dir}/summary.json"
    assert write_text(target, '{"a": 1}') == storage.path(target)
    assert json.loads(storage.path(target).read_text()) == {"a": 1}
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:  # a writer that fails half-way
        tmp.write_text('{"a": 2, "b"')
        raise RuntimeError("disk full")
    assert json.loads(storage.path(target).read_text()) == {"a": 1}  # the old object, untouched
    assert [p.name for p in storage.path(gs_dir).iterdir()] == ["summary.json"]  # no temporary left


def test_ranged_reads_read_and_count_only_their_bytes(gs_dir):
    data = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    f = storage.path(gs_dir) / "blob.bin"
    f.write_bytes(data)
    before = storage.bytes_read()
    assert storage.read_range(f, 1000, 3000) == data[1000:3000]
    spans = [(0, 10), (500_000, 500_100), (len(data) - 7, len(data))]
    assert storage.read_ranges(f, spans) == [data[a:b] for a, b in spans]
    assert storage.bytes_read() - before == 2000 + 10 + 100 + 7


@pytest.mark.parametrize("url, says", [
    ("s3://bucket/model", "the scheme s3:// is not supported; give a local path or gs://bucket/path"),
    ("hf://meta-llama/Llama-3.1-8B", "the scheme hf:// is not supported"),
    ("gs://ab/model", "'ab' is not a bucket name"),
])
def test_unsupported_urls_are_refused_with_what_works(url, says):
    with pytest.raises(StorageError, match="^" + url.replace(".", r"\.") + ": ") as e:
        storage.path(url)
    assert says in str(e.value)


def test_a_bucket_that_does_not_exist_is_named_with_the_fix(gcs):
    with pytest.raises(StorageError) as e:
        storage.check_access("gs://no-such-bucket/runs/a", "out")
    assert str(e.value).startswith("out=gs://no-such-bucket/runs/a: the bucket gs://no-such-bucket does not exist; "
                                   "create it (`gcloud storage buckets create gs://no-such-bucket`)")
    storage.check_access(f"{gcs}/runs/a", "out")  # the emulator's bucket: passes


def test_missing_credentials_are_named_before_any_request(monkeypatch, tmp_path):
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing-key.json"))
    with pytest.raises(StorageError) as e:
        storage.check_access("gs://some-bucket/model", "teacher")
    assert str(e.value).startswith("teacher=gs://some-bucket/model: no Google Cloud credentials (")
    assert "gcloud auth application-default login" in str(e.value) and "\n" not in str(e.value)


class Forbidden(BaseHTTPRequestHandler):
    """Cloud Storage's answer to an account without access: 403 with its JSON error body."""

    def do_GET(self):
        body = json.dumps({"error": {"code": 403, "message": "runner@p.iam.gserviceaccount.com does not have "
                                     "storage.objects.list access to the Google Cloud Storage bucket."}}).encode()
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_permission_denied_is_named_with_the_fix(monkeypatch):
    import gcsfs
    server = ThreadingHTTPServer(("127.0.0.1", 0), Forbidden)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{server.server_address[1]}")
    gcsfs.GCSFileSystem.clear_instance_cache()  # a client made for this endpoint
    try:
        with pytest.raises(StorageError) as e:
            storage.check_access("gs://private-bucket/data", "data")
    finally:
        server.shutdown()
        gcsfs.GCSFileSystem.clear_instance_cache()  # the next test's client goes to the emulator again
    assert str(e.value).startswith("data=gs://private-bucket/data: permission denied on gs://private-bucket (")
    assert "roles/storage.objectUser" in str(e.value)
