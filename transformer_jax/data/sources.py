"""The documents of ``prepare``'s sources, streamed in pieces of about 256 KiB.

A source is a text file (one document), a ``.jsonl`` file (one document per line, the text in
one field), or the ``.gz`` form of either; folders are read recursively in sorted order, hidden
files skipped. Nothing holds more than one piece (or one JSONL line) in memory, and the pieces
depend only on the bytes read, so the same sources always give the same pieces.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

from transformer_jax.data.corpus import DataError

__all__ = ["Source", "iter_pieces"]

# Bytes read at a time from a text file: small pieces let a batch of them keep every core busy
# to its end (see prepare.BATCH_BYTES for the memory they cost).
BLOCK = 1 << 18


@dataclasses.dataclass
class Source:
    """One source file; ``size`` and ``sha256`` are of the file as stored (compressed or not),
    filled in once :func:`iter_pieces` has read it to the end."""

    path: Path
    size: int = 0
    sha256: str = ""

    @property
    def is_jsonl(self) -> bool:
        return self.path.name.endswith((".jsonl", ".jsonl.gz"))


class _Hashing(io.RawIOBase):
    """A read-only file that hashes and counts the bytes read through it."""

    def __init__(self, f):
        self.f, self.hash, self.size = f, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.f.readinto(buffer)
        self.hash.update(memoryview(buffer)[:n])
        self.size += n
        return n


def _utf8_cut(raw: bytes) -> int:
    """The end of the last complete UTF-8 character in ``raw`` (a cut that splits none)."""
    for back in range(1, min(4, len(raw)) + 1):
        lead = raw[-back]
        if lead & 0xC0 != 0x80:  # not a continuation byte: a character starts here
            need = 1 if lead < 0x80 else 2 if lead >> 5 == 6 else 3 if lead >> 4 == 14 else 4
            return len(raw) - back if need > back else len(raw)
    return len(raw)


def _decode(raw: bytes, path: Path, offset: int, where: str = "") -> str:
    """Strict UTF-8 without NUL, else :class:`DataError` naming the file and the offset."""
    name = f"source {str(path)!r}{where}"
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise DataError(f"{name} looks binary (a NUL byte at offset {offset + nul}); pass text "
                        "files only")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{name} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                        f"{offset + e.start}); convert it, e.g. iconv -f latin1 -t utf-8") from None


def _text_pieces(f, path: Path) -> Iterator[tuple[str, bool]]:
    """A text file's pieces: each ends after a newline where the block has one."""
    pending, offset, any_text = b"", 0, False
    while True:
        block = f.read(BLOCK)
        raw = pending + block
        if not block:
            cut = len(raw)
        else:
            newline = raw.rfind(b"\n")
            cut = newline + 1 if newline >= 0 else _utf8_cut(raw)
        if cut:
            yield _decode(raw[:cut], path, offset), not block
            any_text = True
        elif not block and any_text:
            yield "", True  # the document ends with the previous piece
        if not block:
            if not any_text:
                raise DataError(f"source {str(path)!r} is empty; remove it or pass a file with "
                                "text")
            return
        pending, offset = raw[cut:], offset + cut


def _jsonl_pieces(f, path: Path, field: str) -> Iterator[tuple[str, bool]]:
    """One piece per non-blank line: the text of its ``field`` (a document of its own)."""
    offset, any_doc = 0, False
    for number, line in enumerate(f, 1):
        where = f" line {number}"
        text = _decode(line, path, offset, where).strip()
        offset += len(line)
        if not text:
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"source {str(path)!r}{where} is not JSON ({e.msg}); each line of a "
                            ".jsonl file must be one JSON object") from None
        value = record.get(field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            raise DataError(f"source {str(path)!r}{where} has no string field {field!r}; pass "
                            "--text-field with the field that holds the text")
        if "\x00" in value:
            raise DataError(f"source {str(path)!r}{where} holds a NUL character; pass text only")
        if value:
            any_doc = True
            yield value, True
    if not any_doc:
        raise DataError(f"source {str(path)!r} holds no text in field {field!r}; remove it or "
                        "pass --text-field")


def iter_pieces(sources: list[Source], text_field: str = "text") -> Iterator[tuple[str, bool]]:
    """``(text, ends_document)`` for every piece of every source, in order.

    Each source's size and sha256 are set once it has been read to the end.

    Raises:
      DataError: a file cannot be read or is not gzip, is empty, binary or not UTF-8; a JSONL
        line is not JSON or lacks ``text_field``.
    """
    for src in sources:
        try:
            with open(src.path, "rb") as raw:
                hashing = _Hashing(raw)
                reader = io.BufferedReader(hashing, BLOCK)
                f = gzip.GzipFile(fileobj=reader) if src.path.suffix == ".gz" else reader
                pieces = (_jsonl_pieces(f, src.path, text_field) if src.is_jsonl
                          else _text_pieces(f, src.path))
                yield from pieces
                src.size, src.sha256 = hashing.size, hashing.hash.hexdigest()
        except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
            raise DataError(f"cannot read source {str(src.path)!r}: "
                            f"{getattr(e, 'strerror', None) or e}") from None
