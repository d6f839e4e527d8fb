"""gcp-storage-emulator, made to answer as Cloud Storage does where the project's clients rely on it. The
emulator (2026.7.19) ignores suffix byte ranges (`Range: bytes=-N`: TensorStore reads a zarr shard's index this
way), sends no `x-goog-generation` on downloads (TensorStore's conditional writes need the generation it read),
ignores a listing's `startOffset`/`endOffset` (TensorStore lists a store by key range) and every
`ifGenerationMatch` precondition (the run lock creates its object only if absent). `make_faithful()` wraps its
handlers to do all four as the Cloud Storage JSON API documents them; `serve(port)` starts it in memory.

    python tests/gcs_emulator.py PORT     # serve until killed (for tests that run commands as processes)
"""

import json
import re
import sys
from http import HTTPStatus


def _query(request, name):
    v = request.query.get(name)
    return v[0] if v else None


def _generation(storage, bucket, name):
    try:
        return str(storage.get_file_obj(bucket, name)["generation"])
    except Exception:  # no such object
        return None


def _refused(response, bucket, name):
    response.status = HTTPStatus.PRECONDITION_FAILED
    response.json({"error": {"code": 412, "message": f"At least one of the pre-conditions you specified did not "
                                                     f"hold. ({bucket}/{name})"}})


def make_faithful() -> None:
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects
    if getattr(server, "_minitron_faithful", False):
        return
    download0, ls0, insert0, delete0 = objects.download, objects.ls, objects.insert, objects.delete

    def download(request, response, storage, *args, **kwargs):
        bucket, name = request.params["bucket_name"], request.params["object_id"]
        m = re.fullmatch(r"\s*bytes=-(\d+)\s*", request.get_header("range", None) or "")
        if m:
            try:
                size = len(storage.get_file(bucket, name))
            except Exception:
                size = None
            if size is not None:
                start, get = max(0, size - int(m[1])), request.get_header
                request.get_header = lambda key, default=None: (f"bytes={start}-" if key.lower() == "range"
                                                               else get(key, default))
        download0(request, response, storage, *args, **kwargs)
        if (g := _generation(storage, bucket, name)) is not None:
            response["x-goog-generation"] = g
            response["x-goog-metageneration"] = "1"

    def ls(request, response, storage, *args, **kwargs):
        lo, hi = _query(request, "startOffset"), _query(request, "endOffset")
        if lo or hi:
            real = response.json

            def within(d):
                d = dict(d)
                d["items"] = [f for f in d.get("items") or [] if (not lo or f["name"] >= lo) and (not hi or f["name"] < hi)]
                real(d)
            response.json = within
        ls0(request, response, storage, *args, **kwargs)

    def insert(request, response, storage, *args, **kwargs):
        want = _query(request, "ifGenerationMatch")
        if want is not None:
            bucket = request.params["bucket_name"]
            name = _query(request, "name")
            if name is None and _query(request, "uploadType") == "multipart":
                name = request.data["meta"].get("name")
            if name is None and _query(request, "uploadType") == "resumable" and request.data:
                name = (request.data if isinstance(request.data, dict) else json.loads(request.data)).get("name")
            have = _generation(storage, bucket, name) if name else None
            if (want == "0" and have is not None) or (want != "0" and have != want):
                return _refused(response, bucket, name)
        insert0(request, response, storage, *args, **kwargs)

    def delete(request, response, storage, *args, **kwargs):
        want = _query(request, "ifGenerationMatch")
        bucket, name = request.params["bucket_name"], request.params["object_id"]
        if want is not None and _generation(storage, bucket, name) not in (None, want):
            return _refused(response, bucket, name)
        delete0(request, response, storage, *args, **kwargs)

    swap = {download0: download, ls0: ls, insert0: insert, delete0: delete}
    objects.download, objects.ls, objects.insert, objects.delete = download, ls, insert, delete
    server.HANDLERS = tuple((rx, {k: swap.get(f, f) for k, f in h.items()}) for rx, h in server.HANDLERS)
    server._minitron_faithful = True


def serve(port: int, bucket: str = "minitron-test"):
    from gcp_storage_emulator.server import create_server
    make_faithful()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.start()
    httpd = server._api._httpd  # a client that hangs up before the answer is sent (gcsfs does) is not an error:
    report = httpd.handle_error  # Cloud Storage does not print a traceback for it either

    def handle_error(request, client_address):
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            report(request, client_address)
    httpd.handle_error = handle_error
    return server


if __name__ == "__main__":
    import time
    serve(int(sys.argv[1]))
    while True:
        time.sleep(3600)
