"""Multi-host runs: start JAX's distributed runtime from flags or from a managed cluster.

Every host runs the same ``train.py`` command; before JAX touches a device, each process joins
the others through a coordinator (process 0 listens on ``HOST:PORT``). Afterwards
``jax.devices()`` lists the devices of all processes, a mesh spans them
(:mod:`transformer_jax.parallel.sharding`), each process feeds its own rows of every global
batch, orbax writes one checkpoint of the global arrays, and only process 0 writes logs,
metrics and samples (:func:`is_lead`). On CPU the cross-process collectives are gloo's (jax
0.10's default ``jax_cpu_collectives_implementation``), so two processes on one machine are a
real test.

Three ways to start:

* flags: ``--coordinator HOST:PORT --num-processes P --process-id I`` on every host;
* ``--coordinator auto``: ``jax.distributed.initialize()`` detects the cluster (Cloud TPU
  pods, SLURM, Open MPI, Kubernetes; or the ``JAX_COORDINATOR_ADDRESS`` variable);
* nothing: one process (no distributed runtime).

A lost host. JAX's coordination service (run by process 0) declares a process dead when it has
sent no heartbeat for ``heartbeat_timeout`` seconds (``jax.distributed.initialize``'s
``heartbeat_timeout_seconds``, 100 by default in jax 0.10.2; ``--heartbeat-timeout``); every
other process then learns it through the service, and a process whose connection to process 0
breaks learns it at once. jaxlib 0.10.2 ends the process from a C++ thread in both cases
(``LOG(FATAL)``: SIGABRT, exit status 134, a stack trace): its Python hook for this,
``missed_heartbeat_callback``, aborts with ``std::bad_cast`` when called, and
``jax_enable_recoverability`` keeps the survivors alive only while process 0 lives, and drops
the shutdown barrier of a normal end. So :func:`supervise` forks before JAX starts: the child
trains, the parent passes its output through and, if the child dies of the distributed
runtime's abort, holds back the C++ report and prints one line instead (which process, how
long ago, the last good checkpoint, what to do), exiting with :data:`EXIT_PEER_LOST`.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
import os
import re
import signal
import struct
import sys
import time
from pathlib import Path
from typing import Any

import jax

__all__ = ["DEFAULT_HEARTBEAT_TIMEOUT_S", "EXIT_PEER_LOST", "any_process", "check_flags",
           "from_lead", "initialize", "is_lead", "supervise"]

# EX_TEMPFAIL of sysexits.h ("a temporary failure; the user is invited to retry"): a scheduler
# may restart the whole job, which resumes from the last checkpoint.
EXIT_PEER_LOST = 75
DEFAULT_HEARTBEAT_TIMEOUT_S = 100  # jax.distributed.initialize's heartbeat_timeout_seconds


def check_flags(coordinator: str | None, num_processes: int | None,
                process_id: int | None, heartbeat_timeout: int | None = None) -> None:
    """Validate the multi-host flags (before anything starts).

    Raises:
      ValueError: a message naming the flag that is missing or wrong.
    """
    if heartbeat_timeout is not None and heartbeat_timeout < 1:
        raise ValueError(f"--heartbeat-timeout must be >= 1 second, got {heartbeat_timeout}")
    if coordinator is None:
        if num_processes is not None or process_id is not None:
            raise ValueError("--num-processes and --process-id need --coordinator HOST:PORT")
        if heartbeat_timeout is not None:
            raise ValueError("--heartbeat-timeout needs --coordinator (a multi-host run)")
        return
    if coordinator == "auto":
        return
    host, sep, port = coordinator.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--coordinator must be HOST:PORT (or auto), got {coordinator!r}")
    if num_processes is None or process_id is None:
        raise ValueError("--coordinator HOST:PORT needs --num-processes and --process-id "
                         "(or use --coordinator auto on a managed cluster)")
    if num_processes < 1:
        raise ValueError(f"--num-processes must be >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id must be in [0, {num_processes}), got {process_id}")


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, heartbeat_timeout: int | None = None) -> bool:
    """Join the other processes of a multi-host run (call before any other JAX use).

    Args:
      coordinator: "HOST:PORT" of process 0, "auto" (detect a managed cluster), or ``None``
        (a single-process run: nothing to do).
      num_processes: P, with an explicit coordinator.
      process_id: this process's index in [0, P), with an explicit coordinator.
      heartbeat_timeout: seconds without a heartbeat after which a process counts as lost
        (default :data:`DEFAULT_HEARTBEAT_TIMEOUT_S`, jax's).

    Returns:
      Whether the distributed runtime was started.
    """
    check_flags(coordinator, num_processes, process_id, heartbeat_timeout)
    if coordinator is None:
        return False
    timeout = heartbeat_timeout or DEFAULT_HEARTBEAT_TIMEOUT_S
    if coordinator == "auto":
        jax.distributed.initialize(heartbeat_timeout_seconds=timeout)
    else:
        jax.distributed.initialize(coordinator, num_processes=num_processes,
                                   process_id=process_id, heartbeat_timeout_seconds=timeout)
    return True


def is_lead() -> bool:
    """Whether this process writes logs, metrics, samples and plots (process 0)."""
    return jax.process_index() == 0


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is set on any process (every process must call this; one all-gather).

    A preemption notice (SIGTERM) may reach only some hosts; all must stop at the same step,
    or the others would wait forever in the next collective.
    """
    if jax.process_count() == 1:
        return flag
    import numpy as np
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray(flag))
    _seen_all_now()
    return bool(np.any(flags))


def from_lead(text: str = "", limit: int = 4096) -> str:
    """Process 0's ``text`` on every process (every process must call this; one all-gather).

    Used where process 0 alone decides (it alone takes the run directory's lock) and the
    others must stop with the same message instead of waiting for it in the next collective.
    """
    if jax.process_count() == 1:
        return text
    import numpy as np
    from jax.experimental import multihost_utils

    data = text.encode()[:limit].ljust(limit, b"\0")
    rows = multihost_utils.process_allgather(np.frombuffer(data, np.uint8))
    _seen_all_now()
    return bytes(np.asarray(rows).reshape(-1, limit)[0]).rstrip(b"\0").decode(errors="replace")


# ---- the supervisor: a lost peer becomes one line and EXIT_PEER_LOST ------------------------

# The first line of the distributed runtime's report: glog's "Lmmdd hh:mm:ss.us thread file:line]"
# from its C++ files; what follows it (the rest of the message, the stack trace) is held too.
_RUNTIME_LOG = re.compile(rb"^([EFW]\d{4} [\d:.]+\s+\d+ (coordination_service\w*|client"
                          rb"|preemption_sync_manager|service)\.(cc|h):\d+\]"
                          # Python's report of an error that the lost peer may have caused
                          # (a background thread's, or one logged), held the same way.
                          rb"|Traceback \(most recent call last\)|Exception in thread)",
                          re.MULTILINE)
_FATAL = re.compile(rb"^F\d{4} .*(Terminating process|client\.h)", re.MULTILINE)
_HOLD_S = 5.0  # held runtime lines are printed after all if the process still runs by then
# When every process last answered an all-gather (time.time(); 0: not yet): shared between the
# supervisor and the child (an anonymous mapping made before the fork), so that the line can
# say how long ago the lost process was last seen.
_last_seen: mmap.mmap | None = None


def _seen_all_now() -> None:
    if _last_seen is not None:
        _last_seen[:8] = struct.pack("d", time.time())


def _seen_ago() -> float | None:
    """Seconds since every process last answered (``None``: not yet, or not supervised)."""
    if _last_seen is None:
        return None
    then = struct.unpack("d", _last_seen[:8])[0]
    return time.time() - then if then else None


def supervise(coordinator: str | None, num_processes: int | None, checkpoints: os.PathLike,
              heartbeat_timeout: int | None = None, prog: str = "train.py") -> None:
    """Fork before JAX starts: the child returns and trains, this process relays it.

    The parent forwards the child's stderr (through a pseudo-terminal when stderr is one, so
    progress bars still draw), forwards SIGTERM and SIGHUP to it, and exits with its status.
    If the child is ended by the distributed runtime's abort (a process stopped responding),
    the runtime's C++ report is dropped and one line is printed instead; the exit status is
    :data:`EXIT_PEER_LOST`. The child dies with the parent (``PR_SET_PDEATHSIG``), so killing
    the parent kills the process. Does nothing without ``coordinator`` (a one-process run).

    Args:
      coordinator: ``--coordinator`` (``None``: return at once).
      num_processes: ``--num-processes`` (``None`` with ``auto``).
      checkpoints: the run's checkpoint folder (the line names its newest step).
      heartbeat_timeout: ``--heartbeat-timeout`` (``None``: jax's default).
      prog: the command's name, first on the line.
    """
    global _last_seen
    if coordinator is None or not hasattr(os, "fork"):
        return
    _last_seen = mmap.mmap(-1, 8)
    sys.stdout.flush()
    sys.stderr.flush()
    if os.isatty(2):
        read_fd, write_fd = os.openpty()
        _like_terminal(write_fd)
    else:
        read_fd, write_fd = os.pipe()
    parent = os.getpid()
    child = os.fork()
    if child == 0:
        os.dup2(write_fd, 2)
        os.close(read_fd)
        os.close(write_fd)
        _die_with(parent)
        _await_verdict(heartbeat_timeout or DEFAULT_HEARTBEAT_TIMEOUT_S)
        return
    os.close(write_fd)
    if os.isatty(read_fd):  # a resized terminal resizes the child's (tqdm reads it)
        signal.signal(signal.SIGWINCH, functools.partial(_copy_size, read_fd))
    report = _Report(prog, coordinator, num_processes, Path(checkpoints),
                     heartbeat_timeout or DEFAULT_HEARTBEAT_TIMEOUT_S)
    _forward_signals(child)
    status = _relay(child, read_fd, report)
    sys.stdout.flush()
    os._exit(status)


def _like_terminal(fd: int) -> None:
    """The pseudo-terminal's output as the real one's: no newline translation, same size."""
    import termios

    attrs = termios.tcgetattr(fd)
    attrs[1] &= ~termios.OPOST
    termios.tcsetattr(fd, termios.TCSANOW, attrs)
    _copy_size(fd)


def _copy_size(fd: int, *signal_args: Any) -> None:
    """Give the pseudo-terminal ``fd`` the real terminal's size (a progress bar's width)."""
    import fcntl
    import termios

    with contextlib.suppress(OSError):
        fcntl.ioctl(fd, termios.TIOCSWINSZ, fcntl.ioctl(2, termios.TIOCGWINSZ, b"\0" * 8))


def _die_with(parent: int) -> None:
    """Have the kernel kill this process when the parent ends (Linux; elsewhere a no-op)."""
    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(EXIT_PEER_LOST)


def _forward_signals(child: int) -> None:
    """SIGTERM and SIGHUP (a scheduler's) go on to the child; Ctrl-C reaches it by itself."""
    def forward(signum, frame):
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)
    # A terminal's Ctrl-C goes to the whole foreground process group, the child included;
    # a SIGINT sent to this process by hand is forwarded.
    signal.signal(signal.SIGINT, signal.SIG_IGN if _in_foreground() else forward)


# A collective whose peer is gone fails in Python before the runtime ends the process (gloo:
# "Connection closed by peer"); NCCL and the coordination service report it in their words.
_PEER_FAILURE = re.compile(r"closed by peer|reset by peer|Gloo \w+ failed|NCCL|UNAVAILABLE|"
                           r"DEADLINE_EXCEEDED|coordination service")


def _await_verdict(heartbeat_timeout: int) -> None:
    """Hold an uncaught error of a failed collective until the runtime says which peer is gone.

    The runtime ends the process within ``heartbeat_timeout`` (then the supervisor prints the
    line); a traceback printed first would only be noise. Another error prints at once.
    """
    import threading

    def wait_if_peer_failure(value: BaseException | None) -> None:
        error, chain = value, []
        while error is not None and len(chain) < 8:
            chain.append(str(error))
            error = error.__cause__ or error.__context__
        if any(_PEER_FAILURE.search(text) for text in chain):
            time.sleep(heartbeat_timeout + 10)

    main_hook, thread_hook = sys.excepthook, threading.excepthook

    def in_main(kind, value, tb):
        wait_if_peer_failure(value)
        main_hook(kind, value, tb)

    def in_thread(args):
        wait_if_peer_failure(args.exc_value)
        thread_hook(args)

    sys.excepthook, threading.excepthook = in_main, in_thread


def _relay(child: int, fd: int, report: _Report) -> int:
    """Forward the child's stderr until it ends; returns the exit status to use."""
    import select

    held, held_at, status = b"", 0.0, None
    while True:
        ready = select.select([fd], [], [], 1.0)[0]
        chunk = b""
        if ready:
            with contextlib.suppress(OSError):  # EIO: the pseudo-terminal's writer is gone
                chunk = os.read(fd, 1 << 16)
        if chunk and not held:
            start = _RUNTIME_LOG.search(chunk)
            if start is None:
                _write(chunk)
            else:
                _write(chunk[:start.start()])
                held, held_at = chunk[start.start():], time.monotonic()
        elif chunk:
            held += chunk
        if held and time.monotonic() - held_at > _HOLD_S:  # not an abort after all
            _write(held)
            held = b""
        if status is None:
            done, status = os.waitpid(child, os.WNOHANG)
            status = status if done else None
        if status is not None and not chunk:
            break
    os.close(fd)
    code = os.waitstatus_to_exitcode(status)
    # The runtime's fatal log line, then its end: LOG(FATAL) aborts (SIGABRT, as seen with
    # jaxlib 0.10.2); absl's quiet LOG(QFATAL) (older jaxlibs) exits with a status instead.
    if code != 0 and _FATAL.search(held):
        _write(report.line(held).encode())
        return EXIT_PEER_LOST
    _write(held)
    return code if code >= 0 else 128 - code  # killed by signal S: 128 + S, as a shell says


def _in_foreground() -> bool:
    """Whether this process is in its terminal's foreground process group (Ctrl-C reaches all)."""
    try:
        return os.tcgetpgrp(sys.__stdin__.fileno()) == os.getpgrp()
    except (OSError, AttributeError, ValueError):
        return False


def _write(data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(2, view):]
        except OSError:
            return


class _Report:
    """The line a survivor prints when the distributed runtime ends it."""

    def __init__(self, prog: str, coordinator: str, num_processes: int | None,
                 checkpoints: Path, heartbeat_timeout: int):
        self.prog, self.coordinator, self.num_processes = prog, coordinator, num_processes
        self.checkpoints, self.heartbeat_timeout = checkpoints, heartbeat_timeout

    def line(self, runtime_report: bytes) -> str:
        """Which process stopped responding, how long ago, the last checkpoint, what to do."""
        who, ago = self._who(runtime_report.decode(errors="replace"))
        step = _last_step(self.checkpoints)
        n = f"all {self.num_processes}" if self.num_processes else "all"
        saved = (f"the last good checkpoint is step {step} in {self.checkpoints}"
                 if step is not None else "no checkpoint was saved yet")
        resume = f"they resume from step {step}" if step is not None else "they start at step 0"
        return (f"{self.prog}: {who} stopped responding ({ago}); {saved}. Start {n} processes "
                f"again with the same command; {resume} (exit status {EXIT_PEER_LOST})\n")

    def _who(self, text: str) -> tuple[str, str]:
        ago = _seen_ago()
        seen = ("last seen at start-up" if ago is None else
                f"last seen {ago:.0f} s ago")  # the last step all processes took together
        found = re.search(r"stopped sending heartbeats\):\s*((?:\d+\s+)+)", text)
        if found:
            ids = found.group(1).split()
            who = f"process{'es' if len(ids) > 1 else ''} {', '.join(ids)}"
            return who, f"{seen}; no heartbeat for {self.heartbeat_timeout} s"
        where = "" if self.coordinator == "auto" else f" at {self.coordinator}"
        return f"process 0 (the coordinator{where})", f"{seen}; its connection closed"


def _last_step(directory: Path) -> int | None:
    """The newest complete checkpoint step in ``directory`` (orbax names them by step)."""
    try:
        return max((int(p.name) for p in directory.iterdir() if p.name.isdigit()), default=None)
    except OSError:
        return None
