"""Scaled dot-product attention in pure JAX: softmax(Q Kᵀ · scale + bias, masked) V.

The entry points, their argument checks and the dispatch to the two implementations in
:mod:`~transformer_jax.attention.kernels`. This module depends only on ``jax``, ``numpy`` and that
sibling: importing it never imports Flax. :mod:`transformer_jax.attention` re-exports the
public entry points.

The kernel is written for ONE example (``scaled_dot_product_attention``, ``query[T, N, H]``);
the batched entry point (``dot_product_attention``, ``query[B, T, N, H]``) is that function
under ``jax.vmap``, compiled with ``jax.jit``. Every entry point checks and normalises its
arguments through one function, at trace time. The layout and the meaning of every shared
argument follow ``jax.nn.dot_product_attention`` so that ours is a drop-in replacement.

Axis legend (as in the ``transformer_jax`` package docstring): B batch, T query length, S key
length, N query heads, K key/value heads (N a multiple of K: grouped-query attention), H head
dim, G = N // K query heads per key/value head.

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

from transformer_jax.attention import kernels

Implementation = Literal["exact", "blockwise"]
_IMPLEMENTATIONS = ("exact", "blockwise")

#: Above this many scores per (example, head) ``implementation=None`` picks "blockwise":
#: 2048² float32 scores are 16 MiB per head, where the exact path's memory traffic starts to
#: dominate on CPU and its O(T·S) temporaries start to hurt on accelerators.
AUTO_BLOCKWISE_SCORES = 2048 * 2048


def choose_implementation(implementation: Implementation | None, T: int, S: int) -> str:
    """The implementation that runs: the one given, else by size (``implementation=None``).

    "exact" up to :data:`AUTO_BLOCKWISE_SCORES` scores ``T·S`` per (example, head), then
    "blockwise".
    """
    if implementation is not None:
        return implementation
    return "blockwise" if T * S > AUTO_BLOCKWISE_SCORES else "exact"


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


def _block_sizes(block_size) -> tuple[int, int]:
    if block_size is None:
        return kernels.DEFAULT_BLOCK
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
# Dispatch: one validated example, the batch (its vmap), and the one checked path to both.
# --------------------------------------------------------------------------------------


def _to_grouped(x, N: int, K: int):
    """[Nb, Tb, Sb] broadcastable mask/bias -> [Kb, Gb, Tb, Sb] matching the grouped layout."""
    if x is None:
        return None
    x = jnp.reshape(x, (1,) * (3 - np.ndim(x)) + _shape(x))
    if x.shape[0] == 1:
        return x[None]
    return x.reshape(K, N // K, *x.shape[1:])


def _attend(spec, implementation, query, key, value, bias, mask, q_len, kv_len):
    """One validated example: [T, N, H] output, or [N, T, S] probabilities when
    ``implementation == "weights"`` (then ``value`` is unused)."""
    query = jnp.asarray(query)
    if implementation != "weights" and jnp.finfo(query.dtype).bits >= 32:
        # Scaling q ([T, H]) instead of the logits ([T, S]) saves a pass over the scores; in
        # bf16/fp16 it would add a rounding step, so there the float32 logits are scaled.
        query = query * jnp.asarray(spec.scale, query.dtype)
        spec = dataclasses.replace(spec, scale=1.0)
    T, N, H = query.shape
    S, K = key.shape[0], key.shape[1]
    q = query.reshape(T, K, N // K, H).transpose(1, 2, 0, 3)  # [K, G, T, H]
    k = jnp.asarray(key).transpose(1, 0, 2)  # [K, S, H]
    bias4, mask4 = _to_grouped(bias, N, K), _to_grouped(mask, N, K)
    q_len = None if q_len is None else jnp.clip(q_len, 0, T)
    kv_len = None if kv_len is None else jnp.clip(kv_len, 0, S)
    if implementation == "weights":  # the values do not enter the probabilities
        w = kernels.exact(spec, q, k, jnp.zeros_like(k), bias4, mask4, q_len, kv_len,
                          return_weights=True)
        return w.reshape(N, T, S)
    v = jnp.asarray(value).transpose(1, 0, 2)
    if kv_len is not None:
        # Padding keys get probability 0, but 0 · NaN = NaN: garbage in padded value slots
        # (an uninitialised buffer) must not reach the output. O(S·H), not O(T·S).
        v = jnp.where((jnp.arange(S) < kv_len)[None, :, None], v, jnp.zeros((), v.dtype))
    kernel = kernels.exact if implementation == "exact" else kernels.blockwise
    out = kernel(spec, q, k, v, bias4, mask4, q_len, kv_len)
    return out.transpose(2, 0, 1, 3).reshape(T, N, H).astype(query.dtype)


def _batch_axis(x, B: int):
    """Make x 4-D; return (x without a broadcast batch axis, its vmap in_axis)."""
    if x is None:
        return None, None
    x = jnp.reshape(x, (1,) * (4 - np.ndim(x)) + _shape(x))
    if x.shape[0] == B and B != 1:
        return x, 0
    return x[0], None


@functools.partial(jax.jit, static_argnums=(0, 1))
def _batched(spec, implementation, query, key, value, bias, mask, q_lens, kv_lens):
    """:func:`_attend` under ``jax.vmap`` over B; mask/bias batch axes of size 1 broadcast."""
    B = query.shape[0]
    bias, bias_axis = _batch_axis(bias, B)
    mask, mask_axis = _batch_axis(mask, B)
    value_axis, q_axis, kv_axis = (None if x is None else 0 for x in (value, q_lens, kv_lens))
    axes = (0, 0, value_axis, bias_axis, mask_axis, q_axis, kv_axis)
    one = functools.partial(_attend, spec, implementation)
    return jax.vmap(one, in_axes=axes)(query, key, value, bias, mask, q_lens, kv_lens)


def _entry(query, key, value, bias, mask, q_len, kv_len, *, batched: bool, scale, is_causal,
           local_window_size, implementation=None, block_size=None):
    """The one path of every entry point: check and normalise the arguments, then run.

    Checks run at trace time (shapes and dtypes are static; lengths are checked when concrete)
    and name the argument as the caller spelled it (``query_seq_lengths`` when batched,
    ``query_seq_length`` for one example). ``value=None`` asks for the probabilities.
    """
    *lead, T, S, N, K, H = _check_qkv(query, key, key if value is None else value, batched)
    lead = tuple(lead)  # (B,) when batched, else ()
    _check_mask_bias(bias, mask, lead + (N, T, S), "[B, N, T, S]" if batched else "[N, T, S]")
    if batched:
        _check_length("query_seq_lengths", q_len, lead, T)
        _check_length("key_value_seq_lengths", kv_len, lead, S)
    else:
        _check_length("query_seq_length", q_len, lead, T)
        _check_length("key_value_seq_length", kv_len, lead, S)
    if implementation is not None and implementation not in _IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {_IMPLEMENTATIONS} or None, got {implementation!r}"
        )
    if scale is not None and not isinstance(scale, (int, float, np.floating, np.integer)):
        raise TypeError(f"scale must be a Python number or None, got {type(scale).__name__}")
    block_q, block_k = _block_sizes(block_size)
    spec = kernels.Spec(  # hashable: static under jax.jit
        scale=float(1.0 / np.sqrt(H) if scale is None else scale),
        is_causal=bool(is_causal),
        window=_window(local_window_size),
        block_q=block_q,
        block_k=block_k,
    )
    impl = "weights" if value is None else choose_implementation(implementation, T, S)
    run = _batched if batched else _attend
    return run(spec, impl, query, key, value, bias, mask, q_len, kv_len)


# --------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------


def scaled_dot_product_attention(
    query, key, value, bias=None, mask=None, *, scale: float | None = None,
    is_causal: bool = False, query_seq_length=None, key_value_seq_length=None,
    local_window_size: int | tuple[int, int] | None = None,
    implementation: Implementation | None = None, block_size: int | tuple[int, int] | None = None,
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
      block_size: blockwise block size, an int or a (query, key) pair; default (512, 256).

    Returns:
      [T, N, H] in the dtype of ``query``.
    """
    return _entry(query, key, value, bias, mask, query_seq_length, key_value_seq_length,
                  batched=False, scale=scale, is_causal=is_causal,
                  local_window_size=local_window_size, implementation=implementation,
                  block_size=block_size)


def dot_product_attention(
    query, key, value, bias=None, mask=None, *, scale: float | None = None,
    is_causal: bool = False, query_seq_lengths=None, key_value_seq_lengths=None,
    local_window_size: int | tuple[int, int] | None = None,
    implementation: Implementation | None = None, block_size: int | tuple[int, int] | None = None,
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
    return _entry(query, key, value, bias, mask, query_seq_lengths, key_value_seq_lengths,
                  batched=True, scale=scale, is_causal=is_causal,
                  local_window_size=local_window_size, implementation=implementation,
                  block_size=block_size)


def attention_weights(
    query, key, bias=None, mask=None, *, scale: float | None = None, is_causal: bool = False,
    query_seq_lengths=None, key_value_seq_lengths=None,
    local_window_size: int | tuple[int, int] | None = None,
):
    """Attention probabilities [B, N, T, S] (float32), for inspection and plots.

    Same arguments and masking as :func:`dot_product_attention` (without ``value``). Rows
    whose keys are all masked are all zeros.
    """
    return _entry(query, key, None, bias, mask, query_seq_lengths, key_value_seq_lengths,
                  batched=True, scale=scale, is_causal=is_causal,
                  local_window_size=local_window_size)


def make_causal_mask(T: int, S: int | None = None):
    """Boolean [T, S] lower-triangular mask: query t may attend keys s <= t."""
    S = T if S is None else S
    return jnp.tril(jnp.ones((T, S), jnp.bool_))


def make_padding_mask(query_seq_lengths, key_value_seq_lengths, T: int, S: int):
    """Boolean [B, 1, T, S] mask from per-example lengths (True where both are real tokens)."""
    q_ok = jnp.arange(T)[None, :] < jnp.asarray(query_seq_lengths)[:, None]
    kv_ok = jnp.arange(S)[None, :] < jnp.asarray(key_value_seq_lengths)[:, None]
    return (q_ok[:, :, None] & kv_ok[:, None, :])[:, None]
