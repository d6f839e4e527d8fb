"""Test session setup: 8 fake CPU devices (for mesh tests) before JAX is imported anywhere; and the fixtures
shared by test modules: checkpoints to corrupt (model/test_config.py, io/test_hf.py, io/test_safetensors.py),
two tiny models of one shape, the distillation pair, and token stores cut from Shakespeare.

Tests live in tests/<room>/test_<module>.py (no __init__.py: every test file name is unique), end-to-end runs in
tests/e2e/; this file puts tests/ on sys.path, so `helpers` and `distill_helpers` import from every folder."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


# ---------------------------------------------------------------------------- checkpoints to corrupt
# A tiny random `transformers.LlamaForCausalLM` (shape helpers.TINY) saved as safetensors; each test gets
# a private copy to corrupt. Load-side tests run under `no_weight_reads`, which makes any read of tensor
# bytes fail the test, so each error is proven to come *before* weights are read (not from a crash
# half-way through a load).
def _save_tiny(out: Path, tie: bool) -> Path:
    import torch
    import transformers
    from helpers import TINY

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, tie_word_embeddings=tie))
    model.save_pretrained(out)  # safetensors is the default
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    return out


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_llama")
    return {"untied": _save_tiny(root / "untied", tie=False), "tied": _save_tiny(root / "tied", tie=True)}


@pytest.fixture
def ckpt(tiny_dirs, tmp_path) -> Path:
    """A private, writable copy of the untied tiny checkpoint."""
    return Path(shutil.copytree(tiny_dirs["untied"], tmp_path / "ckpt"))


@pytest.fixture
def no_weight_reads(monkeypatch):
    """Any attempt to read tensor bytes (or build a device array from them) fails the test."""
    from minitron_jax.io.safetensors import SafetensorsFile

    def boom(*args, **kwargs):
        raise AssertionError("weights were read before the problem was reported")
    monkeypatch.setattr(SafetensorsFile, "tensor", boom)
    monkeypatch.setattr(jax, "make_array_from_callback", boom)


# ---------------------------------------------------------------------------- two tiny models of one shape
@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """A random tiny Llama (vocab 128) and another of the same shape (another seed)."""
    from helpers import save_tiny

    root = tmp_path_factory.mktemp("tiny")
    save_tiny(root / "a", seed=0, num_hidden_layers=2)
    save_tiny(root / "b", seed=1, num_hidden_layers=2)
    return root / "a", root / "b"


# ---------------------------------------------------------------------------- the distillation pair
@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """distill_helpers.make_pair with a sharpened teacher: (teacher, student, data)."""
    from distill_helpers import make_pair

    return make_pair(tmp_path_factory.mktemp("pair"), sharpen=8.0)


# ---------------------------------------------------------------------------- token stores
# (data/test_store_reader.py, eval/test_evaluate.py, train/test_trainer.py; data/test_loader.py and
# data/test_token_store.py define their own `tokenizer` / `corpus`)
LENGTHS = [40, 3000, 150, 900, 260, 5000, 75, 1200, 333, 2200, 90, 640, 410, 1800, 120, 700] * 3


@pytest.fixture(scope="module")
def tok_dir():
    """The SmolLM2 directory: its tokenizer tokenizes the stores."""
    from minitron_jax.core.assets import fetch_smollm2
    return fetch_smollm2()


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tok_dir)


def _write_docs(d: Path, source: str, at: int) -> Path:
    """48 documents cut from a play of the Shakespeare asset, starting at character `at`."""
    from minitron_jax.core.assets import fetch_shakespeare
    text = (fetch_shakespeare() / source).read_text(errors="replace")[at:]
    d.mkdir(parents=True)
    for i, n in enumerate(LENGTHS):  # from much shorter to much longer than 64 tokens
        (d / f"doc{i:02d}.txt").write_text(text[:n])
        text = text[n:]
    return d


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """48 documents cut from Hamlet (tokenized into `store`)."""
    return _write_docs(tmp_path_factory.mktemp("a") / "docs", "hamlet_gut.txt", 20000)


@pytest.fixture(scope="module")
def store(corpus, tok_dir, tmp_path_factory):
    from helpers import tokenize_store

    return tokenize_store(corpus, tok_dir, tmp_path_factory.mktemp("sa") / "store")


@pytest.fixture(scope="module")
def store_b(tok_dir, tmp_path_factory):
    """48 documents cut from Macbeth, tokenized (the second store of a blend)."""
    from helpers import tokenize_store

    src = _write_docs(tmp_path_factory.mktemp("b") / "docs", "macbeth_gut.txt", 5000)
    return tokenize_store(src, tok_dir, tmp_path_factory.mktemp("sb") / "store")


# ---------------------------------------------------------------------------- Cloud Storage, locally
@pytest.fixture(scope="session")
def gcs():
    """`gcp-storage-emulator` (the Cloud Storage JSON API, in memory) on 127.0.0.1 for the whole session, with
    STORAGE_EMULATOR_HOST pointing every client at it (one port per session: gcsfs keeps one client per
    process). Yields the URL of a bucket that exists; give each test its own prefix (`gs_dir`)."""
    import socket

    from gcs_emulator import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = serve(port)  # answering as Cloud Storage does where the emulator does not (tests/gcs_emulator.py)
    before = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    try:
        yield "gs://minitron-test"
    finally:
        server.stop()
        if before is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = before


@pytest.fixture
def gs_dir(gcs, request):
    """A prefix of the emulator's bucket that no other test uses. Afterwards, nothing of it may have landed on local
    disk: `pathlib.Path(url)` makes gs:/... relative to the working directory, and `pathlib.Path(epath.Path(url))`
    makes /gs/... (epath's mount point): code that wraps a gs:// path in pathlib writes there, silently."""
    import uuid

    url = f"{gcs}/{request.node.name.replace('[', '-').replace(']', '')[:60]}-{uuid.uuid4().hex[:8]}"
    yield url
    key = url.split("://", 1)[1]
    leaked = [p for p in (Path("/gs") / key, Path("gs:") / key, Path(__file__).parents[1] / "gs:" / key) if p.exists()]
    assert not leaked, f"written to local disk instead of {url}: {leaked}"
