"""The recurrent baseline of translation: an attentional RNN encoder–decoder of the paper's time.

The paper's Table 2 compares the Transformer with recurrent translators; this is one, built from
the parts those systems share:

* encoder: stacked LSTM or GRU layers; the first is bidirectional (Bahdanau et al. 2014; GNMT,
  Wu et al. 2016, §3), each direction D/2 wide and their outputs concatenated, so every
  encoder state is D wide (OpenNMT-py's ``brnn`` splits the width the same way). The backward
  direction starts at each source's last real token (the source is padded on the right).
* decoder: stacked layers of the same cell, with Luong et al.'s (2015) global attention over the
  encoder states and input feeding (§3.1, §3.3):

  - score(h_t, h̄_s) = h_tᵀ W_a h̄_s ("general", eq. 8), softmax over the source; ``pad_id``
    positions get weight exactly 0;
  - c_t = Σ_s a_t(s) h̄_s;  h̃_t = tanh(W_c [c_t; h_t]) (eq. 5);  logits = h̃_t W_out (eq. 6);
  - the input of step t is [embedding of y_(t-1); h̃_(t-1)] (input feeding, §3.3), so the
    attention sits inside the recurrence and the decoder is one ``lax.scan`` over time.

  The decoder starts from a zero state and a zero h̃: the source reaches it through attention
  only, which leaves the encoder's and the decoder's depths independent.
* residual connections around every layer whose input is the output of a recurrent layer of
  the same width (GNMT §3.1 adds them between the upper layers of its deep stacks);
* dropout on the embeddings, between layers and on h̃ (Zaremba et al. 2014: between layers, not
  on the recurrent connections);
* with ``cfg.share_embeddings``, one matrix embeds the source and the target and projects the
  output, as §3.4 of the Transformer paper ties them; otherwise three.

``__call__(src[B, S], tgt[B, T]) -> logits[B, T, V]`` (float32), the interface of
:class:`~transformer_jax.models.Transformer`, so the same loss, train step, loop and
checkpoints drive it; :meth:`RNNSeq2Seq.start_decoding` is the package's decoding protocol
(:mod:`transformer_jax.decoding`). From the :class:`~transformer_jax.config.ModelConfig` it
reads ``vocab_size``, ``d_model`` (D: embeddings, states, attention), ``num_encoder_layers``,
``num_decoder_layers``, ``dropout_rate``, ``share_embeddings``, ``use_bias`` (the output
projection's bias), the token ids and dtypes; attention-only fields are ignored. Applied with
``mutable=["intermediates"]`` it sows ``attention_weights [B, 1, T, S]`` (float32), the
Transformer's layout with one head.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.config import ModelConfig
from transformer_jax.models.accounting import rnn_seq2seq_num_params
from transformer_jax.models.dropout import Dropout
from transformer_jax.models.transformer import check_tokens

__all__ = ["RNNSeq2Seq", "luong_attention", "match_rnn_seq2seq_width"]

CellType = Literal["lstm", "gru"]


def _cell(cfg: ModelConfig, cell_type: str, features: int, name: str | None = None
          ) -> nn.RNNCellBase:
    kw = {"features": features, "dtype": cfg.compute_dtype, "param_dtype": cfg.storage_dtype,
          "recurrent_kernel_init": _orthogonal, "name": name}
    if cell_type == "lstm":
        return nn.OptimizedLSTMCell(**kw)
    if cell_type == "gru":
        return nn.GRUCell(**kw)
    raise ValueError(f"cell_type must be 'lstm' or 'gru', got {cell_type!r}")


def _orthogonal(key, shape, dtype=jnp.float32):
    """Flax's recurrent-kernel initialiser, drawn in float32: its QR decomposition has no
    bfloat16 kernel on a CPU (LAPACK), so ``param_dtype="bfloat16"`` could not initialise."""
    return nn.initializers.orthogonal()(key, shape, jnp.float32).astype(dtype)


def _zero_carry(cell_type: str, batch: int, width: int, dtype) -> Any:
    zeros = jnp.zeros((batch, width), dtype)
    return (zeros, zeros) if cell_type == "lstm" else zeros


def luong_attention(query, keys, values, mask):
    """Global attention with a precomputed "general" score (Luong et al. 2015, eq. 7–8).

    Args:
      query: h_t [B, D].
      keys: W_a h̄_s [B, S, D] (the encoder states, projected once per source).
      values: h̄_s [B, S, D].
      mask: bool [B, S], True for real source tokens.

    Returns:
      (context c_t [B, D] in the values' dtype, weights a_t [B, S] float32). Masked positions
      weigh exactly 0; a row with no real token gets zero weights and a zero context, not NaN.
    """
    scores = jnp.einsum("bd,bsd->bs", query, keys, preferred_element_type=jnp.float32)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jnp.where(mask, jax.nn.softmax(scores, axis=-1), 0.0)
    context = jnp.einsum("bs,bsd->bd", weights.astype(values.dtype), values)
    return context, weights


class _DecoderStep(nn.Module):
    """One decoder time step: stacked cells, attention, h̃ (run under ``nn.scan``)."""

    cfg: ModelConfig
    cell_type: str
    residual: bool
    deterministic: bool

    @nn.compact
    def __call__(self, state, x, keys, values, mask):
        """state ({"carry", "feed" [B, D]}), x [B, D] embedded input -> (state, (h̃, a_t))."""
        cfg = self.cfg
        drop = Dropout(cfg.dropout_rate)
        inp = jnp.concatenate([x, state["feed"]], axis=-1)  # input feeding, §3.3: [B, 2D]
        carries = []
        for i, carry in enumerate(state["carry"]):
            carry, h = _cell(cfg, self.cell_type, cfg.d_model, f"cell_{i}")(carry, inp)
            carries.append(carry)
            if i + 1 < len(state["carry"]):  # the top layer's output goes to attention
                h = drop(h, deterministic=self.deterministic)
            inp = h + inp if self.residual and i > 0 else h
        context, weights = luong_attention(inp, keys, values, mask)
        combine = nn.Dense(cfg.d_model, use_bias=False, dtype=cfg.compute_dtype,
                           param_dtype=cfg.storage_dtype, name="combine")  # W_c, eq. 5
        out = jnp.tanh(combine(jnp.concatenate([context, inp], axis=-1)))
        out = drop(out, deterministic=self.deterministic)  # fed back and projected (OpenNMT)
        return {"carry": tuple(carries), "feed": out}, (out, weights)


class _Decoder(nn.Module):
    """The decoder's steps as one ``nn.scan`` over time (parameters shared by every step)."""

    cfg: ModelConfig
    cell_type: str
    residual: bool

    @nn.compact
    def __call__(self, state, x, memory, deterministic: bool):
        """x [B, T, D] embedded inputs -> (state, h̃ [B, T, D], weights [B, T, S])."""
        scan = nn.scan(_DecoderStep, variable_broadcast="params",
                       split_rngs={"params": False, "dropout": True},
                       in_axes=(1, nn.broadcast, nn.broadcast, nn.broadcast), out_axes=1)
        step = scan(self.cfg, self.cell_type, self.residual, deterministic, name="step")
        state, (out, weights) = step(state, x, memory["keys"], memory["values"],
                                     memory["mask"])
        return state, out, weights


class RNNSeq2Seq(nn.Module):
    """Attentional RNN encoder–decoder (see the module docstring).

    Attributes:
      cfg: the model configuration.
      cell_type: "lstm" (Flax ``OptimizedLSTMCell``) or "gru" (Flax ``GRUCell``).
      residual: residual connections around the upper layers (GNMT §3.1).
    """

    cfg: ModelConfig
    cell_type: CellType = "lstm"
    residual: bool = True

    def __post_init__(self):
        if self.cell_type not in ("lstm", "gru"):
            raise ValueError(f"cell_type must be 'lstm' or 'gru', got {self.cell_type!r}")
        if self.cfg.d_model % 2:
            raise ValueError(f"the bidirectional first encoder layer splits d_model into two "
                             f"directions: d_model must be even, got {self.cfg.d_model}")
        if self.cfg.num_encoder_layers < 1:
            raise ValueError("the RNN encoder-decoder needs num_encoder_layers >= 1")
        super().__post_init__()

    def setup(self):
        cfg = self.cfg
        embed = lambda: nn.Embed(
            cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype,
            embedding_init=nn.initializers.normal(cfg.d_model ** -0.5))
        self.embed = embed()
        if not cfg.share_embeddings:
            self.src_embed = embed()
            self.unembed = nn.Dense(cfg.vocab_size, use_bias=cfg.use_bias,
                                    dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype)
        half = cfg.d_model // 2
        self.encoder_fwd = nn.RNN(_cell(cfg, self.cell_type, half))
        self.encoder_bwd = nn.RNN(_cell(cfg, self.cell_type, half), reverse=True,
                                  keep_order=True)
        self.upper_encoder = [nn.RNN(_cell(cfg, self.cell_type, cfg.d_model))
                              for _ in range(1, cfg.num_encoder_layers)]
        # W_a of the "general" score (eq. 8), applied once to the encoder states.
        self.score = nn.Dense(cfg.d_model, use_bias=False, dtype=cfg.compute_dtype,
                              param_dtype=cfg.storage_dtype)
        self.decoder = _Decoder(cfg, self.cell_type, self.residual)
        self.dropout = Dropout(cfg.dropout_rate)

    def encode(self, src, *, deterministic: bool = True) -> dict[str, jax.Array]:
        """src [B, S] -> memory: ``values`` h̄ [B, S, D], ``keys`` W_a h̄ [B, S, D], ``mask``
        bool [B, S] (True for real tokens). The source is padded on the right."""
        cfg = self.cfg
        check_tokens("src", src, cfg)
        mask = src != cfg.pad_id
        lengths = jnp.sum(mask, axis=1, dtype=jnp.int32)
        embed = self.embed if cfg.share_embeddings else self.src_embed
        x = self.dropout(embed(src), deterministic=deterministic)
        x = jnp.concatenate([self.encoder_fwd(x, seq_lengths=lengths),
                             self.encoder_bwd(x, seq_lengths=lengths)], axis=-1)
        for rnn in self.upper_encoder:
            h = rnn(self.dropout(x, deterministic=deterministic), seq_lengths=lengths)
            x = h + x if self.residual else h
        x = self.dropout(x, deterministic=deterministic)
        return {"values": x, "keys": self.score(x), "mask": mask}

    @nn.nowrap
    def initial_state(self, batch: int) -> dict[str, Any]:
        """The decoder's start: zero carries of every layer and a zero h̃, [B, D] each."""
        cfg = self.cfg
        carry = tuple(_zero_carry(self.cell_type, batch, cfg.d_model, cfg.compute_dtype)
                      for _ in range(cfg.num_decoder_layers))
        return {"carry": carry, "feed": jnp.zeros((batch, cfg.d_model), cfg.compute_dtype)}

    def decode(self, memory, tgt, state=None, *, deterministic: bool = True):
        """Decoder and output projection.

        Args:
          memory: :meth:`encode`'s output for the B sources.
          tgt: [B, T] decoder input tokens.
          state: the decoder state to continue from (default :meth:`initial_state`).
          deterministic: disable dropout.

        Returns:
          (logits [B, T, V] float32, the state after the last token).
        """
        cfg = self.cfg
        check_tokens("tgt", tgt, cfg, batch=memory["mask"].shape[0])
        if state is None:
            state = self.initial_state(tgt.shape[0])
        x = self.dropout(self.embed(tgt), deterministic=deterministic)
        state, out, weights = self.decoder(state, x, memory, deterministic)
        self.sow("intermediates", "attention_weights", weights[:, None])  # [B, 1, T, S]
        logits = self.embed.attend(out) if cfg.share_embeddings else self.unembed(out)
        return logits.astype(jnp.float32), state

    def __call__(self, src, tgt, *, deterministic: bool = True):
        """src [B, S], tgt [B, T] int -> logits [B, T, V] float32 (teacher forcing)."""
        check_tokens("tgt", tgt, self.cfg, batch=np.shape(src)[0])  # before encoding src
        memory = self.encode(src, deterministic=deterministic)
        return self.decode(memory, tgt, deterministic=deterministic)[0]

    @nn.nowrap
    def start_decoding(self, params, src, length: int, *, repeat: int = 1):
        """Encode ``src`` once, feed ``bos_id``, and return the step for the next tokens.

        The decoding protocol of every model of the package (see :mod:`transformer_jax.decoding`).

        Args:
          params: the model's parameters.
          src: [B, S] source tokens.
          length: not needed: the recurrent state carries any length.
          repeat: copies of each source (W for beam search: rows b·W … b·W + W - 1).

        Returns:
          (logits [B·repeat, 1, V] after BOS, state, step) with ``step(tokens[B·repeat, t],
          state, rows=None) -> (logits[B·repeat, t, V], state)``; ``rows`` [B·repeat] first
          makes row r of the state (carries, h̃ and the source's memory) a copy of row
          ``rows[r]``.
        """
        del length
        memory = self.apply({"params": params}, src, method=RNNSeq2Seq.encode)
        if repeat > 1:
            memory = jax.tree.map(lambda x: jnp.repeat(x, repeat, axis=0), memory)

        def step(tokens, state, rows=None):
            if rows is not None:
                state = jax.tree.map(lambda x: jnp.take(x, rows, axis=0), state)
            logits, dec = self.apply({"params": params}, state["memory"], tokens, state["dec"],
                                     method=RNNSeq2Seq.decode)
            return logits, {"dec": dec, "memory": state["memory"]}

        n = memory["mask"].shape[0]
        state = {"dec": self.initial_state(n), "memory": memory}
        logits, state = step(jnp.full((n, 1), self.cfg.bos_id, jnp.int32), state)
        return logits, state, step


def match_rnn_seq2seq_width(target_params: int, base: ModelConfig, *,
                            cell_type: CellType = "lstm", multiple_of: int = 8) -> ModelConfig:
    """``base`` with the width D whose :class:`RNNSeq2Seq` parameter count is closest to
    ``target_params`` (e.g. a Transformer's), from the formula
    (:func:`~transformer_jax.models.accounting.rnn_seq2seq_num_params`).

    Args:
      target_params: the budget.
      base: the layer counts, vocabulary, tying and dropout to keep.
      cell_type: "lstm" or "gru".
      multiple_of: round D to a multiple of this (even, for the bidirectional layer).

    Returns:
      ``base`` with ``d_model`` (and ``d_ff``, unused) set to the chosen width.
    """
    if target_params <= 0:
        raise ValueError(f"target_params must be positive, got {target_params}")
    if multiple_of < 2 or multiple_of % 2:
        raise ValueError(f"multiple_of must be even and >= 2, got {multiple_of}")

    def count(width: int) -> int:
        return rnn_seq2seq_num_params(_with_width(base, width), cell_type)

    widths = range(multiple_of, 1 << 20, multiple_of)
    lo, hi = 0, len(widths) - 1
    while lo < hi:  # the first width whose count reaches the budget (counts grow with D)
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if count(widths[mid]) < target_params else (lo, mid)
    best = min(widths[max(lo - 1, 0):lo + 1], key=lambda w: abs(count(w) - target_params))
    return _with_width(base, best)


def _with_width(cfg: ModelConfig, width: int) -> ModelConfig:
    return dataclasses.replace(cfg, d_model=width, d_ff=width, num_heads=1, num_kv_heads=1)
