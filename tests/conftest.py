"""Test session setup: 8 fake CPU devices (for mesh tests) before JAX is imported anywhere; and the
checkpoint fixtures shared by test_config.py, test_hf.py and test_safetensors_io.py."""

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
