"""Checking and normalising the entry points' arguments, at trace time.

Every entry point of :mod:`~transformer_jax.attention.api` passes its arguments through
:func:`normalise`, which names the argument and the shapes it got in every error, converts
what ``jax.nn.dot_product_attention`` also converts (Python lists, NumPy arrays to JAX's
default dtypes, integer and boolean biases), and returns one :class:`Call` in the batched
layout: one example (``query[T, N, H]``) gets a batch axis of 1. Shapes and dtypes are static
under ``jax.jit``, so nothing here needs values; sequence lengths are clamped to their range by
the kernel (jax.nn's masks behave the same), eagerly and under ``jit`` alike.

A wrong dtype or argument type, or a mask or bias that does not broadcast, raises
:class:`ArgumentError`, which is both a ``ValueError`` and a ``TypeError``: ``jax.nn`` raises
``ValueError`` for a wrong dtype and ``TypeError`` (from broadcasting) for a wrong mask shape,
so code that catches jax.nn's exception for a case catches ours too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.attention import kernels
from transformer_jax.attention.blockwise import DEFAULT_BLOCK
from transformer_jax.attention.dispatch import IMPLEMENTATIONS

_NUMBER = (int, float, np.integer, np.floating)


class ArgumentError(ValueError, TypeError):
    """A bad dtype, type or broadcast shape: a ``ValueError`` and a ``TypeError``, so that it
    is caught where jax.nn's exception for the same case would be."""


class Arrays(NamedTuple):
    """The arrays of one normalised call (a pytree: it passes through ``jit`` and ``vmap``)."""

    query: jax.Array  # [B, T, N, H]
    key: jax.Array  # [B, S, K, H]
    value: jax.Array | None  # [B, S, K, H]; None when only the probabilities are wanted
    bias: jax.Array | None  # 4-D, broadcastable to [B, N, T, S]
    mask: jax.Array | None  # boolean, 4-D, broadcastable to [B, N, T, S]
    q_lens: jax.Array | None  # int [B]
    kv_lens: jax.Array | None  # int [B]
    scale: float | jax.Array  # a Python float, or a traced scalar
    rng: jax.Array | None  # the dropout key; per example (inside vmap), uint32 [2] seeds


@dataclasses.dataclass(frozen=True)
class Call:
    """One normalised call: its arrays in the batched layout and its static settings."""

    arrays: Arrays
    spec: kernels.Spec
    batched: bool  # False: the caller passed one example and gets no batch axis back


def _shape(x) -> tuple[int, ...]:
    return tuple(np.shape(x))


def _as_array(name: str, x: Any) -> Any:
    """x as a JAX array; Python lists and NumPy arrays are converted as ``jax.nn`` converts
    them (NumPy float64 becomes float32 unless x64 is on), naming ``name`` if that fails."""
    if x is None or isinstance(x, jax.Array):
        return x
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError) as e:
        raise ArgumentError(f"{name} must be an array (or nested lists of numbers), could not "
                            f"convert the {type(x).__name__} given: {e}") from None


def _check_float(name: str, x) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ArgumentError(f"{name} must be a floating-point array, got dtype {x.dtype}")


def _check_qkv(query, key, value, rank: int) -> None:
    layout_q, layout_kv = ("[B, T, N, H]", "[B, S, K, H]") if rank == 4 else ("[T, N, H]",
                                                                             "[S, K, H]")
    for name, x, layout in (("query", query, layout_q), ("key", key, layout_kv),
                            ("value", value, layout_kv)):
        if x.ndim != rank:
            like = "" if name == "query" else f", as query {query.shape} has"
            raise ValueError(f"{name} must have rank {rank} {layout}{like}, got shape {x.shape}")
        _check_float(name, x)
    if not query.dtype == key.dtype == value.dtype:
        raise ArgumentError(f"query, key and value must share one dtype, got {query.dtype}, "
                            f"{key.dtype}, {value.dtype}")
    qs, ks, vs = query.shape, key.shape, value.shape
    if ks != vs:
        raise ValueError(f"key and value must have the same shape {layout_kv}, got {ks} and {vs}")
    if rank == 4 and qs[0] != ks[0]:
        raise ValueError(f"query and key batch sizes differ: query {qs}, key {ks}")
    if qs[-1] != ks[-1]:
        raise ValueError(f"query and key head dims (H) differ: query {qs}, key {ks}")
    if ks[-2] == 0 or qs[-2] % ks[-2] != 0:
        raise ValueError(f"query heads N={qs[-2]} must be a multiple of key/value heads "
                         f"K={ks[-2]} (grouped-query attention): query {qs}, key {ks}")


def _broadcastable(name: str, x, target: tuple[int, ...], legend: str):
    """x checked against ``target``; for one example ([N, T, S]) a 4-D x with a batch axis of
    1 is taken too, as jax.nn takes it."""
    if x is None:
        return None
    if len(target) == 3 and x.ndim == 4 and x.shape[0] == 1:
        x = x[0]
    xs = x.shape
    if len(xs) > len(target) or any(a not in (1, b) for a, b in zip(xs[::-1], target[::-1])):
        raise ArgumentError(f"{name} of shape {_shape(x)} is not broadcastable to {legend} = "
                            f"{target}")
    return x


def _mask_and_bias(mask, bias, query, target, legend):
    if mask is not None and mask.dtype != jnp.bool_:
        raise ArgumentError(f"mask must be a boolean array (True = attend), got dtype "
                            f"{mask.dtype}; pass additive float masks as bias=")
    if bias is not None and not jnp.issubdtype(bias.dtype, jnp.floating):
        if not (jnp.issubdtype(bias.dtype, jnp.integer) or bias.dtype == jnp.bool_):
            raise ArgumentError(f"bias must be a real number array, got dtype {bias.dtype}")
        bias = bias.astype(jnp.promote_types(query.dtype, jnp.float32))  # as jax.nn adds it
    return (_broadcastable("mask", mask, target, legend),
            _broadcastable("bias", bias, target, legend))


def _lengths(name: str, x, B):
    """[B] integer lengths; one example (B None) takes a scalar or shape (1,)."""
    if x is None:
        return None
    expect = [(B,)] if B is not None else [(), (1,)]
    if x.shape not in expect:
        raise ValueError(f"{name} must have shape {' or '.join(map(str, expect))}, "
                         f"got {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ArgumentError(f"{name} must be an integer array, got dtype {x.dtype}")
    return x.reshape(B if B is not None else 1)


def _scale(scale, H):
    if scale is None:
        return float(1.0 / np.sqrt(H))
    if isinstance(scale, _NUMBER):
        return float(scale)
    scale = _as_array("scale", scale)
    if scale.size != 1 or not (jnp.issubdtype(scale.dtype, jnp.floating)
                               or jnp.issubdtype(scale.dtype, jnp.integer)):
        raise ArgumentError(f"scale must be a real number or a one-element array, got shape "
                            f"{scale.shape} and dtype {scale.dtype}")
    return scale.reshape(())


def _pair(name: str, value, minimum: int, what: str):
    """A non-negative/positive int or a pair of them, as a tuple of two ints (None stays)."""
    if value is None:
        return None
    pair = (value, value) if isinstance(value, (int, np.integer)) else value
    if (not isinstance(pair, Sequence) or len(pair) != 2
            or not all(isinstance(x, (int, np.integer)) and x >= minimum for x in pair)):
        raise ValueError(f"{name} must be a {what} int or a pair of them, got {value!r}")
    return int(pair[0]), int(pair[1])


def precision_of(precision: Any) -> Any:
    """``precision=`` as ``jnp.einsum`` takes it: None, a ``jax.lax.Precision`` (or its name,
    "highest" for instance), or a pair of them, one per operand; hashable."""
    if precision is None or isinstance(precision, jax.lax.Precision):
        return precision
    if isinstance(precision, str):
        try:
            return jax.lax.Precision(precision)
        except ValueError:
            pass
    elif isinstance(precision, Sequence) and len(precision) == 2:
        return tuple(precision_of(p) for p in precision)
    raise ValueError(f"precision must be None, a jax.lax.Precision, one of its names "
                     f"('default', 'high', 'highest') or a pair of them, got {precision!r}")


def _options(implementation, is_causal, return_residual, dropout_rate, dropout_rng):
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}")
    for name, flag in (("is_causal", is_causal), ("return_residual", return_residual)):
        if not isinstance(flag, bool | np.bool_):
            raise ArgumentError(f"{name} must be a Python bool, got {type(flag).__name__}")
    if not isinstance(dropout_rate, _NUMBER) or not 0 <= dropout_rate < 1:
        raise ValueError(f"dropout_rate must be a Python number in [0, 1), got {dropout_rate!r}")
    if dropout_rate and dropout_rng is None:
        raise ValueError("dropout_rate > 0 needs dropout_rng (a jax.random key)")
    if dropout_rate:
        rng = _as_array("dropout_rng", dropout_rng)
        typed = jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
        if not (typed and rng.shape == () or rng.dtype == jnp.uint32 and rng.shape == (2,)):
            raise ArgumentError("dropout_rng must be one jax.random key (jax.random.key or "
                                f"PRNGKey), got shape {rng.shape} and dtype {rng.dtype}")
        return rng
    return None


def normalise(query, key, value, bias, mask, q_lens, kv_lens, *, rank, names, scale,
              is_causal, local_window_size, implementation=None, block_size=None,
              return_residual=False, dropout_rate=0.0, dropout_rng=None,
              dropout_broadcast=False, precision=None) -> Call:
    """Check every argument and return the :class:`Call` (``value=None`` asks for weights).

    ``rank``: 4 (batched), 3 (one example) or None (either, by the query's rank); ``names``:
    the lengths' argument names as the caller spells them.
    """
    query, key, value, bias, mask = (
        _as_array(n, x) for n, x in zip(("query", "key", "value", "bias", "mask"),
                                        (query, key, value, bias, mask)))
    q_lens, kv_lens = (_as_array(n, x) for n, x in zip(names, (q_lens, kv_lens)))
    if rank is None and query.ndim not in (3, 4):
        raise ValueError(f"query must have rank 4 [B, T, N, H] or 3 [T, N, H], got shape "
                         f"{query.shape}")
    rank = query.ndim if rank is None else rank
    _check_qkv(query, key, key if value is None else value, rank)
    if rank == 3:
        query, key = query[None], key[None]
        value = None if value is None else value[None]
    B, T, N, H = query.shape
    S = key.shape[1]
    target, legend = ((B, N, T, S), "[B, N, T, S]") if rank == 4 else ((N, T, S), "[N, T, S]")
    mask, bias = _mask_and_bias(mask, bias, query, target, legend)
    q_lens, kv_lens = (_lengths(n, x, B if rank == 4 else None)
                       for n, x in zip(names, (q_lens, kv_lens)))
    rng = _options(implementation, is_causal, return_residual, dropout_rate, dropout_rng)
    spec = kernels.Spec(
        is_causal=bool(is_causal),
        window=_pair("local_window_size", local_window_size, 0, "non-negative"),
        block_q=DEFAULT_BLOCK[0], block_k=DEFAULT_BLOCK[1],
        dropout_rate=float(dropout_rate), dropout_broadcast=bool(dropout_broadcast),
        precision=precision_of(precision))
    blocks = _pair("block_size", block_size, 1, "positive")
    if blocks is not None:
        spec = dataclasses.replace(spec, block_q=blocks[0], block_k=blocks[1])
    arrays = Arrays(query, key, value, bias, mask, q_lens, kv_lens, _scale(scale, H), rng)
    return Call(arrays, spec, rank == 4)
