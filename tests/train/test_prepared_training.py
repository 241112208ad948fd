"""Training on a prepared dataset: ``train.py --data DIR`` takes the vocabulary from it, keeps
its tokenizer in the run directory (sample and load_run use it), reports val_bpb in bits per
byte of text, resumes bit-exactly, and refuses a dataset of another tokenizer."""

import json
import math

import jax
import numpy as np
import pytest

from transformer_jax.cli import sample as sample_cli
from transformer_jax.cli import train as train_cli
from transformer_jax.data import bpe, prepare, prepared
from transformer_jax.runs import metrics
from transformer_jax.runs.checkpoint import Checkpointer
from transformer_jax.runs.load import load_run
from transformer_jax.train import loop

_RNG = np.random.default_rng(0)
WORDS = ["".join(_RNG.choice(list("abcdefghijklmnoprstuüï"), _RNG.integers(2, 7)))
         for _ in range(300)] + ["\n"]
ARGS = ["--preset", "tiny", "--layers", "1", "--steps", "4", "--steps-per-call", "1",
        "--log-every", "1", "--eval-every", "2", "--ckpt-every", "2", "--seq-len", "16",
        "--batch-size", "4", "--dropout", "0.1", "--parallel", "none", "--sample-tokens", "5",
        "--no-progress"]


def _dataset(root, seed, name="ds"):
    (root / f"src{seed}").mkdir(parents=True)
    text = " ".join(np.random.default_rng(seed).choice(WORDS, 3000))
    (root / f"src{seed}" / "a.txt").write_text(text, encoding="utf-8")
    settings = prepare.PrepareSettings(vocab_size=300, val_tokens=300, shard_bytes=1000)
    prepare.prepare_dataset([str(root / f"src{seed}")], root / name, settings, log=lambda m: 0)
    return root / name


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A complete train.py run on a BPE dataset (the reference of the resume test)."""
    root = tmp_path_factory.mktemp("prepared_run")
    ds = _dataset(root, 0)
    real = metrics.peak_flops
    metrics.peak_flops = lambda devices: (1e9, "test")  # skip the CPU matmul probe
    try:
        assert train_cli.main([*ARGS, "--data", str(ds), "--out", str(root / "ref")]) == 0
    finally:
        metrics.peak_flops = real
    return root, ds


def test_the_run_uses_the_datasets_vocabulary_and_tokenizer(trained, capsys):
    root, ds = trained
    run = root / "ref"
    assert json.loads((run / "config.json").read_text())["model"]["vocab_size"] == 300
    assert (run / "tokenizer.json").read_bytes() == (ds / "tokenizer.json").read_bytes()
    loaded = load_run(run)
    assert isinstance(loaded.tokenizer, bpe.BPETokenizer) and loaded.tokenizer.vocab_size == 300
    # val_bpb: total nats over the validation targets / (ln 2 · bytes of validation text).
    meta = json.loads((ds / "meta.json").read_text())
    val = meta["splits"]["val"]
    last = [r for r in metrics.read_jsonl(run / "metrics.jsonl") if "val_loss" in r][-1]
    assert last["val_bpb"] == pytest.approx(
        last["val_loss"] * (val["tokens"] - 1) / (math.log(2) * val["bytes"]), rel=1e-12)
    assert 0 < last["val_bpb"] < last["val_loss"] / math.log(2)  # a token is > 1 byte
    # sample encodes the prompt with the run's tokenizer (the dataset is not needed).
    capsys.readouterr()
    assert sample_cli.main(["--run", str(run), "--prompt", "the naïve", "--max-new-tokens", "3",
                            "--temperature", "0.5"]) == 0
    assert capsys.readouterr().out.startswith("the naïve")


def test_resume_on_a_prepared_dataset_is_bit_exact(trained):
    root, ds = trained
    model_cfg, tc = train_cli.configure([*ARGS, "--data", str(ds), "--out",
                                         str(root / "resumed"), "--sample-tokens", "0"])
    first = loop.run(model_cfg, tc, stop_at=2, progress=False, log=lambda m: None)
    second = loop.run(model_cfg, tc, progress=False, log=lambda m: None)
    assert (first.step, second.start_step, second.step) == (2, 2, 4)

    def saved(run_dir):
        with Checkpointer(run_dir / "checkpoints") as ckpt:
            return ckpt.restore(None, step=4).state

    jax.tree.map(np.testing.assert_array_equal, saved(root / "resumed"), saved(root / "ref"))
    compared = ("step", "loss", "val_loss", "val_bpb")
    logs = [[{k: r.get(k) for k in compared} for r in metrics.read_jsonl(d / "metrics.jsonl")]
            for d in (root / "resumed", root / "ref")]
    assert logs[0] == logs[1]


@pytest.mark.parametrize("other", ["bpe", "text"])
def test_resuming_with_another_tokenizer_is_refused(trained, tmp_path, capsys, other):
    root, _ = trained
    if other == "bpe":  # same vocabulary size, other merges
        data = _dataset(tmp_path, 1)
    else:
        data = tmp_path / "a.txt"
        data.write_text("some raw text " * 100)
    with pytest.raises(SystemExit) as exit_:
        train_cli.main([*ARGS, "--data", str(data), "--out", str(root / "ref")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert "has another tokenizer than the run in" in err


def test_a_folder_with_dataset_files_but_no_meta_is_refused(tmp_path, capsys):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "tokenizer.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_:
        train_cli.main([*ARGS, "--data", str(tmp_path / "ds"), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "but no meta.json" in err
    assert prepared.looks_prepared(tmp_path / "ds") and not prepared.is_prepared(tmp_path / "ds")
