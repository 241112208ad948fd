"""The batches the training loop sees, as pure functions of their position.

* :func:`train_batches`: random crops, a pure function of ``(seed, step)``, so a resumed run sees
  exactly the batches an uninterrupted run would have seen, whatever the number of hosts.
* :func:`eval_batches`: the validation split cut into consecutive windows, each byte predicted
  exactly once; the last batch is padded with :data:`IGNORE` targets.

A batch is one int32 array ``[B, T + 1]``: inputs are ``batch[:, :-1]``, targets ``batch[:, 1:]``;
padding (validation only) is :data:`IGNORE` in both roles.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from transformer_jax.data.corpus import DataError

__all__ = ["IGNORE", "check_length", "eval_batches", "num_eval_windows", "train_batches"]

IGNORE = -1
"""Target id of padding positions; the loss gives them zero weight (never a real byte)."""

# Mixed into every data seed so the data stream never coincides with another use of the seed.
_DATA_STREAM = 0x64617461  # "data"


def check_length(tokens: np.ndarray, seq_len: int, split: str, unit: str = "bytes") -> None:
    """Raise :class:`DataError` unless ``tokens`` holds at least one window of ``seq_len + 1``."""
    if len(tokens) < seq_len + 1:
        raise DataError(
            f"the {split} split has {len(tokens)} {unit}, fewer than seq_len + 1 = {seq_len + 1}; "
            "use more data or a shorter --seq-len"
        )


def train_batches(tokens: np.ndarray, *, seed: int, step: int, num_steps: int,
                  batch_size: int, seq_len: int, rows: slice = slice(None)) -> np.ndarray:
    """Random crops for steps ``step .. step + num_steps - 1``.

    The crops of step ``s`` depend only on ``(seed, s)`` (a NumPy generator seeded with both), so
    asking for steps in one chunk or one at a time, before or after a resume, gives the same
    batches.

    Args:
      tokens: [n] token ids (the train split).
      seed: the run's seed.
      step: first step (the optimizer step the batch is for).
      num_steps: how many consecutive steps.
      batch_size: B, the global batch per step.
      seq_len: T.
      rows: only these rows of each global batch (a host's share in a multi-host run: the
        crops of the other rows are drawn but not read).

    Returns:
      [num_steps, B, T + 1] int32 (B restricted to ``rows``).
    """
    check_length(tokens, seq_len, "train")
    high = len(tokens) - seq_len  # exclusive bound on a window start: start + T + 1 <= n
    window = np.arange(seq_len + 1)
    starts = np.stack([
        np.random.default_rng([_DATA_STREAM, seed, s]).integers(0, high, size=batch_size)
        for s in range(step, step + num_steps)
    ])[:, rows]  # [num_steps, B]
    return tokens[starts[..., None] + window].astype(np.int32)


def num_eval_windows(n_tokens: int, seq_len: int) -> int:
    """Windows of :func:`eval_batches`: consecutive, stride T, covering bytes 1..n-1 once."""
    return -(-(n_tokens - 1) // seq_len)


def eval_batches(tokens: np.ndarray, *, batch_size: int, seq_len: int,
                 max_windows: int | None = None) -> Iterator[np.ndarray]:
    """The validation split as consecutive windows, every byte after the first predicted once.

    Window ``i`` holds ``tokens[i·T : i·T + T + 1]``; the last window and the last batch are
    padded with :data:`IGNORE`, so every batch has the same shape and the loss averages exactly
    over the real bytes. Padding only ever follows real bytes, so under a causal model it never
    influences a real prediction; the steps feed ``max(input, 0)`` to the model.

    Args:
      tokens: [n] token ids (an array, or anything indexable by a slice such as
        :class:`~transformer_jax.data.prepared.ShardedTokens`: only one batch is read at a time).
      batch_size: B of each yielded batch.
      seq_len: T.
      max_windows: evaluate only the first this many windows (``None``: all).

    Yields:
      [B, T + 1] int32 batches.
    """
    check_length(tokens, seq_len, "validation")
    n_win = num_eval_windows(len(tokens), seq_len)
    if max_windows is not None:
        n_win = min(n_win, max_windows)
    end = min(len(tokens), n_win * seq_len + 1)  # one past the last token any window holds
    cols = np.arange(seq_len + 1)
    for b0 in range(0, n_win, batch_size):  # one batch of tokens in memory at a time
        rows = min(batch_size, n_win - b0)
        lo = b0 * seq_len
        part = np.full(rows * seq_len + 1, IGNORE, np.int32)
        real = np.asarray(tokens[lo:min(end, lo + rows * seq_len + 1)])
        part[: len(real)] = real
        batch = np.full((batch_size, seq_len + 1), IGNORE, np.int32)
        batch[:rows] = part[np.arange(rows)[:, None] * seq_len + cols]
        yield batch
