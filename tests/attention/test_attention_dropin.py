"""The kernel takes what ``jax.nn.dot_product_attention`` takes, and its edge cases hold.

One example without a batch axis, ``scale`` as a (traced, differentiated) array, integer and
boolean biases, Python lists, out-of-range lengths (clamped, eagerly and under ``jit``),
``return_residual``; x64, empty sequences, NaN in padded slots, and bf16/fp16 gradients no
noisier than ``jax.nn``'s. References: ``jax.nn`` and the float64 NumPy reference.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_reference import make_inputs, randn, reference

from transformer_jax.attention import dot_product_attention

IMPLS = [("exact", None), ("blockwise", 4)]
Q, K, V = make_inputs(B=2, T=9, S=11, N=4, K=2, H=8, seed=5)
BIAS = randn(9, (2, 4, 9, 11))


def test_one_example_without_batch_axis_matches_jax_nn():
    impl, block = "blockwise", 4
    mask = jax.random.bernoulli(jax.random.PRNGKey(1), 0.7, (4, 9, 11)).at[..., 0].set(True)
    kw = dict(mask=mask, is_causal=True, key_value_seq_lengths=jnp.array([8]))
    out = dot_product_attention(Q[0], K[0], V[0], BIAS[0], implementation=impl,
                                block_size=block, **kw)
    expected = jax.nn.dot_product_attention(Q[0], K[0], V[0], BIAS[0], **kw)
    assert out.shape == Q[0].shape
    np.testing.assert_allclose(out, expected, atol=2e-6, rtol=1e-5)
    # jax.nn's [1, N, T, S] masks and a scalar length are taken for one example too.
    again = dot_product_attention(Q[0], K[0], V[0], BIAS[0][None], mask=mask[None],
                                  is_causal=True, key_value_seq_lengths=8,
                                  implementation=impl, block_size=block)
    np.testing.assert_allclose(again, out, atol=1e-6)


@pytest.mark.parametrize("impl,block,dtype", [("exact", None, "float32"),
                                              ("exact", None, "bfloat16"),
                                              ("blockwise", 4, "bfloat16")])
def test_scale_is_an_array_with_a_gradient(impl, block, dtype):
    # A learnable temperature: scale traced under jit and differentiated (the scaled query of
    # float32 inputs, the same for both implementations, and the scaled float32 logits of bf16
    # inputs, which each implementation differentiates itself).
    q, k, v = (x.astype(dtype) for x in (Q, K, V))

    def loss(fn, scale):
        return jnp.sum(jnp.sin(fn(q, k, v, scale=scale).astype(jnp.float32)))

    ours = functools.partial(dot_product_attention, implementation=impl, block_size=block,
                             is_causal=True)
    ref = functools.partial(jax.nn.dot_product_attention, is_causal=True)
    value, grad = jax.jit(jax.value_and_grad(functools.partial(loss, ours)))(jnp.float32(0.4))
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    value_ref, grad_ref = jax.value_and_grad(
        lambda s: jnp.sum(jnp.sin(ref(*up, scale=s))))(jnp.float32(0.4))
    tol = 1e-4 if dtype == "float32" else 3e-2
    np.testing.assert_allclose(value, value_ref, rtol=tol)
    np.testing.assert_allclose(grad, grad_ref, rtol=tol, atol=tol)
    assert abs(float(grad)) > 0.1


def test_integer_and_boolean_bias_are_cast_as_jax_nn_casts_them():
    int_bias = jax.random.randint(jax.random.PRNGKey(2), (2, 1, 9, 11), -2, 3)
    bool_bias = int_bias > 0
    for bias in (int_bias, bool_bias):
        out = dot_product_attention(Q, K, V, bias)
        np.testing.assert_allclose(out, jax.nn.dot_product_attention(Q, K, V, bias),
                                   atol=2e-6, rtol=1e-5)


def test_python_lists_are_converted_or_named():
    q, k, v = (np.asarray(x[:1, :3, :2, :2]) for x in (Q, K, V))
    mask = [[[[True, False, True]] * 3] * 2]
    bias = np.ones((1, 2, 3, 3)).tolist()
    out = dot_product_attention(q.tolist(), k.tolist(), v.tolist(), bias, mask,
                                key_value_seq_lengths=[2])
    expected = dot_product_attention(q, k, v, jnp.asarray(bias), jnp.asarray(mask),
                                     key_value_seq_lengths=jnp.array([2]))
    np.testing.assert_allclose(out, expected, atol=1e-6)
    with pytest.raises(TypeError, match="bias must be an array"):
        dot_product_attention(q, k, v, bias=[[1.0, 2.0], [3.0]])


def test_numpy_float64_query_is_converted_as_jax_nn_converts_it():
    q64 = np.asarray(Q, np.float64)  # with x64 off, jnp.asarray makes it float32
    expected = jax.nn.dot_product_attention(q64, K, V, is_causal=True)
    for impl, block in IMPLS:
        out = dot_product_attention(q64, K, V, is_causal=True, implementation=impl,
                                    block_size=block)
        assert out.dtype == expected.dtype == jnp.float32
        np.testing.assert_allclose(out, expected, atol=2e-6, rtol=1e-5)


def test_out_of_range_lengths_are_clamped_eagerly_and_under_jit():
    kw = dict(query_seq_lengths=jnp.array([99, -3]), key_value_seq_lengths=jnp.array([-1, 40]))
    eager = dot_product_attention(Q, K, V, **kw)
    jitted = jax.jit(functools.partial(dot_product_attention, **kw))(Q, K, V)
    clamped = dot_product_attention(Q, K, V, query_seq_lengths=jnp.array([9, 0]),
                                    key_value_seq_lengths=jnp.array([0, 11]))
    np.testing.assert_array_equal(eager, jitted)
    np.testing.assert_array_equal(eager, clamped)
    assert float(jnp.abs(eager).max()) == 0.0  # example 0 sees no key, example 1 no query


@pytest.mark.parametrize("impl,block", IMPLS)
def test_return_residual_matches_jax_nn(impl, block):
    kw = dict(is_causal=True, key_value_seq_lengths=jnp.array([11, 6]))
    out, lse = dot_product_attention(Q, K, V, BIAS, implementation=impl, block_size=block,
                                     return_residual=True, **kw)
    expected, lse_ref = jax.nn.dot_product_attention(Q, K, V, BIAS, return_residual=True, **kw)
    assert lse.shape == (2, 9, 4) and lse.dtype == Q.dtype
    np.testing.assert_allclose(out, expected, atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(lse, lse_ref, atol=2e-6, rtol=1e-5)
    # A row with no visible key: lse -inf (jax.nn: the log-sum-exp of its padding values).
    _, empty = dot_product_attention(Q, K, V, key_value_seq_lengths=jnp.array([0, 11]),
                                     implementation=impl, return_residual=True)
    assert bool(jnp.all(jnp.isneginf(empty[0]))) and bool(jnp.all(jnp.isfinite(empty[1])))


@pytest.mark.parametrize("impl,block", IMPLS)
def test_float64_inputs_and_bias_gradient_under_x64(impl, block):
    q, k, v = make_inputs(B=1, T=5, S=7, N=2, K=1, H=4, seed=3)
    bias = randn(4, (1, 1, 5, 7))
    with jax.enable_x64(True):
        args = [np.asarray(x, np.float64) for x in (q, k, v, bias)]

        def loss(q, k, v, b):
            out = dot_product_attention(q, k, v, b, is_causal=True, implementation=impl,
                                        block_size=block)
            return jnp.sum(out ** 2)

        grads = jax.grad(loss, argnums=(0, 1, 2, 3))(*args)
        assert all(g.dtype == jnp.float64 for g in grads)
        out = dot_product_attention(*args[:3], args[3], is_causal=True, implementation=impl,
                                    block_size=block)
    np.testing.assert_allclose(out, reference(*args[:3], args[3], is_causal=True), atol=1e-12)
    eps, rng = 1e-6, np.random.default_rng(0)
    for i, grad in enumerate(grads):  # float64 central differences of the float64 reference
        d = rng.standard_normal(args[i].shape)
        shifted = [[a + sign * eps * d if j == i else a for j, a in enumerate(args)]
                   for sign in (1, -1)]
        fd = [np.sum(reference(*x[:3], x[3], is_causal=True) ** 2) for x in shifted]
        np.testing.assert_allclose(np.sum(np.asarray(grad) * d), (fd[0] - fd[1]) / (2 * eps),
                                   rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("impl,block", IMPLS)
@pytest.mark.parametrize("T,S", [(0, 11), (9, 0)])
def test_empty_sequences_give_empty_or_zero_results(impl, block, T, S):
    q, k, v = make_inputs(B=2, T=T, S=S, N=2, K=1, H=4)
    f = functools.partial(dot_product_attention, implementation=impl, block_size=block)
    out = f(q, k, v)
    assert out.shape == (2, T, 2, 4) and not bool(jnp.any(out))
    grads = jax.grad(lambda *a: jnp.sum(f(*a)), argnums=(0, 1, 2))(q, k, v)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


@pytest.mark.parametrize("impl,block", IMPLS)
def test_nan_in_padded_slots_reaches_no_gradient(impl, block):
    q_lens, kv_lens = jnp.array([9, 5]), jnp.array([7, 11])

    def garbage(x, lengths):  # NaN beyond the lengths, as in an uninitialised buffer
        pad = jnp.arange(x.shape[1])[None, :] >= lengths[:, None]
        return jnp.where(pad[..., None, None], jnp.nan, x)

    def loss(q, k, v, b):
        out = dot_product_attention(q, k, v, b, query_seq_lengths=q_lens,
                                    key_value_seq_lengths=kv_lens, implementation=impl,
                                    block_size=block)
        return jnp.sum(jnp.sin(out))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    clean = grad(Q, K, V, BIAS)
    dirty = grad(garbage(Q, q_lens), garbage(K, kv_lens), garbage(V, kv_lens), BIAS)
    for name, a, b in zip(("dq", "dk", "dv", "dbias"), clean, dirty):
        np.testing.assert_array_equal(a, b, err_msg=name)  # NaN-free, and padding-free


def _loss(fn, q, k, v, bias, mask, w):
    return jnp.sum(fn(q, k, v, bias, mask).astype(jnp.float32) * w)


@functools.lru_cache(maxsize=None)
def _attention_grad(impl):
    fn = functools.partial(dot_product_attention, implementation=impl, block_size=8)
    return jax.jit(jax.grad(functools.partial(_loss, fn), argnums=(0, 1, 2, 3)))


def _sweep_case(case, seed):
    """Inputs of one case: random, one visible key per row (the true dq is 0), or a bias
    constant along each row (the true gradient of that constant is 0)."""
    B, T, S, N, Kh, H = 2, 16, 16, 2, 1, 16
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    q, k, v = (jax.random.normal(key, shape) for key, shape in
               zip(ks[:3], [(B, T, N, H), (B, S, Kh, H), (B, S, Kh, H)]))
    bias = jax.random.normal(ks[3], (B, N, T, S))
    mask = jnp.ones((B, 1, T, S), bool)
    if case == "one key":
        mask = mask.at[..., 1:].set(False)
    if case == "row-constant bias":
        bias = jnp.broadcast_to(bias[..., :1], bias.shape)
    return q, k, v, bias, mask, jax.random.normal(ks[4], (B, T, N, H))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_gradients_are_no_noisier_than_jax_nn(dtype):
    # The error of each gradient (dq, dk, dv, dbias; RMS against float32 on the same rounded
    # inputs) is at most 1.5x jax.nn's own at that dtype, with a floor at float32 rounding for
    # gradients that are truly about zero. jax.nn runs eagerly: under jit its fp16 path asks
    # for a dot precision the CPU backend lacks.
    nn_grad = jax.grad(functools.partial(_loss, jax.nn.dot_product_attention),
                       argnums=(0, 1, 2, 3))
    for case in ("random", "one key", "row-constant bias"):
        for seed in (0,):
            q, k, v, bias, mask, w = _sweep_case(case, seed)
            low = [x.astype(dtype) for x in (q, k, v, bias)]
            truth = _attention_grad("exact")(*(x.astype(jnp.float32) for x in low), mask, w)

            def error(grads):
                return [float(jnp.sqrt(jnp.mean((g.astype(jnp.float32) - t) ** 2)))
                        for g, t in zip(grads, truth)]

            theirs = error(nn_grad(*low, mask, w))
            for impl in ("exact", "blockwise"):
                ours = error(_attention_grad(impl)(*low, mask, w))
                for name, a, b in zip(("dq", "dk", "dv", "dbias"), ours, theirs):
                    assert a <= 1.5 * b + 1e-6, (impl, case, seed, name, a, b)
