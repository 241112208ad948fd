"""Training: the pure step and optimizer (imported here), workloads, and the generic loop.

* :mod:`~transformer_jax.train.step` and :mod:`~transformer_jax.train.optim`: the train state,
  loss, optimizer and pure steps. They write no files and know no run directory.
* :mod:`~transformer_jax.train.workload`: the :class:`~transformer_jax.train.workload.Workload`
  interface: what the loop needs to know of a task (model, compiled steps, batches,
  validation, final evaluation). :mod:`~transformer_jax.train.lm` and
  :mod:`~transformer_jax.train.seq2seq` implement it.
* :mod:`~transformer_jax.train.loop`: the loop that drives any workload (resume, SIGTERM and
  Ctrl-C), with its parts :mod:`~transformer_jax.train.logger` (metrics, progress, MFU),
  :mod:`~transformer_jax.train.evaluator` (validation, the final evaluation) and
  :mod:`~transformer_jax.train.saver` (checkpoints).
"""

from transformer_jax.train.optim import make_optimizer, make_schedule
from transformer_jax.train.step import (
    TrainState,
    cross_entropy,
    eval_step,
    init_state,
    train_step,
    train_steps,
)

__all__ = [
    "TrainState",
    "cross_entropy",
    "eval_step",
    "init_state",
    "make_optimizer",
    "make_schedule",
    "train_step",
    "train_steps",
]
