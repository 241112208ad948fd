"""The catalog reader against .mo files written here (never the machine's catalogs), and the
translation memory against a dense float64 cosine over the same trigram TF-IDF."""

import struct
import sys
from pathlib import Path

import numpy as np
import pytest

# Plain `pytest` puts tests/ on the path, not the checkout: the benchmarks are scripts there.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import baselines, catalogs  # noqa: E402


def _mo(path, entries, order="<", charset="UTF-8"):
    """A .mo file of ``entries`` (msgid bytes -> msgstr bytes), as msgfmt lays it out."""
    entries = {b"": f"Content-Type: text/plain; charset={charset}\n".encode(), **entries}
    keys = sorted(entries)
    n, ids_at = len(keys), 28
    strs_at = ids_at + 8 * n
    blob_at = strs_at + 8 * n
    blob, ids, strs = b"", [], []
    for table, values in ((ids, keys), (strs, [entries[k] for k in keys])):
        for v in values:
            table.append((len(v), blob_at + len(blob)))
            blob += v + b"\0"
    head = struct.pack(f"{order}7I", catalogs.MAGIC, 0, n, ids_at, strs_at, 0, 0)
    tables = b"".join(struct.pack(f"{order}2I", *e) for e in ids + strs)
    path.write_bytes(head + tables + blob)
    return path


@pytest.mark.parametrize("order", ["<", ">"])
def test_read_mo_strips_contexts_pairs_plurals_and_skips_the_header(tmp_path, order):
    path = _mo(tmp_path / "x.mo", {
        b"Open": "Öffnen".encode(), b"menu\x04File": b"Datei",
        b"%d file\0%d files": b"%d Datei\0%d Dateien", b"one\0many": b"ein\0zwei\0drei",
        b"untranslated": b""}, order)
    got = sorted(catalogs.read_mo(path))
    assert got == sorted([("Open", "Öffnen"), ("File", "Datei"), ("%d file", "%d Datei"),
                          ("%d files", "%d Dateien"), ("one", "ein")])
    latin = _mo(tmp_path / "l.mo", {b"Yes": "Jä".encode("latin-1")}, charset="ISO-8859-1")
    assert catalogs.read_mo(latin) == [("Yes", "Jä")]
    (tmp_path / "bad.mo").write_bytes(b"\0" * 40)
    with pytest.raises(catalogs.CatalogError, match="not a .mo file"):
        catalogs.read_mo(tmp_path / "bad.mo")


def test_catalog_pairs_dedupe_across_files(tmp_path):
    folder = tmp_path / "de" / "LC_MESSAGES"
    folder.mkdir(parents=True)
    _mo(folder / "a.mo", {b"Open": b"Oeffnen", b"Close": b"Schliessen"})
    _mo(folder / "b.mo", {b"Open": b"Oeffnen", b"Save": b"Speichern"})
    pairs, n = catalogs.catalog_pairs("de", tmp_path)
    assert n == 2 and sorted(pairs) == sorted([("Open", "Oeffnen"), ("Close", "Schliessen"),
                                               ("Save", "Speichern")])
    assert catalogs.catalog_pairs("xx", tmp_path) == ([], 0)


def _dense_cosine(train, query):
    """float64 reference: dense TF-IDF with the same trigrams and weights."""
    vocab = sorted({g for t in train for g in baselines._trigrams(t)})
    col = {g: i for i, g in enumerate(vocab)}
    tf = np.zeros((len(train), len(vocab)))
    for d, t in enumerate(train):
        for g in baselines._trigrams(t):
            tf[d, col[g]] += 1
    idf = np.log(len(train) / (tf > 0).sum(0)) + 1
    m = tf * idf
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    q = np.zeros(len(vocab))
    for g in baselines._trigrams(query):
        if g in col:
            q[col[g]] += 1
    q *= idf
    return m @ (q / np.linalg.norm(q)) if q.any() else np.zeros(len(train))


def test_memory_matches_a_dense_cosine_and_picks_the_nearest():
    rng = np.random.default_rng(0)
    words = ["open", "file", "save", "close", "the", "%s", "cannot", "Ünïcode", "window"]
    train = [" ".join(rng.choice(words, rng.integers(1, 6))) for _ in range(60)]
    index = baselines.TrigramIndex(train)
    for query in ["cannot open file %s", "save the window", "zzz qqq", "Ünïcode file"]:
        np.testing.assert_allclose(index.query(query), _dense_cosine(train, query), atol=1e-12)
    targets = [f"T{i}" for i in range(len(train))]
    assert baselines.memory_translate(train, targets, [train[7], "zzzz"]) == [
        targets[train.index(train[7])], ""]


def test_copy_scores_are_sacrebleu():
    s = baselines.copy_scores(["a b c d", "x y"], ["a b c d", "x z"])
    assert 0 < s["bleu"] < 100 and s["bleu_signature"].startswith("nrefs:1")
    assert baselines.copy_scores(["same text here ok"], ["same text here ok"])["bleu"] == pytest.approx(100)
