"""Parameter and FLOP accounting for every model of the package.

* :func:`count_params`: scalars in a parameter pytree (also of ``jax.eval_shape`` output).
* :func:`num_params`: the Transformer's parameter count from its config alone (the formula).
* :func:`flops_per_token`: training FLOPs per token ≈ 6·N + 12·L·T·D (Kaplan et al. 2020; the
  PaLM paper's MFU definition): 6·N for the forward and backward matmuls of the N weights, and
  12·L·T·D for Q·Kᵀ and A·V (not halved for the causal mask).
* :func:`lm_flops_per_token`, :func:`seq2seq_flops_per_token`, :func:`rnn_flops_per_token`:
  that count for the language models, the encoder–decoder and the recurrent baselines.
* :func:`rnn_seq2seq_num_params`, :func:`rnn_seq2seq_flops_per_token`: the attentional RNN
  encoder–decoder (:class:`~transformer_jax.models.rnn_seq2seq.RNNSeq2Seq`).
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import numpy as np

from transformer_jax.config import ModelConfig

__all__ = ["count_params", "flops_per_token", "lm_flops_per_token", "num_params",
           "rnn_flops_per_token", "rnn_seq2seq_flops_per_token", "rnn_seq2seq_num_params",
           "seq2seq_flops_per_token"]

ModelKind = Literal["encoder_decoder", "lm"]


def count_params(params: Any) -> int:
    """Number of scalars in a parameter pytree (works on ``jax.eval_shape`` output too)."""
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def num_params(cfg: ModelConfig, kind: ModelKind = "encoder_decoder") -> int:
    """Exact parameter count of our Flax Transformer of ``cfg``, from the formula (no allocation).

    Args:
      cfg: the model configuration.
      kind: "encoder_decoder" (:class:`~transformer_jax.models.Transformer`) or "lm"
        (:class:`~transformer_jax.models.TransformerLM`).
    """
    D, F, V, H = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.head_dim
    N, K, b = cfg.num_heads, cfg.num_kv_heads, int(cfg.use_bias)
    # q, k, v and out projections (with biases), and QK-norm's two scales of H.
    attn = (N + 2 * K) * H * (D + b) + N * H * D + b * D + (2 * H if cfg.qk_norm else 0)
    matrices = 3 if cfg.activation == "swiglu" else 2  # SwiGLU adds the gate W_g
    ffn = (matrices - 1) * (D * F + b * F) + F * D + b * D
    ln = D * (1 + (b if cfg.norm_type == "layernorm" else 0))  # scale (+ bias)
    enc_layer = attn + ffn + 2 * ln
    dec_layer = 2 * attn + ffn + 3 * ln
    final_ln = ln if cfg.norm == "pre" else 0  # pre-LN ends each stack with a norm
    pos = cfg.max_len * D if cfg.positions == "learned" else 0
    if kind == "lm":
        embed = V * D + (0 if cfg.share_embeddings else D * V + b * V)
        # An LM block is an encoder block: causal self-attention and a feed-forward network.
        return embed + pos + cfg.num_decoder_layers * enc_layer + final_ln
    if kind != "encoder_decoder":
        raise ValueError(f"kind must be 'encoder_decoder' or 'lm', got {kind!r}")
    # Unshared: separate source and target embeddings plus an output projection with bias.
    embed = V * D if cfg.share_embeddings else 2 * V * D + D * V + b * V
    return (embed + pos + cfg.num_encoder_layers * enc_layer
            + cfg.num_decoder_layers * dec_layer + 2 * final_ln)


def flops_per_token(*, n_params: int, n_layers: int, seq_len: int, d_model: int) -> float:
    """Model FLOPs to train on one token: 6·N + 12·L·T·D.

    Args:
      n_params: N, the parameters that take part in matmuls. Count a tied input/output
        embedding once (it is the output projection); leave out position tables (a lookup).
      n_layers: L, attention layers.
      seq_len: T, the training context.
      d_model: D.
    """
    return 6.0 * n_params + 12.0 * n_layers * seq_len * d_model


def lm_flops_per_token(params: Any, cfg: ModelConfig, seq_len: int,
                       model: str = "transformer") -> float:
    """Training FLOPs per token of the language model ``model`` with parameters ``params``.

    The Transformer: 6·N + 12·L·T·D, where N leaves out the position table (a lookup, no
    matmul) and the tied embedding counts once, as the output projection. The recurrent
    baselines ("lstm", "gru") count their gate matmuls (:func:`rnn_flops_per_token`).
    """
    if model in ("lstm", "gru"):
        return rnn_flops_per_token(cfg, model)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    n = sum(int(np.prod(x.shape)) for path, x in flat
            if "pos_embed" not in jax.tree_util.keystr(path))
    return flops_per_token(n_params=n, n_layers=cfg.num_decoder_layers, seq_len=seq_len,
                           d_model=cfg.d_model)


def seq2seq_flops_per_token(n_params: int, cfg: ModelConfig, tgt_len: int,
                            model: str = "transformer") -> float:
    """Training FLOPs per target token of the encoder–decoder ``model`` (an estimate).

    Counts the encoder as if the source were as long as the target. The Transformer: 6·N for
    the weights and 12·L·T·D for the attention products of every attention layer (the decoder
    has two each). The recurrent ones ("lstm", "gru"): :func:`rnn_seq2seq_flops_per_token`.
    """
    if model in ("lstm", "gru"):
        return rnn_seq2seq_flops_per_token(cfg, model, src_len=tgt_len)
    layers = cfg.num_encoder_layers + 2 * cfg.num_decoder_layers
    return flops_per_token(n_params=n_params, n_layers=layers, seq_len=tgt_len,
                           d_model=cfg.d_model)


def rnn_flops_per_token(cfg: ModelConfig, cell_type: str = "lstm", *,
                        training: bool = True) -> float:
    """Matmul FLOPs per token: gates·2·d_h·(d_in + d_h) per layer plus the output projection.

    An LSTM has 4 gates (≈ 8·d_h·(d_in + d_h) forward FLOPs), a GRU 3. Training costs
    three times the forward pass (forward, and two matmuls per matmul backward).
    """
    gates = 4 if cell_type == "lstm" else 3
    D = cfg.d_model
    forward = cfg.num_decoder_layers * gates * 2 * D * (D + D) + 2 * D * cfg.vocab_size
    return float(3 * forward if training else forward)


def _rnn_cell_params(cell_type: str, d_in: int, d_h: int) -> int:
    """Flax's cells: an LSTM has 4 gates of W_i [d_in, d_h], W_h [d_h, d_h] and a bias; a GRU
    3 gates of W_i and W_h, biases on its 3 input matrices and on W_hn."""
    if cell_type == "lstm":
        return 4 * (d_in * d_h + d_h * d_h + d_h)
    if cell_type == "gru":
        return 3 * (d_in * d_h + d_h * d_h) + 4 * d_h
    raise ValueError(f"cell_type must be 'lstm' or 'gru', got {cell_type!r}")


def rnn_seq2seq_num_params(cfg: ModelConfig, cell_type: str = "lstm") -> int:
    """Exact parameter count of the attentional RNN encoder–decoder of ``cfg``, from the formula.

    The bidirectional first encoder layer has two cells of D/2, every other layer one of D; the
    first decoder layer reads [embedding; h̃] (2D, input feeding); W_a [D, D] and W_c [2D, D]
    have no bias; the embeddings are one V×D matrix when shared, else source, target and an
    output projection (with a bias when ``use_bias``).
    """
    D, V = cfg.d_model, cfg.vocab_size
    cell = lambda d_in, d_h: _rnn_cell_params(cell_type, d_in, d_h)
    encoder = 2 * cell(D, D // 2) + (cfg.num_encoder_layers - 1) * cell(D, D)
    decoder = cell(2 * D, D) + (cfg.num_decoder_layers - 1) * cell(D, D)
    attention = D * D + 2 * D * D
    embed = V * D if cfg.share_embeddings else 2 * V * D + D * V + int(cfg.use_bias) * V
    return encoder + decoder + attention + embed


def rnn_seq2seq_flops_per_token(cfg: ModelConfig, cell_type: str = "lstm", *, src_len: int,
                                training: bool = True) -> float:
    """Matmul FLOPs per target token of the attentional RNN encoder–decoder (an estimate).

    2·d_in·d_out per weight matrix and token, counting the encoder once per target token (a
    source as long as the target), plus 4·S·D for the attention scores and the context over
    ``src_len`` = S source states. Training costs three times the forward pass.
    """
    gates = 4 if cell_type == "lstm" else 3
    D, half = cfg.d_model, cfg.d_model // 2
    matmul = lambda d_in, d_out: 2 * d_in * d_out
    encoder = (2 * gates * (matmul(D, half) + matmul(half, half))
               + (cfg.num_encoder_layers - 1) * gates * (matmul(D, D) + matmul(D, D)))
    decoder = (gates * (matmul(2 * D, D) + matmul(D, D))
               + (cfg.num_decoder_layers - 1) * gates * (matmul(D, D) + matmul(D, D)))
    attention = matmul(D, D) + 4 * src_len * D + matmul(2 * D, D)  # W_a, a·h̄ and h·k, W_c
    forward = encoder + decoder + attention + matmul(D, cfg.vocab_size)
    return float(3 * forward if training else forward)
