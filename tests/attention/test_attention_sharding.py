"""The kernel on sharded arrays, as other JAX code calls it (8 fake CPU devices).

jax 0.10's ``jax.make_mesh`` gives Explicit axes by default, where a shape's sharding is part of
its type: the blockwise loops' carries must keep one sharding, and slicing a sharded axis is an
error. Each implementation runs on batch- and head-sharded inputs under Auto and Explicit
meshes, with and without ``jax.set_mesh``, and under ``shard_map``; it must equal ``jax.nn``
on the unsharded inputs. With only the batch and head axes sharded, attention needs no data
from another device, so the compiled HLO must hold no collective at all, forward or backward.
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

from transformer_jax.attention import dot_product_attention

B, T, N, H = 4, 48, 8, 16
SPEC = P("data", None, "model", None)  # [B, T, N, H]: batch and heads sharded
IMPLS = [("exact", None), ("blockwise", (16, 8))]
COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter")


def _mesh(devices, axis_type):
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2,
                         devices=devices[:8])


def _inputs(kv_heads):
    return randn(0, (B, T, N, H)), randn(1, (B, T, kv_heads, H)), randn(2, (B, T, kv_heads, H))


def _ours(impl, block):
    return functools.partial(dot_product_attention, is_causal=True, implementation=impl,
                             block_size=block)


def _loss(fn, q, k, v):
    return jnp.sum(jnp.sin(fn(q, k, v)))


@pytest.mark.parametrize("impl,block", IMPLS)
@pytest.mark.parametrize("axis_type,kv_heads", [  # kv_heads 4: grouped-query, K sharded too
    (AxisType.Explicit, N), (AxisType.Explicit, 4), (AxisType.Auto, 4)])
def test_sharded_inputs_under_jit_with_and_without_set_mesh(devices, axis_type, impl, block,
                                                            kv_heads):
    mesh = _mesh(devices, axis_type)
    q, k, v = _inputs(kv_heads)
    placed = [jax.device_put(x, NamedSharding(mesh, SPEC)) for x in (q, k, v)]
    expected = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    grad = jax.jit(jax.grad(functools.partial(_loss, _ours(impl, block)), argnums=(0, 1, 2)))
    expected_grad = jax.grad(functools.partial(
        _loss, functools.partial(jax.nn.dot_product_attention, is_causal=True)),
        argnums=(0, 1, 2))(q, k, v)
    forward = jax.jit(_ours(impl, block))
    out = forward(*placed)  # no mesh in context: the arrays carry it
    np.testing.assert_allclose(out, expected, atol=2e-6, rtol=1e-5)
    assert out.sharding.spec == SPEC
    with jax.set_mesh(mesh):
        np.testing.assert_allclose(forward(*placed), expected, atol=2e-6, rtol=1e-5)
        for got, want in zip(grad(*placed), expected_grad):
            np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("impl,block", IMPLS)
@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_under_shard_map_over_batch_and_heads(devices, axis_type, impl, block):
    mesh = _mesh(devices, axis_type)
    q, k, v = _inputs(4)
    placed = [jax.device_put(x, NamedSharding(mesh, SPEC)) for x in (q, k, v)]
    mapped = jax.jit(jax.shard_map(_ours(impl, block), mesh=mesh, in_specs=(SPEC,) * 3,
                                   out_specs=SPEC))  # check_vma=True, the default
    np.testing.assert_allclose(mapped(*placed),
                               jax.nn.dot_product_attention(q, k, v, is_causal=True),
                               atol=2e-6, rtol=1e-5)


def count_collectives(hlo: str) -> dict[str, int]:
    """How many of each collective op a compiled module's text holds (``-start`` counted once,
    its ``-done`` not)."""
    return {name: len(re.findall(rf"= [^=]*\b{name}(-start)?\(", hlo)) for name in COLLECTIVES}


@pytest.fixture(scope="module")
def auto_mesh(devices):
    return _mesh(devices, AxisType.Auto)


@pytest.mark.parametrize("impl,block", IMPLS + [("jax.nn", None)])
@pytest.mark.parametrize("kv_heads", [N, 4])
def test_no_collectives_when_only_batch_and_heads_are_sharded(auto_mesh, impl, block, kv_heads):
    """GSPMD (Auto axes) partitions the whole computation from the inputs' shardings: with B
    split 2 ways and N 4 ways, every device holds whole sequences of whole heads. With K = 4
    kv heads split 4 ways too, device j holds query heads 2j, 2j + 1 and kv head j, exactly the
    kv head those query heads use (head n uses kv head n // G, G = 2): still nothing to move.
    """
    fn = (functools.partial(jax.nn.dot_product_attention, is_causal=True) if impl == "jax.nn"
          else _ours(impl, block))
    shapes = [jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=NamedSharding(auto_mesh, SPEC))
              for x in _inputs(kv_heads)]
    forward = jax.jit(fn).lower(*shapes).compile().as_text()
    both = jax.jit(jax.grad(functools.partial(_loss, fn), argnums=(0, 1, 2))).lower(
        *shapes).compile().as_text()
    zero = dict.fromkeys(COLLECTIVES, 0)
    assert count_collectives(forward) == zero
    assert count_collectives(both) == zero


def test_collective_counter_counts():
    text = ("%a = f32[2] all-reduce(%x), to_apply=%add\n"
            "%b = (f32[2], f32[2]) collective-permute-start(%y)\n"
            "%c = f32[2] collective-permute-done(%b)\n")
    counts = count_collectives(text)
    assert counts["all-reduce"] == 1 and counts["collective-permute"] == 1
    assert counts["all-gather"] == 0
