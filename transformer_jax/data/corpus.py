"""Text corpora, split into train and validation bytes.

:func:`load_corpus` reads the embedded default corpus (the Python reference manual that ships
with CPython as ``pydoc_data.topics``) or text files and folders, checks that they are UTF-8
text, and splits each file into a training head and a validation tail.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from transformer_jax.data.tokenizer import ByteTokenizer

__all__ = ["Corpus", "DataError", "check_text", "embedded_corpus_text", "expand_paths",
           "load_corpus"]


class DataError(ValueError):
    """A data path or split that cannot be used; the message says which and why."""


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


def expand_paths(paths: Sequence[str | os.PathLike], what: str = "--data") -> list[Path]:
    """Files named directly, then every non-hidden file under each folder, in sorted order.

    ``what`` names the paths in error messages ("--data", "source").
    """
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
                raise DataError(f"{what} folder {str(raw)!r} contains no files")
            files.extend(found)
        else:
            raise DataError(f"{what} path {str(raw)!r} does not exist")
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
    files = expand_paths(paths)
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
