"""Where the train step runs: one device, ``pmap`` over local devices, or a device mesh.

* :mod:`~transformer_jax.parallel.placement`: :class:`Placement` (one device, ``jit``) and
  one subclass per other way of running the step (``pmap``, sharded ``jit``, ``shard_map``),
  all with the interface the loop uses; :func:`resolve` picks one from ``--parallel`` and
  ``--mesh``.
* :mod:`~transformer_jax.parallel.sharding`: the mesh and the PartitionSpec rules.
* :mod:`~transformer_jax.parallel.distributed`: multi-host start-up and cross-host flags.
"""

from transformer_jax.parallel.placement import (
    AXIS,
    BatchSplitError,
    Placement,
    PmapPlacement,
    ShardedPlacement,
    ShardMapPlacement,
    check_batch,
    jit_step,
    pmap_step,
    replicate,
    resolve,
    shard_batches,
    unreplicate,
)

__all__ = [
    "AXIS",
    "BatchSplitError",
    "Placement",
    "PmapPlacement",
    "ShardMapPlacement",
    "ShardedPlacement",
    "check_batch",
    "jit_step",
    "pmap_step",
    "replicate",
    "resolve",
    "shard_batches",
    "unreplicate",
]
