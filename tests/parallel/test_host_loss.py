"""A lost host in a two-process run, and a refused run directory in one.

Each process is ``train.py`` (through HARNESS) with 2 fake CPU devices; the two talk through
``jax.distributed`` on localhost with gloo collectives, as in tests/parallel/test_sharding.py.

* SIGKILL of one process (a host lost outright) while both wait after the step-4 checkpoint: the
  survivor exits with status 75 (EX_TEMPFAIL) and one line naming the lost process, how long
  ago, the last good checkpoint and what to do, within the heartbeat timeout plus a margin,
  without the C++ runtime's report. Killing process 1 is noticed through the coordination
  service's heartbeat; killing process 0 (which runs the service) at once.
* Starting both again with the same command resumes from step 4 and ends with the parameters
  and optimizer state of an uninterrupted two-process run, bit for bit.
* Process 0 refused the run directory's lock: both processes exit 2 with the same one line.

The supervisor's relay (:func:`transformer_jax.parallel.distributed.supervise`) is also tested
alone, in milliseconds, on a child that writes the runtime's real reports (as jaxlib 0.10.2
printed them) and aborts.
"""

import mmap
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from transformer_jax.parallel import distributed
from transformer_jax.runs import lock
from transformer_jax.runs.checkpoint import Checkpointer

ROOT = Path(__file__).resolve().parents[2]
HEARTBEAT_S = 5  # --heartbeat-timeout: short, so that a loss is noticed in seconds
MARGIN_S = 20  # a loaded 2-core machine: start-up of the report, scheduling
STEPS, CKPT, HANG = 8, 4, 4

# Runs train.py's __main__; with HANG_AT=k every process stops (sleeps) before the compiled call
# that starts at step k, so that the test can kill one of them at a known point. Test-only.
HARNESS = '''
import os, sys, time, runpy
sys.path.insert(0, os.environ["ROOT"])
from transformer_jax.data import batches as data_batches
from transformer_jax.runs import metrics
metrics.cpu_matmul_probe = lambda *a, **k: 1e11  # MFU is beside the point; saves seconds
if os.environ.get("HANG_AT"):
    real_batches = data_batches.train_batches
    def batches(tokens, *, step, num_steps, **kw):
        if step >= int(os.environ["HANG_AT"]):
            time.sleep(600)
        return real_batches(tokens, step=step, num_steps=num_steps, **kw)
    data_batches.train_batches = batches
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path(os.path.join(os.environ["ROOT"], "train.py"), run_name="__main__")
'''


def _args(out: Path, corpus: Path, port: int) -> list[str]:
    """The command line both processes run (without --process-id)."""
    return ["--preset", "tiny", "--layers", "1", "--seq-len", "16", "--batch-size", "8",
            "--dropout", "0.1", "--seed", "3", "--warmup", "2", "--steps", str(STEPS),
            "--steps-per-call", "1", "--log-every", str(CKPT), "--eval-every", str(STEPS),
            "--ckpt-every", str(CKPT), "--sample-tokens", "0", "--no-progress",
            "--parallel", "sharded", "--mesh", "data=2,fsdp=2", "--data", str(corpus),
            "--out", str(out), "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
            "--heartbeat-timeout", str(HEARTBEAT_S)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Process:
    """One ``train.py`` process; its stdout and stderr are collected as they come."""

    def __init__(self, argv, env):
        self.popen = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.popen.stdout),
                                        daemon=True)
        self._reader.start()

    def finish(self, timeout=240) -> tuple[int, str]:
        rc = self.popen.wait(timeout)
        self._reader.join(timeout)
        return rc, "".join(self.lines)


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """Starts both processes of a run; returns them (process 0 first)."""
    root = tmp_path_factory.mktemp("host_loss")
    (root / "harness.py").write_text(HARNESS)
    words = ["the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "with", "be"]
    corpus = root / "corpus.txt"
    corpus.write_text(" ".join(np.random.default_rng(0).choice(words, 1500)))
    env = dict(os.environ, ROOT=str(ROOT), PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    started: list[_Process] = []

    def start(out: Path, **extra_env) -> list[_Process]:
        args = _args(out, corpus, _free_port())
        procs = [_Process([sys.executable, str(root / "harness.py"), *args, "--process-id",
                           str(i)], dict(env, **extra_env)) for i in range(2)]
        started.extend(procs)
        return procs

    yield start
    for proc in started:
        proc.popen.kill()
        proc.popen.wait()


def _ours(log: str) -> list[str]:
    """The output lines, without gloo's connection messages (printed by every two-process run)."""
    return [line for line in log.splitlines() if not line.startswith("[Gloo]")]


def _wait_for(path: Path, procs: list[_Process], timeout=240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        for p in procs:
            assert p.popen.poll() is None, f"exited {p.popen.returncode}:\n{''.join(p.lines)}"
        assert time.monotonic() < deadline, "".join(procs[0].lines)
        time.sleep(0.1)


def _final_state(out: Path):
    """The last checkpoint's arrays, gathered onto this process's first device."""
    saved = ocp.StandardCheckpointer().metadata(out / "checkpoints" / str(STEPS) / "state")
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                          saved.item_metadata)
    with Checkpointer(out / "checkpoints") as ckpt:
        return jax.device_get(ckpt.restore(target, step=STEPS).state)


@pytest.fixture(scope="module")
def reference(launch, tmp_path_factory):
    """The state at the last step of an uninterrupted two-process run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    for proc in launch(out):
        rc, log = proc.finish()
        assert rc == 0, log
    return _final_state(out)


@pytest.mark.slow  # two-process runs: ~15 s each on 2 cores
@pytest.mark.parametrize("victim", [1, 0])
def test_a_killed_process_gives_the_survivor_one_line_and_status_75(launch, reference, victim,
                                                                    tmp_path):
    out = tmp_path / "run"
    procs = launch(out, HANG_AT=str(HANG))
    _wait_for(out / "checkpoints" / str(HANG), procs)  # complete (orbax publishes it last)
    procs[victim].popen.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    survivor = procs[1 - victim]
    rc, log = survivor.finish(timeout=HEARTBEAT_S + MARGIN_S + 60)
    noticed = time.monotonic() - killed
    assert rc == 75, log
    assert noticed < HEARTBEAT_S + MARGIN_S, (noticed, log)
    for noise in ("Traceback", "Check failure", "client.h", "coordination_service", "    @ 0x"):
        assert noise not in log, log
    last = _ours(log)[-1]
    who = (r"process 1 stopped responding \(last seen \d+ s ago; no heartbeat for 5 s\)"
           if victim == 1 else r"process 0 \(the coordinator at 127\.0\.0\.1:\d+\) stopped "
           r"responding \(last seen \d+ s ago; its connection closed\)")
    assert re.match(f"train\\.py: {who}; ", last), last
    assert last.endswith(f"the last good checkpoint is step {HANG} in {out / 'checkpoints'}. "
                         f"Start all 2 processes again with the same command; they resume "
                         f"from step {HANG} (exit status 75)"), last
    if victim == 0:
        return  # the restart is the same for either victim: checked once
    # Starting both again resumes from the last good checkpoint, to the same final state.
    results = [proc.finish() for proc in launch(out)]
    for rc, log in results:
        assert rc == 0, log
    assert f"resuming {out} from step {HANG}" in results[0][1], results[0][1]
    jax.tree.map(np.testing.assert_array_equal, _final_state(out), reference)


HOLDER = """
import sys, time
from transformer_jax.parallel import distributed
from transformer_jax.runs import lock
with lock.hold(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.mark.slow
def test_process_0_refused_the_lock_stops_every_process_with_one_line(launch, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        results = [proc.finish(timeout=120) for proc in launch(out)]
    finally:
        holder.kill()
        holder.wait()
    messages = set()
    for rc, log in results:
        assert rc == 2, log
        lines = _ours(log)
        assert len(lines) == 1 and "Traceback" not in log, log
        messages.add(lines[0])
    (message,) = messages  # the same line on both
    assert re.match(rf"train\.py: error: --out {re.escape(str(out))} is in use by another run: "
                    rf"pid {holder.pid} on host ", message), message
    assert [p.name for p in out.iterdir()] == [lock.LOCK]  # nothing written by the refused run


# ---- the relay alone -------------------------------------------------------------------------

# What jaxlib 0.10.2 printed before aborting a survivor (stack traces shortened).
PEER_REPORT = b"""\
E1206 09:13:03.331476    5673 coordination_service.cc:1549] [82094] Use error polling to \
propagate the following error to all tasks: UNAVAILABLE: The following tasks are unhealthy \
(stopped sending heartbeats):
1
The tasks have crashed. Check the task logs for an earlier error, or scheduler events (e.g. \
preemption, eviction) to debug further. [type.googleapis.com/tensorflow.CoordinationServiceError='']
F1206 09:13:03.332257    5684 client.h:80] Terminating process because the JAX distributed \
service detected fatal errors. absl::Status: UNAVAILABLE: The following tasks are unhealthy \
(stopped sending heartbeats):
1
*** Check failure stack trace: ***
    @     0x7f8427640634  absl::lts_20260107::log_internal::LogMessage::SendToLog()
"""
# The survivor's own collective may fail first (gloo notices a closed connection at once).
GLOO_TRACEBACK = b"""\
Traceback (most recent call last):
  File "train.py", line 11, in <module>
jax.errors.JaxRuntimeError: UNKNOWN: Gloo AllGather failed: [external/gloo/gloo/transport/tcp/\
pair.cc:547] Connection closed by peer [127.0.0.1]:7604
"""
COORDINATOR_REPORT = b"""\
W1206 09:14:24.175770   12381 preemption_sync_manager.cc:147] Failed to retrieve preemption \
notice from coordination service: UNAVAILABLE: Socket closed
E1206 09:14:24.175860   12381 coordination_service_agent.cc:289] Polled an error from \
coordination service (this can be an error from this or another task).
F1206 09:14:24.175866   12381 client.h:80] Terminating process because the JAX distributed \
service detected fatal errors. absl::Status: UNAVAILABLE: Failed to send RPC to coordination \
service. Either the leader task was preempted/died/restarted unexpectedly or this task is \
experiencing network issues.
*** Check failure stack trace: ***
    @     0x7f3086e40634  absl::lts_20260107::log_internal::LogMessage::SendToLog()
"""


def _relayed(tmp_path, report: bytes, end: str) -> int:
    """A child writes a log line, then ``report`` to stderr, then runs ``end``; relayed."""
    script = (f"import os, sys, time\nos.write(2, b'step 3: loss 2.5\\n')\n"
              f"os.write(2, {report!r})\n{end}\n")
    read_fd, write_fd = os.pipe()
    child = subprocess.Popen([sys.executable, "-c", script], stderr=write_fd)
    os.close(write_fd)
    report_line = distributed._Report("train.py", "10.0.0.1:1234", 2, tmp_path / "checkpoints",
                                      HEARTBEAT_S)
    status = distributed._relay(child.pid, read_fd, report_line)
    child.returncode = status  # reaped by the relay
    return status


@pytest.mark.parametrize("report, who", [
    (GLOO_TRACEBACK + PEER_REPORT,
     "process 1 stopped responding (last seen 12 s ago; no heartbeat for 5 s)"),
    (COORDINATOR_REPORT, ("process 0 (the coordinator at 10.0.0.1:1234) stopped responding "
                          "(last seen 12 s ago; its connection closed)"))],
    ids=["peer", "coordinator"])
def test_the_relay_turns_the_runtime_abort_into_one_line(report, who, tmp_path, capfd,
                                                         monkeypatch):
    for name in ("20", "40", "60.orbax-checkpoint-tmp"):  # a save in flight is not "good"
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    seen = mmap.mmap(-1, 8)  # when all processes last took a step together (any_process)
    seen[:8] = struct.pack("d", time.time() - 12.2)
    monkeypatch.setattr(distributed, "_last_seen", seen)
    status = _relayed(tmp_path, report, "os.abort()")
    assert status == distributed.EXIT_PEER_LOST == 75
    err = capfd.readouterr().err
    ago = re.search(r"last seen (\d+) s ago", err)
    assert ago and 12 <= int(ago[1]) < 60, err  # 12 s, and the time the relay took
    assert err.replace(ago[0], "last seen 12 s ago") == (
        f"step 3: loss 2.5\ntrain.py: {who}; the last good checkpoint is step 40 in "
        f"{tmp_path / 'checkpoints'}. Start all 2 processes again with the same command; they "
        "resume from step 40 (exit status 75)\n")


def test_before_the_first_checkpoint_the_line_says_they_start_at_step_0(tmp_path, capfd):
    assert _relayed(tmp_path, PEER_REPORT, "os.abort()") == 75
    assert capfd.readouterr().err.endswith(
        "no checkpoint was saved yet. Start all 2 processes again with the same command; they "
        "start at step 0 (exit status 75)\n")


def test_runtime_lines_without_an_abort_are_printed_and_the_status_kept(tmp_path, capfd,
                                                                        monkeypatch):
    monkeypatch.setattr(distributed, "_HOLD_S", 0.2)
    # Held back while an abort may follow, printed once the process lives on.
    status = _relayed(tmp_path, COORDINATOR_REPORT[:200] + b"\n",
                         "time.sleep(1); sys.exit(3)")
    assert status == 3
    assert capfd.readouterr().err == "step 3: loss 2.5\n" + COORDINATOR_REPORT[:200].decode() + "\n"
    status = _relayed(tmp_path, GLOO_TRACEBACK, "os.abort()")  # an abort of another cause
    assert status == 128 + signal.SIGABRT
    assert capfd.readouterr().err == "step 3: loss 2.5\n" + GLOO_TRACEBACK.decode()
