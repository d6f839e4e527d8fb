"""eval/generate.py: prefill + jitted decode steps over the KV cache, against transformers' greedy `generate`
(fp32, CPU) on tiny random models of each family and on SmolLM2-135M-Instruct; stop tokens and the length
limit; seeded samples; the same tokens sharded over the 8 fake CPU devices as on one."""

import jax
import numpy as np
import pytest
import torch
from helpers import save_tiny
from jax.sharding import PartitionSpec as P

import minitron_jax as mj
from minitron_jax.eval.generate import Generator, left_pad
from minitron_jax.eval.sampling import Sampling
from minitron_jax.model.sharding import make_mesh

FAMILIES = {  # tests/model/test_families.py's shapes
    "llama": dict(num_hidden_layers=2),
    "mistral": dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=None,
                    rope_theta=1e6),
    "qwen2": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6),
    "qwen3": dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1e6),
}
PROMPTS = [[5, 17, 33, 9, 100, 41, 7], [12, 90], [3, 3, 64, 27, 8], [77]]  # different lengths: left padding


def hf_greedy(model, prompts, max_new, eos, pad=0):
    """transformers' greedy generate on the left-padded batch: each row's new ids up to its first eos (kept)."""
    ids, mask = left_pad(prompts, max(map(len, prompts)), pad)
    with torch.no_grad():
        out = model.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
                             do_sample=False, max_new_tokens=max_new, pad_token_id=pad, eos_token_id=eos,
                             min_new_tokens=0)
    rows = []
    for r in out[:, ids.shape[1]:].tolist():
        hit = [i for i, t in enumerate(r) if t in eos]
        rows.append(r[:hit[0] + 1] if hit else r)
    return rows


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    ref = save_tiny(path, family=request.param, **FAMILIES[request.param])
    return path, ref


def test_greedy_equals_transformers_generate_left_padded(tiny):
    path, ref = tiny
    model = mj.from_pretrained(path, dtype="float32")
    # stop ids: two tokens the model emits when unstopped (so some rows stop and some run to the limit)
    free = Generator(model.config, max_new_tokens=12, batch_size=4, bucket=8)(model.params(), PROMPTS, range(4))[0]
    stops = sorted({free[0].tokens[5], free[2].tokens[9]})
    gen = Generator(model.config, max_new_tokens=12, stop_ids=stops, batch_size=4, bucket=8)
    got, _ = gen(model.params(), PROMPTS, range(4))
    want = hf_greedy(ref, PROMPTS, 12, stops)
    assert [g.tokens for g in got] == want
    assert [g.finish_reason for g in got] == ["stop" if w[-1] in stops else "length" for w in want]
    assert "stop" in {g.finish_reason for g in got}
    assert all(len(g.tokens) == 12 for g in got if g.finish_reason == "length")


def test_stop_and_length_finish_reasons(tiny_pair):
    model = mj.from_pretrained(tiny_pair[0], dtype="float32")
    gen = Generator(model.config, max_new_tokens=6, batch_size=2, bucket=8)
    free, _ = gen(model.params(), PROMPTS[:2], [0, 1])
    assert [g.finish_reason for g in free] == ["length", "length"] and all(len(g.tokens) == 6 for g in free)
    stop = free[0].tokens[2]
    stopped, steps = Generator(model.config, max_new_tokens=6, stop_ids=[stop], batch_size=2, bucket=8)(
        model.params(), PROMPTS[:2], [0, 1])
    assert stopped[0] == (free[0].tokens[:free[0].tokens.index(stop) + 1], "stop")
    if stop not in free[1].tokens:
        assert stopped[1] == free[1] and steps == 5
    one, steps = Generator(model.config, max_new_tokens=1, batch_size=2, bucket=8)(model.params(), PROMPTS[:2], [0, 1])
    assert steps == 0 and [g.tokens for g in one] == [f.tokens[:1] for f in free]


def test_seeded_sample_is_reproducible_and_independent_of_the_batch(tiny_pair):
    model = mj.from_pretrained(tiny_pair[0], dtype="float32")
    s = Sampling(temperature=1.5, top_k=20, top_p=0.9)
    gen = Generator(model.config, s, max_new_tokens=10, batch_size=4, bucket=8)
    a, _ = gen(model.params(), PROMPTS, range(4), seed=3)
    b, _ = gen(model.params(), PROMPTS, range(4), seed=3)
    c, _ = gen(model.params(), PROMPTS, range(4), seed=4)
    assert a == b and a != c
    alone, _ = Generator(model.config, s, max_new_tokens=10, batch_size=1, bucket=8)(
        model.params(), PROMPTS[2:3], [2], seed=3)
    assert alone[0] == a[2]  # row 2's key comes from its id, not its batch


def test_sharded_over_8_devices_equals_one_device(tiny_pair):
    mesh = make_mesh(2, -1, 2)
    one = mj.from_pretrained(tiny_pair[0], dtype="float32")
    sharded = mj.from_pretrained(tiny_pair[0], dtype="float32", mesh=mesh)
    prompts = PROMPTS * 2
    for s in (Sampling(), Sampling(temperature=1.0, top_k=30)):
        want, _ = Generator(one.config, s, max_new_tokens=8, batch_size=8, bucket=8)(one.params(), prompts, range(8))
        gen = Generator(sharded.config, s, max_new_tokens=8, batch_size=8, bucket=8, mesh=mesh)
        got, _ = gen(sharded.params(), prompts, range(8))
        assert got == want
    with jax.set_mesh(mesh):  # the cache's rows are split over data x fsdp, its KV heads over tensor
        cache, _ = gen.prefill(sharded.params(), *left_pad(prompts, 8), np.zeros((8, 2), np.uint32))
    assert cache.k.sharding.spec == P(None, ("data", "fsdp"), None, "tensor")


@pytest.mark.slow
def test_smollm2_greedy_equals_transformers_text_and_chat():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minitron_jax.core.assets import fetch_smollm2
    path = fetch_smollm2()
    tok = AutoTokenizer.from_pretrained(path)
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, tokenize=False)
    prompts = [tok("To be, or not to be,")["input_ids"], tok(chat, add_special_tokens=False)["input_ids"]]
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = mj.from_pretrained(path, dtype="float32")
    eos = [model.config.eos_token_id]
    got, _ = Generator(model.config, max_new_tokens=24, stop_ids=eos, batch_size=2)(model.params(), prompts, [0, 1])
    assert [g.tokens for g in got] == hf_greedy(ref, prompts, 24, eos, pad=2)
    assert "Paris" in tok.decode(got[1].tokens)
