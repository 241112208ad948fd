"""The projections' contraction: the same values and gradients as ``lax.dot_general`` (and a
float64 NumPy reference) for every form a dense layer takes, in bfloat16, under vmap and with
sharded kernels; other contractions fall back to ``lax.dot_general``."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from model_helpers import TINY, random_params, tokens

from transformer_jax import models
from transformer_jax.models.matmul import dot_general

# (x shape, w shape, contracted axes k): a projection, qkv's (3, N, H) features, the attention
# output's (N, H) contraction, a 2-D input.
FORMS = [((2, 5, 8), (8, 6), 1), ((2, 5, 8), (8, 3, 2, 4), 1), ((2, 5, 3, 4), (3, 4, 8), 2),
         ((7, 8), (8, 5), 1)]


def _dims(x_ndim, k):
    return (tuple(range(x_ndim - k, x_ndim)), tuple(range(k))), ((), ())


def _loss(fn, k, ct):
    def loss(x, w):
        return jnp.sum(fn(x, w, _dims(x.ndim, k)) * ct)
    return loss


def _np_grads(x, w, k, ct):
    """d/dx, d/dw of sum((x · w) * ct) in float64: ct · wᵀ, and xᵀ · ct over the merged
    tokens."""
    x, w, ct = (np.asarray(a, np.float64) for a in (x, w, ct))
    K, F = int(np.prod(w.shape[:k])), int(np.prod(w.shape[k:]))
    x2, w2, ct2 = x.reshape(-1, K), w.reshape(K, F), ct.reshape(-1, F)
    return (ct2 @ w2.T).reshape(x.shape), (x2.T @ ct2).reshape(w.shape)


@pytest.mark.parametrize("x_shape,w_shape,k", FORMS)
def test_values_and_gradients_match_jax_and_float64(x_shape, w_shape, k):
    kx, kw, kc = jax.random.split(jax.random.PRNGKey(0), 3)
    x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
    ct = jax.random.normal(kc, x_shape[:-k] + w_shape[k:])
    ours = jax.jit(jax.value_and_grad(_loss(dot_general, k, ct), argnums=(0, 1)))(x, w)
    theirs = jax.jit(jax.value_and_grad(_loss(jax.lax.dot_general, k, ct), argnums=(0, 1)))(x, w)
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-6)
    for got, want, ref in zip(ours[1], theirs[1], _np_grads(x, w, k, ct)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_bfloat16_keeps_its_dtypes_and_second_order_works():
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 3, 8)).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.PRNGKey(2), (8, 6)).astype(jnp.bfloat16)
    gx, gw = jax.grad(lambda x, w: jnp.sum(dot_general(x, w, _dims(3, 1)).astype(jnp.float32)),
                      argnums=(0, 1))(x, w)
    assert gx.dtype == gw.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(gw, np.float32),
                               np.asarray(x, np.float32).reshape(-1, 8).sum(0)[:, None]
                               * np.ones((1, 6)), rtol=2e-2)
    # A gradient of a gradient (the backward pass is itself differentiable).
    hess = jax.grad(lambda w: jnp.sum(jax.grad(
        lambda x: jnp.sum(dot_general(x, w, _dims(2, 1)) ** 2))(jnp.ones((2, 3))) ** 2))(
        jnp.ones((3, 2)))
    assert hess.shape == (3, 2) and np.isfinite(np.asarray(hess)).all()


def _uses_custom_backward(lhs, rhs, dims):
    return "custom_vjp_call" in str(jax.make_jaxpr(lambda a, b: dot_general(a, b, dims))(lhs, rhs))


def test_other_contractions_fall_back_to_lax():
    assert _uses_custom_backward(jnp.ones((2, 3, 4)), jnp.ones((4, 5)), _dims(3, 1))
    a, b = jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5))
    batched = (((2,), (1,)), ((0,), (0,)))
    np.testing.assert_array_equal(dot_general(a, b, batched), jax.lax.dot_general(a, b, batched))
    leading = (((0,), (0,)), ((), ()))  # contracts x's first axis: not a dense layer's form
    c = jnp.arange(6.0).reshape(3, 2)
    np.testing.assert_array_equal(dot_general(c, c, leading), jax.lax.dot_general(c, c, leading))
    assert not _uses_custom_backward(a, b, batched)
    assert not _uses_custom_backward(c, c, leading)


def test_under_vmap_and_in_a_dense_layer():
    x = jax.random.normal(jax.random.PRNGKey(3), (3, 4, 8))
    layer = nn.DenseGeneral((2, 5), dot_general=dot_general)
    plain = nn.DenseGeneral((2, 5))
    params = plain.init(jax.random.PRNGKey(4), x)
    grads = [jax.grad(lambda p, m=m: jnp.sum(jax.vmap(lambda r: m.apply(p, r))(x) ** 2))(params)
             for m in (layer, plain)]
    for got, want in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_sharded_kernels_give_the_same_gradients_and_collectives(devices):
    mesh = Mesh(np.array(devices[:8]).reshape(2, 4), ("data", "tensor"))
    x = jax.random.normal(jax.random.PRNGKey(5), (4, 6, 16))
    w = jax.random.normal(jax.random.PRNGKey(6), (16, 3, 4, 8))  # qkv-like [D, 3, N, H]
    ct = jax.random.normal(jax.random.PRNGKey(7), (4, 6, 3, 4, 8))
    xs = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    ws = jax.device_put(w, NamedSharding(mesh, PartitionSpec(None, None, "tensor")))
    ours, theirs = (jax.jit(jax.grad(_loss(fn, 1, ct), argnums=(0, 1)))
                    for fn in (dot_general, jax.lax.dot_general))
    for got, want, plain in zip(ours(xs, ws), theirs(xs, ws), ours(x, w)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got, plain, rtol=1e-5, atol=1e-5)
        assert got.sharding.spec == want.sharding.spec
    # No more communication than JAX's own rule: merging the token axes moves nothing.
    hlo = [f.lower(xs, ws).compile().as_text() for f in (ours, theirs)]
    for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute"):
        assert hlo[0].count(op) <= hlo[1].count(op), op


def test_model_switch_to_jax_rule_gives_the_same_gradients():
    """``dense_backward="jax"`` (the benchmarks' baseline) swaps in ``lax.dot_general``: no
    custom_vjp left in the model's jaxpr, and the LM's gradients agree with the default's."""
    cfg = dataclasses.replace(TINY, num_encoder_layers=0, dropout_rate=0.0)
    x = tokens(0, (2, 6))
    grads, jaxprs = [], []
    for backward in ("matmul", "jax"):
        model = models.build_model("transformer", dataclasses.replace(cfg, dense_backward=backward))
        params = random_params(model, x)

        def loss(p, model=model):
            return jnp.sum(model.apply({"params": p}, x, deterministic=True) ** 2)

        jaxprs.append(str(jax.make_jaxpr(loss)(params)))
        grads.append(jax.grad(loss)(params))
    assert "custom_vjp" in jaxprs[0] and "custom_vjp" not in jaxprs[1]
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
