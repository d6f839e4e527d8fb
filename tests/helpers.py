"""Shared test helpers: tiny random transformers Llama models saved as HF directories, and the
config.json / loading helpers of the checkpoint-corruption tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig as HFConfig
from transformers import LlamaForCausalLM

import minitron_jax

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


def tiny_hf_config(**overrides) -> HFConfig:
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              rms_norm_eps=1e-5, tie_word_embeddings=False)
    kw.update(overrides)
    return HFConfig(**kw)


def tiny_family_config(model_type: str, **overrides):
    """The transformers config of `model_type` ("mistral", "qwen2", "qwen3") with tiny_hf_config's sizes."""
    from transformers import AutoConfig
    kw = {**tiny_hf_config().to_dict(), **overrides}
    kw = {k: kw[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                             "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                             *overrides)}
    return AutoConfig.for_model(model_type, **kw)


def save_tiny(path, seed: int = 0, dtype=torch.float32, family: str = "llama", **overrides):
    """Random-init LlamaForCausalLM (or the `family`'s model: "mistral", "qwen2", "qwen3"), with non-trivial
    norm weights and biases, saved to `path`; returns the torch model."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    cfg = tiny_hf_config(**overrides) if family == "llama" else tiny_family_config(family, **overrides)
    model = (LlamaForCausalLM(cfg) if family == "llama" else AutoModelForCausalLM.from_config(cfg)).eval()
    with torch.no_grad():  # random norm weights and biases so a wrong slice cannot hide behind ones or zeros
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model = model.to(dtype)
    model.save_pretrained(path)
    return model


def rel_err(a, b, mask=None) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if mask is not None:
        a, b = a[mask], b[mask]
    return float(np.abs(a - b).max() / np.abs(b).max())


# ---------------------------------------------------------------------------- checkpoints to corrupt
# (model/test_config.py, io/test_hf.py, io/test_safetensors.py: the `tiny_dirs` / `ckpt` / `no_weight_reads`
# fixtures in conftest.py save a tiny random `transformers.LlamaForCausalLM` with TINY's shape)
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128)


def read_config(d: Path) -> dict:
    return json.loads((d / "config.json").read_text())


def write_config(d: Path, cfg: dict) -> None:
    (d / "config.json").write_text(json.dumps(cfg, indent=2))


def load(d: Path):
    return minitron_jax.from_pretrained(d)


def transformers_refuses(**shape) -> bool:
    import transformers
    try:
        transformers.LlamaConfig(**{**TINY, **shape})
    except Exception as e:  # huggingface_hub StrictDataclassClassValidationError (not a ValueError)
        assert "not a multiple of the number of attention heads" in str(e)
        return True
    return False


# ---------------------------------------------------------------------------- references from transformers
# (prune/test_importance.py, e2e/test_head_dim.py: importance scores re-derived from torch forward hooks;
# io/test_hf.py, e2e/test_head_dim.py: the tensors of an HF directory)
def torch_activations(model, samples):
    """Per-layer activations captured by hooks on the transformers modules."""
    acts = {k: [[] for _ in model.model.layers] for k in
            ("layer_in", "layer_out", "attn_norm", "mlp_norm", "o_proj_in", "down_proj_in", "mlp_pre")}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        def pre(key, i):
            return lambda mod, args: acts[key][i].append(args[0].detach().numpy().astype(np.float64))
        def post(key, i):
            return lambda mod, args, out: acts[key][i].append((out[0] if isinstance(out, tuple) else out).detach().numpy().astype(np.float64))
        hooks += [layer.register_forward_pre_hook(pre("layer_in", i)), layer.register_forward_hook(post("layer_out", i)),
                  layer.input_layernorm.register_forward_hook(post("attn_norm", i)),
                  layer.post_attention_layernorm.register_forward_hook(post("mlp_norm", i)),
                  layer.self_attn.o_proj.register_forward_pre_hook(pre("o_proj_in", i)),
                  layer.mlp.down_proj.register_forward_pre_hook(pre("down_proj_in", i)),
                  layer.mlp.gate_proj.register_forward_hook(post("mlp_pre", i))]
    with torch.no_grad():
        model(torch.tensor(samples, dtype=torch.long))
    for h in hooks:
        h.remove()
    return {k: np.stack([v[0] for v in per_layer]) for k, per_layer in acts.items()}  # [L, B, S, C]


def numpy_scores(acts, cfg, batch_agg, seq_agg, mlp_site):
    def seq(a):  # [L, B, S, C] -> [L, B, C]
        return {"mean": np.abs(a).mean(2), "l2": np.sqrt((a ** 2).sum(2)), "var": a.var(2)}[seq_agg]

    def batch(x):  # [L, B, C] -> [L, C]
        return {"l2": np.sqrt((x ** 2).sum(1)), "mean": x.mean(1), "var": x.var(1)}[batch_agg]

    L, H, K, d = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    o = batch(seq(acts["o_proj_in"]))
    heads = np.sqrt((o.reshape(L, H, d) ** 2).sum(-1))
    x, y = acts["layer_in"], acts["layer_out"]
    cos = (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))
    return {"mlp": batch(seq(acts["mlp_pre" if mlp_site == "pre_activation" else "down_proj_in"])),
            "heads": heads, "kv_groups": np.sqrt((heads.reshape(L, K, H // K) ** 2).sum(-1)),
            "hidden": (batch(seq(acts["attn_norm"])) + batch(seq(acts["mlp_norm"]))).sum(0),
            "layer_bi": (1 - cos).mean((1, 2))}


def read_all(path):
    """Every tensor of an HF checkpoint directory, by name."""
    from minitron_jax.io.hf import open_checkpoint
    return {n: np.asarray(f.tensor(n)) for n, f in open_checkpoint(path).items()}


# ---------------------------------------------------------------------------- for refusal tests
# (documents, a tokenizer, a NaN model: data/test_text.py, data/test_loader.py, eval/test_evaluate.py,
# prune/test_importance.py)
class CodePointTokenizer:
    """A character tokenizer: id = code point % 200 + 3 (BOS 1, EOS 2, pad 0); records what it was given."""
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __init__(self, offset: int = 3, pad: int = 0):
        self.offset, self.pad_token_id, self.calls = offset, pad, []

    def __call__(self, texts, add_special_tokens=False):
        if isinstance(texts, str):
            return {"input_ids": self([texts])["input_ids"][0].tolist()}
        self.calls.append(sum(map(len, texts)))
        return {"input_ids": [np.frombuffer(t.encode("utf-32-le"), np.uint32) % 200 + self.offset for t in texts]}

    def get_vocab(self):
        return {chr(i): i + self.offset for i in range(200)}

    def __len__(self):
        return 200 + self.offset


def nan_model(path):
    """The model at `path` with one NaN weight (layer 0's q_proj)."""
    m = minitron_jax.from_pretrained(path)
    p = m.params()
    p["layers"]["q_proj"] = p["layers"]["q_proj"].at[0, 0, 0].set(np.nan)
    bad = minitron_jax.Llama(m.config, params=p)
    bad.source = str(path)
    return bad


def write_docs(d, n, text="Some words of text, in a line. " * 20):
    d.mkdir()
    for i in range(n):
        (d / f"doc{i}.txt").write_text(f"{i}: {text}")
    return d


# ---------------------------------------------------------------------------- token stores
# (data/test_store_reader.py, run/test_prune_job.py, train/test_trainer.py; the store fixtures are in
# conftest.py)
def tokenize_store(src: Path, tok_dir, out: Path) -> Path:
    """`minitron tokenize SRC` with the tokenizer of `tok_dir` into the token store `out`."""
    from minitron_jax.data.tokenize import tokenize
    tokenize([str(src)], tok_dir, str(out), workers=1, progress=False)
    return out


def store_reference(store):
    """Every token's document (numpy searchsorted over the full offsets) and the documents' token arrays."""
    from minitron_jax.data.token_store import open_store

    st = open_store(store)
    off = np.asarray(st.document_offsets())
    tokens = np.asarray(st.read(0, st.n_tokens))
    doc_of = np.searchsorted(off, np.arange(st.n_tokens), side="right") - 1
    return st, off, tokens, doc_of


# ---------------------------------------------------------------------------- Cloud Storage (emulator)
def upload(local: Path, url: str) -> str:
    """Copy a local directory (every file, recursively, byte for byte) to the gs:// prefix `url`."""
    from minitron_jax.core import storage
    for f in sorted(p for p in Path(local).rglob("*") if p.is_file()):
        (storage.path(url) / f.relative_to(local).as_posix()).write_bytes(f.read_bytes())
    return url


def gs_files(url: str) -> list[str]:
    """The object names under the gs:// prefix `url`, relative to it."""
    from minitron_jax.core import storage
    fs, key = storage.filesystem(), storage.key(url)
    return sorted(p[len(key) + 1:] for p in fs.find(key))
