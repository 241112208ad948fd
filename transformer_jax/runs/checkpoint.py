"""Checkpoints: a small wrapper around orbax's ``CheckpointManager``.

Each step folder holds two items: ``state`` (the train state, ``StandardSave``) and ``meta``
(small JSON: configs, the data position, wall time; ``JsonSave``). Saves are asynchronous:
the state is copied to host memory first (so the caller may donate or overwrite its device
buffers right away) and written in the background; :meth:`Checkpointer.close` waits for it.

Reliability (as orbax-checkpoint 0.12.8 behaves):

* A save killed mid-way leaves ``<step>.orbax-checkpoint-tmp*``, which orbax ignores and
  (``cleanup_tmp_directories=True``) removes on the next start.
* A step folder that is listed but cannot be restored (copied partially, made by hand, a
  truncated file) makes :meth:`Checkpointer.restore` warn and fall back to the previous step.
  The bad folder is renamed ``<step>.unrestorable``, so the run can save that step again.
* ``sys.exit`` right after an async save would lose it: use the checkpointer as a context
  manager (or call :meth:`Checkpointer.close` in a ``finally``).
* A save that cannot be written (full disk, no permission, read-only filesystem) fails in
  orbax's background threads; it surfaces at the next :meth:`~Checkpointer.save`,
  :meth:`~Checkpointer.wait` or :meth:`~Checkpointer.close` as one
  :class:`CheckpointWriteError` naming the step, the cause and the last good step, which stays
  intact (the half-written step is a temporary folder, ignored like a killed save). The
  tracebacks orbax logs from those threads (absl logging) are kept off the terminal while the
  checkpointer is open; so are the "Future exception was never retrieved" records asyncio logs
  when orbax's failed futures for this directory are garbage-collected, whenever that happens
  (often at interpreter exit, after the error was reported).
* Only a writer (``cleanup_tmp=True``: the training loop, holding the run's lock) removes
  temporary folders; a reader opened while a run is saving must not delete the save in flight.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import jax
import numpy as np
import orbax.checkpoint as ocp

from transformer_jax.runs.rundir import OutputError, why_not_written

__all__ = ["CheckpointError", "CheckpointWriteError", "Checkpointer", "Restored", "average_trees"]


class CheckpointError(RuntimeError):
    """No checkpoint of a run directory can be restored."""


class CheckpointWriteError(OutputError):
    """A checkpoint could not be written (the message names the step, the cause, what to do)."""


class _OrbaxErrors(logging.Filter):
    """Drops orbax's error records (tracebacks logged from its save threads) and keeps the last
    message: the same failure reaches the caller as one :class:`CheckpointWriteError`."""

    def __init__(self):
        super().__init__()
        self.last: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname:
            self.last = record.getMessage().splitlines()[0][:300]
            return False
        return True


class _UnretrievedSaveErrors(logging.Filter):
    """Drops asyncio's "Future (or Task) exception was never retrieved" records of failed
    saves into a checkpointer's directory: each failure reaches the caller as one
    :class:`CheckpointWriteError`.

    orbax's save threads leave futures holding the same error; asyncio logs each one when it is
    garbage-collected, which may be before the error is raised or after the checkpointer is
    closed (at interpreter exit). So this filter stays installed, and it only matches errors
    that name the directory of a checkpointer: any other unretrieved future is still logged.
    """

    def __init__(self):
        super().__init__()
        self.directories: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if "exception was never retrieved" not in record.getMessage().split("\n", 1)[0]:
            return True
        error = record.exc_info[1] if record.exc_info else None
        return not any(d in str(error) for d in self.directories)


_UNRETRIEVED = _UnretrievedSaveErrors()


def _quiet_unretrieved(directory: Path) -> None:
    """From now on, keep asyncio's records of failed futures under ``directory`` off the log."""
    _UNRETRIEVED.directories.add(str(directory))
    asyncio_log = logging.getLogger("asyncio")
    if _UNRETRIEVED not in asyncio_log.filters:
        asyncio_log.addFilter(_UNRETRIEVED)


class IncompatibleCheckpoint(ValueError):
    """A checkpoint's metadata differs from what the caller expects (another model)."""


def _check_meta(meta: dict[str, Any] | None, expect: dict[str, Any],
                normalize: dict[str, Callable[[Any], Any]] | None = None) -> None:
    """Raise :class:`IncompatibleCheckpoint` naming the fields where ``meta`` differs.

    ``normalize[key]``, where given, is applied to the saved ``meta[key]`` before comparing
    (e.g. to fill in fields that an older version did not write).
    """
    meta = meta or {}
    diffs = []
    for key, want in expect.items():
        got = meta.get(key)
        if normalize and key in normalize and got is not None:
            got = normalize[key](got)
        if isinstance(want, dict) and isinstance(got, dict):
            diffs += [f"{k}: saved {got.get(k)!r}, expected {v!r}"
                      for k, v in want.items() if got.get(k) != v]
        elif got != want:
            diffs.append(f"{key}: saved {got!r}, expected {want!r}")
    if diffs:
        raise IncompatibleCheckpoint("saved by an incompatible model (" + "; ".join(diffs[:4])
                                     + ("; ..." if len(diffs) > 4 else "") + ")")


def _reason(e: Exception) -> str:
    """One short line for why a step did not restore (orbax messages run to paragraphs)."""
    if isinstance(e, IncompatibleCheckpoint):
        return str(e)
    text = str(e).splitlines()[0] if str(e) else ""
    first = text.split(". ")[0]  # orbax appends advice about its own API after the first sentence
    return f"unreadable, {type(e).__name__}: {first[:200]}"


@dataclasses.dataclass(frozen=True)
class Restored:
    """A restored checkpoint: its step, the state (like the abstract target) and the metadata."""

    step: int
    state: Any
    meta: dict[str, Any]


class Checkpointer:
    """Save and restore train states under one directory.

    Args:
      directory: where the step folders live (created if missing).
      max_to_keep: keep only the newest this many checkpoints (older ones are deleted).
      async_save: write in a background thread (the host copy is still made synchronously).
      cleanup_tmp: remove the temporary folders of saves that were killed; only for the run's
        writer (another process may be saving into them right now).
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3,
                 async_save: bool = True, cleanup_tmp: bool = False):
        self.directory = Path(directory).absolute()
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=cleanup_tmp,
        )
        self._pending: int | None = None  # the step whose save may still be running
        self._errors = _OrbaxErrors()
        logging.getLogger("absl").addFilter(self._errors)  # orbax logs through absl
        _quiet_unretrieved(self.directory)
        self._manager = ocp.CheckpointManager(self.directory, options=self._options)

    # ---- queries ------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Steps with a (completed) checkpoint folder, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest checkpointed step, or ``None``."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    # ---- save / restore -----------------------------------------------------------------

    def save(self, step: int, state: Any, meta: dict[str, Any] | None = None) -> bool:
        """Start saving ``state`` (any pytree of arrays) and ``meta`` as checkpoint ``step``.

        The arrays are fetched to host memory before this returns; the write continues in the
        background. Returns ``False`` (and saves nothing) if ``step`` is already saved.

        Arrays sharded over several processes (a multi-host mesh) are handed to orbax as they
        are: every process must call ``save``; each writes its own shards of one global
        checkpoint (orbax copies them to host memory before returning, too).
        """
        if step in self.all_steps():
            return False
        self.wait()  # an earlier save that failed is reported here, under its own step
        # A copy the caller's donated buffers cannot touch.
        host_state = jax.tree.map(
            lambda x: x if isinstance(x, jax.Array) and not x.is_fully_addressable
            else jax.device_get(x), state)
        self._pending = step
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(host_state),
                    meta=ocp.args.JsonSave(dict(meta or {})),
                ),
                force=True,  # we decide when to save; bypass the manager's interval policy
            )
        except Exception as e:  # noqa: BLE001 - whatever orbax raised, this step is not saved
            raise self._write_failed(e) from None
        return True

    def restore(self, abstract_state: Any = None, *, step: int | None = None,
                expect: dict[str, Any] | None = None, set_aside: bool = True,
                normalize: dict[str, Callable[[Any], Any]] | None = None) -> Restored | None:
        """Restore the newest restorable checkpoint (or exactly ``step``).

        Args:
          abstract_state: a pytree like the saved state whose leaves are
            ``jax.ShapeDtypeStruct`` (with shardings: where the arrays should live) or arrays;
            ``None`` restores the saved tree as it is stored (nested dicts and lists of NumPy
            arrays, on this host), which needs no model or optimizer to describe it.
          step: restore this step only (no fallback); ``None``: the newest that restores.
          expect: entries the checkpoint's ``meta`` must hold (e.g. ``{"model": config}``); a
            step whose meta differs counts as unrestorable, and the message names the fields.
          normalize: per key of ``expect``, a function applied to the saved value first.
          set_aside: rename unrestorable newer steps to ``<step>.unrestorable`` after a
            fallback (so training can save them again); readers pass ``False``.

        Returns:
          The :class:`Restored` checkpoint, or ``None`` when the directory holds none.

        Raises:
          CheckpointError: checkpoints exist but none of them (or not ``step``) can be restored.
        """
        self.wait()
        candidates = [step] if step is not None else self.all_steps()[::-1]
        if not candidates:
            return None
        failures, failed_steps = [], []
        for s in candidates:
            try:
                if expect:
                    _check_meta(self._manager.restore(
                        s, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta, expect,
                        normalize)
                restored = self._manager.restore(
                    s,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        meta=ocp.args.JsonRestore(),
                    ),
                )
            except Exception as e:  # noqa: BLE001 - any failure means "this step is unusable"
                reason = _reason(e)
                failures.append(f"step {s} ({reason})")
                failed_steps.append(s)
                if step is not None or s == candidates[-1]:
                    break  # nothing older to fall back to: the error below says it all
                warnings.warn(
                    f"checkpoint step {s} in {self.directory} cannot be restored ({reason}); "
                    "falling back to the previous checkpoint",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
            if failed_steps and step is None and set_aside:
                self._set_aside(failed_steps)
            return Restored(step=s, state=restored.state, meta=dict(restored.meta or {}))
        raise CheckpointError(
            f"no checkpoint in {self.directory} can be restored: {'; '.join(failures)}. "
            "Move the step folders away (the run then starts afresh), or use another --out "
            "directory."
        )

    def average(self, abstract_state: Any, *, last: int,
                select: Callable[[Any], Any] = lambda state: state) -> tuple[Any, list[int]]:
        """The mean of ``select(state)`` over the newest ``last`` checkpoints (§6.1 averages 5).

        Args:
          abstract_state: as for :meth:`restore`.
          last: how many of the newest checkpoints to average (fewer if fewer exist).
          select: the part of each state to average, e.g. ``lambda s: s.params``.

        Returns:
          (the averaged tree, the steps averaged, ascending).

        Raises:
          CheckpointError: no checkpoint, or one of the chosen ones cannot be restored.
        """
        if last < 1:
            raise ValueError(f"last must be >= 1, got {last}")
        steps = self.all_steps()[-last:]
        if not steps:
            raise CheckpointError(f"{self.directory} holds no checkpoint to average")
        trees = [select(self.restore(abstract_state, step=s).state) for s in steps]
        return average_trees(trees), steps

    def _set_aside(self, steps: list[int]) -> None:
        """Rename unrestorable step folders so that later saves of those steps are possible."""
        for s in steps:
            src = self.directory / str(s)
            if src.is_dir() and jax.process_index() == 0:  # one host renames, the others wait
                dst = self.directory / f"{s}.unrestorable"
                n = 1
                while dst.exists():
                    dst, n = self.directory / f"{s}.unrestorable.{n}", n + 1
                src.rename(dst)
                warnings.warn(f"moved unrestorable checkpoint {src} to {dst}", RuntimeWarning,
                              stacklevel=3)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("checkpoint: unrestorable steps set aside")
        self._manager.close()  # the manager caches the step list: start a fresh one
        self._manager = ocp.CheckpointManager(self.directory, options=self._options)

    # ---- lifetime -----------------------------------------------------------------------

    def wait(self) -> None:
        """Block until background saves have finished.

        Raises:
          CheckpointWriteError: the save in flight could not be written.
        """
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - orbax re-raises what its threads raised
            raise self._write_failed(e) from None
        step, self._pending = self._pending, None
        if step is not None and jax.process_index() == 0 and not (
                self.directory / str(step)).is_dir():  # orbax logged the error, raised none
            raise self._write_failed(RuntimeError(self._errors.last or "not finalized"), step)

    def _write_failed(self, error: Exception, step: int | None = None) -> CheckpointWriteError:
        """The one-line error for the failed save of ``step`` (default: the pending one)."""
        step = self._pending if step is None else step
        self._pending, self._errors.last = None, None
        why, todo = why_not_written(error)
        good = [s for s in self.all_steps() if step is None or s < step]
        kept = (f"the last good checkpoint, step {good[-1]}, is intact" if good else
                "no earlier checkpoint exists")
        return CheckpointWriteError(
            f"cannot write checkpoint step {step} in {self.directory} ({why}); {kept}. "
            f"{todo[0].upper()}{todo[1:]}, then run the same command to resume")

    def close(self) -> None:
        """Finish pending saves and release the manager.

        Raises:
          CheckpointWriteError: the save in flight could not be written.
        """
        try:
            self.wait()
        finally:
            try:
                self._manager.close()
            finally:
                logging.getLogger("absl").removeFilter(self._errors)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
            return
        with contextlib.suppress(Exception):  # the error in flight is the one to report
            self.close()


def average_trees(trees: list[Any]) -> Any:
    """Leaf-wise mean of pytrees of the same structure, summed in float64, in each leaf's dtype.

    One tree is returned unchanged (bit for bit); this is how checkpoints are averaged.
    """
    if not trees:
        raise ValueError("average_trees needs at least one tree")
    if len(trees) == 1:
        return trees[0]

    def mean(*leaves):
        total = sum(np.asarray(x, np.float64) for x in leaves)
        return np.asarray(total / len(leaves), np.asarray(leaves[0]).dtype)

    return jax.tree.map(mean, *trees)
