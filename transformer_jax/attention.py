"""Scaled dot-product attention in pure JAX: softmax(Q Kᵀ · scale + bias, masked) V.

This module is the part of the project other JAX code imports, so it depends only on
``jax``, ``jax.numpy``, ``numpy``, ``functools``, ``dataclasses`` and ``typing``: importing it
never imports Flax.

The kernel is written for ONE example (``scaled_dot_product_attention``, ``query[T, N, H]``);
the batched entry point (``dot_product_attention``, ``query[B, T, N, H]``) is that function
under ``jax.vmap``, compiled with ``jax.jit``. The layout and the meaning of every shared
argument follow ``jax.nn.dot_product_attention`` so that ours is a drop-in replacement.

Axis legend (as in the package docstring): B batch, T query length, S key length,
N query heads, K key/value heads (N a multiple of K: grouped-query attention), H head dim,
G = N // K query heads per key/value head.

Two implementations sit behind ``implementation=``:

* ``"exact"`` materialises the T×S scores and runs one softmax per row. For causal or local
  masks the rows are computed in a few query chunks that only touch the keys those rows may
  see, so the masked triangle is not computed (the result is the same full-row softmax).
* ``"blockwise"`` never materialises the scores: an online softmax over key blocks
  (Rabe & Staats 2021; FlashAttention) with a ``jax.custom_vjp`` whose backward pass recomputes
  the blocks, so memory is O(T) rather than O(T·S). Blocks that a causal/local mask or the
  sequence lengths rule out entirely are skipped by the loop bounds, not computed then masked.

Numerics: logits and softmax are float32 for bf16/fp16 inputs; the output has the input dtype.
A query row whose keys are all masked returns zeros, never NaN (``jax.nn`` returns the mean of
the values there; that is the one documented difference).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Implementation",
    "attention_weights",
    "dot_product_attention",
    "make_causal_mask",
    "make_padding_mask",
    "scaled_dot_product_attention",
]

Implementation = Literal["exact", "blockwise"]
_IMPLEMENTATIONS = ("exact", "blockwise")

# Above this many scores per (example, head) `implementation=None` picks the blockwise path:
# 2048² float32 scores are 16 MiB per head, where the exact path's memory traffic starts to
# dominate on CPU and its O(T·S) temporaries start to hurt on accelerators.
_AUTO_BLOCKWISE_SCORES = 2048 * 2048
# 128×128 float32 score blocks (64 KiB per head) stay in cache; measured fastest on CPU
# among 64…512 (benchmarks/attention.py).
_DEFAULT_BLOCK = 128
# The exact path splits causal/local rows into at most this many query chunks of at least
# _MIN_CHUNK rows: enough to skip most of the masked triangle, few enough to compile quickly.
_MAX_CHUNKS = 8
_MIN_CHUNK = 128
# Floor for a row's running max: far below any real logit, far above -inf.
_FLOOR = -1e30


# --------------------------------------------------------------------------------------
# Static settings shared by both implementations.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Hashable static settings: scale, mask structure and block sizes."""

    scale: float
    is_causal: bool
    window: tuple[int, int] | None  # (left, right) keys allowed around each query
    block_q: int
    block_k: int


def _valid(spec: _Spec, row0, rows: int, col0, cols: int, q_len, kv_len):
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


def _slice_2d(x, row0, rows: int, col0, cols: int):
    """Slice the last two axes of a broadcastable [..., Tb, Sb] array (size-1 axes stay)."""
    if x.shape[-2] != 1:
        x = jax.lax.dynamic_slice_in_dim(x, row0, rows, axis=x.ndim - 2)
    if x.shape[-1] != 1:
        x = jax.lax.dynamic_slice_in_dim(x, col0, cols, axis=x.ndim - 1)
    return x


# --------------------------------------------------------------------------------------
# Exact path: materialise the scores, one softmax per row.
# --------------------------------------------------------------------------------------


def _row_chunks(spec: _Spec, T: int, S: int) -> list[tuple[int, int, int, int]]:
    """Static (row0, row1, col0, col1) chunks covering every key each query may see."""
    structured = spec.is_causal or spec.window is not None
    n = min(_MAX_CHUNKS, T // _MIN_CHUNK) if structured else 1
    n = max(n, 1)
    bounds = [round(i * T / n) for i in range(n + 1)]
    chunks = []
    for r0, r1 in zip(bounds[:-1], bounds[1:]):
        c0, c1 = 0, S
        if spec.is_causal:
            c1 = min(c1, r1)  # the chunk's last query (r1 - 1) sees keys < r1
        if spec.window is not None:
            left, right = spec.window
            c0 = max(c0, r0 - left)
            c1 = min(c1, r1 - 1 + right + 1)
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
        s = s + _slice_2d(bias, r0, rows, c0, cols).astype(jnp.float32)
    ok = _valid(spec, r0, rows, c0, cols, q_len, kv_len)
    if mask is not None:
        ok = ok & _slice_2d(mask, r0, rows, c0, cols)
    s = jnp.where(ok, s, -jnp.inf)
    # Softmax is shift-invariant, so the max needs no gradient. An all-masked row has max -inf:
    # flooring it at a finite value makes exp() give exact zeros (not NaN), and adding 1 to a
    # zero denominator makes its output 0/1. (max/add fuse better here than where(): ~15%.)
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    m = jnp.maximum(m, _FLOOR)
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    denom = denom + (denom == 0)
    # Normalise after the PV product: a [rows, H] divide instead of a [rows, cols] one.
    o = jnp.einsum("kts,ksh->kth", p.astype(v.dtype).reshape(Kh, G * rows, cols), vc,
                   preferred_element_type=jnp.float32)
    return o.reshape(Kh, G, rows, H) / denom, p / denom


def _exact(spec, q, k, v, bias, mask, q_len, kv_len, *, return_weights=False):
    """Exact attention on the grouped layout q[K, G, T, H], k/v[K, S, H]."""
    Kh, G, T, H = q.shape
    S = k.shape[1]
    outs, weights = [], []
    for r0, r1, c0, c1 in _row_chunks(spec, T, S):
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


def _key_block_range(spec: _Spec, i, nk: int, q_len, kv_len):
    """[lo, hi) key blocks that query block i may see; the rest are skipped, not masked."""
    bq, bk = spec.block_q, spec.block_k
    first_row, last_row = i * bq, (i + 1) * bq - 1
    lo, hi = jnp.int32(0), jnp.int32(nk)
    if spec.is_causal:
        hi = jnp.minimum(hi, last_row // bk + 1)
    if spec.window is not None:
        left, right = spec.window
        lo = jnp.maximum(lo, (first_row - left) // bk)
        hi = jnp.minimum(hi, (last_row + right) // bk + 1)
    hi = jnp.minimum(hi, (kv_len + bk - 1) // bk)
    hi = jnp.where(first_row < q_len, hi, lo)  # the whole block is padding
    return lo, jnp.maximum(lo, hi)


def _query_block_range(spec: _Spec, j, nq: int, q_len, kv_len):
    """[lo, hi) query blocks that see key block j (the transpose of _key_block_range)."""
    bq, bk = spec.block_q, spec.block_k
    first_col, last_col = j * bk, (j + 1) * bk - 1
    lo, hi = jnp.int32(0), jnp.int32(nq)
    if spec.is_causal:
        lo = jnp.maximum(lo, first_col // bq)
    if spec.window is not None:
        left, right = spec.window
        lo = jnp.maximum(lo, (first_col - right) // bq)
        hi = jnp.minimum(hi, (last_col + left) // bq + 1)
    hi = jnp.minimum(hi, (q_len + bq - 1) // bq)
    hi = jnp.where(first_col < kv_len, hi, lo)
    return jnp.clip(lo, 0, nq), jnp.clip(jnp.maximum(lo, hi), 0, nq)


def _block_logits(spec, q_i, k_j, bias, mask, q_len, kv_len, i, j):
    """Masked float32 logits [K, G, bq, bk] of query block i against key block j."""
    bq, bk = spec.block_q, spec.block_k
    s = jnp.einsum("kgqh,kch->kgqc", q_i, k_j, preferred_element_type=jnp.float32)
    if spec.scale != 1.0:
        s = s * jnp.float32(spec.scale)
    if bias is not None:
        s = s + _slice_2d(bias, i * bq, bq, j * bk, bk).astype(jnp.float32)
    ok = _valid(spec, i * bq, bq, j * bk, bk, q_len, kv_len)
    if mask is not None:
        ok = ok & _slice_2d(mask, i * bq, bq, j * bk, bk)
    return jnp.where(ok, s, -jnp.inf), ok


def _blockwise_forward(spec, qb, kb, vb, bias, mask, q_len, kv_len):
    """qb[nq, K, G, bq, H], kb/vb[nk, K, bk, H] -> out[nq, K, G, bq, H], lse[nq, K, G, bq]."""
    nq, Kh, G, bq, H = qb.shape
    nk = kb.shape[0]

    def query_block(i):
        q_i = qb[i]

        def step(j, carry):
            m, l, acc = carry
            s, _ = _block_logits(spec, q_i, kb[j], bias, mask, q_len, kv_len, i, j)
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
        lo, hi = _key_block_range(spec, i, nk, q_len, kv_len)
        m, l, acc = jax.lax.fori_loop(lo, hi, step, init)
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
    nq, Kh, G, bq, H = qb.shape
    nk, _, bk, _ = kb.shape
    scale = jnp.float32(spec.scale)
    d_out = d_out.astype(jnp.float32)
    delta = jnp.sum(d_out * out.astype(jnp.float32), axis=-1)  # [nq, K, G, bq]

    def key_block(carry, j):
        dq, dbias = carry
        k_j, v_j = kb[j], vb[j]

        def step(i, inner):
            dq, dbias, dk_j, dv_j = inner
            q_i, do_i = qb[i], d_out[i]
            s, ok = _block_logits(spec, q_i, k_j, bias, mask, q_len, kv_len, i, j)
            p = jnp.where(ok, jnp.exp(s - lse[i][..., None]), 0.0)
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
        lo, hi = _query_block_range(spec, j, nq, q_len, kv_len)
        dq, dbias, dk_j, dv_j = jax.lax.fori_loop(lo, hi, step, (dq, dbias, zeros_k, zeros_k))
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


def _blockwise_grouped(spec, q, k, v, bias, mask, q_len, kv_len):
    """Blockwise attention on the grouped layout; pads T and S up to whole blocks."""
    Kh, G, T, H = q.shape
    S = k.shape[1]
    bq, bk = min(spec.block_q, T), min(spec.block_k, S)
    spec = dataclasses.replace(spec, block_q=bq, block_k=bk)
    nq, nk = -(-T // bq), -(-S // bk)
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
    out = _blockwise(spec, qb, kb, vb, bias, mask, q_len, kv_len)  # [nq, K, G, bq, H]
    return out.transpose(1, 2, 0, 3, 4).reshape(Kh, G, Tp, H)[:, :, :T]


# --------------------------------------------------------------------------------------
# Validation (trace time: shapes and dtypes are static; lengths are checked when concrete).
# --------------------------------------------------------------------------------------


def _shape(x) -> tuple[int, ...]:
    return tuple(np.shape(x))


def _check_float(name: str, x) -> None:
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {jnp.result_type(x)}")


def _check_qkv(query, key, value, batched: bool) -> tuple[int, ...]:
    """Validate q/k/v ranks, dims and dtypes; return (B?, T, S, N, K, H)."""
    rank = 4 if batched else 3
    layout_q = "[B, T, N, H]" if batched else "[T, N, H]"
    layout_kv = "[B, S, K, H]" if batched else "[S, K, H]"
    for name, x, layout in (("query", query, layout_q), ("key", key, layout_kv),
                            ("value", value, layout_kv)):
        if np.ndim(x) != rank:
            raise ValueError(f"{name} must have rank {rank} {layout}, got shape {_shape(x)}")
        _check_float(name, x)
    qs, ks, vs = _shape(query), _shape(key), _shape(value)
    dtypes = {jnp.result_type(query), jnp.result_type(key), jnp.result_type(value)}
    if len(dtypes) != 1:
        raise TypeError(
            "query, key and value must share one dtype, got "
            f"{jnp.result_type(query)}, {jnp.result_type(key)}, {jnp.result_type(value)}"
        )
    if ks != vs:
        raise ValueError(f"key and value must have the same shape {layout_kv}, got {ks} and {vs}")
    if batched and qs[0] != ks[0]:
        raise ValueError(f"query and key batch sizes differ: query {qs}, key {ks}")
    T, N, H = qs[-3:]
    S, K, Hk = ks[-3:]
    if H != Hk:
        raise ValueError(f"query and key head dims (H) differ: query {qs}, key {ks}")
    if K == 0 or N % K != 0:
        raise ValueError(
            f"query heads N={N} must be a multiple of key/value heads K={K} "
            f"(grouped-query attention): query {qs}, key {ks}"
        )
    return qs[:1] + (T, S, N, K, H) if batched else (T, S, N, K, H)


def _check_broadcast(name: str, x, target: tuple[int, ...], legend: str) -> None:
    xs = _shape(x)
    if len(xs) > len(target) or any(a not in (1, b) for a, b in zip(xs[::-1], target[::-1])):
        raise ValueError(f"{name} of shape {xs} is not broadcastable to {legend} = {target}")


def _check_mask_bias(bias, mask, target: tuple[int, ...], legend: str) -> None:
    if mask is not None:
        if jnp.result_type(mask) != jnp.bool_:
            raise TypeError(
                f"mask must be a boolean array (True = attend), got dtype {jnp.result_type(mask)}; "
                "pass additive float masks as bias="
            )
        _check_broadcast("mask", mask, target, legend)
    if bias is not None:
        _check_float("bias", bias)
        _check_broadcast("bias", bias, target, legend)


def _check_length(name: str, x, expect_shape: tuple[int, ...], upper: int) -> None:
    if x is None:
        return
    if _shape(x) != expect_shape:
        raise ValueError(f"{name} must have shape {expect_shape}, got {_shape(x)}")
    if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {jnp.result_type(x)}")
    if isinstance(x, jax.core.Tracer):
        return  # values unknown while tracing; the kernel clamps them to [0, upper]
    values = np.asarray(x)
    if values.size and (values.min() < 0 or values.max() > upper):
        raise ValueError(
            f"{name} must lie in [0, {upper}], got values in [{values.min()}, {values.max()}]"
        )


def _check_options(implementation, scale, block_size, local_window_size):
    if implementation is not None and implementation not in _IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {_IMPLEMENTATIONS} or None, got {implementation!r}"
        )
    if scale is not None and not isinstance(scale, (int, float, np.floating, np.integer)):
        raise TypeError(f"scale must be a Python number or None, got {type(scale).__name__}")
    _block_sizes(block_size)
    _window(local_window_size)


def _block_sizes(block_size) -> tuple[int, int]:
    if block_size is None:
        return _DEFAULT_BLOCK, _DEFAULT_BLOCK
    sizes = (block_size, block_size) if isinstance(block_size, (int, np.integer)) else block_size
    if (
        not isinstance(sizes, Sequence)
        or len(sizes) != 2
        or not all(isinstance(b, (int, np.integer)) and b > 0 for b in sizes)
    ):
        raise ValueError(
            f"block_size must be a positive int or a (query, key) pair of them, got {block_size!r}"
        )
    return int(sizes[0]), int(sizes[1])


def _window(local_window_size) -> tuple[int, int] | None:
    if local_window_size is None:
        return None
    w = local_window_size
    w = (w, w) if isinstance(w, (int, np.integer)) else w
    if not isinstance(w, Sequence) or len(w) != 2 or not all(
        isinstance(x, (int, np.integer)) and x >= 0 for x in w
    ):
        raise ValueError(
            "local_window_size must be a non-negative int or a (left, right) pair, "
            f"got {local_window_size!r}"
        )
    return int(w[0]), int(w[1])


# --------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------


def _to_grouped(x, N: int, K: int):
    """[Nb, Tb, Sb] broadcastable mask/bias -> [Kb, Gb, Tb, Sb] matching the grouped layout."""
    if x is None:
        return None
    x = jnp.reshape(x, (1,) * (3 - np.ndim(x)) + _shape(x))
    if x.shape[0] == 1:
        return x[None]
    return x.reshape(K, N // K, *x.shape[1:])


def _resolve(implementation, T: int, S: int) -> str:
    if implementation is not None:
        return implementation
    return "blockwise" if T * S > _AUTO_BLOCKWISE_SCORES else "exact"


def scaled_dot_product_attention(
    query,
    key,
    value,
    bias=None,
    mask=None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_length=None,
    key_value_seq_length=None,
    local_window_size: int | tuple[int, int] | None = None,
    implementation: Implementation | None = None,
    block_size: int | tuple[int, int] | None = None,
):
    """Attention for ONE example: softmax(q kᵀ · scale + bias, masked) v.

    Args:
      query: [T, N, H] queries.
      key: [S, K, H] keys; N must be a multiple of K (grouped-query attention).
      value: [S, K, H] values.
      bias: optional additive float bias broadcastable to [N, T, S].
      mask: optional boolean mask broadcastable to [N, T, S]; True means "may attend".
      scale: logit scale; default 1/√H (§3.2.1: keeps the dot products' variance at 1 so the
        softmax does not saturate).
      is_causal: query t sees keys s <= t (top-left aligned, as ``jax.nn``).
      query_seq_length: optional int scalar; queries at or beyond it are padding (output 0).
      key_value_seq_length: optional int scalar; keys at or beyond it are padding.
      local_window_size: optional (left, right): query t sees keys in [t - left, t + right].
      implementation: "exact", "blockwise" or None (exact up to 2048² scores, then blockwise).
      block_size: blockwise block size, an int or a (query, key) pair; default 128.

    Returns:
      [T, N, H] in the dtype of ``query``.
    """
    T, S, N, K, H = _check_qkv(query, key, value, batched=False)
    _check_mask_bias(bias, mask, (N, T, S), "[N, T, S]")
    _check_length("query_seq_length", query_seq_length, (), T)
    _check_length("key_value_seq_length", key_value_seq_length, (), S)
    _check_options(implementation, scale, block_size, local_window_size)
    bq, bk = _block_sizes(block_size)
    scale = float(1.0 / np.sqrt(H) if scale is None else scale)
    query = jnp.asarray(query)
    if jnp.finfo(query.dtype).bits >= 32:
        # Scaling q ([T, H]) instead of the logits ([T, S]) saves a pass over the scores; in
        # bf16/fp16 it would add a rounding step, so there the float32 logits are scaled.
        query, scale = query * jnp.asarray(scale, query.dtype), 1.0
    spec = _Spec(
        scale=scale,
        is_causal=bool(is_causal),
        window=_window(local_window_size),
        block_q=bq,
        block_k=bk,
    )
    G = N // K
    q = query.reshape(T, K, G, H).transpose(1, 2, 0, 3)  # [K, G, T, H]
    k = jnp.asarray(key).transpose(1, 0, 2)  # [K, S, H]
    v = jnp.asarray(value).transpose(1, 0, 2)
    bias4, mask4 = _to_grouped(bias, N, K), _to_grouped(mask, N, K)
    q_len = None if query_seq_length is None else jnp.clip(query_seq_length, 0, T)
    kv_len = None if key_value_seq_length is None else jnp.clip(key_value_seq_length, 0, S)
    if _resolve(implementation, T, S) == "exact":
        out = _exact(spec, q, k, v, bias4, mask4, q_len, kv_len)
    else:
        out = _blockwise_grouped(spec, q, k, v, bias4, mask4, q_len, kv_len)
    return out.transpose(2, 0, 1, 3).reshape(T, N, H).astype(query.dtype)


def _batch_axis(x, B: int):
    """Make x 4-D; return (x without a broadcast batch axis, its vmap in_axis)."""
    if x is None:
        return None, None
    x = jnp.reshape(x, (1,) * (4 - np.ndim(x)) + _shape(x))
    if x.shape[0] == B and B != 1:
        return x, 0
    return x[0], None


@functools.partial(
    jax.jit,
    static_argnames=("scale", "is_causal", "local_window_size", "implementation", "block_size"),
)
def _batched(query, key, value, bias, mask, q_lens, kv_lens, *, scale, is_causal,
             local_window_size, implementation, block_size):
    B = query.shape[0]
    bias, bias_axis = _batch_axis(bias, B)
    mask, mask_axis = _batch_axis(mask, B)
    single = functools.partial(
        scaled_dot_product_attention,
        scale=scale,
        is_causal=is_causal,
        local_window_size=local_window_size,
        implementation=implementation,
        block_size=block_size,
    )

    def one(q, k, v, b, m, ql, kl):
        return single(q, k, v, b, m, query_seq_length=ql, key_value_seq_length=kl)

    axes = (0, 0, 0, bias_axis, mask_axis, None if q_lens is None else 0,
            None if kv_lens is None else 0)
    return jax.vmap(one, in_axes=axes)(query, key, value, bias, mask, q_lens, kv_lens)


def _freeze(x):
    """Hashable form of a static tuple/list argument."""
    return tuple(x) if isinstance(x, list) else x


def dot_product_attention(
    query,
    key,
    value,
    bias=None,
    mask=None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    local_window_size: int | tuple[int, int] | None = None,
    implementation: Implementation | None = None,
    block_size: int | tuple[int, int] | None = None,
):
    """Batched scaled dot-product attention: a drop-in for ``jax.nn.dot_product_attention``.

    The single-example kernel (:func:`scaled_dot_product_attention`) under ``jax.vmap``,
    compiled with ``jax.jit``. Mask and bias batch axes of size 1 are broadcast, not copied.

    Args:
      query: [B, T, N, H].
      key: [B, S, K, H]; N must be a multiple of K (grouped-query / multi-query attention).
      value: [B, S, K, H].
      bias: optional additive float bias broadcastable to [B, N, T, S].
      mask: optional boolean mask broadcastable to [B, N, T, S]; True means "may attend".
      scale: logit scale, default 1/√H.
      is_causal: query t sees keys s <= t (top-left aligned, as ``jax.nn``).
      query_seq_lengths: optional int [B]; queries at or beyond the length are padding and
        their outputs are zeros.
      key_value_seq_lengths: optional int [B]; keys at or beyond the length are ignored.
      local_window_size: optional (left, right) sliding window, as ``jax.nn``.
      implementation: "exact", "blockwise" or None (chosen by size).
      block_size: blockwise block size, an int or a (query, key) pair.

    Returns:
      [B, T, N, H] in the dtype of ``query``.

    Raises:
      ValueError / TypeError: at trace time, naming the argument and the shapes it got.
    """
    B, T, S, N, K, H = _check_qkv(query, key, value, batched=True)
    _check_mask_bias(bias, mask, (B, N, T, S), "[B, N, T, S]")
    _check_length("query_seq_lengths", query_seq_lengths, (B,), T)
    _check_length("key_value_seq_lengths", key_value_seq_lengths, (B,), S)
    _check_options(implementation, scale, block_size, local_window_size)
    return _batched(
        query, key, value, bias, mask, query_seq_lengths, key_value_seq_lengths,
        scale=None if scale is None else float(scale),
        is_causal=bool(is_causal),
        local_window_size=_freeze(local_window_size),
        implementation=implementation,
        block_size=_freeze(block_size),
    )


@functools.partial(jax.jit, static_argnames=("scale", "is_causal", "local_window_size"))
def _batched_weights(query, key, bias, mask, q_lens, kv_lens, *, scale, is_causal,
                     local_window_size):
    B, T, N, H = query.shape
    S, K = key.shape[1], key.shape[2]
    bias, bias_axis = _batch_axis(bias, B)
    mask, mask_axis = _batch_axis(mask, B)
    spec = _Spec(
        scale=float(1.0 / np.sqrt(H) if scale is None else scale),
        is_causal=is_causal,
        window=_window(local_window_size),
        block_q=_DEFAULT_BLOCK,
        block_k=_DEFAULT_BLOCK,
    )

    def one(q, k, b, m, ql, kl):
        q = q.reshape(T, K, N // K, H).transpose(1, 2, 0, 3)
        k = k.transpose(1, 0, 2)
        v = jnp.zeros_like(k)  # values do not affect the probabilities
        ql = None if ql is None else jnp.clip(ql, 0, T)
        kl = None if kl is None else jnp.clip(kl, 0, S)
        w = _exact(spec, q, k, v, _to_grouped(b, N, K), _to_grouped(m, N, K), ql, kl,
                   return_weights=True)
        return w.reshape(N, T, S)

    axes = (0, 0, bias_axis, mask_axis, None if q_lens is None else 0,
            None if kv_lens is None else 0)
    return jax.vmap(one, in_axes=axes)(query, key, bias, mask, q_lens, kv_lens)


def attention_weights(
    query,
    key,
    bias=None,
    mask=None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    local_window_size: int | tuple[int, int] | None = None,
):
    """Attention probabilities [B, N, T, S] (float32), for inspection and plots.

    Same arguments and masking as :func:`dot_product_attention` (without ``value``). Rows
    whose keys are all masked are all zeros.
    """
    B, T, S, N, K, H = _check_qkv(query, key, key, batched=True)
    _check_mask_bias(bias, mask, (B, N, T, S), "[B, N, T, S]")
    _check_length("query_seq_lengths", query_seq_lengths, (B,), T)
    _check_length("key_value_seq_lengths", key_value_seq_lengths, (B,), S)
    _check_options(None, scale, None, local_window_size)
    return _batched_weights(
        query, key, bias, mask, query_seq_lengths, key_value_seq_lengths,
        scale=None if scale is None else float(scale),
        is_causal=bool(is_causal),
        local_window_size=_freeze(local_window_size),
    )


def make_causal_mask(T: int, S: int | None = None):
    """Boolean [T, S] lower-triangular mask: query t may attend keys s <= t."""
    S = T if S is None else S
    return jnp.tril(jnp.ones((T, S), jnp.bool_))


def make_padding_mask(query_seq_lengths, key_value_seq_lengths, T: int, S: int):
    """Boolean [B, 1, T, S] mask from per-example lengths (True where both are real tokens)."""
    q_ok = jnp.arange(T)[None, :] < jnp.asarray(query_seq_lengths)[:, None]
    kv_ok = jnp.arange(S)[None, :] < jnp.asarray(key_value_seq_lengths)[:, None]
    return (q_ok[:, :, None] & kv_ok[:, None, :])[:, None]
