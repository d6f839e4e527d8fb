"""minitron-jax: Minitron structured pruning and knowledge distillation for Llama-3.1 in JAX."""

from .config import ConfigError, LlamaConfig
from .hf import CheckpointError, from_pretrained, save_pretrained
from .model import Llama, forward
from .sharding import make_mesh

__all__ = ["ConfigError", "CheckpointError", "LlamaConfig", "Llama", "forward", "from_pretrained",
           "save_pretrained", "make_mesh"]
