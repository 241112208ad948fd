"""Tokenizers. :class:`ByteTokenizer`: UTF-8 bytes are the tokens (V = 256); nothing to train or
download, and every string encodes. The subword tokenizer is :class:`~transformer_jax.data.bpe.
BPETokenizer`; both share the methods below, so the data path and sampling take either.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

__all__ = ["ByteTokenizer"]


class ByteTokenizer:
    """UTF-8 bytes as tokens: ``encode`` never fails, ``decode`` replaces invalid sequences.

    In a prepared dataset (:mod:`transformer_jax.data.prepare`) the NUL byte, id 0, ends each
    document: text sources never contain it (a NUL byte marks a binary file and is refused), so
    the separator costs no vocabulary entry and the model stays the byte-level one.
    """

    kind = "byte"
    vocab_size = 256
    eot_id = 0

    def encode(self, text: str) -> np.ndarray:
        """str -> [T] uint8 token ids."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """:meth:`encode` of each text."""
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        """[T] ids in [0, 256) -> str (invalid UTF-8, e.g. a cut multi-byte char, becomes U+FFFD)."""
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() > 255):
            raise ValueError(f"byte token ids must lie in [0, 256), got [{ids.min()}, {ids.max()}]")
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        """[V] bytes of text each id stands for (the separator: 0)."""
        lengths = np.ones(self.vocab_size, np.int64)
        lengths[self.eot_id] = 0
        return lengths

    def to_json(self) -> str:
        """The ``tokenizer.json`` of a byte-level dataset (read back by ``load_tokenizer``)."""
        return json.dumps({"type": self.kind, "vocab_size": self.vocab_size,
                           "eot_id": self.eot_id})
