"""What both attention implementations share, and the exact one.

Internal: the public, validated entry points live in :mod:`~transformer_jax.attention.api`.
Everything here works on ONE example in the grouped layout ``q[K, G, T, H]``, ``k/v[K, S, H]``
(G = N // K query heads share a key/value head), with masks/biases as ``[Kb, Gb, Tb, Sb]``
arrays whose axes are either full or 1 (broadcast), all held in one :class:`Operands`. Pure
JAX: importing this module never imports Flax.

Both implementations compute in float32 (float64 for float64 inputs: :func:`compute_dtype`)
and return the output in that dtype with the row log-sum-exp ``lse`` (``-inf`` for a row with
no visible key). Both are ``jax.custom_jvp`` functions with one tangent, written here once
(:func:`tangent_tile`); reverse mode is JAX's transpose of it, so ``jvp``, ``grad``, ``grad`` of
``grad`` and ``jax.export`` all work. The tangent takes the unrounded output and probabilities,
so the backward pass's ``rowsum(dO · O)`` matches the probabilities it multiplies (the
backward pass of FlashAttention-2, Dao 2023): bf16/fp16 gradients are as accurate as float32
arithmetic on the rounded inputs allows.

* :func:`exact` materialises the scores, one softmax per row; causal/local rows are computed in
  query chunks that only touch the keys those rows may see.
* :mod:`~transformer_jax.attention.blockwise` is the online softmax over key blocks.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import threefry2x32_p

from transformer_jax.attention import random_bits

# The exact path splits rows whose keys are bounded into query chunks of at least _MIN_CHUNK
# rows, each touching only the keys its rows may see. Every chunk is compiled separately (its
# forward, tangent and transpose), so compile time grows with their number. A causal mask gets
# two halves: they skip a quarter of the scores, and more chunks would skip at most another
# quarter at a compile cost well above jax.nn's. A window bounded on both sides saves far more
# per chunk, so it gets up to _MAX_CHUNKS.
_CAUSAL_CHUNKS = 2
_MAX_CHUNKS = 8
_MIN_CHUNK = 128
# Floor for a row's running max: far below any real logit, far above -inf.
FLOOR = -1e30


@dataclasses.dataclass(frozen=True)
class Spec:
    """Hashable static settings: mask structure, block sizes and dropout."""

    is_causal: bool
    window: tuple[int, int] | None  # (left, right) keys allowed around each query
    block_q: int
    block_k: int
    dropout_rate: float = 0.0
    dropout_broadcast: bool = False  # one dropout mask shared by every example and head
    precision: Any = None  # of every matmul (a jax.lax.Precision, or a pair of them), as jnp


class Operands(NamedTuple):
    """One example's arrays in the grouped layout (a pytree; ``None`` where absent).

    The kernels take this one tuple instead of nine positional arrays; a tile's computation
    passes a copy whose ``q``/``k``/``v`` are the tile's rows and columns
    (``ops._replace(q=..., k=...)``) while ``bias``/``mask`` stay whole and are sliced there.
    """

    q: jax.Array  # [K, G, T, H]
    k: jax.Array  # [K, S, H]
    v: jax.Array | None  # [K, S, H]; None when only the probabilities are wanted
    bias: jax.Array | None  # [Kb, Gb, Tb, Sb]
    scale: jax.Array | None  # logit scale, or None where it was folded into q
    mask: jax.Array | None  # boolean [Kb, Gb, Tb, Sb]
    q_len: jax.Array | None  # int scalar: queries at or beyond it are padding
    kv_len: jax.Array | None  # int scalar: keys at or beyond it are padding
    seeds: jax.Array | None  # uint32 [K, G] dropout seeds, or None without dropout


class Tangents(NamedTuple):
    """Tangents of (q, k, v, bias, scale), each ``None`` where it is zero."""

    q: jax.Array | None
    k: jax.Array | None
    v: jax.Array | None
    bias: jax.Array | None
    scale: jax.Array | None


def compute_dtype(x: jax.Array) -> Any:
    """The dtype logits, softmax and outputs are computed in: float32, or float64 for float64
    inputs (as ``jax.nn``, which promotes the query's dtype with float32)."""
    return jnp.promote_types(x.dtype, jnp.float32)


def nonzero_tangents(tangents: Operands) -> Tangents:
    """The float inputs' tangents of a ``custom_jvp`` rule with ``symbolic_zeros=True``, in
    the compute dtype: cast here, once, the transposed rule sums every block's cotangents in
    that dtype and rounds them to the inputs' dtype once, at the end (not block by block)."""
    zero = jax.custom_derivatives.SymbolicZero
    return Tangents(*(None if t is None or isinstance(t, zero) else t.astype(compute_dtype(t))
                      for t in tangents[:5]))


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


def band(spec: Spec) -> tuple[int | None, int | None]:
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
    if x is None:
        return None
    if x.shape[-2] != 1:
        x = jax.lax.dynamic_slice_in_dim(x, row0, rows, axis=x.ndim - 2)
    if x.shape[-1] != 1:
        x = jax.lax.dynamic_slice_in_dim(x, col0, cols, axis=x.ndim - 1)
    return x


def scores(spec: Spec, tile: Operands, row0, col0, masked: bool = True) -> jax.Array:
    """Logits [K, G, rows, cols] (compute dtype) of ``tile.q`` [K, G, rows, H] against
    ``tile.k`` [K, cols, H], whose first row and column are (row0, col0).

    ``tile.bias``/``tile.mask`` are the whole [Kb, Gb, Tb, Sb] arrays, sliced here. Pairs the
    masks rule out are -inf; with ``masked=False`` nothing is masked.
    """
    q, k = tile.q, tile.k
    rows, cols = q.shape[2], k.shape[1]
    s = jnp.einsum("kgth,ksh->kgts", q, k, preferred_element_type=compute_dtype(q),
                   precision=spec.precision)
    if tile.scale is not None:
        s = s * tile.scale
    if tile.bias is not None:
        s = s + slice_2d(tile.bias, row0, rows, col0, cols).astype(s.dtype)
    if not masked:
        return s
    ok = valid(spec, row0, rows, col0, cols, tile.q_len, tile.kv_len)
    if tile.mask is not None:
        ok = ok & slice_2d(tile.mask, row0, rows, col0, cols)
    return jnp.where(ok, s, -jnp.inf)


# --------------------------------------------------------------------------------------
# Dropout on the probabilities: a counter-based hash of (head seed, t, s), so that every
# implementation and every block size drops the same entries.
# --------------------------------------------------------------------------------------


def head_seeds(spec: Spec, seed, K: int, G: int):
    """uint32 [K, G] per-head seeds from one example's uint32 [2] ``seed`` (one Threefry call
    per head; the per-element bits are a hash, :mod:`~transformer_jax.attention.random_bits`)."""
    if seed is None or not spec.dropout_rate:
        return None
    head = jnp.arange(K * G, dtype=jnp.uint32).reshape(K, G)
    if spec.dropout_broadcast:
        head = jnp.zeros_like(head)
    args = jnp.broadcast_arrays(seed[0], seed[1], head, jnp.uint32(0x9E3779B9))
    return threefry2x32_p.bind(*args)[0]


def dropout_multiplier(spec: Spec, seeds, row0, rows: int, col0, cols: int):
    """Float32 [K, G, rows, cols]: 0 where dropped, 1 / (1 - rate) where kept; or None.

    Entry (t, s) of head h is dropped when ``hashed_bits(seed_h, t, s)`` falls below
    rate · 2^32: a function of the head's seed and the absolute (query, key) position only, so
    every implementation and block size drops the same entries.
    """
    if seeds is None:
        return None
    t = (row0 + jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0)).astype(jnp.uint32)
    s = (col0 + jax.lax.broadcasted_iota(jnp.int32, (1, cols), 1)).astype(jnp.uint32)
    bits = random_bits.hashed_bits(seeds[..., None, None], t, s)
    keep = bits >= random_bits.threshold(spec.dropout_rate)
    return jnp.where(keep, jnp.float32(1.0 / (1.0 - spec.dropout_rate)), 0.0)


# --------------------------------------------------------------------------------------
# The tangent of one tile, shared by both implementations.
# --------------------------------------------------------------------------------------


def _add(a, b):
    return b if a is None else a + b


def tangent_tile(p, drop, tile: Operands, t: Tangents, precision=None):
    """One tile's share of the output tangent: ``(Σ_s p̃ v̇ + Σ_s p̃ ṡ v, Σ_s p ṡ)``.

    ``p`` [K, G, rows, cols] holds the tile's normalised probabilities (0 where masked),
    ``drop`` the dropout multipliers (p̃ = p · drop) or None, ``ṡ = scale (q̇ kᵀ + q k̇ᵀ) +
    ṡcale q kᵀ + ḃ`` the logits' tangent, ``tile`` the tile's q, k, v and scale and ``t``
    the tile's tangents (its bias tangent sliced to the tile; the value tangent transposed,
    [K, H, cols], so that the transpose's
    product p̃ᵀ · dO comes out as a plain [H, rows] x [rows, cols] matmul, which XLA's CPU
    backend hands to its fast matmul library). With o = Σ_s p̃ v and ṗ = p (ṡ - Σ_s p ṡ), the
    output tangent is the first term minus ``(Σ_s p ṡ) · o``; the second term is also the
    tangent of the row's log-sum-exp.
    Everything is in the compute dtype (``p``'s), so JAX's transpose of it is an accurate
    backward pass.
    """
    ct = p.dtype
    q, k, v, scale = tile.q, tile.k, tile.v, tile.scale
    assert v is not None

    def qk(a, b):
        return jnp.einsum("kgth,ksh->kgts", a.astype(ct), b.astype(ct), precision=precision)

    ds = None
    if t.q is not None:
        ds = qk(t.q, k)
    if t.k is not None:
        ds = _add(ds, qk(q, t.k))
    if ds is not None and scale is not None:
        ds = ds * scale
    if t.scale is not None:
        ds = _add(ds, t.scale * qk(q, k))
    if t.bias is not None:
        ds = _add(ds, t.bias.astype(ct))
    acc, lse_t = None, None
    if ds is not None:
        pds = p * ds
        lse_t = jnp.sum(pds, axis=-1)
        pds = pds if drop is None else pds * drop
        acc = jnp.einsum("kgts,ksh->kgth", pds, v.astype(ct), precision=precision)
    if t.v is not None:
        pv = p if drop is None else p * drop
        acc = _add(acc, jnp.einsum("kgts,khs->kgth", pv, t.v, precision=precision))
    return acc, lse_t


def output_tangent(acc, lse_t, out):
    """Assemble the tangents of (out, lse) from :func:`tangent_tile` sums (None is zero)."""
    if lse_t is None:
        lse_t = jnp.zeros(out.shape[:-1], out.dtype)
    else:
        acc = _add(acc, -lse_t[..., None] * out)
    return (jnp.zeros_like(out) if acc is None else acc), lse_t


# --------------------------------------------------------------------------------------
# Exact path: materialise the scores, one softmax per row.
# --------------------------------------------------------------------------------------


def row_chunks(spec: Spec, T, S) -> list[tuple[Any, Any, Any, Any]]:
    """Static (row0, row1, col0, col1) chunks covering every key each query may see.

    Symbolic T or S (``jax.export``) get one chunk: its bounds are not known here (hence
    ``Any``: the bounds are ints or symbolic dimensions).
    """
    if not isinstance(T, (int, np.integer)) or not isinstance(S, (int, np.integer)):
        return [(0, T, 0, S)]
    below, above = band(spec)
    if below is not None:
        n = min(_MAX_CHUNKS, T // _MIN_CHUNK)
    elif above is not None:
        n = min(_CAUSAL_CHUNKS, T // _MIN_CHUNK)
    else:
        n = 1
    n = max(n, 1)
    bounds = [round(i * T / n) for i in range(n + 1)]
    chunks = []
    for r0, r1 in itertools.pairwise(bounds):
        c0 = 0 if below is None else max(0, r0 - below)  # the chunk's first query, r0
        c1 = S if above is None else min(S, r1 + above)  # its last query, r1 - 1
        chunks.append((r0, r1, c0, max(c0, c1)))
    return chunks


def softmax_parts(s: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(unnormalised probabilities, row sums, log-sum-exp) of logits [..., cols].

    Softmax is shift-invariant, so the max needs no gradient. An all-masked row has max -inf:
    flooring it at a finite value makes exp() give exact zeros (not NaN); its lse is -inf.
    """
    m = jnp.maximum(jax.lax.stop_gradient(jnp.max(s, axis=-1)), FLOOR)
    p = jnp.exp(s - m[..., None])
    denom = jnp.sum(p, axis=-1)
    lse = jnp.where(denom > 0, m + jnp.log(jnp.where(denom > 0, denom, 1.0)), -jnp.inf)
    return p, denom, lse


def _over_rows(spec: Spec, ops: Operands, chunk, empty) -> tuple[jax.Array, ...]:
    """Concatenate the tuples ``chunk(r0, r1, c0, c1)`` over the row chunks (axis 2); a chunk
    with no visible key gets ``empty(rows)`` without computing anything."""
    parts = []
    for r0, r1, c0, c1 in row_chunks(spec, ops.q.shape[2], ops.k.shape[1]):
        width = c1 - c0
        none_visible = isinstance(width, (int, np.integer)) and width == 0
        parts.append(empty(r1 - r0) if none_visible else chunk(r0, r1, c0, c1))
    return tuple(jnp.concatenate(xs, axis=2) if len(xs) > 1 else xs[0] for xs in zip(*parts))


def _tile(ops: Operands, r0, r1, c0, c1) -> Operands:
    """Rows r0:r1 of q and columns c0:c1 of k and v (bias and mask stay whole)."""
    return ops._replace(q=ops.q[:, :, r0:r1], k=ops.k[:, c0:c1],
                        v=None if ops.v is None else ops.v[:, c0:c1])


def _normalised(spec: Spec, tile: Operands, r0, c0) -> tuple[jax.Array, jax.Array]:
    """(probabilities [K, G, rows, cols], lse [K, G, rows]) of one tile."""
    p, denom, lse = softmax_parts(scores(spec, tile, r0, c0))
    return p / jnp.where(denom > 0, denom, 1.0)[..., None], lse


def _pv(spec: Spec, p, drop, v) -> jax.Array:
    """Σ_s p̃ v: [K, G, rows, cols] x [K, cols, H] -> [K, G, rows, H], p̃ = p · drop."""
    return jnp.einsum("kgts,ksh->kgth", p if drop is None else p * drop, v.astype(p.dtype),
                      precision=spec.precision)


def _exact_forward(spec: Spec, ops: Operands) -> tuple[jax.Array, jax.Array]:
    Kh, G, _, H = ops.q.shape

    def chunk(r0, r1, c0, c1):
        tile = _tile(ops, r0, r1, c0, c1)
        p, denom, lse = softmax_parts(scores(spec, tile, r0, c0))
        drop = dropout_multiplier(spec, ops.seeds, r0, r1 - r0, c0, c1 - c0)
        # Normalise after the PV product: a [rows, H] divide instead of a [rows, cols] one.
        o = _pv(spec, p, drop, tile.v)
        return o / jnp.where(denom > 0, denom, 1.0)[..., None], lse

    def empty(rows):
        return (jnp.zeros((Kh, G, rows, H), compute_dtype(ops.q)),
                jnp.full((Kh, G, rows), -jnp.inf, compute_dtype(ops.q)))

    out, lse = _over_rows(spec, ops, chunk, empty)
    return out, lse


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def exact(spec: Spec, ops: Operands) -> tuple[jax.Array, jax.Array]:
    """Exact attention on the grouped layout: (out [K, G, T, H], lse [K, G, T]), compute dtype."""
    return _exact_forward(spec, ops)


def _exact_jvp(spec: Spec, primals, tangents):
    (ops,), t = primals, nonzero_tangents(tangents[0])
    Kh, G, _, H = ops.q.shape

    def chunk(r0, r1, c0, c1):
        tile = _tile(ops, r0, r1, c0, c1)
        p, lse = _normalised(spec, tile, r0, c0)
        drop = dropout_multiplier(spec, ops.seeds, r0, r1 - r0, c0, c1 - c0)
        out = _pv(spec, p, drop, tile.v)
        tile_t = Tangents(None if t.q is None else t.q[:, :, r0:r1],
                          None if t.k is None else t.k[:, c0:c1],
                          None if t.v is None else jnp.swapaxes(t.v[:, c0:c1], 1, 2),
                          slice_2d(t.bias, r0, r1 - r0, c0, c1 - c0), t.scale)
        acc, lse_t = tangent_tile(p, drop, tile, tile_t, spec.precision)
        return (out, lse) + output_tangent(acc, lse_t, out)

    def empty(rows):
        zeros = jnp.zeros((Kh, G, rows, H), compute_dtype(ops.q))
        return zeros, jnp.full_like(zeros[..., 0], -jnp.inf), zeros, zeros[..., 0]

    out, lse, out_t, lse_t = _over_rows(spec, ops, chunk, empty)
    return (out, lse), (out_t, lse_t)


exact.defjvp(_exact_jvp, symbolic_zeros=True)


def probabilities(spec: Spec, ops: Operands) -> jax.Array:
    """Attention probabilities [K, G, T, S] (compute dtype; rows with no visible key are 0)."""
    Kh, G = ops.q.shape[:2]
    S = ops.k.shape[1]

    def chunk(r0, r1, c0, c1):
        p, _ = _normalised(spec, _tile(ops, r0, r1, c0, c1), r0, c0)
        return (jnp.pad(p, ((0, 0), (0, 0), (0, 0), (c0, S - c1))),)

    return _over_rows(spec, ops, chunk,
                      lambda rows: (jnp.zeros((Kh, G, rows, S), compute_dtype(ops.q)),))[0]
