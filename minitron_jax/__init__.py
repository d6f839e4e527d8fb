"""minitron-jax: Minitron structured pruning and knowledge distillation for Llama-3.1 in JAX.

The names below are imported on first use (PEP 562), so that processes which need none of them (the
tokenize workers, `minitron --help`) do not import jax, flax and transformers."""

import importlib

_EXPORTS = {"MinitronError": "core.errors", "ConfigError": "core.errors", "CheckpointError": "core.errors",
            "LlamaConfig": "model.config", "from_pretrained": "io.hf", "save_pretrained": "io.hf",
            "Llama": "model.llama", "forward": "model.llama", "make_mesh": "model.sharding"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'minitron_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
