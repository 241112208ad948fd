"""Which implementation runs a call: ours, or one of the two that are ``jax.nn``'s.

``implementation=`` takes "exact" and "blockwise" (ours, :mod:`~transformer_jax.attention.kernels`
and :mod:`~transformer_jax.attention.blockwise`), "xla" and "cudnn" (passed through to
``jax.nn.dot_product_attention``), or None: cuDNN on an NVIDIA GPU when it supports the call,
else ours by size. :func:`cudnn_unsupported` is the pure decision, given a :class:`Device` and a
:class:`Problem`, so it can be tested without a GPU. Its facts come from the installed jax
(``jax/_src/cudnn/fused_attention_stablehlo.py``: ``check_layout``, ``check_is_flash_attention``,
``_check_qkv_bias_mask_spec``; ``jax/_src/nn/functions.py`` for the sliding window).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ("exact", "blockwise", "xla", "cudnn")
#: Above this many scores per (example, head) ``implementation=None`` picks "blockwise" (off a
#: GPU that runs cuDNN): a T = S = 2048 score matrix per head, the size at which the exact
#: path's memory traffic starts to dominate on CPU and its O(T·S) temporaries start to hurt on
#: accelerators (benchmarks/attention.py measures both paths across T).
AUTO_BLOCKWISE_SCORES = 2048 * 2048


@dataclasses.dataclass(frozen=True)
class Device:
    """The backend a call runs on: ``jax.default_backend()`` and, on CUDA, the capability."""

    platform: str
    cuda: bool = False
    compute_capability: str | None = None  # "9.0" for Hopper

    @classmethod
    def current(cls) -> Device:
        platform = jax.default_backend()
        if platform != "gpu":
            return cls(platform)
        device = jax.local_devices()[0]
        capability = getattr(device, "compute_capability", None)
        cuda = "cuda" in getattr(device.client, "platform_version", "").lower()
        return cls(platform, cuda, capability)


@dataclasses.dataclass(frozen=True)
class Problem:
    """The static facts of one call that decide whether cuDNN can run it."""

    dtype: np.dtype
    T: int
    S: int
    H: int
    bias_shape: tuple[int, ...] | None = None
    mask_shape: tuple[int, ...] | None = None
    is_causal: bool = False
    window: tuple[int, int] | None = None
    static_scale: bool = True  # a Python number, not an array
    dropout: bool = False
    sharded: frozenset[str] = frozenset()  # which of "T", "H" the query is sharded along
    precision: bool = False  # precision= was given (jax.nn takes none)


def _capability(device: Device) -> tuple[int, ...]:
    return tuple(int(x) for x in (device.compute_capability or "0").split("."))


def cudnn_unsupported(problem: Problem, device: Device) -> str | None:
    """Why cuDNN attention (through ``jax.nn``) cannot run this call, or None if it can."""
    p = problem
    if device.platform != "gpu" or not device.cuda:
        return f"cuDNN runs only on an NVIDIA GPU, and this backend is {device.platform!r}"
    if jnp.dtype(p.dtype) not in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16)):
        # jax.nn's cuDNN path has no fp8 scaling factors, so fp8 is out too.
        return f"cuDNN attention takes float16 or bfloat16 inputs, got {jnp.dtype(p.dtype)}"
    h_max = 256 if _capability(device) >= (9, 0) else 128  # Hopper and later: 256
    if p.H % 8 or p.H > h_max:
        return (f"cuDNN needs a head dim H that is a multiple of 8 and at most {h_max} on this "
                f"GPU, got H={p.H}")
    if not all(isinstance(d, (int, np.integer)) for d in (p.T, p.S)):
        return "cuDNN needs static sequence lengths T and S"
    for name, shape in (("bias", p.bias_shape), ("mask", p.mask_shape)):
        if shape is not None and tuple(shape[-2:]) != (p.T, p.S):
            return (f"cuDNN needs the {name}'s last two axes to be the full [T, S] = "
                    f"{(p.T, p.S)}, got {name} of shape {tuple(shape)}")
    if (p.bias_shape or p.mask_shape) and (p.T % 2 or p.S % 2):
        return f"cuDNN's backward pass with a bias or mask needs even T and S, got {p.T}, {p.S}"
    if p.window is not None and p.window[1] != 0 and not p.is_causal:
        return f"cuDNN takes only a left window unless is_causal, got local_window_size {p.window}"
    if not p.static_scale:
        return "cuDNN needs scale as a Python number, not an array"
    if p.dropout:
        return "jax.nn's cuDNN path has no attention dropout"
    if p.precision:
        return "jax.nn's cuDNN path takes no precision="
    if p.sharded:
        return "cuDNN's partitioning rejects sharding along the sequence (T) or head-dim (H) axis"
    return None


def choose_implementation(implementation: str | None, problem: Problem,
                          device: Device | None = None) -> str:
    """The implementation that runs: the one given (checked), else by device and size.

    ``None``: "cudnn" on an NVIDIA GPU when :func:`cudnn_unsupported` finds no reason against
    it; otherwise "exact" up to :data:`AUTO_BLOCKWISE_SCORES` scores ``T·S`` per (example,
    head), then "blockwise"; and "exact" when T or S is symbolic (``jax.export``), which only
    the exact path supports.

    Raises:
      ValueError: "cudnn" where it cannot run, "blockwise" with symbolic lengths, or dropout
        with "xla"/"cudnn", each naming the reason.
    """
    device = Device.current() if device is None else device
    static = all(isinstance(d, (int, np.integer)) for d in (problem.T, problem.S))
    if implementation == "cudnn":
        reason = cudnn_unsupported(problem, device)
        if reason:
            raise ValueError(f"implementation='cudnn' cannot run this call: {reason}")
    elif implementation == "xla" and problem.dropout:
        raise ValueError("dropout_rate > 0 needs implementation 'exact', 'blockwise' or None: "
                         "jax.nn's XLA path has no attention dropout")
    elif implementation == "xla" and problem.precision:
        raise ValueError("precision= needs implementation 'exact', 'blockwise' or None: "
                         "jax.nn's XLA path takes no precision")
    elif implementation == "blockwise" and not static:
        raise ValueError("implementation='blockwise' needs static sequence lengths; with a "
                         "symbolic T or S (jax.export) use 'exact' or None")
    if implementation is not None:
        return implementation
    if cudnn_unsupported(problem, device) is None:
        return "cudnn"
    if not static:
        return "exact"
    return "blockwise" if problem.T * problem.S > AUTO_BLOCKWISE_SCORES else "exact"


def sharded_axes(query: jax.Array) -> frozenset[str]:
    """Which of the query's T and H axes ([B, T, N, H]) are sharded, where that is known: a
    concrete array's NamedSharding, or the type of a traced one under explicit sharding."""
    if isinstance(query, jax.core.Tracer):
        spec = getattr(getattr(jax.typeof(query), "sharding", None), "spec", None)
    else:
        spec = getattr(getattr(query, "sharding", None), "spec", None)
    spec = tuple(spec or ()) + (None,) * 4
    return frozenset(name for name, axis in (("T", 1), ("H", 3)) if spec[axis] is not None)
