"""The Transformer's layers: positions, normalisation, attention, feed-forward and the blocks.

Every option of :class:`~transformer_jax.config.ModelConfig` that changes a layer is read here:
the paper's choices are the defaults (post-LN LayerNorm, sinusoidal positions, ReLU, biases);
the modern LM options are RMSNorm (Zhang & Sennrich 2019), rotary positions (RoPE, Su et al.
2021), SwiGLU (Shazeer 2020), QK-norm (Dehghani et al. 2023) and no biases.

Numerics: with a bfloat16 compute dtype the matmuls run in bfloat16 while parameters stay
float32; normalisation statistics, rotary angles and the attention softmax are float32.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.attention import attention_weights, dot_product_attention
from transformer_jax.config import ModelConfig
from transformer_jax.models.dropout import Dropout
from transformer_jax.models.matmul import dot_general

__all__ = [
    "DecoderBlock",
    "EncoderBlock",
    "FeedForward",
    "MultiHeadAttention",
    "PositionalEncoding",
    "apply_rotary",
    "layer_stack",
    "run_stack",
    "sinusoidal_positions",
]

ROPE_BASE = 10000.0
"""θ of the rotary frequencies θ^(-2i/H) (Su et al. 2021, §3.2.2)."""


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


def apply_rotary(x, positions):
    """Rotary position embedding (RoPE): rotate each pair of channels by its position's angle.

    Channel i of the first half pairs with channel i of the second half (the "rotate half"
    layout of GPT-NeoX and Llama) and is rotated by ``positions · θ^(-2i/H)``. A query at
    position m and a key at position n then score ``q·R(n - m)·k``: a function of the offset
    only (Su et al. 2021, §3.4).

    Args:
      x: [B, T, N, H] queries or keys (H even).
      positions: [T] or [B, T] integer positions.

    Returns:
      [B, T, N, H] in ``x``'s dtype (the rotation is computed in float32).
    """
    H = x.shape[-1]
    freq = ROPE_BASE ** (-jnp.arange(0, H // 2, dtype=jnp.float32) * 2.0 / H)  # [H/2]
    angle = jnp.asarray(positions, jnp.float32)[..., None] * freq  # [(B,) T, H/2]
    if angle.ndim == 2:
        angle = angle[None]
    cos, sin = jnp.cos(angle)[:, :, None, :], jnp.sin(angle)[:, :, None, :]  # [B, T, 1, H/2]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def dense(cfg: ModelConfig, features, name: str, axis=-1) -> nn.DenseGeneral:
    """A projection in the compute dtype, parameters in ``param_dtype``, bias per ``use_bias``;
    its backward pass is plain matmuls (:mod:`transformer_jax.models.matmul` says why) unless
    ``cfg.dense_backward`` is "jax"."""
    contract = dot_general if cfg.dense_backward == "matmul" else jax.lax.dot_general
    return nn.DenseGeneral(features, axis=axis, use_bias=cfg.use_bias, dtype=cfg.compute_dtype,
                           param_dtype=cfg.storage_dtype, dot_general=contract, name=name)


def norm_layer(cfg: ModelConfig, name: str) -> nn.Module:
    """LayerNorm or RMSNorm (``cfg.norm_type``); statistics and output in float32.

    ``cfg.norm`` says where it goes: before its sublayer (pre) or after the residual (post)."""
    if cfg.norm_type == "rmsnorm":
        return nn.RMSNorm(epsilon=cfg.layer_norm_eps, dtype=jnp.float32,
                          param_dtype=cfg.storage_dtype, name=name)
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=jnp.float32, use_bias=cfg.use_bias,
                        param_dtype=cfg.storage_dtype, name=name)


def _unstack(x):
    """The fused projections' [..., n, N, H] output as n arrays [..., N, H].

    A split, not moveaxis-and-unpack: the backward of a split is one concatenate, where
    unpacking's is a pad per slice, summed; and XLA's CPU backend wrote the moved axis out whole
    before slicing it. Same numbers either way.
    """
    n = x.shape[-3]
    return tuple(a.squeeze(-3) for a in jax.lax.split(x, (1,) * n, axis=x.ndim - 3))


class PositionalEncoding(nn.Module):
    """Adds sinusoidal (§3.5) or learned positions; in decode mode from the cache index.

    With rotary positions nothing is added here: :class:`MultiHeadAttention` rotates its
    queries and keys instead.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, *, decode: bool = False):
        """x [B, T, D] -> x + P[offset : offset + T] (offset 0 unless decoding)."""
        cfg, T = self.cfg, x.shape[1]
        if T > cfg.max_len:
            raise ValueError(f"sequence length {T} exceeds max_len={cfg.max_len}")
        if cfg.positions == "rope":
            return x
        if cfg.positions == "learned":
            # Scale comparable to the sinusoids (RMS 1/√2) next to unit-variance embeddings.
            table = self.param("pos_embed", nn.initializers.normal(0.5),
                               (cfg.max_len, cfg.d_model), cfg.storage_dtype)
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

    def _project(self, x, context):
        """q [B, T, N, H], and k, v [B, S, K, H] (``None`` when the cache holds them)."""
        cfg = self.cfg
        N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        if not self.cross and K == N:
            # One fused projection: a single [D, 3·N·H] matmul instead of three.
            q, k, v = _unstack(dense(cfg, (3, N, H), "qkv")(x))
        else:
            q = dense(cfg, (N, H), "query")(x)
            source = context if self.cross else x
            kv = None if source is None else dense(cfg, (2, K, H), "kv")(source)
            k, v = (None, None) if kv is None else _unstack(kv)
        if cfg.qk_norm:  # RMS-normalised queries and keys bound the logits (Dehghani et al.)
            qk_norm = functools.partial(nn.RMSNorm, epsilon=cfg.layer_norm_eps,
                                        param_dtype=cfg.storage_dtype)
            q = qk_norm(dtype=q.dtype, name="q_norm")(q)
            if k is not None:
                k = qk_norm(dtype=k.dtype, name="k_norm")(k)
        return q, k, v

    def _cross_cache(self, k, v):
        """Encoder keys/values are projected once (on the first step) and then reused."""
        ready = self.has_variable("cache", "cross_key")
        if k is None:
            return self.get_variable("cache", "cross_key"), self.get_variable("cache",
                                                                              "cross_value")
        ck = self.variable("cache", "cross_key", jnp.zeros, k.shape, k.dtype)
        cv = self.variable("cache", "cross_value", jnp.zeros, v.shape, v.dtype)
        if ready:
            ck.value, cv.value = k, v
        return k, v

    def _self_cache(self, q, k, v, mask):
        """Append k, v at the cache index; -> (q, k, v, mask, causal) over the whole cache."""
        ready = self.has_variable("cache", "cached_key")
        ck = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cv = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        if not ready:  # this call only defines the cache's shapes (a full causal pass)
            return self._rotate(q, k, 0) + (v, mask, self.causal)
        i, T, L = index.value, q.shape[1], ck.value.shape[1]
        q, k = self._rotate(q, k, i)
        k = jax.lax.dynamic_update_slice(ck.value, k.astype(ck.value.dtype), (0, i, 0, 0))
        v = jax.lax.dynamic_update_slice(cv.value, v.astype(cv.value.dtype), (0, i, 0, 0))
        ck.value, cv.value, index.value = k, v, i + T
        # Query t (absolute position i + t) sees cached keys s <= i + t.
        visible = jnp.arange(L)[None, :] <= (i + jnp.arange(T))[:, None]
        mask = visible[None, None] if mask is None else mask & visible[None, None]
        return q, k, v, mask, False

    def _rotate(self, q, k, offset):
        """Rotary positions offset + t for the T new queries and keys (identity without RoPE)."""
        if self.cfg.positions != "rope" or self.cross:
            return q, k
        positions = offset + jnp.arange(q.shape[1])
        return apply_rotary(q, positions), apply_rotary(k, positions)

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
        if self.cross and context is None and not (
                decode and self.has_variable("cache", "cross_key")):
            raise ValueError("cross-attention needs context (the encoder output) unless the "
                             "decode cache already holds its keys/values")
        q, k, v = self._project(x, context)
        causal = self.causal
        if decode and self.cross:
            k, v = self._cross_cache(k, v)
        elif decode:
            q, k, v, mask, causal = self._self_cache(q, k, v, mask)
        else:
            q, k = self._rotate(q, k, 0)
        impl = None if cfg.attention_impl == "auto" else cfg.attention_impl
        out = dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation=impl)
        if self.is_mutable_collection("intermediates") and not self.is_initializing():
            self.sow("intermediates", "attention_weights",
                     attention_weights(q, k, mask=mask, is_causal=causal))
        return dense(cfg, cfg.d_model, "out", axis=(-2, -1))(out)


class FeedForward(nn.Module):
    """Position-wise feed-forward network, §3.3: FFN(x) = act(x W1 + b1) W2 + b2.

    With ``activation="swiglu"``: (SiLU(x W_g) ⊙ x W_1) W_2 (Shazeer 2020), a third matrix.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        """[B, T, D] -> [B, T, D]."""
        cfg = self.cfg
        h = dense(cfg, cfg.d_ff, "wi")(x)
        if cfg.activation == "swiglu":
            h = nn.silu(dense(cfg, cfg.d_ff, "wg")(x)) * h
        else:
            h = nn.relu(h) if cfg.activation == "relu" else nn.gelu(h)
        return dense(cfg, cfg.d_model, "wo")(h)


def _sublayer(cfg: ModelConfig, x, fn, ln: nn.Module, deterministic: bool):
    """Residual connection around ``fn`` with dropout (§5.4) and post- (§3.1) or pre-LN."""
    drop = functools.partial(Dropout(cfg.dropout_rate), deterministic=deterministic)
    if cfg.norm == "pre":
        return x + drop(fn(ln(x).astype(x.dtype)))
    return ln(x + drop(fn(x))).astype(x.dtype)


class EncoderBlock(nn.Module):
    """Self-attention + feed-forward (§3.1); with ``causal=True`` it is the LM's block.

    ``deterministic`` and ``decode`` are positional (static under :func:`flax.linen.remat`).
    """

    cfg: ModelConfig
    causal: bool = False

    @nn.compact
    def __call__(self, x, mask=None, deterministic: bool = True, decode: bool = False):
        """x [B, T, D], mask broadcastable to [B, N, T, T] -> [B, T, D]."""
        cfg = self.cfg
        attn = MultiHeadAttention(cfg, causal=self.causal, name="self_attention")
        x = _sublayer(cfg, x, lambda h: attn(h, mask=mask, decode=decode),
                      norm_layer(cfg, "ln_self"), deterministic)
        return _sublayer(cfg, x, FeedForward(cfg, name="mlp"), norm_layer(cfg, "ln_mlp"),
                         deterministic)


class DecoderBlock(nn.Module):
    """Causal self-attention, cross-attention to the encoder output, feed-forward (§3.1)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, encoded, src_mask, deterministic: bool = True,
                 decode: bool = False):
        """x [B, T, D], encoded [B, S, D] (or None from the cache), src_mask [B, 1, 1, S]."""
        cfg = self.cfg
        self_attn = MultiHeadAttention(cfg, causal=True, name="self_attention")
        cross_attn = MultiHeadAttention(cfg, cross=True, name="cross_attention")
        x = _sublayer(cfg, x, lambda h: self_attn(h, decode=decode),
                      norm_layer(cfg, "ln_self"), deterministic)
        x = _sublayer(cfg, x, lambda h: cross_attn(h, encoded, mask=src_mask, decode=decode),
                      norm_layer(cfg, "ln_cross"), deterministic)
        return _sublayer(cfg, x, FeedForward(cfg, name="mlp"), norm_layer(cfg, "ln_mlp"),
                         deterministic)


REMAT_POLICIES = {
    "block": None,  # save only the block's inputs; recompute everything inside it
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep the weight matmuls
}
"""``ModelConfig.remat`` -> the ``jax.checkpoint`` policy around each block."""


def _block(cfg: ModelConfig, kind: str, name: str) -> nn.Module:
    """One block of a stack ("encoder", "decoder" or "lm"), rematerialised per ``cfg.remat``."""
    cls = DecoderBlock if kind == "decoder" else EncoderBlock
    if cfg.remat != "none":
        # deterministic and decode are Python bools: static. Inside a scan, CSE across
        # iterations cannot undo the recomputation, so its prevention is not needed (Flax docs).
        static = (4, 5) if kind == "decoder" else (3, 4)  # self counts as argument 0
        cls = nn.remat(cls, static_argnums=static, policy=REMAT_POLICIES[cfg.remat],
                       prevent_cse=not cfg.scan_layers)
    return cls(cfg, causal=True, name=name) if kind == "lm" else cls(cfg, name=name)


class _ScannedBlock(nn.Module):
    """One block as ``nn.scan`` wants it: (carry, broadcast arguments) -> (carry, None)."""

    cfg: ModelConfig
    kind: str

    @nn.compact
    def __call__(self, x, *args):
        return _block(self.cfg, self.kind, "block")(x, *args), None


def layer_stack(cfg: ModelConfig, kind: str, prefix: str):
    """The blocks of one stack: ``prefix_0`` … ``prefix_{L-1}``, or with ``cfg.scan_layers``
    one ``nn.scan`` named ``prefix + "s"`` whose parameters have a leading layer axis [L, ...].

    A scanned stack is traced once, whatever its depth (compile time stops growing with L).
    The KV cache and sown attention weights get the same leading layer axis.

    Args:
      cfg: the model config.
      kind: "encoder", "decoder" or "lm" (the LM's causal encoder blocks).
      prefix: the parameter-name prefix ("encoder", "decoder", "layer").
    """
    count = cfg.num_encoder_layers if kind == "encoder" else cfg.num_decoder_layers
    if not cfg.scan_layers:
        return [_block(cfg, kind, f"{prefix}_{i}") for i in range(count)]
    broadcast = (nn.broadcast,) * (4 if kind == "decoder" else 3)
    scanned = nn.scan(_ScannedBlock, variable_axes={"params": 0, "cache": 0, "intermediates": 0},
                      split_rngs={"params": True, "dropout": True}, in_axes=broadcast,
                      length=count)
    return scanned(cfg, kind, name=f"{prefix}s")


def run_stack(stack, x, *args):
    """``x`` through every block of a :func:`layer_stack` (the same ``args`` for each)."""
    if isinstance(stack, (list, tuple)):
        for block in stack:
            x = block(x, *args)
        return x
    return stack(x, *args)[0]
