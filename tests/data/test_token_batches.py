"""Batches by token count: the buckets against brute force and plain loops, each batch a pure
function of (seed, step), every pair seen once an epoch, the real-token share as predicted."""

import itertools

import numpy as np
import pytest

from transformer_jax.data import DataError
from transformer_jax.data import token_batches as tb
from transformer_jax.data.pair_dataset import open_pairs
from transformer_jax.data.pair_files import pair_files
from transformer_jax.data.prepare_pairs import PairSettings, prepare_pairs

SPECIAL = {"pad_id": 0, "bos_id": 1, "eos_id": 2}


class ArraySplit:
    """A split held in memory: pair i is (arange-like source, target) of the given lengths."""

    def __init__(self, lengths, seed=0):
        rng = np.random.default_rng(seed)
        self.lengths = np.asarray(lengths, np.uint16)
        self.src = [rng.integers(3, 50, n) for n in self.lengths[:, 0]]
        self.tgt = [rng.integers(3, 50, n) for n in self.lengths[:, 1]]
        self.read = []

    def pairs(self, index):
        self.read.append(np.asarray(index).copy())
        return [self.src[i] for i in index], [self.tgt[i] for i in index]


def _lengths(n, seed=0):
    rng = np.random.default_rng(seed)
    src = np.clip(rng.lognormal(2.3, 0.6, n).astype(int), 1, 120)
    return np.stack([src, np.clip((src * rng.uniform(0.8, 1.4, n)).astype(int), 1, 130)], 1)


@pytest.fixture(scope="module")
def split():
    return ArraySplit(_lengths(3000))


def test_geometric_boundaries_grow_by_the_factor_or_by_one():
    b = tb.geometric_boundaries(200, 4, 1.1)
    assert b[0] == 4 and b[-1] == 200 and np.all(np.diff(b) >= 1)
    for lo, hi in itertools.pairwise(b[:-1]):
        assert hi == max(lo + 1, int(lo * 1.1))


def test_optimal_boundaries_match_brute_force():
    rng = np.random.default_rng(1)
    keys = rng.integers(1, 10, 40)
    top = int(keys.max())

    def slots(bounds):
        return sum(2 * bounds[np.searchsorted(bounds, k)] + 2 for k in keys)

    for k in (1, 2, 3):
        brute = min(slots(np.asarray([*c, top])) for c in
                    itertools.combinations(range(1, top), k - 1))
        assert slots(tb.optimal_boundaries(keys, k)) == brute


def test_plan_puts_each_pair_in_the_bucket_of_its_length(split):
    plan = tb.plan_batches(split.lengths, 2000, row_multiple=4)
    keys = split.lengths.max(1)
    members = np.concatenate(plan.members)
    assert sorted(members.tolist()) == list(range(len(keys)))
    lower = np.concatenate([[0], plan.boundaries[:-1]])
    for k, m in enumerate(plan.members):
        assert np.all(keys[m] <= plan.boundaries[k]) and np.all(keys[m] > lower[k])
        assert len(m) >= plan.rows[k] or len(plan.members) == 1  # no bucket below one batch
    assert np.all(plan.rows % 4 == 0) and np.all(plan.rows * (plan.boundaries + 1) <= 2000)
    assert plan.shapes() == [(int(r), int(2 * b + 2)) for r, b in zip(plan.rows,
                                                                        plan.boundaries)]


def test_batches_are_a_pure_function_of_seed_and_step(split):
    plan = tb.plan_batches(split.lengths, 2000, row_multiple=4)
    n = plan.batches_per_epoch
    steps = [0, 3, n - 1, n, 2 * n + 5, 3]
    first = [tb.train_batch(split, plan, seed=7, step=s, **SPECIAL) for s in steps]
    fresh = tb.plan_batches(split.lengths, 2000, row_multiple=4)
    for s, want in reversed(list(zip(steps, first))):  # another order, another plan object
        np.testing.assert_array_equal(tb.train_batch(split, fresh, seed=7, step=s, **SPECIAL),
                                      want)
    other = [plan.batch_pairs(8, s)[1][:4].tolist() for s in range(5)]
    assert other != [plan.batch_pairs(7, s)[1][:4].tolist() for s in range(5)]
    # Host shares: each host reads only its rows, and together they are the batch.
    _, index = plan.batch_pairs(7, 3)
    rows = len(index) // 2
    split.read.clear()
    halves = [tb.train_batch(split, plan, seed=7, step=3, rows=slice(h * rows, (h + 1) * rows),
                             **SPECIAL) for h in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves), first[1])
    assert [len(r) for r in split.read] == [rows, rows]


def test_an_epoch_sees_every_pair_and_its_padding_share_is_predicted(split):
    plan = tb.plan_batches(split.lengths, 2000)
    seen, real, slots = [], 0, 0
    for s in range(plan.batches_per_epoch, 2 * plan.batches_per_epoch):  # epoch 1
        bucket, index = plan.batch_pairs(3, s)
        seen.append(index)
        batch = tb.train_batch(split, plan, seed=3, step=s, **SPECIAL)
        assert batch.shape == plan.shapes()[bucket]
        real, slots = real + (batch != 0).sum(), slots + batch.size
    seen = np.concatenate(seen)
    assert set(seen.tolist()) == set(range(len(split.lengths)))
    assert len(seen) - len(split.lengths) < plan.rows.sum()  # only the wrap-around repeats
    assert real / slots == pytest.approx(plan.real_share, abs=0.01)
    assert plan.real_share >= 0.85


def test_pack_pairs_against_a_plain_loop(split):
    srcs, tgts = split.pairs([0, 1, 2])
    length = int(max(max(len(s), len(t)) for s, t in zip(srcs, tgts)))
    got = tb.pack_pairs(srcs, tgts, length, **SPECIAL)
    for row, s, t in zip(got, srcs, tgts):
        want = [*s, *[0] * (length - len(s)), 1, *t, 2, *[0] * (length - len(t))]
        assert row.tolist() == want
    assert tb.source_length(got) == length


def test_eval_batches_hold_every_pair_once(split):
    plan = tb.plan_batches(split.lengths, 2000)
    rows = [row for batch in tb.eval_batches(split, plan, **SPECIAL) for row in batch
            if row.any()]
    assert len(rows) == len(split.lengths)
    firsts = list(tb.eval_batches(split, plan, max_pairs=100, **SPECIAL))
    assert sum(int(b.any(1).sum()) for b in firsts) == 100


def test_too_few_tokens_for_the_longest_pair_is_refused(split):
    with pytest.raises(DataError, match="--batch-tokens 20 cannot hold"):
        tb.plan_batches(split.lengths, 20)
    with pytest.raises(DataError, match="no pairs"):
        tb.plan_batches(np.zeros((0, 2), np.uint16), 100)


def test_on_a_prepared_dataset(tmp_path):
    rng = np.random.default_rng(0)
    words = ["ab", "cd", "ef", "gh", "ij", "kl", "mn"]
    pairs = {}
    while len(pairs) < 300:
        s = " ".join(rng.choice(words, rng.integers(1, 15)))
        pairs[s] = s.upper()
    (tmp_path / "a.src").write_text("".join(s + "\n" for s in pairs))
    (tmp_path / "a.tgt").write_text("".join(t + "\n" for t in pairs.values()))
    prepare_pairs(pair_files([tmp_path / "a.src", tmp_path / "a.tgt"]), tmp_path / "ds",
                  PairSettings(vocab_size=300, valid_fraction=0.1, test_fraction=0.1),
                  log=lambda m: None)
    ds = open_pairs(tmp_path / "ds")
    plan = tb.plan_batches(ds.train.lengths, 200)
    batch = tb.train_batch(ds.train, plan, seed=0, step=0, pad_id=ds.pad_id, bos_id=ds.bos_id,
                           eos_id=ds.eos_id)
    length = tb.source_length(batch)
    for row in batch:
        src = ds.tokenizer.decode(row[:length][row[:length] != ds.pad_id])
        assert ds.detokenize(row[length + 1:]) == pairs[src]
