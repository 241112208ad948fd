"""The two attention implementations behind :mod:`transformer_jax.attention`.

Internal: the public, validated entry points live in :mod:`~transformer_jax.attention.api`.
Everything here works on
ONE example in the grouped layout ``q[K, G, T, H]``, ``k/v[K, S, H]`` (G = N // K query heads
share a key/value head), with masks/biases as ``[Kb, Gb, Tb, Sb]`` arrays whose axes are either
full or 1 (broadcast). Pure JAX: importing this module never imports Flax.

* :func:`exact` materialises the scores, one softmax per row; causal/local rows are computed in
  query chunks that only touch the keys those rows may see.
* :func:`blockwise` is an online softmax over key blocks (Rabe & Staats 2021; FlashAttention)
  under a ``jax.custom_vjp`` whose backward pass recomputes the blocks: O(T) memory, and blocks
  that the masks rule out entirely are skipped by the loop bounds.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp

# (query, key) block sizes. Each loop iteration multiplies a 512-row query block by a 256-key
# block: big enough that the per-iteration cost of the loop is paid rarely and XLA's CPU
# runtime spreads the matmuls over the cores, small enough (with the head groups below) to
# stay in cache.
DEFAULT_BLOCK = (512, 256)
# Key/value heads are processed in this many independent loops (when they divide K): each
# loop's working set is that much smaller, and independent loops may run concurrently.
_HEAD_GROUPS = 2
# The exact path splits causal/local rows into at most this many query chunks of at least
# _MIN_CHUNK rows: enough to skip most of the masked triangle, few enough to compile quickly.
_MAX_CHUNKS = 8
_MIN_CHUNK = 128
# Floor for a row's running max: far below any real logit, far above -inf.
_FLOOR = -1e30


@dataclasses.dataclass(frozen=True)
class Spec:
    """Hashable static settings: scale, mask structure and block sizes."""

    scale: float
    is_causal: bool
    window: tuple[int, int] | None  # (left, right) keys allowed around each query
    block_q: int
    block_k: int


def valid(spec: Spec, row0, rows: int, col0, cols: int, q_len, kv_len):
    """Boolean [rows, cols]: which (query, key) pairs the structural masks allow."""
    r = row0 + jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 0)
    c = col0 + jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 1)
    ok = jnp.ones((rows, cols), jnp.bool_)
    if spec.is_causal:  # top-left aligned, as jax.nn: query t sees keys s <= t
        ok &= c <= r
    if spec.window is not None:
        left, right = spec.window
        ok &= (c >= r - left) & (c <= r + right)
    if q_len is not None:
        ok &= r < q_len
    if kv_len is not None:
        ok &= c < kv_len
    return ok


def _band(spec: Spec) -> tuple[int | None, int | None]:
    """(below, above): query t may see keys s in [t - below, t + above]; None is unbounded.

    The causal mask and the (left, right) window both bound ``s - t``; this is the one place
    that turns them into those bounds, for the exact path's row chunks and the blockwise loops.
    """
    below, above = (None, None) if spec.window is None else spec.window
    if spec.is_causal:  # top-left aligned, as jax.nn: s <= t
        above = 0 if above is None else min(above, 0)
    return below, above


def slice_2d(x, row0, rows: int, col0, cols: int):
    """Slice the last two axes of a broadcastable [..., Tb, Sb] array (size-1 axes stay)."""
    if x.shape[-2] != 1:
        x = jax.lax.dynamic_slice_in_dim(x, row0, rows, axis=x.ndim - 2)
    if x.shape[-1] != 1:
        x = jax.lax.dynamic_slice_in_dim(x, col0, cols, axis=x.ndim - 1)
    return x


# --------------------------------------------------------------------------------------
# Exact path: materialise the scores, one softmax per row.
# --------------------------------------------------------------------------------------


def row_chunks(spec: Spec, T: int, S: int) -> list[tuple[int, int, int, int]]:
    """Static (row0, row1, col0, col1) chunks covering every key each query may see."""
    below, above = _band(spec)
    structured = below is not None or above is not None
    n = min(_MAX_CHUNKS, T // _MIN_CHUNK) if structured else 1
    n = max(n, 1)
    bounds = [round(i * T / n) for i in range(n + 1)]
    chunks = []
    for r0, r1 in itertools.pairwise(bounds):
        c0 = 0 if below is None else max(0, r0 - below)  # the chunk's first query, r0
        c1 = S if above is None else min(S, r1 + above)  # its last query, r1 - 1
        chunks.append((r0, r1, c0, max(c0, c1)))
    return chunks


def _exact_chunk(spec, q, k, v, bias, mask, q_len, kv_len, r0, r1, c0, c1):
    """Output [K, G, r1-r0, H] (float32) and probabilities for rows r0:r1, keys c0:c1."""
    rows, cols = r1 - r0, c1 - c0
    Kh, G, _, H = q.shape
    # One [G·rows, H] x [H, cols] matmul per kv head: the G query heads sharing a kv head are
    # stacked as rows, so grouped-query attention costs no extra copies of k and v.
    qc = q[:, :, r0:r1].reshape(Kh, G * rows, H)
    kc, vc = k[:, c0:c1], v[:, c0:c1]
    s = jnp.einsum("kth,ksh->kts", qc, kc, preferred_element_type=jnp.float32)
    s = s.reshape(Kh, G, rows, cols)
    if spec.scale != 1.0:
        s = s * jnp.float32(spec.scale)
    if bias is not None:
        s = s + slice_2d(bias, r0, rows, c0, cols).astype(jnp.float32)
    ok = valid(spec, r0, rows, c0, cols, q_len, kv_len)
    if mask is not None:
        ok = ok & slice_2d(mask, r0, rows, c0, cols)
    s = jnp.where(ok, s, -jnp.inf)
    # Softmax is shift-invariant, so the max needs no gradient. An all-masked row has max -inf:
    # flooring it at a finite value makes exp() give exact zeros (not NaN), and adding 1 to a
    # zero denominator makes its output 0/1.
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    m = jnp.maximum(m, _FLOOR)
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    denom = denom + (denom == 0)
    # Normalise after the PV product: a [rows, H] divide instead of a [rows, cols] one.
    o = jnp.einsum("kts,ksh->kth", p.astype(v.dtype).reshape(Kh, G * rows, cols), vc,
                   preferred_element_type=jnp.float32)
    return o.reshape(Kh, G, rows, H) / denom, p / denom


def exact(spec, q, k, v, bias, mask, q_len, kv_len, *, return_weights=False):
    """Exact attention on the grouped layout q[K, G, T, H], k/v[K, S, H]."""
    Kh, G, T, H = q.shape
    S = k.shape[1]
    outs, weights = [], []
    for r0, r1, c0, c1 in row_chunks(spec, T, S):
        if c1 == c0:  # no key is visible to any row of this chunk
            outs.append(jnp.zeros((Kh, G, r1 - r0, H), jnp.float32))
            weights.append(jnp.zeros((Kh, G, r1 - r0, S), jnp.float32))
            continue
        o, p = _exact_chunk(spec, q, k, v, bias, mask, q_len, kv_len, r0, r1, c0, c1)
        outs.append(o)
        if return_weights:
            weights.append(jnp.pad(p, ((0, 0), (0, 0), (0, 0), (c0, S - c1))))
    if return_weights:
        return jnp.concatenate(weights, axis=2)
    return jnp.concatenate(outs, axis=2) if len(outs) > 1 else outs[0]


# --------------------------------------------------------------------------------------
# Blockwise path: online softmax over key blocks, custom VJP that recomputes.
# --------------------------------------------------------------------------------------


def _ceil_div(a, b: int):
    return -((-a) // b)


def block_bounds(spec: Spec, i, n: int, q_len, kv_len, has_mask: bool, transposed=False):
    """Loop bounds ``(lo, a, b, hi)`` over the ``n`` inner blocks seen from outer block ``i``.

    Outer blocks are query blocks and inner blocks key blocks (the forward pass); with
    ``transposed`` it is the other way round (the backward pass, one key block at a time).
    Inner blocks outside ``[lo, hi)`` hold no pair that the causal mask, the window or the
    sequence lengths allow: they are skipped by the loop bounds, not computed then masked.
    Within that range, every pair of the blocks in ``[a, b)`` is allowed, so those need no mask
    (no iota, compare or select per score, which is most of the elementwise work of a block on
    a CPU); only the blocks at the edges of the triangle, the window or the padding are masked.
    An arbitrary boolean mask (``has_mask``) may hide anything, and then ``a == b == lo``.
    """
    below, above = _band(spec)
    b_out, b_in, out_len, in_len = spec.block_q, spec.block_k, q_len, kv_len
    if transposed:  # key s is seen by the queries t in [s - above, s + below]
        below, above = above, below
        b_out, b_in, out_len, in_len = b_in, b_out, in_len, out_len
    first, last = i * b_out, (i + 1) * b_out - 1
    lo, hi = jnp.int32(0), jnp.int32(n)
    if below is not None:
        lo = jnp.maximum(lo, (first - below) // b_in)
    if above is not None:
        hi = jnp.minimum(hi, (last + above) // b_in + 1)
    hi = jnp.minimum(hi, _ceil_div(in_len, b_in))
    hi = jnp.where(first < out_len, hi, lo)  # the whole outer block is padding
    lo, hi = jnp.clip(lo, 0, n), jnp.clip(jnp.maximum(lo, hi), 0, n)
    if has_mask:
        return lo, lo, lo, hi
    a, b = lo, hi
    if below is not None:  # the block's first inner index >= the last outer index - below
        a = jnp.maximum(a, _ceil_div(last - below, b_in))
    if above is not None:  # the block's last inner index <= the first outer index + above
        b = jnp.minimum(b, (first + above + 1) // b_in)
    b = jnp.minimum(b, in_len // b_in)
    b = jnp.where((i + 1) * b_out <= out_len, b, a)  # some outer index of the block is padding
    a = jnp.clip(a, lo, hi)
    return lo, a, jnp.clip(b, a, hi), hi


def _over_blocks(bounds, step, init):
    """Fold ``step(block, carry, masked=True)`` over blocks ``[lo, hi)``, unmasked on ``[a, b)``."""
    lo, a, b, hi = bounds
    carry = jax.lax.fori_loop(lo, a, step, init)
    carry = jax.lax.fori_loop(a, b, functools.partial(step, masked=False), carry)
    return jax.lax.fori_loop(b, hi, step, carry)


def _block_logits(spec, q_i, k_j, bias, mask, q_len, kv_len, i, j, masked=True):
    """Float32 logits [K, G, bq, bk] of query block i against key block j, and where valid.

    With ``masked=False`` (a block in ``[a, b)`` of :func:`block_bounds`) nothing is masked and
    the validity is ``None``.
    """
    bq, bk = spec.block_q, spec.block_k
    s = jnp.einsum("kgqh,kch->kgqc", q_i, k_j, preferred_element_type=jnp.float32)
    if spec.scale != 1.0:
        s = s * jnp.float32(spec.scale)
    if bias is not None:
        s = s + slice_2d(bias, i * bq, bq, j * bk, bk).astype(jnp.float32)
    if not masked:
        return s, None
    ok = valid(spec, i * bq, bq, j * bk, bk, q_len, kv_len)
    if mask is not None:
        ok = ok & slice_2d(mask, i * bq, bq, j * bk, bk)
    return jnp.where(ok, s, -jnp.inf), ok


def _blockwise_forward(spec, qb, kb, vb, bias, mask, q_len, kv_len):
    """qb[nq, K, G, bq, H], kb/vb[nk, K, bk, H] -> out[nq, K, G, bq, H], lse[nq, K, G, bq]."""
    nq, Kh, G, bq, H = qb.shape
    nk = kb.shape[0]

    def query_block(i):
        q_i = qb[i]

        def step(j, carry, masked=True):
            m, l, acc = carry
            s, _ = _block_logits(spec, q_i, kb[j], bias, mask, q_len, kv_len, i, j, masked)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
            p = jnp.exp(s - m_safe[..., None])
            correction = jnp.exp(m - m_safe)  # rescales what earlier blocks accumulated
            l = l * correction + jnp.sum(p, axis=-1)
            pv = jnp.einsum(
                "kgqc,kch->kgqh", p.astype(vb.dtype), vb[j], preferred_element_type=jnp.float32
            )
            return m_new, l, acc * correction[..., None] + pv

        init = (
            jnp.full((Kh, G, bq), -jnp.inf, jnp.float32),
            jnp.zeros((Kh, G, bq), jnp.float32),
            jnp.zeros((Kh, G, bq, H), jnp.float32),
        )
        bounds = block_bounds(spec, i, nk, q_len, kv_len, mask is not None)
        m, l, acc = _over_blocks(bounds, step, init)
        out = jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
        # +inf log-sum-exp for an all-masked row makes every recomputed probability 0.
        lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), jnp.inf)
        return out.astype(qb.dtype), lse

    return jax.lax.map(query_block, jnp.arange(nq, dtype=jnp.int32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blockwise(spec, qb, kb, vb, bias, mask, q_len, kv_len):
    return _blockwise_forward(spec, qb, kb, vb, bias, mask, q_len, kv_len)[0]


def _blockwise_fwd(spec, qb, kb, vb, bias, mask, q_len, kv_len):
    out, lse = _blockwise_forward(spec, qb, kb, vb, bias, mask, q_len, kv_len)
    return out, (qb, kb, vb, bias, mask, q_len, kv_len, out, lse)


def _blockwise_bwd(spec, residuals, d_out):
    """FlashAttention-2 style backward: one pass over key blocks, recomputing probabilities."""
    qb, kb, vb, bias, mask, q_len, kv_len, out, lse = residuals
    nq, Kh, _, bq, H = qb.shape
    nk, _, bk, _ = kb.shape
    scale = jnp.float32(spec.scale)
    d_out = d_out.astype(jnp.float32)
    delta = jnp.sum(d_out * out.astype(jnp.float32), axis=-1)  # [nq, K, G, bq]

    def key_block(carry, j):
        dq, dbias = carry
        k_j, v_j = kb[j], vb[j]

        def step(i, inner, masked=True):
            dq, dbias, dk_j, dv_j = inner
            q_i, do_i = qb[i], d_out[i]
            s, ok = _block_logits(spec, q_i, k_j, bias, mask, q_len, kv_len, i, j, masked)
            p = jnp.exp(s - lse[i][..., None])
            if masked:
                p = jnp.where(ok, p, 0.0)
            dv_j = dv_j + jnp.einsum("kgqc,kgqh->kch", p, do_i)
            dp = jnp.einsum("kgqh,kch->kgqc", do_i, v_j.astype(jnp.float32))
            ds = p * (dp - delta[i][..., None])  # d(loss)/d(logits) for this block
            dq_i = jnp.einsum("kgqc,kch->kgqh", ds, k_j.astype(jnp.float32)) * scale
            dq = dq.at[i].add(dq_i)
            dk_j = dk_j + jnp.einsum("kgqc,kgqh->kch", ds, q_i.astype(jnp.float32)) * scale
            if dbias is not None:
                dbias = _accumulate_block(dbias, ds, i * bq, bq, j * bk, bk)
            return dq, dbias, dk_j, dv_j

        zeros_k = jnp.zeros((Kh, bk, H), jnp.float32)
        bounds = block_bounds(spec, j, nq, q_len, kv_len, mask is not None, transposed=True)
        dq, dbias, dk_j, dv_j = _over_blocks(bounds, step, (dq, dbias, zeros_k, zeros_k))
        return (dq, dbias), (dk_j, dv_j)

    dbias0 = None if bias is None else jnp.zeros(bias.shape, jnp.float32)
    dq0 = jnp.zeros(qb.shape, jnp.float32)
    (dq, dbias), (dk, dv) = jax.lax.scan(key_block, (dq0, dbias0), jnp.arange(nk, dtype=jnp.int32))
    dbias = None if bias is None else dbias.astype(bias.dtype)
    return (
        dq.astype(qb.dtype),
        dk.astype(kb.dtype),
        dv.astype(vb.dtype),
        dbias,
        None,
        None,
        None,
    )


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def _accumulate_block(acc, ds, row0, rows, col0, cols):
    """Add a [K, G, rows, cols] block into a bias-shaped accumulator, summing broadcast axes."""
    axes = tuple(a for a in range(4) if acc.shape[a] == 1 and ds.shape[a] != 1)
    ds = jnp.sum(ds, axis=axes, keepdims=True) if axes else ds
    r0 = row0 if acc.shape[2] != 1 else 0
    c0 = col0 if acc.shape[3] != 1 else 0
    start = (0, 0, r0, c0)
    current = jax.lax.dynamic_slice(acc, start, ds.shape)
    return jax.lax.dynamic_update_slice(acc, current + ds, start)


def _pad_axis(x, axis: int, size: int, value=0):
    """Pad axis of x up to size (no-op for broadcast axes of size 1)."""
    if x is None or x.shape[axis] in (1, size):
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def _heads(x, g: int, w: int):
    """Heads g·w … (g + 1)·w of a [Kb, Gb, Tb, Sb] mask or bias (a broadcast axis stays)."""
    return x if x is None or x.shape[0] == 1 else x[g * w:(g + 1) * w]


def blockwise(spec, q, k, v, bias, mask, q_len, kv_len):
    """Blockwise attention on the grouped layout; pads T and S up to whole blocks."""
    Kh, G, T, H = q.shape
    S = k.shape[1]
    bq, bk = min(spec.block_q, T), min(spec.block_k, S)
    spec = dataclasses.replace(spec, block_q=bq, block_k=bk)
    nq, nk = _ceil_div(T, bq), _ceil_div(S, bk)
    Tp, Sp = nq * bq, nk * bk
    q_len = jnp.int32(T) if q_len is None else jnp.minimum(q_len, T).astype(jnp.int32)
    kv_len = jnp.int32(S) if kv_len is None else jnp.minimum(kv_len, S).astype(jnp.int32)
    q = _pad_axis(q, 2, Tp)
    k, v = _pad_axis(k, 1, Sp), _pad_axis(v, 1, Sp)
    bias = _pad_axis(_pad_axis(bias, 2, Tp), 3, Sp)
    mask = _pad_axis(_pad_axis(mask, 2, Tp, False), 3, Sp, False)
    qb = q.reshape(Kh, G, nq, bq, H).transpose(2, 0, 1, 3, 4)
    kb = k.reshape(Kh, nk, bk, H).transpose(1, 0, 2, 3)
    vb = v.reshape(Kh, nk, bk, H).transpose(1, 0, 2, 3)
    groups = _HEAD_GROUPS if Kh % _HEAD_GROUPS == 0 else 1
    w = Kh // groups
    outs = [
        _blockwise(spec, qb[:, g * w:(g + 1) * w], kb[:, g * w:(g + 1) * w],
                   vb[:, g * w:(g + 1) * w], _heads(bias, g, w), _heads(mask, g, w),
                   q_len, kv_len)
        for g in range(groups)
    ]  # each [nq, w, G, bq, H]
    out = outs[0] if groups == 1 else jnp.concatenate(outs, axis=1)
    return out.transpose(1, 2, 0, 3, 4).reshape(Kh, G, Tp, H)[:, :, :T]
