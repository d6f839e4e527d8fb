"""Knowledge-distillation losses, computed so that no model's full [B, S, V] logits ever exist.

Conventions (spec section 5, as in NeMo / Minitron): the logit loss is the forward
KL(teacher || student) = sum_v p_t (log p_t - log p_s), p = softmax(z / T), summed over the
vocabulary and averaged over real target tokens (sum of `mask`), without a T^2 factor. Teacher inputs are wrapped in `stop_gradient`. Everything is reduced in fp32.

Memory and speed: the per-position inputs are cut along the sequence into chunks of `chunk_size`
positions (the last one padded with mask 0) and scanned; each chunk computes both models' logits
for its positions (hidden @ head.T, fp32 accumulation) and reduces them to sums at once. Under
differentiation a `custom_vjp` computes each chunk's logit gradient in the same pass (logits are
built once, never stored or recomputed) and accumulates the head gradient as [H, V], transposed
once at the end: the extra memory is a few [B, chunk, V] fp32 arrays plus one head-sized buffer,
whatever S is. (Forward-mode autodiff through these losses is not supported.)

top_k > 0 keeps the teacher's k largest logits per position and renormalises the teacher
distribution over them (p_t^k = softmax of those k logits / T); the student side stays the
*full-vocabulary* log-softmax read at those k indices, so KL = sum_k p_t^k (log p_t^k - log p_s).
The student is thus still pushed down on tokens outside the teacher's top k (its mass there
lowers every log p_s), and top_k = V reproduces the full KL exactly.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class KDConfig:
    temperature: float = 1.0
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    top_k: int = 0             # 0 = full vocabulary
    chunk_size: int = 256      # sequence positions per chunk
    hidden_weight: float = 0.0  # 0 = off; multiplier on the dynamically weighted hidden loss

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature > 0):
            raise ValueError(f"KDConfig.temperature must be a finite number > 0, got {self.temperature!r}")
        for name in ("kl_weight", "ce_weight", "hidden_weight"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"KDConfig.{name} must be a finite number >= 0, got {v!r}")
        if self.kl_weight == 0 and self.ce_weight == 0:
            raise ValueError("KDConfig: kl_weight and ce_weight are both 0, so the loss would be constant")
        for name, lo in (("top_k", 0), ("chunk_size", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"KDConfig.{name} must be an int >= {lo}, got {v!r}")


# ---------------------------------------------------------------------------- per-position pieces
def _logits(hidden, head):
    """[B, C, H] @ [V, H].T -> fp32 [B, C, V] (bf16 x bf16 products are exact in fp32)."""
    dt = jnp.promote_types(hidden.dtype, head.dtype)
    return jnp.einsum("bch,vh->bcv", hidden.astype(dt), head.astype(dt), preferred_element_type=F32)


def _kl_rows(zs, zt, temperature: float, top_k: int = 0):
    """Forward KL(teacher || student) per position from fp32 logits [..., V] -> [...]."""
    ls = jax.nn.log_softmax(zs / temperature, axis=-1)
    if top_k:
        vals, idx = jax.lax.top_k(zt / temperature, top_k)
        return _kl_topk_rows(ls, vals, idx)
    lt = jax.nn.log_softmax(zt / temperature, axis=-1)
    return jnp.sum(jnp.exp(lt) * (lt - ls), axis=-1)


def _kl_topk_rows(ls, vals, idx):
    """Top-k forward KL per position: the teacher's k (tempered) logits `vals` renormalised, against the
    student's full-vocabulary log-probabilities `ls` read at their ids `idx`."""
    lt = jax.nn.log_softmax(vals, axis=-1)
    return jnp.sum(jnp.exp(lt) * (lt - jnp.take_along_axis(ls, idx, axis=-1)), axis=-1)


def _ce_rows(logits, targets):
    """logsumexp(z) - z[target] per position; out-of-range targets (e.g. -100 on masked positions)
    are clipped (their mask is 0). Reductions only: no [.., V] log-softmax buffer."""
    t = jnp.clip(targets, 0, logits.shape[-1] - 1).astype(jnp.int32)
    return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]


def _weighted(kl, ce, cfg: KDConfig):
    """kl_weight x KL + ce_weight x CE; a term with weight 0 is only logged: no backward work for it."""
    terms = ([cfg.kl_weight * kl] if cfg.kl_weight else []) + ([cfg.ce_weight * ce] if cfg.ce_weight else [])
    return sum(terms[1:], terms[0])


def _split(x, n: int, c: int):
    """[B, S, ...] -> [n, B, c, ...], padded with zeros (mask 0)."""
    s = x.shape[1]
    if n * c != s:
        x = jnp.pad(x, [(0, 0), (0, n * c - s)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(x.shape[0], n, c, *x.shape[2:]), 1, 0)


def _fused_chunked(body, head, hidden, consts, per_pos, chunk_size: int):
    """`_fused_local` per device when a mesh splits the batch: each device scans its own rows' chunks
    against the whole head (gathered once per call, not once per chunk) and keeps its head gradient as
    a local sum over the chunks, reduced over the batch axes once per call by shard_map's transpose.
    Without it, XLA all-reduces the whole fp32 head gradient (and re-gathers the heads) in every chunk:
    16 times per micro-batch at 8192 tokens and chunk_size 512. Same sums; the cost is one local
    fp32 head-gradient buffer. Without a mesh (or when the rows do not divide the batch axes) it is
    `_fused_local` itself."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = () if mesh.empty else tuple(a for a in ("data", "fsdp") if a in mesh.shape and mesh.shape[a] > 1)
    if not axes or hidden.shape[0] % math.prod(mesh.shape[a] for a in axes):
        return _fused_local(body, head, hidden, consts, per_pos, chunk_size)
    rows = P(axes)

    def local(head, hidden, consts, per_pos):
        obj, logged = _fused_local(body, head, hidden, consts, per_pos, chunk_size)
        return obj[None], tuple(v[None] for v in logged)

    obj, logged = jax.shard_map(local, mesh=mesh, in_specs=(P(), rows, P(), tuple(rows for _ in per_pos)),
                                out_specs=(rows, rows), axis_names=set(axes), check_vma=False)(
        head, hidden, consts, tuple(per_pos))
    return jnp.sum(obj), tuple(jnp.sum(v) for v in logged)


def _fused_local(body, head, hidden, consts, per_pos, chunk_size: int):
    """`body(logits_chunk, consts, *chunks) -> (objective, logged)` (scalars), where logits_chunk =
    hidden_chunk @ head.T in fp32, summed over sequence chunks of `hidden` [B, S, H] and the
    [B, S, ...] arrays `per_pos`.

    Differentiable in `head` and `hidden` through `objective` only (`consts`, `per_pos` and the
    logged sums get no gradient). Under differentiation the forward pass computes each chunk's
    gradient at once (logits computed once, never stored, never recomputed): the residuals are one
    head-sized and one hidden-sized array, and the backward pass only scales them. The head
    gradient accumulates as [H, V] (hidden_chunk.T @ dlogits: the small operand is the transposed
    one) and is transposed once at the end."""
    s = hidden.shape[1]
    c = max(1, min(chunk_size, s))
    n = -(-s // c)

    def run(head, hidden, consts, per_pos, grads: bool):
        xs = (_split(hidden, n, c), tuple(_split(x, n, c) for x in per_pos))
        if not grads:
            objs, logged = jax.lax.map(lambda x: body(_logits(x[0], head), consts, *x[1]), xs)
            return jnp.sum(objs), tuple(jnp.sum(v) for v in logged)

        dt = jnp.promote_types(hidden.dtype, head.dtype)

        def chunk(g_head_t, x):
            h = x[0].astype(dt)
            (obj, logged), gz = jax.value_and_grad(body, has_aux=True)(_logits(h, head), consts, *x[1])
            gz = gz.astype(dt)
            gh = jnp.einsum("bcv,vh->bch", gz, head.astype(dt), preferred_element_type=F32)
            g_head_t = g_head_t + jnp.einsum("bch,bcv->hv", h, gz, preferred_element_type=F32)
            return g_head_t, (obj, logged, gh.astype(hidden.dtype))

        g_head_t, (objs, logged, gh) = jax.lax.scan(chunk, jnp.zeros(head.shape[::-1], F32), xs)
        gh = jnp.moveaxis(gh, 0, 1).reshape(hidden.shape[0], n * c, *hidden.shape[2:])[:, :s]
        return (jnp.sum(objs), tuple(jnp.sum(v) for v in logged)), (g_head_t.T.astype(head.dtype), gh)

    @jax.custom_vjp
    def fused(head, hidden, consts, per_pos):
        return run(head, hidden, consts, per_pos, False)

    def bwd(grads, ct):  # the logged sums' cotangents are ignored (they are returned stop_gradient-ed)
        return tuple((ct[0] * g).astype(g.dtype) for g in grads) + (None, None)

    fused.defvjp(lambda *args: run(*args, True), bwd)
    obj, logged = fused(head, hidden, consts, tuple(per_pos))
    return obj, jax.lax.stop_gradient(logged)


def _token_count(mask, normalizer=None):
    """(real tokens, the divisor of the sums): `normalizer` if given (e.g. a whole step's token count,
    so that micro-batch results add up to the step's token mean), else the tokens (1 when there are none)."""
    tokens = jnp.sum(mask)
    if normalizer is not None:
        return tokens, jnp.asarray(normalizer, F32)
    return tokens, jnp.where(tokens > 0, tokens, 1.0)


def _check(hidden, head, targets, mask, who: str):
    if hidden.ndim != 3 or head.ndim != 2 or hidden.shape[-1] != head.shape[-1]:
        raise ValueError(f"{who}: hidden {hidden.shape} must be [B, S, H] and head {head.shape} [V, H]")
    if targets.shape != hidden.shape[:2] or mask.shape != hidden.shape[:2]:
        raise ValueError(f"{who}: targets {targets.shape} and mask {mask.shape} must be [B, S] = "
                         f"{hidden.shape[:2]}")


# ---------------------------------------------------------------------------- public losses
def kd_loss(student_hidden, teacher_hidden, student_head, teacher_head, targets, mask, cfg: KDConfig,
            normalizer=None):
    """Chunked distillation loss from final-norm hidden states and [V, H] output matrices.

    loss = kl_weight * KL + ce_weight * CE(student, targets at T = 1).
    Returns `(loss, {"loss", "kl", "ce", "tokens"})`; `kl` is unscaled, `ce` is always computed. The
    per-token sums are divided by `normalizer` if given (a gradient-accumulation step passes its global
    token count, so micro-batch results add up), else by this batch's real tokens.
    """
    _check(student_hidden, student_head, targets, mask, "kd_loss (student)")
    _check(teacher_hidden, teacher_head, targets, mask, "kd_loss (teacher)")
    if student_head.shape[0] != teacher_head.shape[0]:
        raise ValueError(f"kd_loss: vocabularies differ: student {student_head.shape[0]}, "
                         f"teacher {teacher_head.shape[0]}")
    if cfg.top_k > student_head.shape[0]:
        raise ValueError(f"kd_loss: top_k={cfg.top_k} exceeds the vocabulary ({student_head.shape[0]})")
    teacher_hidden, teacher_head = jax.lax.stop_gradient((teacher_hidden, teacher_head))
    mask = mask.astype(F32)
    t = float(cfg.temperature)

    def body(zs, wt, ht, tgt, m):
        zt = _logits(ht, wt)
        kl = jnp.sum(_kl_rows(zs, zt, t, cfg.top_k) * m)
        ce = jnp.sum(_ce_rows(zs, tgt) * m)
        return _weighted(kl, ce, cfg), (kl, ce)

    obj, (kl_sum, ce_sum) = _fused_chunked(body, student_head, student_hidden, teacher_head,
                                           (teacher_hidden, targets, mask), cfg.chunk_size)
    tokens, denom = _token_count(mask, normalizer)
    kl, ce = kl_sum / denom, ce_sum / denom
    loss = obj / denom
    return loss, {"loss": loss, "kl": kl, "ce": ce, "tokens": tokens}


def kd_loss_stored(student_hidden, student_head, values, indices, targets, mask, cfg: KDConfig, normalizer=None):
    """`kd_loss` against stored teacher top-k logits (`run/teacher_pass.py`): `values` [B, S, k] (any float
    dtype; the teacher's raw logits, descending) and their vocabulary ids `indices` [B, S, k]. The KL is
    the top-k one of `kd_loss(top_k=k)` (the same function of the same numbers: from float32 values it
    equals the online top-k loss); CE as in `kd_loss`. Same return value."""
    _check(student_hidden, student_head, targets, mask, "kd_loss_stored")
    if values.shape != indices.shape or values.shape[:2] != targets.shape:
        raise ValueError(f"kd_loss_stored: values {values.shape} and indices {indices.shape} must be [B, S, k] with "
                         f"[B, S] = {targets.shape}")
    mask = mask.astype(F32)
    t = float(cfg.temperature)

    def body(zs, _, vals, idx, tgt, m):
        ls = jax.nn.log_softmax(zs / t, axis=-1)
        kl = jnp.sum(_kl_topk_rows(ls, vals.astype(F32) / t, idx) * m)
        ce = jnp.sum(_ce_rows(zs, tgt) * m)
        return _weighted(kl, ce, cfg), (kl, ce)

    values, indices = jax.lax.stop_gradient((values, indices.astype(jnp.int32)))
    obj, (kl_sum, ce_sum) = _fused_chunked(body, student_head, student_hidden, jnp.zeros((), F32),
                                           (values, indices, targets, mask), cfg.chunk_size)
    tokens, denom = _token_count(mask, normalizer)
    loss = obj / denom
    return loss, {"loss": loss, "kl": kl_sum / denom, "ce": ce_sum / denom, "tokens": tokens}


def kl_divergence_logits(student_logits, teacher_logits, mask, temperature: float = 1.0, top_k: int = 0):
    """Unchunked reference: forward KL on full logits [B, S, V], masked mean over tokens."""
    zt = jax.lax.stop_gradient(teacher_logits).astype(F32)
    m = mask.astype(F32)
    kl = _kl_rows(student_logits.astype(F32), zt, float(temperature), top_k)
    return jnp.sum(kl * m) / _token_count(m)[1]


def lm_loss_from_hidden(hidden, head, targets, mask, chunk_size: int = 256, normalizer=None):
    """Chunked next-token cross-entropy (teacher correction, LM fine-tuning), mean over real tokens
    (the sum divided by `normalizer` if given, as in `kd_loss`)."""
    _check(hidden, head, targets, mask, "lm_loss_from_hidden")
    mask = mask.astype(F32)

    def body(z, _, tgt, m):
        return jnp.sum(_ce_rows(z, tgt) * m), ()

    ce_sum, _ = _fused_chunked(body, head, hidden, (), (targets, mask), chunk_size)
    return ce_sum / _token_count(mask, normalizer)[1]


def hidden_cosine_loss(student_states, teacher_states, proj, mask, eps: float = 1e-8, normalizer=None):
    """Mean over K layers and real tokens of 1 - cos(student @ proj, teacher) (the sum divided by
    K x `normalizer` if given, as in `kd_loss`).

    student_states [K, B, S, Hs], teacher_states [K, B, S, Ht], proj [Hs, Ht] (one shared learned
    map), mask [B, S]."""
    if student_states.shape[:3] != teacher_states.shape[:3] or proj.shape != (
            student_states.shape[-1], teacher_states.shape[-1]):
        raise ValueError(f"hidden_cosine_loss: student {student_states.shape}, teacher "
                         f"{teacher_states.shape} and proj {proj.shape} do not fit "
                         "[K,B,S,Hs], [K,B,S,Ht], [Hs,Ht]")
    sp = jnp.einsum("kbsh,ht->kbst", student_states.astype(F32), proj.astype(F32))
    tt = jax.lax.stop_gradient(teacher_states).astype(F32)
    norms = (jnp.maximum(jnp.linalg.norm(sp, axis=-1), eps) * jnp.maximum(jnp.linalg.norm(tt, axis=-1), eps))
    cos = jnp.sum(sp * tt, axis=-1) / norms
    m = mask.astype(F32)
    return jnp.sum((1.0 - cos) * m) / (student_states.shape[0] * _token_count(m, normalizer)[1])


def dynamic_hidden_weight(logit_loss, hidden_loss, eps: float = 1e-8):
    """Weight that brings the intermediate loss to the logit loss's magnitude (no gradient)."""
    return jax.lax.stop_gradient(logit_loss / jnp.maximum(hidden_loss, eps))


def add_hidden_loss(logit_loss, hidden_loss, cfg: KDConfig):
    """logit_loss + hidden_weight * dynamic_weight * hidden_loss (logit_loss alone when off)."""
    if not cfg.hidden_weight:
        return logit_loss
    return logit_loss + cfg.hidden_weight * dynamic_hidden_weight(logit_loss, hidden_loss) * hidden_loss


# ---------------------------------------------------------------------------- targets; per-row log-likelihood
def next_token_targets(ids, mask, seg=None):
    """Targets shifted left by one, and the mask of positions whose target is real and in the same document."""
    targets = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)
    tmask = mask * jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
    if seg is not None:  # no target across a packed-document boundary
        tmask = tmask * jnp.concatenate([(seg[:, 1:] == seg[:, :-1]), jnp.zeros_like(seg[:, :1], bool)], 1)
    return targets, tmask


def token_logprob_sums(hidden, head, targets, mask, chunk_size: int = 256):
    """Per-row sums over `mask` of log p(target) [B] (multiple-choice scoring), chunked like
    `lm_loss_from_hidden`: each row runs the same chunked pass, so no [B, S, V] logits exist."""
    _check(hidden, head, targets, mask, "token_logprob_sums")

    def body(z, _, tgt, m):
        return -jnp.sum(_ce_rows(z, tgt) * m), ()

    def row(h, t, m):
        return _fused_chunked(body, head, h[None], (), (t[None], m[None].astype(F32)), chunk_size)[0]

    return jax.vmap(row)(hidden, targets, mask)


def token_logprob_greedy(hidden, head, targets, mask, chunk_size: int = 256):
    """(per-row sums over `mask` of log p(target) [B], per-row counts of the masked positions whose most likely
    token (first argmax) is not the target [B]): lm-evaluation-harness's (loglikelihood, is_greedy = count 0),
    chunked like `token_logprob_sums` (no [B, S, V] logits)."""
    _check(hidden, head, targets, mask, "token_logprob_greedy")

    def body(z, _, tgt, m):
        return -jnp.sum(_ce_rows(z, tgt) * m), (jnp.sum((jnp.argmax(z, axis=-1) != tgt) * m),)

    def row(h, t, m):
        obj, (misses,) = _fused_chunked(body, head, h[None], (), (t[None], m[None].astype(F32)), chunk_size)
        return obj, misses

    return jax.vmap(row)(hidden, targets, mask)
