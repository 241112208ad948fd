"""Flax Linen models: the paper's encoder–decoder, the decoder-only LM, and the RNN baselines
(language models and an attentional encoder–decoder).

Models import the attention kernel and :mod:`transformer_jax.config`, nothing else of the
package: they know nothing of data, training, runs or devices.
"""

from transformer_jax.models.accounting import count_params
from transformer_jax.models.registry import MODELS, SEQ2SEQ_MODELS, build_model, build_seq2seq
from transformer_jax.models.rnn import GRULM, LSTMLM, RNNLM, match_rnn_width
from transformer_jax.models.rnn_seq2seq import RNNSeq2Seq, match_rnn_seq2seq_width
from transformer_jax.models.transformer import Transformer, TransformerLM, sinusoidal_positions

__all__ = [
    "GRULM",
    "LSTMLM",
    "MODELS",
    "RNNLM",
    "SEQ2SEQ_MODELS",
    "RNNSeq2Seq",
    "Transformer",
    "TransformerLM",
    "build_model",
    "build_seq2seq",
    "count_params",
    "match_rnn_seq2seq_width",
    "match_rnn_width",
    "sinusoidal_positions",
]
