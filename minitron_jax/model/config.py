"""Llama-3.1 configuration (and the families of `family.py`: Mistral, Qwen2, Qwen3) <-> Hugging Face
`config.json`.

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

from minitron_jax.core import storage
from minitron_jax.core.errors import ConfigError, clip_repr
from minitron_jax.model.family import FAMILIES, MOE_KEYS, Family, supported

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


def _family(d: dict[str, Any]) -> Family:
    """The family `model_type` names, its architecture checked; unsupported fields refused by name."""
    archs, model_type = d.get("architectures") or [], d.get("model_type")
    if not isinstance(archs, list):
        raise ConfigError(f"config.json field architectures={archs!r} must be a list such as [\"LlamaForCausalLM\"]")
    fam = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if fam is None or any(a != fam.architecture for a in archs):
        raise ConfigError(f"unsupported checkpoint (model_type={model_type!r}, architectures={archs}): minitron_jax "
                          f"supports {supported()}")
    moe = [k for k in MOE_KEYS if d.get(k) not in (None, 0, False, [])]
    if moe:
        raise ConfigError(f"config.json field {moe[0]}={d[moe[0]]!r} describes a mixture of experts, which "
                          f"minitron_jax does not prune; it supports dense {fam.architecture} only")
    biased = ("attention_bias", "mlp_bias") if fam.model_type != "qwen2" else ("mlp_bias",)  # qwen2's are fixed
    for flag in biased:
        if _typed(d, flag, "bool"):
            raise ConfigError(
                f"config.json field {flag}=true is not supported: {fam.architecture} here has "
                + ("q/k/v biases only" if fam.qkv_bias else "no projection biases")
                + ". Convert a bias-free checkpoint or fold the biases away first.")
    return fam


def _sliding(d: dict[str, Any], fam: Family, layers: int) -> dict[str, Any]:
    """sliding_window (None unless some layer slides, as transformers decides it) and qwen's max_window_layers."""
    if fam.sliding == "none":
        return {}
    # transformers' Mistral / Qwen configs default sliding_window to 4096 when the key is absent
    window = _typed(d, "sliding_window", "int", None, positive=True) if "sliding_window" in d else 4096
    if fam.sliding == "mistral":
        return {"sliding_window": window}
    first = _typed(d, "max_window_layers", "int", 28, nonneg=True)
    if not _typed(d, "use_sliding_window", "bool", False):
        window = None
    types = d.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != layers or not set(types) <= {"full_attention", "sliding_attention"}:
            raise ConfigError(f"config.json field layer_types={clip_repr(types)} must list 'full_attention' or "
                              f"'sliding_attention' for each of the {layers} layers")
        slides = "sliding_attention" in types and window is not None
    else:
        slides = window is not None and first < layers
    return {"sliding_window": window if slides else None, "max_window_layers": first}


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
    model_type: str = "llama"  # the family (`family.FAMILIES`)
    sliding_window: int | None = None  # set when some layer attends within a window (refused beyond it)
    max_window_layers: int | None = None  # qwen2 / qwen3: layers from this index on slide (written back)

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
        if self.model_type not in FAMILIES:
            raise ConfigError(f"model_type={self.model_type!r} is not supported; supported: {supported()}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise ConfigError(f"sliding_window={self.sliding_window!r} must be a positive integer or null")

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    @property
    def qkv_bias(self) -> bool:
        return self.family.qkv_bias

    @property
    def qk_norm(self) -> bool:
        return self.family.qk_norm

    def check_seq_len(self, seq_len: int, what: str = "the sequence") -> None:
        """Refuse sequences longer than the sliding window: attention here is full (exact only up to it)."""
        if self.sliding_window is not None and seq_len > self.sliding_window:
            raise ConfigError(
                f"{what} has {seq_len} positions but this {self.model_type} model attends within a sliding window of "
                f"{self.sliding_window}, which minitron_jax does not implement (it is exact up to the window): use "
                f"sequences of at most {self.sliding_window} tokens")

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
        per_layer = attn + 3 * h * f + 2 * h + self._vector_params_per_layer()
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + emb + h

    def _vector_params_per_layer(self) -> int:
        """q/k/v biases and q/k norms of one layer (family extras; not matmul weights)."""
        d = self.head_dim
        bias = d * (self.num_attention_heads + 2 * self.num_key_value_heads) if self.qkv_bias else 0
        return bias + (2 * d if self.qk_norm else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Matmul FLOPs of one forward pass per token at sequence length `seq_len`: 2 x the matmul
        weights (every projection and the lm_head; not the input embedding lookup, not the norms) plus
        causal attention (QK^T and AV over on average half the sequence: 2 x L x S x heads x head_dim)."""
        h = self.hidden_size
        matmul_params = self.param_count() - self.vocab_size * h * (0 if self.tie_word_embeddings else 1)
        matmul_params -= h * (2 * self.num_hidden_layers + 1)  # norms
        matmul_params -= self.num_hidden_layers * self._vector_params_per_layer()  # biases, q/k norms
        attn = 2 * self.num_hidden_layers * seq_len * self.num_attention_heads * self.head_dim
        return 2.0 * matmul_params + attn

    # ----------------------------------------------------------------- HF I/O
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        """Every field read is type-checked (ints are ints, not bools or floats; numbers finite; sizes positive)."""
        fam = _family(d)
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act={d['hidden_act']!r} is not supported; {fam.architecture} uses 'silu'")
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
            raise ConfigError("per-layer-type rope_parameters are not supported (one RoPE for every layer)")
        # As transformers 5.x does: a non-null 4.x `rope_scaling` replaces `rope_parameters`; theta comes from
        # the chosen dict, else the top-level 4.x `rope_theta`, else the default.
        params = dict(scaling or rope or {})
        where = "rope_scaling" if scaling else "rope_parameters"
        top_theta = _typed(d, "rope_theta", "number", 10000.0, positive=True)
        theta = _typed(params, "rope_theta", "number", positive=True, where=where) or top_theta
        rope_type = params.get("rope_type", params.get("type", "default"))
        if not isinstance(rope_type, str):
            raise ConfigError(f"config.json {where}.rope_type={rope_type!r} must be a string such as 'llama3'")
        if rope_type not in ROPE_TYPES:
            raise ConfigError(f"config.json {where}.rope_type={rope_type!r} is not implemented; supported RoPE types: "
                              f"{ROPE_TYPES} (Llama-3.1 uses 'llama3'; SmolLM2, Mistral, Qwen use 'default')")
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
            pad_token_id=_typed(d, "pad_token_id", "int", nonneg=True), dtype=dtype.replace("torch.", ""),
            model_type=fam.model_type, **_sliding(d, fam, ints["num_hidden_layers"]))

    @classmethod
    def from_file(cls, path: str | Path) -> "LlamaConfig":
        path = storage.path(path)  # local or gs://
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
        """config.json for the family's architecture (`LlamaForCausalLM`, ...); readable by transformers 4.x and 5.x."""
        scaling = None
        if self.rope_type != "default":
            scaling = {"rope_type": self.rope_type, **self.rope_scaling_dict}
            scaling["original_max_position_embeddings"] = int(scaling["original_max_position_embeddings"])
        rope_params = self.rope_parameters()
        if "original_max_position_embeddings" in rope_params:
            rope_params["original_max_position_embeddings"] = int(rope_params["original_max_position_embeddings"])
        d = {
            "architectures": [self.family.architecture], "model_type": self.model_type,
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
        if self.model_type == "llama":
            return d
        for key in ("mlp_bias", "pretraining_tp") + (("attention_bias",) if self.model_type != "qwen3" else ()):
            del d[key]  # Llama's switches, absent from these families' configs
        if self.family.sliding == "mistral":
            d["sliding_window"] = self.sliding_window
        elif self.family.sliding == "qwen":
            d.update(use_sliding_window=self.sliding_window is not None, sliding_window=self.sliding_window,
                     max_window_layers=self.max_window_layers if self.max_window_layers is not None else
                     self.num_hidden_layers)
        return d

    def check_transformers_loadable(self) -> None:
        """Refuse shapes that transformers 5.x `LlamaConfig` rejects, naming sizes that would work."""
        h, n = self.hidden_size, self.num_attention_heads
        if h % n and self.family.hidden_divisible_by_heads:
            lower = (h // n) * n
            raise ConfigError(
                f"hidden_size={h} is not a multiple of num_attention_heads={n}: transformers 5.x "
                f"LlamaConfig refuses this even with head_dim={self.head_dim} set, so nobody could "
                f"load the checkpoint. Nearby valid hidden sizes: {[s for s in (lower, lower + n) if s > 0]}")
