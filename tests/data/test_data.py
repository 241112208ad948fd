"""Byte tokenizer, corpora and batches: splits, determinism of the data order, eval coverage."""

import numpy as np
import pytest

from transformer_jax import data


def test_tokenizer_round_trip_and_vocab():
    tok = data.ByteTokenizer()
    text = "def f(x):\n    return x ** 2  # ünïcödé ✓"
    ids = tok.encode(text)
    assert ids.dtype == np.uint8 and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.vocab_size == 256
    # A multi-byte character cut in half decodes with a replacement character, never raises.
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"
    with pytest.raises(ValueError, match="256"):
        tok.decode(np.array([300]))


def test_embedded_corpus_is_pydoc_topics_with_last_tenth_held_out():
    from pydoc_data.topics import topics

    raw = "\n".join(topics[k] for k in sorted(topics)).encode("utf-8")
    corpus = data.load_corpus()
    assert corpus.name == "pydoc_data.topics"
    assert len(corpus.train) + len(corpus.val) == len(raw)
    assert len(corpus.val) == round(0.1 * len(raw))
    assert corpus.train.tobytes() == raw[: len(corpus.train)]
    assert corpus.val.tobytes() == raw[len(corpus.train):]


def test_files_and_folders_split_each_file(tmp_path):
    (tmp_path / "d").mkdir()
    a = tmp_path / "a.txt"
    text = bytes(range(1, 101))  # ASCII without NUL: text, not binary
    a.write_bytes(text)
    (tmp_path / "d" / "b.txt").write_bytes(b"x" * 50)
    (tmp_path / "d" / ".hidden").write_bytes(b"skip me")
    one = data.load_corpus([a])
    assert one.train.tobytes() == text[:90] and one.val.tobytes() == text[90:]
    both = data.load_corpus([a, tmp_path / "d"])
    assert both.files == (str(a), str(tmp_path / "d" / "b.txt"))
    assert both.train.tobytes() == text[:90] + b"x" * 45
    assert both.val.tobytes() == text[90:] + b"x" * 5


@pytest.mark.parametrize("make, match", [
    (lambda p: [p / "missing.txt"], "does not exist"),
    (lambda p: [p], "contains no files"),
])
def test_bad_paths_raise_readable_errors(tmp_path, make, match):
    with pytest.raises(data.DataError, match=match):
        data.load_corpus(make(tmp_path))


def test_too_short_split_is_an_error():
    with pytest.raises(data.DataError, match="seq_len"):
        data.train_batches(np.arange(10, dtype=np.uint8), seed=0, step=0, num_steps=1,
                           batch_size=2, seq_len=10)


def test_train_batches_are_a_pure_function_of_seed_and_step():
    tokens = np.random.default_rng(0).integers(0, 256, 5000).astype(np.uint8)
    kw = {"batch_size": 4, "seq_len": 16}
    chunk = data.train_batches(tokens, seed=3, step=10, num_steps=5, **kw)
    assert chunk.shape == (5, 4, 17) and chunk.dtype == np.int32
    # Step by step, or in another chunking (as after a resume), gives the same batches.
    singles = np.stack([data.train_batches(tokens, seed=3, step=s, num_steps=1, **kw)[0]
                        for s in range(10, 15)])
    np.testing.assert_array_equal(chunk, singles)
    np.testing.assert_array_equal(
        chunk[2:], data.train_batches(tokens, seed=3, step=12, num_steps=3, **kw))
    # Other steps and other seeds give other batches.
    assert not np.array_equal(chunk[0], chunk[1])
    assert not np.array_equal(chunk, data.train_batches(tokens, seed=4, step=10, num_steps=5, **kw))


def test_train_batches_are_contiguous_crops_covering_the_whole_split():
    tokens = np.arange(250, dtype=np.uint8)  # value == position
    batches = data.train_batches(tokens, seed=0, step=0, num_steps=200, batch_size=8, seq_len=20)
    np.testing.assert_array_equal(np.diff(batches, axis=-1), 1)  # consecutive bytes
    starts = batches[..., 0]
    # Both ends of the split are reachable: start 0 and the last full window (250 - 21).
    assert starts.min() == 0 and starts.max() == 250 - 21


def test_eval_batches_predict_every_byte_exactly_once():
    tokens = np.random.default_rng(1).integers(0, 256, 1003).astype(np.uint8)
    T, B = 16, 5
    batches = list(data.eval_batches(tokens, batch_size=B, seq_len=T))
    assert all(b.shape == (B, T + 1) for b in batches)
    assert len(batches) == -(-data.num_eval_windows(len(tokens), T) // B)
    targets = np.concatenate([b[:, 1:].ravel() for b in batches])
    real = targets[targets != data.IGNORE]
    np.testing.assert_array_equal(real, tokens[1:])  # in order, each once
    # Padding only follows real bytes: once a window has a pad, the rest of it is padding.
    for b in batches:
        pad = b == data.IGNORE
        assert not np.any(pad[:, :-1] & ~pad[:, 1:])
    # Each target follows its input within the window.
    first = batches[0]
    np.testing.assert_array_equal(first[0, :-1], tokens[:T])
    np.testing.assert_array_equal(first[1, :-1], tokens[T: 2 * T])


def test_eval_batches_max_windows():
    tokens = np.zeros(1000, np.uint8)
    batches = list(data.eval_batches(tokens, batch_size=4, seq_len=10, max_windows=6))
    targets = np.concatenate([b[:, 1:].ravel() for b in batches])
    assert len(batches) == 2 and (targets != data.IGNORE).sum() == 60
