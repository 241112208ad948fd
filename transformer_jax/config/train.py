"""The training configuration: :class:`TrainConfig`, made of one group per concern.

* :class:`OptimConfig` and :class:`ScheduleConfig`: everything the compiled train step depends on
  (with ``task`` and ``model``); :meth:`TrainConfig.step_identity` is these, and nothing else.
* :class:`DataConfig`: what is read, and the shape of a batch.
* :class:`LoopConfig`: intervals, checkpoints and placement.
* :class:`EvalConfig`: validation, the final evaluation and the sample.

The defaults are neutral (a library's usual values); the named recipes of
:mod:`transformer_jax.config.recipes` say, value by value, why a run differs from them.
A config round-trips through JSON (:meth:`TrainConfig.to_dict` / :meth:`TrainConfig.from_dict`);
``from_dict`` also reads the flat layout that earlier versions wrote into ``config.json``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from transformer_jax.config.fields import at_least, check, from_dict, rule

__all__ = ["DataConfig", "EvalConfig", "LoopConfig", "OptimConfig", "ScheduleConfig",
           "TrainConfig"]

ModelName = Literal["transformer", "lstm", "gru"]
Optimizer = Literal["adamw", "adam"]
Schedule = Literal["cosine", "paper", "constant"]
ParallelMode = Literal["auto", "pmap", "sharded", "shard_map", "none"]
Task = Literal["lm", "translate", "reverse", "sort", "add"]


def _unit(x: float) -> bool:
    return 0.0 <= x < 1.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """The optimizer and the loss: with the schedule, what the compiled train step is made of.

    Attributes:
      optimizer: "adamw" (decoupled weight decay, Loshchilov & Hutter 2019) or "adam": the
        paper's Adam with β1 = 0.9, β2 = 0.98, ε = 1e-9 (§5.3) and no weight decay.
      b1: AdamW β1.
      b2: AdamW β2.
      eps: AdamW ε.
      weight_decay: AdamW decoupled weight decay on matrices and embeddings (not biases or
        LayerNorm scales).
      grad_clip: clip gradients to this global norm; 0 disables clipping.
      grad_accum: micro-batches per optimizer step; gradients are averaged over them.
      label_smoothing: ε_ls of the training loss (§5.4 uses 0.1); evaluation never smooths.
      z_loss: coefficient C of C·log(Z)² added to the training loss per target (PaLM,
        Chowdhery et al. 2022, uses 1e-4): keeps the softmax normaliser near 1.
      max_nonfinite: stop after this many consecutive steps with a non-finite loss or
        gradients (each is skipped by ``optax.apply_if_finite``).
      steps_per_call: optimizer steps run by one compiled call (a ``lax.scan``): fewer
        dispatches, the same per-step results.
    """

    optimizer: Optimizer = "adamw"
    b1: float = rule(0.9, _unit, "lie in [0, 1)")
    b2: float = rule(0.99, _unit, "lie in [0, 1)")
    eps: float = rule(1e-8, lambda x: x > 0.0, "be > 0")
    weight_decay: float = rule(0.1, lambda x: x >= 0.0, "be >= 0")
    grad_clip: float = rule(1.0, lambda x: x >= 0.0, "be >= 0 (0: no clipping)")
    grad_accum: int = at_least(1, 1)
    label_smoothing: float = rule(0.0, _unit, "lie in [0, 1)")
    z_loss: float = rule(0.0, lambda x: x >= 0.0, "be >= 0")
    max_nonfinite: int = at_least(5, 1)
    steps_per_call: int = at_least(1, 1)

    def __post_init__(self):
        check(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    """The learning rate over the run, and the run's length.

    Attributes:
      steps: optimizer steps to train for (the schedule's length).
      schedule: "cosine" (linear warmup, cosine decay to ``lr · min_lr_ratio``), "constant"
        (linear warmup, then ``lr``), or "paper": d_model^-0.5 · min(step^-0.5,
        step · warmup^-1.5) (§5.3).
      lr: peak learning rate of "cosine" and "constant" ("paper" derives its own).
      warmup: warmup steps.
      min_lr_ratio: "cosine" decays to ``lr · min_lr_ratio`` at ``steps``.
    """

    steps: int = at_least(1000, 1)
    schedule: Schedule = "cosine"
    lr: float = rule(1e-3, lambda x: x > 0.0, "be > 0")
    warmup: int = at_least(100, 0)
    min_lr_ratio: float = rule(0.1, lambda x: 0.0 <= x <= 1.0, "lie in [0, 1]")

    def __post_init__(self):
        check(self)
        if self.schedule == "paper" and self.warmup == 0:
            raise ValueError("the paper schedule needs warmup > 0 (§5.3 uses 4000)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """What is trained on, and the shape of a batch.

    Attributes:
      data: text files or folders, or one dataset folder written by ``python -m
        transformer_jax.prepare``; empty means the embedded corpus (the Python reference
        manual, ``pydoc_data.topics``). Sequence-to-sequence tasks generate their own data.
      val_fraction: share of each text file's bytes (its end) held out for validation.
      batch_size: global batch B: sequences per optimizer step, over all devices and
        accumulation micro-batches.
      seq_len: T, tokens per training sequence of a language model.
      batch_tokens: translation on a parallel dataset: token slots per side of a batch
        (§5.1: "approximately 25000 source tokens and 25000 target tokens"), pairs of
        similar length together; 0: ``batch_size`` pairs of the mean length a batch.
    """

    data: tuple[str, ...] = dataclasses.field(default=(), metadata={"metavar": "PATH"})
    val_fraction: float = rule(0.1, lambda x: 0.0 < x < 1.0, "lie in (0, 1)")
    batch_size: int = at_least(16, 1)
    seq_len: int = at_least(128, 1)
    batch_tokens: int = at_least(0, 0)

    def __post_init__(self):
        object.__setattr__(self, "data", tuple(str(p) for p in self.data))
        check(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoopConfig:
    """How often the loop logs, validates and saves, and where the step runs.

    Attributes:
      log_every: steps between metric lines (and progress updates).
      eval_every: steps between validation passes (the last step is always evaluated).
      ckpt_every: steps between checkpoints (the last step is always saved).
      max_to_keep: checkpoints kept on disk.
      parallel: "auto" (pmap over all local devices when there is more than one, else jit;
        "sharded" with a ``mesh`` or several processes), "pmap", "sharded" (jit on a device
        mesh, parameters and optimizer state sharded), "shard_map" (data-parallel step on the
        mesh), or "none" (jit on one device).
      mesh: axis sizes of the device mesh for "sharded"/"shard_map", e.g.
        "data=2,fsdp=2,tensor=1" (axes left out are 1; -1 takes the remaining devices); ""
        means data parallelism over all devices.
    """

    log_every: int = at_least(50, 1)
    eval_every: int = at_least(500, 1)
    ckpt_every: int = at_least(500, 1)
    max_to_keep: int = at_least(3, 1)
    parallel: ParallelMode = "auto"
    mesh: str = dataclasses.field(default="", metadata={"metavar": "AXIS=N,..."})

    def __post_init__(self):
        check(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Validation, the final evaluation and the end-of-run sample.

    Attributes:
      eval_batch_size: sequences per validation batch.
      average_last: sequence-to-sequence tasks: evaluate the test split with the mean
        parameters of the last this many checkpoints (§6.1 averages the last 5); 1: the final
        ones.
      sample_tokens: tokens a language model generates at the end of training (0: none).
      sample_prompt: the prompt of that sample.
      sample_temperature: its softmax temperature.
    """

    eval_batch_size: int = at_least(64, 1)
    average_last: int = at_least(1, 1)
    sample_tokens: int = at_least(200, 0)
    sample_prompt: str = dataclasses.field(default="The ", metadata={"aliases": ("--prompt",)})
    sample_temperature: float = rule(0.8, lambda x: x > 0.0, "be > 0")

    def __post_init__(self):
        check(self)


GROUPS: dict[str, type] = {"optim": OptimConfig, "schedule": ScheduleConfig, "data": DataConfig,
                           "loop": LoopConfig, "eval": EvalConfig}
"""TrainConfig's groups: attribute name -> dataclass."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Settings of a training run (:func:`transformer_jax.train.loop.run`).

    Attributes:
      task: "lm" (language modelling on ``data.data``) or a sequence-to-sequence task of
        :mod:`transformer_jax.data.seq2seq_tasks` ("translate", "reverse", "sort", "add")
        for the encoder–decoder.
      model: model family: "transformer", or the recurrent baselines "lstm" / "gru"
        (:mod:`transformer_jax.models.rnn`).
      seed: root of all randomness: parameters, dropout and the data order.
      out: the run directory (config, metrics, checkpoints, samples); re-using it resumes.
      optim: the optimizer and the loss.
      schedule: the learning rate and the run's length.
      data: what is trained on, and the batch shape.
      loop: intervals, checkpoints and placement.
      eval: validation, final evaluation and sample.
    """

    task: Task = "lm"
    model: ModelName = "transformer"
    seed: int = at_least(0, 0)
    out: str = dataclasses.field(default="runs/run", metadata={"metavar": "DIR"})
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    loop: LoopConfig = dataclasses.field(default_factory=LoopConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def __post_init__(self):
        for name, cls in GROUPS.items():
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"TrainConfig.{name} must be a {cls.__name__}, "
                                f"got {type(getattr(self, name)).__name__}")
        check(self)
        if self.data.batch_size % self.optim.grad_accum:
            raise ValueError(f"batch_size={self.data.batch_size} must be divisible by "
                             f"grad_accum={self.optim.grad_accum}")
        if self.eval.average_last > self.loop.max_to_keep:
            raise ValueError(f"average_last={self.eval.average_last} needs max_to_keep >= "
                             f"{self.eval.average_last} checkpoints, got {self.loop.max_to_keep}")

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with fields changed by name, top-level or in a group (``lr=1e-3``)."""
        top = {k: v for k, v in changes.items() if k in _TOP}
        groups: dict[str, dict[str, Any]] = {}
        for key, value in changes.items():
            if key in _TOP:
                continue
            if key not in _GROUP_OF:
                raise ValueError(f"unknown TrainConfig field: {key!r}")
            groups.setdefault(_GROUP_OF[key], {})[key] = value
        for group, fields in groups.items():
            top[group] = dataclasses.replace(getattr(self, group), **fields)
        return dataclasses.replace(self, **top)

    def step_identity(self) -> TrainConfig:
        """The settings the compiled train step depends on (the cache key of compiles): the
        task, the model family, and the ``optim`` and ``schedule`` groups."""
        return TrainConfig(task=self.task, model=self.model, optim=self.optim,
                           schedule=self.schedule)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict: top-level fields, and one dict per group."""
        d = dataclasses.asdict(self)
        d["data"]["data"] = list(self.data.data)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; also reads the flat layout of earlier versions.

        Raises:
          ValueError: a key that is no field (named), or a value out of range.
        """
        nested = {k: v for k, v in d.items() if k in _TOP or k in GROUPS and isinstance(v, dict)}
        flat = {k: v for k, v in d.items() if k not in nested}
        groups = {name: from_dict(GROUPS[name], nested.pop(name, {})) for name in GROUPS}
        config = from_dict(cls, {**nested, **groups})
        return config.replace(**flat) if flat else config


_TOP = {f.name for f in dataclasses.fields(TrainConfig)} - set(GROUPS)
_GROUP_OF = {f.name: group for group, cls in GROUPS.items() for f in dataclasses.fields(cls)}
