"""python -m transformer_jax.translate: decodes with a run's checkpoint; bad input exits 2."""

import json

import jax
import numpy as np
import pytest
from model_helpers import write_seq2seq_run

from transformer_jax import decoding
from transformer_jax import train as training
from transformer_jax.cli import translate
from transformer_jax.config import PRESETS, TrainConfig
from transformer_jax.data.seq2seq_tasks import get_task
from transformer_jax.models.transformer import Transformer
from transformer_jax.runs.load import load_run

TASK = get_task("reverse")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory as train.py writes it, with checkpoints of untrained parameters (seeds
    0 and 1 at steps 10 and 20), and its configs."""
    out = tmp_path_factory.mktemp("translate_run") / "run"
    cfg, tc = write_seq2seq_run(out, "reverse", seeds=(0, 1))
    return out, cfg, tc


@pytest.fixture(scope="module")
def run_dir(run):
    return run[0]


def test_translates_with_the_latest_or_averaged_checkpoints(run, capsys):
    run_dir, cfg, tc = run
    assert translate.main(["--run", str(run_dir), "a b c", "d e"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 2 and "step 20" in err
    for line in lines:  # untrained, but every output word comes from the task's vocabulary
        assert all(w in TASK.ids for w in line.split()) and len(line.split()) <= 17
    # The CLI decodes exactly what beam search on the restored parameters gives.
    loaded = load_run(run_dir)
    assert loaded.steps == [20]
    assert decoding.translate(loaded.model, loaded.params, loaded.task, ["a b c", "d e"]) == lines
    averaged = load_run(run_dir, average_last=2)
    assert averaged.steps == [10, 20]
    model, tx = Transformer(cfg), training.make_optimizer(tc, cfg.d_model)
    lengths = (TASK.src_len, TASK.max_tgt_len + 1)
    states = [training.init_state(model, tx, seed=s, input_lengths=lengths) for s in (0, 1)]
    jax.tree.map(lambda avg, a, b: np.testing.assert_allclose(avg, (a + b) / 2, rtol=1e-6,
                                                              atol=1e-7),
                 averaged.params, states[0].params, states[1].params)
    jax.tree.map(np.testing.assert_array_equal, loaded.params, states[1].params)
    assert translate.main(["--run", str(run_dir), "--average-last", "2", "--greedy", "a"]) == 0
    assert "averaged over 2 checkpoints" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["a zebra b"], "not in the reverse vocabulary: 'zebra'"),
    (["a " * 17], "at most 16"),
    (["  "], "empty source sentence"),
    (["--average-last", "0", "a"], "--average-last must be >= 1"),
])
def test_bad_input_is_one_message_and_exit_2(run_dir, args, message, capsys):
    with pytest.raises(SystemExit) as e:
        translate.main(["--run", str(run_dir), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_list_vocab_prints_the_words_of_the_task(run_dir, capsys):
    assert translate.main(["--run", str(run_dir), "--list-vocab"]) == 0
    out = capsys.readouterr().out.split()
    assert out == [w for w in TASK.vocab if not w.startswith("<")]  # no <pad>, <bos>, <eos>


def test_an_unknown_word_error_names_known_words(run_dir, capsys):
    with pytest.raises(SystemExit) as e:
        translate.main(["--run", str(run_dir), "a zebra b"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'zebra'" in err
    named = err.split("known words: ")[1].split(", ...")[0].split(", ")
    assert len(named) >= 3 and all(w in TASK.ids and not w.startswith("<") for w in named)
    assert "--list-vocab" in err


def test_no_sentence_exits_2(run_dir, capsys):
    with pytest.raises(SystemExit) as e:
        translate.main(["--run", str(run_dir)])
    assert e.value.code == 2 and "--list-vocab" in capsys.readouterr().err


def test_missing_or_language_model_run_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        translate.main(["--run", str(tmp_path / "nowhere"), "a"])
    assert e.value.code == 2 and "not a run directory" in capsys.readouterr().err
    lm = tmp_path / "lm"
    lm.mkdir()
    (lm / "config.json").write_text(json.dumps({"model": PRESETS["tiny"].to_dict(),
                                                "train": TrainConfig().to_dict()}))
    with pytest.raises(SystemExit) as e:
        translate.main(["--run", str(lm), "a"])
    assert e.value.code == 2 and "language model" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((lm / "config.json").read_text().replace(
        '"task": "lm"', '"task": "reverse"'))
    with pytest.raises(SystemExit) as e:
        translate.main(["--run", str(empty), "a"])
    assert e.value.code == 2 and "no checkpoint" in capsys.readouterr().err
