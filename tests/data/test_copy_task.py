"""Synthetic tasks: deterministic per (seed, step), and the structure the task promises."""

import numpy as np
import pytest

from transformer_jax.data.copy_task import CopyTask


@pytest.mark.parametrize("distance", [5, 16, 64])
def test_copy_task_structure(distance):
    task = CopyTask(distance=distance, num_symbols=4, alphabet=8)
    b = task.batch(seed=0, step=3, batch_size=5)
    full = np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1)
    assert b["inputs"].shape == b["targets"].shape == b["weights"].shape == (5, task.seq_len)
    np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])  # next tokens
    symbols = full[:, :4]
    assert symbols.min() >= 2 and symbols.max() < task.vocab_size
    # Every weighted target is the symbol exactly `distance` positions before it.
    t_idx = np.nonzero(b["weights"][0])[0]
    assert len(t_idx) == 4
    np.testing.assert_array_equal(b["targets"][:, t_idx], full[:, t_idx + 1 - distance])
    assert (full[:, 4:distance - 1] == CopyTask.BLANK).all()
    assert (full[:, distance - 1] == CopyTask.DELIMITER).all()


def test_copy_task_is_a_pure_function_of_seed_and_step():
    task = CopyTask(distance=16)
    a, b = task.batch(1, 7, 4), task.batch(1, 7, 4)
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    assert not np.array_equal(a["inputs"], task.batch(1, 8, 4)["inputs"])
    assert not np.array_equal(a["inputs"], task.batch(2, 7, 4)["inputs"])


def test_copy_task_rejects_impossible_settings():
    with pytest.raises(ValueError, match="distance must exceed"):
        CopyTask(distance=4, num_symbols=4)
    with pytest.raises(ValueError, match="alphabet"):
        CopyTask(distance=10, alphabet=1)
