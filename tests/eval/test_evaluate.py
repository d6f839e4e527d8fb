"""Evaluation (eval/evaluate.py): LM loss, layer-gated losses and multiple-choice scoring against transformers
(PyTorch, fp32, CPU); ids beyond the vocabulary and non-finite losses refused; the evaluation set from a
token store equals the one from its text."""

import json

import jax
import numpy as np
import pytest
import torch
from helpers import CodePointTokenizer, nan_model, save_tiny

import minitron_jax as mj
from minitron_jax.core.errors import DataError, EvalError
from minitron_jax.eval.evaluate import (
    evaluate_model,
    gated_losses,
    lm_loss,
    load_task,
    make_choice_fn,
    make_loss_fn,
    multiple_choice,
    next_line_task,
    row_losses,
)
from minitron_jax.model.sharding import make_mesh
from minitron_jax.prune.importance import compute_scores

REL = 1e-5
S = 64  # the sequence length of the token-store test


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    ref = save_tiny(path, num_hidden_layers=4)
    model = mj.from_pretrained(path)
    return path, ref, model.params(), model.config


def torch_loss(ref, ids, drop_layer=None):
    layers = ref.model.layers
    try:
        if drop_layer is not None:
            ref.model.layers = torch.nn.ModuleList([m for i, m in enumerate(layers) if i != drop_layer])
        with torch.no_grad():
            t = torch.tensor(ids, dtype=torch.long)
            return float(ref(t, labels=t, use_cache=False).loss)
    finally:
        ref.model.layers = layers


def samples(n=5, s=24, seed=0):
    return np.random.RandomState(seed).randint(0, 128, (n, s)).astype(np.int32)


# ---------------------------------------------------------------------------- lm loss
@pytest.mark.parametrize("batch_size", [5, 2])  # divides N; leaves a padded last batch
def test_lm_loss_matches_transformers(tiny, batch_size):
    _, ref, params, cfg = tiny
    x = samples()
    got = lm_loss(params, cfg, x, batch_size=batch_size)
    want = torch_loss(ref, x)
    assert got == pytest.approx(want, rel=REL)


def test_lm_loss_on_mesh(tiny):
    path, ref, _, _ = tiny
    mesh = make_mesh(2, 2, 2)
    model = mj.from_pretrained(path, mesh=mesh)
    x = samples(n=6, seed=4)
    got = lm_loss(model.params(), model.config, x, batch_size=4, mesh=mesh)
    assert got == pytest.approx(torch_loss(ref, x), rel=REL)


@pytest.mark.parametrize("mesh_shape", [None, (2, 2, 2)])
def test_row_losses_match_transformers_per_row(tiny, mesh_shape):
    """Each row's NLL sum equals transformers' mean loss on that row alone x its S - 1 targets; their ratio is
    lm_loss (a padded last batch, and a mesh that splits the rows)."""
    path, ref, params, cfg = tiny
    mesh = make_mesh(*mesh_shape) if mesh_shape else None
    if mesh is not None:
        params = mj.from_pretrained(path, mesh=mesh).params()
    x = samples(n=7, seed=5)
    nll, tok = row_losses(params, cfg, x, batch_size=4, mesh=mesh)
    assert tok.tolist() == [x.shape[1] - 1] * len(x)
    want = np.array([torch_loss(ref, x[i:i + 1]) * (x.shape[1] - 1) for i in range(len(x))])
    np.testing.assert_allclose(nll, want, rtol=REL)
    assert nll.sum() / tok.sum() == pytest.approx(lm_loss(params, cfg, x, batch_size=4, mesh=mesh), rel=REL)


def test_gated_losses_match_layer_removal(tiny):
    _, ref, params, cfg = tiny
    L = cfg.num_hidden_layers
    x = samples(n=3, seed=1)
    gates = np.ones((L + 1, L), np.float32)
    for l in range(L):
        gates[l + 1, l] = 0
    got = gated_losses(params, cfg, x, gates, batch_size=2)
    assert got.shape == (L + 1,)
    assert got[0] == pytest.approx(lm_loss(params, cfg, x, batch_size=2), rel=REL)
    assert got[0] == pytest.approx(torch_loss(ref, x), rel=REL)
    for l in range(L):
        assert got[l + 1] == pytest.approx(torch_loss(ref, x, drop_layer=l), rel=REL), f"layer {l}"
    assert len(set(np.round(got, 6).tolist())) == L + 1  # every gate set changes the loss


def test_no_samples(tiny):
    _, _, params, cfg = tiny
    with pytest.raises(DataError, match="no samples"):
        lm_loss(params, cfg, np.zeros((0, 8), np.int32))


def jaxpr_shapes(jaxpr):
    """Shapes of every value in a jaxpr, nested jaxprs (scan, map, custom_vjp, pjit) included."""
    out = []
    for eqn in jaxpr.eqns:
        out += [v.aval.shape for v in eqn.outvars if hasattr(v.aval, "shape")]
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else [p]):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    out += jaxpr_shapes(sub)
    return out


def test_chunked_eval_loss_equals_full_logits_reference(tiny):
    """make_loss_fn (the chunked training loss; 7-position chunks over 24, padded rows) equals the masked
    next-token NLL from transformers' full fp32 logits re-derived in float64."""
    _, ref, params, cfg = tiny
    x = samples(n=3, seed=7)
    mask = np.ones(x.shape, np.float32)
    mask[1, 15:] = 0
    mask[2, 3:] = 0
    gates = np.ones(cfg.num_hidden_layers, np.float32)
    got_sum, got_n = jax.jit(make_loss_fn(cfg, chunk_size=7))(params, x, mask, gates)
    with torch.no_grad():
        logits = ref(torch.tensor(x, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long)).logits
    logp = torch.log_softmax(logits.double(), -1).numpy()
    nll = -np.take_along_axis(logp[:, :-1], x[:, 1:, None], -1)[..., 0]
    w = mask[:, 1:] * mask[:, :-1]
    assert float(got_n) == w.sum()
    assert float(got_sum) == pytest.approx((nll * w).sum(), rel=REL)


def test_eval_never_builds_full_logits(tiny):
    """Evaluation, gated (depth) losses and multiple choice run the chunked loss: no value of
    [B, S, V] size or larger exists in their jitted programs (before: [B, S, V] fp32 log-softmax)."""
    _, _, params, cfg = tiny
    b, s, v = 4, 24, cfg.vocab_size
    ids, mask = np.zeros((b, s), np.int32), np.ones((b, s), np.float32)
    gates = np.ones(cfg.num_hidden_layers, np.float32)
    for fn, args in ((make_loss_fn(cfg, chunk_size=8), (ids, mask, gates)),
                     (make_choice_fn(cfg, chunk_size=8), (ids, mask, mask, gates))):
        shapes = jaxpr_shapes(jax.make_jaxpr(fn)(params, *args).jaxpr)
        assert any(sh[-1:] == (v,) and np.prod(sh) >= b * 8 * v for sh in shapes)  # the chunk's logits
        assert max(np.prod(sh) for sh in shapes) < b * s * v


# ---------------------------------------------------------------------------- multiple choice
class CharTokenizer:
    """One token per character, ids in [3, 128); BOS = 1."""

    bos_token_id = 1
    eos_token_id = 2

    def encode(self, text):
        return [3 + ord(c) % 125 for c in text]

    def __call__(self, text, add_special_tokens=False):
        assert not add_special_tokens
        return {"input_ids": self.encode(text)}


ITEMS = [
    {"context": "The cat sat on the ", "choices": ["mat", "hat é", "dog house", "x"], "answer": 0},
    {"context": "One, two, ", "choices": ["three", "four", "ünf"], "answer": 2},
    {"context": "Hello", "choices": [" world", "!", " there friend", "...", "éé"], "answer": 1},
    {"context": "abc", "choices": ["d", "def"], "answer": 1},
    {"context": "To be or not to be, that is the", "choices": [" question", " answer", " ñ"], "answer": 0},
] + [  # equal-length choices: the pick depends on the model, not on the length
    {"context": ctx, "choices": ["abc", "xyz", "qrs", "klm"], "answer": i % 4}
    for i, ctx in enumerate(["Pick: ", "Another one ", "and so on", "1 2 3 ", "zz"])
]


def torch_choice_logprobs(ref, tok, items, drop_layer=None):
    """Sum of log p(choice tokens | BOS + context) per choice; one right-padded causal batch (no mask needed)."""
    rows, spans = [], []
    for it in items:
        ctx = [tok.bos_token_id] + tok.encode(it["context"])
        for c in it["choices"]:
            rows.append(ctx + tok.encode(c))
            spans.append((len(ctx), len(rows[-1])))
    ids = torch.zeros((len(rows), max(map(len, rows))), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, :len(row)] = torch.tensor(row)
    layers = ref.model.layers
    try:
        if drop_layer is not None:
            ref.model.layers = torch.nn.ModuleList([m for i, m in enumerate(layers) if i != drop_layer])
        with torch.no_grad():
            logp = torch.log_softmax(ref(ids, use_cache=False).logits.double(), -1)
    finally:
        ref.model.layers = layers
    lps = [sum(float(logp[r, p - 1, ids[r, p]]) for p in range(a, b)) for r, (a, b) in enumerate(spans)]
    out, k = [], 0
    for it in items:
        out.append(np.asarray(lps[k:k + len(it["choices"])]))
        k += len(it["choices"])
    return out


def expected_scores(items, lps):
    acc = np.mean([np.argmax(lp) == it["answer"] for it, lp in zip(items, lps)])
    norm = np.mean([np.argmax(char_norm(it, lp)) == it["answer"] for it, lp in zip(items, lps)])
    return acc, norm


@pytest.fixture(scope="module")
def torch_lps(tiny):
    """Per item, torch's choice log-likelihoods for the full model and with layer 1 removed."""
    ref = tiny[1]
    return torch_choice_logprobs(ref, CharTokenizer(), ITEMS), torch_choice_logprobs(ref, CharTokenizer(), ITEMS, 1)


def char_norm(it, lp):
    """lm-evaluation-harness's acc_norm: log-likelihood / len(choice) in characters."""
    return lp / np.asarray([len(c) for c in it["choices"]])


def byte_norm(it, lp):
    return lp / np.asarray([len(c.encode("utf-8")) for c in it["choices"]])


def test_multiple_choice_matches_torch(tiny, torch_lps):
    _, _, params, cfg = tiny
    full, drop = torch_lps
    # answers = torch's picks (full model / layer 1 removed); torch's length-normalised picks; the given ones
    pred = [dict(it, answer=int(np.argmax(lp))) for it, lp in zip(ITEMS, full)]
    pred_drop = [dict(it, answer=int(np.argmax(lp))) for it, lp in zip(ITEMS, drop)]
    pred_norm = [dict(it, answer=int(np.argmax(char_norm(it, lp)))) for it, lp in zip(ITEMS, full)]
    assert [it["answer"] for it in pred] != [it["answer"] for it in pred_norm]  # acc_norm is not acc here
    assert [it["answer"] for it in pred] != [it["answer"] for it in pred_drop]  # the gate matters here

    gates = np.ones((2, cfg.num_hidden_layers), np.float32)
    gates[1, 1] = 0
    res = multiple_choice(params, cfg, CharTokenizer(), pred_drop, gate_sets=gates, batch_size=64)  # 1 padded batch
    assert len(res) == 2 and res[0]["n"] == res[1]["n"] == len(ITEMS)
    assert res[1]["acc"] == 1.0 and res[1]["acc_norm"] == pytest.approx(expected_scores(pred_drop, drop)[1])
    assert res[0]["acc"] == pytest.approx(expected_scores(pred_drop, full)[0]) and res[0]["acc"] < 1
    assert res[0]["acc_norm"] == pytest.approx(expected_scores(pred_drop, full)[1])

    items = pred + pred_norm + ITEMS
    (res,) = multiple_choice(params, cfg, CharTokenizer(), items, batch_size=7)  # padded last batch
    acc, norm = expected_scores(items, full * 3)
    assert res["n"] == len(items) and res["acc"] == pytest.approx(acc) and res["acc_norm"] == pytest.approx(norm)
    n = len(ITEMS)
    assert res["acc"] >= n / len(items) and res["acc_norm"] >= n / len(items)


def test_choice_logprobs_equal_torch(tiny):
    """make_choice_fn's per-row sums of log p(choice tokens | context) equal transformers' (float64 re-derivation)."""
    _, ref, params, cfg = tiny
    tok = CharTokenizer()
    want = np.concatenate(torch_choice_logprobs(ref, tok, ITEMS))
    rows, spans = [], []
    for it in ITEMS:
        ctx = [tok.bos_token_id] + tok.encode(it["context"])
        for c in it["choices"]:
            rows.append(ctx + tok.encode(c))
            spans.append(len(ctx))
    ids = np.zeros((len(rows), 48), np.int32)
    mask, tmask = np.zeros(ids.shape, np.float32), np.zeros(ids.shape, np.float32)
    for r, (row, start) in enumerate(zip(rows, spans)):
        ids[r, :len(row)], mask[r, :len(row)], tmask[r, start:len(row)] = row, 1, 1
    got = jax.jit(make_choice_fn(cfg, chunk_size=16))(params, ids, mask, tmask, np.ones(cfg.num_hidden_layers, np.float32))
    np.testing.assert_allclose(np.asarray(got), want, rtol=REL)


NON_ASCII = [{"context": ctx, "choices": ["éèê", "abcd", "klmn", "pqrs", "wxyz"], "answer": 0}
             for ctx in ["Pick one: ", "Which? ", "a b c ", "The answer is ", "Q: ", "zzz ", "Hm, ", "ok "]]


def test_acc_norm_divides_by_characters_not_bytes(tiny):
    """Non-ASCII choices (2 UTF-8 bytes per character): the character rule and the byte rule pick
    differently on some items; acc_norm follows lm-evaluation-harness's len(choice)."""
    _, ref, params, cfg = tiny
    lps = torch_choice_logprobs(ref, CharTokenizer(), NON_ASCII)
    items = [dict(it, answer=int(np.argmax(char_norm(it, lp)))) for it, lp in zip(NON_ASCII, lps)]
    by_bytes = [int(np.argmax(byte_norm(it, lp))) for it, lp in zip(NON_ASCII, lps)]
    differ = sum(it["answer"] != b for it, b in zip(items, by_bytes))
    assert differ >= 2  # the two rules rank differently here, so the byte rule would score < 1
    (res,) = multiple_choice(params, cfg, CharTokenizer(), items, batch_size=8)
    assert res["acc_norm"] == 1.0
    assert res["acc"] == pytest.approx(expected_scores(items, lps)[0])


# ---------------------------------------------------------------------------- next-line task
TEXT = "\n".join(f"This is line number {i:02d} of the held-out text." for i in range(30))
DOCS = [("a.txt", TEXT), ("b.txt", "short\n" * 50), ("c.txt", TEXT.replace("line", "row"))]


def test_next_line_task():
    items = next_line_task(DOCS, n_items=20, seed=3)
    assert items == next_line_task(DOCS, n_items=20, seed=3)
    assert items != next_line_task(DOCS, n_items=20, seed=4)
    used = set()
    for it in items:
        assert len(it["choices"]) == 4 and len(set(it["choices"])) == 4
        ctx = it["context"].rstrip("\n").split("\n")
        assert len(ctx) == 4
        doc = next(t for _, t in DOCS if ctx[0] in t.splitlines())
        used.add(doc)
        lines = doc.splitlines()
        k = lines.index(ctx[-1])
        assert lines[k - 3:k + 1] == ctx
        assert it["choices"][it["answer"]] == lines[k + 1]  # the true next line
        assert all(c in lines for c in it["choices"])  # distractors from the same text
    assert len({it["answer"] for it in items}) > 1  # the answer position is shuffled
    assert len(used) == 2  # both long documents are drawn from, never the short-line one


def test_next_line_task_too_short():
    with pytest.raises(DataError, match="too few long lines"):
        next_line_task([("s.txt", "tiny\nlines\n")], n_items=3)
    with pytest.raises(DataError, match="too few long lines"):
        next_line_task([("s.txt", "\n".join(TEXT.splitlines()[:8]))], n_items=3)  # 8 <= 4 + 4


# ---------------------------------------------------------------------------- load_task
def test_load_task(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join(json.dumps(it) for it in ITEMS) + "\n\n")
    assert load_task(p) == ITEMS


@pytest.mark.parametrize("bad", [
    {"context": "c", "choices": ["a", "b"], "answer": 2},
    {"context": "c", "choices": ["a", "b"], "answer": -1},
    {"context": "c", "choices": ["a", "b"]},
])
def test_load_task_bad_item(tmp_path, bad):
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps(ITEMS[0]) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=r"t\.jsonl:2: .*valid integer answer index"):
        load_task(p)


def test_load_task_empty(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text("\n  \n")
    with pytest.raises(DataError, match="holds no task items"):
        load_task(p)


def test_task_lines_rejected_with_line_numbers(tmp_path):
    from minitron_jax.core.errors import DataError
    from minitron_jax.eval.evaluate import load_task
    for bad in ('{"context": "a", "choices": ["x", ""], "answer": 0}', '{"context": "a", "choices": ["x"], "answer": "0"}',
                "[1, 2]", "{not json"):
        p = tmp_path / "t.jsonl"
        p.write_text('{"context": "a", "choices": ["x", "y"], "answer": 1}\n' + bad + "\n")
        with pytest.raises(DataError, match=r"t\.jsonl:2"):
            load_task(p)


def test_next_line_choices_are_distinct_even_with_repeated_lines():
    from minitron_jax.eval.evaluate import next_line_task
    lines = ["the first long line of this text", "the second long line of this text"] * 6
    lines += ["a third different long line here", "and a fourth different long line"]
    for item in next_line_task([("doc", "\n".join(lines))], 20, seed=0):
        assert len(set(item["choices"])) == 4


@pytest.mark.parametrize("shape,batch", [((2, 2, 2), 4), ((1, 8, 1), 8), ((8, 1, 1), 8)])
def test_evaluate_model_on_mesh_equals_torch(tiny, torch_lps, shape, batch):
    """`evaluate_model(mesh=...)` (what `minitron eval --mesh` and the evaluate stage run): the LM loss and the
    multiple-choice picks on a mesh whose data x fsdp devices split the batch equal transformers' and one
    device's (fp32, 1e-5), with chunked attention too; 6 rows and 37 choices in batches of 8 leave the only (or
    last) batch short: padded with masked rows to the full batch, which splits like the others."""
    path, ref, params, cfg = tiny
    mesh = make_mesh(*shape)
    model = mj.from_pretrained(path, mesh=mesh)
    full, _ = torch_lps
    items = [dict(it, answer=int(np.argmax(lp))) for it, lp in zip(ITEMS, full)]  # torch's picks: acc must be 1
    x = samples(n=6, seed=5)
    one = evaluate_model(params, cfg, CharTokenizer(), x, items, batch_size=batch)
    for attention in ("xla", "chunked"):
        r = evaluate_model(model.params(), model.config, CharTokenizer(), x, items, batch_size=batch, mesh=mesh,
                           attention=attention)
        assert r["loss"] == pytest.approx(torch_loss(ref, x), rel=REL) and r["acc"] == 1.0
        assert r["loss"] == pytest.approx(one["loss"], rel=REL) and (r["acc"], r["acc_norm"]) == (one["acc"],
                                                                                              one["acc_norm"])
    lp = multiple_choice(model.params(), model.config, CharTokenizer(), items, batch_size=batch, mesh=mesh)
    assert lp == multiple_choice(params, cfg, CharTokenizer(), items, batch_size=batch)
    np.testing.assert_allclose(row_losses(model.params(), model.config, x, batch_size=batch, mesh=mesh)[0],
                               row_losses(params, cfg, x, batch_size=batch)[0], rtol=REL)


@pytest.mark.parametrize("shape,batch,sizes", [((1, 8, 1), 12, "8 or 16"), ((8, 1, 1), 4, "8"),
                                               ((2, 2, 2), 6, "4 or 8")])
def test_evaluation_refuses_a_batch_that_does_not_split(tiny, shape, batch, sizes):
    """A batch that the mesh's data x fsdp devices do not divide would be replicated (every device computing
    every row, the activation memory of the whole batch on each): every evaluation refuses it before any
    forward (`minitron eval` before the weights load: run/test_cli.py)."""
    _, _, params, cfg = tiny
    mesh, rows = make_mesh(*shape), shape[0] * shape[1]
    msg = (rf"^batch_size={batch} does not split over the mesh's data x fsdp = {rows} devices \(its rows would be "
           rf"replicated, not split\); give a multiple of {rows}, e.g. {sizes}$")
    x = samples(n=6, seed=5)
    calls = [lambda: evaluate_model(params, cfg, CharTokenizer(), x, ITEMS, batch_size=batch, mesh=mesh),
             lambda: lm_loss(params, cfg, x, batch_size=batch, mesh=mesh),
             lambda: row_losses(params, cfg, x, batch_size=batch, mesh=mesh),
             lambda: gated_losses(params, cfg, x, np.ones((2, cfg.num_hidden_layers)), batch_size=batch, mesh=mesh),
             lambda: multiple_choice(params, cfg, CharTokenizer(), ITEMS, batch_size=batch, mesh=mesh)]
    for call in calls:
        with pytest.raises(DataError, match=msg):
            call()


def test_eval_set_holds_out_what_training_holds_out(tmp_path):
    """`eval_set` (minitron eval and the evaluate stage): held-out documents chosen as `build_corpus` chooses
    them for training (names, or the same seeded fraction), rows the first of their packed rows, next-line
    items only from held-out text; without a split every document is evaluated."""
    from minitron_jax.data.loader import build_corpus
    from minitron_jax.data.text import read_documents, split_documents
    from minitron_jax.eval.evaluate import eval_set

    data = tmp_path / "docs"
    data.mkdir()
    rng = np.random.default_rng(0)
    for d in range(6):  # distinct vocabularies: each line reveals its document
        words = [f"w{d}x{i}" for i in range(40)]
        (data / f"doc{d}.txt").write_text("\n".join(" ".join(rng.choice(words, 8)) for _ in range(60)) + "\n")
    class BatchTokenizer(CharTokenizer):  # also takes a list of texts, as build_corpus tokenizes
        def __call__(self, text, add_special_tokens=False):
            if isinstance(text, list):
                return {"input_ids": [self.encode(t) for t in text]}
            return super().__call__(text, add_special_tokens)
    tok = BatchTokenizer()
    docs = read_documents(data)
    for split in ({"holdout": ["doc3", "doc5"]}, {"holdout_fraction": 0.34, "seed": 7, "split_seed": 2}, {}):
        rows, items = eval_set(data, tok, seq_len=32, samples=5, task_items=12, **split)
        train, held = build_corpus(data, tok, 32, **split)
        if held is None:  # every document, in the seeded order held-out rows use (training rows keep theirs)
            from minitron_jax.data.text import pack, tokenize_documents
            held = type(train)(pack(tokenize_documents(docs, tok), 32, None, seed=0))
        np.testing.assert_array_equal(rows, held.tokens[:5])
        held_docs = (split_documents(docs, split.get("holdout", ()), split.get("holdout_fraction", 0.0),
                                     split.get("split_seed", 0))[1] if split else docs)
        assert held_docs and len(held_docs) < len(docs) or not split
        held_text = "".join(t for _, t in held_docs)
        assert all(c in held_text for it in items for c in it["choices"] + [it["context"]])
    with pytest.raises(DataError, match="fewer than the 10000 asked for"):
        eval_set(data, tok, seq_len=32, samples=10_000, holdout=["doc3"])


# ---------------------------------------------------------------------------- ids beyond the vocabulary, NaN losses
def test_forward_paths_refuse_ids_beyond_the_vocabulary(tiny_pair):
    """Even rows built without vocab_size never reach the model: the embedding gather gives NaN, not an error."""
    m = mj.from_pretrained(tiny_pair[0])
    rows = np.random.RandomState(0).randint(0, 128, (4, 16)).astype(np.int32)
    assert np.isfinite(lm_loss(m.params(), m.config, rows, batch_size=2))
    rows[2, 5] = 128
    with pytest.raises(DataError, match=r"evaluation rows: the largest token id 128 .*vocab_size=128"):
        lm_loss(m.params(), m.config, rows, batch_size=2)
    with pytest.raises(DataError, match=r"calibration rows: the largest token id 128 .*vocab_size=128"):
        compute_scores(m.params(), m.config, rows, batch_size=2)
    items = [{"context": "ab", "choices": ["c", "d"], "answer": 0}, {"context": "ab", "choices": ["c", "\x7f"], "answer": 0}]
    with pytest.raises(DataError, match=r"task item 1: the largest token id 130 .*vocab_size=128"):  # chr(127) -> 130
        multiple_choice(m.params(), m.config, CodePointTokenizer(), items, batch_size=2)


def test_eval_refuses_non_finite_loss_and_logprobs(tiny_pair):
    bad = nan_model(tiny_pair[0])
    rows = np.random.RandomState(0).randint(0, 128, (4, 16)).astype(np.int32)
    with pytest.raises(EvalError, match=r"the LM loss on 4 rows of 16 tokens is nan; check the model's weights"):
        lm_loss(bad.params(), bad.config, rows, batch_size=2)
    items = [{"context": "ab", "choices": ["c", "d"], "answer": 0}]
    with pytest.raises(EvalError, match=r"log-probability of a choice of task item 0 is nan"):
        multiple_choice(bad.params(), bad.config, CodePointTokenizer(), items, batch_size=2)
    assert isinstance(EvalError("x"), DataError)  # cli.main turns it into a one-line exit


# ---------------------------------------------------------------------------- the evaluation set from a token store
def test_eval_set_from_a_store_equals_eval_set_from_its_text(corpus, store, tokenizer):
    """`minitron eval` / the evaluate stage give the same rows and next-line items from the store as from the
    text it was tokenized from (held-out documents by name, or every document)."""
    from minitron_jax.eval.evaluate import eval_set
    for kw in ({"holdout": "doc03,doc1"}, {}):
        rows, items = eval_set(corpus, tokenizer, seq_len=S, samples=12, task_items=20, seed=2, **kw)
        s_rows, s_items = eval_set(str(store), tokenizer, seq_len=S, samples=12, task_items=20, seed=2, **kw)
        np.testing.assert_array_equal(s_rows, rows)
        assert s_items == items
