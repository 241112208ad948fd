"""Prepared datasets: the tokenizers, ``prepare`` (streaming, atomic, deterministic), the
windows read from the shards against the flat token array, and every bad input as one readable error."""

import gzip
import json
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from transformer_jax import data
from transformer_jax.cli import prepare as prepare_cli
from transformer_jax.data import bpe, prepare, prepared, sources

WORDS = ["the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "with", "be", "ünï",
         "naïve", "日本", "🌍", "\n", "  "]


def _text(seed, n):
    return " ".join(np.random.default_rng(seed).choice(WORDS, n))


def _sources(root):
    """A text file, a folder with a .gz text file, a .jsonl and a .jsonl.gz (7 documents)."""
    root.mkdir()
    (root / "a.txt").write_text(_text(0, 3000), encoding="utf-8")
    (root / "sub").mkdir()
    with gzip.open(root / "sub" / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write(_text(1, 2000))
    (root / "c.jsonl").write_text("".join(json.dumps({"text": _text(i, 200), "id": i}) + "\n"
                                          for i in range(2, 4)), encoding="utf-8")
    with gzip.open(root / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps({"text": _text(i, 100)}) for i in range(4, 7)))
    return [str(root / "a.txt"), str(root / "sub"), str(root / "c.jsonl"),
            str(root / "d.jsonl.gz")]


def _documents():
    return [_text(i, n) for i, n in ((0, 3000), (1, 2000), (2, 200), (3, 200), (4, 100),
                                     (5, 100), (6, 100))]


SMALL = prepare.PrepareSettings(vocab_size=300, shard_bytes=2000, val_tokens=500)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    paths = _sources(root / "src")
    prepare.prepare_dataset(paths, root / "ds", SMALL, log=lambda m: None)
    return root, paths, prepared.open_dataset(root / "ds")


def _flat(ds, split):
    """The split as one array, read straight from the shard files (np.fromfile)."""
    shards = ds.meta["splits"][split]["shards"]
    return np.concatenate([np.fromfile(ds.path / s["file"], ds.meta["dtype"]) for s in shards])


# ---- tokenizers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe_tok():
    return bpe.train_bpe([_text(i, 500) for i in range(4)], 400)


@given(st.text(max_size=200))
def test_tokenizers_round_trip_any_unicode(bpe_tok, text):
    for tok in (bpe_tok, data.ByteTokenizer()):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert int(tok.token_bytes()[ids].sum()) == len(text.encode("utf-8"))
        assert all(np.array_equal(a, b) for a, b in zip(tok.encode_batch([text, text[::-1]]),
                                                        [ids, tok.encode(text[::-1])]))


def test_bpe_saves_loads_and_treats_the_eot_text_as_text(bpe_tok):
    again = bpe.load_tokenizer(bpe_tok.to_json())
    text = "the <|endoftext|> of naïve 🌍"
    assert bpe_tok.eot_id not in bpe_tok.encode(text).tolist()
    assert np.array_equal(again.encode(text), bpe_tok.encode(text))
    assert len(bpe_tok.encode("the of and to")) < len("the of and to")  # merges learnt
    assert isinstance(bpe.load_tokenizer(data.ByteTokenizer().to_json()), data.ByteTokenizer)


# ---- prepare -------------------------------------------------------------------------------


def test_the_dataset_holds_the_documents_each_ended_by_eot(dataset):
    _, _, ds = dataset
    meta, tok = ds.meta, ds.tokenizer
    flat = np.concatenate([_flat(ds, "train"), _flat(ds, "val")])
    assert meta["dtype"] == "uint16" and meta["documents"] == 7 and tok.vocab_size == 300
    assert len(meta["splits"]["train"]["shards"]) > 3  # cut at 1000 tokens
    assert all(s["tokens"] <= 1000 for s in meta["splits"]["train"]["shards"])
    assert meta["splits"]["val"]["tokens"] == 500 == len(ds.val)
    docs = _documents()
    assert tok.decode(flat) == "".join(d + bpe.EOT for d in docs)
    assert (flat == tok.eot_id).sum() == 7
    total = meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"]
    assert total == sum(len(d.encode("utf-8")) for d in docs)
    assert [s["path"] for s in meta["sources"]][1].endswith("b.txt.gz")


def test_prepare_is_deterministic_and_byte_level_works(dataset, tmp_path):
    _, paths, ds = dataset
    prepare.prepare_dataset(paths, tmp_path / "again", SMALL, log=lambda m: None)
    files = sorted(p.name for p in ds.path.iterdir())
    assert files == sorted(p.name for p in (tmp_path / "again").iterdir())
    for name in files:
        assert (ds.path / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    byte = prepare.PrepareSettings(tokenizer="byte", val_fraction=0.1)
    prepare.prepare_dataset(paths, tmp_path / "bytes", byte, log=lambda m: None)
    b = prepared.open_dataset(tmp_path / "bytes")
    text = "".join(d + "\x00" for d in _documents()).encode("utf-8")
    assert np.concatenate([b.train[:], b.val[:]]).astype(np.uint8).tobytes() == text
    assert b.vocab_size == 256 and len(b.val) == round(0.1 * len(text))


def test_windows_equal_those_of_the_flat_array(dataset):
    _, _, ds = dataset
    flat_train, flat_val = _flat(ds, "train"), _flat(ds, "val")
    kw = {"seed": 5, "step": 3, "num_steps": 4, "batch_size": 6, "seq_len": 37}
    got = data.train_batches(ds.train, **kw)
    assert np.array_equal(got, data.train_batches(flat_train, **kw))
    # Random crops over shard boundaries: every window is its slice of the flat array.
    high = len(flat_train) - 37
    for s in range(3, 7):
        starts = np.random.default_rng([0x64617461, 5, s]).integers(0, high, size=6)
        for row, start in enumerate(starts):
            assert np.array_equal(got[s - 3, row], flat_train[start:start + 38])
    assert np.array_equal(data.train_batches(ds.train, **kw, rows=slice(2, 4)), got[:, 2:4])
    # Any other index (repeats, gaps, descending, across shards), slices with a step, empty.
    rng = np.random.default_rng(1)
    for index in (rng.integers(0, len(flat_train), (5, 7)), np.arange(len(flat_train))[::-3],
                  np.zeros((0, 4), np.int64), slice(3, len(flat_train), 11)):
        assert np.array_equal(ds.train[index], flat_train[index])
    with pytest.raises(IndexError):
        ds.train[np.asarray([len(flat_train)])]
    # Validation: consecutive windows of stride T, the tail padded with IGNORE.
    val = list(data.eval_batches(ds.val, batch_size=4, seq_len=37))
    windows = np.concatenate(val)
    for i in range(len(windows)):
        ref = flat_val[i * 37:i * 37 + 38]
        assert np.array_equal(windows[i, :len(ref)], ref)
        assert (windows[i, len(ref):] == data.IGNORE).all()
    assert (windows != data.IGNORE).sum() == len(flat_val) + len(windows) - 1 - (
        (windows[:, 0] == data.IGNORE).sum())


def test_an_interrupted_prepare_leaves_nothing_training_accepts(tmp_path, monkeypatch, capsys):
    paths = _sources(tmp_path / "src")
    real = prepare.iter_pieces

    def interrupted(*a, **kw):
        for i, piece in enumerate(real(*a, **kw)):
            if i == 2:
                raise KeyboardInterrupt
            yield piece

    monkeypatch.setattr(prepare, "iter_pieces", interrupted)  # Ctrl-C while encoding
    assert prepare_cli.main([*paths, "--out", str(tmp_path / "ds"), "--vocab-size", "300"]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        "python -m transformer_jax.prepare: interrupted (Ctrl-C)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # temporary folder removed
    # A temporary folder left by SIGKILL has files but no meta.json: refused.
    (tmp_path / ".ds.prepare-x").mkdir()
    (tmp_path / ".ds.prepare-x" / "train-00000.bin").write_bytes(b"\0\0")
    with pytest.raises(data.DataError, match="no meta.json"):
        prepared.load_lm_data((str(tmp_path / ".ds.prepare-x"),), 0.1)


# ---- bad input: one line, exit 2, nothing overwritten -------------------------------------


def _damage(ds_path, how):
    shard = ds_path / "train-00001.bin"
    if how == "odd size":
        shard.write_bytes(shard.read_bytes() + b"\0")
    elif how == "size differs":
        shard.write_bytes(shard.read_bytes()[:-2])
    elif how == "no meta":
        (ds_path / "meta.json").unlink()
    elif how == "no tokenizer":
        (ds_path / "tokenizer.json").unlink()
    elif how == "altered tokenizer":
        (ds_path / "tokenizer.json").write_text((ds_path / "tokenizer.json").read_text() + " ")


@pytest.mark.parametrize("how, message", [
    ("odd size", "not a whole number of uint16 tokens"),
    ("size differs", "holds 999 tokens, meta.json says 1000"),
    ("no meta", "no meta.json"),
    ("no tokenizer", "has no tokenizer.json"),
    ("altered tokenizer", "differs from the tokenizer the dataset was prepared with"),
])
def test_damaged_datasets_are_refused(dataset, tmp_path, how, message):
    import shutil

    shutil.copytree(dataset[2].path, tmp_path / "ds")
    _damage(tmp_path / "ds", how)
    with pytest.raises(data.DataError, match=message):
        prepared.load_lm_data((str(tmp_path / "ds"),), 0.1)


def test_token_ids_beyond_the_vocabulary_are_refused_when_read(dataset, tmp_path):
    import shutil

    shutil.copytree(dataset[2].path, tmp_path / "ds")
    with open(tmp_path / "ds" / "val-00000.bin", "r+b") as f:
        f.seek(20)
        f.write(np.asarray([300], np.uint16).tobytes())
    ds = prepared.open_dataset(tmp_path / "ds")
    with pytest.raises(data.DataError, match="token id 300, not below the vocabulary size 300"):
        list(data.eval_batches(ds.val, batch_size=4, seq_len=16))


def _write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return str(path)


@pytest.mark.parametrize("make, extra, message", [
    (lambda p: _write(p / "a.txt", "hello " * 50), ["--vocab-size", "256"],
     "--vocab-size must lie in \\[257, 1048576\\] for bpe"),
    (lambda p: _write(p / "a.txt", "hello " * 50), ["--vocab-size", str(1 << 21)],
     "--vocab-size must lie in"),
    (lambda p: _write(p / "a.txt", "hello"), ["--tokenizer", "byte", "--vocab-size", "300"],
     "--vocab-size is 256 for --tokenizer byte"),
    (lambda p: _write(p / "a.txt", ""), [], "is empty"),
    (lambda p: str(p / "nothing"), [], "does not exist"),
    (lambda p: _write(p / "a.jsonl", '{"text": "ok"}\n{"text": oops}\n'), [],
     "a.jsonl' line 2 is not JSON"),
    (lambda p: _write(p / "a.jsonl", '{"body": "ok"}\n'), [], "line 1 has no string field 'text'"),
    (lambda p: _write(p / "a.txt", "ok café".encode("latin-1")), [],
     "is not UTF-8 text \\(byte 0xe9 at offset 6\\)"),
    (lambda p: _write(p / "a.txt", b"ab\0cd"), [], "looks binary"),
    (lambda p: _write(p / "a.txt", "hello"), ["--val-tokens", "10"], "too few to hold out"),
])
def test_bad_sources_and_flags_are_one_line_and_exit_2(tmp_path, capsys, make, extra, message):
    src = make(tmp_path / "src")
    with pytest.raises(SystemExit) as exit_:
        prepare_cli.main([src, "--out", str(tmp_path / "ds"), *extra])
    err = capsys.readouterr().err.splitlines()  # progress lines, then the error
    assert exit_.value.code == 2
    assert err[-1].startswith("python -m transformer_jax.prepare: error: ")
    assert not any("Traceback" in line for line in err)
    assert re.search(message, err[-1]), err
    assert not (tmp_path / "ds").exists()


def test_an_existing_dataset_is_replaced_only_with_overwrite(tmp_path, capsys):
    src = _write(tmp_path / "src" / "a.txt", _text(0, 400))
    args = [src, "--out", str(tmp_path / "ds"), "--tokenizer", "byte"]
    assert prepare_cli.main(args) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "ds").iterdir()}
    _write(tmp_path / "src" / "a.txt", _text(1, 400))
    with pytest.raises(SystemExit) as exit_:
        prepare_cli.main(args)
    assert exit_.value.code == 2 and "pass --overwrite" in capsys.readouterr().err
    assert before == {p.name: p.read_bytes() for p in (tmp_path / "ds").iterdir()}
    assert prepare_cli.main([*args, "--overwrite"]) == 0
    assert before != {p.name: p.read_bytes() for p in (tmp_path / "ds").iterdir()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "src"]


def test_sources_cut_pieces_at_newlines_without_splitting_characters(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "BLOCK", 7)
    text = "ab\nçd🌍ef\n\nxyz" * 3
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    src = [sources.Source(path)]
    pieces = list(sources.iter_pieces(src))
    assert "".join(p for p, _ in pieces) == text
    assert [e for _, e in pieces] == [False] * (len(pieces) - 1) + [True]
    assert src[0].size == len(text.encode("utf-8"))


def test_bpe_never_learns_from_the_validation_tail(tmp_path, monkeypatch):
    seen = []
    real = bpe.train_bpe

    def spy(texts, vocab_size):
        texts = list(texts)
        seen.append("".join(texts))
        return real(texts, vocab_size)

    monkeypatch.setattr(bpe, "train_bpe", spy)
    text = _text(0, 4000)
    src = _write(tmp_path / "a.txt", text)
    settings = prepare.PrepareSettings(vocab_size=300, val_fraction=0.2)
    meta = prepare.prepare_dataset([src], tmp_path / "ds", settings, log=lambda m: None)
    ds = prepared.open_dataset(tmp_path / "ds")
    val_text = ds.tokenizer.decode(ds.val[:]).replace(bpe.EOT, "")
    assert text.endswith(val_text) and meta["splits"]["val"]["tokens"] == len(ds.val)
    assert text.startswith(seen[0]) and len(seen[0]) <= len(text) - len(val_text)
    assert len(seen[0]) > 0.7 * len(text)
