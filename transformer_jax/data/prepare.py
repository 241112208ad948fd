"""``prepare``: sources -> a tokenized dataset on disk that training reads in place.

The folder it writes holds

* ``meta.json``: format version, tokenizer kind, vocabulary size and sha256, token dtype,
  token and byte counts per split with their shard files, and the sources with their sizes
  and sha256;
* ``tokenizer.json``: the tokenizer (the ``tokenizers`` library's file for BPE);
* ``train-00000.bin``, ..., ``val-00000.bin``, ...: the token ids as one flat array per split,
  ``uint16`` (``uint32`` when the vocabulary exceeds 65,535), cut into shards of at most
  :attr:`PrepareSettings.shard_bytes`; the same layout as nanoGPT's ``train.bin`` and
  MaxText's OLMo token files.

Documents follow each other, each ended by the tokenizer's end-of-text id. The last
``val_tokens`` tokens of that stream are the validation split, the rest the training split.
Memory stays flat in the corpus size: sources are read, encoded and written a batch of pieces at
a time (:mod:`transformer_jax.data.sources`), and BPE is trained on the first ``sample_bytes``
of text, never on the validation tail (:func:`_sample_limit`). The dataset is written into a
hidden temporary folder beside ``out`` and renamed at the end, so an interrupted run leaves no
folder that training accepts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from transformer_jax.data import bpe
from transformer_jax.data.corpus import DataError, expand_paths
from transformer_jax.data.sources import Source, iter_pieces
from transformer_jax.data.tokenizer import ByteTokenizer

__all__ = ["FORMAT", "META", "TOKENIZER", "PrepareSettings", "prepare_dataset"]

FORMAT, VERSION = "transformer_jax tokens", 1
META, TOKENIZER = "meta.json", "tokenizer.json"
# Text encoded per encode_batch call (16 pieces). The encoder's transient memory grows with the
# batch, and a larger batch was no faster (benchmarks/results/data_pipeline/NOTES.md).
BATCH_BYTES = 4 << 20
SAMPLE_PART = 16 << 10  # characters per string handed to the BPE trainer (see _sample)
DEFAULT_VAL = (0.1, 1 << 20)  # 10% of the tokens, at most this many


@dataclasses.dataclass(frozen=True)
class PrepareSettings:
    """The flags of ``python -m transformer_jax.prepare`` (see its ``--help``)."""

    tokenizer: str = "bpe"
    vocab_size: int | None = None  # bpe: 8192; byte: 256 (the only one)
    val_fraction: float | None = None
    val_tokens: int | None = None
    text_field: str = "text"
    overwrite: bool = False
    shard_bytes: int = 1 << 30
    sample_bytes: int = 64 << 20


def _check(s: PrepareSettings) -> None:
    if s.tokenizer not in ("bpe", "byte"):
        raise DataError(f"--tokenizer must be bpe or byte, got {s.tokenizer!r}")
    if s.tokenizer == "byte" and s.vocab_size not in (None, ByteTokenizer.vocab_size):
        raise DataError(f"--vocab-size is 256 for --tokenizer byte, got {s.vocab_size}")
    if s.tokenizer == "bpe" and s.vocab_size is not None and not (
            bpe.MIN_VOCAB <= s.vocab_size <= bpe.MAX_VOCAB):
        raise DataError(f"--vocab-size must lie in [{bpe.MIN_VOCAB}, {bpe.MAX_VOCAB}] for bpe "
                        f"(the 256 bytes and the end-of-text token at least), got {s.vocab_size}")
    if s.val_fraction is not None and s.val_tokens is not None:
        raise DataError("give --val-fraction or --val-tokens, not both")
    if s.val_fraction is not None and not 0.0 < s.val_fraction < 1.0:
        raise DataError(f"--val-fraction must lie in (0, 1), got {s.val_fraction}")
    if s.val_tokens is not None and s.val_tokens < 2:
        raise DataError(f"--val-tokens must be >= 2, got {s.val_tokens}")
    if s.shard_bytes < 8 or s.sample_bytes < 1:
        raise DataError(f"--shard-mb and --sample-mb must be positive (at least 8 bytes of "
                        f"shard), got {s.shard_bytes} and {s.sample_bytes} bytes")


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an ``out`` that prepare must not replace (before any work is done)."""
    if out.is_file():
        raise DataError(f"--out {out} is a file; choose a folder")
    if (out / META).exists() and not overwrite:
        raise DataError(f"--out {out} already holds a dataset; pass --overwrite to replace it, "
                        "or choose another folder")
    if out.is_dir() and not (out / META).exists() and any(out.iterdir()):
        raise DataError(f"--out {out} is a folder that is not empty and holds no {META}; "
                        "choose a new or empty folder")


def _batches(pieces: Iterator[tuple[str, bool]]) -> Iterator[list[tuple[str, bool]]]:
    """Consecutive pieces, about :data:`BATCH_BYTES` of text a batch."""
    batch, size = [], 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece[0])
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _sample(sources: list[Source], text_field: str, limit: int) -> Iterator[str]:
    """The first ``limit`` characters of text (cut inside the last piece), in parts of about
    :data:`SAMPLE_PART` characters, each ending after a newline where the piece has one.

    The BPE trainer buffers a few hundred of the strings it is given before counting their
    words: given large pieces it held the whole sample, so its peak memory grew with the sample;
    given parts this small it stays flat, and the tokenizer is the same (pieces already end
    after newlines, so no word is cut differently).
    """
    seen = 0
    for text, _ in iter_pieces([Source(s.path) for s in sources], text_field):
        if seen >= limit:
            return
        text, start = text[:limit - seen], 0
        seen += len(text)
        while start < len(text):
            end = text.find("\n", start + SAMPLE_PART) + 1 or len(text)
            yield text[start:end]
            start = end


def _sample_limit(sources: list[Source], s: PrepareSettings) -> int:
    """Characters of text BPE learns from: ``sample_bytes``, but none of the validation tail.

    The validation split is the last tokens, whose share of the text is known only once the
    text is encoded; so its share is over-estimated by 25% (and a token taken as 8 characters
    for ``--val-tokens``), and the text is counted only as far as the decision needs: for a
    corpus much larger than the sample, its first ``sample_bytes`` or so.
    """
    frac, reserve = (0.0, 8 * s.val_tokens) if s.val_tokens is not None else (
        s.val_fraction if s.val_fraction is not None else DEFAULT_VAL[0], 0)
    frac, reserve = min(1.25 * frac, 0.95), 1.25 * reserve
    enough = (s.sample_bytes + reserve) / (1 - frac)
    total = 0
    for text, _ in iter_pieces([Source(src.path) for src in sources], s.text_field):
        total += len(text)
        if total >= enough:
            return s.sample_bytes
    return max(int(total * (1 - frac) - reserve), 1)


class _ShardWriter:
    """Appends token ids to ``<split>-NNNNN.bin`` files of at most ``shard_tokens`` each."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.cap = folder, split, dtype, shard_tokens
        self.shards: list[list[Any]] = []  # [file name, tokens]
        self.f = None

    def write(self, ids: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, self.dtype)
        while ids.size:
            if not self.shards or self.shards[-1][1] == self.cap:
                self._next()
            room = self.cap - self.shards[-1][1]
            self.f.write(ids[:room].tobytes())
            self.shards[-1][1] += len(ids[:room])
            ids = ids[room:]

    def _next(self) -> None:
        if self.f is not None:
            self.f.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self.f = open(self.folder / name, "wb")  # noqa: SIM115 (closed by _next/close)
        self.shards.append([name, 0])

    @property
    def total(self) -> int:
        return sum(n for _, n in self.shards)

    def close(self) -> None:
        if self.f is not None:
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
            self.f = None

    def move_tail(self, n: int, into: _ShardWriter, token_bytes: np.ndarray) -> int:
        """Move the last ``n`` tokens into ``into`` (streamed); returns their bytes of text."""
        self.close()
        keep, start, moved, kept = self.total - n, 0, 0, []
        for name, count in self.shards:
            path = self.folder / name
            stay = min(max(keep - start, 0), count)  # this shard's tokens that stay
            for a in range(stay, count, 1 << 24):
                chunk = np.fromfile(path, self.dtype, min(1 << 24, count - a),
                                    offset=a * self.dtype.itemsize)
                into.write(chunk)
                moved += int(token_bytes[chunk].sum())
            if stay == 0:
                path.unlink()
            else:
                os.truncate(path, stay * self.dtype.itemsize)
                kept.append([name, stay])
            start += count
        self.shards = kept
        into.close()
        return moved


def _val_size(n: int, s: PrepareSettings) -> int:
    frac, cap = DEFAULT_VAL
    n_val = (s.val_tokens if s.val_tokens is not None else
             round(n * s.val_fraction) if s.val_fraction is not None else min(round(n * frac), cap))
    if n_val < 2 or n - n_val < 2:
        raise DataError(f"the sources hold {n:,} tokens, too few to hold out {n_val:,} for "
                        "validation and train on the rest; add text or change --val-fraction "
                        "/ --val-tokens")
    return n_val


def _encode_all(tok, sources: list[Source], s: PrepareSettings, tmp: Path, dtype: np.dtype,
                token_bytes: np.ndarray) -> tuple[_ShardWriter, int, int]:
    """Encode every piece into train shards; returns (writer, bytes of text, documents)."""
    writer = _ShardWriter(tmp, "train", dtype, s.shard_bytes // dtype.itemsize)
    eot = np.asarray([tok.eot_id], dtype)
    n_bytes = n_docs = 0
    for batch in _batches(iter_pieces(sources, s.text_field)):
        encoded = tok.encode_batch([text for text, _ in batch])
        parts = []
        for ids, (_, ends) in zip(encoded, batch):
            parts.append(ids)
            if ends:
                parts.append(eot)
                n_docs += 1
        ids = np.concatenate(parts).astype(dtype)
        n_bytes += int(token_bytes[ids].sum())
        writer.write(ids)
    return writer, n_bytes, n_docs


def prepare_dataset(paths: Sequence[str | os.PathLike], out: str | os.PathLike,
                    settings: PrepareSettings = PrepareSettings(),
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """Tokenize ``paths`` into the dataset folder ``out``; returns its ``meta.json`` content.

    Raises:
      DataError: bad settings, unusable sources, or an ``out`` that must not be replaced;
        ``out`` is then left as it was.
    """
    s, out = settings, Path(out)
    _check(s)
    _check_out(out, s.overwrite)
    sources = [Source(p) for p in expand_paths(paths, "source")]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.prepare-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's folder is private; the dataset is not
    try:
        if s.tokenizer == "bpe":
            limit = _sample_limit(sources, s)
            log(f"training byte-level BPE (vocabulary {s.vocab_size or 8192}) on the first "
                f"{limit / 2**20:.1f} MiB of text")
            tok = bpe.train_bpe(_sample(sources, s.text_field, limit), s.vocab_size or 8192)
            if tok.vocab_size < (s.vocab_size or 8192):
                log(f"note: the text supports only {tok.vocab_size} tokens; the vocabulary has "
                    "that many")
        else:
            tok = ByteTokenizer()
        (tmp / TOKENIZER).write_text(tok.to_json(), encoding="utf-8")
        dtype = np.dtype(np.uint16 if tok.vocab_size <= 65535 else np.uint32)
        token_bytes = tok.token_bytes()
        log(f"encoding {len(sources)} source file(s)")
        train, n_bytes, n_docs = _encode_all(tok, sources, s, tmp, dtype, token_bytes)
        n_val = _val_size(train.total, s)
        val = _ShardWriter(tmp, "val", dtype, train.cap)
        val_bytes = train.move_tail(n_val, val, token_bytes)
        meta = _meta(tok, tmp, dtype, train, val, n_bytes - val_bytes, val_bytes, n_docs,
                     sources, paths)
        (tmp / META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _meta(tok, tmp: Path, dtype: np.dtype, train: _ShardWriter, val: _ShardWriter,
          train_bytes: int, val_bytes: int, n_docs: int, sources: list[Source],
          paths: Sequence[str | os.PathLike]) -> dict[str, Any]:
    sha = hashlib.sha256((tmp / TOKENIZER).read_bytes()).hexdigest()
    return {
        "format": FORMAT, "version": VERSION,
        "tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
                      "file": TOKENIZER, "sha256": sha},
        "dtype": dtype.name, "documents": n_docs,
        "splits": {name: {"tokens": w.total, "bytes": b,
                          "shards": [{"file": f, "tokens": n} for f, n in w.shards]}
                   for name, w, b in (("train", train, train_bytes), ("val", val, val_bytes))},
        "sources": [{"path": str(src.path), "bytes": src.size, "sha256": src.sha256}
                    for src in sources],
        "paths": [str(p) for p in paths]}


def _publish(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; a replaced dataset is removed only after the rename."""
    old = None
    if out.exists():  # an empty folder, or a dataset replaced with --overwrite
        old = out.with_name(f".{out.name}.replaced-{tmp.name.rsplit('-', 1)[-1]}")
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

