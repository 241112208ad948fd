"""Reading a prepared dataset (:mod:`transformer_jax.data.prepare`): checked, read on demand.

:func:`open_dataset` checks ``meta.json`` against the files before training starts: every
shard present with exactly the size ``meta.json`` gives, a whole number of tokens, and the
tokenizer unchanged (its sha256). The splits are :class:`ShardedTokens`: the shards read only
where a batch looks, so a dataset of any size costs no memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from transformer_jax.data.bpe import load_tokenizer
from transformer_jax.data.corpus import DataError, load_corpus
from transformer_jax.data.prepare import FORMAT, META, TOKENIZER, VERSION
from transformer_jax.data.tokenizer import ByteTokenizer

__all__ = ["LMData", "PreparedDataset", "ShardedTokens", "data_vocab_size", "is_prepared",
           "load_lm_data", "looks_prepared", "open_dataset", "read_tokenizer"]


def is_prepared(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a dataset folder (it holds ``meta.json``)."""
    return (Path(path) / META).is_file()


def looks_prepared(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder with a dataset's files (meta.json, tokenizer or shards)."""
    p = Path(path)
    return p.is_dir() and ((p / META).exists() or (p / TOKENIZER).exists()
                           or any(p.glob("train-*.bin")))


class ShardedTokens:
    """The shards of one split as one flat read-only array of token ids.

    Supports ``len`` and indexing by a slice or an integer array (what the batch functions of
    :mod:`transformer_jax.data.batches` use); a window may span two shards. Every read checks
    its ids against the vocabulary.

    The shards are read with ``preadv`` straight into the batch, never mapped: a page fault in
    a mapped file maps the whole page-cache folio around it (on ext4 with large folios, up to
    megabytes per window), so a batch of random windows from a large mapped corpus briefly held
    hundreds of MB in this process even with the pages released after each read. Read this
    way, the file's pages stay in the kernel's page cache and this process's memory stays flat
    however large the corpus.
    """

    def __init__(self, paths: list[Path], dtype: np.dtype, vocab_size: int):
        self._files = [open(path, "rb", buffering=0) for path in paths]  # noqa: SIM115
        sizes = [os.fstat(f.fileno()).st_size // dtype.itemsize for f in self._files]
        self._starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self._paths, self.dtype, self.vocab_size = paths, dtype, vocab_size

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _read_into(self, out: np.ndarray, start: int) -> None:
        """Fill ``out`` ([n], contiguous) with the ids ``start .. start + n - 1``."""
        done = 0
        while done < len(out):
            pos = start + done
            s = int(np.searchsorted(self._starts, pos, side="right")) - 1
            n = min(len(out) - done, int(self._starts[s + 1]) - pos)
            view = memoryview(out[done:done + n]).cast("B")
            offset = (pos - int(self._starts[s])) * self.dtype.itemsize
            if os.preadv(self._files[s].fileno(), [view], offset) != view.nbytes:
                raise DataError(f"shard {self._paths[s]} became shorter while training read "
                                "it; prepare the dataset again")
            if int(out[done:done + n].max()) >= self.vocab_size:
                raise DataError(f"{self._paths[s]} holds token id {int(out[done:done + n].max())}"
                                f", not below the vocabulary size {self.vocab_size}; the dataset "
                                "is damaged, prepare it again")
            done += n

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return self[np.arange(start, stop, step)]
            out = np.empty(max(0, stop - start), self.dtype)
            self._read_into(out, start)
            return out
        index = np.asarray(index, np.int64)
        if not index.size:
            return np.empty(index.shape, self.dtype)
        if int(index.min()) < 0 or int(index.max()) >= len(self):
            raise IndexError(f"token index out of range for a split of {len(self)} tokens")
        rows = index.reshape(-1, index.shape[-1] if index.ndim else 1)
        out = np.empty(rows.shape, self.dtype)
        if rows.shape[1] and bool(np.all(np.diff(rows, axis=1) == 1)):  # windows: one read each
            for r, first in enumerate(rows[:, 0].tolist()):
                self._read_into(out[r], first)
        else:  # any other index: read the runs of consecutive ids among those asked for
            ids, inverse = np.unique(rows, return_inverse=True)
            got = np.empty(ids.shape, self.dtype)
            runs = np.split(np.arange(len(ids)), np.flatnonzero(np.diff(ids) != 1) + 1)
            for run in runs:
                if len(run):
                    self._read_into(got[run[0]:run[-1] + 1], int(ids[run[0]]))
            out = got[inverse.reshape(rows.shape)]
        return out.reshape(index.shape)


@dataclasses.dataclass(frozen=True)
class PreparedDataset:
    """An opened dataset folder.

    Attributes:
      path: the folder.
      meta: its ``meta.json``.
      tokenizer: its tokenizer (:class:`~transformer_jax.data.bpe.BPETokenizer` or
        :class:`~transformer_jax.data.ByteTokenizer`).
      tokenizer_json: the text of its ``tokenizer.json`` (a run directory keeps a copy).
      train, val: the splits.
    """

    path: Path
    meta: dict[str, Any]
    tokenizer: Any
    tokenizer_json: str
    train: ShardedTokens
    val: ShardedTokens

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def val_bytes(self) -> int:
        """Bytes of text the validation split stands for (the denominator of val_bpb)."""
        return int(self.meta["splits"]["val"]["bytes"])


def _read_meta(path: Path) -> dict[str, Any]:
    if not (path / META).is_file():
        raise DataError(f"--data folder {str(path)!r} has a dataset's files but no {META}: an "
                        "interrupted or damaged prepare; run python -m transformer_jax.prepare "
                        "again")
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
        ok = (meta["format"] == FORMAT and isinstance(meta["splits"]["train"]["shards"], list)
              and isinstance(meta["tokenizer"]["vocab_size"], int))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise DataError(f"{path / META} is not the meta.json of a prepared dataset; prepare it "
                        "again")
    if meta["version"] != VERSION:
        raise DataError(f"{path} was prepared in format version {meta['version']}; this version "
                        f"reads {VERSION}: prepare it again")
    return meta


def read_tokenizer(path: Path, meta: dict[str, Any]) -> tuple[Any, str]:
    """(tokenizer, its JSON) of a dataset folder, checked against ``meta.json``'s record of it
    (any dataset ``prepare`` writes, text or pairs).

    Raises:
      DataError: the file is missing, altered, unreadable or of another size.
    """
    file = path / TOKENIZER
    if not file.is_file():
        raise DataError(f"{path} has no {TOKENIZER}; prepare the dataset again")
    raw = file.read_bytes()
    if hashlib.sha256(raw).hexdigest() != meta["tokenizer"]["sha256"]:
        raise DataError(f"{file} differs from the tokenizer the dataset was prepared with (its "
                        "sha256 in meta.json); restore it or prepare the dataset again")
    try:
        tok = load_tokenizer(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{file} cannot be read: {e}") from None
    if tok.vocab_size != meta["tokenizer"]["vocab_size"]:
        raise DataError(f"{file} has {tok.vocab_size} tokens, meta.json says "
                        f"{meta['tokenizer']['vocab_size']}; prepare the dataset again")
    return tok, raw.decode("utf-8")


def _split(path: Path, meta: dict[str, Any], name: str, vocab_size: int) -> ShardedTokens:
    dtype = np.dtype(meta["dtype"])
    files = []
    for shard in meta["splits"][name]["shards"]:
        file = path / shard["file"]
        if not file.is_file():
            raise DataError(f"shard {file} is missing; prepare the dataset again")
        size = file.stat().st_size
        if size % dtype.itemsize:
            raise DataError(f"shard {file} has {size} bytes, not a whole number of "
                            f"{dtype.name} tokens; prepare the dataset again")
        if size // dtype.itemsize != shard["tokens"] or size == 0:
            raise DataError(f"shard {file} holds {size // dtype.itemsize} tokens, meta.json "
                            f"says {shard['tokens']}; prepare the dataset again")
        files.append(file)
    return ShardedTokens(files, dtype, vocab_size)


def open_dataset(path: str | os.PathLike) -> PreparedDataset:
    """Open and check a dataset folder written by ``python -m transformer_jax.prepare``.

    Raises:
      DataError: no ``meta.json``, a shard missing or of the wrong size, a missing or altered
        tokenizer (each message says which file).
    """
    path = Path(path)
    meta = _read_meta(path)
    tok, tok_json = read_tokenizer(path, meta)
    train, val = (_split(path, meta, name, tok.vocab_size) for name in ("train", "val"))
    return PreparedDataset(path, meta, tok, tok_json, train, val)


@dataclasses.dataclass(frozen=True)
class LMData:
    """What the language model trains on, from raw text or a prepared dataset.

    Attributes:
      train, val: the splits (arrays, or :class:`ShardedTokens`).
      tokenizer: the tokenizer the ids belong to.
      tokenizer_json: its ``tokenizer.json`` text (a run directory keeps a copy), or ``None``
        for raw text (bytes: nothing to keep).
      name: where the data came from.
      unit: what a token is ("byte", "token").
      bytes_per_target: bytes of text per validation target (val_bpb's conversion).
    """

    train: Any
    val: Any
    tokenizer: Any
    tokenizer_json: str | None
    name: str
    unit: str
    bytes_per_target: float


def load_lm_data(paths: tuple[str, ...], val_fraction: float) -> LMData:
    """A prepared dataset if ``paths`` is one dataset folder, else raw text (``load_corpus``).

    Raises:
      DataError: as :func:`open_dataset` or :func:`~transformer_jax.data.load_corpus`, or a
        dataset folder given together with other paths.
    """
    marked = [p for p in paths if looks_prepared(p)]
    if marked and len(paths) > 1:
        raise DataError(f"--data {marked[0]} is a prepared dataset: pass it alone (prepare "
                        "several sources into one dataset instead)")
    if marked:
        ds = open_dataset(marked[0])
        return LMData(ds.train, ds.val, ds.tokenizer, ds.tokenizer_json, str(ds.path),
                      "token", ds.val_bytes / max(len(ds.val) - 1, 1))
    corpus = load_corpus(paths, val_fraction)
    return LMData(corpus.train, corpus.val, ByteTokenizer(), None, corpus.name, "byte", 1.0)


def data_vocab_size(paths: tuple[str, ...] | list[str]) -> int:
    """The vocabulary ``paths`` need: the dataset's, or 256 for raw text (bytes)."""
    marked = [p for p in paths if looks_prepared(p)]
    if len(paths) == 1 and marked:
        return int(_read_meta(Path(marked[0]))["tokenizer"]["vocab_size"])
    return ByteTokenizer.vocab_size
