"""Generation with the one model function: a jitted prefill of left-padded prompts into a KV cache
(`model.kv_cache`), then one jitted decode step per token, until every row has stopped or the length limit.

Each row stops at its first stop token (finish reason "stop"; the token is part of the response) or after
`max_new_tokens` ("length"). A row's samples come from its own key, `fold_in(fold_in(PRNGKey(seed), row id),
step)`, so they depend neither on the batch the row is in nor on a resumed run. Rows are split over the mesh's
batch axes (data x fsdp) and the cache with them; the last batch is filled up with copies of its last row.

The jitted steps are the `Generator`'s `prefill` and `decode`; `minitron plan --compile` compiles `decode`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from minitron_jax.eval.sampling import Sampling, next_token
from minitron_jax.model.config import LlamaConfig
from minitron_jax.model.kv_cache import KVCache, abstract_cache, init_cache
from minitron_jax.model.llama import forward, linear, lm_head_weight
from minitron_jax.model.sharding import named_sharding, put, to_host

PROMPT_BUCKET = 64  # prompt lengths are padded up to a multiple of this (one compile per bucket)


class Generated(NamedTuple):
    tokens: list[int]  # the response, its stop token included
    finish_reason: str  # "stop" | "length"


def row_keys(seed: int, row_ids: Sequence[int]) -> np.ndarray:
    """One PRNG key per row [B, 2] (uint32), from the seed and the row's id (its line in the prompt file)."""
    base = jax.random.PRNGKey(seed)
    return np.asarray(jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(row_ids, jnp.uint32)))


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) [B, length] int32, each prompt at the right end of its row."""
    ids = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for r, p in enumerate(prompts):
        if len(p):
            ids[r, -len(p):], mask[r, -len(p):] = p, 1
    return ids, mask


class Generator:
    """Greedy or sampled generation of `cfg`'s model with fixed settings; `__call__` runs one batch."""

    def __init__(self, cfg: LlamaConfig, sampling: Sampling = Sampling(), *, max_new_tokens: int = 128,
                 stop_ids: Sequence[int] = (), batch_size: int = 8, mesh=None, attention: str = "xla",
                 compute_dtype=None, pad_id: int = 0, bucket: int = PROMPT_BUCKET, max_len: int | None = None):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}: generate at least one token")
        self.cfg, self.sampling, self.max_new = cfg, sampling, int(max_new_tokens)
        self.stop_ids = tuple(sorted({int(i) for i in stop_ids}))
        self.batch_size, self.mesh, self.attention = int(batch_size), mesh, attention
        self.compute_dtype, self.pad_id, self.bucket, self.max_len = compute_dtype, int(pad_id), int(bucket), max_len
        self.prefill = jax.jit(self._prefill)
        self.decode = jax.jit(self._decode, donate_argnums=(1, 2))

    # ------------------------------------------------------------------ the jitted steps
    def _advance(self, state: dict[str, Any], logits: jax.Array) -> dict[str, Any]:
        """Choose each row's next token from its logits [B, V] and record it at step t."""
        t, done = state["t"], state["done"]
        keys = jax.vmap(jax.random.fold_in, (0, None))(state["keys"], t)
        tok = jnp.where(done, self.pad_id, next_token(logits, keys, self.sampling))
        hit = jnp.isin(tok, jnp.asarray(self.stop_ids, jnp.int32)) & ~done if self.stop_ids else jnp.zeros_like(done)
        return {"token": tok, "out": jax.lax.dynamic_update_slice(state["out"], tok[:, None], (0, t)),
                "done": done | hit | (t + 1 >= self.max_new), "stopped": state["stopped"] | hit,
                "keys": state["keys"], "t": t + 1}

    def _prefill(self, params, ids, mask, keys) -> tuple[KVCache, dict[str, Any]]:
        b, s = ids.shape
        cdt = jnp.dtype(self.compute_dtype or params["embed_tokens"].dtype)
        cache = init_cache(self.cfg, b, s + self.max_new, cdt)
        h, cache = forward(params, self.cfg, ids, attention_mask=mask, cache=cache, compute_dtype=self.compute_dtype,
                           attention=self.attention, return_hidden=True)
        logits = linear(h[:, -1], lm_head_weight(params, self.cfg))  # left padding: every row's last token
        state = {"out": jnp.full((b, self.max_new), self.pad_id, jnp.int32), "done": jnp.zeros((b,), bool),
                 "stopped": jnp.zeros((b,), bool), "keys": keys, "t": jnp.zeros((), jnp.int32)}
        return cache, self._advance(state, logits.astype(jnp.float32))

    def _decode(self, params, cache: KVCache, state: dict[str, Any]) -> tuple[KVCache, dict[str, Any]]:
        logits, cache = forward(params, self.cfg, state["token"][:, None], cache=cache,
                                compute_dtype=self.compute_dtype)
        return cache, self._advance(state, logits[:, 0].astype(jnp.float32))

    def abstract_decode_args(self, params, batch: int, max_len: int, dtype) -> tuple:
        """Abstract (cache, state) of a decode step on `self.mesh` with a cache of `max_len` slots (plan --compile)."""
        def sds(shape, dt, axes):
            return jax.ShapeDtypeStruct(shape, dt, sharding=named_sharding(axes, shape, self.mesh))
        state = {"token": sds((batch,), jnp.int32, ("batch",)), "out": sds((batch, self.max_new), jnp.int32,
                                                                            ("batch", "seq")),
                 "done": sds((batch,), jnp.bool_, ("batch",)), "stopped": sds((batch,), jnp.bool_, ("batch",)),
                 "keys": sds((batch, 2), jnp.uint32, ("batch", None)), "t": sds((), jnp.int32, ())}
        return abstract_cache(self.cfg, batch, max_len, dtype, self.mesh), state

    # ------------------------------------------------------------------ one batch
    def prompt_length(self, longest: int) -> int:
        """The padded prompt length of a batch whose longest prompt has `longest` tokens."""
        n = -(-longest // self.bucket) * self.bucket
        if self.max_len is not None:
            n = min(n, max(self.max_len - self.max_new, longest))
        return n

    def __call__(self, params, prompts: Sequence[Sequence[int]], row_ids: Sequence[int], seed: int = 0,
                 done_when: Callable[[np.ndarray], bool] | None = None, check_every: int = 4
                 ) -> tuple[list[Generated], int]:
        """Responses to up to `batch_size` prompts (token ids), and the decode steps run.

        `done_when(tokens)`, called every `check_every` decode steps with the tokens so far [prompts, steps + 1],
        may end the batch early (True): rows still running then finish with reason "length" and the tokens they
        have (lm-eval's stop strings, `eval/lm_eval_model.py`)."""
        n = len(prompts)
        if not 0 < n <= self.batch_size:
            raise ValueError(f"a batch holds 1 to {self.batch_size} prompts, got {n}")
        if min(len(p) for p in prompts) == 0:
            raise ValueError("a prompt has no tokens")
        fill = self.batch_size - n
        prompts, row_ids = list(prompts) + [prompts[-1]] * fill, list(row_ids) + [row_ids[-1]] * fill
        ids, mask = left_pad(prompts, self.prompt_length(max(len(p) for p in prompts)), self.pad_id)
        ctx = jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()
        with ctx:
            cache, state = self.prefill(params, put(ids, self.mesh), put(mask, self.mesh),
                                        put(row_keys(seed, row_ids), self.mesh))
            steps = 0
            while not bool(state["done"].all()):
                if done_when is not None and steps % check_every == 0 and done_when(
                        to_host(state["out"])[:n, :steps + 1]):
                    break
                cache, state = self.decode(params, cache, state)
                steps += 1
            out, stopped = to_host(state["out"]), to_host(state["stopped"])  # rows other processes hold: gathered
        results = []
        for r in range(n):
            row = out[r, :steps + 1].tolist()
            if stopped[r]:
                end = next(i for i, tok in enumerate(row) if tok in self.stop_ids) + 1
                results.append(Generated(row[:end], "stop"))
            else:
                results.append(Generated(row, "length"))
        return results, steps
