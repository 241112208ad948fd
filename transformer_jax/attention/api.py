"""Scaled dot-product attention in pure JAX: the public entry points.

Arguments are checked and normalised by :mod:`~transformer_jax.attention.checks`, the
implementation is chosen by :mod:`~transformer_jax.attention.dispatch` and run by
:mod:`~transformer_jax.attention.batching`. This module depends only on ``jax``, ``numpy`` and
its siblings: importing it never imports Flax. :mod:`transformer_jax.attention` re-exports the
public entry points.

The layout and the meaning of every argument of ``jax.nn.dot_product_attention`` are kept, so
that ours is a drop-in replacement.

Axis legend: B batch, T query length, S key length, N query heads, K key/value heads (N a
multiple of K: grouped-query attention), H head dim.

Numerics: logits, softmax and the output before its final cast are float32 for bf16/fp16
inputs (float64 for float64); the output has the input dtype. A query row whose keys are all
masked returns zeros, never NaN, in every implementation (``jax.nn`` returns the mean of the
values there; that is the one documented difference), and its log-sum-exp residual is -inf.
"""

from __future__ import annotations

from typing import Any, Literal, overload

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from transformer_jax.attention import batching
from transformer_jax.attention.checks import normalise

Implementation = Literal["exact", "blockwise", "xla", "cudnn"]
#: ``precision=``: None, a ``jax.lax.Precision`` or its name, or a pair (one per operand).
PrecisionLike = str | jax.lax.Precision | tuple[Any, Any] | None

_SEQ_NAMES = ("query_seq_lengths", "key_value_seq_lengths")


@overload
def dot_product_attention(
    query: ArrayLike, key: ArrayLike, value: ArrayLike, bias: ArrayLike | None = None,
    mask: ArrayLike | None = None, *, scale: float | ArrayLike | None = None,
    is_causal: bool = False, query_seq_lengths: ArrayLike | None = None,
    key_value_seq_lengths: ArrayLike | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    implementation: Implementation | None = None, return_residual: Literal[False] = False,
    block_size: int | tuple[int, int] | None = None, dropout_rate: float = 0.0,
    dropout_rng: ArrayLike | None = None, dropout_broadcast: bool = False,
    precision: PrecisionLike = None,
) -> jax.Array: ...


@overload
def dot_product_attention(
    query: ArrayLike, key: ArrayLike, value: ArrayLike, bias: ArrayLike | None = None,
    mask: ArrayLike | None = None, *, scale: float | ArrayLike | None = None,
    is_causal: bool = False, query_seq_lengths: ArrayLike | None = None,
    key_value_seq_lengths: ArrayLike | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    implementation: Implementation | None = None, return_residual: Literal[True],
    block_size: int | tuple[int, int] | None = None, dropout_rate: float = 0.0,
    dropout_rng: ArrayLike | None = None, dropout_broadcast: bool = False,
    precision: PrecisionLike = None,
) -> tuple[jax.Array, jax.Array]: ...


def dot_product_attention(
    query: ArrayLike, key: ArrayLike, value: ArrayLike, bias: ArrayLike | None = None,
    mask: ArrayLike | None = None, *, scale: float | ArrayLike | None = None,
    is_causal: bool = False, query_seq_lengths: ArrayLike | None = None,
    key_value_seq_lengths: ArrayLike | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    implementation: Implementation | None = None, return_residual: bool = False,
    block_size: int | tuple[int, int] | None = None, dropout_rate: float = 0.0,
    dropout_rng: ArrayLike | None = None, dropout_broadcast: bool = False,
    precision: PrecisionLike = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    r"""Scaled dot-product attention: a drop-in for ``jax.nn.dot_product_attention``.

    Computes (Vaswani et al. 2017, §3.2.1)

    .. math::

      \mathrm{Attention}(Q, K, V) = \mathrm{softmax}(Q K^T \cdot \mathrm{scale}
        + \mathrm{bias}) V

    over the pairs (query t, key s) that every mask allows. Shapes use B batch, T query length,
    S key length, N query heads, K key/value heads (N a multiple of K), H head dim. "exact"
    materialises the T×S scores; "blockwise" keeps memory linear in T and S, for long sequences.

    Args:
      query: [B, T, N, H], or [T, N, H] for one example (then no batch axis anywhere).
      key: [B, S, K, H].
      value: [B, S, K, H].
      bias: optional additive bias broadcastable to [B, N, T, S] (integers cast, as jax.nn).
      mask: optional boolean mask broadcastable to [B, N, T, S]; True means "may attend".
      scale: logit scale, default 1/√H (§3.2.1: keeps the dot products' variance at 1 so the
        softmax does not saturate); a number or a one-element array, which may be traced and
        differentiated (a learnable temperature).
      is_causal: query t sees keys s <= t (top-left aligned, as ``jax.nn``).
      query_seq_lengths: optional int [B] (a scalar for one example); queries at or beyond the
        length are padding and give zeros. Lengths outside [0, T] are clamped, as by jax.nn.
      key_value_seq_lengths: optional int [B]; keys at or beyond the length are ignored, and
        neither they nor the values there reach the output or any gradient (NaN included).
      local_window_size: optional (left, right) sliding window, or one int for both, as jax.nn.
      implementation: "exact", "blockwise", "xla" or "cudnn" (jax.nn's two), or None: cuDNN
        on an NVIDIA GPU when it supports the call, else exact up to 2048² scores per head and
        blockwise above (exact for symbolic shapes, ``jax.export``).
      return_residual: also return the logits' log-sum-exp [B, T, N] (as jax.nn; -inf on rows
        with no visible key), without gradient.
      block_size: blockwise block size, an int or a (query, key) pair; default (512, 256).
      dropout_rate: dropout on the attention probabilities (``jax.nn`` has none); 0 is off.
      dropout_rng: a ``jax.random`` key, required when ``dropout_rate > 0``. The same key
        drops the same entries in "exact" and "blockwise", whatever the block size.
      dropout_broadcast: one dropout mask for every example and head (``broadcast_dropout``).
      precision: of the matmuls, as ``jnp.einsum`` takes it ("highest", a
        ``jax.lax.Precision`` or a pair); "xla" and "cudnn" (jax.nn) refuse it.

    Returns:
      [B, T, N, H] in the dtype of ``query`` ([T, N, H] for one example), and the residual
      when ``return_residual``.

    Raises:
      ValueError: naming the argument and its shape (dtypes: a ValueError and TypeError).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from transformer_jax.attention import dot_product_attention
      >>> q = jnp.ones((2, 16, 8, 64))         # [B, T, N, H]
      >>> k = v = jnp.ones((2, 16, 2, 64))     # [B, S, K, H]: 2 key/value heads (GQA)
      >>> dot_product_attention(q, k, v, is_causal=True).shape
      (2, 16, 8, 64)
      >>> dot_product_attention(q, k, v, implementation="blockwise", block_size=8,
      ...                       return_residual=True)[1].shape   # lse [B, T, N]
      (2, 16, 8)
    """
    call = normalise(query, key, value, bias, mask, query_seq_lengths, key_value_seq_lengths,
                     rank=None, names=_SEQ_NAMES, scale=scale, is_causal=is_causal,
                     local_window_size=local_window_size, implementation=implementation,
                     block_size=block_size, return_residual=return_residual,
                     dropout_rate=dropout_rate, dropout_rng=dropout_rng,
                     dropout_broadcast=dropout_broadcast, precision=precision)
    result: jax.Array | tuple[jax.Array, jax.Array] = batching.run(call, implementation,
                                                                    return_residual)
    return result


def scaled_dot_product_attention(
    query: ArrayLike, key: ArrayLike, value: ArrayLike, bias: ArrayLike | None = None,
    mask: ArrayLike | None = None, *, scale: float | ArrayLike | None = None,
    is_causal: bool = False, query_seq_length: ArrayLike | None = None,
    key_value_seq_length: ArrayLike | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    implementation: Implementation | None = None, block_size: int | tuple[int, int] | None = None,
    dropout_rate: float = 0.0, dropout_rng: ArrayLike | None = None,
    precision: PrecisionLike = None,
) -> jax.Array:
    """Attention for ONE example: softmax(q kᵀ · scale + bias, masked) v.

    :func:`dot_product_attention` without the batch axis, with one length per sequence.
    Shapes use T query length, S key length, N query heads, K key/value heads, H head dim.

    Args:
      query: [T, N, H] queries.
      key: [S, K, H] keys; N must be a multiple of K (grouped-query attention).
      value: [S, K, H] values.
      bias: optional additive bias broadcastable to [N, T, S].
      mask: optional boolean mask broadcastable to [N, T, S]; True means "may attend".
      scale: logit scale, default 1/√H; as :func:`dot_product_attention`.
      is_causal: query t sees keys s <= t.
      query_seq_length: optional int scalar; queries at or beyond it are padding (output 0).
      key_value_seq_length: optional int scalar; keys at or beyond it are padding.
      local_window_size: optional (left, right) sliding window, or one int for both.
      implementation: as :func:`dot_product_attention`.
      block_size: as :func:`dot_product_attention`.
      dropout_rate: dropout on the probabilities; 0 is off.
      dropout_rng: a ``jax.random`` key, required when ``dropout_rate > 0``.
      precision: precision of the matmuls, as :func:`dot_product_attention`.

    Returns:
      [T, N, H] in the dtype of ``query``.

    Example:
      >>> import jax.numpy as jnp
      >>> from transformer_jax.attention import scaled_dot_product_attention
      >>> q = k = v = jnp.ones((10, 4, 32))    # [T, N, H] and [S, K, H]
      >>> scaled_dot_product_attention(q, k, v, key_value_seq_length=7).shape
      (10, 4, 32)
    """
    call = normalise(query, key, value, bias, mask, query_seq_length, key_value_seq_length,
                     rank=3, names=("query_seq_length", "key_value_seq_length"), scale=scale,
                     is_causal=is_causal, local_window_size=local_window_size,
                     implementation=implementation, block_size=block_size,
                     dropout_rate=dropout_rate, dropout_rng=dropout_rng, precision=precision)
    out: jax.Array = batching.run(call, implementation, False)
    return out


def attention_weights(
    query: ArrayLike, key: ArrayLike, bias: ArrayLike | None = None,
    mask: ArrayLike | None = None, *, scale: float | ArrayLike | None = None,
    is_causal: bool = False, query_seq_lengths: ArrayLike | None = None,
    key_value_seq_lengths: ArrayLike | None = None,
    local_window_size: int | tuple[int, int] | None = None,
) -> jax.Array:
    """Attention probabilities softmax(Q Kᵀ · scale + bias, masked), for inspection and plots.

    The probabilities :func:`dot_product_attention` multiplies the values by (before
    dropout), materialised as [B, N, T, S] float32. Rows whose keys are all masked are zeros.

    Args:
      query: [B, T, N, H], or [T, N, H] for one example.
      key: [B, S, K, H] (or [S, K, H]); N must be a multiple of K.
      bias: optional additive bias broadcastable to [B, N, T, S].
      mask: optional boolean mask broadcastable to [B, N, T, S]; True means "may attend".
      scale: logit scale, default 1/√H.
      is_causal: query t sees keys s <= t.
      query_seq_lengths: optional int [B]; rows at or beyond the length are zeros.
      key_value_seq_lengths: optional int [B]; keys at or beyond the length get probability 0.
      local_window_size: optional (left, right) sliding window, or one int for both.

    Returns:
      [B, N, T, S] float32 ([N, T, S] for one example); each visible row sums to 1.

    Example:
      >>> import jax.numpy as jnp
      >>> from transformer_jax.attention import attention_weights
      >>> q = k = jnp.ones((1, 4, 2, 8))        # [B, T, N, H]
      >>> w = attention_weights(q, k, is_causal=True)
      >>> w.shape, w[0, 0, 3].tolist()
      ((1, 2, 4, 4), [0.25, 0.25, 0.25, 0.25])
    """
    call = normalise(query, key, None, bias, mask, query_seq_lengths, key_value_seq_lengths,
                     rank=None, names=_SEQ_NAMES, scale=scale, is_causal=is_causal,
                     local_window_size=local_window_size)
    return batching.probabilities(call)


def make_causal_mask(T: int, S: int | None = None) -> jax.Array:
    """Boolean [T, S] lower-triangular mask: query t may attend keys s <= t.

    Args:
      T: the number of queries.
      S: the number of keys (default T).

    Returns:
      bool [T, S], True where s <= t.

    Example:
      >>> from transformer_jax.attention import make_causal_mask
      >>> make_causal_mask(3).astype(int).tolist()
      [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    """
    S = T if S is None else S
    return jnp.tril(jnp.ones((T, S), jnp.bool_))


def make_padding_mask(query_seq_lengths: ArrayLike, key_value_seq_lengths: ArrayLike, T: int,
                      S: int) -> jax.Array:
    """Boolean [B, 1, T, S] mask from per-example lengths (True where both are real tokens).

    Args:
      query_seq_lengths: int [B]; queries at or beyond the length are padding.
      key_value_seq_lengths: int [B]; keys at or beyond the length are padding.
      T: the number of queries.
      S: the number of keys.

    Returns:
      bool [B, 1, T, S], broadcastable over the heads of [B, N, T, S].

    Example:
      >>> from transformer_jax.attention import make_padding_mask
      >>> make_padding_mask([2], [1], 3, 2)[0, 0].astype(int).tolist()
      [[1, 0], [1, 0], [0, 0]]
    """
    q_ok = jnp.arange(T)[None, :] < jnp.asarray(query_seq_lengths)[:, None]
    kv_ok = jnp.arange(S)[None, :] < jnp.asarray(key_value_seq_lengths)[:, None]
    return (q_ok[:, :, None] & kv_ok[:, None, :])[:, None]
