"""The run directory's lock: one run per directory; a lock left by a dead run never blocks.

The holders are real processes: a child Python that takes the lock and waits, then is killed
with SIGKILL (the kernel drops its ``flock``; the file with its pid stays behind).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from transformer_jax.parallel import distributed
from transformer_jax.runs import lock

ROOT = Path(__file__).resolve().parents[2]

HOLDER = """
import sys, time
from transformer_jax.parallel import distributed
from transformer_jax.runs import lock
with lock.hold(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    """Start a child process that holds the lock on a directory; yields (process, directory)."""
    procs = []

    def start(run_dir):
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], cwd=ROOT,
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_second_holder_is_refused_with_the_holder_named(tmp_path, holder):
    run_dir = tmp_path / "run"
    proc = holder(run_dir)
    (run_dir / "metrics.jsonl").write_text("first run\n")
    with pytest.raises(lock.RunLocked) as caught, lock.hold(run_dir):
        pytest.fail("two holders")
    message = str(caught.value)
    assert "\n" not in message
    for words in (f"pid {proc.pid}", f"host {socket.gethostname()}", "started 20",
                  "heartbeat", "another --out", f"delete {run_dir / '.lock'}"):
        assert words in message, words
    assert (run_dir / "metrics.jsonl").read_text() == "first run\n"  # nothing touched
    assert json.loads((run_dir / ".lock").read_text())["pid"] == proc.pid


def test_a_lock_left_by_a_killed_run_is_taken_over_with_one_warning(tmp_path, holder):
    run_dir = tmp_path / "run"
    proc = holder(run_dir)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((run_dir / ".lock").read_text())["pid"] == proc.pid  # left behind
    with pytest.warns(RuntimeWarning) as caught, lock.hold(run_dir):
        assert json.loads((run_dir / ".lock").read_text())["pid"] == os.getpid()
    assert len(caught) == 1
    assert f"pid {proc.pid}" in str(caught[0].message)
    assert "no longer runs" in str(caught[0].message)
    assert not (run_dir / ".lock").exists()  # released: removed


def _foreign_lock(run_dir, age_s):
    """A lock file written by a run on another host, last refreshed ``age_s`` ago."""
    run_dir.mkdir()
    path = run_dir / ".lock"
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "2026-01-01T00:00"}))
    then = time.time() - age_s
    os.utime(path, (then, then))


def test_another_hosts_lock_holds_while_its_heartbeat_is_fresh(tmp_path):
    _foreign_lock(tmp_path / "run", age_s=lock.HEARTBEAT_S)
    with pytest.raises(lock.RunLocked, match="pid 1 on host elsewhere"), \
            lock.hold(tmp_path / "run"):
        pass


def test_another_hosts_lock_with_a_stale_heartbeat_is_taken_over(tmp_path):
    _foreign_lock(tmp_path / "run", age_s=lock.STALE_S + 60)
    with pytest.warns(RuntimeWarning, match="heartbeat stopped"), lock.hold(tmp_path / "run"):
        pass


def test_the_holder_refreshes_its_heartbeat(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, "HEARTBEAT_S", 0.05)
    path = tmp_path / "run" / ".lock"
    with lock.hold(tmp_path / "run"):
        os.utime(path, (0, 0))
        deadline = time.monotonic() + 10
        while os.stat(path).st_mtime == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert os.stat(path).st_mtime > time.time() - 60


def test_one_claim_per_process_and_release_all_frees_everything(tmp_path):
    run_dir = tmp_path / "run"
    with lock.hold(run_dir):  # loop.run claims the directory once
        assert (run_dir / ".lock").exists()
        with pytest.raises(RuntimeError, match="already held"), lock.hold(run_dir):
            pass
        assert (run_dir / ".lock").exists()  # the refused second claim released nothing
    assert not (run_dir / ".lock").exists()
    cm = lock.hold(run_dir)
    cm.__enter__()
    lock.release_all()  # what a command line does before ending the process at once
    assert not (run_dir / ".lock").exists()
    with lock.hold(run_dir):  # free again, no warning
        pass


def test_a_directory_made_for_the_lock_goes_with_it_unless_something_was_written(tmp_path):
    with lock.hold(tmp_path / "a" / "run"):  # a run refused before writing anything
        assert (tmp_path / "a" / "run").is_dir()
    assert list(tmp_path.iterdir()) == []
    with lock.hold(tmp_path / "a" / "run"):
        (tmp_path / "a" / "run" / "config.json").write_text("{}")
    assert [p.name for p in (tmp_path / "a" / "run").iterdir()] == ["config.json"]


@pytest.fixture
def two_processes(monkeypatch):
    """This process as one of a two-process run: ``set_lead`` picks which; the all-gather of
    ``distributed.from_lead`` is replaced by a record of what process 0 sent (``sent``) and
    ``received``, what the others get."""
    sent, received = [], [""]

    def from_lead(text=""):
        if distributed.is_lead():
            sent.append(text)
            return text
        return received[0]

    monkeypatch.setattr(distributed, "from_lead", from_lead)
    lead = [True]
    monkeypatch.setattr(distributed, "is_lead", lambda: lead[0])

    def set_lead(value):
        lead[0] = value

    return set_lead, sent, received


def test_process_0_refused_sends_its_message_to_the_others(tmp_path, holder, two_processes):
    set_lead, sent, received = two_processes
    run_dir = tmp_path / "run"
    holder(run_dir)
    with pytest.raises(lock.RunLocked) as caught, lock.hold_lead(run_dir):
        pytest.fail("process 0 got the lock")
    assert sent == [f"RunLocked:{caught.value}"]
    set_lead(False)  # another process: the same error, the same message
    received[0] = sent[0]
    with pytest.raises(lock.RunLocked) as other, lock.hold_lead(run_dir):
        pytest.fail("process 1 went on")
    assert str(other.value) == str(caught.value)


def test_process_0_holding_the_lock_lets_the_others_go_on(tmp_path, two_processes):
    set_lead, sent, _ = two_processes
    with lock.hold_lead(tmp_path / "run"):
        assert (tmp_path / "run" / lock.LOCK).exists()
        set_lead(False)
        with lock.hold_lead(tmp_path / "run"):  # the others take no lock
            pass
        set_lead(True)
    assert sent == [""] and not (tmp_path / "run").exists()
