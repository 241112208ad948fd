"""The lock a training run holds on its run directory, so that two runs never write into one.

A scheduler that retries a job whose first attempt is still running starts a second ``train.py``
on the same ``--out``; without a lock both train, both append to ``metrics.jsonl`` and their
checkpoint saves collide. :func:`hold` claims ``<out>/.lock`` for as long as the run lasts:

* The claim is a ``flock`` on the file (the kernel releases it when the process ends in any way:
  exit, crash, SIGKILL) plus the holder written into it: pid, host, start time. A second run
  finds the ``flock`` taken and stops with :class:`RunLocked`, naming the holder.
* A lock whose holder is gone is taken over with one warning: on the same host when the
  ``flock`` is free (the holder died without removing the file), on another host (a shared
  filesystem, where ``flock`` may not reach across machines) when the holder has not refreshed
  the file for :data:`STALE_S` seconds. The holder refreshes its modification time every
  :data:`HEARTBEAT_S` seconds from a background thread.
* Released, the file is removed (while still locked, so a run that opened it in between sees
  that it is gone and opens the new one), and so are the directories the lock created if
  nothing else was written into them (a run refused for bad data leaves no ``--out`` behind).
* A process claims a directory once (``loop.run`` takes the lock; a second claim is a
  programming error), and :func:`release_all` lets a command line that ends the process at once
  (a second Ctrl-C) remove its locks first.

In a multi-host run only process 0 holds the lock (:func:`hold_lead`); when it is refused, every
process stops with the same message (the others would otherwise wait for process 0 in their
first collective until the heartbeat timeout). Commands that only read a run take none.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transformer_jax.parallel import distributed
from transformer_jax.runs.rundir import RunConfigError, make_dir, why_not_written

__all__ = ["HEARTBEAT_S", "LOCK", "STALE_S", "RunLocked", "hold", "hold_lead", "release_all"]

LOCK = ".lock"  # a dot file: rundir.prepare does not count it as someone else's file
HEARTBEAT_S = 30.0
STALE_S = 300.0  # ten missed heartbeats: the holder on another host is gone

_held: dict[Path, _Lock] = {}  # directory -> this process's lock on it
_held_guard = threading.RLock()  # re-entrant: release_all may run in a signal handler


class RunLocked(RunConfigError):
    """The run directory is in use by another run (the message names it and what to do)."""


class _Lock:
    """A claimed ``<out>/.lock``: the open, flocked file and its heartbeat thread."""

    def __init__(self, out: Path, fd: int, created: list[Path]):
        self.out, self.path, self.fd = out, out / LOCK, fd
        self.created = created  # directories made for the lock, innermost first
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name=f"lock {out}", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):  # removed by hand, or a full disk: keep training
                os.utime(self.fd)

    def release(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            if _same_file(self.path, self.fd):
                self.path.unlink()
        with contextlib.suppress(OSError):
            os.close(self.fd)  # releases the flock
        for directory in self.created:
            try:
                directory.rmdir()  # only if empty: the run wrote nothing there
            except OSError:
                break


@contextlib.contextmanager
def hold(out: str | os.PathLike) -> Iterator[None]:
    """Hold the lock on the run directory ``out`` (created if missing) inside the ``with``.

    Raises:
      RunLocked: another live run holds it.
      RunConfigError: ``out`` cannot be created or the lock file cannot be written.
      RuntimeError: this process holds it already (a programming error: one run, one claim).
    """
    key = Path(out).absolute()
    with _held_guard:
        if key in _held:
            raise RuntimeError(f"{key} is already held by this process")
        lock = _held[key] = _acquire(key)
    try:
        yield
    finally:
        with _held_guard:
            if _held.get(key) is lock:
                del _held[key]
                lock.release()


@contextlib.contextmanager
def hold_lead(out: str | os.PathLike) -> Iterator[None]:
    """:func:`hold` on process 0 only; every process raises if process 0 is refused.

    Every process of a multi-host run must enter this at the same point (one all-gather).

    Raises:
      RunLocked, RunConfigError: on every process, with process 0's message.
    """
    if not distributed.is_lead():
        refused = distributed.from_lead()
        if refused:
            kind, _, message = refused.partition(":")
            raise (RunLocked if kind == "RunLocked" else RunConfigError)(message)
        yield
        return
    try:
        claim = hold(out)
        claim.__enter__()
    except RunConfigError as e:
        distributed.from_lead(f"{type(e).__name__}:{e}")
        raise
    distributed.from_lead("")
    try:
        yield
    finally:
        claim.__exit__(None, None, None)


def release_all() -> None:
    """Release every lock this process holds (before ending the process at once)."""
    with _held_guard:
        for lock in _held.values():
            lock.release()
        _held.clear()


def _acquire(out: Path) -> _Lock:
    path = out / LOCK
    for _ in range(10):  # another run may remove or replace the file between open and flock
        created = [d for d in (out, *out.parents) if not d.exists()]
        make_dir(out)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # the directory was removed by a run that just ended
            continue
        except OSError as e:
            why, todo = why_not_written(e)
            raise RunConfigError(f"--out {out} is not writable: cannot create {path} ({why}); "
                                 f"{todo}, or choose another --out") from None
        try:
            locked = _flock(fd)
            if _same_file(path, fd):
                _claim(path, fd, locked)
                return _Lock(out, fd, created)
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise RunLocked(f"--out {out}: cannot claim {path}, other runs keep replacing it; "
                    "start one run at a time")


def _flock(fd: int) -> bool | None:
    """Take the flock: ``True``; ``None`` where the filesystem has no locks (ENOLCK etc.)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


def _same_file(path: Path, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except OSError:
        return False


def _claim(path: Path, fd: int, locked: bool | None) -> None:
    """Write this process into the lock file, unless a live run holds it (then raise)."""
    holder = _read(fd)
    if holder is not None or locked is False:
        alive, gone_because = _holder_alive(holder, locked, time.time() - os.fstat(fd).st_mtime)
        if alive:
            raise RunLocked(_in_use(path, holder, time.time() - os.fstat(fd).st_mtime))
        warnings.warn(f"took over {path} from {_describe(holder)}: {gone_because}",
                      RuntimeWarning, stacklevel=2)
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
    except OSError as e:
        why, todo = why_not_written(e)
        raise RunConfigError(f"--out {path.parent} is not writable: cannot write {path} ({why}); "
                             f"{todo}, or choose another --out") from None


def _holder_alive(holder: dict[str, Any] | None, locked: bool | None,
                  age: float) -> tuple[bool, str]:
    """(whether the recorded holder still runs, why it counts as gone)."""
    if locked is False:  # the kernel says a process holds the flock
        return True, ""
    if not holder:
        return False, "the file names no run"
    if holder.get("host") == socket.gethostname():
        pid = holder.get("pid")
        if locked or not isinstance(pid, int) or pid == os.getpid():
            # The flock is free (the kernel drops it with the process): the holder is gone.
            return False, f"process {pid} no longer runs (killed or crashed)"
        try:  # a filesystem without flock: ask the kernel about the pid instead
            os.kill(pid, 0)
        except ProcessLookupError:
            return False, f"process {pid} no longer runs (killed or crashed)"
        except PermissionError:
            pass
        return True, ""
    if age > STALE_S:
        return False, f"its heartbeat stopped {age / 60:.0f} minutes ago"
    return True, ""


def _read(fd: int) -> dict[str, Any] | None:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "null")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return holder if isinstance(holder, dict) or holder is None else {}


def _describe(holder: dict[str, Any] | None) -> str:
    holder = holder or {}
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
            f"(started {holder.get('started', '?')})")


def _in_use(path: Path, holder: dict[str, Any] | None, age: float) -> str:
    return (f"--out {path.parent} is in use by another run: {_describe(holder)}, last "
            f"heartbeat {age:.0f} s ago; wait for it to end, stop it (Ctrl-C or SIGTERM saves a "
            f"checkpoint), or use another --out. If no such run exists, delete {path}")
