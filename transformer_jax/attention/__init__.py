"""The attention kernel other JAX code imports: pure JAX, no Flax, no other package module.

softmax(Q Kᵀ · scale + bias, masked) V with the layout and arguments of
``jax.nn.dot_product_attention`` (``query[B, T, N, H]``, ``key``/``value[B, S, K, H]``).
:mod:`~transformer_jax.attention.api` holds the entry points and their checks;
:mod:`~transformer_jax.attention.kernels` the exact and blockwise implementations.
"""

from transformer_jax.attention.api import (
    Implementation,
    attention_weights,
    dot_product_attention,
    make_causal_mask,
    make_padding_mask,
    scaled_dot_product_attention,
)

__all__ = [
    "Implementation",
    "attention_weights",
    "dot_product_attention",
    "make_causal_mask",
    "make_padding_mask",
    "scaled_dot_product_attention",
]
