"""The kernel as Flax's ``attention_fn``, without importing Flax.

Linen's ``nn.MultiHeadDotProductAttention(attention_fn=...)`` and NNX's
``nnx.MultiHeadAttention(attention_fn=...)`` call ``attention_fn(query, key, value, ...)`` with
the keywords of ``flax.linen.dot_product_attention`` (Linen passes only those the function
names, so every one is named here: none is dropped silently) and, from NNX, ``is_causal``.
Flax's own function takes float or boolean masks, any number of leading batch axes, applies
dropout to the probabilities and sows them when given ``module``; so does this one.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from transformer_jax.attention.api import attention_weights, dot_product_attention


def _flat_batch(x, batch: tuple[int, ...], core: int):
    """[*batch, *core axes] broadcastable array -> [prod(batch) or 1, *core axes]."""
    if x is None:
        return None
    x = jnp.reshape(x, (1,) * (len(batch) + core - x.ndim) + x.shape)
    lead = x.shape[:len(batch)]
    if all(d == 1 for d in lead):
        return x.reshape((1,) + x.shape[len(batch):])
    x = jnp.broadcast_to(x, batch + x.shape[len(batch):])
    return x.reshape((math.prod(batch),) + x.shape[len(batch):])


def flax_attention_fn(query: ArrayLike, key: ArrayLike, value: ArrayLike,
                      bias: ArrayLike | None = None, mask: ArrayLike | None = None,
                      broadcast_dropout: bool = True, dropout_rng: ArrayLike | None = None,
                      dropout_rate: float = 0.0, deterministic: bool = False, dtype: Any = None,
                      precision: Any = None, module: Any = None,
                      force_fp32_for_softmax: bool = False, einsum_dot_general: Any = None,
                      qk_attn_weights_einsum: Any = None, attn_weights_value_einsum: Any = None,
                      is_causal: bool = False) -> jax.Array:
    """``flax.linen.dot_product_attention``'s interface on our kernel.

    softmax(Q Kᵀ / √H + bias, masked) V with Flax's argument names, its float masks, any number
    of leading batch axes and dropout on the probabilities. Pass it as ``attention_fn=`` to
    ``nn.MultiHeadDotProductAttention`` or ``nnx.MultiHeadAttention``. Shapes use T query
    length, S key length, N query heads, K key/value heads, H head dim.

    Args:
      query: [batch..., T, N, H]; key, value: [batch..., S, K, H] (N a multiple of K).
      bias: optional additive bias broadcastable to [batch..., N, T, S].
      mask: optional mask broadcastable to [batch..., N, T, S], boolean or float (Flax's
        ``make_causal_mask`` and ``combine_masks`` give float32): nonzero = may attend.
      broadcast_dropout: one dropout mask for every example and head, as Flax.
      dropout_rng: a ``jax.random`` key; needed when dropout applies.
      dropout_rate: dropout on the attention probabilities, applied unless ``deterministic``.
      deterministic: no dropout.
      dtype: the dtype q, k, v are cast to (default: the one they promote to).
      precision: precision of the matmuls, as Flax passes it to its einsums (None, a
        ``jax.lax.Precision`` or its name such as "highest", or a pair).
      einsum_dot_general, qk_attn_weights_einsum, attn_weights_value_einsum: must be None (the
        kernel runs its own float32-accumulating matmuls, not a custom einsum).
      module: when given, the probabilities are sown into its "intermediates" collection as
        ``attention_weights`` [batch..., N, T, S], as Flax does.
      force_fp32_for_softmax: accepted; the softmax is always float32 here.
      is_causal: query t sees keys s <= t (NNX passes it).

    Returns:
      [batch..., T, N, H].

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from transformer_jax.attention import flax_attention_fn
      >>> mha = nnx.MultiHeadAttention(num_heads=4, in_features=32, decode=False,
      ...                              attention_fn=flax_attention_fn, rngs=nnx.Rngs(0))
      >>> mha(jnp.ones((2, 10, 32))).shape
      (2, 10, 32)
    """
    del force_fp32_for_softmax  # always float32 here
    for name, given in (("einsum_dot_general", einsum_dot_general),
                        ("qk_attn_weights_einsum", qk_attn_weights_einsum),
                        ("attn_weights_value_einsum", attn_weights_value_einsum)):
        if given is not None:
            raise ValueError(f"flax_attention_fn does not take {name} (got {given!r}): the "
                             "kernel runs its own float32-accumulating matmuls")
    query, key, value = (jnp.asarray(x) for x in (query, key, value))
    dtype = jnp.result_type(query, key, value) if dtype is None else dtype
    query, key, value = (x.astype(dtype) for x in (query, key, value))
    batch = query.shape[:-3]
    if key.shape[:-3] != batch or value.shape[:-3] != batch:
        raise ValueError(f"query, key and value batch axes differ: {query.shape}, {key.shape}, "
                         f"{value.shape}")
    if mask is not None:
        mask = jnp.asarray(mask).astype(bool)
    if len(batch) > 1:
        query, key, value = (x.reshape((-1,) + x.shape[-3:]) for x in (query, key, value))
        mask, bias = _flat_batch(mask, batch, 3), _flat_batch(bias, batch, 3)
    rate = 0.0 if deterministic else float(dropout_rate)
    out = dot_product_attention(query, key, value, bias, mask, is_causal=is_causal,
                                dropout_rate=rate, dropout_rng=dropout_rng,
                                dropout_broadcast=bool(broadcast_dropout), precision=precision)
    if module is not None:
        weights = attention_weights(query, key, bias, mask, is_causal=is_causal)
        weights = weights.reshape(batch + weights.shape[-3:]).astype(dtype)
        module.sow("intermediates", "attention_weights", weights)
    return out.reshape(batch + out.shape[-3:])
