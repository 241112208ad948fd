"""The attention kernel other JAX code imports: pure JAX, no Flax, no other package module.

softmax(Q Kᵀ · scale + bias, masked) V with the layout and arguments of
``jax.nn.dot_product_attention`` (``query[B, T, N, H]``, ``key``/``value[B, S, K, H]``).
:mod:`~transformer_jax.attention.api` holds the entry points,
:mod:`~transformer_jax.attention.checks` their argument checks,
:mod:`~transformer_jax.attention.dispatch` the choice of implementation (ours, or jax.nn's XLA
and cuDNN paths), :mod:`~transformer_jax.attention.batching` the batch and the grouped layout,
:mod:`~transformer_jax.attention.kernels` and :mod:`~transformer_jax.attention.blockwise` the
exact and blockwise implementations, :mod:`~transformer_jax.attention.ring` ring attention over
a sharded sequence, :mod:`~transformer_jax.attention.random_bits` the hashed bits of the dropout
masks (which the models' dropout shares), and :mod:`~transformer_jax.attention.flax_adapter` the
kernel as Flax's ``attention_fn``.
"""

from transformer_jax.attention.api import (
    Implementation,
    attention_weights,
    dot_product_attention,
    make_causal_mask,
    make_padding_mask,
    scaled_dot_product_attention,
)
from transformer_jax.attention.flax_adapter import flax_attention_fn
from transformer_jax.attention.ring import ring_attention

__all__ = [
    "Implementation",
    "attention_weights",
    "dot_product_attention",
    "flax_attention_fn",
    "make_causal_mask",
    "make_padding_mask",
    "ring_attention",
    "scaled_dot_product_attention",
]
