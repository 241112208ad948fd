"""Flax Linen models: the paper's encoder–decoder (:class:`Transformer`) and a decoder-only LM.

Functional use: ``params = model.init(rng, ...)["params"]``; ``model.apply({"params": params},
...)`` is pure. Training mode (``deterministic=False``) with ``dropout_rate > 0`` needs
``rngs={"dropout": key}``; Flax raises without one. The layers are in
:mod:`transformer_jax.models.layers`.

Parameter names (stable, for sharding tables). The head axis N/K is always the second-to-last
axis of an attention input kernel and the first axis of ``out``:

* ``embed/embedding [V, D]``: token embedding (shared source/target/output when
  ``share_embeddings``, §3.4); otherwise also ``src_embed/embedding`` and ``unembed/kernel [D, V]``.
* ``positions/pos_embed [max_len, D]``: only with ``positions="learned"``.
* blocks ``layer_i`` (LM), ``encoder_i``, ``decoder_i``; with ``scan_layers`` one stack each,
  ``layers/block``, ``encoders/block``, ``decoders/block``, whose parameters have a leading
  layer axis [L, ...].
* attention: ``qkv/kernel [D, 3, N, H]`` (self-attention, K == N: one fused projection) or
  ``query/kernel [D, N, H]`` + ``kv/kernel [D, 2, K, H]`` (cross-attention, GQA); ``out/kernel
  [N, H, D]``; each with a bias unless ``use_bias`` is off; ``q_norm``/``k_norm`` with QK-norm.
* feed-forward: ``mlp/wi/kernel [D, F]``, ``mlp/wo/kernel [F, D]`` (and ``mlp/wg`` for SwiGLU).
* norms: ``ln_self``, ``ln_cross``, ``ln_mlp`` in blocks; ``encoder_norm``, ``decoder_norm``
  (pre-LN only).

Attention probabilities for plots: apply with ``mutable=["intermediates"]``; every attention
layer then sows ``attention_weights [B, N, T, S]`` (float32). They are computed only then.

Incremental decoding (``decode=True``) keeps keys/values in the ``"cache"`` collection; see
:mod:`transformer_jax.decoding`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.config import ModelConfig
from transformer_jax.models.dropout import Dropout
from transformer_jax.models.layers import (
    PositionalEncoding,
    dense,
    layer_stack,
    norm_layer,
    run_stack,
    sinusoidal_positions,
)

__all__ = ["Transformer", "TransformerLM", "check_tokens", "sinusoidal_positions"]

_SCANNED_STACKS = ("layers", "encoders", "decoders")  # names of layer_stack's nn.scan


def check_tokens(name: str, tokens, cfg: ModelConfig, batch: int | None = None) -> None:
    """Raise ``ValueError``/``TypeError`` unless ``tokens`` is ``[B, T]`` ids in [0, V).

    Shapes and dtypes are checked at trace time. Values are checked only when concrete (not
    under ``jit``): an id >= V would otherwise read past the embedding table and silently give
    NaN logits (``jnp.take`` fills out-of-bounds rows with NaN).
    """
    shape = tuple(np.shape(tokens))
    if len(shape) != 2:
        raise ValueError(f"{name} must be [B, T] token ids, got shape {shape}")
    if not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
        raise TypeError(f"{name} must be integer token ids, got dtype {jnp.result_type(tokens)}")
    if batch is not None and shape[0] != batch:
        raise ValueError(f"{name} has batch size {shape[0]}, the source has {batch}")
    if isinstance(tokens, jax.core.Tracer) or not shape[0] * shape[1]:
        return
    values = np.asarray(tokens)
    if values.min() < 0 or values.max() >= cfg.vocab_size:
        raise ValueError(f"{name} must lie in [0, vocab_size={cfg.vocab_size}), got ids in "
                         f"[{values.min()}, {values.max()}]")


def _embed_init(cfg: ModelConfig):
    # N(0, 1/D) so that the √D-scaled embedding (§3.4) has unit variance and tied logits start
    # small.
    return nn.initializers.normal(cfg.d_model ** -0.5)


def _embed_module(cfg: ModelConfig, name: str) -> nn.Embed:
    return nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype,
                    param_dtype=cfg.storage_dtype, embedding_init=_embed_init(cfg), name=name)


class Transformer(nn.Module):
    """The encoder–decoder of "Attention Is All You Need" (§3, Figure 1).

    ``__call__(src[B, S], tgt[B, T]) -> logits[B, T, V]`` (float32): ``tgt`` is the decoder
    input (shifted right: it starts with ``bos_id``); logit t predicts target token t + 1.
    """

    cfg: ModelConfig

    def __post_init__(self):
        self.cfg.check_attention()  # the head shapes only attention needs (RNNs skip them)
        super().__post_init__()

    def setup(self):
        cfg = self.cfg
        self.embed = _embed_module(cfg, "embed")
        if not cfg.share_embeddings:
            self.src_embed = _embed_module(cfg, "src_embed")
        self.positions = PositionalEncoding(cfg)
        self.dropout = Dropout(cfg.dropout_rate)
        self.encoder_layers = layer_stack(cfg, "encoder", "encoder")
        self.decoder_layers = layer_stack(cfg, "decoder", "decoder")
        if cfg.norm == "pre":
            self.encoder_norm = norm_layer(cfg, "encoder_norm")
            self.decoder_norm = norm_layer(cfg, "decoder_norm")
        if not cfg.share_embeddings:
            self.unembed = dense(cfg, cfg.vocab_size, "unembed")

    def _embed(self, embed: nn.Embed, tokens, deterministic: bool, decode: bool):
        x = embed(tokens) * jnp.asarray(np.sqrt(self.cfg.d_model), self.cfg.compute_dtype)
        return self.dropout(self.positions(x, decode=decode), deterministic=deterministic)

    def src_mask(self, src):
        """[B, S] tokens -> boolean [B, 1, 1, S]: keys that are not ``pad_id``."""
        return (src != self.cfg.pad_id)[:, None, None, :]

    def encode(self, src, *, deterministic: bool = True):
        """Encoder stack: src [B, S] int -> [B, S, D] (compute dtype)."""
        check_tokens("src", src, self.cfg)
        mask = self.src_mask(src)
        embed = self.embed if self.cfg.share_embeddings else self.src_embed
        x = self._embed(embed, src, deterministic, decode=False)
        x = run_stack(self.encoder_layers, x, mask, deterministic, False)
        if self.cfg.norm == "pre":
            x = self.encoder_norm(x).astype(x.dtype)
        return x

    def decode(self, encoded, src, tgt, *, deterministic: bool = True, decode: bool = False):
        """Decoder stack and output projection.

        Args:
          encoded: [B, S, D] from :meth:`encode`; may be ``None`` in decode mode after the
            first step (the cross-attention keys/values are then read from the cache).
          src: [B, S] source tokens (for the padding mask).
          tgt: [B, T] decoder input tokens.
          deterministic: disable dropout.
          decode: incremental decoding with the ``"cache"`` collection.

        Returns:
          [B, T, V] float32 logits.
        """
        cfg = self.cfg
        check_tokens("tgt", tgt, cfg, batch=np.shape(src)[0])
        mask = self.src_mask(src)
        x = self._embed(self.embed, tgt, deterministic, decode)
        x = run_stack(self.decoder_layers, x, encoded, mask, deterministic, decode)
        if cfg.norm == "pre":
            x = self.decoder_norm(x).astype(x.dtype)
        # §3.4: the pre-softmax linear transformation shares the embedding matrix.
        logits = self.embed.attend(x) if cfg.share_embeddings else self.unembed(x)
        return logits.astype(jnp.float32)

    def __call__(self, src, tgt, *, deterministic: bool = True):
        """src [B, S], tgt [B, T] int -> logits [B, T, V] float32."""
        check_tokens("tgt", tgt, self.cfg, batch=np.shape(src)[0])  # before encoding src
        return self.decode(self.encode(src, deterministic=deterministic), src, tgt,
                           deterministic=deterministic)

    @nn.nowrap
    def start_decoding(self, params, src, length: int, *, repeat: int = 1):
        """Encode ``src`` once, feed ``bos_id``, and return the step for the next tokens.

        The decoding protocol of every model of the package (see :mod:`transformer_jax.decoding`).

        Args:
          params: the model's parameters.
          src: [B, S] source tokens.
          length: L, decoder positions the cache holds, BOS included (<= ``cfg.max_len``).
          repeat: copies of each source (W for beam search: rows b·W … b·W + W - 1).

        Returns:
          (logits [B·repeat, 1, V] after BOS, state, step) with ``step(tokens[B·repeat, t],
          state, rows=None) -> (logits[B·repeat, t, V], state)``; ``rows`` [B·repeat] first
          makes row r of the state a copy of row ``rows[r]`` (beam search's reordering of
          hypotheses).
        """
        if length > self.cfg.max_len:
            raise ValueError(f"decoding needs {length} decoder positions, more than "
                             f"max_len={self.cfg.max_len}")
        encoded = self.apply({"params": params}, src, method=Transformer.encode)
        if repeat > 1:
            encoded, src = jnp.repeat(encoded, repeat, axis=0), jnp.repeat(src, repeat, axis=0)
        n = src.shape[0]

        def feed(tokens, cache, src, encoded=None):
            logits, mut = self.apply({"params": params, "cache": cache}, encoded, src, tokens,
                                     decode=True, mutable=["cache"], method=Transformer.decode)
            return logits, mut["cache"]

        def step(tokens, state, rows=None):  # cross-attention keys/values: from the cache
            if rows is not None:
                state = _take_rows(state, rows)
            logits, cache = feed(tokens, state["cache"], state["src"])
            return logits, {"cache": cache, "src": state["src"]}

        dummy = jnp.zeros((n, length), jnp.int32)
        shapes = jax.eval_shape(
            lambda p, e, s: self.apply({"params": p}, e, s, dummy, decode=True,
                                       mutable=["cache"], method=Transformer.decode)[1]["cache"],
            params, encoded, src)
        cache = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
        bos = jnp.full((n, 1), self.cfg.bos_id, jnp.int32)
        logits, cache = feed(bos, cache, src, encoded)
        return logits, {"cache": cache, "src": src}, step


class TransformerLM(nn.Module):
    """Decoder-only language model: causal self-attention blocks, ``cfg.num_decoder_layers`` deep.

    ``__call__(tokens[B, T]) -> logits[B, T, V]`` (float32); logit t predicts token t + 1.
    Tokens are dense (no padding mask).
    """

    cfg: ModelConfig

    def __post_init__(self):
        self.cfg.check_attention()  # the head shapes only attention needs (RNNs skip them)
        super().__post_init__()

    @nn.compact
    def __call__(self, tokens, *, deterministic: bool = True, decode: bool = False):
        """tokens [B, T] int -> logits [B, T, V] float32; ``decode`` uses the KV cache."""
        cfg = self.cfg
        check_tokens("tokens", tokens, cfg)
        embed = _embed_module(cfg, "embed")
        x = embed(tokens) * jnp.asarray(np.sqrt(cfg.d_model), cfg.compute_dtype)  # §3.4
        x = PositionalEncoding(cfg, name="positions")(x, decode=decode)
        x = Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        x = run_stack(layer_stack(cfg, "lm", "layer"), x, None, deterministic, decode)
        if cfg.norm == "pre":
            x = norm_layer(cfg, "decoder_norm")(x).astype(x.dtype)
        logits = embed.attend(x) if cfg.share_embeddings else dense(cfg, cfg.vocab_size,
                                                                      "unembed")(x)
        return logits.astype(jnp.float32)

    @nn.nowrap
    def context_limit(self) -> int:
        """The most positions one decoding pass may feed (the positions table's length)."""
        return self.cfg.max_len

    @nn.nowrap
    def start_decoding(self, params, prompt, length: int, *, repeat: int = 1):
        """Feed ``prompt`` in one pass (prefill) and return the step for the next tokens.

        The decoding protocol of every model of the package (see :mod:`transformer_jax.decoding`).

        Args:
          params: the model's parameters.
          prompt: [B, T0] tokens, T0 >= 1.
          length: L, positions the KV cache holds, the prompt included (<= ``cfg.max_len``).
          repeat: copies of each prompt (rows b·repeat … b·repeat + repeat - 1).

        Returns:
          (logits [B·repeat, T0, V] of the prompt, state, step) with ``step(tokens[B·repeat,
          t], state, rows=None) -> (logits[B·repeat, t, V], state)``, which feeds ``tokens`` at
          the cache's position; ``rows`` [B·repeat] first makes row r of the state a copy of
          row ``rows[r]``.
        """
        if length > self.cfg.max_len:
            raise ValueError(f"decoding needs {length} positions, more than "
                             f"max_len={self.cfg.max_len}")
        prompt = jnp.repeat(prompt, repeat, axis=0) if repeat > 1 else prompt

        def step(tokens, cache, rows=None):
            if rows is not None:
                cache = _take_rows(cache, rows)
            logits, mut = self.apply({"params": params, "cache": cache}, tokens, decode=True,
                                     mutable=["cache"])
            return logits, mut["cache"]

        dummy = jnp.zeros((prompt.shape[0], length), jnp.int32)
        # A decode call on an empty cache only defines its shapes (see MultiHeadAttention).
        shapes = jax.eval_shape(lambda p: self.apply({"params": p}, dummy, decode=True,
                                                     mutable=["cache"])[1]["cache"], params)
        cache = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
        logits, cache = step(prompt, cache)
        return logits, cache, step


def _take_rows(state, rows):
    """Rows ``rows`` of every batched leaf of a decoding state (index, then batch, under scan).

    A scanned stack's cache leaves are [L, B, ...] (the layer axis first); everything else
    is batch-first. Scalars (the positions' index) and per-layer indices [L] have no batch.
    """
    def take(path, x):
        axis = 1 if any(getattr(k, "key", None) in _SCANNED_STACKS for k in path) else 0
        return jnp.take(x, rows, axis=axis) if x.ndim > axis else x

    return jax.tree_util.tree_map_with_path(take, state)
