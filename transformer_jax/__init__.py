"""transformer_jax: the Transformer (Vaswani et al., 2017) in JAX and Flax.

Axis legend, used in every docstring, einsum string and comment of the package:

    B  batch                      T  query (target) length     S  key (source) length
    D  model width (d_model)      N  query heads               K  key/value heads
    H  head dim (d_k = d_v)       F  feed-forward width (d_ff) V  vocabulary
    L  layers                     G  query heads per key/value head (N // K)

Shapes of public functions are written as ``[B, T, N, H]``.

Every name below is imported lazily, on first use: importing the package itself loads nothing
(so the commands answer Ctrl-C at once), and ``import transformer_jax.attention`` loads the
pure-JAX kernel without Flax, Optax or orbax.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> submodule that defines it; resolved on first attribute access (PEP 562).
_LAZY: dict[str, str] = {
    "attention_weights": "attention",
    "dot_product_attention": "attention",
    "make_causal_mask": "attention",
    "make_padding_mask": "attention",
    "ring_attention": "attention",
    "scaled_dot_product_attention": "attention",
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


__all__ = list(_LAZY)
