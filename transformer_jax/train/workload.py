"""The Workload interface: what the training loop needs to know of a task.

The loop (:mod:`transformer_jax.train.loop`) knows nothing of language modelling or
translation. A task gives it a :class:`Workload`: the model with its compiled steps
(:class:`StepFunctions`), fresh states, batches as a pure function of the step, a validation
pass, and optional hooks for the end of training. The language model
(:mod:`transformer_jax.train.lm`) and the encoder–decoder tasks
(:mod:`transformer_jax.train.seq2seq`) implement it; a new task is one more module that
returns a :class:`Workload`, registered in :mod:`transformer_jax.train.tasks`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

from transformer_jax.config import TrainConfig
from transformer_jax.models.accounting import count_params
from transformer_jax.parallel import Placement, sharding
from transformer_jax.train.optim import make_optimizer
from transformer_jax.train.step import train_steps

__all__ = ["StepFunctions", "Workload", "compile_steps", "validation_loss"]

@dataclasses.dataclass(frozen=True)
class StepFunctions:
    """A workload's model, optimizer, compiled train step, jitted eval step and its FLOP count."""

    model: Any
    tx: Any
    train: Callable[..., Any]
    evaluate: Callable[..., Any]
    flops_per_token: float
    n_params: int


def compile_steps(model: Any, step_cfg: TrainConfig, d_model: int, placement: Placement, *,
                  init_state: Callable[..., Any], eval_step: Callable[..., Any],
                  flops_per_token: Callable[[Any], float], dropout: bool,
                  **step_kwargs: Any) -> StepFunctions:
    """The optimizer and the compiled steps of ``model`` on ``placement``.

    Args:
      model: the Flax module.
      step_cfg: :meth:`~transformer_jax.config.TrainConfig.step_identity` of the run's settings.
      d_model: D (the paper's schedule scales by D^-0.5).
      placement: where the train step runs.
      init_state: ``(model, tx, *, seed) -> TrainState``; traced with ``jax.eval_shape`` only.
      eval_step: ``(params, batch, *, apply_fn) -> (summed loss, count)``; jitted here.
      flops_per_token: abstract params -> training FLOPs per target token.
      dropout: run the model in training mode in the train step.
      **step_kwargs: more keywords of :func:`~transformer_jax.train.step.train_step` (e.g.
        the workload's ``loss_and_grads``).
    """
    tx = make_optimizer(step_cfg, d_model)
    step = functools.partial(train_steps, apply_fn=model.apply, tx=tx,
                             label_smoothing=step_cfg.optim.label_smoothing,
                             grad_accum=step_cfg.optim.grad_accum, dropout=dropout,
                             z_loss=step_cfg.optim.z_loss, **step_kwargs)
    abstract_state = jax.eval_shape(lambda: init_state(model, tx, seed=0))
    train = placement.compile(step, abstract_state)
    evaluate = jax.jit(functools.partial(eval_step, apply_fn=model.apply))
    params = abstract_state.params
    return StepFunctions(model, tx, train, evaluate, flops_per_token(params),
                         count_params(params))


@dataclasses.dataclass(frozen=True)
class Workload:
    """What :func:`~transformer_jax.train.loop.run` trains: a model with its steps and data.

    Attributes:
      fns: the model, optimizer and compiled steps.
      init_state: seed -> a fresh :class:`~transformer_jax.train.step.TrainState` (also traced
        with ``jax.eval_shape`` to restore checkpoints).
      train_batches: (step, k, rows=slice(None)) -> [k, b, W] int32: rows ``rows`` of the
        global batches [k, B, W] of steps step … step + k - 1; a pure function of (seed, step).
        (On a multi-host mesh each process asks only for its own devices' rows.)
      width: W, the width of a batch row.
      validate: params -> mean validation loss (nats per target token).
      tokens_per_step: target tokens per optimizer step (the tokens/s numerator).
      architecture: the model part of the start-up log line ("transformer: 4 layers, ...").
      description: its data part.
      unit: what a target token is in log lines ("byte", "token").
      finish: optional (final params on the host, checkpointer, step) -> a metrics record,
        written as the last line of ``metrics.jsonl`` when training completes (the seq2seq
        test evaluation).
      sample: optional (final params, step, device) -> text generated when training completes;
        the loop appends it to ``samples.txt``.
      bytes_per_target: bytes of text per validation target: val_bpb is then val_loss /
        (bytes_per_target · ln 2), bits per byte of text whatever the tokenizer (None: bits
        per target token).
      run_files: optional run directory -> None, called on process 0 once the directory is
        claimed, to write the workload's own files (the language model's tokenizer).
      interval_metrics: optional (first_step, end_step) -> extra numbers for the log line of
        steps first_step … end_step - 1 (the translation workload's real-token share).
      eval_metrics: optional params -> extra validation numbers, computed at every evaluation
        (the translation workload's greedy BLEU on a slice of the validation pairs).
      batch_shape: optional (step, k) -> the global shape [k, B, W] of the batches of steps
        step … step + k - 1, for workloads whose batch shape changes from step to step
        (length buckets); ``None``: always [k, batch_size, width].
    """

    fns: StepFunctions
    init_state: Callable[[int], Any]
    train_batches: Callable[..., np.ndarray]
    width: int
    validate: Callable[[Any], float]
    tokens_per_step: int
    architecture: str
    description: str
    unit: str = "byte"
    finish: Callable[[Any, Any, int], dict[str, Any]] | None = None
    sample: Callable[[Any, int, Any], str] | None = None
    bytes_per_target: float | None = None
    run_files: Callable[[Any], None] | None = None
    interval_metrics: Callable[[int, int], dict[str, Any]] | None = None
    eval_metrics: Callable[[Any], dict[str, Any]] | None = None
    batch_shape: Callable[[int, int], tuple[int, int, int]] | None = None

    def bits(self, val_loss: float) -> tuple[float, str]:
        """(val_bpb, its unit): val_loss in bits per byte of text, or per token."""
        per = self.bytes_per_target
        return (val_loss / ((per or 1.0) * math.log(2)), "byte" if per else self.unit)


def validation_loss(fns: StepFunctions, params: Any, batches: Iterable[np.ndarray],
                    placement: Placement) -> float:
    """Mean loss per real target over ``batches`` (each [B, W]; padding weighs nothing).

    Sums and counts are added over all batches before dividing, so a padded last batch does
    not tilt the mean. On a multi-host mesh every host gathers the sums.
    """
    sums = [fns.evaluate(params, placement.eval_batch(b)) for b in batches]
    total, count = np.sum(np.asarray(sharding.to_host(sums), np.float64), axis=0)
    return float(total / max(count, 1.0))
