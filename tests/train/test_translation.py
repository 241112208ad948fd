"""train.py --task translate --data DIR: token-count batches in a few length buckets (>= 85% real
tokens, logged), bit-exact resume, the test evaluation (sacreBLEU, chrF, signature, copy
baseline, hypotheses file), and the refusal of a dataset of the other kind."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from transformer_jax.cli import train as train_cli
from transformer_jax.config import PRESETS, RECIPES
from transformer_jax.data import prepare as lm_prepare
from transformer_jax.data.pair_dataset import open_pairs
from transformer_jax.data.pair_files import pair_files
from transformer_jax.data.prepare_pairs import PairSettings, prepare_pairs
from transformer_jax.parallel import resolve
from transformer_jax.runs.load import load_run
from transformer_jax.train import loop, translation
from transformer_jax.train.tasks import build_workload

WORDS = ["the", "cat", "dog", "sat", "on", "a", "mat", "red", "big", "small", "house", "runs"]


def write_corpus(folder, n=300, seed=0):
    """Aligned files of ``n`` distinct pairs in two length groups (2-3 and 8-9 words): varied
    lengths that a few buckets hold with little padding. The target is the source reversed
    (the same tokens: source and target fill their halves of a batch alike)."""
    rng = np.random.default_rng(seed)
    pairs = {}
    while len(pairs) < n:
        size = int(rng.choice([2, 3, 8, 9]))
        src = " ".join(rng.choice(WORDS, size))
        pairs[src] = " ".join(reversed(src.split()))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.en").write_text("".join(s + "\n" for s in pairs), encoding="utf-8")
    (folder / "train.de").write_text("".join(t + "\n" for t in pairs.values()),
                                     encoding="utf-8")
    return list(pairs.items())


def prepare_corpus(root):
    """A parallel dataset of :func:`write_corpus` in ``root / "ds"``."""
    write_corpus(root / "text")
    prepare_pairs(pair_files([root / "text" / "train.en", root / "text" / "train.de"]),
                  root / "ds", PairSettings(vocab_size=300, valid_fraction=0.1,
                                            test_fraction=0.1), log=lambda m: None)
    return root / "ds"


def configs(data, out, steps=8, **train):
    """The translate-text recipe on a tiny model, ``steps`` steps, one device."""
    model = dataclasses.replace(PRESETS["tiny"], vocab_size=open_pairs(data).vocab_size)
    tc = RECIPES["translate-text"].train.replace(
        data=(str(data),), out=str(out), steps=steps, warmup=4, eval_every=steps,
        ckpt_every=2, log_every=2, batch_tokens=200, parallel="none", **train)
    return model, tc


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return prepare_corpus(tmp_path_factory.mktemp("pairs"))


@pytest.fixture(scope="module")
def full_run(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("translation") / "run"
    model, tc = configs(dataset, out)
    result = loop.run(model, tc, progress=False, log=lambda m: None)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, model, tc, result, records


def test_batches_fill_85_percent_in_few_shapes_and_the_share_is_logged(dataset, full_run):
    _, model, tc, _, records = full_run
    lengths = open_pairs(dataset).train.lengths
    plan = translation.plan(lengths, 200)
    assert plan.real_share >= translation.REAL_SHARE
    assert len(plan.shapes()) <= 4  # two length groups: a handful of programs
    work = build_workload(model, tc, resolve("none"), log=lambda m: None)
    shapes, shares = set(), []
    for step in range(40):  # every batch has its bucket's shape, and the share is exact
        batch = work.train_batches(step, 1)
        assert batch.shape == work.batch_shape(step, 1)
        shapes.add(batch.shape)
        shares.append(((batch != 0).sum(), batch.size))
    assert shapes <= {(1, *s) for s in plan.shapes()}
    logged = [r["real_share"] for r in records if "real_share" in r]
    assert len(logged) == 4 and min(logged) >= translation.REAL_SHARE
    first = records[0]["step"]  # the first logged interval: steps 0 .. first - 1
    real, slots = np.sum(shares[:first], axis=0)
    assert logged[0] == pytest.approx(real / slots)
    # Every row holds a pair: <bos> and <eos> are where the layout puts them.
    b = work.train_batches(3, 1)[0]
    L = (b.shape[1] - 2) // 2
    assert (b[:, L] == 1).all() and ((b[:, L + 1:] == 2).sum(axis=1) == 1).all()


def test_a_batch_is_a_function_of_seed_and_step_and_rows(dataset, full_run):
    _, model, tc, _, _ = full_run
    work = build_workload(model, tc, resolve("none"), log=lambda m: None)
    again = build_workload(model, tc, resolve("none"), log=lambda m: None)
    for step in (0, 5, 77):
        whole = work.train_batches(step, 1)
        np.testing.assert_array_equal(whole, again.train_batches(step, 1))
        half = whole.shape[1] // 2
        np.testing.assert_array_equal(whole[:, half:],
                                      work.train_batches(step, 1, rows=slice(half, None)))
    other = build_workload(model, tc.replace(seed=1), resolve("none"), log=lambda m: None)
    assert not np.array_equal(work.train_batches(0, 1), other.train_batches(0, 1))


def test_resume_is_bit_exact(dataset, full_run, tmp_path):
    out, model, tc, _, _ = full_run
    split = tc.replace(out=str(tmp_path / "split"))
    first = loop.run(model, split, stop_at=3, progress=False, log=lambda m: None)
    assert first.interrupted and first.step == 3
    # Stopped again before the end (no final evaluation): compared with the uninterrupted
    # run's checkpoint of the same step.
    second = loop.run(model, split, stop_at=6, progress=False, log=lambda m: None)
    assert second.start_step == 3 and second.step == 6
    reference = load_run(out, step=6).params
    jax.tree.map(np.testing.assert_array_equal, second.state.params, reference)


def test_validation_and_test_scores_are_written(dataset, full_run):
    out, _, tc, _, records = full_run
    evals = [r for r in records if "val_loss" in r]
    assert evals and all(np.isfinite(r["val_loss"]) and 0 <= r["val_bleu"] <= 100
                         for r in evals)
    final = records[-1]
    for key in ("test_bleu", "test_chrf", "copy_bleu", "copy_chrf"):
        assert 0.0 <= final[key] <= 100.0
    assert final["bleu_signature"].startswith("nrefs:1|") and "tok:13a" in final[
        "bleu_signature"]
    assert final["chrf_signature"].startswith("nrefs:1|")
    # Checkpoints every 2 steps of 8, the last 5 averaged (§6.1): the 4 there are.
    assert final["averaged_checkpoints"] == 4 and final["averaged_from_step"] == 2
    data = open_pairs(tc.data.data[0])
    hyps = (out / translation.HYPOTHESES).read_text(encoding="utf-8").splitlines()
    assert len(hyps) == len(data.test) == final["num_test"]
    refs = [t for _, t in data.test.texts()]
    # The stored scores are sacreBLEU's on the written hypotheses.
    assert translation.score(hyps, refs)["bleu"] == pytest.approx(final["test_bleu"])
    copy = translation.score([s for s, _ in data.test.texts()], refs)
    assert copy["bleu"] == pytest.approx(final["copy_bleu"])
    assert (out / "tokenizer.json").read_text(encoding="utf-8") == data.tokenizer_json


def test_score_is_sacrebleu_and_chrf():
    refs = ["the cat sat on the mat", "a dog runs"]
    perfect = translation.score(refs, refs)
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["chrf"] == pytest.approx(100.0)
    assert translation.score(["x y z", "q"], refs)["bleu"] == pytest.approx(0.0)


def _fail(capsys, argv):
    with pytest.raises(SystemExit) as e:
        train_cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "Traceback" not in "".join(err)
    return err[-1]


def test_a_dataset_of_the_other_kind_is_refused(dataset, tmp_path, capsys):
    lm = tmp_path / "lm"
    (tmp_path / "a.txt").write_text("some text for a language model. " * 200)
    lm_prepare.prepare_dataset([tmp_path / "a.txt"], lm,
                               lm_prepare.PrepareSettings(vocab_size=300, val_tokens=100),
                               log=lambda m: None)
    out = tmp_path / "never"
    message = _fail(capsys, ["--task", "translate", "--data", str(lm), "--out", str(out)])
    assert "language-model dataset" in message and "--pairs" in message
    message = _fail(capsys, ["--data", str(dataset), "--out", str(out)])
    assert "parallel dataset" in message and "--task translate" in message
    assert not out.exists()


def test_the_translate_text_recipe_is_chosen_for_a_corpus(dataset):
    model, tc = train_cli.configure(["--task", "translate", "--data", str(dataset)])
    assert tc.out.startswith("runs/translate-text")
    assert model.vocab_size == open_pairs(dataset).vocab_size
    assert tc.data.batch_tokens == RECIPES["translate-text"].train.data.batch_tokens
    assert RECIPES["paper-base"].train.data.batch_tokens == 25_000  # §5.1
    model, tc = train_cli.configure(["--task", "translate"])  # the generated toy language
    assert tc.out == "runs/translate" and not tc.data.data


def test_settings_that_cannot_train_are_refused(dataset, tmp_path):
    from transformer_jax.runs.rundir import RunConfigError

    model, tc = configs(dataset, tmp_path / "x")
    cases = [(model, tc.replace(steps_per_call=10), "steps_per_call 10"),
             (dataclasses.replace(model, vocab_size=301), tc, "vocabulary of"),
             (dataclasses.replace(model, max_len=8), tc, "max_len >= ")]
    for m, t, words in cases:
        with pytest.raises(RunConfigError, match=words):
            build_workload(m, t, resolve("none"), log=lambda m: None)
