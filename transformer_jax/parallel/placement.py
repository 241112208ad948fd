"""Where the train step runs: ``jax.pmap`` over the local devices, a device mesh, or one device.

The train step (:func:`transformer_jax.train.step.train_steps`) is one pure function; this module
only decides where it runs. A :class:`Placement` (from ``--parallel`` and ``--mesh``, see
:func:`resolve`) places the state and the batches, compiles the step and brings results back:

* ``"pmap"``: the state is replicated on every local device, the global batch is split along a
  leading device axis, gradients and metrics are averaged with ``lax.pmean`` over the axis
  :data:`AXIS` inside the step. One host.
* ``"sharded"``: ``jit`` with ``in_shardings``/``out_shardings`` on a (data, fsdp, tensor) mesh
  over all devices of all hosts; parameters and optimizer state sharded by one table
  (:mod:`transformer_jax.parallel.sharding`), the batch split over (data, fsdp).
* ``"shard_map"``: data parallelism on the mesh written per device (``jax.shard_map`` +
  ``lax.pmean``), state replicated, the batch split over all devices.
* ``"jit"``: the same function under ``jax.jit`` on one device, no collective.

All donate the state buffers and give the numbers of the one-device step (tests).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

import jax
import numpy as np

from transformer_jax.parallel import sharding

AXIS = "batch"
"""Name of the pmapped device axis (the ``axis_name`` of ``lax.pmean``)."""

Kind = Literal["pmap", "jit", "sharded", "shard_map"]


class BatchSplitError(ValueError):
    """The global batch cannot be split evenly over devices and accumulation micro-batches."""


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a run's step executes, and how state, batches and results move there and back.

    This base class is the single-device case ("jit"): the state lives on ``devices[0]`` and
    the step is ``jax.jit``. The other kinds override what differs: :class:`PmapPlacement`
    (replicated state, batch split over local devices), :class:`ShardedPlacement` (``jit`` on
    a mesh with the state sharded by table) and :class:`ShardMapPlacement` (a per-device step
    on a mesh, state replicated). The loop and the workloads use only this interface.

    Attributes:
      devices: the devices used, in order (one for "jit"; all processes' for the mesh kinds).
      mesh: the (data, fsdp, tensor) mesh of the mesh kinds, else ``None``.
    """

    devices: tuple[Any, ...]
    mesh: jax.sharding.Mesh | None = None
    kind: ClassVar[Kind] = "jit"

    @property
    def num_devices(self) -> int:
        """Number of devices the step runs on."""
        return len(self.devices)

    @property
    def batch_shards(self) -> int:
        """Parts the global batch is split into (tensor-parallel devices share a part)."""
        return len(self.devices)

    @property
    def local_device(self) -> Any:
        """This process's first device (on a multi-host mesh, every process has its own)."""
        return next(d for d in self.devices if d.process_index == jax.process_index())

    def __repr__(self) -> str:
        mesh = "" if self.mesh is None else f", mesh {dict(self.mesh.shape)}"
        return (f"Placement({self.kind!r}, {len(self.devices)} × {self.devices[0].platform}"
                f"{mesh})")

    # ---- state ----------------------------------------------------------------------------

    def shardings(self, abstract_state: Any) -> Any:
        """Where every leaf of the state lives between steps (the restore target)."""
        one = jax.sharding.SingleDeviceSharding(self.devices[0])
        return jax.tree.map(lambda _: one, abstract_state)

    def target(self, abstract_state: Any) -> Any:
        """``ShapeDtypeStruct``s with :meth:`shardings`: what a checkpoint restores into."""
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            abstract_state, self.shardings(abstract_state))

    def init(self, init_fn: Callable[[], Any], abstract_state: Any) -> Any:
        """A fresh state from ``init_fn()``, created in place (sharded arrays are never whole)."""
        with jax.default_device(self.devices[0]):
            return self.place(init_fn())

    def place(self, state: Any) -> Any:
        """A state from :meth:`init` or a restore, as the compiled step takes it."""
        return state

    def params(self, state: Any) -> Any:
        """The parameters on device, without pmap's replica axis (for evaluation)."""
        return state.params

    def saveable(self, state: Any) -> Any:
        """The state as a checkpoint stores it: one replica, or the global (sharded) arrays."""
        return state

    def to_host(self, tree: Any) -> Any:
        """NumPy copies of step outputs (state or metrics), pmap's replica axis dropped.

        With several processes every process must call this (sharded arrays are gathered).
        """
        return sharding.to_host(tree)

    # ---- step and data --------------------------------------------------------------------

    def compile(self, step: Callable[..., Any], abstract_state: Any) -> Callable[..., Any]:
        """``step(state, batches[k, B, T + 1], *, axis_name=None)`` compiled for this placement."""
        return jit_step(step)

    def batches(self, load: Callable[[slice], np.ndarray], shape: tuple[int, ...]) -> Any:
        """The global batches ``[k, B, T + 1]`` as the compiled step takes them.

        Args:
          load: ``load(rows=rows)`` returns rows ``rows`` of the global batches, ``[k, b, T + 1]``
            (:func:`transformer_jax.data.train_batches` with ``rows``); on a mesh each process
            asks only for the rows of its own devices.
          shape: the global shape ``[k, B, T + 1]``.
        """
        return load(rows=slice(None))

    def eval_batch(self, batch: np.ndarray) -> Any:
        """An evaluation batch next to the parameters (replicated over a mesh, every host)."""
        return batch


@dataclasses.dataclass(frozen=True, repr=False)
class PmapPlacement(Placement):
    """``jax.pmap`` over the local devices: the state replicated, the batch split by rows."""

    kind: ClassVar[Kind] = "pmap"

    def place(self, state: Any) -> Any:
        return replicate(state, self.devices)

    def params(self, state: Any) -> Any:
        return unreplicate(state.params)

    def saveable(self, state: Any) -> Any:
        return unreplicate(state)

    def to_host(self, tree: Any) -> Any:
        return jax.device_get(unreplicate(tree))

    def compile(self, step: Callable[..., Any], abstract_state: Any) -> Callable[..., Any]:
        return pmap_step(step, self.devices)

    def batches(self, load: Callable[[slice], np.ndarray], shape: tuple[int, ...]) -> Any:
        return shard_batches(load(rows=slice(None)), self.num_devices)


@dataclasses.dataclass(frozen=True, repr=False)
class ShardedPlacement(Placement):
    """``jax.jit`` on a device mesh: the state sharded by the PartitionSpec table, the batch
    split over (data, fsdp), and XLA's collectives in between."""

    kind: ClassVar[Kind] = "sharded"

    @property
    def batch_shards(self) -> int:
        return self.mesh.shape[sharding.DATA] * self.mesh.shape[sharding.FSDP]

    def _batch_axes(self) -> tuple[str, ...]:
        return sharding.BATCH_AXES

    def shardings(self, abstract_state: Any) -> Any:
        return sharding.state_shardings(abstract_state, self.mesh)

    def init(self, init_fn: Callable[[], Any], abstract_state: Any) -> Any:
        return jax.jit(init_fn, out_shardings=self.shardings(abstract_state))()

    def compile(self, step: Callable[..., Any], abstract_state: Any) -> Callable[..., Any]:
        return sharding.sharded_step(step, self.mesh, self.shardings(abstract_state))

    def batches(self, load: Callable[[slice], np.ndarray], shape: tuple[int, ...]) -> Any:
        return sharding.global_batch(load, shape,
                                     sharding.batch_sharding(self.mesh, self._batch_axes()))

    def eval_batch(self, batch: np.ndarray) -> Any:
        return jax.make_array_from_callback(batch.shape, sharding.replicated(self.mesh),
                                            lambda index: batch[index])


@dataclasses.dataclass(frozen=True, repr=False)
class ShardMapPlacement(ShardedPlacement):
    """A per-device step under ``jax.shard_map`` on the mesh: the state replicated, the batch
    split over every mesh axis, gradients averaged with ``lax.pmean``."""

    kind: ClassVar[Kind] = "shard_map"

    @property
    def batch_shards(self) -> int:
        return len(self.devices)

    def _batch_axes(self) -> tuple[str, ...]:
        return tuple(self.mesh.axis_names)

    def shardings(self, abstract_state: Any) -> Any:
        one = sharding.replicated(self.mesh)
        return jax.tree.map(lambda _: one, abstract_state)

    def compile(self, step: Callable[..., Any], abstract_state: Any) -> Callable[..., Any]:
        return sharding.shard_map_step(step, self.mesh)


_MESH_KINDS = {"sharded": ShardedPlacement, "shard_map": ShardMapPlacement}


def resolve(mode: str, devices: Sequence[Any] | None = None, mesh: str = "") -> Placement:
    """Turn ``--parallel`` (and ``--mesh``) into a :class:`Placement`.

    Args:
      mode: "auto" ("sharded" with a ``mesh`` or several processes; else pmap when there is
        more than one local device, else jit), "pmap", "sharded", "shard_map", or "none" (jit
        on the first device).
      devices: candidate devices; default ``jax.local_devices()`` for pmap/jit and
        ``jax.devices()`` (every process's) for the mesh kinds.
      mesh: ``--mesh``, e.g. "data=2,fsdp=2,tensor=1"
        (:func:`transformer_jax.parallel.sharding.parse_mesh`;
        "" is pure data parallelism over all devices).

    Raises:
      ValueError: an unknown mode, a mesh that does not fit the devices, ``--mesh`` with a
        mode that has none, or pmap/none with several processes.
    """
    if mode == "auto" and (mesh or jax.process_count() > 1):
        mode = "sharded"
    if mode in _MESH_KINDS:
        devices = tuple(devices) if devices is not None else tuple(jax.devices())
        m = sharding.make_mesh(sharding.parse_mesh(mesh, len(devices)), devices)
        return _MESH_KINDS[mode](tuple(m.devices.flat), m)
    if mode not in ("auto", "pmap", "none"):
        raise ValueError("parallel mode must be 'auto', 'pmap', 'sharded', 'shard_map' or "
                         f"'none', got {mode!r}")
    if mesh:
        raise ValueError(f"--mesh needs --parallel sharded or shard_map, not {mode!r}")
    if jax.process_count() > 1:
        raise ValueError(f"--parallel {mode} runs on one host; with {jax.process_count()} "
                         "processes use sharded or shard_map")
    devices = tuple(devices) if devices is not None else tuple(jax.local_devices())
    if not devices:
        raise ValueError("no devices to run on")
    if mode == "none" or (mode == "auto" and len(devices) == 1):
        return Placement(tuple(devices[:1]))
    return PmapPlacement(tuple(devices))


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
