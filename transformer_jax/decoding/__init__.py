"""Autoregressive decoding over a model's step function: sampling for the language models
(:mod:`~transformer_jax.decoding.sampling`), greedy and beam search for the encoder–decoder
(:mod:`~transformer_jax.decoding.search`).

Every model of the package decodes through one protocol, ``model.start_decoding(params,
inputs, length, *, repeat=1) -> (logits, state, step)``:

* ``inputs`` [B, T0] is what the output is conditioned on: a language model's prompt, fed in
  one pass (prefill); the encoder–decoder's source, encoded once, after which ``bos_id`` is fed.
  ``logits`` [B·repeat, t, V] are those of the positions fed (the last one predicts the next
  token).
* ``length`` is the number of decoder positions the state must hold, the fed ones included.
* ``repeat`` makes that many copies of each row (b·repeat … b·repeat + repeat - 1): beam search's
  hypotheses.
* ``step(tokens[B·repeat, t], state, rows=None) -> (logits[B·repeat, t, V], state)`` feeds the
  next tokens; ``rows`` [B·repeat] first makes row r of the state a copy of row ``rows[r]`` (beam
  search's reordering of hypotheses).

The state is the model's business (a KV cache, a recurrent carry, the source); the loops here
know nothing else of the model, in the way the Flax wmt example's decoder receives a
``tokens_to_logits`` function. A language model also has ``context_limit()``: the most
positions one pass may feed, or None.
"""

from transformer_jax.decoding.sampling import filter_logits, generate, sample_logits, sample_text
from transformer_jax.decoding.search import beam_search, greedy_decode, translate

__all__ = ["beam_search", "filter_logits", "generate", "greedy_decode", "sample_logits",
           "sample_text", "translate"]
