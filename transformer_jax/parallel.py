"""Data parallelism over the local devices: the ``jax.pmap`` path (and plain ``jit`` on one).

The train step (:func:`transformer_jax.training.train_steps`) is one pure function; this module
only decides where it runs:

* ``"pmap"``: the state is replicated on every local device, the global batch is split along a
  leading device axis, gradients and metrics are averaged with ``lax.pmean`` over the axis
  :data:`AXIS` inside the step.
* ``"jit"``: the same function under ``jax.jit`` on one device, no collective.

Both donate the state buffers. (The ``jit`` + ``NamedSharding`` / ``shard_map`` paths for
multi-host runs belong here too; DESIGN.md, "Parallelism".)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import numpy as np

__all__ = [
    "AXIS",
    "BatchSplitError",
    "Placement",
    "check_batch",
    "jit_step",
    "pmap_step",
    "replicate",
    "resolve",
    "shard_batches",
    "unreplicate",
]

AXIS = "batch"
"""Name of the pmapped device axis (the ``axis_name`` of ``lax.pmean``)."""

Kind = Literal["pmap", "jit"]


class BatchSplitError(ValueError):
    """The global batch cannot be split evenly over devices and accumulation micro-batches."""


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a run's step executes: ``kind`` ("pmap" or "jit") and its devices.

    Attributes:
      kind: "pmap" (replicated state, batch split over ``devices``) or "jit" (one device).
      devices: the devices used, in order (one for "jit").
    """

    kind: Kind
    devices: tuple[Any, ...]

    @property
    def num_devices(self) -> int:
        """Number of devices the batch is split over."""
        return len(self.devices)

    def __repr__(self) -> str:
        return f"Placement({self.kind!r}, {len(self.devices)} × {self.devices[0].platform})"


def resolve(mode: str, devices: Sequence[Any] | None = None) -> Placement:
    """Turn ``--parallel`` into a :class:`Placement`.

    Args:
      mode: "auto" (pmap when there is more than one device, else jit), "pmap", or "none" (jit
        on the first device).
      devices: candidate devices; default ``jax.local_devices()``.
    """
    devices = tuple(devices) if devices is not None else tuple(jax.local_devices())
    if not devices:
        raise ValueError("no devices to run on")
    if mode == "none" or (mode == "auto" and len(devices) == 1):
        return Placement("jit", tuple(devices[:1]))
    if mode in ("pmap", "auto"):
        return Placement("pmap", tuple(devices))
    raise ValueError(f"parallel mode must be 'auto', 'pmap' or 'none', got {mode!r}")


def check_batch(batch_size: int, num_devices: int, grad_accum: int = 1) -> int:
    """Per-device micro-batch size, or :class:`BatchSplitError` if the split is not even.

    Args:
      batch_size: the global batch B.
      num_devices: devices the batch is split over.
      grad_accum: accumulation micro-batches per device and step.
    """
    parts = num_devices * grad_accum
    if batch_size % parts:
        raise BatchSplitError(
            f"the global batch size {batch_size} cannot be split evenly over {num_devices} "
            f"device(s) × {grad_accum} accumulation micro-batch(es); use a multiple of {parts}"
        )
    return batch_size // parts


def shard_batches(batches: np.ndarray, num_devices: int) -> np.ndarray:
    """[k, B, ...] -> [num_devices, k, B / num_devices, ...]: device d gets rows d·b .. (d+1)·b."""
    k, B = batches.shape[:2]
    check_batch(B, num_devices)
    split = batches.reshape(k, num_devices, B // num_devices, *batches.shape[2:])
    return np.swapaxes(split, 0, 1)


def replicate(tree: Any, devices: Sequence[Any]) -> Any:
    """A copy of every leaf on every device, stacked along a new leading device axis.

    The arrays get exactly the sharding that :func:`pmap_step` returns (a 1-D mesh over
    ``devices`` named :data:`AXIS`), so the second call does not compile the step again for a
    different input layout (as it would after ``flax.jax_utils.replicate``).
    """
    mesh = jax.sharding.Mesh(np.asarray(devices), (AXIS,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))
    n = len(devices)

    def stack(x):
        x = np.asarray(jax.device_get(x))
        return jax.device_put(np.broadcast_to(x, (n, *x.shape)), sharding)

    return jax.tree.map(stack, tree)


def unreplicate(tree: Any) -> Any:
    """The first replica of a replicated pytree (leading device axis dropped)."""
    return jax.tree.map(lambda x: x[0], tree)


def pmap_step(fn: Callable[..., Any], devices: Sequence[Any]) -> Callable[..., Any]:
    """``fn(state, batches, axis_name=AXIS)`` pmapped over ``devices``, state donated.

    Inputs carry a leading device axis: replicated state, batches from :func:`shard_batches`.
    """
    return jax.pmap(functools.partial(fn, axis_name=AXIS), axis_name=AXIS,
                    devices=list(devices), donate_argnums=(0,))


def jit_step(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn(state, batches)`` under ``jax.jit`` with the state donated; it runs where the state is."""
    return jax.jit(fn, donate_argnums=(0,))
