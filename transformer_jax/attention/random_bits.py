"""Counter-based random bits for dropout masks: an integer hash of (seed, row, column).

Pure JAX (no Flax): the attention kernel's dropout on the probabilities and the models' residual
dropout (:mod:`transformer_jax.models.dropout`) both draw their masks here.

Why a hash and not ``jax.random``: ``jax.random.bits`` / ``bernoulli`` use the threefry-2x32
generator, which XLA's CPU backend lowers as a rolled loop of its rounds that does not fuse with
the op applying the mask, so drawing a bit per probability costs more than the attention it
masks. The hash below is a few integer multiplies and shifts per element, which XLA fuses into
the element-wise op that uses the mask, on any backend (the cost of dropout in the kernel is
the "exact, dropout 0.1" row of ``benchmarks/attention.py``).

The hash is ``lowbias32`` (C. Wellons, "Prospecting for Hash Functions", 2018: two
multiply-xorshift rounds, a full-avalanche 32-bit permutation). The row is hashed with the seed
first, then the column is added and the sum hashed again, so every (row, column) pair of an
array with fewer than 2^32 rows and columns gets its own counter, and the bits of an element
depend only on (seed, row, column): not on the array's shape, its blocking or its sharding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["hashed_bits", "lowbias32", "threshold"]

_M1, _M2 = 0x7FEB352D, 0x846CA68B  # lowbias32's multipliers (Wellons 2018)


def lowbias32(x: jax.Array) -> jax.Array:
    """uint32 -> uint32: a bijective hash with near-ideal avalanche (Wellons 2018)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(_M1)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(_M2)
    return x ^ (x >> 16)


def hashed_bits(seed, row, col) -> jax.Array:
    """uint32 bits of each (seed, row, col), broadcast together; all three uint32."""
    row_key = lowbias32(seed ^ lowbias32(row))
    return lowbias32(row_key + col)  # uint32 arithmetic wraps


def threshold(p: float):
    """uint32 t with P(bits < t) = p to within 2^-32, for uniform 32-bit ``bits``."""
    return jnp.uint32(min(round(p * 2.0**32), 2**32 - 1))
