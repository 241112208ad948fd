"""Batches of text pairs by token count, grouped by length: a pure function of (seed, step).

The paper batches by size, not by count: "each training batch contained a set of sentence
pairs containing approximately 25000 source tokens and 25000 target tokens" (§5.1). As in
tensor2tensor, pairs are put in length buckets whose boundaries grow geometrically (×1.1 by
default), and a batch holds pairs of one bucket only, padded to its boundary L, with
``batch_tokens // (L + 1)`` rows; so each bucket is one array shape (one compiled program),
and most slots hold real tokens. With ``num_buckets=K`` the K boundaries are instead the ones
that waste the fewest slots on the given lengths (an exact dynamic programme), for when few
programs matter more than the last percent of padding.

A pair's length is ``max(source tokens, target tokens)``. A bucket with fewer pairs than one
batch is merged into its neighbour, so no batch repeats a pair to fill its rows but the last
one of a bucket in an epoch (which wraps around to the bucket's first pairs).

Order: each epoch permutes every bucket's pairs and then the order of all the epoch's batches
with a generator seeded by ``(seed, epoch)``; step ``s`` is batch ``s mod N`` of epoch
``s // N`` (N batches an epoch). So the batch of a step depends on ``(seed, step)`` only: a
resumed run sees the batches of an uninterrupted one, and a host can read only its rows.

A batch is one int32 array ``[B, 2L + 2]`` in the layout of
:meth:`~transformer_jax.data.seq2seq_tasks.Seq2SeqTask.pack`: the source padded to L, then
``<bos>`` target ``<eos>`` padded to L + 2 (the decoder reads ``[:, L:-1]`` and predicts
``[:, L + 1:]``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from transformer_jax.data.corpus import DataError

__all__ = ["BatchPlan", "eval_batches", "geometric_boundaries", "optimal_boundaries",
           "pack_pairs", "plan_batches", "real_share", "source_length", "train_batch"]

_STREAM = 0x70616972  # "pair": this data stream's seeds never coincide with another's


def geometric_boundaries(max_length: int, min_length: int = 4,
                         growth: float = 1.1) -> np.ndarray:
    """tensor2tensor's bucket boundaries: ``min_length``, then ×``growth`` (at least +1),
    ending with ``max_length``. Returns [K] int64, increasing."""
    out, x = [], min_length
    while x < max_length:
        out.append(x)
        x = max(x + 1, int(x * growth))
    return np.asarray([*out, max_length], np.int64)


def optimal_boundaries(keys: np.ndarray, num_buckets: int) -> np.ndarray:
    """The ``num_buckets`` boundaries that minimise the slots ``sum_i (2 L(i) + 2)`` of pairs of
    length ``keys`` (an exact dynamic programme over the lengths, O(K M²) for M the longest).
    Returns [K'] int64 (K' <= K when fewer distinct lengths exist)."""
    top = int(keys.max())
    count = np.cumsum(np.bincount(keys, minlength=top + 1)).astype(np.float64)
    best = np.full((num_buckets + 1, top + 1), np.inf)
    best[0, 0] = 0.0
    arg = np.zeros((num_buckets + 1, top + 1), np.int64)
    a = np.arange(top + 1)
    for k in range(1, num_buckets + 1):
        for b in range(1, top + 1):  # the best k buckets for lengths <= b, the last ending at b
            cost = best[k - 1, :b] + (count[b] - count[a[:b]]) * (2 * b + 2)
            arg[k, b] = int(np.argmin(cost))
            best[k, b] = cost[arg[k, b]]
    used = int(np.argmin(best[1:, top])) + 1
    out, b = [], top
    for k in range(used, 0, -1):
        out.append(b)
        b = arg[k, b]
    return np.asarray(sorted(out), np.int64)


def _rows(boundary: np.ndarray, batch_tokens: int, row_multiple: int) -> np.ndarray:
    rows = batch_tokens // (boundary + 1) // row_multiple * row_multiple
    return np.maximum(rows, row_multiple)


class BatchPlan:
    """The buckets of one split: which pairs each holds and how many rows its batches have.

    Attributes:
      boundaries: [K] int64, bucket k holds the pairs whose length (max of the two sides)
        lies in ``(boundaries[k - 1], boundaries[k]]``; its batches are ``[rows[k],
        2 boundaries[k] + 2]``.
      rows: [K] int64, rows per batch of each bucket (a multiple of ``row_multiple``).
      members: K arrays of pair indices, ascending.
      batches_per_epoch: N, the batches of one pass over the pairs.
      real_share: the expected share of an epoch's token slots that hold real tokens
        (``<bos>`` and ``<eos>`` count as real: the model reads or predicts them).
    """

    def __init__(self, lengths: np.ndarray, boundaries: np.ndarray, batch_tokens: int,
                 row_multiple: int):
        keys = lengths.max(axis=1)  # the lengths' dtype: 2 bytes a pair, not 8
        lower = np.concatenate([[-1], boundaries[:-1]])
        members = [np.flatnonzero((keys > lo) & (keys <= hi)).astype(np.int32)
                   for lo, hi in zip(lower, boundaries)]
        del keys
        keep = [k for k, m in enumerate(members) if len(m)]
        bounds, members = list(boundaries[keep]), [members[k] for k in keep]
        k = 0
        while len(bounds) > 1 and k < len(bounds):  # merge buckets smaller than one batch
            if len(members[k]) >= _rows(np.int64(bounds[k]), batch_tokens, row_multiple):
                k += 1
                continue
            j = k + 1 if k + 1 < len(bounds) else k - 1
            lo, hi = min(j, k), max(j, k)
            bounds[lo:hi + 1] = [bounds[hi]]
            members[lo:hi + 1] = [np.sort(np.concatenate([members[lo], members[hi]]))]
            k = max(lo - 1, 0)
        self.boundaries = np.asarray(bounds, np.int64)
        self.rows = _rows(self.boundaries, batch_tokens, row_multiple)
        self.members = members
        self.chunks = np.asarray([-(-len(m) // r) for m, r in zip(members, self.rows)], np.int64)
        self.batches_per_epoch = int(self.chunks.sum())
        # Every row holds a pair (the last batch of a bucket wraps around): a row's expected
        # real tokens are its bucket's mean.
        mean = np.asarray([lengths[m].sum(dtype=np.int64) / len(m) + 2 for m in members])
        rows_per_epoch = self.chunks * self.rows
        self.real_share = float((rows_per_epoch * mean).sum()
                                / (rows_per_epoch * (2 * self.boundaries + 2)).sum())
        self._epoch: tuple[tuple[int, int], list[np.ndarray], np.ndarray] | None = None

    def shapes(self) -> list[tuple[int, int]]:
        """The ``[B, 2L + 2]`` shape of each bucket's batches (one compiled program each)."""
        return [(int(r), int(2 * b + 2)) for r, b in zip(self.rows, self.boundaries)]

    def _order(self, seed: int, epoch: int) -> tuple[list[np.ndarray], np.ndarray]:
        """Epoch ``epoch``'s batches: per bucket [chunks, rows] pair indices, and [N, 2]
        (bucket, chunk) in the epoch's order. The last epoch asked for is kept."""
        if self._epoch is None or self._epoch[0] != (seed, epoch):
            rng = np.random.default_rng([_STREAM, seed, epoch])
            grids = [np.resize(m[rng.permutation(len(m))], (c, r))  # wraps around to fill
                     for m, c, r in zip(self.members, self.chunks, self.rows)]
            table = np.concatenate([np.stack([np.full(c, k), np.arange(c)], 1)
                                    for k, c in enumerate(self.chunks)])
            self._epoch = ((seed, epoch), grids, table[rng.permutation(len(table))])
        return self._epoch[1], self._epoch[2]

    def batch_pairs(self, seed: int, step: int) -> tuple[int, np.ndarray]:
        """(bucket, [rows] pair indices) of step ``step``: a pure function of (seed, step)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        grids, table = self._order(seed, step // self.batches_per_epoch)
        bucket, chunk = table[step % self.batches_per_epoch]
        return int(bucket), grids[bucket][chunk]


def plan_batches(lengths: np.ndarray, batch_tokens: int, *, growth: float = 1.1,
                 min_length: int = 4, num_buckets: int | None = None,
                 row_multiple: int = 1) -> BatchPlan:
    """Bucket the pairs of a split (its ``lengths``) for batches of about ``batch_tokens``.

    Args:
      lengths: [n, 2] source and target tokens of each pair
        (:attr:`~transformer_jax.data.pair_dataset.PairSplit.lengths`).
      batch_tokens: slots per side of a batch: ``rows × (L + 1)`` stays at or below it.
      growth, min_length: the geometric boundaries (tensor2tensor's ×1.1).
      num_buckets: instead, the K boundaries that waste the fewest slots.
      row_multiple: rows per batch are a multiple of this (the devices × hosts the batch is
        split over).

    Raises:
      DataError: no pairs, or a ``batch_tokens`` too small for the longest pair.
    """
    lengths = np.asarray(lengths)
    if not len(lengths):
        raise DataError("the split holds no pairs to batch")
    top = int(lengths.max())
    if batch_tokens < row_multiple * (top + 1):
        raise DataError(f"--batch-tokens {batch_tokens} cannot hold {row_multiple} row(s) of "
                        f"the longest pair ({top} tokens + <bos>/<eos>); raise it to at least "
                        f"{row_multiple * (top + 1)}")
    keys = lengths.max(axis=1).astype(np.int64)
    bounds = (optimal_boundaries(keys, num_buckets) if num_buckets else
              geometric_boundaries(top, min(min_length, top), growth))
    return BatchPlan(lengths, bounds, batch_tokens, row_multiple)


def pack_pairs(sources: Sequence[np.ndarray], targets: Sequence[np.ndarray], length: int, *,
               pad_id: int, bos_id: int, eos_id: int) -> np.ndarray:
    """[B, 2L + 2] int32: each source padded to L | ``<bos>`` target ``<eos>`` padded."""
    out = np.full((len(sources), 2 * length + 2), pad_id, np.int32)
    for b, (src, tgt) in enumerate(zip(sources, targets)):
        out[b, :len(src)] = src
        out[b, length] = bos_id
        out[b, length + 1:length + 1 + len(tgt)] = tgt
        out[b, length + 1 + len(tgt)] = eos_id
    return out


def source_length(batch: np.ndarray) -> int:
    """L, the source width of a ``[B, 2L + 2]`` batch."""
    return (batch.shape[-1] - 2) // 2


def train_batch(split, plan: BatchPlan, *, seed: int, step: int, pad_id: int, bos_id: int,
                eos_id: int, rows: slice = slice(None)) -> np.ndarray:
    """The training batch of ``step``: [B, 2L + 2] int32 (B restricted to ``rows``).

    Args:
      split: a :class:`~transformer_jax.data.pair_dataset.PairSplit` (anything with
        ``pairs(index) -> (sources, targets)``).
      plan: :func:`plan_batches` of ``split.lengths``.
      seed, step: what the batch is a pure function of.
      pad_id, bos_id, eos_id: the dataset's special ids.
      rows: only these rows of the global batch (a host's share: only they are read).
    """
    bucket, index = plan.batch_pairs(seed, step)
    sources, targets = split.pairs(index[rows])
    return pack_pairs(sources, targets, int(plan.boundaries[bucket]), pad_id=pad_id,
                      bos_id=bos_id, eos_id=eos_id)


def eval_batches(split, plan: BatchPlan, *, pad_id: int, bos_id: int, eos_id: int,
                 max_pairs: int | None = None) -> Iterator[np.ndarray]:
    """Every pair of ``split`` (or its first ``max_pairs``) once, bucket by bucket in the
    plan's shapes; the last batch of a bucket is filled with all-``pad_id`` rows (no target
    token: the loss gives them no weight)."""
    for bucket, members in enumerate(plan.members):
        members = members[members < max_pairs] if max_pairs is not None else members
        r, length = int(plan.rows[bucket]), int(plan.boundaries[bucket])
        for a in range(0, len(members), r):
            sources, targets = split.pairs(members[a:a + r])
            out = np.full((r, 2 * length + 2), pad_id, np.int32)
            out[:len(sources)] = pack_pairs(sources, targets, length, pad_id=pad_id,
                                            bos_id=bos_id, eos_id=eos_id)
            yield out


def real_share(batch: np.ndarray, pad_id: int) -> float:
    """The share of a batch's slots that hold real tokens (``<bos>``/``<eos>`` included)."""
    return float((batch != pad_id).mean())
