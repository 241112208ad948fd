"""``flax_attention_fn`` in Flax's attention modules, against Flax's own attention.

Linen's ``MultiHeadDotProductAttention`` and NNX's ``MultiHeadAttention`` with our adapter must
equal the same modules with their default ``attention_fn`` (outputs, gradients, sown weights,
the KV-cache decode path), with Flax's float masks; dropout must apply and be deterministic
given the key. Rows with no visible key (padding queries) are compared only where Flax's
attention is defined: Flax returns the mean of the values there, ours zeros.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_reference import randn
from flax import nnx

from transformer_jax.attention import flax_attention_fn

B, T, D, HEADS = 2, 6, 16, 4
X = randn(0, (B, T, D))
TOKENS = jnp.array([[1] * T, [1] * 4 + [0] * 2])  # example 1: two padding positions
REAL = TOKENS.astype(bool)
MASK = nn.combine_masks(nn.make_causal_mask(TOKENS),
                        nn.make_attention_mask(TOKENS > 0, TOKENS > 0))  # float32 [B, 1, T, T]


def _linen(attention_fn, **kw):
    return nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=D,
                                           attention_fn=attention_fn, **kw)


PARAMS = _linen(nn.dot_product_attention).init(jax.random.PRNGKey(0), X, mask=MASK)


def test_linen_module_equals_flax_attention_with_gradients_and_sown_weights():
    def run(attention_fn, params):
        out, state = _linen(attention_fn).apply(params, X, mask=MASK, sow_weights=True,
                                                mutable=["intermediates"])
        return out, state["intermediates"]

    def loss(attention_fn, params, x):
        out = _linen(attention_fn).apply(params, x, mask=MASK)
        return jnp.sum(jnp.where(REAL[..., None], out, 0.0) ** 2)

    (out, sown), (ref, sown_ref) = run(flax_attention_fn, PARAMS), run(nn.dot_product_attention,
                                                                       PARAMS)
    np.testing.assert_allclose(out[REAL], ref[REAL], atol=1e-5)
    weights = jax.tree.leaves(sown)[0]
    assert weights.shape == (B, HEADS, T, T)
    np.testing.assert_allclose(weights[0], jax.tree.leaves(sown_ref)[0][0], atol=1e-6)
    grads = jax.grad(functools.partial(loss, flax_attention_fn), argnums=(0, 1))(PARAMS, X)
    expected = jax.grad(functools.partial(loss, nn.dot_product_attention), argnums=(0, 1))(
        PARAMS, X)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_linen_dropout_applies_and_is_deterministic_given_the_key():
    model = _linen(flax_attention_fn, dropout_rate=0.5, deterministic=False)

    def run(seed):
        return model.apply(PARAMS, X, mask=MASK, rngs={"dropout": jax.random.PRNGKey(seed)})

    plain = _linen(flax_attention_fn).apply(PARAMS, X, mask=MASK)
    np.testing.assert_array_equal(run(1), run(1))
    assert float(jnp.abs(run(1) - run(2)).max()) > 1e-3
    assert float(jnp.abs(run(1) - plain).max()) > 1e-3
    off = _linen(flax_attention_fn, dropout_rate=0.5).apply(PARAMS, X, mask=MASK,
                                                             deterministic=True)
    np.testing.assert_allclose(off, plain, atol=1e-6)


def test_linen_kv_cache_decode_equals_flax_attention():
    cache = _linen(nn.dot_product_attention, decode=True).init(
        jax.random.PRNGKey(0), X)["cache"]
    caches = {fn: cache for fn in (flax_attention_fn, nn.dot_product_attention)}
    for t in range(T):
        outs = []
        for fn in caches:
            out, state = _linen(fn, decode=True).apply(
                {"params": PARAMS["params"], "cache": caches[fn]}, X[:, t:t + 1],
                mutable=["cache"])
            caches[fn] = state["cache"]
            outs.append(out)
        np.testing.assert_allclose(outs[0], outs[1], atol=1e-5, err_msg=f"step {t}")


def _nnx(attention_fn, **kw):
    return nnx.MultiHeadAttention(num_heads=HEADS, in_features=D, qkv_features=D,
                                  num_kv_heads=2, decode=False, attention_fn=attention_fn,
                                  rngs=nnx.Rngs(0), **kw)


@nnx.capture(nnx.Intermediate)
def _sowing(model, x, mask):
    return model(x, mask=mask, sow_weights=True)


def test_nnx_module_equals_flax_attention_and_sows_weights():
    ours, ref = _nnx(flax_attention_fn), _nnx(nnx.dot_product_attention)
    (out, sown), (expected, sown_ref) = _sowing(ours, X, MASK), _sowing(ref, X, MASK)
    np.testing.assert_allclose(out[REAL], expected[REAL], atol=1e-5)
    weights, weights_ref = jax.tree.leaves(sown)[0], jax.tree.leaves(sown_ref)[0]
    assert weights.shape == (B, HEADS, T, T)
    np.testing.assert_allclose(weights[0], weights_ref[0], atol=1e-6)
    causal = ours(X, is_causal=True)
    np.testing.assert_allclose(causal, ref(X, is_causal=True), atol=1e-5)
    dropped = _nnx(flax_attention_fn, dropout_rate=0.5)
    first = dropped(X, deterministic=False, rngs=nnx.Rngs(dropout=3))
    np.testing.assert_array_equal(first, dropped(X, deterministic=False,
                                                 rngs=nnx.Rngs(dropout=3)))
    assert float(jnp.abs(first - dropped(X, deterministic=True)).max()) > 1e-3


def test_several_batch_axes_and_flax_masks_directly():
    q, k, v = (randn(i, (2, 3, T, HEADS, 4)) for i in (1, 2, 3))
    mask = nn.make_causal_mask(jnp.ones((2, 1, T)))  # float [2, 1, 1, T, T]: broadcast axes
    bias = randn(4, (3, HEADS, T, T))
    out = flax_attention_fn(q, k, v, bias, mask)
    np.testing.assert_allclose(out, nn.dot_product_attention(q, k, v, bias, mask), atol=1e-5)
    assert out.shape == q.shape
    # precision= as Flax's default takes it: an enum, its name, or a pair (issue 30).
    for precision in (jax.lax.Precision.HIGHEST, "highest", ("highest", "default")):
        np.testing.assert_allclose(flax_attention_fn(q, k, v, bias, mask, precision=precision),
                                   nn.dot_product_attention(q, k, v, bias, mask,
                                                            precision=precision), atol=1e-5)
    with pytest.raises(ValueError, match="precision must be"):
        flax_attention_fn(q, k, v, precision="most")
    with pytest.raises(ValueError, match="does not take einsum_dot_general"):
        flax_attention_fn(q, k, v, einsum_dot_general=jax.lax.dot_general)
    with pytest.raises(ValueError, match="dropout_rate > 0 needs dropout_rng"):
        flax_attention_fn(q, k, v, dropout_rate=0.1)
