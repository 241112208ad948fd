"""Reading a prepared dataset (:mod:`transformer_jax.data.prepare`): checked, memory-mapped.

:func:`open_dataset` checks ``meta.json`` against the files before training starts: every
shard present with exactly the size ``meta.json`` gives, a whole number of tokens, and the
tokenizer unchanged (its sha256). The splits are :class:`ShardedTokens`: the shards mapped
into memory, read only where a batch looks, so a dataset of any size costs no memory up front.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np

from transformer_jax.data.bpe import load_tokenizer
from transformer_jax.data.corpus import DataError, load_corpus
from transformer_jax.data.prepare import FORMAT, META, TOKENIZER, VERSION
from transformer_jax.data.tokenizer import ByteTokenizer

__all__ = ["LMData", "PreparedDataset", "ShardedTokens", "data_vocab_size", "is_prepared",
           "load_lm_data", "looks_prepared", "open_dataset"]


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
    its ids against the vocabulary. Pages read are handed back to the kernel after each read
    (``madvise(MADV_DONTNEED)``): they stay in the page cache, but not in this process's
    resident memory, which so stays flat however much of the corpus training has seen.
    """

    def __init__(self, paths: list[Path], dtype: np.dtype, vocab_size: int):
        self._maps, self._arrays, starts = [], [], [0]
        for path in paths:
            with open(path, "rb") as f:
                m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            # Random crops read a few pages each; with the kernel's readahead every fault would
            # map a whole large folio (megabytes) into this process.
            m.madvise(mmap.MADV_RANDOM)
            self._maps.append(m)
            self._arrays.append(np.frombuffer(m, dtype))
            starts.append(starts[-1] + len(self._arrays[-1]))
        self._starts = np.asarray(starts, np.int64)
        self._paths, self.dtype, self.vocab_size = paths, dtype, vocab_size

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, slice):
            index = np.arange(*index.indices(len(self)))
        index = np.asarray(index, np.int64)
        shard = np.searchsorted(self._starts, index, side="right") - 1
        out = np.empty(index.shape, self.dtype)
        for s in np.unique(shard):
            mask = shard == s
            out[mask] = self._arrays[s][index[mask] - self._starts[s]]
            self._maps[s].madvise(mmap.MADV_DONTNEED)
        if out.size and int(out.max()) >= self.vocab_size:
            s = int(shard.flat[int(np.argmax(out))])
            raise DataError(f"{self._paths[s]} holds token id {int(out.max())}, not below the "
                            f"vocabulary size {self.vocab_size}; the dataset is damaged, "
                            "prepare it again")
        return out


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


def _read_tokenizer(path: Path, meta: dict[str, Any]) -> tuple[Any, str]:
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
    tok, tok_json = _read_tokenizer(path, meta)
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
