"""From a normalised call to the kernels: the grouped layout, ``vmap`` over B, ``jit``.

The kernels (:mod:`~transformer_jax.attention.kernels`,
:mod:`~transformer_jax.attention.blockwise`) are written for ONE example in the grouped layout
``q[K, G, T, H]``; this module turns one example of a :class:`~.checks.Call` into that layout
(:func:`operands`), runs it under ``jax.vmap`` over the batch and compiles it with ``jax.jit``.
Two computations share that path: the attention output (:func:`run`) and the probabilities
alone (:func:`probabilities`, for ``attention_weights``). Mask and bias batch axes of size 1
are broadcast by ``vmap`` (``in_axes=None``), not copied. :func:`run` also passes a call to
``jax.nn.dot_product_attention`` when :mod:`~transformer_jax.attention.dispatch` picks "xla"
or "cudnn".

Axis legend: B batch, T query length, S key length, N query heads, K key/value heads, H head
dim, G = N // K.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.attention import dispatch, kernels
from transformer_jax.attention.blockwise import blockwise
from transformer_jax.attention.checks import Arrays, Call


def _to_grouped(x, N: int, K: int):
    """[Nb, Tb, Sb] broadcastable mask/bias -> [Kb, Gb, Tb, Sb] matching the grouped layout."""
    if x is None:
        return None
    x = jnp.reshape(x, (1,) * (3 - np.ndim(x)) + tuple(np.shape(x)))
    if x.shape[0] == 1:
        return x[None]
    return x.reshape(K, N // K, *x.shape[1:])


def _zero_padding(x, length):
    """Rows of x [L, ...] at or beyond ``length`` set to 0, so that garbage there (NaN in an
    uninitialised buffer) reaches neither the output nor any gradient: 0 · NaN is NaN."""
    if length is None:
        return x
    keep = jnp.arange(x.shape[0]) < length
    return jnp.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros((), x.dtype))


def operands(spec: kernels.Spec, one: Arrays) -> kernels.Operands:
    """One example (``query[T, N, H]``, ``key``/``value[S, K, H]``, ``rng`` its uint32 [2]
    seed) in the kernels' grouped layout."""
    T, N, H = one.query.shape
    S, K = one.key.shape[0], one.key.shape[1]
    q_len = None if one.q_lens is None else jnp.clip(one.q_lens, 0, T)
    kv_len = None if one.kv_lens is None else jnp.clip(one.kv_lens, 0, S)
    query, key = _zero_padding(one.query, q_len), _zero_padding(one.key, kv_len)
    scale: jax.Array | None = jnp.asarray(one.scale, jnp.float32)
    if jnp.finfo(query.dtype).bits >= 32:
        # Scaling q ([T, H]) instead of the logits ([T, S]) saves a pass over the scores; in
        # bf16/fp16 it would add a rounding step, so there the float32 logits are scaled.
        query, scale = query * jnp.asarray(one.scale, query.dtype), None
    value = None if one.value is None else _zero_padding(one.value, kv_len).transpose(1, 0, 2)
    return kernels.Operands(
        q=query.reshape(T, K, N // K, H).transpose(1, 2, 0, 3),  # [K, G, T, H]
        k=key.transpose(1, 0, 2), v=value,  # [K, S, H]
        bias=_to_grouped(one.bias, N, K), scale=scale, mask=_to_grouped(one.mask, N, K),
        q_len=q_len, kv_len=kv_len, seeds=kernels.head_seeds(spec, one.rng, K, N // K))


def _attend(spec: kernels.Spec, implementation: str, one: Arrays):
    """One example: (out [T, N, H] in the query's dtype, lse [T, N] float32)."""
    T, N, H = one.query.shape
    kernel = kernels.exact if implementation == "exact" else blockwise
    out, lse = kernel(spec, operands(spec, one))
    return (out.transpose(2, 0, 1, 3).reshape(T, N, H).astype(one.query.dtype),
            lse.transpose(2, 0, 1).reshape(T, N))


def _probabilities(spec: kernels.Spec, one: Arrays):
    """One example's probabilities [N, T, S] (the values do not enter them)."""
    T, N, _ = one.query.shape
    return kernels.probabilities(spec, operands(spec, one)).reshape(N, T, one.key.shape[0])


def _batch_axis(x, B: int):
    """Make x 4-D; return (x without a broadcast batch axis, its vmap in_axis)."""
    if x is None:
        return None, None
    x = jnp.reshape(x, (1,) * (4 - np.ndim(x)) + tuple(np.shape(x)))
    if x.shape[0] == B and B != 1:
        return x, 0
    return x[0], None


def _seeds(spec: kernels.Spec, rng, B: int):
    """Per-example uint32 [B, 2] dropout seeds (one shared [2] when broadcast), or None."""
    if not spec.dropout_rate:
        return None, None
    if spec.dropout_broadcast:
        return jax.random.bits(rng, (2,), jnp.uint32), None
    keys = jax.vmap(functools.partial(jax.random.fold_in, rng))(jnp.arange(B, dtype=jnp.uint32))
    return jax.vmap(lambda k: jax.random.bits(k, (2,), jnp.uint32))(keys), 0


def _over_batch(one_example: Callable[[Arrays], Any], spec: kernels.Spec, a: Arrays):
    """``one_example`` under ``jax.vmap`` over B; mask/bias batch axes of size 1 broadcast."""
    B = a.query.shape[0]
    bias, bias_axis = _batch_axis(a.bias, B)
    mask, mask_axis = _batch_axis(a.mask, B)
    seeds, seed_axis = _seeds(spec, a.rng, B)
    value_axis, q_axis, kv_axis = (None if x is None else 0 for x in (a.value, a.q_lens,
                                                                        a.kv_lens))
    axes = Arrays._make((0, 0, value_axis, bias_axis, mask_axis, q_axis, kv_axis, None,
                         seed_axis))  # vmap's in_axes, one per field
    return jax.vmap(one_example, in_axes=(axes,))(
        a._replace(bias=bias, mask=mask, rng=seeds))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _batched(spec: kernels.Spec, implementation: str, a: Arrays):
    return _over_batch(functools.partial(_attend, spec, implementation), spec, a)


@functools.partial(jax.jit, static_argnums=(0,))
def _batched_probabilities(spec: kernels.Spec, a: Arrays):
    return _over_batch(functools.partial(_probabilities, spec), spec, a)


def _problem(call: Call) -> dispatch.Problem:
    a = call.arrays
    _, T, _, H = a.query.shape
    return dispatch.Problem(
        dtype=a.query.dtype, T=T, S=a.key.shape[1], H=H,
        bias_shape=None if a.bias is None else a.bias.shape,
        mask_shape=None if a.mask is None else a.mask.shape,
        is_causal=call.spec.is_causal, window=call.spec.window,
        static_scale=isinstance(a.scale, float), dropout=bool(call.spec.dropout_rate),
        sharded=dispatch.sharded_axes(a.query), precision=call.spec.precision is not None)


def _via_jax_nn(implementation: str, spec: kernels.Spec,
               a: Arrays) -> tuple[jax.Array, jax.Array]:
    """``jax.nn.dot_product_attention`` on a normalised call: (out, lse [B, T, N]).

    Rows with no visible key are set to zeros (lse -inf), as in our implementations: jax.nn
    returns the mean of the values there.
    """
    query, key, mask = a.query, a.key, a.mask
    T, S = query.shape[1], key.shape[1]
    q_lens, kv_lens = a.q_lens, a.kv_lens
    q_lens = None if q_lens is None else jnp.clip(q_lens, 0, T).astype(jnp.int32)
    kv_lens = None if kv_lens is None else jnp.clip(kv_lens, 0, S).astype(jnp.int32)
    jax_nn: Any = jax.nn.dot_product_attention  # its overloads want a literal implementation
    out, lse = jax_nn(
        query, key, a.value, a.bias, mask, scale=a.scale, is_causal=spec.is_causal,
        query_seq_lengths=q_lens, key_value_seq_lengths=kv_lens,
        local_window_size=spec.window, implementation=implementation, return_residual=True)
    pairs = kernels.valid(spec, 0, T, 0, S, None if q_lens is None else q_lens[:, None, None],
                          None if kv_lens is None else kv_lens[:, None, None])
    pairs = jnp.broadcast_to(pairs, (query.shape[0], T, S))[:, None]  # [B, 1, T, S]
    if mask is not None:
        pairs = pairs & jnp.reshape(mask, (1,) * (4 - mask.ndim) + mask.shape)
    seen = jnp.any(pairs, axis=-1).transpose(0, 2, 1)  # [B, T, 1 or N]
    out = jnp.where(seen[..., None], out, jnp.zeros((), out.dtype))
    return out, jnp.where(seen, lse.astype(jnp.float32), -jnp.inf)


def run(call: Call, implementation: str | None, return_residual: bool):
    """The attention output of a normalised call (and the residual when asked); one example
    (``call.batched`` False) loses its batch axis again."""
    impl = dispatch.choose_implementation(implementation, _problem(call))
    if impl in ("xla", "cudnn"):
        out, lse = _via_jax_nn(impl, call.spec, call.arrays)
    else:
        out, lse = _batched(call.spec, impl, call.arrays)
    if not call.batched:
        out, lse = out[0], lse[0]
    if not return_residual:
        return out
    # As jax.nn: the residual is the logits' log-sum-exp per (query, head), without gradient.
    return out, jax.lax.stop_gradient(lse).astype(out.dtype)


def probabilities(call: Call) -> jax.Array:
    """The probabilities [B, N, T, S] of a normalised call ([N, T, S] for one example)."""
    w = _batched_probabilities(call.spec, call.arrays)
    return w if call.batched else w[0]
