"""Autoregressive decoding over a model's step function: sampling for the language models
(:mod:`~transformer_jax.decoding.sampling`), greedy and beam search for the encoder–decoder
(:mod:`~transformer_jax.decoding.search`)."""

from transformer_jax.decoding.sampling import filter_logits, generate, sample_logits, sample_text
from transformer_jax.decoding.search import beam_search, greedy_decode, translate

__all__ = ["beam_search", "filter_logits", "generate", "greedy_decode", "sample_logits",
           "sample_text", "translate"]
