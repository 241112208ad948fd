"""Shared by the parallel-corpus tests: a small prepared dataset whose target is the source
reversed, written by the test itself (never the machine's catalogs)."""

from pathlib import Path

import numpy as np

from transformer_jax.data.pair_files import pair_files
from transformer_jax.data.prepare_pairs import PairSettings, prepare_pairs


def prepare_reversal(root: Path, words, count: int, length, vocab_size: int) -> Path:
    """``count`` distinct pairs of ``length(rng)`` words each, as aligned files under ``root``,
    prepared into ``root / "ds"`` (10% validation, 10% test); returns that folder."""
    rng = np.random.default_rng(0)
    pairs = {}
    while len(pairs) < count:
        src = " ".join(rng.choice(words, length(rng)))
        pairs[src] = " ".join(reversed(src.split()))
    (root / "a.en").write_text("".join(s + "\n" for s in pairs), encoding="utf-8")
    (root / "a.de").write_text("".join(t + "\n" for t in pairs.values()), encoding="utf-8")
    prepare_pairs(pair_files([root / "a.en", root / "a.de"]), root / "ds",
                  PairSettings(vocab_size=vocab_size, valid_fraction=0.1, test_fraction=0.1),
                  log=lambda message: None)
    return root / "ds"
