"""Reading text pairs from files: aligned plain text, TSV and JSONL, each optionally ``.gz``.

A pair is two texts, a *source* and a *target*; nothing here assumes two languages (a pair may
be an article and its summary, or a title and its text). Three layouts are read:

* two aligned plain-text files, line ``i`` of the first paired with line ``i`` of the second,
  as WMT, OPUS and Moses ship them (``train.en train.de``);
* TSV: ``source<TAB>target`` on each line, as Tatoeba and Anki exports are;
* JSONL: one JSON object a line, the two texts at dotted paths such as ``translation.en``, the
  layout of ``{"translation": {"en": ..., "de": ...}}`` records.

Texts are read line by line (never a whole file), as strict UTF-8, and stripped of the
whitespace around them. Blank lines of a TSV or JSONL file are skipped; in aligned files an
empty line is an empty side (the alignment counts it), left for the caller's filter. Any
problem raises :class:`~transformer_jax.data.corpus.DataError` naming the file and the line.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from transformer_jax.data.corpus import DataError

__all__ = ["PairFiles", "iter_pairs", "pair_files"]

BLOCK = 1 << 20  # read buffer


@dataclasses.dataclass(frozen=True)
class PairFiles:
    """One pair source: two aligned files, or one TSV or JSONL file.

    Attributes:
      paths: the file(s): two for aligned text, one for TSV or JSONL.
      kind: ``"aligned"``, ``"tsv"`` or ``"jsonl"``.
      source_field, target_field: JSONL only, the dotted paths of the two texts.
    """

    paths: tuple[Path, ...]
    kind: str
    source_field: str = ""
    target_field: str = ""

    def describe(self) -> str:
        return " + ".join(str(p) for p in self.paths)


def _kind_of(path: Path) -> str:
    name = path.name.removesuffix(".gz")
    return "jsonl" if name.endswith((".jsonl", ".json")) else \
        "tsv" if name.endswith((".tsv", ".tab")) else "text"


def pair_files(paths: Sequence[str | os.PathLike], source_field: str | None = None,
               target_field: str | None = None, what: str = "--pairs") -> PairFiles:
    """The pair source that ``paths`` name: one TSV or JSONL file, or two aligned text files.

    The layout follows the file names: ``.jsonl``/``.json`` (JSONL), ``.tsv``/``.tab`` (TSV),
    anything else text; each may end in ``.gz``.

    Args:
      paths: one or two files.
      source_field, target_field: the dotted paths of the texts in a JSONL record (required
        for JSONL).
      what: the flag that named the paths, for error messages.

    Raises:
      DataError: a missing file, a number or mix of files that is no layout, or JSONL without
        its fields.
    """
    files = tuple(Path(p) for p in paths)
    for f in files:
        if not f.is_file():
            raise DataError(f"{what} file {str(f)!r} does not exist" if not f.exists() else
                            f"{what} {str(f)!r} is not a file")
    kinds = [_kind_of(f) for f in files]
    if len(files) == 1 and kinds[0] == "tsv":
        return PairFiles(files, "tsv")
    if len(files) == 1 and kinds[0] == "jsonl":
        if not source_field or not target_field:
            raise DataError(f"{what} {str(files[0])!r} is JSONL: name its texts with "
                            "--source-lang/--target-lang (fields translation.<lang>) or "
                            "--source-field/--target-field (dotted paths)")
        return PairFiles(files, "jsonl", source_field, target_field)
    if len(files) == 2 and kinds == ["text", "text"]:
        return PairFiles(files, "aligned")
    raise DataError(f"{what} takes one .tsv or .jsonl file (or its .gz), or two aligned text "
                    f"files (source, then target); got {' '.join(map(str, files)) or 'nothing'}")


def _open(path: Path) -> io.BufferedIOBase:
    raw = open(path, "rb", buffering=BLOCK)  # noqa: SIM115 (closed by the caller's with)
    return gzip.GzipFile(fileobj=raw) if path.suffix == ".gz" else raw


def _lines(path: Path) -> Iterator[bytes]:
    """The file's lines as bytes (without the line ending), read a buffer at a time."""
    try:
        with _open(path) as f:
            for line in f:
                yield line.rstrip(b"\r\n")
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"cannot read {str(path)!r}: {getattr(e, 'strerror', None) or e}") \
            from None


def _text(raw: bytes, path: Path, number: int) -> str:
    """Strict UTF-8 without NUL, else :class:`DataError` naming the file, line and column."""
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise DataError(f"{str(path)!r} line {number} holds a NUL byte (byte {nul + 1} of the "
                        "line); pass text files only")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{str(path)!r} line {number} is not UTF-8 (byte 0x{raw[e.start]:02x}, "
                        f"byte {e.start + 1} of the line); convert it, e.g. iconv -f latin1 "
                        "-t utf-8") from None


def _aligned(src: Path, tgt: Path) -> Iterator[tuple[str, str]]:
    a, b = _lines(src), _lines(tgt)
    number = 0
    for number, left in enumerate(a, 1):
        right = next(b, None)
        if right is None:
            raise DataError(f"aligned files differ in length: {str(src)!r} has "
                            f"{number + sum(1 for _ in a):,} lines, {str(tgt)!r} has "
                            f"{number - 1:,}")
        yield _text(left, src, number).strip(), _text(right, tgt, number).strip()
    rest = sum(1 for _ in b)
    if rest:
        raise DataError(f"aligned files differ in length: {str(src)!r} has {number:,} lines, "
                        f"{str(tgt)!r} has {number + rest:,}")


def _tsv(path: Path) -> Iterator[tuple[str, str]]:
    for number, raw in enumerate(_lines(path), 1):
        line = _text(raw, path, number)
        if not line.strip():
            continue
        tabs = line.count("\t")
        if tabs != 1:
            raise DataError(f"{str(path)!r} line {number} has {tabs} tabs; a TSV line holds "
                            "source<TAB>target, one tab (a tab inside a text cannot be told "
                            "from the separator: use JSONL for such texts)")
        source, target = line.split("\t")
        yield source.strip(), target.strip()


def _field(record, dotted: str, path: Path, number: int) -> str:
    value = record
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    if not isinstance(value, str):
        found = "not a string" if value is not None else "missing"
        raise DataError(f"{str(path)!r} line {number}: field {dotted!r} is {found}; name the "
                        "texts' fields with --source-field / --target-field (dotted paths), or "
                        "--source-lang / --target-lang for translation.<lang>")
    return value


def _jsonl(path: Path, source_field: str, target_field: str) -> Iterator[tuple[str, str]]:
    for number, raw in enumerate(_lines(path), 1):
        line = _text(raw, path, number)
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{str(path)!r} line {number} is not JSON ({e.msg}); each line of a "
                            ".jsonl file must be one JSON object") from None
        yield (_field(record, source_field, path, number).strip(),
               _field(record, target_field, path, number).strip())


def iter_pairs(files: PairFiles) -> Iterator[tuple[str, str]]:
    """Every ``(source, target)`` of ``files``, in file order, each text stripped.

    Raises:
      DataError: a file cannot be read or is not gzip; bytes that are not UTF-8, or a NUL; a TSV
        line without exactly one tab; a JSONL line that is not JSON or lacks a field; aligned
        files of different line counts (both counts named).
    """
    if files.kind == "aligned":
        return _aligned(*files.paths)
    if files.kind == "tsv":
        return _tsv(files.paths[0])
    return _jsonl(files.paths[0], files.source_field, files.target_field)
