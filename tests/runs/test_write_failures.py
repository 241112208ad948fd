"""Files of a run that cannot be written: one line that names the file, the cause and the remedy.

A full disk is real where the test may mount a small tmpfs (root, as in CI); elsewhere that case
is skipped and the ``injected`` cases, which raise ``OSError(ENOSPC)`` inside the writers, still
run. A checkpoint or ``metrics.jsonl`` that cannot be written is an error (the last good
checkpoint intact, orbax's thread tracebacks kept out of the log); TensorBoard events are a
warning.
"""

import asyncio
import errno
import gc
import logging
import os
import subprocess
import time
import warnings

import numpy as np
import pytest

from transformer_jax.runs import metrics, rundir
from transformer_jax.runs.checkpoint import Checkpointer, CheckpointWriteError

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs mounted for the test, or a skip where mounting is not allowed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
                             capture_output=True, check=False).returncode == 0
    if not mounted:
        pytest.skip("cannot mount a tmpfs here (not root); the injected cases cover the logic")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def fill(disk, leave=40_000):
    """Fill ``disk`` up to ``leave`` free bytes with one file."""
    st = os.statvfs(disk)
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))


def _state(i):
    return {"w": np.full((300, 300), i, np.float32), "step": np.int32(i)}  # 360 kB


@pytest.mark.parametrize("how", ["tmpfs", "injected"])
def test_an_unwritable_checkpoint_is_one_error_and_the_last_good_one_stays(
        how, tmp_path, request, monkeypatch, caplog):
    if how == "tmpfs":
        disk = request.getfixturevalue("small_disk")

        def make_full():
            fill(disk)
    else:
        disk = tmp_path
        from orbax.checkpoint._src.path import atomicity

        real_finalize = atomicity.AtomicRenameTemporaryPath.finalize

        async def finalize(self, *a, **kw):  # the publishing rename, in orbax's save thread
            if self._final_path.name == "2":
                raise ENOSPC
            return await real_finalize(self, *a, **kw)

        def make_full():
            monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize)
    ckpts = disk / "checkpoints"
    with Checkpointer(ckpts, cleanup_tmp=True) as ckpt:
        ckpt.save(1, _state(1))
        ckpt.wait()
        make_full()
        with pytest.raises(CheckpointWriteError) as caught:
            ckpt.save(2, _state(2))  # async: the failure surfaces at the next save or wait
            ckpt.wait()
    message = str(caught.value)
    assert "\n" not in message
    for words in ("checkpoint step 2", str(ckpts), "no space left on the device",
                  "step 1, is intact", "Free space there", "run the same command to resume"):
        assert words in message, words
    # orbax logged the failure with tracebacks from its threads: none of it reached a handler
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert not [f for f in logging.getLogger("absl").filters if type(f).__name__ ==
                "_OrbaxErrors"]  # the filter lives as long as the checkpointer
    # orbax's futures holding the same error are logged by asyncio when collected, maybe at
    # exit: those stay out too, while an unrelated unretrieved future is still logged.
    _collect_unretrieved(ValueError(f"Failed writing: {ckpts}/2.orbax-checkpoint-tmp/d/1"))
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    _collect_unretrieved(ValueError("some other failure"))
    assert [r.getMessage().split("\n")[0] for r in caplog.records if r.name == "asyncio"] == [
        "Future exception was never retrieved"], caplog.text
    (disk / "filler").unlink(missing_ok=True)
    monkeypatch.undo()
    with Checkpointer(ckpts) as ckpt:  # the last good checkpoint is intact and restorable
        assert ckpt.all_steps() == [1]
        restored = ckpt.restore(None)
    assert restored.step == 1
    np.testing.assert_array_equal(restored.state["w"], _state(1)["w"])


def _collect_unretrieved(error):
    """Garbage-collect an asyncio future whose exception nobody retrieved (as orbax leaves)."""
    loop = asyncio.new_event_loop()
    try:
        future = loop.create_future()
        future.set_exception(error)
        del future
        gc.collect()
    finally:
        loop.close()


def test_a_reader_leaves_a_save_in_flight_alone(tmp_path):
    in_flight = tmp_path / "2.orbax-checkpoint-tmp-123"  # another process is writing it
    in_flight.mkdir()
    with Checkpointer(tmp_path) as reader:  # sample, translate, visualize
        assert reader.all_steps() == []
    time.sleep(0.5)  # orbax removes leftovers in a background thread
    assert in_flight.is_dir()
    with Checkpointer(tmp_path, cleanup_tmp=True) as writer:  # the run's, holding its lock
        writer.save(1, _state(1))  # a save waits for the removal
    assert not in_flight.exists()


RECORD = {"step": 2, "loss": 1.0, "lr": 1e-3, "tokens_per_s": 10.0, "mfu": 0.1}


def test_metrics_jsonl_on_a_full_disk_is_one_error_and_a_resume_never_cuts_it(small_disk):
    with metrics.MetricsWriter(small_disk, tensorboard=False) as w:
        w.write({**RECORD, "step": 1})
        w.write(RECORD)
    before = (small_disk / "metrics.jsonl").read_text()
    fill(small_disk, leave=0)
    # A resume rewrites the log without the lines after its checkpoint: atomically.
    with pytest.raises(rundir.OutputError) as caught:
        metrics.MetricsWriter(small_disk, tensorboard=False, resume_step=1)
    assert (small_disk / "metrics.jsonl").read_text() == before
    message = str(caught.value)
    assert str(small_disk / "metrics.jsonl") in message
    assert "no space left on the device" in message and "Free space" not in message
    assert "free space there, then run the same command" in message


def test_tensorboard_events_that_cannot_be_written_are_one_warning(tmp_path, monkeypatch):
    from tensorboardX.event_file_writer import EventsWriter

    with metrics.MetricsWriter(tmp_path) as w:
        w.write({**RECORD, "step": 1})

        def full(self, event):
            raise ENOSPC

        monkeypatch.setattr(EventsWriter, "write_event", full)
        with pytest.warns(RuntimeWarning) as caught:
            w.write({**RECORD, "step": 2})
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # one warning, not one per line
            for step in range(3, 6):
                w.write({**RECORD, "step": step})
    assert len(caught) == 1
    text = str(caught[0].message)
    assert str(tmp_path / "tensorboard") in text and "no space left on the device" in text
    assert "goes on" in text
    assert [r["step"] for r in metrics.read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("error, why", [
    (ENOSPC, "no space left on the device"),
    (OSError(errno.EROFS, os.strerror(errno.EROFS)), "read-only filesystem"),
    (PermissionError(errno.EACCES, os.strerror(errno.EACCES)), "permission denied"),
    # tensorstore, orbax's array writer, reports the C library's text in a ValueError
    (ValueError('RESOURCE_EXHAUSTED: Error writing "opt_state/0": Failed to write 4 bytes: '
                "No space left on device [os_error_code='28']"), "no space left on the device"),
    (ValueError("something else"), "ValueError: something else"),
])
def test_why_not_written_names_the_cause(error, why):
    assert rundir.why_not_written(error)[0] == why
