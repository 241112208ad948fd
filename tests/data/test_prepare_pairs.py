"""``prepare --pairs``: the parallel dataset against the pairs it came from (ids decode to the
texts, splits by source hash whatever the order, filters counted), deterministic and atomic,
and every bad input as one line, exit status 2, nothing written."""

import json
import re

import numpy as np
import pytest

from transformer_jax.cli import prepare as prepare_cli
from transformer_jax.data import DataError
from transformer_jax.data import prepare as lm_prepare
from transformer_jax.data.pair_dataset import check_kind, dataset_kind, is_parallel, open_pairs
from transformer_jax.data.pair_files import pair_files
from transformer_jax.data.prepare_pairs import PairSettings, prepare_pairs, source_hash

WORDS = ["the", "cat", "dog", "sat", "on", "a", "mat", "red", "big", "small", "house", "runs",
         "über", "naïve", "日本", "🌍"]


def _pairs(n, seed=0):
    """``n`` distinct (source, target) pairs: the target is the source reversed and upper-cased,
    so that the two sides differ and the pair decodes to something checkable."""
    rng = np.random.default_rng(seed)
    out = {}
    while len(out) < n:
        src = " ".join(rng.choice(WORDS, rng.integers(1, 9)))
        out[src] = " ".join(reversed(src.split())).upper()
    return list(out.items())


def _aligned(folder, pairs, name="train"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.src").write_text("".join(a + "\n" for a, _ in pairs), encoding="utf-8")
    (folder / f"{name}.tgt").write_text("".join(b + "\n" for _, b in pairs), encoding="utf-8")
    return pair_files([folder / f"{name}.src", folder / f"{name}.tgt"])


SMALL = PairSettings(vocab_size=320, valid_fraction=0.1, test_fraction=0.1)
BASE = _pairs(400)
# The filters' cases: two empty sides, one duplicate, one over max_tokens (a pre-token per word:
# 100 tokens at least), one over max_ratio.
EXTRA = [("", "leer"), ("nothing", ""), BASE[0], (" ".join(["cat"] * 100), "KATZE " * 100),
         ("a", "DIES IST EIN SEHR LANGER SATZ MIT VIELEN WORTEN UND NOCH MEHR")]
SETTINGS = PairSettings(vocab_size=320, valid_fraction=0.1, test_fraction=0.1, max_tokens=60,
                        max_ratio=9.0)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    meta = prepare_pairs(_aligned(root / "src", BASE + EXTRA), root / "ds", SETTINGS,
                         log=lambda m: None)
    return root, meta, open_pairs(root / "ds")


def _decoded(ds, split):
    src, tgt = split.pairs(np.arange(len(split)))
    return [(ds.tokenizer.decode(a), ds.tokenizer.decode(b)) for a, b in zip(src, tgt)]


def test_ids_decode_to_the_pairs_and_every_split_is_disjoint_by_source(prepared):
    _, meta, ds = prepared
    got = {name: _decoded(ds, getattr(ds, name)) for name in ("train", "valid", "test")}
    kept = set(BASE)  # every base pair kept exactly once, in one split
    assert sorted(p for v in got.values() for p in v if p in kept) == sorted(kept)
    for name in ("valid", "test"):
        assert getattr(ds, name).texts() == got[name]  # raw text == decoded ids
    sources = {name: {a for a, _ in v} for name, v in got.items()}
    assert not sources["train"] & (sources["valid"] | sources["test"])
    assert all(source_hash(a) < 0.1 for a in sources["test"])
    assert all(0.1 <= source_hash(a) < 0.2 for a in sources["valid"])
    long_in_test = source_hash(EXTRA[3][0]) < 0.1  # the test split is never length-filtered
    assert len(ds.train) + len(ds.valid) + len(ds.test) == len(BASE) + long_in_test
    for name in ("train", "valid", "test"):
        split = getattr(ds, name)
        src, tgt = split.pairs(np.arange(len(split)))
        np.testing.assert_array_equal(split.lengths, [(len(a), len(b)) for a, b in zip(src, tgt)])
        assert meta["splits"][name]["pairs"] == len(split)
    assert ds.tokenizer.decode(ds.tokenizer.encode("<eos>")) == "<eos>"  # text, not a special
    assert (ds.pad_id, ds.bos_id, ds.eos_id) == (0, 1, 2)


def test_filters_are_counted(prepared):
    _, meta, _ = prepared
    removed = meta["filters"]["removed"]
    assert meta["filters"]["read"] == len(BASE) + len(EXTRA)
    assert (removed["empty"], removed["duplicate"], removed["ratio"]) == (2, 1, 1)
    long_in_test = source_hash(EXTRA[3][0]) < 0.1  # the test split is never length-filtered
    assert removed["too_long"] == (0 if long_in_test else 1)


def test_pairs_read_in_any_order_and_repeat(prepared):
    _, _, ds = prepared
    order = np.array([5, 0, 5, len(ds.train) - 1])
    src, tgt = ds.train.pairs(order)
    all_src, all_tgt = ds.train.pairs(np.arange(len(ds.train)))
    for i, k in enumerate(order):
        np.testing.assert_array_equal(src[i], all_src[k])
        np.testing.assert_array_equal(tgt[i], all_tgt[k])
    with pytest.raises(IndexError):
        ds.train.pairs([len(ds.train)])
    assert ds.detokenize([*all_tgt[0], ds.eos_id, ds.pad_id, 7]) == ds.tokenizer.decode(all_tgt[0])


def test_same_pairs_in_another_order_give_the_same_splits_and_identical_files(prepared,
                                                                              tmp_path):
    root, _, ds = prepared
    prepare_pairs(_aligned(tmp_path / "src", BASE + EXTRA), tmp_path / "again", SETTINGS,
                  log=lambda m: None)
    for f in sorted((root / "ds").iterdir()):
        if f.name != "meta.json":
            assert (tmp_path / "again" / f.name).read_bytes() == f.read_bytes(), f.name
    metas = [json.loads((d / "meta.json").read_text()) for d in (root / "ds", tmp_path / "again")]
    assert [{k: v for k, v in m.items() if k != "inputs"} for m in metas] == [
        {k: v for k, v in metas[0].items() if k != "inputs"}] * 2  # only the paths differ
    shuffled = [BASE[i] for i in np.random.default_rng(1).permutation(len(BASE))]
    prepare_pairs(_aligned(tmp_path / "shuf", shuffled), tmp_path / "shuffled", SETTINGS,
                  log=lambda m: None)
    other = open_pairs(tmp_path / "shuffled")
    for name in ("valid", "test"):
        assert sorted(getattr(other, name).texts()) == sorted(
            p for p in getattr(ds, name).texts() if p in set(BASE))


def test_explicit_valid_and_test_files_and_their_sources_left_out_of_training(tmp_path):
    train, valid, test = BASE[:300], BASE[300:340], BASE[340:380]
    overlap = [(valid[0][0], "ANDERS"), (test[0][0], "AUCH ANDERS")]
    meta = prepare_pairs(_aligned(tmp_path / "s", train + overlap), tmp_path / "ds", SMALL,
                         valid=_aligned(tmp_path / "s", valid, "valid"),
                         test=_aligned(tmp_path / "s", test, "test"), log=lambda m: None)
    ds = open_pairs(tmp_path / "ds")
    assert ds.valid.texts() == valid and ds.test.texts() == test
    assert sorted(_decoded(ds, ds.train)) == sorted(train)
    assert meta["filters"]["removed"]["overlap"] == 2


def test_kind_tells_parallel_from_lm_datasets(prepared, tmp_path):
    root, _, _ = prepared
    (tmp_path / "lm.txt").write_text("some text for a language model. " * 200)
    lm_prepare.prepare_dataset([tmp_path / "lm.txt"], tmp_path / "lm",
                               lm_prepare.PrepareSettings(vocab_size=300, val_tokens=100),
                               log=lambda m: None)
    assert dataset_kind(root / "ds") == "pairs" and is_parallel(root / "ds")
    assert dataset_kind(tmp_path / "lm") == "lm" and not is_parallel(tmp_path / "lm")
    assert dataset_kind(tmp_path) is None
    check_kind(root / "ds", "pairs")
    check_kind(tmp_path / "lm", "lm")
    with pytest.raises(DataError, match="language-model dataset .* --pairs"):
        check_kind(tmp_path / "lm", "pairs")
    with pytest.raises(DataError, match="parallel dataset .* --task translate"):
        check_kind(root / "ds", "lm")
    with pytest.raises(DataError, match="language-model dataset"):
        open_pairs(tmp_path / "lm")


def test_cli_writes_and_summarises(tmp_path, capsys):
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps({"translation": {"en": a, "xx": b}}) + "\n"
                           for a, b in BASE + EXTRA[:2]), encoding="utf-8")
    assert prepare_cli.main(["--pairs", str(src), "--source-lang", "en", "--target-lang", "xx",
                             "--out", str(tmp_path / "ds"), "--vocab-size", "300",
                             "--test-fraction", "0.1", "--valid-fraction", "0.1"]) == 0
    out = capsys.readouterr().out.strip()
    assert re.fullmatch(r"wrote .*: vocabulary 300; read 402 pairs, removed empty 2 .*; train "
                        r"[\d,]+ pairs .* valid [\d,]+ pairs .* test [\d,]+ pairs .*", out), out


def _bad_inputs(tmp_path):
    """Each bad input: (arguments after --pairs, the words its message must hold)."""
    good = "\n".join(f"{a}\t{b}" for a, b in BASE[:50])
    (tmp_path / "a.src").write_text("x\n" * 60)
    (tmp_path / "a.tgt").write_text("y\n" * 59)
    (tmp_path / "tabs.tsv").write_text(good + "\none\ttoo\tmany\n")
    (tmp_path / "none.tsv").write_text(good + "\nno tab\n")
    (tmp_path / "f.jsonl").write_text('{"translation": {"en": "a", "de": "b"}}\n'
                                      '{"translation": {"de": "b"}}\n')
    (tmp_path / "bin.tsv").write_bytes(good.encode() + b"\n\xff\xfe\tx\n")
    (tmp_path / "ratio.tsv").write_text("".join(f"w{i}\t{' '.join(['long'] * 30)}\n"
                                                for i in range(20)))
    return [
        (["a.src", "a.tgt"], ["'a.src' has 60 lines", "'a.tgt' has 59"]),
        (["tabs.tsv"], ["tabs.tsv' line 51 has 2 tabs"]),
        (["none.tsv"], ["none.tsv' line 51 has 0 tabs"]),
        (["f.jsonl", "--source-lang", "en", "--target-lang", "de"],
         ["f.jsonl' line 2", "'translation.en' is missing"]),
        (["bin.tsv"], ["bin.tsv' line 51 is not UTF-8 (byte 0xff"]),
        (["ratio.tsv", "--max-ratio", "2"],
         ["empty after filtering", "of 20 pairs read", "--max-ratio 2 20"]),
    ]


def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for args, words in _bad_inputs(tmp_path):
        with pytest.raises(SystemExit) as e:
            prepare_cli.main(["--pairs", *args, "--out", "ds", "--vocab-size", "300"])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2, args
        assert err[-1].startswith("python -m transformer_jax.prepare: error: "), err
        assert "Traceback" not in "\n".join(err)
        for w in words:
            assert w in err[-1], (w, err[-1])
        assert not (tmp_path / "ds").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ds")]


def test_flags_of_the_other_path_are_refused(tmp_path, capsys):
    (tmp_path / "p.tsv").write_text("a\tb\n")
    for argv, words in ((["--pairs", str(tmp_path / "p.tsv"), "--tokenizer", "byte"],
                         "--tokenizer is for language-model text"),
                        ([str(tmp_path / "p.tsv"), "--max-ratio", "3"], "--max-ratio is for text"),
                        (["--pairs", str(tmp_path / "p.tsv"), "--test-pairs", str(tmp_path / "p.tsv"),
                          "--test-fraction", "0.1"], "give one of them")):
        with pytest.raises(SystemExit) as e:
            prepare_cli.main([*argv, "--out", str(tmp_path / "ds")])
        assert e.value.code == 2 and words in capsys.readouterr().err
