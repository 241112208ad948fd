"""Checkpoints of a training run: the state, with what a resumed run needs to carry on.

Each checkpoint's metadata holds the step, the model and training configurations (a resumed
run refuses another model by name) and, when the run stopped between two log points, the
per-step metrics gathered since the last ``metrics.jsonl`` line
(:meth:`~transformer_jax.train.logger.MetricsLog.carried`), so that the resumed run's next line
averages the same steps as an uninterrupted run's.
"""

from __future__ import annotations

from typing import Any

from transformer_jax.config import ModelConfig, TrainConfig
from transformer_jax.parallel import Placement
from transformer_jax.runs.checkpoint import Checkpointer
from transformer_jax.train.logger import Clock

__all__ = ["LOG_INTERVAL", "Saver"]

LOG_INTERVAL = "log_interval"
"""The metadata key of the metrics carried over to a resumed run."""


class Saver:
    """Saves the train state of one run into its checkpointer.

    Args:
      ckpt: the run's checkpointer.
      placement: where the state lives (what a checkpoint stores of it).
      model_cfg: the model configuration, saved in every checkpoint's metadata.
      tc: the training configuration, likewise.
      clock: the run's clock (saving is not training time).
    """

    def __init__(self, ckpt: Checkpointer, placement: Placement, model_cfg: ModelConfig,
                 tc: TrainConfig, clock: Clock):
        self.ckpt, self.placement, self.clock = ckpt, placement, clock
        self.meta = {"model": model_cfg.to_dict(), "train": tc.to_dict()}

    def save(self, step: int, state: Any, carried: dict[str, Any] | None = None) -> None:
        """Start saving ``state`` as checkpoint ``step`` (nothing if it is saved already).

        Args:
          step: the step the state has reached.
          state: the train state, as the compiled step holds it.
          carried: the metrics of an unfinished log interval, or ``None``.
        """
        meta = {"step": step, **self.meta}
        if carried:
            meta[LOG_INTERVAL] = carried
        with self.clock.pause():
            self.ckpt.save(step, self.placement.saveable(state), meta)
