"""Every JAX transformation of both implementations, and dropout on the probabilities.

Forward mode (``jvp``, ``linearize``, ``jacfwd``) and second order (``grad`` of ``grad``)
against ``jax.nn``; ``shard_map`` with its default ``check_vma=True``; ``jax.export`` with
symbolic sequence lengths; dropout against a float64 reference built from the same mask.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_reference import make_inputs, randn
from hash_reference import np_hashed_bits
from jax import export
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from transformer_jax.attention import dot_product_attention, kernels

IMPLS = [("exact", None), ("blockwise", 4)]
Q, K, V = make_inputs(B=2, T=9, S=11, N=2, K=1, H=4, seed=7)
BIAS = randn(3, (2, 2, 9, 11))
KW = dict(is_causal=True, key_value_seq_lengths=jnp.array([11, 6]))


def _ours(impl, block):
    return functools.partial(dot_product_attention, implementation=impl, block_size=block, **KW)


@pytest.mark.parametrize("impl,block", IMPLS)
def test_forward_mode_matches_jax_nn(impl, block):
    ref = functools.partial(jax.nn.dot_product_attention, **KW)
    primals = (Q, K, V, BIAS)
    tangents = tuple(randn(20 + i, x.shape) for i, x in enumerate(primals))
    out, d_out = jax.jvp(_ours(impl, block), primals, tangents)
    expected, d_expected = jax.jvp(ref, primals, tangents)
    np.testing.assert_allclose(out, expected, atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(d_out, d_expected, atol=2e-5, rtol=1e-4)
    _, linear = jax.linearize(_ours(impl, block), *primals)
    np.testing.assert_allclose(linear(*tangents), d_expected, atol=2e-5, rtol=1e-4)
    if impl == "blockwise":  # jacfwd: one tangent per input element, vmapped
        small = Q[:, :3]
        jac = jax.jacfwd(lambda q: _ours(impl, block)(q, K, V))(small)
        jac_ref = jax.jacfwd(lambda q: ref(q, K, V))(small)
        np.testing.assert_allclose(jac, jac_ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("impl,block", IMPLS)
def test_grad_of_grad_matches_jax_nn(impl, block):
    # Reverse over reverse: the gradient of a function of the gradient (a Hessian-vector
    # product, and the gradient penalty of WGAN-GP).
    w = randn(30, Q.shape)

    def penalty(fn, q, k, v, b):
        dq = jax.grad(lambda q: jnp.sum(fn(q, k, v, b) * w))(q)
        return jnp.sum(dq ** 2)

    grads = jax.grad(functools.partial(penalty, _ours(impl, block)), argnums=(0, 1, 2, 3))(
        Q, K, V, BIAS)
    expected = jax.grad(functools.partial(penalty, functools.partial(
        jax.nn.dot_product_attention, **KW)), argnums=(0, 1, 2, 3))(Q, K, V, BIAS)
    for name, a, b in zip(("q", "k", "v", "bias"), grads, expected):
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4, err_msg=name)


def test_shard_map_with_check_vma(devices):
    def ours(q, k, v, b, lengths):
        return dot_product_attention(q, k, v, b, is_causal=True, key_value_seq_lengths=lengths,
                                     implementation="blockwise", block_size=4)

    mesh = Mesh(np.array(devices[:2]), ("data",))
    sharded = jax.jit(jax.shard_map(ours, mesh=mesh, in_specs=(P("data"),) * 5,
                                    out_specs=P("data")))  # check_vma=True: the default
    args = (K, V, BIAS, KW["key_value_seq_lengths"])

    def loss(fn, q):
        return jnp.sum(jnp.sin(fn(q, *args)))

    np.testing.assert_allclose(sharded(Q, *args), ours(Q, *args), atol=1e-6)
    np.testing.assert_allclose(jax.grad(functools.partial(loss, sharded))(Q),
                               jax.grad(functools.partial(loss, ours))(Q), atol=1e-6)


@pytest.mark.parametrize("implementation", ["exact", None])
def test_export_with_symbolic_sequence_lengths(implementation):
    t, s = export.symbolic_shape("t, s")
    f = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, is_causal=True,
                                                      implementation=implementation))
    exported = export.export(f)(*(jax.ShapeDtypeStruct((2, n, h, 4), jnp.float32)
                                  for n, h in ((t, 2), (s, 1), (s, 1))))
    for T, S in ((9, 11), (5, 3)):
        q, k, v = Q[:, :T], K[:, :S], V[:, :S]
        np.testing.assert_allclose(exported.call(q, k, v),
                                   jax.nn.dot_product_attention(q, k, v, is_causal=True),
                                   atol=2e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="'blockwise' needs static sequence lengths"):
        export.export(jax.jit(functools.partial(dot_product_attention,
                                                implementation="blockwise")))(
            *(jax.ShapeDtypeStruct((2, n, 2, 4), jnp.float32) for n in (t, s, s)))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _dropout_masks(rng, rate, B, N, Kh, T_S):
    """The kernel's dropout multipliers [B, N, T, S], with per-example seeds derived as the
    kernel derives them."""
    T, S = T_S
    spec = kernels.Spec(is_causal=True, window=None, block_q=T, block_k=S, dropout_rate=rate)
    drops = []
    for b in range(B):
        seed = jax.random.bits(jax.random.fold_in(rng, b), (2,), jnp.uint32)
        seeds = kernels.head_seeds(spec, seed, Kh, N // Kh)
        drops.append(kernels.dropout_multiplier(spec, seeds, 0, T, 0, S).reshape(N, T, S))
    return jnp.stack(drops)


def _dropout_reference(q, k, v, drop):
    """float64 causal attention whose probabilities are multiplied by ``drop``."""
    _, T, N, H = q.shape
    S, Kh = k.shape[1], k.shape[2]
    q, k, v, drop = (np.asarray(x, np.float64) for x in (q, k, v, drop))
    logits = np.einsum("btnh,bsnh->bnts", q, np.repeat(k, N // Kh, 2)) / np.sqrt(H)
    logits = np.where(np.tril(np.ones((T, S), bool)), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p * drop, np.repeat(v, N // Kh, 2))


def test_dropout_matches_its_reference_in_every_implementation():
    rng, rate = jax.random.PRNGKey(5), 0.25
    drop = _dropout_masks(rng, rate, 2, 2, 1, (9, 11))
    assert 0.15 < float(jnp.mean(drop == 0)) < 0.35  # about `rate` of the entries dropped
    expected = _dropout_reference(Q, K, V, drop)
    results = []
    for impl, block in IMPLS:
        def loss(q, k, v, key, impl=impl, block=block):
            out = dot_product_attention(q, k, v, is_causal=True, implementation=impl,
                                        block_size=block, dropout_rate=rate, dropout_rng=key)
            return jnp.sum(jnp.sin(out)), out

        grad = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))
        (_, out), grads = grad(Q, K, V, rng)
        np.testing.assert_allclose(out, expected, atol=2e-6, rtol=1e-5)
        results.append(grads)
    for a, b in zip(*results):  # the same entries dropped in the backward pass too
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    (_, other_key), _ = grad(Q, K, V, jax.random.PRNGKey(6))
    assert float(jnp.abs(other_key - expected).max()) > 0.1
    twins = [jnp.concatenate([x[:1], x[:1]]) for x in (Q, K, V)]
    shared = dot_product_attention(*twins, is_causal=True, dropout_rate=rate, dropout_rng=rng,
                                   dropout_broadcast=True)
    np.testing.assert_array_equal(shared[0], shared[1])  # one mask for every example


def test_dropout_mask_is_the_documented_hash_of_head_seed_query_and_key():
    """Entry (t, s) of head h is kept when lowbias32(lowbias32(seed_h ^ lowbias32(t)) + s) >=
    rate · 2^32, whatever tile (row0, col0) it is computed in; about 1 - rate are kept, and the
    heads' masks differ."""
    rate, K, G, T, S = 0.3, 2, 3, 64, 96
    spec = kernels.Spec(is_causal=False, window=None, block_q=T, block_k=S, dropout_rate=rate)
    seeds = kernels.head_seeds(spec, jnp.array([11, 22], jnp.uint32), K, G)
    assert seeds.shape == (K, G) and seeds.dtype == jnp.uint32
    bits = np_hashed_bits(np.asarray(seeds)[..., None, None], np.arange(T)[:, None], np.arange(S))
    want = np.where(bits >= round(rate * 2**32), 1 / (1 - rate), 0.0)
    whole = kernels.dropout_multiplier(spec, seeds, 0, T, 0, S)
    np.testing.assert_allclose(whole, want, rtol=1e-6)
    tile = kernels.dropout_multiplier(spec, seeds, jnp.int32(16), 32, jnp.int32(40), 48)
    np.testing.assert_array_equal(tile, whole[:, :, 16:48, 40:88])
    assert abs(float(jnp.mean(whole == 0)) - rate) < 0.02  # 36,864 entries
    flat = np.asarray(whole == 0).reshape(K * G, -1)
    assert all((flat[i] != flat[j]).mean() > 0.3 for i in range(K * G) for j in range(i))


@pytest.mark.parametrize("kwargs,message", [
    (dict(dropout_rate=0.1), "needs dropout_rng"),
    (dict(dropout_rate=1.0, dropout_rng=jax.random.PRNGKey(0)), r"in \[0, 1\)"),
    (dict(dropout_rate=0.1, dropout_rng=jnp.zeros(3, jnp.uint32)), "one jax.random key"),
])
def test_bad_dropout_arguments_are_named(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        dot_product_attention(Q, K, V, **kwargs)
