"""A parallel corpus with no download: the gettext catalogs of this machine's programs.

    python benchmarks/catalogs.py                 # German: count, copy and memory baselines
    python benchmarks/catalogs.py --lang fr --corpus /tmp/fr.jsonl

Debian installs human translations of program messages as compiled gettext catalogs,
``/usr/share/locale/<lang>/LC_MESSAGES/*.mo``. Each entry maps an English ``msgid`` to its
translation ``msgstr``: a parallel corpus, English -> ``<lang>``. Which catalogs exist depends
on the installed packages. Only benchmarks read them; the library never reads system files.

The ``.mo`` format (GNU gettext manual, "The Format of GNU MO Files"): a little- or big-endian
magic ``0x950412de``, the revision, the number of entries N, and the offsets of two tables of N
``(length, offset)`` pairs, the msgids' and the msgstrs' (sorted by msgid). The entry with the
empty msgid is the header (it names the charset). A plural entry's msgid and msgstr hold their
forms separated by NUL; a context is written before the msgid, separated by ``\\x04``.
:func:`read_mo` reads that with ``struct`` (``gettext.GNUTranslations`` parses the same files
but keeps the entries in a private ``_catalog``).

Run as a script it builds the corpus, holds out a test split by the same source hash as
``prepare --pairs --test-fraction`` (2%), scores the copy-the-source and translation-memory
baselines (:mod:`benchmarks.baselines`) on it, and writes results.json / results.md to
benchmarks/results/catalogs/.
"""

from __future__ import annotations

import json
import re
import struct
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout: benchmarks.* and transformer_jax

LOCALE = Path("/usr/share/locale")
MAGIC = 0x950412DE
TEST_FRACTION = 0.02


class CatalogError(ValueError):
    """A file that is not a readable .mo catalog."""


def _charset(header: bytes) -> str:
    found = re.search(rb"charset=([-\w]+)", header)
    return found.group(1).decode("ascii") if found else "utf-8"


def read_mo(path: Path) -> list[tuple[str, str]]:
    """The ``(msgid, msgstr)`` pairs of one ``.mo`` file: header skipped, contexts stripped,
    plural forms paired (singular with the first form, plural with the second) when the
    translation has exactly two forms, else the first forms only; untranslated entries skipped.

    Raises:
      CatalogError: not a .mo file (magic), or tables that point outside the file.
    """
    data = path.read_bytes()
    if len(data) < 20:
        raise CatalogError(f"{path}: too short for a .mo file")
    for order in "<>":
        magic, revision, n, ids_at, strs_at = struct.unpack_from(f"{order}5I", data)
        if magic == MAGIC:
            break
    else:
        raise CatalogError(f"{path}: not a .mo file (magic {data[:4].hex()})")
    if revision >> 16 > 1 or max(ids_at, strs_at) + 8 * n > len(data):
        raise CatalogError(f"{path}: revision {revision} or tables beyond the file's end")

    def entry(table: int, i: int) -> bytes:
        length, offset = struct.unpack_from(f"{order}2I", data, table + 8 * i)
        if offset + length > len(data):
            raise CatalogError(f"{path}: entry {i} beyond the file's end")
        return data[offset:offset + length]

    raw = [(entry(ids_at, i), entry(strs_at, i)) for i in range(n)]
    charset = next((_charset(s) for m, s in raw if m == b""), "utf-8")
    pairs = []
    for msgid, msgstr in raw:
        if msgid == b"" or not msgstr.strip(b"\0"):
            continue
        source = msgid.decode(charset, "replace").split("\x04")[-1].split("\0")
        target = msgstr.decode(charset, "replace").split("\0")
        if len(source) == 2 and len(target) == 2:
            pairs += zip(source, target)
        else:
            pairs.append((source[0], target[0]))
    return [(s.strip(), t.strip()) for s, t in pairs if s.strip() and t.strip()]


def catalog_pairs(lang: str, root: Path = LOCALE) -> tuple[list[tuple[str, str]], int]:
    """English -> ``lang`` pairs from every catalog of ``root/<lang>/LC_MESSAGES``, in file
    and entry order, exact duplicates dropped; and the number of files read."""
    files = sorted((root / lang / "LC_MESSAGES").glob("*.mo"))
    seen, pairs = set(), []
    for f in files:
        try:
            entries = read_mo(f)
        except (CatalogError, OSError, LookupError) as e:  # LookupError: unknown charset
            print(f"skipping {e}", file=sys.stderr)
            continue
        for pair in entries:
            if pair not in seen:
                seen.add(pair)
                pairs.append(pair)
    return pairs, len(files)


def write_jsonl(pairs: list[tuple[str, str]], path: Path, lang: str) -> None:
    """``{"translation": {"en": ..., lang: ...}}`` a line: the layout ``prepare --pairs``
    reads with ``--source-lang en --target-lang <lang>`` (messages hold tabs and newlines, so
    neither TSV nor aligned lines can carry them)."""
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"translation": {"en": s, lang: t}}, ensure_ascii=False) + "\n" for s, t in pairs)


def hash_split(pairs: list[tuple[str, str]], test_fraction: float = TEST_FRACTION):
    """(train, test): the test pairs are those whose source hashes below ``test_fraction``,
    as ``prepare --pairs --test-fraction`` holds them out."""
    from transformer_jax.data.prepare_pairs import source_hash

    test = [p for p in pairs if source_hash(p[0]) < test_fraction]
    train = [p for p in pairs if source_hash(p[0]) >= test_fraction]
    return train, test


def main(argv=None) -> int:
    from benchmarks import baselines, common

    parser = common.arg_parser(__doc__, "(no effect: the run takes seconds)")
    parser.add_argument("--lang", default="de", help="target language (default: %(default)s)")
    parser.add_argument("--locale", type=Path, default=LOCALE,
                        help="the locale folder (default: %(default)s)")
    parser.add_argument("--corpus", type=Path, help="also write the pairs here as JSONL")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    pairs, n_files = catalog_pairs(args.lang, args.locale)
    if not pairs:
        parser.exit(2, f"catalogs.py: no catalogs for {args.lang!r} under {args.locale} "
                       f"(/<lang>/LC_MESSAGES/*.mo); pass another --lang\n")
    if args.corpus:
        write_jsonl(pairs, args.corpus, args.lang)
    train, test = hash_split(pairs)
    srcs, refs = [s for s, _ in test], [t for _, t in test]
    t1 = time.perf_counter()
    memory = baselines.memory_translate([s for s, _ in train], [t for _, t in train], srcs)
    memory_s = time.perf_counter() - t1
    r = {"lang": args.lang, "catalogs": n_files, "pairs": len(pairs), "train_pairs": len(train),
         "test_pairs": len(test), "test_fraction": TEST_FRACTION,
         "copy": baselines.copy_scores(srcs, refs), "memory": baselines.scores(memory, refs),
         "memory_s": memory_s,
         "examples": [{"source": s, "reference": t, "memory": m}
                      for s, t, m in list(zip(srcs, refs, memory))[:5]]}
    print(f"{n_files} catalogs, {len(pairs):,} distinct pairs ({len(train):,} train, "
          f"{len(test):,} test); copy BLEU {r['copy']['bleu']:.1f} chrF "
          f"{r['copy']['chrf']:.1f}; memory BLEU {r['memory']['bleu']:.1f} chrF "
          f"{r['memory']['chrf']:.1f} ({memory_s:.1f} s)")
    machine = common.describe_machine()
    md = "\n\n".join([
        f"# gettext catalogs, English -> {args.lang}",
        (f"Machine: {machine['device']}; {machine['date']}. Command: `python "
        f"benchmarks/catalogs.py --lang {args.lang}`."),
        (f"{n_files} catalogs under {args.locale}/{args.lang}/LC_MESSAGES, {len(pairs):,} "
        f"distinct pairs; test split by source hash ({TEST_FRACTION:.0%}): {len(test):,} "
        f"pairs, the memory indexes the other {len(train):,}."),
        common.markdown_table(
            [{"baseline": name, "BLEU": r[key]["bleu"], "chrF": r[key]["chrf"]}
             for name, key in (("copy the source", "copy"),
                               ("translation memory (char-trigram TF-IDF)", "memory"))],
            [("baseline", "baseline"), ("BLEU", "BLEU"), ("chrF", "chrF")]),
        (f"sacreBLEU: `{r['copy']['bleu_signature']}`; chrF: `{r['copy']['chrf_signature']}`. "
        f"Translation memory: {memory_s:.1f} s for {len(test):,} queries.")])
    out = common.write_results("catalogs", {"machine": machine, "results": r,
                                            "wall_s": time.perf_counter() - t0}, md, args.out)
    print(f"wrote {out}/results.json, results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
