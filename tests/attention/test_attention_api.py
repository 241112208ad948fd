"""The attention kernel against independent references.

References: a float64 NumPy implementation written from the formula (attention_reference.py),
and ``jax.nn.dot_product_attention`` for every argument the two share. Gradients are checked
against ``jax.nn``'s autodiff and against central finite differences of the float64 reference.
"""

import dataclasses
import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_reference import make_inputs, randn, reference
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from transformer_jax.attention import (
    attention_weights,
    blockwise,
    dot_product_attention,
    kernels,
    scaled_dot_product_attention,
)
from transformer_jax.attention.dispatch import (
    AUTO_BLOCKWISE_SCORES,
    Device,
    Problem,
    choose_implementation,
)

IMPLS = [("exact", None), ("blockwise", 8), ("blockwise", (16, 4))]


# Mask settings shared by the jax.nn comparison; none of them masks a whole row.
B_, T_, S_, N_, K_, H_ = 2, 37, 45, 4, 2, 8
_Q, _K, _V = make_inputs()
_BIAS = randn(10, (B_, N_, T_, S_))
_MASK = jax.random.uniform(jax.random.PRNGKey(11), (B_, 1, T_, S_)) > 0.2
_MASK = _MASK.at[..., 0].set(True)  # key 0 always visible: no all-masked rows
CASES = {
    "none": {},
    "bias": {"bias": _BIAS},
    "mask": {"mask": _MASK},
    "kv_lengths": {"key_value_seq_lengths": jnp.array([30, 45])},
    "all": {"bias": _BIAS, "mask": _MASK, "key_value_seq_lengths": jnp.array([30, 45])},
    "window": {"local_window_size": (5, 3)},
}


@pytest.mark.parametrize("impl,block", IMPLS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_jax_nn_and_float64_reference(case, causal, impl, block):
    kw = CASES[case]
    out = dot_product_attention(_Q, _K, _V, is_causal=causal, implementation=impl,
                                block_size=block, **kw)
    expected = jax.nn.dot_product_attention(_Q, _K, _V, is_causal=causal, **kw)
    np.testing.assert_allclose(out, expected, atol=2e-6, rtol=1e-5)
    ref = reference(_Q, _K, _V, kw.get("bias"), kw.get("mask"), is_causal=causal,
                    kv_lens=kw.get("key_value_seq_lengths"), window=kw.get("local_window_size"))
    np.testing.assert_allclose(out, ref, atol=2e-6, rtol=1e-5)
    assert out.dtype == jnp.float32 and out.shape == _Q.shape


@functools.lru_cache(maxsize=None)
def _grad_fn(impl, block, causal, case):
    kw = {k: v for k, v in CASES[case].items() if k != "bias"}
    has_bias = "bias" in CASES[case]

    def loss(fn, q, k, v, b):
        extra = {"bias": b} if has_bias else {}
        out = fn(q, k, v, is_causal=causal, **kw, **extra)
        return jnp.sum(out * jnp.cos(out))  # a non-trivial cotangent

    ours = functools.partial(dot_product_attention, implementation=impl, block_size=block)
    g = jax.jit(jax.grad(functools.partial(loss, ours), argnums=(0, 1, 2, 3)))
    g_ref = jax.jit(jax.grad(functools.partial(loss, jax.nn.dot_product_attention),
                             argnums=(0, 1, 2, 3)))
    return g, g_ref


@pytest.mark.parametrize("impl,block", IMPLS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", ["none", "all", "window"])
def test_gradients_match_jax_nn(case, causal, impl, block):
    g, g_ref = _grad_fn(impl, block, causal, case)
    for name, a, b in zip("qkvb", g(_Q, _K, _V, _BIAS), g_ref(_Q, _K, _V, _BIAS)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4, err_msg=f"d{name}")
    if "bias" not in CASES[case]:
        return
    assert float(jnp.abs(g(_Q, _K, _V, _BIAS)[3]).max()) > 0  # the bias gradient is real


@pytest.mark.parametrize("impl,block", IMPLS)
def test_gradient_matches_float64_finite_differences(impl, block):
    q, k, v = make_inputs(B=1, T=9, S=11, N=2, K=1, H=4, seed=3)
    bias = randn(7, (1, 1, 9, 11))  # broadcast over batch and heads: dbias sums over them
    w = randn(8, q.shape)

    def f(q, k, v, b):
        out = dot_product_attention(q, k, v, b, is_causal=True, implementation=impl,
                                    block_size=block)
        return jnp.sum(out * w)

    grads = jax.grad(f, argnums=(0, 1, 2, 3))(q, k, v, bias)
    args = [np.asarray(x, np.float64) for x in (q, k, v, bias)]
    wnp = np.asarray(w, np.float64)
    rng = np.random.default_rng(0)
    eps = 1e-5
    for i, grad in enumerate(grads):
        direction = rng.standard_normal(args[i].shape)
        plus = [a + eps * direction if j == i else a for j, a in enumerate(args)]
        minus = [a - eps * direction if j == i else a for j, a in enumerate(args)]
        fd = (np.sum(reference(*plus[:3], plus[3], is_causal=True) * wnp)
              - np.sum(reference(*minus[:3], minus[3], is_causal=True) * wnp)) / (2 * eps)
        analytic = float(np.sum(np.asarray(grad, np.float64) * direction))
        assert abs(fd - analytic) <= 1e-4 * max(1.0, abs(fd)), (i, fd, analytic)


@pytest.mark.parametrize("impl,block", IMPLS)
def test_fully_masked_rows_are_zero_with_finite_gradients(impl, block):
    q, k, v = make_inputs(B=2, T=13, S=10, N=2, K=2, H=4)
    mask = jnp.ones((2, 2, 13, 10), bool).at[0, :, 3].set(False).at[1, 1].set(False)
    q_lens = jnp.array([13, 7])  # rows 7.. of example 1 are padding
    kv_lens = jnp.array([10, 0]).at[0].set(10)

    def f(q, k, v):
        return dot_product_attention(q, k, v, mask=mask, query_seq_lengths=q_lens,
                                     key_value_seq_lengths=kv_lens, implementation=impl,
                                     block_size=block)

    out = f(q, k, v)
    assert not bool(jnp.isnan(out).any())
    np.testing.assert_array_equal(out[0, 3], 0.0)
    np.testing.assert_array_equal(out[1, 7:], 0.0)
    np.testing.assert_array_equal(out[1, :, 1], 0.0)
    ref = reference(q, k, v, mask=mask, q_lens=q_lens, kv_lens=kv_lens)
    np.testing.assert_allclose(out, ref, atol=2e-6, rtol=1e-5)
    grads = jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2))(q, k, v)
    assert all(bool(jnp.isfinite(g).all()) for g in grads)
    np.testing.assert_array_equal(grads[0][0, 3], 0.0)  # a masked row passes no gradient

    # An example with no valid key at all (length 0) is all zeros, too.
    zero = dot_product_attention(q, k, v, key_value_seq_lengths=jnp.array([0, 10]),
                                 implementation=impl, block_size=block)
    np.testing.assert_array_equal(zero[0], 0.0)


@pytest.mark.parametrize("impl,block", IMPLS)
def test_query_padding_matches_jax_nn(impl, block):
    q_lens, kv_lens = jnp.array([20, 37]), jnp.array([45, 12])
    out = dot_product_attention(_Q, _K, _V, is_causal=True, query_seq_lengths=q_lens,
                                key_value_seq_lengths=kv_lens, implementation=impl,
                                block_size=block)
    expected = jax.nn.dot_product_attention(_Q, _K, _V, is_causal=True,
                                            query_seq_lengths=q_lens,
                                            key_value_seq_lengths=kv_lens)
    np.testing.assert_allclose(out, expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("T,S,block", [(1, 1, 4), (17, 17, 8), (33, 5, 8), (5, 70, (2, 16)),
                                       (100, 100, 32)])
@pytest.mark.parametrize("causal", [False, True])
def test_exact_and_blockwise_agree_on_odd_lengths(T, S, block, causal):
    q, k, v = make_inputs(B=2, T=T, S=S, N=4, K=1, H=8, seed=T + S)
    kw = dict(is_causal=causal, key_value_seq_lengths=jnp.array([S, max(1, S - 3)]))
    exact = dot_product_attention(q, k, v, implementation="exact", **kw)
    blockwise = dot_product_attention(q, k, v, implementation="blockwise", block_size=block, **kw)
    np.testing.assert_allclose(blockwise, exact, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("impl,block", IMPLS[:2])
def test_low_precision_inputs(dtype, impl, block):
    q, k, v = make_inputs(B=2, T=24, S=24, N=4, K=2, H=16, dtype=dtype)
    out = dot_product_attention(q, k, v, is_causal=True, implementation=impl, block_size=block)
    assert out.dtype == dtype
    ref = reference(q, k, v, is_causal=True)  # float64 on the rounded inputs
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, atol=3e-2, rtol=3e-2)
    expected = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(expected, np.float32),
                               atol=3e-2, rtol=3e-2)
    grads = jax.grad(lambda q: jnp.sum(dot_product_attention(
        q, k, v, is_causal=True, implementation=impl, block_size=block).astype(jnp.float32)))(q)
    assert grads.dtype == dtype and bool(jnp.isfinite(grads.astype(jnp.float32)).all())


def test_large_logits_do_not_overflow_in_low_precision():
    """Softmax runs in float32: logits far beyond bf16's exp range stay finite."""
    q, k, v = make_inputs(B=1, T=8, S=8, N=1, K=1, H=4, dtype=jnp.bfloat16)
    out = dot_product_attention(q * 300, k * 300, v, implementation="exact")
    assert bool(jnp.isfinite(out.astype(jnp.float32)).all())


@given(
    B=st.integers(1, 2), T=st.integers(1, 24), S=st.integers(1, 24), K=st.sampled_from([1, 2]),
    G=st.sampled_from([1, 3]), H=st.sampled_from([4, 8]), causal=st.booleans(),
    masking=st.sampled_from(["none", "mask", "bias", "lengths"]),
    impl=st.sampled_from(["exact", "blockwise"]), block=st.sampled_from([4, 8, (3, 5)]),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_against_float64_reference(B, T, S, K, G, H, causal, masking, impl, block,
                                                 seed):
    N = K * G
    q, k, v = make_inputs(B, T, S, N, K, H, seed=seed)
    kw, ref_kw = {}, {}
    if masking == "mask":
        kw["mask"] = ref_kw["mask"] = jax.random.bernoulli(jax.random.PRNGKey(seed), 0.7,
                                                           (B, N, T, S))
    elif masking == "bias":
        kw["bias"] = randn(seed + 5, (1, N, T, S))
        ref_kw["bias"] = kw["bias"]
    elif masking == "lengths":
        lens = jax.random.randint(jax.random.PRNGKey(seed), (2, B), 0, 1 + max(T, S))
        kw["query_seq_lengths"] = ref_kw["q_lens"] = jnp.minimum(lens[0], T)
        kw["key_value_seq_lengths"] = ref_kw["kv_lens"] = jnp.minimum(lens[1], S)
    out = dot_product_attention(q, k, v, is_causal=causal, implementation=impl,
                                block_size=block, **kw)
    ref = reference(q, k, v, is_causal=causal, **ref_kw)
    np.testing.assert_allclose(out, ref, atol=3e-6, rtol=2e-5)


def test_single_example_kernel_is_what_gets_vmapped():
    out = dot_product_attention(_Q, _K, _V, _BIAS, is_causal=True)
    for b in range(B_):
        one = scaled_dot_product_attention(_Q[b], _K[b], _V[b], _BIAS[b], is_causal=True)
        np.testing.assert_allclose(out[b], one, atol=1e-6)
        assert one.shape == (T_, N_, H_)


def test_custom_scale_and_implementation_auto():
    out = dot_product_attention(_Q, _K, _V, scale=0.3)
    np.testing.assert_allclose(out, reference(_Q, _K, _V, scale=0.3), atol=2e-6, rtol=1e-5)
    cpu = Device("cpu")

    def choose(implementation, T, S):
        return choose_implementation(implementation, Problem(jnp.float32, T, S, 64), cpu)

    assert choose(None, 1024, 1024) == "exact"
    assert choose(None, 4096, 4096) == "blockwise"
    assert choose(None, 1, AUTO_BLOCKWISE_SCORES) == "exact"
    assert choose(None, 1, AUTO_BLOCKWISE_SCORES + 1) == "blockwise"
    assert choose("exact", 4096, 4096) == "exact"


def test_attention_weights_are_probabilities():
    kv_lens = jnp.array([30, 45])
    w = attention_weights(_Q, _K, _BIAS, is_causal=True, key_value_seq_lengths=kv_lens)
    assert w.shape == (B_, N_, T_, S_)
    ref = reference(_Q, _K, _V, _BIAS, is_causal=True, kv_lens=kv_lens, return_probs=True)
    np.testing.assert_allclose(w, ref, atol=1e-6)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
    assert float(w[0, :, :, 30:].max()) == 0.0


def _visited(spec, i, n, q_len, kv_len, transposed=False):
    """[lo, hi): the blocks the loop of outer block i visits."""
    lo, _, _, hi = blockwise.block_bounds(spec, i, n, q_len, kv_len, False, transposed)
    return int(lo), int(hi)


def test_causal_blocks_are_skipped_by_the_loop_bounds():
    spec = kernels.Spec(is_causal=True, window=None, block_q=16, block_k=16)
    ranges = [_visited(spec, i, 4, 64, 64) for i in range(4)]
    assert ranges == [(0, 1), (0, 2), (0, 3), (0, 4)]  # 10 of 16 blocks, not 16
    rows = [_visited(spec, j, 4, 64, 64, transposed=True) for j in range(4)]
    assert rows == [(0, 4), (1, 4), (2, 4), (3, 4)]
    # Key padding and a sliding window skip blocks too.
    assert _visited(spec, 3, 4, 64, 20) == (0, 2)
    local = kernels.Spec(is_causal=False, window=(16, 0), block_q=16, block_k=16)
    assert _visited(local, 3, 4, 64, 64) == (2, 4)


def test_exact_path_computes_only_the_causal_triangle_in_chunks():
    # Causal: two halves (each chunk is compiled on its own, so few); a two-sided window: more.
    spec = kernels.Spec(is_causal=True, window=None, block_q=512, block_k=512)
    chunks = kernels.row_chunks(spec, 1024, 1024)
    assert chunks == [(0, 512, 0, 512), (512, 1024, 0, 1024)]
    local = kernels.row_chunks(dataclasses.replace(spec, window=(64, 0)), 1024, 1024)
    assert len(local) == 8 and local[0] == (0, 128, 0, 128) and local[-1] == (896, 1024, 832, 1024)
    full = kernels.row_chunks(dataclasses.replace(spec, is_causal=False), 1024, 1024)
    assert full == [(0, 1024, 0, 1024)]


def test_transforms_jit_vmap_grad():
    f = jax.jit(functools.partial(dot_product_attention, is_causal=True,
                                  implementation="blockwise", block_size=8))
    np.testing.assert_allclose(f(_Q, _K, _V), dot_product_attention(_Q, _K, _V, is_causal=True),
                               atol=2e-6)
    # vmap over an extra leading axis of the batched function.
    stacked = jax.vmap(lambda q, k, v: dot_product_attention(q, k, v, is_causal=True))(
        jnp.stack([_Q, _Q * 2]), jnp.stack([_K, _K]), jnp.stack([_V, _V]))
    np.testing.assert_allclose(stacked[1], dot_product_attention(_Q * 2, _K, _V, is_causal=True),
                               atol=2e-6)


def test_pmap_and_shard_map(devices):
    devs = devices[:2]
    q, k, v = make_inputs(B=4, T=16, S=16, N=2, K=1, H=4)
    expected = dot_product_attention(q, k, v, is_causal=True)

    def split(x):
        return x.reshape(2, 2, *x.shape[1:])

    pmapped = jax.pmap(lambda q, k, v: dot_product_attention(
        q, k, v, is_causal=True, implementation="blockwise", block_size=4), devices=devs)
    out = pmapped(split(q), split(k), split(v)).reshape(expected.shape)
    np.testing.assert_allclose(out, expected, atol=2e-6)

    mesh = Mesh(np.array(devs), ("data",))
    sharded = jax.jit(jax.shard_map(
        lambda q, k, v: dot_product_attention(q, k, v, is_causal=True),
        mesh=mesh, in_specs=(P("data"),) * 3, out_specs=P("data")))
    np.testing.assert_allclose(sharded(q, k, v), expected, atol=2e-6)


def _bad(**overrides):
    args = dict(query=_Q, key=_K, value=_V, bias=None, mask=None)
    args.update(overrides)
    return args


BAD_INPUTS = [
    ("rank", _bad(query=_Q[0, 0]), ValueError, "query must have rank 4"),
    ("ranks differ", _bad(query=_Q[0]), ValueError, "key must have rank 3"),
    ("key rank", _bad(key=_K[..., 0]), ValueError, "key must have rank 4"),
    ("batch", _bad(key=_K[:1], value=_V[:1]), ValueError, "batch sizes differ"),
    ("kv shapes", _bad(value=_V[:, :5]), ValueError, "key and value must have the same shape"),
    ("head dim", _bad(key=_K[..., :4], value=_V[..., :4]), ValueError, "head dims"),
    ("gqa", _bad(key=jnp.zeros((B_, S_, 3, H_)), value=jnp.zeros((B_, S_, 3, H_))),
     ValueError, "multiple of key/value heads"),
    ("int query", _bad(query=jnp.zeros((B_, T_, N_, H_), jnp.int32)), TypeError, "floating"),
    ("dtype mix", _bad(key=_K.astype(jnp.bfloat16)), TypeError, "share one dtype"),
    ("mask dtype", _bad(mask=jnp.ones((B_, N_, T_, S_), jnp.float32)), TypeError,
     "mask must be a boolean"),
    ("mask shape", _bad(mask=jnp.ones((B_, N_, T_, 7), bool)), ValueError,
     "mask of shape (2, 4, 37, 7) is not broadcastable"),
    ("mask rank", _bad(mask=jnp.ones((1, B_, N_, T_, S_), bool)), ValueError, "mask of shape"),
    ("bias shape", _bad(bias=jnp.ones((3, 1, T_, S_))), ValueError, "bias of shape"),
    ("bias dtype", _bad(bias=jnp.ones((T_, S_), jnp.complex64)), TypeError, "bias must be"),
]


@pytest.mark.parametrize("name,args,exc,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_raise_clear_errors(name, args, exc, message):
    with pytest.raises(exc, match=message.replace("(", r"\(").replace(")", r"\)")):
        dot_product_attention(**args)


# Cases jax.nn lets through (it casts a complex bias): ours refuses them, nothing to match.
JAX_NN_ACCEPTS = {"bias dtype"}


@pytest.mark.parametrize("name,args", [b[:2] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_raise_what_jax_nn_raises(name, args):
    """Code that catches jax.nn's exception catches ours (ValueError, also for dtypes)."""
    if name in JAX_NN_ACCEPTS:  # still true of the installed jax, or the set is out of date
        jax.nn.dot_product_attention(**args)
        return
    try:
        jax.nn.dot_product_attention(**args)
    except Exception as e:  # noqa: BLE001 (the point is which class jax.nn raises)
        expected = type(e)
    else:
        raise AssertionError(f"jax.nn accepts the {name} case: add it to JAX_NN_ACCEPTS")
    with pytest.raises(expected):
        dot_product_attention(**args)


@pytest.mark.parametrize("kwargs,exc,message", [
    (dict(query_seq_lengths=jnp.array([1, 2, 3])), ValueError, "query_seq_lengths must have shape"),
    (dict(key_value_seq_lengths=jnp.array([1.0, 2.0])), TypeError, "integer array"),
    (dict(implementation="flash"), ValueError, "implementation must be one of"),
    (dict(block_size=0), ValueError, "block_size must be a positive int"),
    (dict(block_size=(8,)), ValueError, "block_size"),
    (dict(local_window_size=(-1, 2)), ValueError, "local_window_size"),
    (dict(scale=jnp.ones(2)), TypeError, "scale must be a real number or a one-element"),
])
def test_bad_options_raise_clear_errors(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        dot_product_attention(_Q, _K, _V, **kwargs)


def test_errors_raise_at_trace_time_inside_jit():
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        jax.jit(dot_product_attention).lower(
            jax.ShapeDtypeStruct((1, 4, 3, 8), jnp.float32),
            jax.ShapeDtypeStruct((1, 4, 2, 8), jnp.float32),
            jax.ShapeDtypeStruct((1, 4, 2, 8), jnp.float32))
    with pytest.raises(ValueError, match=r"must have rank 3 \[T, N, H\]"):
        scaled_dot_product_attention(_Q, _K[0], _V[0])


def test_importing_the_kernel_does_not_import_flax():
    # Nor any package module outside transformer_jax.attention (the package root aside).
    code = ("import sys, transformer_jax.attention; "
            "mods = [m for m in sys.modules if m.startswith('transformer_jax')]; "
            "assert all(m in ('transformer_jax', 'transformer_jax.attention') "
            "or m.startswith('transformer_jax.attention.') for m in mods), mods; "
            "import transformer_jax; "
            "assert 'flax' not in sys.modules, 'flax was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
