"""Dropout with hashed masks: the documented hash against a NumPy reference, the statistics of
its masks, Flax's semantics (identity, rate 1, inverted scaling, gradients), and one mask
whatever the device layout."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hash_reference import np_hashed_bits
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from transformer_jax.models.dropout import Dropout, dropout_mask

KEY = jax.random.PRNGKey(7)


def _np_mask(seed, shape, keep):
    """The module docstring's formula in NumPy (64-bit integers, reduced mod 2^32)."""
    rows, cols = int(np.prod(shape[:-1])), shape[-1]
    bits = np_hashed_bits(seed, np.arange(rows)[:, None], np.arange(cols))
    return (bits < round(keep * 2**32)).reshape(shape)


def _drop(x, rate, key=KEY, deterministic=False):
    return Dropout(rate).apply({}, x, deterministic=deterministic, rngs={"dropout": key})


@pytest.mark.parametrize("shape", [(5,), (3, 7), (2, 3, 4, 33)])
def test_the_mask_is_the_documented_hash(shape):
    seed = 0xDEADBEEF
    got = np.asarray(jax.jit(dropout_mask, static_argnums=(1, 2))(jnp.uint32(seed), shape, 0.8))
    np.testing.assert_array_equal(got, _np_mask(seed, shape, 0.8))


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.5, 0.9])
def test_masks_keep_one_minus_rate_without_structure(rate):
    keep = 1 - rate
    mask = np.asarray(dropout_mask(jnp.uint32(12345), (16, 256, 256), keep), np.float64)
    n = mask.size
    sigma = np.sqrt(keep * rate / n)
    assert abs(mask.mean() - keep) < 5 * sigma
    flat = mask.reshape(-1, 256)
    centred = flat - keep
    # Neighbours along the columns, along the rows, and across the batch axis are uncorrelated.
    for a, b in ((centred[:, 1:], centred[:, :-1]), (centred[1:], centred[:-1]),
                 (mask[1:] - keep, mask[:-1] - keep)):
        corr = (a * b).mean() / (keep * rate)
        assert abs(corr) < 5 / np.sqrt(a.size), corr
    # Each column and each row keeps about the same share (no stuck counters).
    col_share = flat.mean(axis=0)
    assert np.abs(col_share - keep).max() < 6 * np.sqrt(keep * rate / flat.shape[0])


def test_kept_elements_are_scaled_and_the_rest_zero():
    x = jax.random.normal(jax.random.PRNGKey(1), (64, 128))
    y = np.asarray(_drop(x, 0.25))
    kept = y != 0
    np.testing.assert_allclose(y[kept], np.asarray(x)[kept] / 0.75, rtol=1e-6)
    assert 0.7 < kept.mean() < 0.8
    ones = np.asarray(_drop(jnp.ones((512, 512)), 0.25))
    assert abs(ones.mean() - 1.0) < 0.01  # inverted dropout keeps the expectation


def test_identity_zeros_and_dtype_like_flax():
    x = jnp.arange(12.0).reshape(3, 4).astype(jnp.bfloat16)
    assert _drop(x, 0.5, deterministic=True) is x
    assert _drop(x, 0.0) is x
    np.testing.assert_array_equal(np.asarray(_drop(x, 1.0), np.float32), 0)
    assert _drop(x, 0.5).dtype == jnp.bfloat16
    scalar = _drop(jnp.float32(3.0), 0.5)
    assert scalar.shape == () and float(scalar) in (0.0, 6.0)


def test_the_key_decides_the_mask():
    x = jnp.ones((32, 64))
    a, b = _drop(x, 0.5, KEY), _drop(x, 0.5, KEY)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c = _drop(x, 0.5, jax.random.PRNGKey(8))
    assert 0.4 < (np.asarray(a) != np.asarray(c)).mean() < 0.6
    with pytest.raises(Exception, match="dropout"):  # training mode without an rng, as Flax
        Dropout(0.5).apply({}, x, deterministic=False)


def test_two_dropouts_in_one_model_draw_different_masks():
    class Two(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Dropout(0.5)(x, False), Dropout(0.5)(x, False)

    first, second = Two().apply({}, jnp.ones((64, 64)), rngs={"dropout": KEY})
    assert 0.4 < (np.asarray(first) != np.asarray(second)).mean() < 0.6


def test_gradient_is_the_mask_over_keep():
    x = jax.random.normal(jax.random.PRNGKey(2), (8, 16))
    w = jax.random.normal(jax.random.PRNGKey(3), (8, 16))
    grad = jax.grad(lambda x: jnp.sum(_drop(x, 0.3) * w))(x)
    mask = np.asarray(_drop(jnp.ones_like(x), 0.3)) != 0
    np.testing.assert_allclose(np.asarray(grad), np.where(mask, np.asarray(w) / 0.7, 0),
                               rtol=1e-6)


def test_a_sharded_batch_gets_the_same_mask(devices):
    mesh = Mesh(np.array(devices[:8]).reshape(4, 2), ("data", "model"))
    x = jnp.ones((8, 16, 32))
    sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data", None, "model")))
    fn = jax.jit(lambda x: _drop(x, 0.5))
    np.testing.assert_array_equal(np.asarray(fn(sharded)), np.asarray(fn(x)))
