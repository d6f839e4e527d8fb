"""The prune record (prune/record.py, minitron_prune.json): it describes exactly what `prune` kept, survives
the JSON round trip, and a student paired with the wrong teacher is refused with a message."""

import jax
import numpy as np
import pytest

from minitron_jax.core.errors import TrainingError
from minitron_jax.model.config import LlamaConfig
from minitron_jax.model.llama import init_params
from minitron_jax.prune.pruning import prune
from minitron_jax.prune.record import PRUNE_RECORD, load_prune_record, prune_record, save_prune_record
from minitron_jax.train.objective import hidden_init

CFG = LlamaConfig(vocab_size=40, hidden_size=24, intermediate_size=32, num_hidden_layers=5, num_attention_heads=6,
                  num_key_value_heads=3, head_dim=4)
TARGET = "drop_layers=1,3,hidden_size=18,intermediate_size=20,num_attention_heads=3"


def scores():
    rng = np.random.default_rng(0)
    return {"hidden": rng.random(24), "mlp": rng.random((5, 32)), "heads": rng.random((5, 6)),
            "kv_groups": rng.random((5, 3))}


def test_record_reproduces_the_pruned_weights(tmp_path):
    params = jax.tree.map(np.asarray, init_params(CFG, jax.random.key(0)))
    p, new = prune(params, CFG, scores(), TARGET)
    save_prune_record(tmp_path, prune_record(CFG, scores(), TARGET, source="/models/teacher"))
    rec = load_prune_record(tmp_path)
    assert rec["layers"] == [0, 2, 4] and rec["source"] == "/models/teacher" and rec["kv_groups"] is None
    assert rec["source_config"]["num_hidden_layers"] == 5 and rec["pruned_config"]["hidden_size"] == 18
    h = np.asarray(rec["hidden"])
    np.testing.assert_array_equal(p["embed_tokens"], params["embed_tokens"][:, h])
    np.testing.assert_array_equal(p["norm"], params["norm"][h])
    for i, src in enumerate(rec["layers"]):
        lay = {k: v[src] for k, v in params["layers"].items()}
        m = np.asarray(rec["mlp"][i])
        q = (np.asarray(rec["q_heads"][i])[:, None] * 4 + np.arange(4)).ravel()  # head_dim 4
        np.testing.assert_array_equal(p["layers"]["down_proj"][i], lay["down_proj"][h][:, m])
        np.testing.assert_array_equal(p["layers"]["up_proj"][i], lay["up_proj"][m][:, h])
        np.testing.assert_array_equal(p["layers"]["q_proj"][i], lay["q_proj"][q][:, h])
        np.testing.assert_array_equal(p["layers"]["o_proj"][i], lay["o_proj"][h][:, q])
    assert new.num_hidden_layers == len(rec["layers"]) and new.hidden_size == len(h)


def test_no_record_is_none_and_a_record_of_another_teacher_is_refused(tmp_path):
    assert load_prune_record(tmp_path) is None
    new = prune(jax.tree.map(np.asarray, init_params(CFG, jax.random.key(0))), CFG, scores(), TARGET)[1]
    save_prune_record(tmp_path, prune_record(CFG, scores(), TARGET))
    other = CFG.replace(num_hidden_layers=6)
    with pytest.raises(TrainingError, match="pruned from a model with 5 layers .* teacher has 6"):
        hidden_init(tmp_path, new, other)
    (tmp_path / PRUNE_RECORD).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_prune_record(tmp_path)
