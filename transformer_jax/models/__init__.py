"""Flax Linen models: the paper's encoder–decoder, the decoder-only LM, and the RNN baselines.

Models import the attention kernel and :mod:`transformer_jax.config`, nothing else of the
package: they know nothing of data, training, runs or devices.
"""

from transformer_jax.models.accounting import count_params
from transformer_jax.models.registry import MODELS, build_model
from transformer_jax.models.rnn import GRULM, LSTMLM, RNNLM, match_rnn_width
from transformer_jax.models.transformer import Transformer, TransformerLM, sinusoidal_positions

__all__ = [
    "GRULM",
    "LSTMLM",
    "MODELS",
    "RNNLM",
    "Transformer",
    "TransformerLM",
    "build_model",
    "count_params",
    "match_rnn_width",
    "sinusoidal_positions",
]
