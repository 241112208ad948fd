"""Byte-level text data: the tokenizer, the corpora and the batches the training loop sees.

* :class:`ByteTokenizer`: UTF-8 bytes are the tokens (V = 256); nothing to train or download.
* :func:`load_corpus`: the embedded default corpus (the Python reference manual that ships with
  CPython as ``pydoc_data.topics``) or text files/folders, split into train and validation.
* :func:`train_batches`: random crops, a pure function of ``(seed, step)``, so a resumed run sees
  exactly the batches an uninterrupted run would have seen (DESIGN.md, "Training loop habits").
* :func:`eval_batches`: the validation split cut into consecutive windows, each byte predicted
  exactly once; the last batch is padded with :data:`IGNORE` targets.

A batch is one int32 array ``[B, T + 1]``: inputs are ``batch[:, :-1]``, targets ``batch[:, 1:]``;
padding (validation only) is :data:`IGNORE` in both roles.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "IGNORE",
    "ByteTokenizer",
    "Corpus",
    "DataError",
    "check_length",
    "check_text",
    "embedded_corpus_text",
    "eval_batches",
    "load_corpus",
    "num_eval_windows",
    "train_batches",
]

IGNORE = -1
"""Target id of padding positions; the loss gives them zero weight (never a real byte)."""

# Mixed into every data seed so the data stream never coincides with another use of the seed.
_DATA_STREAM = 0x64617461  # "data"


class DataError(ValueError):
    """A data path or split that cannot be used; the message says which and why."""


class ByteTokenizer:
    """UTF-8 bytes as tokens: ``encode`` never fails, ``decode`` replaces invalid sequences."""

    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        """str -> [T] uint8 token ids."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()

    def decode(self, ids) -> str:
        """[T] ids in [0, 256) -> str (invalid UTF-8, e.g. a cut multi-byte char, becomes U+FFFD)."""
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() > 255):
            raise ValueError(f"byte token ids must lie in [0, 256), got [{ids.min()}, {ids.max()}]")
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A tokenized corpus split into train and validation.

    Attributes:
      train: [n_train] uint8 bytes.
      val: [n_val] uint8 bytes.
      name: where it came from ("pydoc_data.topics" or the paths).
      files: the files read, in order (empty for the embedded corpus).
    """

    train: np.ndarray
    val: np.ndarray
    name: str
    files: tuple[str, ...] = ()


def embedded_corpus_text() -> str:
    """The default corpus: CPython's ``pydoc_data.topics`` texts joined by newlines in key order.

    About 466 kB of English prose and code (the language reference); ships with CPython, so no
    download is ever needed.
    """
    from pydoc_data.topics import topics

    return "\n".join(topics[key] for key in sorted(topics))


def _split(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Last ``val_fraction`` of the bytes is validation (the head stays contiguous for training)."""
    n_val = round(len(tokens) * val_fraction)
    return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val:]


def _expand(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Files named directly, then every non-hidden file under each folder, in sorted order."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(
                p for p in path.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise DataError(f"--data folder {str(raw)!r} contains no files")
            files.extend(found)
        else:
            raise DataError(f"--data path {str(raw)!r} does not exist")
    return files


def load_corpus(paths: Sequence[str | os.PathLike] = (), val_fraction: float = 0.1) -> Corpus:
    """Read and split a byte-level corpus.

    Every file is split on its own: its first ``1 - val_fraction`` of bytes go to training and
    the rest to validation (so with one file, its last 10% is the validation split); the train
    parts are concatenated in order, and so are the validation parts.

    Args:
      paths: text files or folders (read recursively, hidden files skipped); empty means the
        embedded corpus (:func:`embedded_corpus_text`).
      val_fraction: share of each file held out, in (0, 1).

    Returns:
      The :class:`Corpus`.

    Raises:
      DataError: a path is missing, a folder is empty, a file is empty, binary or not UTF-8.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must lie in (0, 1), got {val_fraction!r}")
    tok = ByteTokenizer()
    if not paths:
        train, val = _split(tok.encode(embedded_corpus_text()), val_fraction)
        return Corpus(train=train, val=val, name="pydoc_data.topics")
    files = _expand(paths)
    trains, vals = [], []
    for f in files:
        try:
            data = np.frombuffer(f.read_bytes(), dtype=np.uint8)
        except OSError as e:
            raise DataError(f"cannot read --data file {str(f)!r}: {e.strerror}") from None
        check_text(f, data)
        t, v = _split(data, val_fraction)
        trains.append(t)
        vals.append(v)
    return Corpus(train=np.concatenate(trains), val=np.concatenate(vals),
                  name=", ".join(str(p) for p in paths), files=tuple(str(f) for f in files))


def check_text(path: str | os.PathLike, raw: np.ndarray) -> None:
    """Raise :class:`DataError` unless ``raw`` (the bytes of ``path``) is non-empty UTF-8 text.

    The tokenizer would accept any bytes, but a model trained on an image or a Latin-1 file
    learns nothing a user wants from a text model, and that is rarely what was meant.
    """
    name = repr(str(path))
    if raw.size == 0:
        raise DataError(f"--data file {name} is empty; remove it or pass a file with text")
    nul = np.flatnonzero(raw == 0)
    if nul.size:
        raise DataError(f"--data file {name} looks binary (a NUL byte at offset {nul[0]}); "
                        "pass text files only")
    try:
        raw.tobytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"--data file {name} is not UTF-8 text (byte 0x{raw[e.start]:02x} at "
                        f"offset {e.start}); convert it, e.g. iconv -f latin1 -t utf-8") from None


def check_length(tokens: np.ndarray, seq_len: int, split: str) -> None:
    """Raise :class:`DataError` unless ``tokens`` holds at least one window of ``seq_len + 1``."""
    if len(tokens) < seq_len + 1:
        raise DataError(
            f"the {split} split has {len(tokens)} bytes, fewer than seq_len + 1 = {seq_len + 1}; "
            "use more data or a shorter --seq-len"
        )


def train_batches(tokens: np.ndarray, *, seed: int, step: int, num_steps: int,
                  batch_size: int, seq_len: int, rows: slice = slice(None)) -> np.ndarray:
    """Random crops for steps ``step .. step + num_steps - 1``.

    The crops of step ``s`` depend only on ``(seed, s)`` (a NumPy generator seeded with both), so
    asking for steps in one chunk or one at a time, before or after a resume, gives the same
    batches.

    Args:
      tokens: [n] token ids (the train split).
      seed: the run's seed.
      step: first step (the optimizer step the batch is for).
      num_steps: how many consecutive steps.
      batch_size: B, the global batch per step.
      seq_len: T.
      rows: only these rows of each global batch (a host's share in a multi-host run: the
        crops of the other rows are drawn but not read).

    Returns:
      [num_steps, B, T + 1] int32 (B restricted to ``rows``).
    """
    check_length(tokens, seq_len, "train")
    high = len(tokens) - seq_len  # exclusive bound on a window start: start + T + 1 <= n
    window = np.arange(seq_len + 1)
    starts = np.stack([
        np.random.default_rng([_DATA_STREAM, seed, s]).integers(0, high, size=batch_size)
        for s in range(step, step + num_steps)
    ])[:, rows]  # [num_steps, B]
    return tokens[starts[..., None] + window].astype(np.int32)


def num_eval_windows(n_tokens: int, seq_len: int) -> int:
    """Windows of :func:`eval_batches`: consecutive, stride T, covering bytes 1..n-1 once."""
    return -(-(n_tokens - 1) // seq_len)


def eval_batches(tokens: np.ndarray, *, batch_size: int, seq_len: int,
                 max_windows: int | None = None) -> Iterator[np.ndarray]:
    """The validation split as consecutive windows, every byte after the first predicted once.

    Window ``i`` holds ``tokens[i·T : i·T + T + 1]``; the last window and the last batch are
    padded with :data:`IGNORE`, so every batch has the same shape and the loss averages exactly
    over the real bytes. Padding only ever follows real bytes, so under a causal model it never
    influences a real prediction; the steps feed ``max(input, 0)`` to the model.

    Args:
      tokens: [n] token ids.
      batch_size: B of each yielded batch.
      seq_len: T.
      max_windows: evaluate only the first this many windows (``None``: all).

    Yields:
      [B, T + 1] int32 batches.
    """
    check_length(tokens, seq_len, "validation")
    n_win = num_eval_windows(len(tokens), seq_len)
    if max_windows is not None:
        n_win = min(n_win, max_windows)
    padded = np.full(n_win * seq_len + 1, IGNORE, np.int32)
    used = min(len(tokens), len(padded))
    padded[:used] = tokens[:used]
    starts = np.arange(n_win) * seq_len
    windows = padded[starts[:, None] + np.arange(seq_len + 1)]  # [n_win, T + 1]
    for b0 in range(0, n_win, batch_size):
        batch = np.full((batch_size, seq_len + 1), IGNORE, np.int32)
        part = windows[b0:b0 + batch_size]
        batch[: len(part)] = part
        yield batch
