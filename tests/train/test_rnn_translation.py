"""``--model lstm`` on a sequence-to-sequence task: the attentional RNN translator trains through
the same workload, loop, checkpoints and resume as the Transformer (one device or sharded), and
the run loads and translates through ``load_run`` and the ``translate`` command; on a prepared
parallel dataset too (``train.py --task translate --data DIR --model lstm``): token-count
batches, validation BLEU, the test evaluation and its hypotheses file."""

import dataclasses

import jax
import numpy as np
import pytest
from pair_helpers import prepare_reversal

from transformer_jax.cli import translate
from transformer_jax.config import PRESETS, RECIPES, ModelConfig
from transformer_jax.data import seq2seq_tasks
from transformer_jax.data.pair_dataset import open_pairs
from transformer_jax.data.seq2seq_tasks import BOS, EOS, Seq2SeqTask
from transformer_jax.models import RNNSeq2Seq
from transformer_jax.runs.load import load_run
from transformer_jax.runs.metrics import read_jsonl
from transformer_jax.train import loop, seq2seq, translation

SYMBOLS = list("abcdefgh")


def _short_reversal(rng):
    src = [SYMBOLS[i] for i in rng.integers(len(SYMBOLS), size=rng.integers(2, 6))]
    return src, src[::-1]


TASK = Seq2SeqTask("reverse", SYMBOLS, _short_reversal, max_src_len=5, max_tgt_len=5)
MODEL = ModelConfig(vocab_size=TASK.vocab_size, d_model=32, num_heads=1, num_encoder_layers=1,
                    num_decoder_layers=1, d_ff=32, dropout_rate=0.1, max_len=16)
STEPS = 100
# Adam at a constant rate: the RNN has no warmup in its recipe (GNMT and Luong et al. used
# plain SGD or Adam); dropout on, so that the resume also restores the dropout key.
TC = RECIPES["translate"].train.replace(
    task="reverse", model="lstm", optimizer="adam", schedule="constant", lr=1e-2, warmup=1,
    label_smoothing=0.0, grad_clip=1.0, steps=STEPS, batch_size=32, eval_every=25,
    ckpt_every=50, log_every=25, steps_per_call=25, max_to_keep=2, average_last=1,
    parallel="none")


def _run(out, **kwargs):
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(seq2seq_tasks.TASKS, "reverse", lambda: TASK)
        mp.setattr(seq2seq, "NUM_TEST", 64)
        mp.setattr(seq2seq, "NUM_VALIDATION", 64)
        return loop.run(MODEL, TC.replace(out=str(out)), devices=jax.devices()[:1],
                        progress=False, log=lambda message: None, **kwargs)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``train.py --task reverse --model lstm`` through the loop, uninterrupted."""
    out = tmp_path_factory.mktemp("lstm")
    return out, _run(out)


def test_lstm_translator_learns_reversal(trained):
    out, result = trained
    assert result.step == STEPS and not result.interrupted
    val = [r["val_loss"] for r in read_jsonl(out / "metrics.jsonl") if "val_loss" in r]
    # From ln V = 2.4 nats at the start. A model that ignored the source could not do better
    # than about ln 8 = 2.1 nats on each of the target's symbols (8 equally likely).
    assert len(val) == 4 and val[0] > val[-1] and val[-1] < 0.3, val
    assert result.evaluation["test_exact_match_greedy"] > 0.5, result.evaluation


def test_lstm_translator_resumes_bit_exactly(trained, tmp_path):
    _, full = trained
    cut = _run(tmp_path, stop_at=75)  # saved at a step between checkpoints
    assert cut.interrupted and cut.step == 75
    resumed = _run(tmp_path)
    assert resumed.start_step == 75 and resumed.step == STEPS
    jax.tree.map(np.testing.assert_array_equal, resumed.state, full.state)
    assert resumed.val_loss == full.val_loss


def test_the_run_loads_and_translates(trained, capsys):
    out, full = trained
    run = load_run(out, kind="seq2seq")
    assert isinstance(run.model, RNNSeq2Seq) and run.model.cell_type == "lstm"
    jax.tree.map(np.testing.assert_array_equal, run.params, full.state.params)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(seq2seq_tasks.TASKS, "reverse", lambda: TASK)
        assert translate.main(["--run", str(out), "--greedy", "a b c d", "h g"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(set(line.split()) <= set(SYMBOLS) for line in lines)


def _six_steps(out, devices, **settings):
    """The parameters after 6 steps (no dropout, Adam ε = 1e-4 as in test_seq2seq: a tinier ε
    turns float rounding of exactly-zero gradients into full steps that differ by path)."""
    tc = TC.replace(out=str(out), steps_per_call=3, log_every=3, eps=1e-4, **settings)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(seq2seq_tasks.TASKS, "reverse", lambda: TASK)
        mp.setattr(seq2seq, "NUM_VALIDATION", 32)
        result = loop.run(dataclasses.replace(MODEL, dropout_rate=0.0), tc, devices=devices,
                          stop_at=6, progress=False, log=lambda message: None)
    assert result.step == 6 and result.interrupted
    return result.state.params


def test_sharded_over_four_devices_equals_one_device(tmp_path):
    """The RNN's parameters take the sharding table's rules (FSDP over kernels' first axis)."""
    one = _six_steps(tmp_path / "one", jax.devices()[:1])
    many = _six_steps(tmp_path / "many", jax.devices()[:4], parallel="sharded",
                      mesh="data=2,fsdp=2")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(one), jax.tree.leaves(many)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5, err_msg=jax.tree_util.keystr(path))


# ---- on a prepared parallel dataset ---------------------------------------------------------

CORPUS_STEPS = 30
WORDS = ["the", "cat", "dog", "sat", "on", "a", "mat", "red", "big", "small", "house", "runs"]


def _prepare_corpus(root):
    """200 distinct pairs of four words, the target the source reversed, prepared into
    ``root / "ds"``. One length (in words and in subwords): one bucket of training batches and
    one decoding width, so the run compiles one program of each kind (two lengths, as in
    test_translation's corpus, double the run's time, which is mostly compiling)."""
    return prepare_reversal(root, WORDS, 200, lambda rng: 4, vocab_size=300)


def _corpus_configs(data, out):
    """A 1 + 1 layer, 32-wide LSTM translator on ``data``: Adam at a constant rate, as above;
    dropout on, so that the resume also restores the dropout key."""
    model = dataclasses.replace(PRESETS["tiny"], vocab_size=open_pairs(data).vocab_size,
                                num_encoder_layers=1, num_decoder_layers=1, dropout_rate=0.1)
    tc = RECIPES["translate-text"].train.replace(
        data=(str(data),), out=str(out), model="lstm", optimizer="adam", schedule="constant",
        lr=1e-2, warmup=1, steps=CORPUS_STEPS, eval_every=15, ckpt_every=10, log_every=5,
        batch_tokens=200, parallel="none")
    return model, tc


def _corpus_train(data, out, **kwargs):
    model, tc = _corpus_configs(data, out)
    return loop.run(model, tc, devices=jax.devices()[:1], progress=False,
                    log=lambda message: None, **kwargs)


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory):
    """``train.py --task translate --data DIR --model lstm``, uninterrupted."""
    root = tmp_path_factory.mktemp("lstm_corpus")
    data = _prepare_corpus(root)
    return root / "run", data, _corpus_train(data, root / "run")


def test_lstm_trains_and_is_scored_on_a_parallel_dataset(corpus_run):
    out, data, result = corpus_run
    assert result.step == CORPUS_STEPS and not result.interrupted
    records = read_jsonl(out / "metrics.jsonl")
    losses = [r["loss"] for r in records if "loss" in r]
    # From about ln V = 5.7 nats (V = 297) the loss falls within 30 steps.
    assert len(losses) == CORPUS_STEPS // 5 and losses[-1] < 0.8 * losses[0], losses
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [15, 30]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"], evals
    assert all(0.0 <= r["val_bleu"] <= 100.0 for r in evals)
    final = records[-1]
    assert 0.0 <= final["test_bleu"] <= 100.0 and 0.0 <= final["copy_bleu"] <= 100.0
    assert final["bleu_signature"].startswith("nrefs:1|")
    hyps = (out / translation.HYPOTHESES).read_text(encoding="utf-8").splitlines()
    test = open_pairs(data).test
    assert len(hyps) == len(test) == final["num_test"] > 0
    refs = [t for _, t in test.texts()]
    assert translation.score(hyps, refs)["bleu"] == pytest.approx(final["test_bleu"])


def test_lstm_corpus_run_translates(corpus_run, capsys):
    out, _, result = corpus_run
    run = load_run(out)
    assert isinstance(run.model, RNNSeq2Seq) and run.model.cell_type == "lstm"
    jax.tree.map(np.testing.assert_array_equal, run.params, result.state.params)
    assert translate.main(["--run", str(out), "--greedy", "the big cat sat", "a dog"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2  # one line per sentence, in order


def test_lstm_corpus_run_resumes_bit_exactly(corpus_run, tmp_path):
    """Stopped between checkpoints (every 10) and resumed: at step 20 the parameters are the
    uninterrupted run's checkpoint of that step, bit for bit, dropout's key restored too.
    (Stopped again before the end: the test evaluation would add a compile and nothing more.)"""
    out, data, _ = corpus_run
    cut = _corpus_train(data, tmp_path / "run", stop_at=13)
    assert cut.interrupted and cut.step == 13
    resumed = _corpus_train(data, tmp_path / "run", stop_at=20)
    assert resumed.start_step == 13 and resumed.step == 20
    jax.tree.map(np.testing.assert_array_equal, resumed.state.params,
                 load_run(out, step=20).params)


# ---- visualize attention: the decoder's Luong attention over the source ---------------------


def test_visualize_draws_the_luong_attention(trained, tmp_path, monkeypatch, capsys):
    from matplotlib.figure import Figure

    from transformer_jax.cli import visualize

    out, _ = trained
    monkeypatch.setitem(seq2seq_tasks.TASKS, "reverse", lambda: TASK)
    drawn, save = [], Figure.savefig

    def savefig(fig, *args, **kwargs):  # the heatmaps as drawn: [(title, data [T, S])]
        drawn.append([(ax.get_title(), np.asarray(ax.images[0].get_array()))
                      for ax in fig.axes if ax.images])
        save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    png = tmp_path / "cross.png"
    assert visualize.main(["attention", "--run", str(out), "--src", "a b c d", "--tgt",
                           "d c b a", "--head", "mean", "--out", str(png)]) == 0
    ((title, probs),) = drawn[0]
    assert title == "mean of 1 head" and png.stat().st_size > 0
    run = load_run(out)
    src = np.asarray([[*TASK.encode(list("abcd")), EOS]], np.int32)
    tgt = np.asarray([[BOS, *TASK.encode(list("dcba"))]], np.int32)
    maps = visualize.attention_maps(run.model, run.params, src, tgt)
    assert list(maps) == ["attention"]
    np.testing.assert_allclose(probs, maps["attention"][0], rtol=1e-6)
    assert probs.shape == (5, 5)  # <bos> d c b a  x  a b c d <eos>
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    # The alignment of a reversal: the query that predicts target word t (after <bos> and t
    # words) attends to source word 3 - t. Uniform attention would put 0.2 there.
    assert np.mean([probs[t, 3 - t] for t in range(4)]) > 0.5, np.round(probs, 2)
    for kind in ("encoder", "decoder"):
        assert visualize.main(["attention", "--run", str(out), "--src", "a b", "--kind", kind,
                               "--out", str(tmp_path / "self.png")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "no self-attention" in err and "--kind cross" in err
