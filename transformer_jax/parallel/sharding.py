"""Sharded training on a device mesh: ``jit`` + ``NamedSharding`` and a ``shard_map`` step.

The pmap path (:mod:`transformer_jax.parallel.placement`) replicates everything on the local
devices. This module is the path JAX recommends for new, large and multi-host jobs (jax 0.10
puts ``pmap`` in maintenance mode and builds it on ``jit`` + ``shard_map``):

* a :class:`jax.sharding.Mesh` with the named axes :data:`AXES` = (data, fsdp, tensor), from a
  ``--mesh data=2,fsdp=2,tensor=1`` string (:func:`parse_mesh`, :func:`make_mesh`);
* ONE table, :data:`PARAM_RULES`, from parameter paths to ``PartitionSpec``s: FSDP (ZeRO-3,
  Rajbhandari et al. 2020) splits every weight matrix — and with it the Adam moments, which
  have the same paths — over ``fsdp``; tensor parallelism (Megatron-LM, Shoeybi et al. 2019)
  splits the attention heads (the fused ``qkv`` projection, ``query``/``kv`` and ``out``:
  heads are independent, §3.2.2) and the feed-forward width F (``wi`` by columns, ``wo`` by
  rows, §3.3) over ``tensor``; biases, LayerNorm scales and scalars are replicated;
* :func:`sharded_step`: the pure train step under ``jax.jit`` with ``in_shardings`` /
  ``out_shardings``; the global batch ``[k, B, T + 1]`` is split over (data, fsdp) and XLA
  inserts the collectives (all-gathers of FSDP weights, reduce-scatters of their gradients,
  the tensor-parallel all-reduces);
* :func:`shard_map_step`: the same step written per device with ``jax.shard_map``: state
  replicated, batch split over every mesh axis, gradients averaged with ``lax.pmean`` — the
  explicit form of data parallelism, and what ``pmap`` is built on in jax 0.10;
* :func:`global_batch`: a global batch array built from per-device row callbacks, so each
  process reads only the rows its own devices hold.

Every path computes the same numbers as one device (tests/parallel/test_sharding.py): a sharded
``jit`` has the semantics of the unsharded program.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from transformer_jax.parallel.mesh import AXES, DATA, FSDP, TENSOR, mesh_axes

__all__ = [
    "AXES",
    "BATCH_AXES",
    "PARAM_RULES",
    "batch_sharding",
    "global_batch",
    "make_mesh",
    "mesh_axes",
    "parse_mesh",
    "path_name",
    "replicated",
    "shard_map_step",
    "sharded_step",
    "spec_for",
    "state_shardings",
    "to_host",
]


BATCH_AXES = (DATA, FSDP)
"""Mesh axes the batch dimension B is split over (FSDP is data parallelism with sharded state)."""

PARAM_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    # Self-attention, one fused projection: qkv/kernel [D, 3, N, H], bias [3, N, H].
    (r"(^|/)qkv/kernel$", (FSDP, None, TENSOR, None)),
    (r"(^|/)qkv/bias$", (None, TENSOR, None)),
    # Cross / grouped-query attention: query/kernel [D, N, H], kv/kernel [D, 2, K, H].
    (r"(^|/)query/kernel$", (FSDP, TENSOR, None)),
    (r"(^|/)query/bias$", (TENSOR, None)),
    (r"(^|/)kv/kernel$", (FSDP, None, TENSOR, None)),
    (r"(^|/)kv/bias$", (None, TENSOR, None)),
    # Output projection out/kernel [N, H, D]: heads in, so it consumes the tensor-split heads.
    (r"(^|/)out/kernel$", (TENSOR, None, FSDP)),
    # Feed-forward (§3.3): wi [D, F] split by columns, wo [F, D] by rows — one all-reduce.
    (r"(^|/)wi/kernel$", (FSDP, TENSOR)),
    (r"(^|/)wi/bias$", (TENSOR,)),
    (r"(^|/)wo/kernel$", (TENSOR, FSDP)),
    # SwiGLU's gate wg [D, F] is split like wi.
    (r"(^|/)wg/kernel$", (FSDP, TENSOR)),
    (r"(^|/)wg/bias$", (TENSOR,)),
    # Embeddings embed/embedding [V, D] (tied output projection) and positions/pos_embed
    # [max_len, D] split along D (V = 50257 or 37000 rarely divides), unembed/kernel [D, V],
    # and any other matrix (the LSTM/GRU gates): FSDP only.
    (r"(^|/)embedding$", (None, FSDP)),
    (r"(^|/)pos_embed$", (None, FSDP)),
    (r"(^|/)kernel$", (FSDP, None)),
    # Everything else — biases of D, LayerNorm scale/bias, step counters, keys: replicated.
    (r"", ()),
)
"""Parameter path (``/``-joined, matched with ``re.search``, first match wins) -> mesh axis per
dimension; missing trailing dimensions are ``None`` (not split). Optimizer moments share their
parameter's path suffix (``opt_state/.../mu/layer_0/mlp/wi/kernel``), so they are sharded like
the parameter. A dimension that the axis size does not divide stays whole (replicated over
that axis), e.g. a feed-forward width of 1000 over tensor=16."""


# ---- the mesh ---------------------------------------------------------------------------------


def parse_mesh(spec: str, num_devices: int) -> dict[str, int]:
    """``"data=2,fsdp=2,tensor=1"`` -> ``{"data": 2, "fsdp": 2, "tensor": 1}`` for ``num_devices``.

    Axes left out are 1, except that an empty ``spec`` means ``data=num_devices`` (pure data
    parallelism) and one axis given as ``-1`` takes the remaining devices.

    Raises:
      ValueError: bad syntax (:func:`mesh_axes`), or sizes whose product is not ``num_devices``
        (the message names ``--mesh``, the sizes and the device count).
    """
    sizes = {axis: 1 for axis in AXES}
    if not spec.strip():
        sizes[DATA] = num_devices
        return sizes
    sizes.update(mesh_axes(spec))
    fill = next((k for k, v in sizes.items() if v == -1), None)
    if fill is not None:
        known = math.prod(v for k, v in sizes.items() if k != fill)
        if num_devices % known:
            raise ValueError(f"--mesh {spec!r}: {num_devices} devices cannot be split into "
                             f"{known} × {fill}")
        sizes[fill] = num_devices // known
    total = math.prod(sizes.values())
    if total != num_devices:
        shown = " × ".join(f"{k}={v}" for k, v in sizes.items())
        raise ValueError(f"--mesh {spec!r}: {shown} = {total} devices, but there are "
                         f"{num_devices}; the sizes must multiply to the device count")
    return sizes


def make_mesh(sizes: dict[str, int], devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
    """A mesh with axes :data:`AXES` of the given sizes over ``devices`` (default: all, global).

    ``jax.make_mesh`` orders the devices by the physical topology (ICI rings on TPU, NVLink on
    GPU), with the innermost axis (tensor) on the closest devices. Axis types are ``Auto``:
    shardings are given by the table and the compiler propagates them (jax 0.10's ``make_mesh``
    defaults to ``Explicit``).
    """
    devices = list(devices) if devices is not None else jax.devices()
    shape = tuple(sizes.get(axis, 1) for axis in AXES)
    auto = (jax.sharding.AxisType.Auto,) * len(AXES)
    try:
        return jax.make_mesh(shape, AXES, axis_types=auto, devices=devices)
    except (ValueError, NotImplementedError):
        # A device subset that make_mesh cannot lay out (e.g. 2 of 8 fake CPU devices): as given.
        return jax.sharding.Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=auto)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: jax.sharding.Mesh, axes: tuple[str, ...] = BATCH_AXES) -> NamedSharding:
    """Batches ``[k, B, T + 1]``: rows B split over ``axes``."""
    return NamedSharding(mesh, PartitionSpec(None, axes))


# ---- the parameter table ----------------------------------------------------------------------


def path_name(path: Sequence[Any]) -> str:
    """A key path as ``a/b/0/c`` (dict keys, attribute names and sequence indices)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


SCANNED = r"(^|/)(layers|encoders|decoders)/block/"
"""Parameters of a scanned stack of blocks (``ModelConfig.scan_layers``): their first axis is
the layer axis L, never split; the rule of the block's parameter applies to the rest."""


def spec_for(name: str, shape: Sequence[int], mesh_shape: dict[str, int]) -> PartitionSpec:
    """The :data:`PARAM_RULES` spec of parameter ``name`` with ``shape`` on a mesh of that shape."""
    if re.search(SCANNED, name) and len(shape) > 0:
        return PartitionSpec(None, *spec_for(re.sub(SCANNED, r"\1", name), shape[1:],
                                              mesh_shape))
    for pattern, axes in PARAM_RULES:
        if re.search(pattern, name):
            break
    if len(axes) > len(shape):
        axes = ()  # a leaf named like a matrix but of lower rank (e.g. a scalar): replicate
    axes = tuple(axes) + (None,) * (len(shape) - len(axes))
    return PartitionSpec(*(a if a is None or dim % mesh_shape.get(a, 1) == 0 else None
                           for a, dim in zip(axes, shape)))


def state_shardings(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """A ``NamedSharding`` for every leaf of ``tree`` (params, optimizer state, a TrainState).

    Args:
      tree: a pytree of arrays or ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``).
      mesh: the mesh (axes :data:`AXES`).
    """
    shape = dict(mesh.shape)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: NamedSharding(mesh, spec_for(path_name(p), x.shape, shape)), tree)


# ---- the steps --------------------------------------------------------------------------------


def sharded_step(fn: Callable[..., Any], mesh: jax.sharding.Mesh,
                 shardings: Any) -> Callable[..., Any]:
    """``fn(state, batches)`` under ``jax.jit`` on ``mesh``, state donated.

    Args:
      fn: the pure step (e.g. :func:`transformer_jax.train.step.train_steps` with its settings
        bound, no ``axis_name``): ``(state, batches[k, B, T + 1]) -> (state, metrics)``.
      mesh: the device mesh.
      shardings: the state's shardings (:func:`state_shardings`); the new state keeps them.

    Returns:
      The compiled step; batches are split over :data:`BATCH_AXES`, metrics replicated.
    """
    return jax.jit(fn, in_shardings=(shardings, batch_sharding(mesh)),
                   out_shardings=(shardings, replicated(mesh)), donate_argnums=(0,))


def shard_map_step(fn: Callable[..., Any], mesh: jax.sharding.Mesh) -> Callable[..., Any]:
    """Data parallelism written per device: ``fn(state, batches, axis_name=<all mesh axes>)``.

    Every mesh axis carries data here (the state is replicated, the batch split over all
    devices); inside, ``fn`` averages gradients, losses and target counts with ``lax.pmean``
    over the axes, exactly as under ``pmap``, so the replicas stay identical.
    """
    axes = tuple(mesh.axis_names)
    batch = PartitionSpec(None, axes)
    # check_vma=False: with it on, JAX's transpose of the replicated parameters inserts a psum
    # of their gradients by itself, and fn's own pmean (written for pmap) would count every
    # device's gradient N times (measured: an N-times larger step, hidden by Adam's scale
    # invariance except through ε).
    body = jax.shard_map(functools.partial(fn, axis_name=axes), mesh=mesh,
                         in_specs=(PartitionSpec(), batch),
                         out_specs=(PartitionSpec(), PartitionSpec()), check_vma=False)
    rep = replicated(mesh)
    return jax.jit(body, in_shardings=(rep, NamedSharding(mesh, batch)),
                   out_shardings=(rep, rep), donate_argnums=(0,))


# ---- data in, results out ---------------------------------------------------------------------


def global_batch(load: Callable[[slice], np.ndarray], shape: tuple[int, ...],
                 sharding: NamedSharding) -> jax.Array:
    """A global ``[k, B, ...]`` array whose rows come from ``load(rows=rows)``, per device.

    Each process calls ``load`` only for the rows of its own devices (B split by ``sharding``),
    so in a multi-host run every host reads its slice of the same global batch. Devices that
    hold the same rows (replicas over the tensor axis) share one load.
    """
    cache: dict[tuple[Any, Any], np.ndarray] = {}

    def rows_of(index):
        rows = index[1] if len(index) > 1 else slice(None)
        key = (rows.start, rows.stop)
        if key not in cache:
            cache[key] = np.asarray(load(rows=rows))
        return cache[key][(index[0], slice(None), *index[2:])]

    return jax.make_array_from_callback(shape, sharding, rows_of)


def to_host(tree: Any) -> Any:
    """NumPy copies of a pytree of (possibly multi-host) global arrays, on every process.

    Arrays this process can address fully are fetched with ``jax.device_get``, replicated ones
    are read from a local replica, and the others are all-gathered from the processes that
    hold their shards (then every process must call this).
    """
    def fetch(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(jax.device_get(x))
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(fetch, tree)
