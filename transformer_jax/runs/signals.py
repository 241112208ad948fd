"""SIGTERM and Ctrl-C (SIGINT) as a training run and its command line handle them.

* :class:`StopSignals`, around the training loop: SIGTERM (a scheduler's preemption) and a first
  Ctrl-C set a flag instead of killing the process; the loop saves a checkpoint at the next step
  boundary and returns normally. A second Ctrl-C goes to the SIGINT handler installed before.
* :func:`ctrl_c_ends_at_once`, around a command's ``main``: that handler. It ends the process at
  once (:func:`end_now`): stdout flushed, this process's run-directory locks released, one line,
  exit status :data:`EXIT_INTERRUPTED`, no cleanup (the checkpoints saved before are complete; a
  save in flight is a temporary folder that the next run removes).

Without :func:`ctrl_c_ends_at_once` (the library called from a script), a second Ctrl-C raises
``KeyboardInterrupt`` as Python's default handler does. Handlers are installed on the main
thread only (Python delivers signals there); a SIGINT ignored from the start (a shell's
background job) stays ignored.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any, Self

from transformer_jax.runs import lock

__all__ = ["EXIT_INTERRUPTED", "StopSignals", "ctrl_c_ends_at_once", "end_now"]

EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a command ended by Ctrl-C

_FIRST_CTRL_C = (b"Ctrl-C: saving a checkpoint after the step in progress; press Ctrl-C again to "
                 b"stop at once without saving\n")


def _installable(signum: int) -> bool:
    """Whether a handler for ``signum`` may be installed here (main thread, not ignored)."""
    return (threading.current_thread() is threading.main_thread()
            and (signum != signal.SIGINT or signal.getsignal(signum) is not signal.SIG_IGN))


class StopSignals:
    """Context manager: SIGTERM and a first Ctrl-C set :attr:`set`; :attr:`by` names the first
    ("SIGTERM" or "SIGINT"). A second Ctrl-C is handed to the SIGINT handler installed before
    (:func:`ctrl_c_ends_at_once`'s, or Python's default, which raises ``KeyboardInterrupt``).
    """

    def __init__(self):
        self.set, self.by, self._ctrl_c = False, None, 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Self:
        for signum in (signal.SIGTERM, signal.SIGINT):
            if _installable(signum):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            self._ctrl_c += 1
            if self._ctrl_c > 1:
                previous = self._previous[signal.SIGINT]
                if callable(previous):
                    previous(signum, frame)
                raise KeyboardInterrupt
            # Written straight to the file descriptor: a signal handler may interrupt a print.
            with contextlib.suppress(OSError, ValueError, AttributeError):
                os.write(sys.stderr.fileno(), _FIRST_CTRL_C)
        self.set = True
        self.by = self.by or signal.Signals(signum).name

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            if previous is not None:  # None: a handler not installed from Python
                signal.signal(signum, previous)


@contextlib.contextmanager
def ctrl_c_ends_at_once(line: str) -> Iterator[None]:
    """Inside the ``with``, Ctrl-C ends the process at once with ``line`` (:func:`end_now`)."""
    if not _installable(signal.SIGINT):
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: end_now(line))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def end_now(line: str) -> None:
    """Flush stdout, release this process's run locks, write ``line``, exit 130: no cleanup."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, RuntimeError):  # RuntimeError: a print was interrupted
            pass
    lock.release_all()
    with contextlib.suppress(OSError, ValueError, AttributeError):
        os.write(sys.stderr.fileno(), f"{line}\n".encode())
    os._exit(EXIT_INTERRUPTED)
