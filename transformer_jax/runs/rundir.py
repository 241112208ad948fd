"""The run directory (``train.py --out``): create it, claim it, read and write its ``config.json``.

A run directory belongs to one run: ``config.json`` records the model and training settings, and
re-running with the same ``--out`` resumes that run. Everything here exists so that a mistake
costs nothing:

* :func:`prepare` refuses, before anything is written, a path that cannot be a directory, a
  directory that cannot be written, a non-empty directory that is not a run directory (no
  ``config.json``: someone else's files), a run directory that holds a different model, and
  one whose run was trained with other settings
  (:func:`~transformer_jax.runs.identity.resume_differences`). An existing run's
  ``config.json`` is rewritten only by a run that goes on training it (:func:`update_config`).
* :func:`write_config` replaces ``config.json`` atomically (a temporary file, then
  ``os.replace``): a kill mid-write leaves the old file or the new one, never half of one.
* :func:`read_config` turns a missing, truncated or foreign ``config.json`` into one
  :class:`RunConfigError` that says which file and what to do.
* :func:`why_not_written` names why a write failed (no space left, permission denied,
  read-only filesystem) and what to do, for the one-line errors and warnings of a run's files;
  :class:`OutputError` is the error that ends a run whose checkpoint or log cannot be written.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformer_jax.config import ModelConfig, TrainConfig
from transformer_jax.runs.identity import model_identity, resume_differences

__all__ = ["OutputError", "RunConfigError", "make_dir", "prepare", "read_config", "read_configs",
           "update_config", "why_not_written", "write_config", "write_text_atomic"]

CONFIG = "config.json"


class RunConfigError(ValueError):
    """The run cannot start as configured (the message says why and what to change)."""


class OutputError(RuntimeError):
    """A checkpoint or ``metrics.jsonl`` of a running run cannot be written (the message says
    which, why, and what to do); the run stops, its last good checkpoint intact."""


# errno -> (why, what to do). The messages of tensorstore (orbax's array writer) carry no errno
# attribute, only the C library's text ("... No space left on device [os_error_code='28']").
_WRITE_FAILURES = {
    errno.ENOSPC: ("no space left on the device", "free space there"),
    errno.EDQUOT: ("disk quota exceeded", "free space there or raise the quota"),
    errno.EACCES: ("permission denied", "make it writable"),
    errno.EPERM: ("permission denied", "make it writable"),
    errno.EROFS: ("read-only filesystem", "use a directory on a writable filesystem"),
}


def why_not_written(error: BaseException) -> tuple[str, str]:
    """(why, what to do) for a failed write: from an ``OSError`` anywhere in ``error``'s chain,
    or the C library's message for that error inside another exception's text."""
    seen = []
    while error is not None and not any(error is e for e in seen):
        seen.append(error)
        if isinstance(error, OSError) and error.errno in _WRITE_FAILURES:
            return _WRITE_FAILURES[error.errno]
        for number, failure in _WRITE_FAILURES.items():
            if os.strerror(number) in str(error):
                return failure
        error = error.__cause__ or error.__context__
    first = str(seen[0]).splitlines()[0][:200] if seen and str(seen[0]) else ""
    return f"{type(seen[0]).__name__}: {first}" if seen else "unknown error", "check the disk"


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (a temporary file, then ``os.replace``): a kill
    or a full disk mid-write leaves the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, _mode_of(path))  # mkstemp makes the file private (0600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _mode_of(path: Path) -> int:
    """The permissions ``path`` has, or those a new file gets (0666 less the umask)."""
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        pass
    try:  # the umask without os.umask, which would change it for every thread meanwhile
        with open("/proc/self/status", encoding="ascii") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = 0o022
    return 0o666 & ~umask


def make_dir(out: Path) -> None:
    """Create the run directory ``out`` (and its parents) if missing.

    Raises:
      RunConfigError: ``out`` is a file or cannot be created.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        what = "is a file" if out.is_file() else f"cannot be created ({e.strerror})"
        raise RunConfigError(f"--out {out} {what}; choose a writable directory") from None


def read_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The raw ``{"model": {...}, "train": {...}}`` of a run directory's ``config.json``.

    Raises:
      RunConfigError: the file is missing, not JSON, or not a config written by ``train.py``.
    """
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise RunConfigError(f"{run_dir} is not a run directory (no {CONFIG}); pass the --out "
                             "directory of a train.py run")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunConfigError(f"{path} cannot be read as JSON ({e}); restore it from a backup "
                             "or train into another --out directory") from None
    if not (isinstance(config, dict) and isinstance(config.get("model"), dict)
            and isinstance(config.get("train"), dict)):
        raise RunConfigError(f"{path} is not a train.py config (it needs \"model\" and "
                             "\"train\" objects); use another --out directory")
    return config


def read_configs(run_dir: str | os.PathLike) -> tuple[ModelConfig, TrainConfig]:
    """(ModelConfig, TrainConfig) of a run directory, validated like the CLI's flags.

    Raises:
      RunConfigError: as :func:`read_config`, or a field is unknown or out of range.
    """
    return _configs(run_dir, read_config(run_dir))


def _configs(run_dir: str | os.PathLike,
             config: dict[str, Any]) -> tuple[ModelConfig, TrainConfig]:
    """:func:`read_configs` of the raw ``config`` read from ``run_dir``."""
    try:
        return ModelConfig.from_dict(config["model"]), TrainConfig.from_dict(config["train"])
    except (TypeError, ValueError) as e:
        raise RunConfigError(f"{Path(run_dir) / CONFIG} holds an invalid config ({e}); it was "
                             "written by another version or edited by hand") from None


def write_config(out: Path, model_cfg: ModelConfig, tc: TrainConfig) -> None:
    """Write ``out/config.json`` atomically (temporary file + ``os.replace``)."""
    text = json.dumps({"model": model_cfg.to_dict(), "train": tc.to_dict()}, indent=2)
    write_text_atomic(out / CONFIG, text)


def _model_mismatch(out: Path, old: dict[str, Any], model_cfg: ModelConfig,
                    tc: TrainConfig) -> str | None:
    """Why the run in ``out`` (config ``old``) is not this model's, or ``None`` if it is."""
    new, saved = model_identity(model_cfg.to_dict()), model_identity(old["model"])
    if (saved == new and old["train"].get("model") == tc.model
            and old["train"].get("task", "lm") == tc.task):
        return None
    if old["train"].get("task", "lm") != tc.task:
        return (f"{out} holds a {old['train'].get('task', 'lm')!r} run, not {tc.task!r}; use "
                "another --out, or the same --task to resume it")
    if old["train"].get("model") != tc.model:
        return (f"{out} holds a {old['train'].get('model')!r} run, not {tc.model!r}; use another "
                "--out, or the same --model to resume it")
    diff = sorted(k for k in new.keys() | saved.keys() if saved.get(k) != new.get(k))
    old_len = saved.get("max_len")
    if diff == ["max_len"] and isinstance(old_len, int) and tc.data.seq_len > old_len:
        # train.py raises max_len to --seq-len; the resumed model's positions stop at old_len.
        return (f"--seq-len {tc.data.seq_len} exceeds max_len {old_len} of the model in {out}; "
                f"resume it with --seq-len <= {old_len}, or use another --out")
    return (f"{out} holds a run of a different model (differs in: {', '.join(diff)}); use "
            "another --out, or the same model flags to resume it")


def prepare(out: Path, model_cfg: ModelConfig, tc: TrainConfig, log: Callable[[str], None],
            *, accept_changes: bool = False) -> bool:
    """Create or claim the run directory ``out``; write ``config.json`` of a new run.

    Args:
      out: the run directory.
      model_cfg: the model to train.
      tc: the training settings.
      log: where a note about changed settings goes.
      accept_changes: resume a run whose training settings differ in more than the free ones
        (``train.py --accept-changes``); a different model is refused even then.

    Returns:
      Whether ``out`` holds a run whose recorded settings differ from these: then
      :func:`update_config` should record them once the run trains again.

    Raises:
      RunConfigError: ``out`` is a file or cannot be created or written; it is a non-empty
        directory without ``config.json``; it holds a run of another model, or one trained
        with other settings. Nothing in ``out`` has been changed then.
    """
    make_dir(out)
    if (out / CONFIG).exists():
        old = read_config(out)
        mismatch = _model_mismatch(out, old, model_cfg, tc)
        if mismatch:
            raise RunConfigError(mismatch)
        _, old_tc = _configs(out, old)
        fixed, free = resume_differences(old_tc, tc)
        new_model = model_cfg.to_dict()  # what differs now is how it computes (COMPUTE_ONLY)
        free += [f"{k}: {old['model'].get(k)!r} -> {v!r}" for k, v in new_model.items()
                 if old["model"].get(k, v) != v]
        if fixed and not accept_changes:
            raise RunConfigError(
                f"{out} holds a run trained with other settings ({'; '.join(fixed)}); use a new "
                "--out for a new run, or add --accept-changes to go on training that run with "
                "these settings")
        if fixed or free:
            log(f"note: settings differ from the run in {out}: {'; '.join(fixed + free)}")
        return bool(fixed or free) or old["model"] != new_model
    if any(not p.name.startswith(".") for p in out.iterdir()):
        raise RunConfigError(f"--out {out} is not empty and holds no {CONFIG}, so it is not a "
                             "run directory; use a new or empty directory")
    update_config(out, model_cfg, tc)
    return False


def update_config(out: Path, model_cfg: ModelConfig, tc: TrainConfig) -> None:
    """(Re)write ``out/config.json`` atomically.

    Raises:
      RunConfigError: it cannot be written (why, and what to do).
    """
    try:
        write_config(out, model_cfg, tc)
    except OSError as e:
        why, todo = why_not_written(e)
        raise RunConfigError(f"--out {out} is not writable: cannot write {out / CONFIG} ({why}); "
                             f"{todo}, or choose another --out") from None
