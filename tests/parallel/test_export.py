"""The train steps lower for GPUs and TPUs, checked on a CPU (``jax.export``, no compile).

``jax.export.export(step, platforms=("cuda", "tpu"))`` lowers the jitted step to StableHLO for
both platforms at once, with the step the training loop runs (built by the workloads' own
``_functions``: model, optimizer, loss, placement). A step fails here when it no longer lowers
for an accelerator, or when it holds a custom call that only a CPU runs (LAPACK, ducc) or a host
callback (``jax.debug.callback``, ``pure_callback``, ``io_callback``): the step must stay
device-only. Covered: the LM step in float32 and bfloat16 with ``remat="block"`` and
``scan_layers`` for each attention implementation that lowers off a GPU, the encoder–decoder
step, and the sharded step on a 4-device mesh (data=2, fsdp=2).

``implementation="cudnn"`` does not lower from a CPU-only machine: jax 0.10.2's
``jax.nn.dot_product_attention(implementation="cudnn")`` raises "cuDNN is not detected" at
trace time without the CUDA plugin (``jax/_src/cudnn/fused_attention_stablehlo.py``,
``check_cudnn_version``), and the project's dispatch refuses it before that, naming the
backend; the last test documents both.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import pytest

from transformer_jax import parallel
from transformer_jax.config import PRESETS, TrainConfig
from transformer_jax.train import lm, seq2seq
from transformer_jax.train.step import init_state

PLATFORMS = ("cuda", "tpu")
T, B, K = 16, 8, 2  # sequence length, global batch, optimizer steps per call
SRC, TGT = 12, 10  # the encoder-decoder's source and target lengths
# Custom calls that every accelerator backend handles: sharding annotations of the partitioner.
PORTABLE_CALLS = {"Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape"}


def _train_config() -> TrainConfig:
    """The training settings of every step here (the one place that builds a TrainConfig)."""
    return TrainConfig(seed=0)


def _model(**overrides):
    # Multiples of 8 in H keep every attention implementation's shape rules satisfied.
    return dataclasses.replace(PRESETS["tiny"], vocab_size=256, max_len=64, remat="block",
                               scan_layers=True, **overrides)


def _lm_step(model_cfg, placement):
    """(jitted train step, abstract state, abstract batches) of the language model."""
    fns = lm._functions(model_cfg, _train_config().step_identity(), T, placement)
    state = jax.eval_shape(lambda: init_state(fns.model, fns.tx, seed=0, seq_len=T))
    return fns.train, state, jax.ShapeDtypeStruct((K, B, T + 1), jnp.int32)


def _export(step, state, batches) -> str:
    """Lower for PLATFORMS; returns the StableHLO text after checking its custom calls."""
    args = (state,) if batches is None else (state, batches)
    exported = jax.export.export(step, platforms=PLATFORMS)(*args)
    assert exported.platforms == PLATFORMS
    text = exported.mlir_module()
    calls = set(re.findall(r"custom_call @([\w$.\-]+)", text))
    calls |= set(re.findall(r'call_target_name = "([^"]+)"', text))
    assert calls <= PORTABLE_CALLS, f"custom calls a GPU or TPU may not run: {calls}"
    return text


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("impl", ["exact", "blockwise", "xla"])
def test_the_lm_step_lowers_for_gpu_and_tpu(dtype, impl, devices):
    # jax.nn's XLA path has no attention dropout; the others run the hashed dropout masks.
    model_cfg = _model(dtype=dtype, attention_impl=impl, dropout_rate=0.0 if impl == "xla"
                       else 0.1)
    text = _export(*_lm_step(model_cfg, parallel.resolve("none", devices[:1])))
    if dtype == "bfloat16":
        assert "bf16" in text  # the compute dtype reached the lowered matmuls
    assert "stablehlo.while" in text  # scan over the steps and over the layers


def test_the_encoder_decoder_step_lowers_for_gpu_and_tpu(devices):
    model_cfg = dataclasses.replace(_model(dropout_rate=0.1), vocab_size=32, scan_layers=False)
    fns = seq2seq._functions(model_cfg, _train_config().step_identity(), SRC, TGT,
                             parallel.resolve("none", devices[:1]))
    state = jax.eval_shape(lambda: init_state(fns.model, fns.tx, seed=0,
                                              input_lengths=(SRC, TGT + 1)))
    _export(fns.train, state, jax.ShapeDtypeStruct((K, B, SRC + TGT + 2), jnp.int32))


def test_the_sharded_step_lowers_for_gpu_and_tpu_on_a_4_device_mesh(devices):
    placement = parallel.resolve("sharded", devices[:4], "data=2,fsdp=2")
    step, state, batches = _lm_step(_model(dropout_rate=0.1), placement)
    text = _export(step, state, batches)
    assert "mhlo.sharding" in text or "sdy.sharding" in text  # the partitioned layout survives


def test_cudnn_attention_does_not_lower_from_a_cpu_only_machine(devices):
    q = jax.ShapeDtypeStruct((2, 128, 4, 64), jnp.bfloat16)
    attention = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, implementation="cudnn", is_causal=True))
    with pytest.raises(RuntimeError, match="cuDNN is not detected"):  # jax's own check
        jax.export.export(attention, platforms=("cuda",))(q, q, q)
    model_cfg = _model(dtype="bfloat16", attention_impl="cudnn", dropout_rate=0.0)
    with pytest.raises(ValueError, match="cuDNN runs only on an NVIDIA GPU.*'cpu'"):
        _export(*_lm_step(model_cfg, parallel.resolve("none", devices[:1])))


def test_a_host_callback_or_a_cpu_only_call_in_a_step_fails_the_check(devices):
    """What the checks above catch: a host callback does not lower for two platforms at once
    (jax 0.10.2: "multi-platform lowering for python_callback"), and a custom call of a kernel
    registered for the CPU only is refused by jax.export (no stability guarantee) and by
    ``_export`` (not a portable call)."""
    abstract = jax.ShapeDtypeStruct((4, 4), jnp.float32)
    with_callback = jax.jit(lambda x: jax.pure_callback(lambda a: a, abstract, x) + 1)
    with pytest.raises(NotImplementedError, match="python_callback"):
        _export(with_callback, abstract, None)
    cpu_kernel = jax.jit(lambda x: jax.ffi.ffi_call("my_cpu_kernel", abstract)(x) + 1)
    with pytest.raises((ValueError, AssertionError), match="my_cpu_kernel"):
        _export(cpu_kernel, abstract, None)
