"""python -m transformer_jax.translate on a run trained on a parallel dataset: raw text from
arguments, a file or stdin, one line out per line in, in order; --reference scores with
sacreBLEU and chrF; bad input (a reference of another length, an LM run) is one line, exit 2."""

import dataclasses
import io
import json
import sys

import numpy as np
import pytest
from pair_helpers import prepare_reversal

from transformer_jax import train as training
from transformer_jax.cli import translate
from transformer_jax.config import PRESETS, RECIPES, TrainConfig
from transformer_jax.data.pair_dataset import open_pairs
from transformer_jax.models.transformer import Transformer
from transformer_jax.runs.checkpoint import Checkpointer
from transformer_jax.runs.load import load_run
from transformer_jax.train import translation

WORDS = ["the", "cat", "dog", "sat", "on", "a", "mat", "red", "big", "house"]


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory):
    """A run directory as ``train.py --task translate --data DIR`` writes it (config.json, the
    dataset's tokenizer.json, one checkpoint of untrained tiny parameters), and its dataset."""
    root = tmp_path_factory.mktemp("translate_real")
    data = open_pairs(prepare_reversal(root, WORDS, 120, lambda rng: int(rng.integers(1, 7)),
                                       vocab_size=280))
    cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=data.vocab_size,
                              num_encoder_layers=1, num_decoder_layers=1)
    out = root / "run"
    tc = RECIPES["translate-text"].train.replace(data=(str(root / "ds"),), out=str(out))
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"model": cfg.to_dict(), "train": tc.to_dict()}))
    (out / "tokenizer.json").write_text(data.tokenizer_json, encoding="utf-8")
    model, tx = Transformer(cfg), training.make_optimizer(tc, cfg.d_model)
    with Checkpointer(out / "checkpoints") as ckpt:
        state = training.init_state(model, tx, seed=3, input_lengths=(8, 8))
        ckpt.save(5, state, {"step": 5, "model": cfg.to_dict(), "train": tc.to_dict()})
    return out, data, root


def _main(argv, capsys):
    code = translate.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_files_in_order_with_reference_scores(corpus_run, capsys, tmp_path):
    run, data, _ = corpus_run
    texts = data.test.texts()
    sources = [s for s, _ in texts] + ["the big red house sat on the mat", "cat"]
    refs = [t for _, t in texts] + ["x", "y"]
    (tmp_path / "in.txt").write_text("\n".join(sources) + "\n", encoding="utf-8")
    (tmp_path / "ref.txt").write_text("\n".join(refs) + "\n", encoding="utf-8")
    code, out, err = _main(["--run", str(run), "--input", str(tmp_path / "in.txt"), "--output",
                            str(tmp_path / "out.txt"), "--reference", str(tmp_path / "ref.txt"),
                            "--greedy"], capsys)
    assert code == 0 and out == ""
    hyps = (tmp_path / "out.txt").read_text(encoding="utf-8").split("\n")[:-1]
    assert len(hyps) == len(sources)
    # The same as decoding the texts through the library, and in the input's order: the
    # reversed input gives the reversed output.
    loaded = load_run(run)
    codec = translation.TextCodec(loaded.tokenizer, 0, 2)
    assert translation.translate_texts(loaded.model, loaded.params, codec, sources,
                                       greedy=True) == hyps
    assert translation.translate_texts(loaded.model, loaded.params, codec, sources[::-1],
                                       greedy=True) == hyps[::-1]
    assert "sentences/s" in err and f"{len(sources)} sentences" in err
    scores = translation.score(hyps, refs)
    assert f"BLEU {scores['bleu']:.2f} (nrefs:1|" in err
    assert f"chrF {scores['chrf']:.2f} (nrefs:1|" in err


def test_arguments_and_stdin(corpus_run, capsys, monkeypatch):
    run, _, _ = corpus_run
    code, out, _ = _main(["--run", str(run), "the cat", "a dog sat"], capsys)
    assert code == 0 and len(out.splitlines()) == 2
    monkeypatch.setattr(sys, "stdin", io.StringIO("the cat\na dog sat\n"))
    code, piped, _ = _main(["--run", str(run)], capsys)
    assert code == 0 and piped == out


def _refused(argv, capsys):
    with pytest.raises(SystemExit) as e:
        translate.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    return err[0]


def test_bad_input_is_one_line_and_exit_2(corpus_run, capsys, tmp_path):
    run, _, _ = corpus_run
    (tmp_path / "in.txt").write_text("the cat\na dog\n", encoding="utf-8")
    (tmp_path / "ref.txt").write_text("die katze\n", encoding="utf-8")
    message = _refused(["--run", str(run), "--input", str(tmp_path / "in.txt"), "--reference",
                        str(tmp_path / "ref.txt"), "--output", str(tmp_path / "out.txt")],
                       capsys)
    assert "has 1 lines, the input 2 sentences" in message
    assert not (tmp_path / "out.txt").exists()
    lm = tmp_path / "lm"
    lm.mkdir()
    (lm / "config.json").write_text(json.dumps({"model": PRESETS["cpu-lm"].to_dict(),
                                                "train": TrainConfig().to_dict()}))
    assert "language model" in _refused(["--run", str(lm), "hello"], capsys)
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xff\xfe\n")
    assert "not UTF-8" in _refused(["--run", str(run), "--input", str(tmp_path / "bad.txt")],
                                   capsys)


def test_visualize_draws_the_cross_attention_of_a_real_pair(corpus_run, tmp_path, capsys):
    from transformer_jax.cli import visualize

    run, _, _ = corpus_run
    png = tmp_path / "cross.png"
    assert visualize.main(["attention", "--run", str(run), "--src", "the big red house",
                           "--tgt", "house red big the", "--out", str(png)]) == 0
    assert png.stat().st_size > 1000
    loaded = load_run(run)
    codec = translation.TextCodec(loaded.tokenizer, 0, 2)
    src = codec.encode("the big red house")[None].astype(np.int32)
    tgt = np.concatenate([[1], codec.encode("house red big the")])[None].astype(np.int32)
    maps = visualize.attention_maps(loaded.model, loaded.params, src, tgt)
    cross = [v for k, v in maps.items() if k.endswith("cross_attention")]
    assert cross and cross[0].shape == (2, tgt.shape[1], src.shape[1])  # [N, T, S]
    np.testing.assert_allclose(cross[0].sum(-1), 1.0, rtol=1e-5)
    assert visualize.main(["attention", "--run", str(run), "--src", "the cat", "--out",
                           str(tmp_path / "own.png")]) == 0  # the model's own translation
