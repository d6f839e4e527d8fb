"""The model families one model function serves, each declared as its difference from Llama.

A family is what `config.json`'s `model_type` names. Everything else (the layer, RoPE, GQA, the MLP,
pruning axes) is Llama's:
- llama   (`LlamaForCausalLM`): the reference; no biases, no per-head norms, no sliding window.
- mistral (`MistralForCausalLM`): explicit `head_dim` (hidden != heads x head_dim, as in
  Mistral-NeMo-12B: 5120 vs 32 x 128) and `sliding_window` (transformers' default 4096 when the key is
  absent; null = full attention).
- qwen2   (`Qwen2ForCausalLM`, also Qwen2.5): biases on q_proj, k_proj and v_proj (not o_proj);
  `use_sliding_window` with `max_window_layers`.
- qwen3   (`Qwen3ForCausalLM`): RMSNorm over head_dim on every query and key head (`q_norm`, `k_norm`,
  before RoPE), explicit `head_dim`, no biases; sliding window as qwen2.

A sliding window is supported by refusing sequences longer than it (model.forward): up to the window
it changes nothing, since every key a causal query sees is within it.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str
    qkv_bias: bool = False  # q_proj / k_proj / v_proj carry biases
    qk_norm: bool = False  # q_norm / k_norm [head_dim] per layer
    sliding: str = "none"  # "none" | "mistral" (sliding_window) | "qwen" (use_sliding_window + max_window_layers)
    # transformers' config class refuses hidden_size % num_attention_heads != 0 even with head_dim set
    hidden_divisible_by_heads: bool = False
    examples: str = ""


FAMILIES = {f.model_type: f for f in (
    Family("llama", "LlamaForCausalLM", hidden_divisible_by_heads=True,
           examples="Llama-2/3/3.1/3.2, SmolLM2, Minitron-Llama"),
    Family("mistral", "MistralForCausalLM", sliding="mistral", examples="Mistral-7B, Mistral-NeMo-12B, MN-Minitron"),
    Family("qwen2", "Qwen2ForCausalLM", qkv_bias=True, sliding="qwen", examples="Qwen2, Qwen2.5"),
    Family("qwen3", "Qwen3ForCausalLM", qk_norm=True, sliding="qwen", examples="Qwen3 dense"),
)}

# config.json keys that mean a mixture of experts; none of the families above has one
MOE_KEYS = ("num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size",
            "n_routed_experts", "n_shared_experts", "shared_expert_intermediate_size")


def supported() -> str:
    return "; ".join(f"{f.architecture} (model_type {f.model_type!r}: {f.examples})" for f in FAMILIES.values())
