"""Reading a parallel dataset (:mod:`transformer_jax.data.prepare_pairs`): checked, read on demand.

:func:`open_pairs` checks ``meta.json`` against the files (every split's index and token files
present, of the sizes the index implies, the tokenizer unchanged) and returns a
:class:`PairDataset` whose splits are :class:`PairSplit`: the pairs' lengths in memory
(2 or 4 bytes a side, what batching by length needs), their token ids read from disk only
for the pairs asked for, so a dataset of any size costs the memory of its lengths.

:func:`dataset_kind` tells a parallel dataset from a language-model one, for the commands
that must refuse the other kind (:func:`check_kind`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from transformer_jax.data.corpus import DataError
from transformer_jax.data.prepare import FORMAT as LM_FORMAT
from transformer_jax.data.prepare import META
from transformer_jax.data.prepare_pairs import FORMAT, KIND, SPLITS, VERSION
from transformer_jax.data.prepared import read_tokenizer

__all__ = ["PairDataset", "PairSplit", "check_kind", "dataset_kind", "is_parallel",
           "open_pairs"]

_CHUNK = 1 << 20  # index rows read at a time when the lengths are computed


def dataset_kind(path: str | os.PathLike) -> str | None:
    """``"pairs"`` (a parallel dataset), ``"lm"`` (a language-model dataset), or ``None``
    (no readable ``meta.json``: raw text, or not a dataset)."""
    try:
        meta = json.loads((Path(path) / META).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(meta, dict):
        return None
    return KIND if meta.get("format") == FORMAT else "lm" if meta.get("format") == LM_FORMAT \
        else None


def is_parallel(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a parallel dataset folder (``prepare --pairs``)."""
    return dataset_kind(path) == KIND


def check_kind(path: str | os.PathLike, expected: str, flag: str = "--data") -> None:
    """Refuse a dataset of the other kind: an LM dataset where pairs are needed, or pairs
    where the language model's token stream is.

    Args:
      path: the dataset folder (a path that is no dataset passes: its own reader decides).
      expected: ``"pairs"`` or ``"lm"``.
      flag: the flag that named ``path``, for the message.

    Raises:
      DataError: ``path`` is a dataset of the other kind.
    """
    kind = dataset_kind(path)
    if kind is None or kind == expected:
        return
    if expected == KIND:
        raise DataError(f"{flag} {str(path)!r} is a language-model dataset (prepared without "
                        "--pairs); the encoder-decoder trains on pairs: prepare them with "
                        "python -m transformer_jax.prepare --pairs SOURCE... --out DIR")
    raise DataError(f"{flag} {str(path)!r} is a parallel dataset (prepared with --pairs); "
                    "train it with --task translate, or prepare text without --pairs for the "
                    "language model")


def _pread(f, out: np.ndarray, offset: int, path: Path) -> None:
    view = memoryview(out).cast("B")
    if view.nbytes and os.preadv(f.fileno(), [view], offset) != view.nbytes:
        raise DataError(f"{path} became shorter while it was read; prepare the dataset again")


class PairSplit:
    """One split of a parallel dataset: ``len`` pairs, their lengths, their ids on demand.

    Attributes:
      name: ``"train"``, ``"valid"`` or ``"test"``.
      lengths: [n, 2] ``uint16`` (``uint32`` past 65,535 tokens), column 0 the source's tokens,
        column 1 the target's, without ``<bos>``/``<eos>``.
      text_file: the raw texts' JSONL file (``valid``/``test``), or ``None``.
    """

    def __init__(self, folder: Path, name: str, meta: dict[str, Any], vocab_size: int):
        self.name, self.vocab_size = name, vocab_size
        self.dtype = np.dtype(meta["dtype"])
        info = meta["splits"][name]
        paths = [folder / f"{name}.{part}" for part in ("idx", "src.bin", "tgt.bin")]
        for p in paths:
            if not p.is_file():
                raise DataError(f"{p} is missing; prepare the dataset again")
        self._paths = paths
        self._files = [open(p, "rb", buffering=0) for p in paths]  # noqa: SIM115
        n = info["pairs"]
        if os.fstat(self._files[0].fileno()).st_size != 16 * (n + 1):
            raise DataError(f"{paths[0]} does not index the {n:,} pairs meta.json gives; "
                            "prepare the dataset again")
        self.lengths = self._read_lengths(n)
        ends = (info["source_tokens"], info["target_tokens"])
        for p, f, end in zip(paths[1:], self._files[1:], ends):
            if os.fstat(f.fileno()).st_size != end * self.dtype.itemsize:
                raise DataError(f"{p} does not hold the {end:,} tokens meta.json gives; "
                                "prepare the dataset again")
        self.text_file = folder / info["text"] if info.get("text") else None

    def _read_lengths(self, n: int) -> np.ndarray:
        """[n, 2] lengths from the index, a chunk at a time (checked to never decrease)."""
        out = np.empty((n, 2), np.uint16)  # widened only if a pair needs it
        for a in range(0, n, _CHUNK):
            rows = np.empty((min(_CHUNK, n - a) + 1, 2), np.int64)
            _pread(self._files[0], rows, 16 * a, self._paths[0])
            step = np.diff(rows, axis=0)
            if step.size and step.min() < 0:
                raise DataError(f"{self._paths[0]} is damaged (offsets decrease); prepare the "
                                "dataset again")
            if step.size and step.max() > 65535 and out.dtype == np.uint16:
                out = out.astype(np.uint32)
            out[a:a + len(step)] = step
        return out

    def __len__(self) -> int:
        return len(self.lengths)

    def pairs(self, index: Sequence[int] | np.ndarray) -> tuple[list[np.ndarray],
                                                                list[np.ndarray]]:
        """The token ids of the pairs ``index`` (any order, repeats allowed).

        Returns:
          (sources, targets): two lists of ``len(index)`` arrays, each [S_i] / [T_i] of the
          dataset's dtype, without ``<bos>``/``<eos>``.
        """
        index = np.asarray(index, np.int64).reshape(-1)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"pair index out of range for a split of {len(self)} pairs")
        sides: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
        rows = np.empty((2, 2), np.int64)
        for i in index.tolist():
            _pread(self._files[0], rows, 16 * i, self._paths[0])
            for side in (0, 1):
                ids = np.empty(int(rows[1, side] - rows[0, side]), self.dtype)
                _pread(self._files[1 + side], ids, int(rows[0, side]) * self.dtype.itemsize,
                       self._paths[1 + side])
                if ids.size and int(ids.max()) >= self.vocab_size:
                    raise DataError(f"{self._paths[1 + side]} holds token id {int(ids.max())}, "
                                    f"not below the vocabulary size {self.vocab_size}; the "
                                    "dataset is damaged, prepare it again")
                sides[side].append(ids)
        return sides

    def texts(self, limit: int | None = None) -> list[tuple[str, str]]:
        """The raw ``(source, target)`` texts, in the split's order (the first ``limit``).

        Raises:
          DataError: the split keeps no text (``train``).
        """
        if self.text_file is None:
            raise DataError(f"the {self.name} split keeps no raw text (only valid and test do)")
        out = []
        with open(self.text_file, encoding="utf-8") as f:
            for line in f:
                if limit is not None and len(out) >= limit:
                    break
                record = json.loads(line)
                out.append((record["source"], record["target"]))
        return out


@dataclasses.dataclass(frozen=True)
class PairDataset:
    """An opened parallel dataset folder.

    Attributes:
      path: the folder.
      meta: its ``meta.json``.
      tokenizer: its :class:`~transformer_jax.data.bpe.BPETokenizer` (both sides).
      tokenizer_json: the text of its ``tokenizer.json`` (a run directory keeps a copy).
      train, valid, test: the splits.
    """

    path: Path
    meta: dict[str, Any]
    tokenizer: Any
    tokenizer_json: str
    train: PairSplit
    valid: PairSplit
    test: PairSplit

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def pad_id(self) -> int:
        return int(self.meta["tokenizer"]["pad_id"])

    @property
    def bos_id(self) -> int:
        return int(self.meta["tokenizer"]["bos_id"])

    @property
    def eos_id(self) -> int:
        return int(self.meta["tokenizer"]["eos_id"])

    def detokenize(self, ids) -> str:
        """[L] ids (a decoder's output) -> text: up to the first ``<eos>``, specials dropped."""
        ids = np.asarray(ids).reshape(-1)
        stop = np.flatnonzero(ids == self.eos_id)
        ids = ids[:stop[0]] if stop.size else ids
        return self.tokenizer.decode(ids[ids >= len(self.tokenizer.special_ids)])


def _read_meta(path: Path) -> dict[str, Any]:
    check_kind(path, KIND)
    if dataset_kind(path) != KIND:
        raise DataError(f"{str(path)!r} holds no parallel dataset ({META} missing or not one); "
                        "prepare it with python -m transformer_jax.prepare --pairs")
    meta = json.loads((path / META).read_text(encoding="utf-8"))
    if meta.get("version") != VERSION:
        raise DataError(f"{path} was prepared in format version {meta.get('version')}; this "
                        f"version reads {VERSION}: prepare it again")
    return meta


def open_pairs(path: str | os.PathLike) -> PairDataset:
    """Open and check a folder written by ``python -m transformer_jax.prepare --pairs``.

    Raises:
      DataError: no parallel dataset there (an LM dataset says so), a missing or resized
        file, an altered tokenizer (each message names the file).
    """
    path = Path(path)
    meta = _read_meta(path)
    tok, tok_json = read_tokenizer(path, meta)
    splits = {name: PairSplit(path, name, meta, tok.vocab_size) for name in SPLITS}
    return PairDataset(path, meta, tok, tok_json, **splits)
