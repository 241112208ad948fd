"""Configuration: the model and training dataclasses, model presets and named recipes.

Variants are made with :func:`dataclasses.replace` (or :meth:`TrainConfig.replace`), e.g.
``dataclasses.replace(PRESETS["paper-base"], vocab_size=37000, dtype="bfloat16")``. Every field
is a plain Python value (dtypes are strings), so a config round-trips through JSON. This package
is the bottom of the library: every other module may import it, and it imports nothing of the
package.
"""

from transformer_jax.config.model import COMPUTE_ONLY, ModelConfig
from transformer_jax.config.recipes import MODERN_OPTIONS, PRESETS, RECIPES, Recipe
from transformer_jax.config.train import (
    DataConfig,
    EvalConfig,
    LoopConfig,
    OptimConfig,
    ScheduleConfig,
    Task,
    TrainConfig,
)

__all__ = ["COMPUTE_ONLY", "MODERN_OPTIONS", "PRESETS", "RECIPES", "DataConfig", "EvalConfig",
           "LoopConfig", "ModelConfig", "OptimConfig", "Recipe", "ScheduleConfig", "Task",
           "TrainConfig"]
