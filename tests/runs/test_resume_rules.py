"""Which settings a resumed run may change (docs/training.md, "Resuming a run"), row by row,
and an existing run's config.json is never rewritten by a command that does not train it."""

import dataclasses

import pytest

from transformer_jax.cli import train
from transformer_jax.runs import rundir
from transformer_jax.runs.identity import resume_differences
from transformer_jax.runs.rundir import RunConfigError

BASE = ["--recipe", "tiny", "--steps", "4", "--batch-size", "4", "--seq-len", "16",
        "--parallel", "none", "--sample-tokens", "0", "--no-progress"]

FREE = [  # the docs table's "may differ" rows: how long, how often, where, how evaluated
    ("steps", ["--steps", "8"]),
    ("log interval", ["--log-every", "2"]),
    ("eval interval", ["--eval-every", "2"]),
    ("checkpoint interval", ["--ckpt-every", "2"]),
    ("checkpoints kept", ["--max-to-keep", "5"]),
    ("placement", ["--parallel", "pmap"]),
    ("mesh", ["--parallel", "sharded", "--mesh", "data=1"]),
    ("steps per call", ["--steps-per-call", "2"]),
    ("non-finite limit", ["--max-nonfinite", "9"]),
    ("eval batch", ["--eval-batch-size", "8"]),
    ("sample", ["--sample-tokens", "20"]),
    ("remat", ["--remat", "block"]),
    ("attention implementation", ["--attention-impl", "exact"]),
]
FIXED = [  # "another run" rows: what is learned, from what
    ("data", ["--data", "other.txt"], "data"),
    ("seed", ["--seed", "1"], "seed"),
    ("learning rate", ["--lr", "1e-3"], "lr"),
    ("schedule", ["--schedule", "constant"], "schedule"),
    ("warmup", ["--warmup", "7"], "warmup"),
    ("batch size", ["--batch-size", "8"], "batch_size"),
    ("sequence length", ["--seq-len", "8"], "seq_len"),
    ("validation split", ["--val-fraction", "0.2"], "val_fraction"),
    ("optimizer", ["--optimizer", "adam", "--schedule", "paper"], "optimizer"),
    ("weight decay", ["--weight-decay", "0.01"], "weight_decay"),
    ("gradient accumulation", ["--grad-accum", "2"], "grad_accum"),
    ("label smoothing", ["--label-smoothing", "0.1"], "label_smoothing"),
    ("z-loss", ["--z-loss", "1e-4"], "z_loss"),
]


@pytest.fixture()
def run_dir(tmp_path):
    """A run directory as train.py leaves it (config.json of BASE)."""
    out = tmp_path / "run"
    model_cfg, tc = train.configure([*BASE, "--out", str(out)])
    assert rundir.prepare(out, model_cfg, tc, print) is False  # a new run: written
    return out


def _prepare(out, argv, **kw):
    model_cfg, tc = train.configure([*BASE, *argv, "--out", str(out)])
    notes = []
    changed = rundir.prepare(out, model_cfg, tc, notes.append, **kw)
    return changed, notes


@pytest.mark.parametrize("argv", [a for _, a in FREE], ids=[n for n, _ in FREE])
def test_free_settings_resume_and_are_noted(run_dir, argv):
    before = (run_dir / "config.json").read_bytes()
    changed, notes = _prepare(run_dir, argv)
    assert changed and len(notes) == 1 and "settings differ" in notes[0]
    assert (run_dir / "config.json").read_bytes() == before  # rewritten only once it trains


@pytest.mark.parametrize("argv,field", [(a, f) for _, a, f in FIXED], ids=[n for n, *_ in FIXED])
def test_other_settings_make_another_run_and_are_refused(run_dir, argv, field):
    before = (run_dir / "config.json").read_bytes()
    with pytest.raises(RunConfigError) as e:
        _prepare(run_dir, argv)
    message = str(e.value)
    assert f"{field}: " in message and "new --out" in message and "--accept-changes" in message
    assert (run_dir / "config.json").read_bytes() == before
    changed, notes = _prepare(run_dir, argv, accept_changes=True)  # the way on that keeps it
    assert changed and field in notes[0]


def test_a_different_model_is_refused_even_with_accept_changes(run_dir):
    for accept in (False, True):
        with pytest.raises(RunConfigError, match="different model.*d_model"):
            _prepare(run_dir, ["--d-model", "64"], accept_changes=accept)


def test_the_same_command_resumes_without_a_note(run_dir):
    assert _prepare(run_dir, []) == (False, [])


def test_resume_differences_names_old_and_new_values():
    _, a = train.configure(BASE)
    b = a.replace(lr=2e-3, steps=9)
    fixed, free = resume_differences(a, b)
    assert fixed == [f"lr: {a.schedule.lr!r} -> 0.002"] and free == ["steps: 4 -> 9"]
    assert resume_differences(a, dataclasses.replace(a)) == ([], [])


def test_the_default_run_name_includes_the_dataset():
    assert train.configure([])[1].out == "runs/cpu-lm"
    assert train.configure(["--data", "my_texts/", "--seq-len", "128"])[1].out == (
        "runs/cpu-lm-my_texts")


def test_train_py_refuses_another_dataset_in_an_existing_run(run_dir, tmp_path, capsys):
    """The newcomer's case: a run of one dataset, then --data into the same --out."""
    text = tmp_path / "other.txt"
    text.write_text("some other text to train on. " * 200)
    before = (run_dir / "config.json").read_bytes()
    with pytest.raises(SystemExit) as e:
        train.main([*BASE, "--data", str(text), "--out", str(run_dir)])
    err = capsys.readouterr().err
    assert e.value.code == 2
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "data: " in lines[0] and "--accept-changes" in lines[0], err
    assert (run_dir / "config.json").read_bytes() == before
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json"]
