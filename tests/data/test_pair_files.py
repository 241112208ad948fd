"""Reading text pairs: aligned files, TSV and JSONL (and their .gz) give the same pairs; every
bad input is one error naming the file and the line."""

import gzip
import json

import pytest

from transformer_jax.data import DataError
from transformer_jax.data.pair_files import iter_pairs, pair_files

PAIRS = [("Hello world", "Hallo Welt"), ("naïve café", "naives Café"), ("日本 🌍", "Japan"),
         ("", "leer"), ("  spaced  ", "\tgetabbt ")]
STRIPPED = [(a.strip(), b.strip()) for a, b in PAIRS]


def _write(path, text):
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("gz", ["", ".gz"])
def test_aligned_tsv_and_jsonl_read_the_same_pairs(tmp_path, gz):
    src = _write(tmp_path / f"a.en{gz}", "".join(a + "\n" for a, _ in PAIRS))
    tgt = _write(tmp_path / f"a.de{gz}", "".join(b + "\r\n" for _, b in PAIRS))
    tsv_pairs = [p for p in STRIPPED if "\t" not in p[0] + p[1]]
    tsv = _write(tmp_path / f"p.tsv{gz}", "\n".join(f"{a}\t{b}" for a, b in tsv_pairs) + "\n\n")
    jsonl = _write(tmp_path / f"p.jsonl{gz}", "\n".join(
        json.dumps({"id": i, "translation": {"en": a, "de": b}}) for i, (a, b) in
        enumerate(PAIRS)) + "\n")
    assert list(iter_pairs(pair_files([src, tgt]))) == STRIPPED
    assert list(iter_pairs(pair_files([tsv]))) == tsv_pairs
    files = pair_files([jsonl], "translation.en", "translation.de")
    assert files.kind == "jsonl"
    assert list(iter_pairs(files)) == STRIPPED
    swapped = pair_files([jsonl], "translation.de", "translation.en")
    assert list(iter_pairs(swapped)) == [(b, a) for a, b in STRIPPED]


def _error(files_or_paths, *fields):
    with pytest.raises(DataError) as e:
        files = pair_files(files_or_paths, *fields)
        list(iter_pairs(files))
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("longer", ["source", "target"])
def test_aligned_files_of_different_lengths_name_both_counts(tmp_path, longer):
    a = _write(tmp_path / "a.en", "x\n" * (5 if longer == "source" else 3))
    b = _write(tmp_path / "a.de", "y\n" * (3 if longer == "source" else 5))
    msg = _error([a, b])
    assert "differ in length" in msg
    assert f"{str(a)!r} has {5 if longer == 'source' else 3} lines" in msg
    assert f"{str(b)!r} has {3 if longer == 'source' else 5}" in msg


@pytest.mark.parametrize("line, tabs", [("no tab here", 0), ("a\tb\tc", 2)])
def test_tsv_line_needs_exactly_one_tab(tmp_path, line, tabs):
    path = _write(tmp_path / "p.tsv", f"good\tgut\n{line}\nok\tok\n")
    msg = _error([path])
    assert f"{str(path)!r} line 2 has {tabs} tabs" in msg


def test_jsonl_errors_name_the_line_and_field(tmp_path):
    path = _write(tmp_path / "p.jsonl", '{"translation": {"en": "a", "de": "b"}}\n'
                                        '{"translation": {"en": "c"}}\n')
    msg = _error([path], "translation.en", "translation.de")
    assert "line 2" in msg and "'translation.de' is missing" in msg
    bad = _write(tmp_path / "q.jsonl", '{"translation": {"en": "a", "de": "b"}}\n{oops\n')
    assert "line 2 is not JSON" in _error([bad], "translation.en", "translation.de")
    assert "--source-lang" in _error([bad])  # JSONL needs its fields named


def test_bytes_that_are_not_utf8_name_the_file_and_line(tmp_path):
    a = _write(tmp_path / "a.en", "fine\nalso fine\n")
    b = tmp_path / "a.de"
    b.write_bytes(b"gut\nsch\xf6n\n")
    msg = _error([a, b])
    assert f"{str(b)!r} line 2 is not UTF-8 (byte 0xf6" in msg
    t = tmp_path / "p.tsv"
    t.write_bytes(b"a\tb\nc\x00\td\n")
    assert "line 2 holds a NUL byte" in _error([t])


def test_files_that_are_no_layout_are_refused(tmp_path):
    a = _write(tmp_path / "a.en", "x\n")
    t = _write(tmp_path / "p.tsv", "x\ty\n")
    assert "one .tsv or .jsonl file" in _error([a])
    assert "one .tsv or .jsonl file" in _error([t, a])
    assert "does not exist" in _error([tmp_path / "missing.en", a])
    g = tmp_path / "b.en.gz"
    g.write_bytes(b"not gzip")
    assert "cannot read" in _error([g, a])
