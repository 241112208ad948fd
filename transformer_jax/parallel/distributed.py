"""Multi-host runs: start JAX's distributed runtime from flags or from a managed cluster.

Every host runs the same ``train.py`` command; before JAX touches a device, each process joins
the others through a coordinator (process 0 listens on ``HOST:PORT``). Afterwards
``jax.devices()`` lists the devices of all processes, a mesh spans them
(:mod:`transformer_jax.parallel.sharding`), each process feeds its own rows of every global
batch, orbax writes one checkpoint of the global arrays, and only process 0 writes logs,
metrics and samples (:func:`is_lead`). On CPU the cross-process collectives are gloo's (jax
0.10's default ``jax_cpu_collectives_implementation``), so two processes on one machine are a
real test.

Three ways to start:

* flags: ``--coordinator HOST:PORT --num-processes P --process-id I`` on every host;
* ``--coordinator auto``: ``jax.distributed.initialize()`` detects the cluster (Cloud TPU
  pods, SLURM, Open MPI, Kubernetes; or the ``JAX_COORDINATOR_ADDRESS`` variable);
* nothing: one process (no distributed runtime).
"""

from __future__ import annotations

import jax

__all__ = ["any_process", "check_flags", "initialize", "is_lead"]


def check_flags(coordinator: str | None, num_processes: int | None,
                process_id: int | None) -> None:
    """Validate the multi-host flags (before anything starts).

    Raises:
      ValueError: a message naming the flag that is missing or wrong.
    """
    if coordinator is None:
        if num_processes is not None or process_id is not None:
            raise ValueError("--num-processes and --process-id need --coordinator HOST:PORT")
        return
    if coordinator == "auto":
        return
    host, sep, port = coordinator.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--coordinator must be HOST:PORT (or auto), got {coordinator!r}")
    if num_processes is None or process_id is None:
        raise ValueError("--coordinator HOST:PORT needs --num-processes and --process-id "
                         "(or use --coordinator auto on a managed cluster)")
    if num_processes < 1:
        raise ValueError(f"--num-processes must be >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id must be in [0, {num_processes}), got {process_id}")


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Join the other processes of a multi-host run (call before any other JAX use).

    Args:
      coordinator: "HOST:PORT" of process 0, "auto" (detect a managed cluster), or ``None``
        (a single-process run: nothing to do).
      num_processes: P, with an explicit coordinator.
      process_id: this process's index in [0, P), with an explicit coordinator.

    Returns:
      Whether the distributed runtime was started.
    """
    check_flags(coordinator, num_processes, process_id)
    if coordinator is None:
        return False
    if coordinator == "auto":
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator, num_processes=num_processes,
                                   process_id=process_id)
    return True


def is_lead() -> bool:
    """Whether this process writes logs, metrics, samples and plots (process 0)."""
    return jax.process_index() == 0


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is set on any process (every process must call this; one all-gather).

    A preemption notice (SIGTERM) may reach only some hosts; all must stop at the same step,
    or the others would wait forever in the next collective.
    """
    if jax.process_count() == 1:
        return flag
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))
