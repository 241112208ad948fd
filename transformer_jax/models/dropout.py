"""Dropout (§5.4, Srivastava et al. 2014) whose masks come from a counter-based hash.

:class:`Dropout` is a drop-in for ``flax.linen.Dropout`` as the models use it (same ``rate`` and
``deterministic``, same ``"dropout"`` rng collection, inverted scaling by 1 / (1 - rate); no
``broadcast_dims``). Only where the random bits come from differs:

* ``flax.linen.Dropout`` draws 32 bits per element with ``jax.random.bernoulli``, i.e. the
  threefry-2x32 generator. On a CPU, XLA lowers threefry as a rolled loop of its rounds, which
  does not fuse with the op that applies the mask, so the default run's step spent a visible
  share of its time drawing masks.
* Here one threefry call draws a 32-bit seed per mask. An element's keep decision is an
  integer hash of (seed, its row, its column), compared with a threshold: a few integer
  multiplies and shifts that XLA fuses into the element-wise op that uses the mask, on any
  backend.

The hash is :func:`~transformer_jax.attention.random_bits.hashed_bits` (``lowbias32``, Wellons
2018), shared with the attention kernel's dropout. The row is all axes but the last, flattened;
an element is kept when its hash is below round((1 - rate) · 2^32), which is 1 - rate to within
2^-32.

The mask is a function of the key and of each element's position in the (global) array, not of
how the array is laid out over devices: under ``jit`` with a sharded batch, XLA partitions the
``iota`` counters, and every device computes its own part of the one mask.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer_jax.attention import random_bits

__all__ = ["Dropout", "dropout_mask"]


def dropout_mask(seed: jax.Array, shape: tuple[int, ...], keep: float) -> jax.Array:
    """bool ``shape``: True where an element is kept, with probability ``keep`` each.

    Args:
      seed: a uint32 scalar; the same seed gives the same mask.
      shape: the mask's shape (at least one axis).
      keep: 1 - rate, in (0, 1).
    """
    rows, cols = math.prod(shape[:-1]), shape[-1]
    row = jax.lax.broadcasted_iota(jnp.uint32, (rows, 1), 0)
    col = jax.lax.broadcasted_iota(jnp.uint32, (1, cols), 1)
    bits = random_bits.hashed_bits(seed.astype(jnp.uint32), row, col)  # [rows, cols]
    return (bits < random_bits.threshold(keep)).reshape(shape)


class Dropout(nn.Module):
    """Inverted dropout with hashed masks: ``flax.linen.Dropout``'s interface and semantics.

    Attributes:
      rate: the probability of zeroing an element (0 is the identity, 1 gives zeros).
      rng_collection: the rng stream the per-call seed is drawn from.
    """

    rate: float
    rng_collection: str = "dropout"

    @nn.compact
    def __call__(self, inputs: jax.Array, deterministic: bool) -> jax.Array:
        """``inputs`` [...] -> the same shape and dtype, elements zeroed with ``rate`` and the
        rest scaled by 1 / (1 - rate); unchanged if ``deterministic`` or ``rate == 0``."""
        if deterministic or self.rate == 0.0:
            return inputs
        if self.rate == 1.0:
            return jnp.zeros_like(inputs)
        keep = 1.0 - self.rate
        seed = jax.random.bits(self.make_rng(self.rng_collection), (), jnp.uint32)
        mask = dropout_mask(seed, inputs.shape or (1,), keep).reshape(inputs.shape)
        return jnp.where(mask, inputs / jnp.asarray(keep, inputs.dtype),
                         jnp.zeros((), inputs.dtype))
