"""Causal self-attention for `model.forward`, in four implementations behind one call, `attend`.

q [B, S, Hq, D], k / v [B, S, Hkv, D] (GQA: Hq a multiple of Hkv), causal, with padding
(`attention_mask` [B, S], left padding included) and packed documents (`segment_ids` [B, S]):
- "xla": `jax.nn.dot_product_attention` with the boolean [B, 1, S, S] mask of
  `attention_mask_4d`: the reference, and exactly the computation the model always ran. It
  materialises S x S scores and probabilities.
- "chunked": flash attention in plain XLA, for every backend. Online softmax over key blocks inside a
  loop over query blocks; a `jax.custom_vjp` backward recomputes each block's probabilities from the
  saved log-sum-exp (FlashAttention-2), so neither pass holds more than [B, H, block, block] scores
  and the residuals are only q, k, v, the output and the log-sum-exp. Key blocks above the diagonal
  are skipped (causal: half the FLOPs of xla). K/V are never repeated for GQA: query heads are
  grouped as [Hkv, G] and contracted against their K/V head.
  Why custom_vjp rather than `jax.checkpoint` per block: differentiating an online-softmax scan
  saves its carries (m, l and the [B, H, S, D] accumulator) for every key block, O(S^2 D / block)
  memory, and cannot skip masked blocks; the hand-written backward saves nothing per block.
- "splash": the Pallas TPU kernel (`jax.experimental.pallas.ops.tpu.splash_attention`), under
  `shard_map` when a mesh is set (batch over data+fsdp, heads over tensor), interpret mode off TPU.
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`; untested here (no GPU; nor is
  whether jax#39521, wrong GQA offsets, is fixed in the installed jax). Packed segment ids do not go
  through its public API (jax#25812): with segment ids it falls back to "chunked" with a one-line
  warning.
- "auto": splash on TPU; cudnn on GPU without segment ids (chunked with them); on CPU chunked when
  S >= 2048, else xla.

Query rows with no key to attend to (padding positions: every earlier key is padding) are not
defined by the model. xla gives them the mean of all values; chunked gives 0 with zero gradients;
splash lets padding attend to padding. Real tokens always see themselves, so their outputs and every
gradient of a loss over real tokens agree across implementations.
"""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "splash", "cudnn", "chunked")
CHUNKED_MIN_SEQ = 2048  # "auto" on CPU: chunked from this sequence length on
_NEG = -1e30  # masked logits before the running max (finite: no inf - inf)


def _mask_4d(attention_mask, segment_ids, b: int, s: int) -> jax.Array:

    return attention_mask_4d(attention_mask, segment_ids, b, s)


def platform() -> str:
    """The platform attention is compiled for: the devices of the mesh in context (so that AOT
    compilation for a TPU topology from a CPU host picks the TPU kernels), else JAX's default backend."""
    try:
        from jax._src.mesh import get_concrete_mesh
        cm = get_concrete_mesh()
        if cm is not None and not cm.empty:
            return cm.devices.flat[0].platform
    except Exception:  # private API moved: fall back to the default backend
        pass
    return jax.default_backend()


def resolve(impl: str, seq_len: int, segment_ids=None) -> str:
    """The implementation `impl` stands for on this platform ("auto" resolved; others checked)."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention={impl!r}: choose one of {', '.join(IMPLEMENTATIONS)}")
    if impl != "auto":
        return impl
    plat = platform()
    if plat == "tpu":
        return "splash"
    if plat in ("gpu", "cuda", "rocm") and segment_ids is None:
        return "cudnn"
    return "chunked" if seq_len >= CHUNKED_MIN_SEQ or plat != "cpu" else "xla"


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, attention_mask: jax.Array | None = None,
           segment_ids: jax.Array | None = None, impl: str = "xla", scale: float | None = None,
           block: int | None = None, mask: jax.Array | None = None, interpret: bool | None = None) -> jax.Array:
    """Causal attention [B, S, Hq, D] of q [B, S, Hq, D] over k, v [B, S, Hkv, D].

    `block`: chunked / splash block size (default: chosen from S). `mask`: the precomputed 4-D mask
    of `attention_mask_4d` for "xla" (the model builds it once, outside its layer loop).
    `interpret`: splash's Pallas interpret mode (default: on unless compiling for a TPU)."""
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    if hq % hkv:
        raise ValueError(f"attention: {hq} query heads are not a multiple of {hkv} key/value heads")
    scale = d ** -0.5 if scale is None else float(scale)
    impl = resolve(impl, s, segment_ids)
    if impl == "cudnn" and segment_ids is not None:
        warnings.warn("attention='cudnn' cannot take packed segment ids (jax#25812): using attention='chunked'",
                      stacklevel=2)
        impl = "chunked"
    if impl == "xla":
        if mask is None:
            mask = _mask_4d(attention_mask, segment_ids, b, s)
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)
    if impl == "chunked":
        return chunked_attention(q, k, v, attention_mask=attention_mask, segment_ids=segment_ids, scale=scale,
                                 block=block)
    if impl == "splash":
        return splash_attention(q, k, v, attention_mask=attention_mask, segment_ids=segment_ids, scale=scale,
                                block=block, interpret=interpret)
    return cudnn_attention(q, k, v, attention_mask=attention_mask, scale=scale)


# ---------------------------------------------------------------------------- chunked (flash in XLA)
def chunk_size(s: int, block: int | None = None) -> int:
    """Block for chunked attention: `block` if given, else 512 (XLA:CPU's sweet spot), at most S."""
    return max(1, min(block or 512, s))


def chunked_attention(q, k, v, *, attention_mask=None, segment_ids=None, scale: float, block: int | None = None):
    """Flash attention in XLA (module docstring); S need not divide by the block (padded inside)."""
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    blk = chunk_size(s, block)
    sp = -(-s // blk) * blk  # padded length; padded keys come after every real query, so causality hides them
    kmask = jnp.ones((b, s), bool) if attention_mask is None else attention_mask.astype(bool)
    seg = jnp.zeros((b, s), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    if sp != s:
        pad = [(0, 0), (0, sp - s)]
        q, k, v = (jnp.pad(x, pad + [(0, 0), (0, 0)]) for x in (q, k, v))
        kmask, seg = jnp.pad(kmask, pad), jnp.pad(seg, pad)
    qg = q.reshape(b, sp, hkv, hq // hkv, d)
    out = _flash(qg, k, v, kmask, seg, scale, blk)
    return out.reshape(b, sp, hq, d)[:, :s]


def _block_mask(i, j, blk, kmask, seg):
    """[B, 1, 1, blk_q, blk_k]: causal, real keys, same document, for query block i and key block j."""
    qpos = i * blk + jnp.arange(blk)
    kpos = j * blk + jnp.arange(blk)
    km = jax.lax.dynamic_slice_in_dim(kmask, j * blk, blk, 1)
    sq = jax.lax.dynamic_slice_in_dim(seg, i * blk, blk, 1)
    sk = jax.lax.dynamic_slice_in_dim(seg, j * blk, blk, 1)
    m = (qpos[:, None] >= kpos[None, :])[None] & km[:, None, :] & (sq[:, :, None] == sk[:, None, :])
    return m[:, None, None]


def _slice(x, i, blk):
    return jax.lax.dynamic_slice_in_dim(x, i * blk, blk, 1)


def _scores(qi, kj, scale):
    """[B, Hkv, G, blk_q, blk_k] fp32 logits of q block [B, bq, Hkv, G, D] against k block [B, bk, Hkv, D]."""
    return jnp.einsum("bqhgd,bkhd->bhgqk", qi, kj, preferred_element_type=jnp.float32) * scale


def _flash_forward(q, k, v, kmask, seg, scale, blk):
    """(out [B, S, Hkv, G, D] in q's dtype, lse [B, Hkv, G, S] fp32; +inf on rows with no key)."""
    b, sp, hkv, g, d = q.shape
    nb = sp // blk

    def q_block(i):
        qi = _slice(q, i, blk)

        def k_step(j, carry):
            m, l, acc = carry
            msk = _block_mask(i, j, blk, kmask, seg)
            sc = jnp.where(msk, _scores(qi, _slice(k, j, blk), scale), _NEG)
            m_new = jnp.maximum(m, sc.max(-1))
            p = jnp.where(msk, jnp.exp(sc - m_new[..., None]), 0.0)
            alpha = jnp.exp(m - m_new)
            pv = jnp.einsum("bhgqk,bkhd->bhgqd", p.astype(v.dtype), _slice(v, j, blk),
                            preferred_element_type=jnp.float32)
            return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

        init = (jnp.full((b, hkv, g, blk), _NEG, jnp.float32), jnp.zeros((b, hkv, g, blk), jnp.float32),
                jnp.zeros((b, hkv, g, blk, d), jnp.float32))
        m, l, acc = jax.lax.fori_loop(0, i + 1, k_step, init)  # key blocks on or below the diagonal
        seen = l > 0
        o = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)
        return o.transpose(0, 3, 1, 2, 4).astype(q.dtype), lse

    o, lse = jax.lax.map(q_block, jnp.arange(nb))  # [nb, B, blk, Hkv, G, D], [nb, B, Hkv, G, blk]
    o = o.transpose(1, 0, 2, 3, 4, 5).reshape(b, sp, hkv, g, d)
    lse = lse.transpose(1, 2, 3, 0, 4).reshape(b, hkv, g, sp)
    return o, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _flash(q, k, v, kmask, seg, scale, blk):
    return _flash_forward(q, k, v, kmask, seg, scale, blk)[0]


def _flash_fwd(q, k, v, kmask, seg, scale, blk):
    o, lse = _flash_forward(q, k, v, kmask, seg, scale, blk)
    return o, (q, k, v, kmask, seg, o, lse)


def _flash_bwd(scale, blk, res, do):
    """FlashAttention-2 backward: for each key block j, the query blocks i >= j recompute their
    probabilities from the saved lse; dK_j, dV_j accumulate in the loop, dQ in a full-size carry."""
    q, k, v, kmask, seg, o, lse = res
    b, sp, hkv, g, d = q.shape
    nb = sp // blk
    delta = jnp.einsum("bshgd,bshgd->bhgs", do.astype(jnp.float32), o.astype(jnp.float32))

    def k_block(dq, j):
        kj, vj = _slice(k, j, blk), _slice(v, j, blk)

        def q_step(i, carry):
            dq, dk, dv = carry
            qi, doi = _slice(q, i, blk), _slice(do, i, blk)
            msk = _block_mask(i, j, blk, kmask, seg)
            lse_i = jax.lax.dynamic_slice_in_dim(lse, i * blk, blk, 3)
            delta_i = jax.lax.dynamic_slice_in_dim(delta, i * blk, blk, 3)
            p = jnp.where(msk, jnp.exp(_scores(qi, kj, scale) - lse_i[..., None]), 0.0)
            dv = dv + jnp.einsum("bhgqk,bqhgd->bkhd", p.astype(do.dtype), doi, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bqhgd,bkhd->bhgqk", doi, vj, preferred_element_type=jnp.float32)
            ds = (p * (dp - delta_i[..., None]) * scale)
            dk = dk + jnp.einsum("bhgqk,bqhgd->bkhd", ds.astype(q.dtype), qi, preferred_element_type=jnp.float32)
            dqi = jnp.einsum("bhgqk,bkhd->bqhgd", ds.astype(k.dtype), kj, preferred_element_type=jnp.float32)
            dq = jax.lax.dynamic_update_slice_in_dim(dq, _slice(dq, i, blk) + dqi, i * blk, 1)
            return dq, dk, dv

        zero = jnp.zeros((b, blk, hkv, d), jnp.float32)
        dq, dk, dv = jax.lax.fori_loop(j, nb, q_step, (dq, zero, zero))  # query blocks on or below the diagonal
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(k_block, jnp.zeros(q.shape, jnp.float32), jnp.arange(nb))
    dk = dk.transpose(1, 0, 2, 3, 4).reshape(k.shape)
    dv = dv.transpose(1, 0, 2, 3, 4).reshape(v.shape)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---------------------------------------------------------------------------- splash (TPU)
SPLASH_BLOCKS = (512, 256, 128)


def splash_block(s: int, block: int | None = None) -> int:
    """Splash block size for sequence length S: `block` if given, else the largest of SPLASH_BLOCKS
    dividing S. The kernel needs S a multiple of 128 (its lane width)."""
    if block is not None:
        if block % 128 or s % block:
            raise ValueError(f"attention='splash': block={block} must be a multiple of 128 that divides the "
                             f"sequence length {s}")
        return block
    for blk in SPLASH_BLOCKS:
        if s % blk == 0:
            return blk
    raise ValueError(f"attention='splash' needs the sequence length to be a multiple of 128, got {s}: set "
                     f"seq_len={-(-s // 128) * 128}, or attention='chunked'")


def _splash_specs(mesh, b: int, hq: int, hkv: int):
    """PartitionSpecs (q [B, Hq, S, D], kv [B, Hkv, S, D], segment ids [B, S]) for the shard_map: batch
    over the data / fsdp axes that divide it, heads over tensor when the K/V heads split evenly (or MQA)."""
    from jax.sharding import PartitionSpec as P
    axes = [a for a in ("data", "fsdp") if a in mesh.shape and mesh.shape[a] > 1]
    while axes and b % math.prod(mesh.shape[a] for a in axes):
        axes = axes[:-1]
    bspec = None if not axes else axes[0] if len(axes) == 1 else tuple(axes)
    t = mesh.shape.get("tensor", 1)
    qh = kvh = None
    if t > 1 and hkv % t == 0:
        qh = kvh = "tensor"
    elif t > 1 and hkv == 1 and hq % t == 0:
        qh = "tensor"
    return P(bspec, qh, None, None), P(bspec, kvh, None, None), P(bspec, None)


def splash_attention(q, k, v, *, attention_mask=None, segment_ids=None, scale: float, block: int | None = None,
                     interpret: bool | None = None):
    """Splash kernel per example (vmap) and per mesh shard (shard_map). GQA uses the MHA kernel with Hkv
    K/V heads (query head h reads K/V head h // (Hq / Hkv), nothing repeated); MQA the MQA kernel.
    Padding becomes its own segment id (below every real one), so packing and padding share one mask."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, s, hq, d = q.shape
    hkv = k.shape[2]
    blk = splash_block(s, block)
    if interpret is None:
        interpret = platform() != "tpu"
    seg = None
    if segment_ids is not None or attention_mask is not None:
        seg = jnp.zeros((b, s), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
        if attention_mask is not None:  # padding: its own document, which no real token shares
            seg = jnp.where(attention_mask.astype(bool), seg, seg.min() - 1)
    qt = (q * jnp.asarray(scale, q.dtype)).transpose(0, 2, 1, 3)  # the kernel does not scale
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    sizes = sa.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk, block_kv_dkv=blk,
                          block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk)

    def local(qt, kt, vt, seg):
        lq, lkv = qt.shape[1], kt.shape[1]
        mask = sa.MultiHeadMask([sa.CausalMask((s, s))] * lq)
        if lkv == 1:
            kernel = sa.make_splash_mqa(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
            kt, vt = kt[:, 0], vt[:, 0]
        else:
            kernel = sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
        if seg is None:
            return jax.vmap(kernel)(qt, kt, vt)
        return jax.vmap(lambda q_, k_, v_, s_: kernel(q_, k_, v_, segment_ids=sa.SegmentIds(s_, s_)))(qt, kt, vt, seg)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        out = local(qt, kt, vt, seg)
    elif seg is None:
        qs, kvs, _ = _splash_specs(mesh, b, hq, hkv)
        out = jax.shard_map(lambda a, b_, c: local(a, b_, c, None), mesh=mesh, in_specs=(qs, kvs, kvs),
                            out_specs=qs, check_vma=False)(qt, kt, vt)
    else:
        qs, kvs, ss = _splash_specs(mesh, b, hq, hkv)
        out = jax.shard_map(local, mesh=mesh, in_specs=(qs, kvs, kvs, ss), out_specs=qs, check_vma=False)(
            qt, kt, vt, seg)
    return out.transpose(0, 2, 1, 3)


# ---------------------------------------------------------------------------- cuDNN (GPU; untested here)
def cudnn_attention(q, k, v, *, attention_mask=None, scale: float):
    """cuDNN flash attention, causal, padding as a broadcast key mask [B, 1, 1, S]. Untested in this
    project (no GPU); packed segment ids are refused by `attend` (fallback to chunked)."""
    if attention_mask is None:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="cudnn")
    real = attention_mask.astype(bool)
    out = jax.nn.dot_product_attention(q, k, v, mask=real[:, None, None, :], scale=scale, is_causal=True,
                                       implementation="cudnn")
    return jnp.where(real[:, :, None, None], out, 0)  # left-padding rows see no key: never let them carry NaN


def attention_mask_4d(attention_mask, segment_ids, b: int, s: int) -> jax.Array:
    """Boolean [B, 1, S, S]: causal, padded keys masked, no attention across packed documents."""
    causal = jnp.tril(jnp.ones((s, s), bool))[None, None]
    mask = jnp.broadcast_to(causal, (b, 1, s, s))
    if attention_mask is not None:
        mask = mask & attention_mask.astype(bool)[:, None, None, :]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return mask
