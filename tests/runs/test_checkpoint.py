"""Checkpointer: exact round trip, retention, and falling back past unrestorable steps."""

import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax.runs.checkpoint import Checkpointer, CheckpointError


def _state(step):
    return {"params": {"w": jnp.arange(6.0).reshape(2, 3) * step, "b": jnp.full((3,), -step * 1.0)},
            "step": jnp.asarray(step, jnp.int32), "rng": jax.random.PRNGKey(step)}


def _abstract():
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        _state(0))


def _assert_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def _truncate_files(folder, keep=0.0):
    """Cut every file to ``keep`` of its length (what a copy or a full disk cut short leaves)."""
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            os.truncate(path, int(os.path.getsize(path) * keep))


def test_round_trip_is_exact_and_keeps_the_newest(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        for step in (1, 2, 3):
            assert ckpt.save(step, _state(step), {"step": step, "note": "x"})
        assert not ckpt.save(3, _state(99))  # already saved: nothing happens
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [2, 3]
        restored = ckpt.restore(_abstract())
    assert restored.step == 3 and restored.meta == {"step": 3, "note": "x"}
    _assert_equal(restored.state, _state(3))
    assert isinstance(restored.state["params"]["w"], jax.Array)


def test_saved_state_is_a_copy_unaffected_by_later_donation(tmp_path):
    state = _state(5)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(5, state)
        jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)(state)
    with Checkpointer(tmp_path) as ckpt:
        _assert_equal(ckpt.restore(_abstract()).state, _state(5))


def test_empty_directory_restores_none(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.restore(_abstract()) is None


def _truncate_largest(folder):
    """Halve the biggest file (the array data) and leave every metadata file intact."""
    sizes = {os.path.join(r, n): os.path.getsize(os.path.join(r, n))
             for r, _, files in os.walk(folder) for n in files}
    path = max(sizes, key=sizes.get)
    os.truncate(path, sizes[path] // 2)


@pytest.mark.parametrize("corrupt", ["bare folder", "truncated files", "half-written files",
                                     "truncated array data"])
def test_unrestorable_latest_falls_back_with_a_warning(tmp_path, corrupt):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, _state(1))
        ckpt.save(2, _state(2))
    if corrupt == "bare folder":  # orbax lists it as a step, but it holds nothing
        (tmp_path / "7").mkdir()
        bad, good = 7, 2
    else:
        if corrupt == "truncated array data":
            _truncate_largest(tmp_path / "2")
        else:
            _truncate_files(tmp_path / "2", keep=0.5 if corrupt == "half-written files" else 0.0)
        bad, good = 2, 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Checkpointer(tmp_path) as ckpt:
            assert bad in ckpt.all_steps()
            restored = ckpt.restore(_abstract())
            # The bad folder is set aside, so the run can save that step again.
            assert bad not in ckpt.all_steps()
            assert ckpt.save(bad, _state(bad))
    assert restored.step == good
    _assert_equal(restored.state, _state(good))
    messages = [str(w.message) for w in caught]
    assert any(f"step {bad}" in m and "falling back" in m for m in messages)
    assert (tmp_path / f"{bad}.unrestorable").is_dir()


def test_interrupted_save_leftovers_are_ignored(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, _state(1))
    (tmp_path / "2.orbax-checkpoint-tmp-123").mkdir()  # what a SIGKILL mid-save leaves
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 1
        assert ckpt.restore(_abstract()).step == 1


def test_nothing_restorable_is_an_error(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, _state(1))
    _truncate_files(tmp_path / "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Checkpointer(tmp_path) as ckpt, pytest.raises(CheckpointError, match="step 1"):
            ckpt.restore(_abstract())
