"""Tokenizers. :class:`ByteTokenizer`: UTF-8 bytes are the tokens (V = 256); nothing to train or
download, and every string encodes.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ByteTokenizer"]


class ByteTokenizer:
    """UTF-8 bytes as tokens: ``encode`` never fails, ``decode`` replaces invalid sequences."""

    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        """str -> [T] uint8 token ids."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()

    def decode(self, ids) -> str:
        """[T] ids in [0, 256) -> str (invalid UTF-8, e.g. a cut multi-byte char, becomes U+FFFD)."""
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() > 255):
            raise ValueError(f"byte token ids must lie in [0, 256), got [{ids.min()}, {ids.max()}]")
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
