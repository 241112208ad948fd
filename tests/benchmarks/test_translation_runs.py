"""benchmarks/translation.py's comparison of models (benchmarks/translation_runs.py): the
models it compares, the figures it derives, and one tiny run of the whole benchmark."""

import dataclasses
import json
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import translation  # noqa: E402
from benchmarks import translation_runs as tr  # noqa: E402
from transformer_jax.config import RECIPES, ModelConfig  # noqa: E402
from transformer_jax.models import accounting, match_rnn_seq2seq_width  # noqa: E402
from transformer_jax.train import translation as workload  # noqa: E402


def _curve(points):
    return [{"train_s": t, "val_bleu": b} for t, b in points]


def test_time_to_reach_interpolates_the_first_crossing():
    curve = _curve([(10.0, 1.0), (20.0, 5.0), (30.0, 9.0), (40.0, 7.0), (50.0, 12.0)])
    assert tr.time_to_reach(curve, 3.0) == pytest.approx(15.0)
    assert tr.time_to_reach(curve, 9.0) == pytest.approx(30.0)  # met exactly
    assert tr.time_to_reach(curve, 10.0) == pytest.approx(46.0)  # after a fall
    assert tr.time_to_reach(curve, 0.5) == 10.0  # already there at the first point
    assert tr.time_to_reach(curve, 13.0) is None  # never


def _row(model, curve, test_bleu, tokens_per_s, decode):
    return {"model": model, "curve": _curve(curve), "test_bleu": test_bleu,
            "best_val_bleu": max(b for _, b in curve), "tokens_per_s": tokens_per_s,
            "decode_sentences_per_s": decode}


def test_compare_gives_the_time_ratio_and_the_gain_at_equal_time():
    transformer = _row("transformer", [(10, 2.0), (20, 8.0), (30, 14.0)], 15.0, 6000, 20.0)
    rnn = _row("lstm", [(10, 1.0), (20, 3.0), (30, 6.0), (40, 6.0)], 7.5, 3000, 40.0)
    c = tr.compare(transformer, rnn)
    # The LSTM's best, 6.0, first at 30 s; the Transformer passes 6.0 at 10 + 10·4/6 s.
    assert c["rnn_time_to_best_s"] == 30
    assert c["transformer_time_to_rnn_best_s"] == pytest.approx(10 + 40 / 6)
    assert c["time_to_rnn_bleu_ratio"] == pytest.approx((10 + 40 / 6) / 30)
    assert c["bleu_gain_at_equal_time"] == pytest.approx(7.5)
    assert c["train_tokens_per_s_ratio"] == 2.0 and c["decode_sentences_per_s_ratio"] == 0.5
    assert c["rnn_time_to_transformer_best_ratio"] is None  # the LSTM never gets to 14
    never = tr.compare(_row("transformer", [(10, 0.5), (20, 2.0)], 1.0, 1, 1), rnn)
    assert never["time_to_rnn_bleu_ratio"] is None
    # The converse: the LSTM passes the Transformer's best, 2.0, at 15 s; the Transformer
    # reached it at 20 s.
    assert never["rnn_time_to_transformer_best_ratio"] == pytest.approx(15 / 20)
    untrained = tr.compare(transformer, _row("gru", [(10, 0.0)], 0.0, 1, 1))
    assert untrained["time_to_rnn_bleu_ratio"] is None  # an RNN that never scored
    assert (c["transformer"], c["rnn"]) == ("transformer", "lstm")


def test_each_transformer_is_compared_with_each_rnn_the_first_pair_first():
    rows = [_row(m, [(10, 1.0), (20, 4.0)], 3.0, 1, 1)
            for m in ("transformer", "transformer-pre", "lstm", "gru")]
    pairs = [(c["transformer"], c["rnn"]) for c in tr.compare_all(rows)]
    assert pairs == [("transformer", "lstm"), ("transformer", "gru"),
                     ("transformer-pre", "lstm"), ("transformer-pre", "gru")]


def test_transformer_pre_is_the_same_model_and_training_with_pre_ln(tmp_path):
    post, pre = tr.model_config("transformer", 4000), tr.model_config("transformer-pre", 4000)
    assert (post.norm, pre.norm) == ("post", "pre")
    assert dataclasses.replace(pre, norm="post") == post
    # Pre-LN adds one final normalisation a stack: 2 × 2·d_model parameters, no more.
    assert accounting.num_params(pre) - accounting.num_params(post) == 4 * post.d_model
    tc = tr.train_config("transformer-pre", tmp_path, tmp_path / "run", steps=480)
    base = tr.train_config("transformer", tmp_path, tmp_path / "run", steps=480)
    assert tc == base  # the registry's "transformer", unclipped: only the model config differs


@pytest.mark.parametrize("rnn", ["lstm", "gru"])
def test_the_rnn_has_the_transformers_parameter_count_and_luongs_clipping(rnn, tmp_path):
    transformer = tr.model_config("transformer", 4000)
    cfg = tr.model_config(rnn, 4000)
    n = accounting.num_params(transformer)
    assert abs(accounting.rnn_seq2seq_num_params(cfg, rnn) / n - 1) < 0.1
    assert (cfg.num_encoder_layers, cfg.num_decoder_layers) == (tr.RNN_LAYERS, tr.RNN_LAYERS)
    tc = tr.train_config(rnn, tmp_path, tmp_path / "run", steps=480)
    assert (tc.model, tc.optim.grad_clip, tc.schedule.steps) == (rnn, tr.RNN_GRAD_CLIP, 480)
    base = tr.train_config("transformer", tmp_path, tmp_path / "run", steps=480)
    assert base.optim.grad_clip == 0.0  # the paper clips nothing
    # Everything else is the recipe's: the same loss, optimizer and schedule.
    assert (tc.optim.label_smoothing, tc.optim.optimizer, tc.schedule.schedule) == (
        base.optim.label_smoothing, base.optim.optimizer, base.schedule.schedule)
    assert tc.schedule.steps % tc.loop.eval_every == 0


def test_the_transformer_alone_trains_the_translate_text_recipe(tmp_path):
    tc = tr.train_config("transformer", tmp_path, tmp_path / "run")
    recipe = RECIPES["translate-text"].train
    assert (tc.optim, tc.schedule) == (recipe.optim, recipe.schedule)
    assert (tc.loop.ckpt_every, tc.loop.eval_every, tc.loop.log_every) == (
        recipe.loop.ckpt_every, recipe.loop.eval_every, recipe.loop.log_every)


def _tiny(name, vocab_size):
    cfg = ModelConfig(vocab_size=vocab_size, d_model=16, num_heads=2, num_encoder_layers=1,
                      num_decoder_layers=1, d_ff=32, dropout_rate=0.0, max_len=64)
    if name == "transformer":
        return cfg
    return match_rnn_seq2seq_width(accounting.num_params(cfg), cfg, cell_type=name)


def test_a_tiny_comparison_writes_both_figures_rows_table_and_plot(tmp_path, monkeypatch):
    words = "red green blue cat dog house tree water fire stone".split()
    german = dict(zip(words, "rot grün blau Katze Hund Haus Baum Wasser Feuer Stein".split()))
    rng = random.Random(0)
    lines = []
    for _ in range(1000):
        src = [rng.choice(words) for _ in range(rng.randint(2, 6))]
        lines.append(" ".join(src) + "\t" + " ".join(german[w] for w in src))
    (tmp_path / "pairs.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    monkeypatch.setattr(tr, "model_config", _tiny)
    one_device = tr.train_config  # smaller programs to compile than pmap over the fake devices
    monkeypatch.setattr(tr, "train_config",
                        lambda *a, **k: one_device(*a, **k).replace(parallel="none"))
    monkeypatch.setattr(tr, "PROBE_STEPS", 20)
    monkeypatch.setattr(tr, "EVALS", 2)
    monkeypatch.setattr(translation, "TEST_FRACTION", 0.03)
    # One compiled shape each for training, validation and decoding: compiles are the cost.
    monkeypatch.setattr(workload, "REAL_SHARE", 0.0)
    monkeypatch.setattr(workload, "EVAL_BUCKETS", 1)
    out = tmp_path / "out"
    assert translation.main(["--pairs", str(tmp_path / "pairs.tsv"), "--models",
                             "transformer,lstm", "--budget", "0.01", "--batch-tokens", "150",
                             "--out", str(out), "--work", str(tmp_path / "work")]) == 0
    r = json.loads((out / "results.json").read_text())["results"]
    assert [m["model"] for m in r["models"]] == ["transformer", "lstm"]
    for m in r["models"]:
        assert m["steps"] == 20 and len(m["curve"]) == 2  # the probe's minimum, 2 validations
        assert m["train_flops"] == pytest.approx(m["curve"][-1]["flops"]) and m["train_flops"] > 0
        assert m["decode_sentences_per_s"] > 0 and 0 <= m["test_bleu"] <= 100
    assert r["bleu_gain_at_equal_time"] == pytest.approx(
        r["models"][0]["test_bleu"] - r["models"][1]["test_bleu"])
    assert "time_to_rnn_bleu_ratio" in r and r["test_bleu"] == r["models"][0]["test_bleu"]
    assert (out / "bleu_vs_time.png").stat().st_size > 0
    assert "transformer against lstm" in (out / "results.md").read_text()


def test_models_must_be_known_distinct_and_led_by_a_transformer(capsys):
    for models in ("transformer,rnn", "lstm,transformer", "lstm,lstm", ",",
                   "transformer,transformer-pre"):
        with pytest.raises(SystemExit) as e:
            translation.main(["--models", models])
        assert e.value.code == 2
    assert "--models" in capsys.readouterr().err


@pytest.mark.parametrize("argv, sweep", [
    (["--models", "transformer,lstm"], True),  # the full form sweeps the rates
    (["--models", "transformer,lstm", "--quick"], False),  # --quick takes the pinned ones
    (["--models", "transformer,lstm", "--no-sweep"], False),
    (["--models", "transformer-pre,gru", "--quick", "--sweep"], True),
    (["--models", "transformer"], False),  # the recipe alone
])
def test_the_full_form_of_a_comparison_sweeps_the_rates(argv, sweep):
    parser = translation._parser()
    args = parser.parse_args(argv)
    translation._models(parser, args)
    assert args.sweep is sweep
