"""Scaled dot-product attention in pure JAX: softmax(Q Kᵀ · scale + bias, masked) V.

The entry points and the dispatch to the implementations. Arguments are checked and
normalised by :mod:`~transformer_jax.attention.checks`; the implementation is chosen by
:mod:`~transformer_jax.attention.dispatch`. This module depends only on ``jax``, ``numpy`` and
its siblings: importing it never imports Flax. :mod:`transformer_jax.attention` re-exports the
public entry points.

The kernel is written for ONE example (``query[T, N, H]``, grouped layout inside); the batched
entry point (``dot_product_attention``, ``query[B, T, N, H]``) is that function under
``jax.vmap``, compiled with ``jax.jit``. The layout and the meaning of every argument of
``jax.nn.dot_product_attention`` are kept, so that ours is a drop-in replacement.

Axis legend (as in the ``transformer_jax`` package docstring): B batch, T query length, S key
length, N query heads, K key/value heads (N a multiple of K: grouped-query attention), H head
dim, G = N // K query heads per key/value head.

Numerics: logits, softmax and the output before its final cast are float32 for bf16/fp16
inputs (float64 for float64); the output has the input dtype. A query row whose keys are all
masked returns zeros, never NaN, in every implementation (``jax.nn`` returns the mean of the
values there; that is the one documented difference), and its log-sum-exp residual is -inf.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.attention import dispatch, kernels
from transformer_jax.attention.blockwise import blockwise
from transformer_jax.attention.checks import Call, normalise

Implementation = Literal["exact", "blockwise", "xla", "cudnn"]


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


def _attend(spec, implementation, query, key, value, bias, mask, q_len, kv_len, scale, seed):
    """One example: (out [T, N, H], lse [T, N] float32), or probabilities [N, T, S] when
    ``implementation == "weights"`` (then ``value`` is unused)."""
    T, N, H = query.shape
    S, K = key.shape[0], key.shape[1]
    q_len = None if q_len is None else jnp.clip(q_len, 0, T)
    kv_len = None if kv_len is None else jnp.clip(kv_len, 0, S)
    query, key = _zero_padding(query, q_len), _zero_padding(key, kv_len)
    kernel_scale = jnp.asarray(scale, jnp.float32)
    if jnp.finfo(query.dtype).bits >= 32:
        # Scaling q ([T, H]) instead of the logits ([T, S]) saves a pass over the scores; in
        # bf16/fp16 it would add a rounding step, so there the float32 logits are scaled.
        query, kernel_scale = query * jnp.asarray(scale, query.dtype), None
    q = query.reshape(T, K, N // K, H).transpose(1, 2, 0, 3)  # [K, G, T, H]
    k = key.transpose(1, 0, 2)  # [K, S, H]
    bias4, mask4 = _to_grouped(bias, N, K), _to_grouped(mask, N, K)
    if implementation == "weights":  # the values do not enter the probabilities
        w = kernels.probabilities(spec, q, k, bias4, kernel_scale, mask4, q_len, kv_len)
        return w.reshape(N, T, S)
    v = _zero_padding(value, kv_len).transpose(1, 0, 2)
    seeds = kernels.head_seeds(spec, seed, K, N // K)
    kernel = kernels.exact if implementation == "exact" else blockwise
    out, lse = kernel(spec, q, k, v, bias4, kernel_scale, mask4, q_len, kv_len, seeds)
    return (out.transpose(2, 0, 1, 3).reshape(T, N, H).astype(query.dtype),
            lse.transpose(2, 0, 1).reshape(T, N))


def _batch_axis(x, B: int):
    """Make x 4-D; return (x without a broadcast batch axis, its vmap in_axis)."""
    if x is None:
        return None, None
    x = jnp.reshape(x, (1,) * (4 - np.ndim(x)) + tuple(np.shape(x)))
    if x.shape[0] == B and B != 1:
        return x, 0
    return x[0], None


def _seeds(spec, rng, B: int):
    """Per-example uint32 [B, 2] dropout seeds (one shared [2] when broadcast), or None."""
    if not spec.dropout_rate:
        return None, None
    if spec.dropout_broadcast:
        return jax.random.bits(rng, (2,), jnp.uint32), None
    keys = jax.vmap(functools.partial(jax.random.fold_in, rng))(jnp.arange(B, dtype=jnp.uint32))
    return jax.vmap(lambda k: jax.random.bits(k, (2,), jnp.uint32))(keys), 0


@functools.partial(jax.jit, static_argnums=(0, 1))
def _batched(spec, implementation, query, key, value, bias, mask, q_lens, kv_lens, scale, rng):
    """:func:`_attend` under ``jax.vmap`` over B; mask/bias batch axes of size 1 broadcast."""
    B = query.shape[0]
    bias, bias_axis = _batch_axis(bias, B)
    mask, mask_axis = _batch_axis(mask, B)
    seeds, seed_axis = _seeds(spec, rng, B)
    value_axis, q_axis, kv_axis = (None if x is None else 0 for x in (value, q_lens, kv_lens))
    axes = (0, 0, value_axis, bias_axis, mask_axis, q_axis, kv_axis, None, seed_axis)
    one = functools.partial(_attend, spec, implementation)
    return jax.vmap(one, in_axes=axes)(query, key, value, bias, mask, q_lens, kv_lens, scale,
                                       seeds)


def _problem(call: Call) -> dispatch.Problem:
    _, T, _, H = call.query.shape
    return dispatch.Problem(
        dtype=call.query.dtype, T=T, S=call.key.shape[1], H=H,
        bias_shape=None if call.bias is None else call.bias.shape,
        mask_shape=None if call.mask is None else call.mask.shape,
        is_causal=call.spec.is_causal, window=call.spec.window,
        static_scale=isinstance(call.scale, float), dropout=bool(call.spec.dropout_rate),
        sharded=dispatch.sharded_axes(call.query))


def _run(call: Call, implementation, return_residual: bool):
    """Run a normalised call; strip the batch axis again for one example."""
    impl = dispatch.choose_implementation(implementation, _problem(call))
    if impl in ("xla", "cudnn"):
        out, lse = dispatch.via_jax_nn(impl, call.spec, call.query, call.key, call.value,
                                       call.bias, call.mask, call.q_lens, call.kv_lens,
                                       call.scale)
    else:
        out, lse = _batched(call.spec, impl, call.query, call.key, call.value, call.bias,
                            call.mask, call.q_lens, call.kv_lens, call.scale, call.dropout_rng)
    if not call.batched:
        out, lse = out[0], lse[0]
    if not return_residual:
        return out
    # As jax.nn: the residual is the logits' log-sum-exp per (query, head), without gradient.
    return out, jax.lax.stop_gradient(lse).astype(out.dtype)


_SEQ_NAMES = ("query_seq_lengths", "key_value_seq_lengths")


# --------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------


def dot_product_attention(
    query, key, value, bias=None, mask=None, *, scale=None, is_causal: bool = False,
    query_seq_lengths=None, key_value_seq_lengths=None,
    local_window_size: int | tuple[int, int] | None = None,
    implementation: Implementation | None = None, return_residual: bool = False,
    block_size: int | tuple[int, int] | None = None, dropout_rate: float = 0.0,
    dropout_rng=None, dropout_broadcast: bool = False,
):
    """Scaled dot-product attention: a drop-in for ``jax.nn.dot_product_attention``.

    The single-example kernel under ``jax.vmap``, compiled with ``jax.jit``. Mask and bias
    batch axes of size 1 are broadcast, not copied. Arrays may be Python lists.

    Args:
      query: [B, T, N, H], or [T, N, H] for one example (then no batch axis anywhere).
      key: [B, S, K, H]; N must be a multiple of K (grouped-query / multi-query attention).
      value: [B, S, K, H].
      bias: optional additive bias broadcastable to [B, N, T, S]; integer and boolean biases
        are cast to float, as jax.nn adds them.
      mask: optional boolean mask broadcastable to [B, N, T, S]; True means "may attend".
      scale: logit scale, default 1/√H (§3.2.1: keeps the dot products' variance at 1 so the
        softmax does not saturate); a number or a one-element array, which may be traced and
        differentiated (a learnable temperature).
      is_causal: query t sees keys s <= t (top-left aligned, as ``jax.nn``).
      query_seq_lengths: optional int [B] (a scalar or [1] for one example); queries at or
        beyond the length are padding and their outputs are zeros. Lengths outside [0, T] are
        clamped, eagerly and under ``jit`` alike (jax.nn's masks do the same).
      key_value_seq_lengths: optional int [B]; keys at or beyond the length are ignored, and
        neither they nor the values there reach the output or any gradient (NaN included).
      local_window_size: optional (left, right) sliding window, or one int for both, as jax.nn.
      implementation: "exact" (materialised scores), "blockwise" (online softmax, O(T) memory),
        "xla" or "cudnn" (jax.nn's two), or None: cuDNN on an NVIDIA GPU when it supports the
        call, else exact up to 2048² scores per head and blockwise above, and exact for
        symbolic shapes (``jax.export``).
      return_residual: also return the logits' log-sum-exp [B, T, N] (as jax.nn; -inf on rows
        with no visible key), without gradient.
      block_size: blockwise block size, an int or a (query, key) pair; default (512, 256).
      dropout_rate: dropout on the attention probabilities (``jax.nn`` has none); 0 is off.
      dropout_rng: a ``jax.random`` key, required when ``dropout_rate > 0``. The same key
        drops the same entries in "exact" and "blockwise", whatever the block size.
      dropout_broadcast: one dropout mask shared by every example and head (Flax's
        ``broadcast_dropout``).

    Returns:
      [B, T, N, H] in the dtype of ``query`` ([T, N, H] for one example), and the residual
      when ``return_residual``.

    Raises:
      ValueError / TypeError: at trace time, naming the argument and the shapes it got.
    """
    call = normalise(query, key, value, bias, mask, query_seq_lengths, key_value_seq_lengths,
                     rank=None, names=_SEQ_NAMES, scale=scale, is_causal=is_causal,
                     local_window_size=local_window_size, implementation=implementation,
                     block_size=block_size, return_residual=return_residual,
                     dropout_rate=dropout_rate, dropout_rng=dropout_rng,
                     dropout_broadcast=dropout_broadcast)
    return _run(call, implementation, return_residual)


def scaled_dot_product_attention(
    query, key, value, bias=None, mask=None, *, scale=None, is_causal: bool = False,
    query_seq_length=None, key_value_seq_length=None,
    local_window_size: int | tuple[int, int] | None = None,
    implementation: Implementation | None = None, block_size: int | tuple[int, int] | None = None,
    dropout_rate: float = 0.0, dropout_rng=None,
):
    """Attention for ONE example: softmax(q kᵀ · scale + bias, masked) v.

    Args:
      query: [T, N, H] queries.
      key: [S, K, H] keys; N must be a multiple of K (grouped-query attention).
      value: [S, K, H] values.
      bias: optional additive bias broadcastable to [N, T, S].
      mask: optional boolean mask broadcastable to [N, T, S]; True means "may attend".
      scale, is_causal, local_window_size, implementation, block_size, dropout_rate,
        dropout_rng: as :func:`dot_product_attention`.
      query_seq_length: optional int scalar; queries at or beyond it are padding (output 0).
      key_value_seq_length: optional int scalar; keys at or beyond it are padding.

    Returns:
      [T, N, H] in the dtype of ``query``.
    """
    call = normalise(query, key, value, bias, mask, query_seq_length, key_value_seq_length,
                     rank=3, names=("query_seq_length", "key_value_seq_length"), scale=scale,
                     is_causal=is_causal, local_window_size=local_window_size,
                     implementation=implementation, block_size=block_size,
                     dropout_rate=dropout_rate, dropout_rng=dropout_rng)
    return _run(call, implementation, False)


def attention_weights(
    query, key, bias=None, mask=None, *, scale=None, is_causal: bool = False,
    query_seq_lengths=None, key_value_seq_lengths=None,
    local_window_size: int | tuple[int, int] | None = None,
):
    """Attention probabilities [B, N, T, S] (float32), for inspection and plots.

    Same arguments and masking as :func:`dot_product_attention` (without ``value``; one
    example without its batch axis gives [N, T, S]). Rows whose keys are all masked are all
    zeros.
    """
    call = normalise(query, key, None, bias, mask, query_seq_lengths, key_value_seq_lengths,
                     rank=None, names=_SEQ_NAMES, scale=scale, is_causal=is_causal,
                     local_window_size=local_window_size)
    w = _batched(call.spec, "weights", call.query, call.key, None, call.bias, call.mask,
                 call.q_lens, call.kv_lens, call.scale, None)
    return w if call.batched else w[0]


def make_causal_mask(T: int, S: int | None = None):
    """Boolean [T, S] lower-triangular mask: query t may attend keys s <= t."""
    S = T if S is None else S
    return jnp.tril(jnp.ones((T, S), jnp.bool_))


def make_padding_mask(query_seq_lengths, key_value_seq_lengths, T: int, S: int):
    """Boolean [B, 1, T, S] mask from per-example lengths (True where both are real tokens)."""
    q_ok = jnp.arange(T)[None, :] < jnp.asarray(query_seq_lengths)[:, None]
    kv_ok = jnp.arange(S)[None, :] < jnp.asarray(key_value_seq_lengths)[:, None]
    return (q_ok[:, :, None] & kv_ok[:, None, :])[:, None]
