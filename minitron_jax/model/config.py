"""Llama-3.1 configuration <-> Hugging Face `config.json`.

Reads both transformers 4.x (`rope_theta` + `rope_scaling`) and 5.x (`rope_parameters`) RoPE keys,
always carries `head_dim` explicitly (a width-pruned model has hidden != heads * head_dim) and
validates everything before any weights are touched.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from minitron_jax.core.errors import ConfigError

ROPE_TYPES = ("default", "llama3")
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
DTYPES = ("float32", "bfloat16", "float16")




_KINDS = {"int": "integer", "number": "finite number", "bool": "boolean (true or false)", "str": "string",
          "object": "JSON object"}


def _typed(d, key, kind: str, default=None, *, positive: bool = False, nonneg: bool = False, where: str = ""):
    """`d[key]` (null or absent: `default`) if it is of JSON type `kind` (a bool is no number), positive or
    non-negative if asked; else ConfigError naming the key and the value."""
    v = d.get(key) if isinstance(d, dict) else d[key]
    if v is None:
        return default
    ok = {"int": isinstance(v, int) and not isinstance(v, bool),
          "number": isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
          "bool": isinstance(v, bool), "str": isinstance(v, str), "object": isinstance(v, dict)}[kind]
    if not ok or (positive and v <= 0) or (nonneg and v < 0):
        name = f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}" if where else key
        want = ("positive " if positive else "non-negative " if nonneg else "") + _KINDS[kind]
        raise ConfigError(f"config.json field {name}={v!r} must be {'an' if want[0] in 'aeiou' else 'a'} {want}")
    return v


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_type: str = "default"
    # llama3 only: factor, low_freq_factor, high_freq_factor, original_max_position_embeddings
    rope_scaling: tuple[tuple[str, float], ...] = ()
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    dtype: str = "float32"  # the dtype the checkpoint stores

    def __post_init__(self):
        self.validate()

    # ----------------------------------------------------------------- validation
    def validate(self) -> None:
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim")
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"config field {name}={v!r} must be a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}: grouped-query attention needs "
                f"every KV group to serve the same number of query heads; valid num_key_value_heads: "
                f"{[d for d in range(1, self.num_attention_heads + 1) if self.num_attention_heads % d == 0]}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(
                f"unknown RoPE type {self.rope_type!r}: supported types are {ROPE_TYPES}. "
                "Llama-3.1 uses 'llama3'; SmolLM2 / Llama-2 use 'default'.")
        if self.rope_type == "llama3":
            missing = [k for k in LLAMA3_KEYS if k not in self.rope_scaling_dict]
            if missing:
                raise ConfigError(f"llama3 RoPE scaling is missing {missing}; it needs all of {LLAMA3_KEYS}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} is not supported; use one of {DTYPES}")

    @property
    def rope_scaling_dict(self) -> dict[str, float]:
        return dict(self.rope_scaling)

    @property
    def num_kv_groups(self) -> int:
        """Query heads per KV head."""
        return self.num_attention_heads // self.num_key_value_heads

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------- counting
    def param_count(self) -> int:
        """Exact number of parameters, as transformers counts them (tied embeddings once)."""
        h, f, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (self.num_attention_heads * 2 + self.num_key_value_heads * 2)
        per_layer = attn + 3 * h * f + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + emb + h

    def flops_per_token(self, seq_len: int) -> float:
        """Matmul FLOPs of one forward pass per token at sequence length `seq_len`: 2 x the matmul
        weights (every projection and the lm_head; not the input embedding lookup, not the norms) plus
        causal attention (QK^T and AV over on average half the sequence: 2 x L x S x heads x head_dim)."""
        h = self.hidden_size
        matmul_params = self.param_count() - self.vocab_size * h * (0 if self.tie_word_embeddings else 1)
        matmul_params -= h * (2 * self.num_hidden_layers + 1)  # norms
        attn = 2 * self.num_hidden_layers * seq_len * self.num_attention_heads * self.head_dim
        return 2.0 * matmul_params + attn

    # ----------------------------------------------------------------- HF I/O
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        """Every field read is type-checked (ints are ints, not bools or floats; numbers finite; sizes positive)."""
        archs = d.get("architectures") or []
        model_type = d.get("model_type")
        if not isinstance(archs, list):
            raise ConfigError(f"config.json field architectures={archs!r} must be a list such as [\"LlamaForCausalLM\"]")
        if model_type != "llama" or any(a != "LlamaForCausalLM" for a in archs):
            raise ConfigError(
                f"not a Llama checkpoint (model_type={model_type!r}, architectures={archs}): "
                "minitron_jax supports LlamaForCausalLM (Llama-2/3/3.1/3.2, SmolLM2, Minitron-Llama)")
        for flag in ("attention_bias", "mlp_bias"):
            if _typed(d, flag, "bool"):
                raise ConfigError(
                    f"{flag}=true is not supported: Llama-3.1 has no projection biases. Convert a "
                    "bias-free checkpoint or fold the biases away first.")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act={d['hidden_act']!r} is not supported; Llama uses 'silu'")
        if d.get("pretraining_tp", 1) not in (1, None):
            raise ConfigError("pretraining_tp != 1 is not supported (transformers ignores it only at 1)")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if d.get(key) is None:
                raise ConfigError(f"config.json lacks required field {key!r}" + (" (it is null)" if key in d else ""))
        ints = {k: _typed(d, k, "int", positive=True) for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings")}

        rope, scaling = _typed(d, "rope_parameters", "object"), _typed(d, "rope_scaling", "object")
        if isinstance(rope, dict) and "rope_type" not in rope and rope and all(isinstance(v, dict) for v in rope.values()):
            raise ConfigError("per-layer-type rope_parameters are not supported for Llama")
        # As transformers 5.x does: a non-null 4.x `rope_scaling` replaces `rope_parameters`; theta comes from
        # the chosen dict, else the top-level 4.x `rope_theta`, else the default.
        params = dict(scaling or rope or {})
        where = "rope_scaling" if scaling else "rope_parameters"
        top_theta = _typed(d, "rope_theta", "number", 10000.0, positive=True)
        theta = _typed(params, "rope_theta", "number", positive=True, where=where) or top_theta
        rope_type = params.get("rope_type", params.get("type", "default"))
        if not isinstance(rope_type, str):
            raise ConfigError(f"config.json {where}.rope_type={rope_type!r} must be a string such as 'llama3'")
        extra = ()
        if rope_type == "llama3":
            for k in LLAMA3_KEYS:
                _typed(params, k, "int" if k == "original_max_position_embeddings" else "number", positive=True,
                       where=where)
            extra = tuple(sorted((k, float(params[k])) for k in LLAMA3_KEYS if params.get(k) is not None))

        heads = ints["num_attention_heads"]
        head_dim = ints["head_dim"] or ints["hidden_size"] // heads
        dtype = _typed(d, "dtype", "str") or _typed(d, "torch_dtype", "str") or "float32"
        eos = d.get("eos_token_id")
        if isinstance(eos, list):
            for i in range(len(eos)):
                _typed(eos, i, "int", where="eos_token_id", nonneg=True)
        else:
            _typed(d, "eos_token_id", "int", nonneg=True)
        return cls(
            vocab_size=ints["vocab_size"], hidden_size=ints["hidden_size"],
            intermediate_size=ints["intermediate_size"], num_hidden_layers=ints["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=ints["num_key_value_heads"] or heads,
            head_dim=head_dim, rms_norm_eps=float(_typed(d, "rms_norm_eps", "number", 1e-6, positive=True)),
            rope_theta=float(theta), rope_type=rope_type, rope_scaling=extra,
            max_position_embeddings=ints["max_position_embeddings"] or 2048,
            # transformers' LlamaConfig default is untied
            tie_word_embeddings=_typed(d, "tie_word_embeddings", "bool", False),
            bos_token_id=_typed(d, "bos_token_id", "int", nonneg=True), eos_token_id=eos,
            pad_token_id=_typed(d, "pad_token_id", "int", nonneg=True), dtype=dtype.replace("torch.", ""))

    @classmethod
    def from_file(cls, path: str | Path) -> "LlamaConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"{path} does not exist: point at an HF model directory or its config.json")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); fix or re-export the config") from e
        if not isinstance(d, dict):
            raise ConfigError(f"{path} holds a JSON {type(d).__name__}, not an object; fix or re-export the config")
        try:
            return cls.from_hf_dict(d)
        except ConfigError as e:
            msg = str(e)  # name the file: "<path> field x=..." / "<path>: <problem>"
            raise ConfigError(f"{path} {msg[12:]}" if msg.startswith("config.json ") else f"{path}: {msg}") from None

    def rope_parameters(self) -> dict[str, Any]:
        return {"rope_type": self.rope_type, "rope_theta": self.rope_theta, **self.rope_scaling_dict}

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json for `LlamaForCausalLM`; readable by transformers 4.x and 5.x."""
        scaling = None
        if self.rope_type != "default":
            scaling = {"rope_type": self.rope_type, **self.rope_scaling_dict}
            scaling["original_max_position_embeddings"] = int(scaling["original_max_position_embeddings"])
        rope_params = self.rope_parameters()
        if "original_max_position_embeddings" in rope_params:
            rope_params["original_max_position_embeddings"] = int(rope_params["original_max_position_embeddings"])
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta, "rope_scaling": scaling, "rope_parameters": rope_params,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id, "dtype": self.dtype, "torch_dtype": self.dtype,
            "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True,
        }

    def check_transformers_loadable(self) -> None:
        """Refuse shapes that transformers 5.x `LlamaConfig` rejects, naming sizes that would work."""
        h, n = self.hidden_size, self.num_attention_heads
        if h % n:
            lower = (h // n) * n
            raise ConfigError(
                f"hidden_size={h} is not a multiple of num_attention_heads={n}: transformers 5.x "
                f"LlamaConfig refuses this even with head_dim={self.head_dim} set, so nobody could "
                f"load the checkpoint. Nearby valid hidden sizes: {[s for s in (lower, lower + n) if s > 0]}")
