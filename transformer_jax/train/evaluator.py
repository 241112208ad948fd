"""Validation during training, and the workload's evaluation when training completes.

:class:`Evaluator` runs the workload's validation pass (and its optional ``eval_metrics``
hook: extra numbers such as BLEU on a fixed slice) at every evaluation point, logs one line, and
returns the numbers for that step's ``metrics.jsonl`` line. The time it takes is counted as not
training (``train_s``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from transformer_jax.parallel import Placement, sharding
from transformer_jax.runs.checkpoint import Checkpointer
from transformer_jax.train.logger import Clock
from transformer_jax.train.workload import Workload

__all__ = ["Evaluator"]


class Evaluator:
    """Validates a workload's parameters and remembers the last result.

    Args:
      work: the workload (``validate``, ``eval_metrics``, ``finish``).
      placement: where the parameters live.
      log: where the validation line goes.
      clock: the run's clock (validation is not training time).

    Attributes:
      val_loss: the last validation loss (nats per target), NaN before the first.
      last_eval: the step it was computed at (-1 before the first).
    """

    def __init__(self, work: Workload, placement: Placement, log: Callable[[str], None],
                 clock: Clock):
        self.work, self.placement, self.log, self.clock = work, placement, log, clock
        self.val_loss, self.last_eval = math.nan, -1

    def validate(self, state: Any, step: int) -> dict[str, Any]:
        """Validate ``state``'s parameters at ``step``, log one line, return the record's
        numbers: ``val_loss``, ``val_bpb`` and the workload's ``eval_metrics``."""
        with self.clock.pause():
            params = self.placement.params(state)
            self.val_loss, self.last_eval = self.work.validate(params), step
            extra = self.work.eval_metrics(params) if self.work.eval_metrics is not None else {}
        bits, per = self.work.bits(self.val_loss)
        more = "".join(f", {key} {value:.4g}" for key, value in extra.items())
        self.log(f"step {step}: val_loss {self.val_loss:.4f} nats/{self.work.unit} "
                 f"({bits:.3f} bits/{per}){more}")
        return {"val_loss": self.val_loss, "val_bpb": bits, **extra}

    def final(self, state: Any, step: int, ckpt: Checkpointer) -> dict[str, Any]:
        """At the end of training: validate unless ``step`` was just validated (a run restored
        already trained), then the workload's ``finish`` evaluation ({} without one)."""
        if self.last_eval != step:
            self.validate(state, step)
        if self.work.finish is None:
            return {}
        params = sharding.to_host(self.placement.params(state))
        return self.work.finish(params, ckpt, step)
