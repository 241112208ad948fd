"""Flax Linen modules: the paper's encoder–decoder (:class:`Transformer`) and a decoder-only LM.

Functional use: ``params = model.init(rng, ...)["params"]``; ``model.apply({"params": params},
...)`` is pure. Training mode (``deterministic=False``) with ``dropout_rate > 0`` needs
``rngs={"dropout": key}``; Flax raises without one.

Parameter names (stable, for sharding tables). The head axis N/K is always the second-to-last
axis of an attention input kernel and the first axis of ``out``:

* ``embed/embedding [V, D]``: token embedding (shared source/target/output when
  ``share_embeddings``, §3.4); otherwise also ``src_embed/embedding`` and ``unembed/kernel [D, V]``.
* ``positions/pos_embed [max_len, D]``: only with ``positions="learned"``.
* attention: ``qkv/kernel [D, 3, N, H]`` (self-attention, K == N: one fused projection) or
  ``query/kernel [D, N, H]`` + ``kv/kernel [D, 2, K, H]`` (cross-attention, GQA); ``out/kernel
  [N, H, D]``; each with a bias.
* feed-forward: ``mlp/wi/kernel [D, F]``, ``mlp/wo/kernel [F, D]``.
* LayerNorms: ``ln_self``, ``ln_cross``, ``ln_mlp`` in blocks; ``encoder_norm``,
  ``decoder_norm`` (pre-LN only).

Attention probabilities for plots: apply with ``mutable=["intermediates"]``; every attention
layer then sows ``attention_weights [B, N, T, S]`` (float32). They are computed only then.

Incremental decoding (``decode=True``) keeps keys/values in the ``"cache"`` collection; see
:mod:`transformer_jax.decoding`.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.attention import attention_weights, dot_product_attention
from transformer_jax.config import ModelConfig

__all__ = [
    "DecoderBlock",
    "EncoderBlock",
    "FeedForward",
    "MultiHeadAttention",
    "PositionalEncoding",
    "Transformer",
    "TransformerLM",
    "check_tokens",
    "sinusoidal_positions",
]


def sinusoidal_positions(length: int, d_model: int) -> np.ndarray:
    """§3.5: PE(pos, 2i) = sin(pos / 10000^(2i/D)), PE(pos, 2i+1) = cos(pos / 10000^(2i/D)).

    Returns:
      [length, D] float32 (computed in float64).
    """
    pos = np.arange(length, dtype=np.float64)[:, None]
    two_i = np.arange(0, d_model, 2, dtype=np.float64)[None, :]
    angle = pos / np.power(10000.0, two_i / d_model)
    pe = np.zeros((length, d_model), np.float64)
    pe[:, 0::2] = np.sin(angle)
    pe[:, 1::2] = np.cos(angle[:, : d_model // 2])
    return pe.astype(np.float32)


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


def _dense(cfg: ModelConfig, features, name: str, axis=-1) -> nn.DenseGeneral:
    return nn.DenseGeneral(features, axis=axis, dtype=cfg.compute_dtype,
                           param_dtype=cfg.params_dtype, name=name)


def _layer_norm(cfg: ModelConfig, name: str) -> nn.LayerNorm:
    # Statistics and output in float32 even for bf16 compute; callers cast back.
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=jnp.float32,
                        param_dtype=cfg.params_dtype, name=name)


class PositionalEncoding(nn.Module):
    """Adds sinusoidal (§3.5) or learned position embeddings; in decode mode from the cache index."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, *, decode: bool = False):
        """x [B, T, D] -> x + P[offset : offset + T] (offset 0 unless decoding)."""
        cfg, T = self.cfg, x.shape[1]
        if T > cfg.max_len:
            raise ValueError(f"sequence length {T} exceeds max_len={cfg.max_len}")
        if cfg.positions == "learned":
            # Scale comparable to the sinusoids (RMS 1/√2) next to unit-variance embeddings.
            table = self.param("pos_embed", nn.initializers.normal(0.5),
                               (cfg.max_len, cfg.d_model), cfg.params_dtype)
        else:
            table = jnp.asarray(sinusoidal_positions(cfg.max_len, cfg.d_model))
        if decode:
            ready = self.has_variable("cache", "index")
            index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
            offset = index.value
            if ready:
                index.value = offset + T
            pe = jax.lax.dynamic_slice_in_dim(table, offset, T)
        else:
            pe = table[:T]
        return x + pe.astype(x.dtype)


class MultiHeadAttention(nn.Module):
    """Multi-head (or grouped-query) attention, §3.2.2, calling our attention kernel.

    Attributes:
      cfg: the model config.
      causal: queries see only keys at or before their own position (decoder self-attention).
      cross: cross-attention (queries from ``x``, keys/values from ``context``).
    """

    cfg: ModelConfig
    causal: bool = False
    cross: bool = False

    @nn.compact
    def __call__(self, x, context=None, *, mask=None, decode: bool = False):
        """Attend from ``x`` to itself (``context=None``) or to ``context``.

        Args:
          x: [B, T, D] queries' inputs.
          context: [B, S, D] keys'/values' inputs for cross-attention; ``None`` for
            self-attention, or for cross-attention in decode mode once the cache holds the
            projected encoder output.
          mask: optional boolean, broadcastable to [B, N, T, S]; True = may attend.
          decode: use and update the ``"cache"`` collection (incremental decoding).

        Returns:
          [B, T, D] in the compute dtype.
        """
        cfg = self.cfg
        N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        if self.cross and context is None and not (
                decode and self.has_variable("cache", "cross_key")):
            raise ValueError("cross-attention needs context (the encoder output) unless the "
                             "decode cache already holds its keys/values")
        if not self.cross and K == N:
            # One fused projection: a single [D, 3·N·H] matmul instead of three.
            q, k, v = jnp.moveaxis(_dense(cfg, (3, N, H), "qkv")(x), -3, 0)
        else:
            q = _dense(cfg, (N, H), "query")(x)
            kv_proj = _dense(cfg, (2, K, H), "kv")
            source = context if self.cross else x
            k, v = (None, None) if source is None else jnp.moveaxis(kv_proj(source), -3, 0)
        causal = self.causal
        if decode and self.cross:
            # Encoder keys/values are projected once (on the first step) and then reused.
            ready = self.has_variable("cache", "cross_key")
            if k is None:
                k = self.get_variable("cache", "cross_key")
                v = self.get_variable("cache", "cross_value")
            else:
                ck = self.variable("cache", "cross_key", jnp.zeros, k.shape, k.dtype)
                cv = self.variable("cache", "cross_value", jnp.zeros, v.shape, v.dtype)
                if ready:
                    ck.value, cv.value = k, v
        elif decode:
            ready = self.has_variable("cache", "cached_key")
            ck = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
            cv = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
            index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
            if ready:  # else: this call only defines the cache's shapes (full causal pass)
                i, T, L = index.value, x.shape[1], ck.value.shape[1]
                k = jax.lax.dynamic_update_slice(ck.value, k.astype(ck.value.dtype), (0, i, 0, 0))
                v = jax.lax.dynamic_update_slice(cv.value, v.astype(cv.value.dtype), (0, i, 0, 0))
                ck.value, cv.value, index.value = k, v, i + T
                # Query t (absolute position i + t) sees cached keys s <= i + t.
                visible = jnp.arange(L)[None, :] <= (i + jnp.arange(T))[:, None]
                mask = visible[None, None] if mask is None else mask & visible[None, None]
                causal = False
        impl = None if cfg.attention_impl == "auto" else cfg.attention_impl
        out = dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation=impl)
        if self.is_mutable_collection("intermediates") and not self.is_initializing():
            self.sow("intermediates", "attention_weights",
                     attention_weights(q, k, mask=mask, is_causal=causal))
        return _dense(cfg, cfg.d_model, "out", axis=(-2, -1))(out)


class FeedForward(nn.Module):
    """Position-wise feed-forward network, §3.3: FFN(x) = act(x W1 + b1) W2 + b2."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        """[B, T, D] -> [B, T, D]."""
        act = nn.relu if self.cfg.activation == "relu" else nn.gelu
        h = act(_dense(self.cfg, self.cfg.d_ff, "wi")(x))
        return _dense(self.cfg, self.cfg.d_model, "wo")(h)


def _sublayer(cfg: ModelConfig, x, fn, ln: nn.LayerNorm, deterministic: bool):
    """Residual connection around ``fn`` with dropout (§5.4) and post- (§3.1) or pre-LN."""
    drop = functools.partial(nn.Dropout(cfg.dropout_rate), deterministic=deterministic)
    if cfg.norm == "pre":
        return x + drop(fn(ln(x).astype(x.dtype)))
    return ln(x + drop(fn(x))).astype(x.dtype)


class EncoderBlock(nn.Module):
    """Self-attention + feed-forward (§3.1); with ``causal=True`` it is the LM's block."""

    cfg: ModelConfig
    causal: bool = False

    @nn.compact
    def __call__(self, x, mask=None, *, deterministic: bool = True, decode: bool = False):
        """x [B, T, D], mask broadcastable to [B, N, T, T] -> [B, T, D]."""
        cfg = self.cfg
        attn = MultiHeadAttention(cfg, causal=self.causal, name="self_attention")
        x = _sublayer(cfg, x, lambda h: attn(h, mask=mask, decode=decode),
                      _layer_norm(cfg, "ln_self"), deterministic)
        return _sublayer(cfg, x, FeedForward(cfg, name="mlp"), _layer_norm(cfg, "ln_mlp"),
                         deterministic)


class DecoderBlock(nn.Module):
    """Causal self-attention, cross-attention to the encoder output, feed-forward (§3.1)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, encoded, src_mask, *, deterministic: bool = True,
                 decode: bool = False):
        """x [B, T, D], encoded [B, S, D] (or None from the cache), src_mask [B, 1, 1, S]."""
        cfg = self.cfg
        self_attn = MultiHeadAttention(cfg, causal=True, name="self_attention")
        cross_attn = MultiHeadAttention(cfg, cross=True, name="cross_attention")
        x = _sublayer(cfg, x, lambda h: self_attn(h, decode=decode),
                      _layer_norm(cfg, "ln_self"), deterministic)
        x = _sublayer(cfg, x, lambda h: cross_attn(h, encoded, mask=src_mask, decode=decode),
                      _layer_norm(cfg, "ln_cross"), deterministic)
        return _sublayer(cfg, x, FeedForward(cfg, name="mlp"), _layer_norm(cfg, "ln_mlp"),
                         deterministic)


def _embed_init(cfg: ModelConfig):
    # N(0, 1/D) so that the √D-scaled embedding (§3.4) has unit variance and tied logits start
    # small.
    return nn.initializers.normal(cfg.d_model ** -0.5)


def _embed_module(cfg: ModelConfig, name: str) -> nn.Embed:
    return nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype,
                    param_dtype=cfg.params_dtype, embedding_init=_embed_init(cfg), name=name)


class Transformer(nn.Module):
    """The encoder–decoder of "Attention Is All You Need" (§3, Figure 1).

    ``__call__(src[B, S], tgt[B, T]) -> logits[B, T, V]`` (float32): ``tgt`` is the decoder
    input (shifted right: it starts with ``bos_id``); logit t predicts target token t + 1.
    """

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.embed = _embed_module(cfg, "embed")
        if not cfg.share_embeddings:
            self.src_embed = _embed_module(cfg, "src_embed")
        self.positions = PositionalEncoding(cfg)
        self.dropout = nn.Dropout(cfg.dropout_rate)
        self.encoder_layers = [EncoderBlock(cfg, name=f"encoder_{i}")
                               for i in range(cfg.num_encoder_layers)]
        self.decoder_layers = [DecoderBlock(cfg, name=f"decoder_{i}")
                               for i in range(cfg.num_decoder_layers)]
        if cfg.norm == "pre":
            self.encoder_norm = _layer_norm(cfg, "encoder_norm")
            self.decoder_norm = _layer_norm(cfg, "decoder_norm")
        if not cfg.share_embeddings:
            self.unembed = _dense(cfg, cfg.vocab_size, "unembed")

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
        for layer in self.encoder_layers:
            x = layer(x, mask, deterministic=deterministic)
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
        for layer in self.decoder_layers:
            x = layer(x, encoded, mask, deterministic=deterministic, decode=decode)
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

        Args:
          params: the model's parameters.
          src: [B, S] source tokens.
          length: L, decoder positions the cache holds, BOS included (<= ``cfg.max_len``).
          repeat: copies of each source (W for beam search: rows b·W … b·W + W - 1).

        Returns:
          (logits [B·repeat, 1, V] after BOS, state, step) with ``step(tokens[B·repeat, 1],
          state) -> (logits, state)``. Every leaf of ``state`` has B·repeat rows first, so
          reordering hypotheses is one gather over the state.
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

        def step(tokens, state):  # cross-attention keys/values come from the cache
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

    @nn.compact
    def __call__(self, tokens, *, deterministic: bool = True, decode: bool = False):
        """tokens [B, T] int -> logits [B, T, V] float32; ``decode`` uses the KV cache."""
        cfg = self.cfg
        check_tokens("tokens", tokens, cfg)
        embed = _embed_module(cfg, "embed")
        x = embed(tokens) * jnp.asarray(np.sqrt(cfg.d_model), cfg.compute_dtype)  # §3.4
        x = PositionalEncoding(cfg, name="positions")(x, decode=decode)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        for i in range(cfg.num_decoder_layers):
            x = EncoderBlock(cfg, causal=True, name=f"layer_{i}")(
                x, deterministic=deterministic, decode=decode)
        if cfg.norm == "pre":
            x = _layer_norm(cfg, "decoder_norm")(x).astype(x.dtype)
        logits = embed.attend(x) if cfg.share_embeddings else _dense(cfg, cfg.vocab_size,
                                                                      "unembed")(x)
        return logits.astype(jnp.float32)

    @nn.nowrap
    def context_limit(self) -> int:
        """The most positions one decoding pass may feed (the positions table's length)."""
        return self.cfg.max_len

    @nn.nowrap
    def init_decoding(self, params, batch_size: int, length: int):
        """A zero KV cache for ``length`` positions and the step that feeds it.

        Args:
          params: the model's parameters.
          batch_size: B.
          length: L, positions the cache holds (<= ``cfg.max_len``).

        Returns:
          (cache, step) with ``step(tokens[B, t], cache) -> (logits[B, t, V], cache)``: feeds
          ``tokens`` at the cache's position (a prompt in one pass, then one token at a time).
        """
        if length > self.cfg.max_len:
            raise ValueError(f"decoding needs {length} positions, more than "
                             f"max_len={self.cfg.max_len}")

        def step(tokens, cache):
            logits, mut = self.apply({"params": params, "cache": cache}, tokens, decode=True,
                                     mutable=["cache"])
            return logits, mut["cache"]

        dummy = jnp.zeros((batch_size, length), jnp.int32)
        # A decode call on an empty cache only defines its shapes (see MultiHeadAttention).
        shapes = jax.eval_shape(lambda p: self.apply({"params": p}, dummy, decode=True,
                                                     mutable=["cache"])[1]["cache"], params)
        return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes), step
