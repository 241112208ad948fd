"""``prepare --pairs``: text pairs -> a tokenized parallel dataset that training reads in place.

The folder it writes holds

* ``meta.json``: ``"kind": "pairs"``, format version, tokenizer, token dtype, the pairs,
  source and target tokens per split, the filters with the pairs each removed, and the inputs;
* ``tokenizer.json``: one byte-level BPE for both sides, as the paper's "shared source-target
  vocabulary" (§5.1), trained on training pairs only; its special tokens ``<pad>``, ``<bos>``,
  ``<eos>`` have ids 0, 1, 2, the encoder–decoder's defaults;
* per split (``train``, ``valid``, ``test``): ``<split>.src.bin`` and ``<split>.tgt.bin``, the
  token ids of the sources and of the targets, each one flat ``uint16`` array (``uint32`` when
  the vocabulary exceeds 65,535), pair after pair, without ``<bos>``/``<eos>``; and
  ``<split>.idx``, ``int64 [n + 1, 2]``: row ``i`` holds where pair ``i``'s source and target
  start in those arrays, the last row their sizes (the index of fairseq's and Megatron's
  indexed datasets, both sides in one file);
* ``valid.text.jsonl`` and ``test.text.jsonl``: the raw texts of those splits,
  ``{"source": ..., "target": ...}`` a line, for scoring detokenised output.

Pairs are filtered as Moses' ``clean-corpus-n`` does, counting BPE tokens instead of words:
an empty side, more than ``max_tokens`` tokens on either side, or a length ratio above
``max_ratio`` (Moses' default is 9); and exact duplicates are dropped. The test split is only
cleared of empty sides and duplicates: the paper scores a whole test set.

A pair belongs to the validation or test split by a hash of its source text (blake2b), so
every pair with a given source lands in the same split whatever the file order, and no test
source is ever trained on; or the splits come from their own files (``valid``/``test``), and
training pairs whose source is among theirs are dropped.

Memory stays flat in the text: the inputs are read three times, line by line (a scan that
hashes each pair for the duplicate filter, the BPE sample, then encoding in batches of
:data:`BATCH_PAIRS`); what grows with the corpus is 8 bytes a pair (the hashes) during the scan
and 1 byte a pair (which pairs to keep) after it. The dataset is written into a hidden
temporary folder beside ``out`` and renamed at the end, so an interrupted or refused run
leaves ``out`` as it was.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from transformer_jax.data import bpe
from transformer_jax.data.corpus import DataError
from transformer_jax.data.pair_files import PairFiles, iter_pairs
from transformer_jax.data.prepare import META, TOKENIZER, _check_out, _publish

__all__ = ["FORMAT", "KIND", "SPLITS", "VERSION", "PairSettings", "prepare_pairs",
           "source_hash", "summary"]

FORMAT, VERSION, KIND = "transformer_jax pairs", 1, "pairs"
SPLITS = ("train", "valid", "test")
BATCH_PAIRS = 8192  # pairs encoded per encode_batch call (both sides: 16,384 texts)
SAMPLE_PART = 16 << 10  # characters per string handed to the BPE trainer (prepare's reason)
DEFAULT_SPLIT = (0.01, 5000)  # a held-out split's default share of the pairs, at most this many
FILTERS = ("empty", "duplicate", "too_long", "ratio", "overlap")


@dataclasses.dataclass(frozen=True)
class PairSettings:
    """The flags of ``python -m transformer_jax.prepare --pairs`` (see its ``--help``)."""

    vocab_size: int = 8192
    max_tokens: int = 256
    max_ratio: float = 9.0
    valid_fraction: float | None = None  # None: 1%, at most 5,000 pairs
    test_fraction: float | None = None
    overwrite: bool = False
    sample_bytes: int = 64 << 20


def _check(s: PairSettings) -> None:
    least = 256 + len(bpe.PAIR_SPECIALS)
    if not least <= s.vocab_size <= bpe.MAX_VOCAB:
        raise DataError(f"--vocab-size must lie in [{least}, {bpe.MAX_VOCAB}] (the 256 bytes "
                        f"and {', '.join(bpe.PAIR_SPECIALS)} at least), got {s.vocab_size}")
    if s.max_tokens < 1:
        raise DataError(f"--max-tokens must be >= 1, got {s.max_tokens}")
    if not s.max_ratio >= 1.0:
        raise DataError(f"--max-ratio must be >= 1, got {s.max_ratio}")
    for name, f in (("--valid-fraction", s.valid_fraction), ("--test-fraction", s.test_fraction)):
        if f is not None and not 0.0 <= f < 1.0:
            raise DataError(f"{name} must lie in [0, 1), got {f}")
    if (s.valid_fraction or 0.0) + (s.test_fraction or 0.0) >= 1.0:
        raise DataError("--valid-fraction and --test-fraction leave no pair to train on")
    if s.sample_bytes < 1:
        raise DataError(f"--sample-mb must be positive, got {s.sample_bytes} bytes")


def source_hash(source: str) -> float:
    """Where ``source`` falls in [0, 1): a stable hash (blake2b) that picks its split."""
    return _source_digest(source) / 2.0**64


def _pair_hash(source: str, target: str) -> int:
    # 0xff never occurs in UTF-8: no two different pairs hash the same bytes.
    raw = source.encode("utf-8") + b"\xff" + target.encode("utf-8")
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")


def _scan(train: PairFiles, counts: dict[str, int]) -> np.ndarray:
    """Pass 1: [n] bool, which non-empty pairs of ``train`` are first of their kind."""
    hashes, part = [], []
    for source, target in iter_pairs(train):
        counts["read"] += 1
        if not source or not target:
            counts["empty"] += 1
            continue
        part.append(_pair_hash(source, target))
        if len(part) == 1 << 16:  # Python ints cost 32 bytes each: keep 8
            hashes.append(np.asarray(part, np.uint64))
            part = []
    hashes.append(np.asarray(part, np.uint64))
    flat = np.concatenate(hashes)
    del hashes
    keep = np.zeros(len(flat), bool)
    keep[np.unique(flat, return_index=True)[1]] = True
    counts["duplicate"] += int(len(flat) - keep.sum())
    return keep


class _Splitter:
    """The split of a training-input pair: by source hash, or dropped for overlap."""

    def __init__(self, n_pairs: int, s: PairSettings, explicit: dict[str, set[int]]):
        self.bounds = []
        lo = 0.0
        for name, fraction in (("test", s.test_fraction), ("valid", s.valid_fraction)):
            if name in explicit:
                continue
            share = fraction if fraction is not None else min(DEFAULT_SPLIT[0],
                                                               DEFAULT_SPLIT[1] / max(n_pairs, 1))
            self.bounds.append((lo + share, name))
            lo += share
        self.overlap = set().union(*explicit.values()) if explicit else set()

    def __call__(self, source: str) -> str | None:
        if self.overlap and _source_digest(source) in self.overlap:
            return None
        u = source_hash(source)
        return next((name for bound, name in self.bounds if u < bound), "train")


def _source_digest(source: str) -> int:
    return int.from_bytes(hashlib.blake2b(source.encode("utf-8"), digest_size=8).digest(),
                          "little")


def _kept_pairs(train: PairFiles, keep: np.ndarray) -> Iterator[tuple[str, str]]:
    """The non-empty, first-of-their-kind pairs of ``train`` (pass 2 and 3)."""
    i = 0
    for source, target in iter_pairs(train):
        if source and target:
            if keep[i]:
                yield source, target
            i += 1


def _sample(pairs: Iterator[tuple[str, str]], limit: int) -> Iterator[str]:
    """The first ``limit`` characters of the pairs' texts, in parts of about SAMPLE_PART."""
    seen, part, size = 0, [], 0
    for source, target in pairs:
        part += (source, target)
        size += len(source) + len(target) + 2
        if size >= SAMPLE_PART or seen + size >= limit:
            yield "\n".join(part)
            seen, part, size = seen + size, [], 0
            if seen >= limit:
                return
    if part:
        yield "\n".join(part)


class _SplitWriter:
    """Appends pairs of token ids to ``<split>.src.bin``, ``.tgt.bin``, ``.idx`` (and text)."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, with_text: bool):
        self.split, self.dtype = split, dtype
        self.src = open(folder / f"{split}.src.bin", "wb")  # noqa: SIM115 (closed by close)
        self.tgt = open(folder / f"{split}.tgt.bin", "wb")  # noqa: SIM115
        self.idx = open(folder / f"{split}.idx", "wb")  # noqa: SIM115
        self.text = (open(folder / f"{split}.text.jsonl", "w", encoding="utf-8")  # noqa: SIM115
                     if with_text else None)
        self.pairs, self.tokens = 0, np.zeros(2, np.int64)
        self.idx.write(self.tokens.tobytes())

    def write(self, pairs: list[tuple[np.ndarray, np.ndarray, str, str]]) -> None:
        if not pairs:
            return
        lengths = np.asarray([(len(s), len(t)) for s, t, _, _ in pairs], np.int64)
        ends = self.tokens + np.cumsum(lengths, axis=0)
        self.src.write(np.concatenate([s for s, _, _, _ in pairs]).astype(self.dtype).tobytes())
        self.tgt.write(np.concatenate([t for _, t, _, _ in pairs]).astype(self.dtype).tobytes())
        self.idx.write(ends.tobytes())
        if self.text is not None:
            self.text.writelines(json.dumps({"source": a, "target": b}, ensure_ascii=False)
                                 + "\n" for _, _, a, b in pairs)
        self.pairs, self.tokens = self.pairs + len(pairs), ends[-1]

    def close(self) -> None:
        for f in (self.src, self.tgt, self.idx, self.text):
            if f is not None and not f.closed:
                f.flush()
                os.fsync(f.fileno())
                f.close()


def _batches(pairs: Iterator[tuple[str, str]]) -> Iterator[list[tuple[str, str]]]:
    batch = []
    for pair in pairs:
        batch.append(pair)
        if len(batch) == BATCH_PAIRS:
            yield batch
            batch = []
    if batch:
        yield batch


def _encode(tok, pairs: Iterator[tuple[str, str]], split_of: Callable[[str], str | None],
            writers: dict[str, _SplitWriter], s: PairSettings, counts: dict[str, int]) -> None:
    """Encode ``pairs`` in batches and append each kept pair to its split's writer."""
    for batch in _batches(pairs):
        encoded = tok.encode_batch([t for pair in batch for t in pair])
        out: dict[str, list] = {name: [] for name in writers}
        for i, (source, target) in enumerate(batch):
            split = split_of(source)
            if split is None:
                counts["overlap"] += 1
                continue
            src, tgt = encoded[2 * i], encoded[2 * i + 1]
            if split != "test":  # the paper scores a whole test set
                if max(len(src), len(tgt)) > s.max_tokens:
                    counts["too_long"] += 1
                    continue
                if max(len(src), len(tgt)) > s.max_ratio * min(len(src), len(tgt)):
                    counts["ratio"] += 1
                    continue
            out[split].append((src, tgt, source, target))
        for name, kept in out.items():
            writers[name].write(kept)


def _explicit(files: PairFiles | None, counts: dict[str, int]) -> Iterator[tuple[str, str]]:
    """A --valid-pairs / --test-pairs file's pairs without empty sides."""
    for source, target in iter_pairs(files):
        counts["read"] += 1
        if source and target:
            yield source, target
        else:
            counts["empty"] += 1


def _sources(files: PairFiles | None) -> set[int]:
    return {_source_digest(src) for src, _ in iter_pairs(files)} if files else set()


def prepare_pairs(train: PairFiles, out: str | os.PathLike,
                  settings: PairSettings = PairSettings(), *, valid: PairFiles | None = None,
                  test: PairFiles | None = None,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Tokenize the pairs of ``train`` (and ``valid``/``test``) into the folder ``out``.

    Args:
      train: the pairs; validation and test pairs are held out of them by source hash unless
        ``valid``/``test`` are given.
      out: the dataset folder to write.
      settings: vocabulary, filters, split shares.
      valid, test: pairs of a split given as its own file.
      log: progress messages.

    Returns:
      The ``meta.json`` content.

    Raises:
      DataError: bad settings or input (naming the file and line), no pair left in a split
        (naming what each filter removed), or an ``out`` that must not be replaced; ``out`` is
        then left as it was.
    """
    s, out = settings, Path(out)
    _check(s)
    _check_out(out, s.overwrite)
    counts = dict.fromkeys(("read", *FILTERS), 0)
    log(f"scanning {train.describe()}")
    keep = _scan(train, counts)
    explicit = {name: _sources(f) for name, f in (("valid", valid), ("test", test)) if f}
    split_of = _Splitter(int(keep.sum()), s, explicit)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.prepare-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's folder is private; the dataset is not
    writers: dict[str, _SplitWriter] = {}
    try:
        log(f"training byte-level BPE (vocabulary {s.vocab_size}) on up to "
            f"{s.sample_bytes / 2**20:.1f} MiB of training pairs")
        train_only = ((a, b) for a, b in _kept_pairs(train, keep) if split_of(a) == "train")
        tok = bpe.train_bpe(_sample(train_only, s.sample_bytes), s.vocab_size,
                            bpe.PAIR_SPECIALS)
        (tmp / TOKENIZER).write_text(tok.to_json(), encoding="utf-8")
        dtype = np.dtype(np.uint16 if tok.vocab_size <= 65535 else np.uint32)
        writers = {name: _SplitWriter(tmp, name, dtype, name != "train") for name in SPLITS}
        log("encoding")
        _encode(tok, _kept_pairs(train, keep), split_of, writers, s, counts)
        for name, files in (("valid", valid), ("test", test)):
            if files is not None:
                _encode(tok, _explicit(files, counts), lambda _, n=name: n,
                        {name: writers[name]}, s, counts)
        for w in writers.values():
            w.close()
        _check_nonempty(writers, counts, s)
        meta = _meta(tok, tmp, dtype, writers, counts, s, train, valid, test)
        (tmp / META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        _publish(tmp, out)
    except BaseException:
        for w in writers.values():
            w.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _check_nonempty(writers: dict[str, _SplitWriter], counts: dict[str, int],
                    s: PairSettings) -> None:
    empty = [name for name, w in writers.items() if w.pairs == 0]
    if not empty:
        return
    removed = (f"empty sides removed {counts['empty']:,}, duplicates {counts['duplicate']:,}, "
               f"over --max-tokens {s.max_tokens} {counts['too_long']:,}, length ratio over "
               f"--max-ratio {s.max_ratio:g} {counts['ratio']:,}")
    if counts["overlap"]:
        removed += f", sources of the valid/test files {counts['overlap']:,}"
    hint = "loosen --max-tokens / --max-ratio, or check the input"
    if empty != ["train"]:
        hint += (", or hold out more pairs (--valid-fraction / --test-fraction), or give the "
                 "split its own file (--valid-pairs / --test-pairs)")
    raise DataError(f"the {' and '.join(empty)} split is empty after filtering: of "
                    f"{counts['read']:,} pairs read, {removed}; {hint}")


def _meta(tok, tmp: Path, dtype: np.dtype, writers: dict[str, _SplitWriter],
          counts: dict[str, int], s: PairSettings, train: PairFiles, valid: PairFiles | None,
          test: PairFiles | None) -> dict[str, Any]:
    sha = hashlib.sha256((tmp / TOKENIZER).read_bytes()).hexdigest()
    inputs = {name: {"kind": f.kind, "paths": [str(p) for p in f.paths],
                     "bytes": [p.stat().st_size for p in f.paths],
                     **({"fields": [f.source_field, f.target_field]} if f.kind == "jsonl"
                        else {})}
              for name, f in (("pairs", train), ("valid", valid), ("test", test)) if f}
    return {
        "format": FORMAT, "version": VERSION, "kind": KIND,
        "tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size, "file": TOKENIZER,
                      "sha256": sha, **dict(zip(("pad_id", "bos_id", "eos_id"),
                                                range(len(bpe.PAIR_SPECIALS))))},
        "dtype": dtype.name,
        "splits": {name: {"pairs": w.pairs, "source_tokens": int(w.tokens[0]),
                          "target_tokens": int(w.tokens[1]),
                          "text": f"{name}.text.jsonl" if w.text is not None else None}
                   for name, w in writers.items()},
        "filters": {"read": counts["read"], "removed": {k: counts[k] for k in FILTERS},
                    "max_tokens": s.max_tokens, "max_ratio": s.max_ratio},
        "inputs": inputs}


def summary(meta: dict[str, Any]) -> str:
    """The one-line account of a parallel dataset: its vocabulary, filters and splits."""
    f, sp = meta["filters"], meta["splits"]
    removed = ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in f["removed"].items() if v)
    return (f"vocabulary {meta['tokenizer']['vocab_size']}; read {f['read']:,} pairs, removed "
            f"{removed or 'none'} (max tokens {f['max_tokens']}, max ratio {f['max_ratio']:g}); "
            + ", ".join(f"{n} {sp[n]['pairs']:,} pairs ({sp[n]['source_tokens']:,} + "
                        f"{sp[n]['target_tokens']:,} tokens)" for n in SPLITS))
