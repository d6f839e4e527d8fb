"""Choosing the next token from logits: greedy, or a seeded sample after temperature, top-k and top-p, in
that order and with transformers' rules (its TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper):
- temperature T: logits / T; T = 0 means greedy (argmax);
- top-k: keep the logits >= the k-th largest (ties at the k-th are kept); 0 keeps all;
- top-p: keep the smallest set of the most probable tokens whose probability reaches p (a token is kept when
  the tokens more probable than it sum to less than p; the most probable is always kept); 1 keeps all.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from minitron_jax.core.errors import DataError


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off

    def __post_init__(self):
        if not self.temperature >= 0:
            raise DataError(f"--temperature {self.temperature}: give 0 (greedy) or a positive number")
        if self.top_k < 0:
            raise DataError(f"--top-k {self.top_k}: give 0 (off) or a positive number of tokens")
        if not 0 < self.top_p <= 1:
            raise DataError(f"--top-p {self.top_p}: give a probability in (0, 1] (1 is off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits: jax.Array, s: Sampling) -> jax.Array:
    """fp32 logits [..., V] scaled by the temperature, -inf where top-k / top-p drop a token."""
    x = logits.astype(jnp.float32) / (s.temperature or 1.0)
    if s.top_k and s.top_k < x.shape[-1]:
        kth = jax.lax.top_k(x, s.top_k)[0][..., -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    if s.top_p < 1.0:
        desc = jnp.sort(x, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens more probable than each
        keep = before < s.top_p
        threshold = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where(x < threshold, -jnp.inf, x)
    return x


def next_token(logits: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
    """Token ids [B] from logits [B, V] with one PRNG key per row [B, 2] (a row's sample does not depend on
    the other rows of its batch)."""
    if s.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    x = filter_logits(logits, s)
    return jax.vmap(jax.random.categorical)(key, x).astype(jnp.int32)
