"""Ring attention: exact attention over a sequence sharded across devices (context parallelism).

q, k and v are split along T and S over one mesh axis of P devices. Each device keeps its
query block; the key/value blocks travel around the ring (``lax.ppermute`` to the next device)
so that after P steps every query block has met every key block (Liu et al. 2023, "Ring
Attention with Blockwise Transformers"). The partial results of the steps are merged with
their row log-sum-exps, the same rescaling as the blockwise kernel's online softmax
(:mod:`~transformer_jax.attention.blockwise`): no device ever holds the whole sequence.

The backward pass (a ``jax.custom_vjp``) rotates the blocks again: the key/value gradients
travel with their blocks and arrive home after P hops, so it needs no all-gather either. Each
step recomputes its probabilities from the saved log-sum-exp (FlashAttention-2's backward
pass, Dao 2023). A step whose block the causal mask or the window hides entirely is skipped
(a ``lax.cond`` per device), its send still made so the ring stays in step.

Within a step, the key/value block is consumed in sub-blocks of ``block_size`` keys with the
same online softmax, so a step holds [B, N, T/P, block_size] scores at a time and per-device
memory is O(T/P); sub-blocks the masks hide entirely are skipped too. The next block's send is
issued before the step's matmuls, which lets XLA overlap the transfer with them.

Axis legend: B batch, T query length, S key length, N query heads, K key/value heads, H head
dim, G = N // K, P the size of the mesh axis.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from transformer_jax.attention import kernels
from transformer_jax.attention.checks import normalise


class _Ring(NamedTuple):
    """Static settings (hashable): masks and precision, the logit scale, the ring."""

    spec: kernels.Spec
    scale: float
    axis_name: str
    size: int  # P
    block: int  # keys per sub-block within a step


def _key_blocks(ring: _Ring, x):
    """[B, K, Sk, H] -> [n, B, K, bk, H]: sub-blocks of ``bk`` keys, the largest divisor of Sk
    that is at most ``ring.block``, along a leading axis for ``lax.scan``."""
    B, K, Sk, H = x.shape
    bk = max(d for d in range(1, min(ring.block, Sk) + 1) if Sk % d == 0)
    return jnp.moveaxis(x.reshape(B, K, Sk // bk, bk, H), 2, 0)


def _tile_logits(ring: _Ring, q, k, row0, col0, q_lens, kv_lens):
    """Masked logits [B, K, G, Tq, Sk] of q [B, K, G, Tq, H] against k [B, K, Sk, H]."""
    s = jnp.einsum("bkgth,bksh->bkgts", q, k, precision=ring.spec.precision,
                   preferred_element_type=kernels.compute_dtype(q)) * ring.scale
    rows, cols = q.shape[3], k.shape[2]
    ok = kernels.valid(ring.spec, row0, rows, col0, cols,
                       None if q_lens is None else q_lens[:, None, None],
                       None if kv_lens is None else kv_lens[:, None, None])
    ok = jnp.reshape(ok, (-1, 1, 1, rows, cols))  # [B or 1, 1, 1, Tq, Sk]
    return jnp.where(ok, s, -jnp.inf)


def _visible(ring: _Ring, row0, rows: int, col0, cols: int, kv_lens):
    """Whether any (query, key) pair of the tile may be visible (else the step is skipped)."""
    below, above = kernels.band(ring.spec)
    ok = jnp.bool_(True)
    if above is not None:  # the tile's first key is at most its last query + above
        ok &= col0 <= row0 + rows - 1 + above
    if below is not None:  # its last key is at least its first query - below
        ok &= col0 + cols - 1 >= row0 - below
    if kv_lens is not None:
        ok &= col0 < jnp.max(kv_lens)
    return ok


def _tile_forward(ring: _Ring, q, k, v, row0, col0, q_lens, kv_lens):
    """(normalised output [B, K, G, Tq, H], lse [B, K, G, Tq]) of q against one key/value
    block: the blockwise kernel's online softmax over the block's key sub-blocks."""
    ct = kernels.compute_dtype(q)
    kb, vb = _key_blocks(ring, k), _key_blocks(ring, v)
    bk = kb.shape[3]

    def body(carry, xs):
        j, k_j, v_j = xs
        m, l, acc = carry
        c0 = col0 + j * bk

        def compute():
            s = _tile_logits(ring, q, k_j, row0, c0, q_lens, kv_lens)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
            p = jnp.exp(s - m_safe[..., None])
            correction = jnp.exp(m - m_safe)  # rescales what earlier sub-blocks accumulated
            pv = jnp.einsum("bkgts,bksh->bkgth", p, v_j.astype(ct), precision=ring.spec.precision)
            return m_new, l * correction + jnp.sum(p, axis=-1), acc * correction[..., None] + pv

        visible = _visible(ring, row0, q.shape[3], c0, bk, kv_lens)
        return jax.lax.cond(visible, compute, lambda: (m, l, acc)), None

    row = q[..., 0]
    init = (jnp.full_like(row, -jnp.inf, ct), jnp.full_like(row, 0.0, ct),
            jnp.full_like(q, 0.0, ct))
    (m, l, acc), _ = jax.lax.scan(body, init, (jnp.arange(kb.shape[0]), kb, vb))
    seen = l > 0
    out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
    return out, jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)


def _combine(o, lse, o_r, lse_r):
    """Merge two normalised partial results by their log-sum-exps (-inf: nothing seen)."""
    new = jnp.logaddexp(lse, lse_r)
    safe = jnp.where(jnp.isneginf(new), 0.0, new)
    return (o * jnp.exp(lse - safe)[..., None] + o_r * jnp.exp(lse_r - safe)[..., None], new)


def _send(ring: _Ring, *xs):
    """Each device's arrays to the next device of the ring."""
    perm = [(i, (i + 1) % ring.size) for i in range(ring.size)]
    return tuple(jax.lax.ppermute(x, ring.axis_name, perm) for x in xs)


def _positions(ring: _Ring, q, k, step):
    """(row0, col0): the global first query of this device's block and the first key of the
    block it holds at ``step`` (which came from ``step`` devices back along the ring)."""
    me = jax.lax.axis_index(ring.axis_name)
    return me * q.shape[3], ((me - step) % ring.size) * k.shape[2]


def _forward(ring: _Ring, q, k, v, q_lens, kv_lens):
    ct = kernels.compute_dtype(q)

    def step(r, k, v, o, lse):
        row0, col0 = _positions(ring, q, k, r)
        o_r, lse_r = jax.lax.cond(
            _visible(ring, row0, q.shape[3], col0, k.shape[2], kv_lens),
            lambda: _tile_forward(ring, q, k, v, row0, col0, q_lens, kv_lens),
            lambda: (jnp.full_like(q, 0.0, ct), jnp.full_like(q[..., 0], -jnp.inf, ct)))
        return _combine(o, lse, o_r, lse_r)

    def body(r, carry):
        k, v, o, lse = carry
        k_next, v_next = _send(ring, k, v)  # issued first: the transfer overlaps the step
        return (k_next, v_next) + step(r, k, v, o, lse)

    init = (k, v, jnp.full_like(q, 0.0, ct), jnp.full_like(q[..., 0], -jnp.inf, ct))
    k, v, o, lse = jax.lax.fori_loop(0, ring.size - 1, body, init)
    return step(ring.size - 1, k, v, o, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(ring: _Ring, q, k, v, q_lens, kv_lens):
    return _forward(ring, q, k, v, q_lens, kv_lens)[0]


def _ring_fwd(ring, q, k, v, q_lens, kv_lens):
    o, lse = _forward(ring, q, k, v, q_lens, kv_lens)
    return o, (q, k, v, q_lens, kv_lens, o, lse)


def _tile_backward(ring: _Ring, q, k, v, do, delta, lse, row0, col0, q_lens, kv_lens):
    """(dq, dk, dv) of q against one key/value block, sub-block by sub-block, from the saved
    row lse (+inf where no key is visible, so the probabilities are 0 there)."""
    prec, ct = ring.spec.precision, kernels.compute_dtype(q)
    kb, vb = _key_blocks(ring, k), _key_blocks(ring, v)
    bk = kb.shape[3]

    def body(dq, xs):
        j, k_j, v_j = xs
        c0 = col0 + j * bk

        def compute():
            p = jnp.exp(_tile_logits(ring, q, k_j, row0, c0, q_lens, kv_lens) - lse[..., None])
            dv = jnp.einsum("bkgts,bkgth->bksh", p, do, precision=prec)
            dp = jnp.einsum("bkgth,bksh->bkgts", do, v_j.astype(ct), precision=prec)
            ds = p * (dp - delta[..., None]) * ring.scale
            dk = jnp.einsum("bkgts,bkgth->bksh", ds, q.astype(ct), precision=prec)
            return dq + jnp.einsum("bkgts,bksh->bkgth", ds, k_j.astype(ct), precision=prec), dk, dv

        def skip():
            return dq, jnp.full_like(k_j, 0.0, ct), jnp.full_like(v_j, 0.0, ct)

        dq, dk, dv = jax.lax.cond(_visible(ring, row0, q.shape[3], c0, bk, kv_lens), compute,
                                  skip)
        return dq, (dk, dv)

    dq, (dkb, dvb) = jax.lax.scan(body, jnp.full_like(q, 0.0, ct),
                                  (jnp.arange(kb.shape[0]), kb, vb))
    return dq, (jnp.moveaxis(dkb, 0, 2).reshape(k.shape)), jnp.moveaxis(dvb, 0, 2).reshape(v.shape)


def _ring_bwd(ring, res, do):
    q, k, v, q_lens, kv_lens, o, lse = res
    ct = kernels.compute_dtype(q)
    do = do.astype(ct)
    delta = jnp.sum(do * o, axis=-1)  # rowsum(dO · O), FlashAttention-2's D
    lse = jnp.where(jnp.isneginf(lse), jnp.inf, lse)

    def step(r, k, v, dq, dk, dv):
        row0, col0 = _positions(ring, q, k, r)
        grads = jax.lax.cond(
            _visible(ring, row0, q.shape[3], col0, k.shape[2], kv_lens),
            lambda: _tile_backward(ring, q, k, v, do, delta, lse, row0, col0, q_lens, kv_lens),
            lambda: (jnp.full_like(q, 0.0, ct), jnp.full_like(k, 0.0, ct),
                     jnp.full_like(v, 0.0, ct)))
        return dq + grads[0], dk + grads[1], dv + grads[2]

    def body(r, carry):
        k, v, dq, dk, dv = carry
        dq, dk, dv = step(r, k, v, dq, dk, dv)
        k, v, dk, dv = _send(ring, k, v, dk, dv)  # a block's gradients travel with it
        return k, v, dq, dk, dv

    init = (k, v, jnp.full_like(q, 0.0, ct), jnp.full_like(k, 0.0, ct), jnp.full_like(v, 0.0, ct))
    k_last, v_last, dq, dk, dv = jax.lax.fori_loop(0, ring.size - 1, body, init)
    dq, dk, dv = step(ring.size - 1, k_last, v_last, dq, dk, dv)
    dk, dv = _send(ring, dk, dv)  # the last hop brings each block's gradients home
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


def _local(ring: _Ring, q, k, v, q_lens, kv_lens):
    """Inside the manual axis: this device's blocks q [B, T/P, N, H], k/v [B, S/P, K, H]."""
    B, Tq, N, H = q.shape
    K = k.shape[2]
    qg = q.reshape(B, Tq, K, N // K, H).transpose(0, 2, 3, 1, 4)  # [B, K, G, Tq, H]
    kg, vg = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, Sk, H]
    out = _ring(ring, qg, kg, vg, q_lens, kv_lens)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, Tq, N, H).astype(q.dtype)


def _along_sequence(x, mesh: Mesh, axis_name: str):
    """x [B, L, ...] resharded so that L is split over ``axis_name`` (an Explicit mesh's
    shard_map takes only inputs whose type already says so); other axes keep their sharding."""
    spec = list(getattr(jax.typeof(x).sharding, "spec", None) or ()) + [None] * x.ndim
    spec = [None if s == axis_name or (isinstance(s, tuple) and axis_name in s) else s
            for s in spec[:x.ndim]]
    spec[1] = axis_name
    return jax.reshard(x, NamedSharding(mesh, P(*spec)))


def ring_attention(
    query: ArrayLike, key: ArrayLike, value: ArrayLike, *, mesh: Mesh | None = None,
    axis_name: str, is_causal: bool = False, scale: float | None = None,
    query_seq_lengths: ArrayLike | None = None, key_value_seq_lengths: ArrayLike | None = None,
    local_window_size: int | tuple[int, int] | None = None, block_size: int = 512,
    precision=None,
) -> jax.Array:
    r"""Exact attention with the sequence sharded over a mesh axis (context parallelism).

    Computes the same as :func:`~transformer_jax.attention.dot_product_attention`,

    .. math::

      \mathrm{Attention}(Q, K, V) = \mathrm{softmax}(Q K^T \cdot \mathrm{scale}) V

    with T and S split into P blocks over the mesh axis ``axis_name``: each device keeps its
    query block while the key/value blocks pass around the ring (``lax.ppermute``); no device
    gathers the sequence, forward or backward. Shapes use B batch, T query length, S key
    length, N query heads, K key/value heads (N a multiple of K), H head dim. With ``mesh`` it
    runs its own ``shard_map`` over ``axis_name`` only (other mesh axes keep the caller's
    sharding); inside the caller's ``shard_map`` over ``axis_name``, pass this device's blocks
    ([B, T/P, N, H]) and no mesh.

    Args:
      query: [B, T, N, H]; T a multiple of P (the size of ``axis_name``).
      key: [B, S, K, H]; S a multiple of P.
      value: [B, S, K, H].
      mesh: the ``jax.sharding.Mesh`` holding ``axis_name`` (Auto or Explicit axes).
      axis_name: the mesh axis that splits the sequence.
      is_causal: query t sees keys s <= t; blocks wholly above the diagonal are skipped.
      scale: logit scale, a Python number; default 1/√H.
      query_seq_lengths: optional int [B]; queries at or beyond are padding (zeros).
      key_value_seq_lengths: optional int [B]; keys at or beyond are ignored.
      local_window_size: optional (left, right) sliding window, or one int for both.
      block_size: keys per sub-block within a step (a divisor of S/P is taken).
      precision: precision of the matmuls, as ``jnp.einsum`` takes it.

    Returns:
      [B, T, N, H] in the dtype of ``query``, sharded as ``query``.

    Raises:
      ValueError: no mesh with ``axis_name``, T or S not multiples of P, or a traced scale.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from transformer_jax.attention import ring_attention
      >>> mesh = jax.make_mesh((4,), ("seq",), devices=jax.devices()[:4])
      >>> q = k = v = jnp.ones((2, 64, 8, 32))   # [B, T, N, H]: 16 positions per device
      >>> ring_attention(q, k, v, mesh=mesh, axis_name="seq", is_causal=True).shape
      (2, 64, 8, 32)
    """
    call = normalise(query, key, value, None, None, query_seq_lengths, key_value_seq_lengths,
                     rank=4, names=("query_seq_lengths", "key_value_seq_lengths"), scale=scale,
                     is_causal=is_causal, local_window_size=local_window_size,
                     precision=precision)
    a = call.arrays
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if not isinstance(a.scale, float):
        raise ValueError(  # noqa: TRY004 (jax.nn raises ValueError for bad arguments)
            f"ring_attention takes scale as a Python number, got {scale!r}")
    context = jax.sharding.get_abstract_mesh()
    inside = axis_name in getattr(context, "manual_axes", ())
    if inside:
        ring = _Ring(call.spec, a.scale, axis_name, context.shape[axis_name], block_size)
        return _local(ring, a.query, a.key, a.value, a.q_lens, a.kv_lens)
    if mesh is None or axis_name not in mesh.axis_names:
        where = "no mesh" if mesh is None else f"mesh axes {mesh.axis_names}"
        raise ValueError(f"ring_attention needs mesh= with the axis {axis_name!r} (got "
                         f"{where}), or a shard_map over {axis_name!r} around the call")
    size = mesh.shape[axis_name]
    T, S = a.query.shape[1], a.key.shape[1]
    if T % size or S % size:
        raise ValueError(f"ring_attention splits T and S into {size} blocks over "
                         f"{axis_name!r}: both must be multiples of {size}, got T={T}, S={S}")
    ring = _Ring(call.spec, a.scale, axis_name, size, block_size)
    q, k, v = a.query, a.key, a.value
    if mesh.axis_types[mesh.axis_names.index(axis_name)] == AxisType.Explicit:
        q, k, v = (_along_sequence(x, mesh, axis_name) for x in (q, k, v))
    seq = P(None, axis_name)
    return jax.shard_map(functools.partial(_local, ring), mesh=mesh, axis_names={axis_name},
                         in_specs=(seq, seq, seq, P(), P()), out_specs=seq)(
        q, k, v, a.q_lens, a.kv_lens)
