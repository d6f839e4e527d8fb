"""minitron-jax: Minitron structured pruning and knowledge distillation for Llama-3.1 in JAX.

The names below are imported on first use (PEP 562), so that processes which need none of them (the
tokenize workers, `minitron --help`) do not import jax, flax and transformers."""

import importlib

_EXPORTS = {"ConfigError": "config", "LlamaConfig": "config", "CheckpointError": "hf", "from_pretrained": "hf",
            "save_pretrained": "hf", "Llama": "model", "forward": "model", "make_mesh": "sharding"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'minitron_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
