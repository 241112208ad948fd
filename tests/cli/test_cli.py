"""``python train.py`` and ``python -m transformer_jax.sample`` end to end, in subprocesses."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from transformer_jax.cli import train
from transformer_jax.config import TrainConfig
from transformer_jax.runs.metrics import METRIC_KEYS
from transformer_jax.train import loop

ROOT = Path(__file__).resolve().parents[2]


def _run(*args, timeout=240):
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # the fake-device XLA_FLAGS are inherited
    return subprocess.run([sys.executable, *args], check=False, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A short run of the tiny preset, pmapped over the 8 fake devices (--parallel auto)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    proc = _run("train.py", "--preset", "tiny", "--steps", "20", "--batch-size", "8",
                "--seq-len", "32", "--log-every", "5", "--eval-every", "10", "--ckpt-every", "10",
                "--steps-per-call", "5", "--sample-tokens", "24", "--prompt", "def ",
                "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_train_cli_writes_the_run_directory(run_dir):
    out, proc = run_dir
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["vocab_size"] == 256 and config["train"]["schedule"]["steps"] == 20
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    assert all(set(METRIC_KEYS) <= set(r) for r in records)
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [10, 20]
    assert all(0 < r["val_loss"] < 6 and r["val_bpb"] > r["val_loss"] for r in evals)
    assert records[-1]["tokens_per_s"] > 0 and 0 < records[-1]["mfu"] < 1
    assert records[-1]["loss"] < records[0]["loss"]  # it learns
    # train_s leaves out validation (at 10) and checkpoints (10): it falls behind time_s there.
    gaps = [r["time_s"] - r["train_s"] for r in records]
    assert gaps[0] == 0 and gaps[1] == 0 and 0 < gaps[2] <= gaps[3]
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == \
        ["10", "20"]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    samples = (out / "samples.txt").read_text()
    assert "step 20" in samples and "def " in samples
    assert "pmap on 8 cpu device(s)" in proc.stdout  # --parallel auto with several devices
    assert "val_loss" in proc.stdout and str(out.resolve()) in proc.stdout


def test_train_cli_without_a_terminal_prints_progress_lines_and_each_result_once(run_dir):
    _, proc = run_dir  # stdout and stderr are pipes here: no progress bar
    lines = proc.stdout.splitlines()
    progress = [line for line in lines if re.fullmatch(
        r"step \d+/20: loss \d\.\d{4}, ([\d,]+|-) tokens/s, ETA (\d+m\d\ds|-)", line)]
    assert [line.split("/")[0] for line in progress] == ["step 5", "step 10", "step 15",
                                                         "step 20"]
    assert [line.split(":")[0] for line in lines if "val_loss" in line] == ["step 10", "step 20"]
    assert re.search(r"^done at step 20: [\d,]+ tokens/s \(median\), MFU \d+\.\d%; wall ",
                     proc.stdout, re.MULTILINE)


def test_the_closing_line_says_why_an_mfu_is_not_shown(capsys, tmp_path):
    result = loop.RunResult(out=tmp_path, step=8, start_step=0, val_loss=1.0, val_bpb=1.4,
                            tokens_per_s=5000.0, mfu=math.nan, wall_s=61.0, interrupted=False,
                            sample="", mfu_note="the model ran at 5 GFLOP/s, above ...")
    train._report(result, TrainConfig())
    first = capsys.readouterr().out.splitlines()[0]
    assert first == ("done at step 8: 5,000 tokens/s (median), MFU not shown: the model ran at "
                     "5 GFLOP/s, above ...; wall 1m01.0s")


def test_sample_cli_reads_the_latest_checkpoint(run_dir):
    out, _ = run_dir
    proc = _run("-m", "transformer_jax.sample", "--run", str(out), "--prompt", "class ",
                "--max-new-tokens", "16", "--temperature", "0.5", "--top-k", "5")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("class ") and "step 20" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps must be a positive int"),
    (["--batch-size", "6", "--parallel", "pmap"], "cannot be split evenly over 8"),
    (["--data", "/no/such/file.txt"], "does not exist"),
    (["--schedule", "linear"], "invalid choice"),
])
def test_bad_input_is_one_message_and_exit_2(args, message, tmp_path):
    proc = _run("train.py", "--preset", "tiny", "--out", str(tmp_path / "r"), *args, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_sample_cli_on_a_missing_run_exits_2(tmp_path):
    proc = _run("-m", "transformer_jax.sample", "--run", str(tmp_path), timeout=120)
    assert proc.returncode == 2 and "no config.json" in proc.stderr
    assert "Traceback" not in proc.stderr
