"""What makes a run the same run: the rules for restoring and resuming, written once.

* :func:`model_identity` / :func:`checkpoint_expectation`: a checkpoint restores only into the
  model that wrote it (the training loop and :func:`~transformer_jax.runs.load.load_run` both ask
  here).
* :func:`resume_differences`: which training settings of an existing run may change when it is
  resumed (:data:`FREE_ON_RESUME`: how long and how often, where it runs, how it is evaluated),
  and which would make it another run (the data, the batch, the optimizer, the seed ...).
"""

from __future__ import annotations

from typing import Any

from transformer_jax.config import COMPUTE_ONLY, ModelConfig, TrainConfig

__all__ = ["FREE_ON_RESUME", "checkpoint_expectation", "model_identity", "resume_differences"]

FREE_ON_RESUME = ("out", "schedule.steps", "optim.steps_per_call", "optim.max_nonfinite",
                  "loop.*", "eval.*")
"""TrainConfig settings (``group.field``; ``group.*`` for all of a group) that a resumed run may
change: they decide how long the run goes on, how often it logs, validates and saves, where it
runs and how it is evaluated, not what it learns from. The steps already taken are kept either
way; a new ``steps`` makes the cosine schedule decay over the new length from the resumed step.
The model's :data:`~transformer_jax.config.COMPUTE_ONLY` fields are free as well."""


def model_identity(d: dict[str, Any]) -> dict[str, Any]:
    """The fields of a (saved) ModelConfig dict that decide the model, for comparing two runs.

    Fields an older version did not write get their defaults (so its runs still resume);
    :data:`~transformer_jax.config.COMPUTE_ONLY` fields are dropped. A dict that is not a valid
    config is returned as it is (and then differs from every valid one).
    """
    try:
        full = ModelConfig.from_dict(d).to_dict()
    except (TypeError, ValueError):
        return dict(d)
    return {k: v for k, v in full.items() if k not in COMPUTE_ONLY}


def checkpoint_expectation(model_cfg: ModelConfig) -> dict[str, Any]:
    """Keywords ``expect`` and ``normalize`` of
    :meth:`~transformer_jax.runs.checkpoint.Checkpointer.restore`: a checkpoint of another model
    is refused by name, one saved before a field existed still restores."""
    return {"expect": {"model": model_identity(model_cfg.to_dict())},
            "normalize": {"model": model_identity}}


def _flat(tc: TrainConfig) -> dict[str, Any]:
    """``{"group.field": value}`` of every setting (top-level fields without a group)."""
    flat: dict[str, Any] = {}
    for key, value in tc.to_dict().items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def _free(key: str) -> bool:
    return key in FREE_ON_RESUME or f"{key.split('.')[0]}.*" in FREE_ON_RESUME


def resume_differences(old: TrainConfig, new: TrainConfig) -> tuple[list[str], list[str]]:
    """(settings that would make ``new`` another run than ``old``, settings free to differ).

    Each entry reads ``"name: old -> new"`` with the field's own name (``lr: 0.001 -> 0.002``).
    """
    a, b = _flat(old), _flat(new)
    fixed, free = [], []
    for key in sorted(a.keys() | b.keys()):
        if a.get(key) != b.get(key):
            line = f"{key.split('.')[-1]}: {a.get(key)!r} -> {b.get(key)!r}"
            (free if _free(key) else fixed).append(line)
    return fixed, free
