"""The implementations that are jax.nn's ("xla", "cudnn") and the automatic choice.

Whether cuDNN can run a call is a pure function of the call and the device, tested here with
fake GPUs; its facts come from the installed jax (``jax/_src/cudnn/fused_attention_stablehlo.py``).
On this CPU, "cudnn" must refuse naming why, and "xla" must equal ``jax.nn`` except on rows
with no visible key, which are zeros in every implementation.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_reference import make_inputs
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from transformer_jax.attention import dot_product_attention
from transformer_jax.attention.dispatch import (
    Device,
    Problem,
    choose_implementation,
    cudnn_unsupported,
    sharded_axes,
)

HOPPER = Device("gpu", cuda=True, compute_capability="9.0")
AMPERE = Device("gpu", cuda=True, compute_capability="8.0")
SUPPORTED = Problem(jnp.bfloat16, T=1024, S=1024, H=128, is_causal=True,
                    mask_shape=(4, 1, 1024, 1024))


def test_cudnn_is_the_automatic_choice_where_it_runs():
    assert cudnn_unsupported(SUPPORTED, HOPPER) is None
    assert choose_implementation(None, SUPPORTED, HOPPER) == "cudnn"
    assert choose_implementation(None, SUPPORTED, Device("cpu")) == "exact"
    assert choose_implementation("blockwise", SUPPORTED, HOPPER) == "blockwise"
    assert cudnn_unsupported(dataclasses.replace(SUPPORTED, H=256), HOPPER) is None


@pytest.mark.parametrize("change,device,reason", [
    ({}, Device("cpu"), "only on an NVIDIA GPU"),
    ({}, Device("gpu", cuda=False), "only on an NVIDIA GPU"),  # a ROCm GPU
    (dict(dtype=jnp.float32), HOPPER, "float16 or bfloat16"),
    (dict(H=100), HOPPER, "multiple of 8"),
    (dict(H=256), AMPERE, "at most 128"),
    (dict(mask_shape=(4, 1, 1, 1024)), HOPPER, "full [T, S]"),
    (dict(T=1023, S=1023, mask_shape=(4, 1, 1023, 1023)), HOPPER, "even T and S"),
    (dict(is_causal=False, window=(8, 2)), HOPPER, "only a left window"),
    (dict(static_scale=False), HOPPER, "scale as a Python number"),
    (dict(dropout=True), HOPPER, "no attention dropout"),
    (dict(sharded=frozenset({"T"})), HOPPER, "sharding along the sequence"),
])
def test_cudnn_refuses_naming_the_reason(change, device, reason):
    problem = dataclasses.replace(SUPPORTED, **change)
    assert reason in cudnn_unsupported(problem, device)
    assert choose_implementation(None, problem, device) == "exact"  # ours, by size
    with pytest.raises(ValueError, match=r"implementation='cudnn' cannot run this call: .*"
                                         + re.escape(reason)):
        choose_implementation("cudnn", problem, device)


def test_cudnn_on_this_cpu_is_a_clear_error():
    q, k, v = make_inputs(B=1, T=8, S=8, N=2, K=2, H=8, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="cuDNN runs only on an NVIDIA GPU"):
        dot_product_attention(q, k, v, implementation="cudnn")


def test_xla_is_jax_nn_except_on_rows_with_no_visible_key():
    q, k, v = make_inputs(B=2, T=9, S=11, N=4, K=2, H=8)
    mask = jnp.ones((2, 1, 9, 11), bool).at[1, :, 4].set(False)  # row 4 of example 1 sees none
    kw = dict(mask=mask, is_causal=True, key_value_seq_lengths=jnp.array([11, 7]))
    out, lse = dot_product_attention(q, k, v, implementation="xla", return_residual=True, **kw)
    expected, lse_ref = jax.nn.dot_product_attention(q, k, v, return_residual=True, **kw)
    np.testing.assert_array_equal(out[1, 4], 0.0)
    assert bool(jnp.all(jnp.isneginf(lse[1, 4])))
    seen = jnp.ones((2, 9), bool).at[1, 4].set(False)
    np.testing.assert_allclose(out[seen], expected[seen], atol=1e-6)
    np.testing.assert_allclose(lse[seen], lse_ref[seen], atol=1e-5)
    ours = dot_product_attention(q, k, v, implementation="exact", **kw)
    np.testing.assert_allclose(out, ours, atol=2e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="jax.nn's XLA path has no attention dropout"):
        dot_product_attention(q, k, v, implementation="xla", dropout_rate=0.1,
                              dropout_rng=jax.random.PRNGKey(0))


def test_sharded_axes_of_a_concrete_query(devices):
    mesh = Mesh(np.array(devices[:2]), ("x",))
    q = jnp.zeros((2, 8, 2, 4))
    assert sharded_axes(q) == frozenset()
    assert sharded_axes(jax.device_put(q, NamedSharding(mesh, P("x")))) == frozenset()
    assert sharded_axes(jax.device_put(q, NamedSharding(mesh, P(None, "x")))) == {"T"}
