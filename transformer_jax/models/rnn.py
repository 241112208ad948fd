"""The recurrent baseline: LSTM and GRU language models with the Transformer LM's signature.

The paper's case for self-attention (Table 1, §4) is that a recurrent layer needs O(n)
sequential operations — step t cannot start before step t-1 has finished — while
self-attention needs O(1). These models keep that property on purpose: each layer is Flax's
recurrent cell under ``nn.RNN``, a ``lax.scan`` over time, exactly as Flax users write it. (The
cells multiply both the input and the state inside each step; cuDNN-style kernels hoist the
input projection out of the loop, which would speed the baseline up but not remove its T
sequential steps.)

``tokens[B, T] -> logits[B, T, V]`` like :class:`~transformer_jax.models.TransformerLM`, and
configured by the same :class:`~transformer_jax.config.ModelConfig`: ``d_model`` is the
embedding and hidden width, ``num_decoder_layers`` the number of stacked recurrent layers,
``dropout_rate`` the dropout between layers, ``share_embeddings`` ties the output projection to
the input embedding. Attention-only fields (heads, d_ff, positions, norm) are ignored.
"""

from __future__ import annotations

from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer_jax.config import ModelConfig
from transformer_jax.models.accounting import count_params
from transformer_jax.models.dropout import Dropout

__all__ = ["GRULM", "LSTMLM", "RNNLM", "match_rnn_width"]

CellType = Literal["lstm", "gru"]


class RNNLM(nn.Module):
    """A multi-layer recurrent language model.

    Attributes:
      cfg: the model configuration (see the module docstring for the fields used).
      cell_type: "lstm" (Flax ``OptimizedLSTMCell``) or "gru" (Flax ``GRUCell``).
    """

    cfg: ModelConfig
    cell_type: CellType = "lstm"

    def _cell(self, i: int):
        cfg = self.cfg
        kw = dict(features=cfg.d_model, dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype,
                  name=f"cell_{i}")
        if self.cell_type == "lstm":
            return nn.OptimizedLSTMCell(**kw)
        if self.cell_type == "gru":
            return nn.GRUCell(**kw)
        raise ValueError(f"cell_type must be 'lstm' or 'gru', got {self.cell_type!r}")

    @nn.compact
    def __call__(self, tokens, *, deterministic: bool = True, carry=None,
                 return_carry: bool = False):
        """Run the model over a sequence.

        Args:
          tokens: int [B, T].
          deterministic: disable dropout (training mode needs a "dropout" rng).
          carry: optional per-layer recurrent state to continue from (see :meth:`init_carry`).
          return_carry: also return the final per-layer state (for generation).

        Returns:
          float32 logits [B, T, V], and the carry when ``return_carry``.
        """
        cfg = self.cfg
        embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype,
                         param_dtype=cfg.storage_dtype,
                         embedding_init=nn.initializers.normal(stddev=cfg.d_model**-0.5),
                         name="embed")
        x = embed(tokens)  # [B, T, D]
        x = Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        carries = []
        for i in range(cfg.num_decoder_layers):
            rnn = nn.RNN(self._cell(i), name=f"rnn_{i}")
            c, x = rnn(x, initial_carry=None if carry is None else carry[i], return_carry=True)
            carries.append(c)
            x = Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        if cfg.share_embeddings:
            logits = embed.attend(x)
        else:
            logits = nn.Dense(cfg.vocab_size, dtype=cfg.compute_dtype,
                              param_dtype=cfg.storage_dtype, name="logits")(x)
        logits = logits.astype(jnp.float32)
        return (logits, tuple(carries)) if return_carry else logits

    @nn.nowrap
    def init_carry(self, batch: int):
        """Zero state for every layer: LSTM (c, h) pairs or GRU h, each [B, D]."""
        zeros = jnp.zeros((batch, self.cfg.d_model), self.cfg.compute_dtype)
        one = (zeros, zeros) if self.cell_type == "lstm" else zeros
        return tuple(one for _ in range(self.cfg.num_decoder_layers))

    @nn.nowrap
    def context_limit(self) -> None:
        """None: the recurrent state carries any length of context."""
        return None

    @nn.nowrap
    def start_decoding(self, params, prompt, length: int, *, repeat: int = 1):
        """Run ``prompt`` from the zero state and return the step that advances it.

        The decoding protocol of every model of the package (see :mod:`transformer_jax.decoding`).

        Args:
          params: the model's parameters.
          prompt: [B, T0] tokens, T0 >= 1.
          length: not needed: the recurrent state carries any length.
          repeat: copies of each prompt (rows b·repeat … b·repeat + repeat - 1).

        Returns:
          (logits [B·repeat, T0, V] of the prompt, carry, step) with ``step(tokens[B·repeat,
          t], carry, rows=None) -> (logits[B·repeat, t, V], carry)``; ``rows`` [B·repeat]
          first makes row r of the carry a copy of row ``rows[r]``.
        """
        del length
        prompt = jnp.repeat(prompt, repeat, axis=0) if repeat > 1 else prompt

        def step(tokens, carry, rows=None):
            if rows is not None:
                carry = jax.tree.map(lambda x: jnp.take(x, rows, axis=0), carry)
            return self.apply({"params": params}, tokens, carry=carry, return_carry=True)

        logits, carry = step(prompt, self.init_carry(prompt.shape[0]))
        return logits, carry, step


class LSTMLM(RNNLM):
    """LSTM language model (Hochreiter & Schmidhuber 1997), the paper's recurrent baseline."""

    cell_type: CellType = "lstm"


class GRULM(RNNLM):
    """GRU language model (Cho et al. 2014)."""

    cell_type: CellType = "gru"


def _num_params(cfg: ModelConfig, cell_type: CellType) -> int:
    return count_params(jax.eval_shape(
        lambda: RNNLM(cfg, cell_type).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
    ))


def match_rnn_width(target_params: int, *, cell_type: CellType = "lstm", num_layers: int = 2,
                    vocab_size: int = 256, share_embeddings: bool = True,
                    multiple_of: int = 4) -> ModelConfig:
    """The RNN config of `num_layers` whose parameter count is closest to `target_params`.

    Counts come from ``jax.eval_shape`` of the real model (no allocation), so they are exact.

    Args:
      target_params: the budget, e.g. a Transformer's parameter count.
      cell_type: "lstm" or "gru".
      num_layers: stacked recurrent layers.
      vocab_size: V.
      share_embeddings: tie the output projection to the embedding.
      multiple_of: round the width to a multiple of this (friendlier matmul shapes).

    Returns:
      A :class:`ModelConfig` for :class:`RNNLM` (``d_model`` = the chosen width).
    """
    if target_params <= 0:
        raise ValueError(f"target_params must be positive, got {target_params}")

    def config(width: int) -> ModelConfig:
        return ModelConfig(vocab_size=vocab_size, d_model=width, num_heads=1,
                           num_encoder_layers=0, num_decoder_layers=num_layers, d_ff=width,
                           dropout_rate=0.0, share_embeddings=share_embeddings)

    lo, hi = 1, multiple_of
    while _num_params(config(hi), cell_type) < target_params:  # params grow with width
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _num_params(config(mid), cell_type) < target_params else (lo, mid)
    candidates = {max(multiple_of, round(w / multiple_of) * multiple_of) for w in (lo, hi)}
    candidates |= {c + multiple_of for c in candidates} | {c - multiple_of for c in candidates}
    best = min((c for c in candidates if c > 0),
               key=lambda w: abs(_num_params(config(w), cell_type) - target_params))
    return config(best)
