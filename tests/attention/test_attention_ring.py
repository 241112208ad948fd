"""Ring attention on 4 and 8 fake CPU devices, against the exact path on one device.

Forward and gradients, causal and not, grouped-query heads and padding lengths; inside the
caller's ``shard_map``; per-device memory falling with the ring's size; and the compiled HLO:
collective-permutes carry the blocks, and nothing all-gathers the sequence.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_reference import randn
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from transformer_jax.attention import dot_product_attention, ring_attention

B, T, N, K, H = 2, 64, 4, 2, 8  # grouped-query: two query heads per kv head
Q, KEY, VALUE = randn(0, (B, T, N, H)), randn(1, (B, T, K, H)), randn(2, (B, T, K, H))
LENGTHS = {"query_seq_lengths": jnp.array([64, 45]), "key_value_seq_lengths": jnp.array([37, 64])}


def _loss(fn, q, k, v):
    return jnp.sum(jnp.sin(fn(q, k, v)) * jnp.cos(q))  # a non-trivial cotangent


def _value_and_grad(fn):
    return jax.jit(jax.value_and_grad(lambda q, k, v: _loss(fn, q, k, v), argnums=(0, 1, 2)))


def _mesh(devices, n, axis_type=AxisType.Auto):
    return jax.make_mesh((n,), ("seq",), axis_types=(axis_type,), devices=devices[:n])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [4, 8])
def test_equals_the_exact_path_forward_and_gradients(devices, n, causal):
    kw = dict(is_causal=causal, **LENGTHS)
    ring = functools.partial(ring_attention, mesh=_mesh(devices, n), axis_name="seq", **kw)
    exact = functools.partial(dot_product_attention, implementation="exact", **kw)
    out = jax.jit(ring)(Q, KEY, VALUE)
    np.testing.assert_allclose(out, exact(Q, KEY, VALUE), atol=2e-6, rtol=1e-5)
    assert float(jnp.abs(out[1, 45:]).max()) == 0.0  # padded queries give zeros
    (loss, grads), (loss_ref, grads_ref) = (_value_and_grad(f)(Q, KEY, VALUE)
                                            for f in (ring, exact))
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
    for name, got, want in zip("qkv", grads, grads_ref):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4, err_msg=name)


def test_explicit_mesh_window_and_bf16(devices):
    """An Explicit mesh (jax.make_mesh's default) with the batch split too, a sliding window
    spanning block edges, key sub-blocks of 4 within each step (some skipped by the window),
    and bf16 inputs (float32 inside, like the kernel)."""
    mesh = jax.make_mesh((2, 4), ("data", "seq"), devices=devices[:8])
    kw = {"is_causal": True, "local_window_size": (10, 0), "block_size": 4}
    q, k, v = (jax.device_put(x, NamedSharding(mesh, P("data"))) for x in (Q, KEY, VALUE))
    ring = functools.partial(ring_attention, mesh=mesh, axis_name="seq", **kw)
    exact = functools.partial(dot_product_attention, implementation="exact",
                              is_causal=True, local_window_size=(10, 0))
    with jax.set_mesh(mesh):
        out = jax.jit(ring)(q, k, v)
        assert out.sharding.spec[:2] == ("data", "seq")
        grads = _value_and_grad(ring)(q, k, v)[1]
        half = jax.jit(ring)(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
    np.testing.assert_allclose(out, exact(Q, KEY, VALUE), atol=2e-6, rtol=1e-5)
    for got, want in zip(grads, _value_and_grad(exact)(Q, KEY, VALUE)[1]):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(half.astype(jnp.float32), exact(Q, KEY, VALUE), atol=3e-2)


def test_inside_the_callers_shard_map(devices):
    mesh = _mesh(devices, 4)
    seq = P(None, "seq")

    def local(q, k, v):  # this device's blocks: [B, T/4, N, H]
        return ring_attention(q, k, v, axis_name="seq", is_causal=True)

    mapped = jax.shard_map(local, mesh=mesh, in_specs=(seq,) * 3, out_specs=seq)
    exact = functools.partial(dot_product_attention, implementation="exact", is_causal=True)
    np.testing.assert_allclose(jax.jit(mapped)(Q, KEY, VALUE), exact(Q, KEY, VALUE), atol=2e-6)
    for got, want in zip(_value_and_grad(mapped)(Q, KEY, VALUE)[1],
                         _value_and_grad(exact)(Q, KEY, VALUE)[1]):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


def _compiled_grad(devices, n, length):
    mesh = _mesh(devices, n)
    ring = functools.partial(ring_attention, mesh=mesh, axis_name="seq", is_causal=True,
                             block_size=64)
    shapes = [jax.ShapeDtypeStruct((1, length, 4, 32), jnp.float32,
                                   sharding=NamedSharding(mesh, P(None, "seq")))] * 3
    return _value_and_grad(ring).lower(*shapes).compile()


def test_memory_per_device_falls_with_the_ring_size(devices):
    temps = {n: _compiled_grad(devices, n, 1024).memory_analysis().temp_size_in_bytes
             for n in (2, 4, 8)}
    # A step holds [T/P, block] scores at a time: about half the memory at twice the devices.
    assert temps[2] > 1.5 * temps[4] > 2.25 * temps[8], temps


def test_hlo_rotates_blocks_and_gathers_nothing(devices):
    hlo = _compiled_grad(devices, 4, 256).as_text()
    assert len(re.findall(r"collective-permute(-start)?\(", hlo)) >= 4  # k, v fwd; + dk, dv
    assert not re.search(r"all-gather(-start)?\(", hlo)
    assert not re.search(r"all-to-all\(", hlo)


@pytest.mark.parametrize("kwargs,message", [
    ({"mesh": None}, "needs mesh= with the axis 'seq'"),
    ({"axis_name": "other"}, "needs mesh= with the axis 'other'"),
    ({"scale": jnp.float32(0.1)}, "scale as a Python number"),
])
def test_bad_arguments_are_named(devices, kwargs, message):
    args = {"mesh": _mesh(devices, 4), "axis_name": "seq"} | kwargs
    with pytest.raises(ValueError, match=message):
        ring_attention(Q, KEY, VALUE, **args)
    with pytest.raises(ValueError, match="multiples of 8, got T=60"):
        ring_attention(Q[:, :60], KEY, VALUE, mesh=_mesh(devices, 8), axis_name="seq")
