"""Synthetic tasks, generated from a seed (nothing is downloaded).

Long-range dependencies — the copying-memory problem (Hochreiter & Schmidhuber 1997;
Arjovsky et al. 2016), as a language-modelling task: ``m`` random symbols, a stretch of blanks,
a delimiter, then the same ``m`` symbols again. Each symbol of the second copy can only be
predicted from its first occurrence exactly ``distance`` positions earlier. Self-attention
connects the two in one step (path length O(1), Table 1 of the paper); a recurrent network has
to carry the symbol through ``distance`` state updates.

Every batch is a pure function of (seed, step), so training on it is reproducible and resumable.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["CopyTask"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class CopyTask:
    """The copying-memory task at a given distance.

    Token ids: 0 is the blank, 1 the delimiter, 2 … 2 + num_symbols - 1 the symbols.

    Attributes:
      distance: positions between a symbol and its copy (> num_symbols).
      num_symbols: m, symbols to remember per sequence.
      alphabet: distinct symbols (chance accuracy is 1 / alphabet).
    """

    distance: int
    num_symbols: int = 4
    alphabet: int = 8

    BLANK = 0
    DELIMITER = 1

    def __post_init__(self):
        if self.num_symbols < 1 or self.alphabet < 2:
            raise ValueError(f"need num_symbols ≥ 1 and alphabet ≥ 2, got {self}")
        if self.distance <= self.num_symbols:
            raise ValueError(
                f"distance must exceed num_symbols={self.num_symbols}, got {self.distance}"
            )

    @property
    def vocab_size(self) -> int:
        return 2 + self.alphabet

    @property
    def seq_len(self) -> int:
        """T of the model inputs (the full sequence minus its last token)."""
        return self.distance + self.num_symbols - 1

    def batch(self, seed: int, step: int, batch_size: int) -> dict[str, np.ndarray]:
        """One batch; a pure function of (seed, step).

        Returns:
          ``inputs`` int32 [B, T], ``targets`` int32 [B, T] (next tokens) and ``weights``
          float32 [B, T]: 1 on the m positions whose target is a recalled symbol, else 0.
        """
        rng = np.random.default_rng([seed, step])
        m, d = self.num_symbols, self.distance
        symbols = rng.integers(2, 2 + self.alphabet, size=(batch_size, m), dtype=np.int32)
        full = np.full((batch_size, d + m), self.BLANK, np.int32)
        full[:, :m] = symbols
        full[:, d - 1] = self.DELIMITER
        full[:, d:] = symbols  # symbol i sits at i and at i + d
        weights = np.zeros((batch_size, d + m - 1), np.float32)
        weights[:, d - 1:] = 1.0  # inputs at d-1 … d+m-2 predict the copies at d … d+m-1
        return {"inputs": full[:, :-1], "targets": full[:, 1:], "weights": weights}
