"""The models that ``--model`` names, each built from a :class:`ModelConfig`: a language model
(:func:`build_model`) or, for the sequence-to-sequence tasks, an encoder–decoder
(:func:`build_seq2seq`).

A language model is a Flax module ``(tokens[B, T], *, deterministic) -> logits[B, T, V]``, an
encoder–decoder ``(src[B, S], tgt[B, T], *, deterministic) -> logits[B, T, V]``; the same data,
train step, loop and decoding drive every entry. A new model family is one more entry here.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn

from transformer_jax.config import ModelConfig
from transformer_jax.models.rnn import RNNLM
from transformer_jax.models.rnn_seq2seq import RNNSeq2Seq
from transformer_jax.models.transformer import Transformer, TransformerLM

__all__ = ["MODELS", "SEQ2SEQ_MODELS", "build_model", "build_seq2seq"]

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


SEQ2SEQ_MODELS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "transformer": Transformer,
    # the attentional RNN translators the paper's Table 2 compares with
    "lstm": lambda cfg: RNNSeq2Seq(cfg, cell_type="lstm"),
    "gru": lambda cfg: RNNSeq2Seq(cfg, cell_type="gru"),
}
"""``--model`` name -> constructor of its encoder–decoder for a config."""


def build_seq2seq(name: str, cfg: ModelConfig) -> nn.Module:
    """The encoder–decoder ``name`` (a key of :data:`SEQ2SEQ_MODELS`) for ``cfg``."""
    if name not in SEQ2SEQ_MODELS:
        raise ValueError(f"model must be one of {sorted(SEQ2SEQ_MODELS)}, got {name!r}")
    return SEQ2SEQ_MODELS[name](cfg)
