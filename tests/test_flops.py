"""FLOPs per token live on LlamaConfig (next to param_count); the weights-free planner does not import
the trainer."""

import subprocess
import sys

import pytest

from minitron_jax.config import LlamaConfig


@pytest.mark.parametrize("tied", [False, True])
def test_flops_per_token_matches_a_hand_count(tied):
    # head_dim (12) != hidden / heads (64 / 4 = 16): the attention widths come from head_dim
    c = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=12, tie_word_embeddings=tied)
    L, H, F, V, S = 3, 64, 96, 100, 50
    q, kv = 4 * 12, 2 * 12
    per_layer = H * q + 2 * H * kv + q * H + 3 * H * F  # q, k, v, o; gate, up, down
    matmuls = L * per_layer + V * H                        # + the lm_head (tied or not, it is one matmul)
    attention = L * 2 * (S / 2) * q * 2                    # QK^T and AV, each 2 FLOPs per MAC, causal half
    assert c.flops_per_token(S) == 2 * matmuls + attention


def test_plan_does_not_import_the_trainer():
    code = "import sys, minitron_jax.plan; assert 'minitron_jax.distill' not in sys.modules, 'plan imports distill'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
