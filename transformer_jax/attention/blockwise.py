"""Blockwise attention: an online softmax over key blocks, O(T) memory.

Internal, like :mod:`~transformer_jax.attention.kernels` (whose grouped layout, masks, dropout
and tangent it uses). The forward pass is the online softmax of Rabe & Staats (2021) and
FlashAttention (Dao et al. 2022): per query block, a running max, row sum and output over the
key blocks, never materialising the T×S scores. Blocks that a causal/local mask or the
sequence lengths rule out entirely are skipped by the loop bounds, not computed then masked.

Derivatives come from a ``jax.custom_jvp`` whose tangent recomputes each block's probabilities
from the saved row log-sum-exp: a fixed-length loop over key blocks (a ``lax.switch`` skips the
blocks the mask rules out), each step under ``jax.checkpoint``. JAX transposes it into the
FlashAttention-2 backward pass (one more sweep over the blocks, O(T) residuals); because its
loops have static lengths, forward mode and ``grad`` of ``grad`` work too.

Sharded inputs: every loop carry and every skipped branch is built from an input block with
``full_like`` and no new shape, so it has the input's type in full: the manual axes it varies
over (``shard_map``'s ``check_vma``) and its sharding under an Explicit mesh (where a carry
must keep one sharding across iterations). All heads go through one loop: slicing the head
axis would move data between devices wherever the heads are sharded.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from transformer_jax.attention.kernels import (
    Operands,
    Spec,
    Tangents,
    band,
    compute_dtype,
    dropout_multiplier,
    nonzero_tangents,
    output_tangent,
    scores,
    tangent_tile,
)

# (query, key) block sizes. Each loop iteration multiplies a 512-row query block by a 256-key
# block: big enough that the per-iteration cost of the loop is paid rarely and XLA's CPU
# runtime spreads the matmuls over the cores, small enough (with the head groups below) to
# stay in cache.
DEFAULT_BLOCK = (512, 256)


class _Layout(NamedTuple):
    """Static facts of one call: the settings, the unpadded T and S, and whether the caller
    gave sequence lengths (then only the mask structure, not the lengths, may skip a block in
    the tangent's loop, whose step choice must not depend on batched values)."""

    spec: Spec
    T: int
    S: int
    has_lengths: bool


def _ceil_div(a, b: int):
    return -((-a) // b)


def block_bounds(spec: Spec, i, n: int, q_len, kv_len, has_mask: bool, transposed=False):
    """Loop bounds ``(lo, a, b, hi)`` over the ``n`` inner blocks seen from outer block ``i``.

    Outer blocks are query blocks and inner blocks key blocks; with ``transposed`` it is the
    other way round (one key block at a time).
    Inner blocks outside ``[lo, hi)`` hold no pair that the causal mask, the window or the
    sequence lengths allow: they are skipped, not computed then masked.
    Within that range, every pair of the blocks in ``[a, b)`` is allowed, so those need no mask
    (no iota, compare or select per score, which is most of the elementwise work of a block on
    a CPU); only the blocks at the edges of the triangle, the window or the padding are masked.
    An arbitrary boolean mask (``has_mask``) may hide anything, and then ``a == b == lo``.
    """
    below, above = band(spec)
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


def _forward(spec: Spec, ops: Operands) -> tuple[jax.Array, jax.Array]:
    """ops.q [nq, K, G, bq, H], ops.k/v [nk, K, bk, H] -> out [nq, K, G, bq, H],
    lse [nq, K, G, bq]."""
    qb, kb, vb = ops.q, ops.k, ops.v
    assert vb is not None
    nq, bq = qb.shape[0], qb.shape[3]
    nk, bk = kb.shape[0], kb.shape[2]
    ct = compute_dtype(qb)

    def query_block(i):
        q_i = qb[i]

        def step(j, carry, masked=True):
            m, l, acc = carry
            s = scores(spec, ops._replace(q=q_i, k=kb[j]), i * bq, j * bk, masked)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
            p = jnp.exp(s - m_safe[..., None])
            correction = jnp.exp(m - m_safe)  # rescales what earlier blocks accumulated
            l = l * correction + jnp.sum(p, axis=-1)
            drop = dropout_multiplier(spec, ops.seeds, i * bq, bq, j * bk, bk)
            pv = jnp.einsum("kgqc,kch->kgqh", p if drop is None else p * drop,
                            vb[j].astype(acc.dtype), precision=spec.precision)
            return m_new, l, acc * correction[..., None] + pv

        row = q_i[..., 0]  # [K, G, bq]: the carries take q's full type (see the docstring)
        init = (jnp.full_like(row, -jnp.inf, ct), jnp.full_like(row, 0.0, ct),
                jnp.full_like(q_i, 0.0, ct))
        bounds = block_bounds(spec, i, nk, ops.q_len, ops.kv_len, ops.mask is not None)
        m, l, acc = _over_blocks(bounds, step, init)
        out = jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
        lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
        return out, lse

    return jax.lax.map(query_block, jnp.arange(nq, dtype=jnp.int32))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _blockwise(layout: _Layout, ops: Operands) -> tuple[jax.Array, jax.Array]:
    return _forward(layout.spec, ops)


def _tangent_block(spec: Spec, branch, i, j, tile: Operands, lse_i, t: Tangents):
    """(output-tangent sum, lse tangent) of query block i (``tile.q``) against key block j
    (``tile.k``, ``tile.v``).

    ``branch`` 0 skips the block, 1 computes it masked, 2 unmasked. ``t`` holds this block's
    tangents. The probabilities come back from the saved lse (+inf for a row with no visible
    key, so they are 0 there).
    """
    q_i = tile.q
    bq, bk = q_i.shape[2], tile.k.shape[1]
    ct = compute_dtype(q_i)

    def zeros():  # zeros of q's full type (see the module docstring)
        return jnp.full_like(q_i, 0.0, ct), jnp.full_like(q_i[..., 0], 0.0, ct)

    def compute(masked):
        s = scores(spec, tile, i * bq, j * bk, masked)
        p = jnp.exp(s - lse_i[..., None])
        drop = dropout_multiplier(spec, tile.seeds, i * bq, bq, j * bk, bk)
        acc, lse_t = tangent_tile(p, drop, tile, t, spec.precision)
        acc0, lse_t0 = zeros()
        return (acc0 if acc is None else acc), (lse_t0 if lse_t is None else lse_t)

    return jax.lax.switch(branch, [zeros, lambda: compute(True), lambda: compute(False)])


def _bias_blocks(x, nq: int, bq: int, nk: int, bk: int):
    """[Kb, Gb, Tb, Sb] -> [nq, nk, Kb, Gb, bq or 1, bk or 1] (a broadcast axis stays 1)."""
    if x is None:
        return None
    Kb, Gb, Tb, Sb = x.shape
    rows = (nq, bq) if Tb != 1 else (1, 1)
    cols = (nk, bk) if Sb != 1 else (1, 1)
    x = x.reshape(Kb, Gb, *rows, *cols).transpose(2, 4, 0, 1, 3, 5)
    return jnp.broadcast_to(x, (nq, nk) + x.shape[2:])


def _tangent(layout: _Layout, ops: Operands, out, lse, t: Tangents):
    """Tangents of (out, lse): per query block, a fixed-length loop over all key blocks.

    The blocks (of the primals and tangents) enter the loops as their scanned-over inputs, so
    that the transpose writes each block's cotangent once instead of adding a full-size array
    per step, and the checkpointed step's residuals are those inputs, not copies.
    """
    spec = layout.spec
    nq, nk = ops.q.shape[0], ops.k.shape[0]
    lse = jnp.where(jnp.isneginf(lse), jnp.inf, lse)
    # Checkpointed, the step's transpose recomputes its probabilities instead of saving
    # [nq, nk] blocks of them: the reverse pass keeps O(T) memory.
    block = jax.checkpoint(functools.partial(_tangent_block, spec), prevent_cse=False,
                           policy=jax.checkpoint_policies.nothing_saveable)
    bias_t = _bias_blocks(t.bias, nq, spec.block_q, nk, spec.block_k)
    v_t = None if t.v is None else jnp.swapaxes(t.v, 2, 3)  # [nk, K, H, bk]: see tangent_tile

    def query_block(xs):
        i, q_i, q_t, out_i, lse_i, bias_t_i = xs
        # The lengths (batched under vmap) must not pick the step; the masked step applies them.
        lo, a, b, hi = block_bounds(spec, i, nk, layout.T, layout.S,
                                    ops.mask is not None or layout.has_lengths)

        def step(carry, xs):
            j, k_j, v_j, k_t, v_t, bias_t_ij = xs
            branch = jnp.where((j < lo) | (j >= hi), 0, jnp.where((j >= a) & (j < b), 2, 1))
            acc, lse_t = block(branch, i, j, ops._replace(q=q_i, k=k_j, v=v_j), lse_i,
                               Tangents(q_t, k_t, v_t, bias_t_ij, t.scale))
            return (carry[0] + acc, carry[1] + lse_t), None

        zeros = jnp.full_like(out_i, 0.0)
        (acc, lse_t), _ = jax.lax.scan(step, (zeros, zeros[..., 0]),
                                       (jnp.arange(nk, dtype=jnp.int32), ops.k, ops.v, t.k,
                                        v_t, bias_t_i))
        return output_tangent(acc, lse_t, out_i)

    return jax.lax.map(query_block,
                       (jnp.arange(nq, dtype=jnp.int32), ops.q, t.q, out, lse, bias_t))


def _blockwise_jvp(layout: _Layout, primals, tangents):
    (ops,) = primals
    out, lse = _blockwise(layout, ops)
    return (out, lse), _tangent(layout, ops, out, lse, nonzero_tangents(tangents[0]))


_blockwise.defjvp(_blockwise_jvp, symbolic_zeros=True)


def _pad_axis(x, axis: int, size: int, value=0):
    """Pad axis of x up to size (no-op for broadcast axes of size 1)."""
    if x is None or x.shape[axis] in (1, size):
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def blockwise(spec: Spec, ops: Operands) -> tuple[jax.Array, jax.Array]:
    """Blockwise attention on the grouped layout: (out [K, G, T, H], lse [K, G, T]) in the
    compute dtype.

    Pads T and S up to whole blocks; T = 0 or S = 0 returns zeros without a loop.
    """
    q, k, v = ops.q, ops.k, ops.v
    assert v is not None
    Kh, G, T, H = q.shape
    S = k.shape[1]
    if T == 0 or S == 0:
        ct = compute_dtype(q)
        return jnp.zeros((Kh, G, T, H), ct), jnp.full((Kh, G, T), -jnp.inf, ct)
    bq, bk = min(spec.block_q, T), min(spec.block_k, S)
    layout = _Layout(dataclasses.replace(spec, block_q=bq, block_k=bk), T, S,
                     ops.q_len is not None or ops.kv_len is not None)
    nq, nk = _ceil_div(T, bq), _ceil_div(S, bk)
    Tp, Sp = nq * bq, nk * bk
    q_len = jnp.int32(T) if ops.q_len is None else jnp.minimum(ops.q_len, T).astype(jnp.int32)
    kv_len = (jnp.int32(S) if ops.kv_len is None
              else jnp.minimum(ops.kv_len, S).astype(jnp.int32))
    q = _pad_axis(q, 2, Tp)
    k, v = _pad_axis(k, 1, Sp), _pad_axis(v, 1, Sp)
    bias = _pad_axis(_pad_axis(ops.bias, 2, Tp), 3, Sp)
    mask = _pad_axis(_pad_axis(ops.mask, 2, Tp, False), 3, Sp, False)
    blocked = ops._replace(
        q=q.reshape(Kh, G, nq, bq, H).transpose(2, 0, 1, 3, 4),  # [nq, K, G, bq, H]
        k=k.reshape(Kh, nk, bk, H).transpose(1, 0, 2, 3),  # [nk, K, bk, H]
        v=v.reshape(Kh, nk, bk, H).transpose(1, 0, 2, 3),
        bias=bias, mask=mask, q_len=q_len, kv_len=kv_len)
    out, lse = _blockwise(layout, blocked)  # [nq, K, G, bq, H], [nq, K, G, bq]
    return (out.transpose(1, 2, 0, 3, 4).reshape(Kh, G, Tp, H)[:, :, :T],
            lse.transpose(1, 2, 0, 3).reshape(Kh, G, Tp)[:, :, :T])
