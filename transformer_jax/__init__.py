"""transformer_jax: the Transformer (Vaswani et al., 2017) in JAX and Flax.

Axis legend, used in every docstring, einsum string and comment of the package:

    B  batch                      T  query (target) length     S  key (source) length
    D  model width (d_model)      N  query heads               K  key/value heads
    H  head dim (d_k = d_v)       F  feed-forward width (d_ff) V  vocabulary
    L  layers                     G  query heads per key/value head (N // K)

Shapes of public functions are written as ``[B, T, N, H]``.

The attention kernel (:mod:`transformer_jax.attention`) is pure JAX and is imported eagerly;
everything that needs Flax, Optax or orbax is imported lazily on first use, so
``import transformer_jax.attention`` never imports Flax.
"""

from __future__ import annotations

import importlib

from transformer_jax.attention import (
    attention_weights,
    dot_product_attention,
    make_causal_mask,
    make_padding_mask,
    scaled_dot_product_attention,
)

__version__ = "0.1.0"

# name -> submodule that defines it; resolved on first attribute access (PEP 562).
_LAZY: dict[str, str] = {
    "ModelConfig": "config",
    "PRESETS": "config",
    "TrainConfig": "config",
    "TrainState": "train",
    "train_step": "train",
    "make_optimizer": "train",
    "cross_entropy": "train",
    "ByteTokenizer": "data",
    "load_corpus": "data",
    "Checkpointer": "runs.checkpoint",
    "load_run": "runs.load",
    "Transformer": "models",
    "TransformerLM": "models",
    "count_params": "models",
    "sinusoidal_positions": "models",
    "LSTMLM": "models",
    "GRULM": "models",
    "match_rnn_width": "models",
    "generate": "decoding",
    "greedy_decode": "decoding",
    "beam_search": "decoding",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"transformer_jax.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'transformer_jax' has no attribute {name!r}")


__all__ = [
    "attention_weights",
    "dot_product_attention",
    "make_causal_mask",
    "make_padding_mask",
    "scaled_dot_product_attention",
    *_LAZY,
]
