"""The language models that ``--model`` names, each built from a :class:`ModelConfig`.

Every entry is a Flax module ``(tokens[B, T], *, deterministic) -> logits[B, T, V]`` that the
same data, train step and loop drive. A new model family is one more entry here.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn

from transformer_jax.config import ModelConfig
from transformer_jax.models.rnn import RNNLM
from transformer_jax.models.transformer import TransformerLM

__all__ = ["MODELS", "build_model"]

MODELS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "transformer": TransformerLM,
    "lstm": lambda cfg: RNNLM(cfg, cell_type="lstm"),  # the recurrent baselines
    "gru": lambda cfg: RNNLM(cfg, cell_type="gru"),
}
"""``--model`` name -> constructor of its language model for a config."""


def build_model(name: str, cfg: ModelConfig) -> nn.Module:
    """The language model ``name`` (a key of :data:`MODELS`) for ``cfg``."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    return MODELS[name](cfg)
