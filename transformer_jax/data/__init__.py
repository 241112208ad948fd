"""Data: tokenizers, text corpora, batches as pure functions of (seed, step), and generated tasks.

Imports nothing of the package but :mod:`transformer_jax.config`; no JAX.
"""

from transformer_jax.data.batches import (
    IGNORE,
    check_length,
    eval_batches,
    num_eval_windows,
    train_batches,
)
from transformer_jax.data.corpus import (
    Corpus,
    DataError,
    check_text,
    embedded_corpus_text,
    load_corpus,
)
from transformer_jax.data.tokenizer import ByteTokenizer

__all__ = [
    "IGNORE",
    "ByteTokenizer",
    "Corpus",
    "DataError",
    "check_length",
    "check_text",
    "embedded_corpus_text",
    "eval_batches",
    "load_corpus",
    "num_eval_windows",
    "train_batches",
]
