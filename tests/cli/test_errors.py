"""Bad input, everywhere a user can hand us something: one readable message, nothing overwritten.

One table per surface. Every case asserts the exception type (or exit status 2) AND the words
that name the problem and the remedy. The command lines run in-process (``main(argv)``) and all
fail before anything is compiled: run directories and checkpoints are written directly (a
config file, a fabricated orbax checkpoint), so the whole table costs seconds.
"""

import dataclasses
import hashlib
import os
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from model_helpers import TINY, random_params, tokens

from transformer_jax.attention import dot_product_attention
from transformer_jax.cli import sample, train, visualize
from transformer_jax.models.transformer import Transformer, TransformerLM
from transformer_jax.runs import rundir
from transformer_jax.runs.checkpoint import Checkpointer

# The command every run-directory case starts from: tiny, one device, nothing compiled.
BASE = ["--preset", "tiny", "--steps", "4", "--batch-size", "4", "--seq-len", "16",
        "--parallel", "none", "--sample-tokens", "0", "--no-progress"]


def _configs(argv):
    return train.configure(argv)


def _run_dir(path, *, ckpt_model=None, truncate=False):
    """A run directory of BASE's model; optionally a checkpoint (of ``ckpt_model``'s config)."""
    model_cfg, tc = _configs([*BASE, "--out", str(path)])
    path.mkdir(parents=True)
    rundir.write_config(path, model_cfg, tc)
    if ckpt_model is not None:
        with Checkpointer(path / "checkpoints") as ckpt:
            ckpt.save(2, {"w": np.zeros(3, np.float32)}, {"step": 2, "model": ckpt_model})
    if truncate:  # what a disk-full or a copy cut short leaves: every file empty
        for root, _, files in os.walk(path / "checkpoints"):
            for name in files:
                open(os.path.join(root, name), "wb").close()
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Files and directories the cases refer to by name."""
    root = tmp_path_factory.mktemp("errors")
    (root / "empty.txt").write_bytes(b"")
    (root / "binary.bin").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 50)
    (root / "latin1.txt").write_bytes("café naïve déjà vu. ".encode("latin-1") * 50)
    (root / "short.txt").write_bytes(b"too short")
    (root / "emptydir").mkdir()
    (root / "a_file").write_text("not a directory")
    (root / "someones_dir").mkdir()
    (root / "someones_dir" / "notes.txt").write_text("precious")
    other = dataclasses.replace(_configs(BASE)[0], d_model=64).to_dict()
    _run_dir(root / "run")
    _run_dir(root / "bad_json").joinpath("config.json").write_text('{"model": {"d_mod')
    _run_dir(root / "foreign_ckpt", ckpt_model=other)
    _run_dir(root / "truncated", ckpt_model=_configs(BASE)[0].to_dict(), truncate=True)
    return root


def _snapshot(path):
    """{relative path: sha256} of every file under ``path`` (to prove nothing was touched)."""
    if not path.is_dir():
        return path.read_bytes() if path.exists() else None
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


# (id, command, argv, words in the message). {w} is the world directory; "--out {w}/x" cases
# also check that nothing under x changed.
CLI_CASES = [
    # flags
    ("unknown flag", "train", ["--bogus"], ["unrecognized arguments: --bogus", "--help"]),
    ("invalid choice", "train", ["--schedule", "linear"], ["--schedule", "invalid choice"]),
    ("non-int size", "train", ["--steps", "ten"], ["--steps", "invalid int value"]),
    ("zero steps", "train", ["--steps", "0"], ["--steps must be a positive int, got 0"]),
    ("negative batch", "train", ["--batch-size", "-4"], ["--batch-size must be a positive int"]),
    ("zero width", "train", ["--d-model", "0"], ["--d-model must be a positive int"]),
    ("zero layers", "train", ["--layers", "0"], ["--layers must be a positive int"]),
    ("heads vs width", "train", ["--heads", "5"], ["--d-model=32 must be divisible by --heads=5"]),
    ("negative lr", "train", ["--lr", "-1"], ["--lr must be > 0, got -1.0"]),
    ("dropout 1", "train", ["--dropout", "1"], ["--dropout must lie in [0, 1)"]),
    ("max-nonfinite 0", "train", ["--max-nonfinite", "0"], ["--max-nonfinite must be a positive"]),
    ("lr with paper schedule", "train", ["--schedule", "paper", "--warmup", "40", "--lr", "1e-3"],
     ["--lr has no effect with --schedule paper", "drop --lr"]),
    ("weight decay with adam", "train", ["--optimizer", "adam", "--weight-decay", "0.1"],
     ["--weight-decay has no effect with --optimizer adam"]),
    ("prompt without a sample", "train", ["--prompt", "Once"],
     ["--prompt has no effect with --sample-tokens 0"]),
    ("paper schedule without warmup", "train", ["--schedule", "paper", "--warmup", "0"],
     ["paper schedule needs --warmup > 0"]),
    ("accumulation split", "train", ["--grad-accum", "3"],
     ["--batch-size=4 must be divisible by --grad-accum=3"]),
    ("batch over devices", "train", ["--parallel", "pmap", "--batch-size", "6"],
     ["batch size 6 cannot be split evenly over 8 device(s)", "use a multiple of 8"]),
    # data
    ("missing data", "train", ["--data", "{w}/nope.txt"], ["--data path", "does not exist"]),
    ("empty file", "train", ["--data", "{w}/empty.txt"], ["empty.txt' is empty"]),
    ("binary file", "train", ["--data", "{w}/binary.bin"], ["looks binary", "NUL byte"]),
    ("non-UTF-8 file", "train", ["--data", "{w}/latin1.txt"],
     ["is not UTF-8 text (byte 0xe9", "iconv"]),
    ("empty folder", "train", ["--data", "{w}/emptydir"], ["emptydir' contains no files"]),
    ("data shorter than a sequence", "train", ["--data", "{w}/short.txt"],
     ["fewer than --seq-len + 1 = 17", "shorter --seq-len"]),
    # output directory
    ("another run's model", "train", ["--out", "{w}/run", "--d-model", "64"],
     ["holds a run of a different model (differs in: --d-model)", "another --out"]),
    ("another model family", "train", ["--out", "{w}/run", "--model", "lstm"],
     ["holds a 'transformer' run, not 'lstm'"]),
    ("seq len above max_len on resume", "train", ["--out", "{w}/run", "--seq-len", "100"],
     ["--seq-len 100 exceeds max_len 64", "--seq-len <= 64"]),
    ("corrupted config.json", "train", ["--out", "{w}/bad_json"],
     ["config.json cannot be read as JSON", "another --out"]),
    ("not a run directory", "train", ["--out", "{w}/someones_dir"],
     ["is not empty and holds no config.json", "new or empty directory"]),
    ("out is a file", "train", ["--out", "{w}/a_file"], ["a_file is a file", "writable"]),
    ("unwritable out", "train", ["--out", "{w}/a_file/run"],
     ["cannot be created (Not a directory)", "writable directory"]),
    ("checkpoint of another model", "train", ["--out", "{w}/foreign_ckpt"],
     ["incompatible model", "--d-model: saved 64, expected 32", "Move the step folders away"]),
    ("truncated checkpoint", "train", ["--out", "{w}/truncated"],
     ["no checkpoint in", "can be restored", "step 2 (unreadable"]),
    # python -m transformer_jax.sample
    ("sample: not a run", "sample", ["--run", "{w}/emptydir"], ["no config.json"]),
    ("sample: truncated checkpoint", "sample", ["--run", "{w}/truncated"],
     ["can be restored", "step 2 (unreadable"]),
    ("sample: another model's checkpoint", "sample", ["--run", "{w}/foreign_ckpt"],
     ["incompatible model", "d_model: saved 64, expected 32"]),
    ("sample: no such step", "sample", ["--run", "{w}/foreign_ckpt", "--step", "7"],
     ["no checkpoint of step 7 (saved steps: 2)"]),
    ("sample: no checkpoint yet", "sample", ["--run", "{w}/run"], ["holds no checkpoint yet"]),
    ("sample: zero temperature", "sample", ["--run", "{w}/run", "--temperature", "0"],
     ["--temperature must be > 0"]),
    ("sample: zero tokens", "sample", ["--run", "{w}/run", "--max-new-tokens", "0"],
     ["--max-new-tokens must be >= 1"]),
    # python -m transformer_jax.visualize
    ("visualize: unknown command", "visualize", ["heatmap"], ["invalid choice: 'heatmap'"]),
    ("visualize: truncated checkpoint", "visualize",
     ["attention", "--run", "{w}/truncated", "--text", "ab", "--out", "{w}/x.png"],
     ["can be restored"]),
    ("visualize: corrupted config", "visualize",
     ["attention", "--run", "{w}/bad_json", "--text", "ab", "--out", "{w}/x.png"],
     ["cannot be read as JSON"]),
]

MAINS = {"train": train.main, "sample": sample.main, "visualize": visualize.main}


@pytest.mark.parametrize("name,command,argv,words", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_exits_2_with_one_message(name, command, argv, words, world, capsys):
    argv = [a.format(w=world) for a in argv]
    if command == "train":
        argv = [*BASE, *argv] if "--out" in argv else [*BASE, "--out", str(world / "new"), *argv]
    out = argv[argv.index("--out") + 1] if "--out" in argv else None
    before = _snapshot(world / os.path.relpath(out, world)) if out else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fallback warnings are checked in test_checkpoint.py
        try:
            status = MAINS[command](argv)
        except SystemExit as e:
            status = e.code
    err = capsys.readouterr().err
    assert status == 2, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in errors[0], errors[0]
    if out:  # nothing that existed was changed, and no run directory appeared
        assert _snapshot(world / os.path.relpath(out, world)) == before
    assert not (world / "new").exists()


# ---- the kernel and model APIs -------------------------------------------------------------

_Q = jnp.zeros((2, 5, 4, 8))
_K = jnp.zeros((2, 6, 2, 8))
LM = TransformerLM(TINY)
LM_PARAMS = random_params(LM, tokens(0, (1, 4)))
S2S = Transformer(TINY)
S2S_PARAMS = random_params(S2S, tokens(0, (1, 4)), tokens(1, (1, 4)))


def _lm(x):
    return LM.apply({"params": LM_PARAMS}, x)


API_CASES = [
    ("query rank", lambda: dot_product_attention(_Q[0, 0], _K, _K), ValueError,
     ["query must have rank 4 [B, T, N, H]", "(4, 8)"]),
    ("heads not a multiple", lambda: dot_product_attention(_Q[:, :, :3], _K, _K), ValueError,
     ["query heads N=3 must be a multiple of key/value heads K=2"]),
    ("float mask", lambda: dot_product_attention(_Q, _K, _K, mask=jnp.ones((5, 6))), TypeError,
     ["mask must be a boolean array", "bias="]),
    ("mask shape", lambda: dot_product_attention(_Q, _K, _K, mask=jnp.ones((5, 7), bool)),
     ValueError, ["mask of shape (5, 7) is not broadcastable to [B, N, T, S] = (2, 4, 5, 6)"]),
    ("int inputs", lambda: dot_product_attention(_Q.astype(int), _K.astype(int), _K.astype(int)),
     TypeError, ["query must be a floating-point array"]),
    ("lengths shape", lambda: dot_product_attention(
        _Q, _K, _K, key_value_seq_lengths=jnp.array([6, 9, 1])), ValueError,
     ["key_value_seq_lengths must have shape (2,)", "(3,)"]),
    ("tokens rank", lambda: _lm(tokens(0, (4,))), ValueError,
     ["tokens must be [B, T] token ids, got shape (4,)"]),
    ("float tokens", lambda: _lm(jnp.ones((1, 4))), TypeError,
     ["tokens must be integer token ids, got dtype float32"]),
    ("token outside vocab", lambda: _lm(jnp.array([[1, 2, 256]])), ValueError,
     ["tokens must lie in [0, vocab_size=256)", "[1, 256]"]),
    ("sequence above max_len", lambda: _lm(tokens(0, (1, TINY.max_len + 1))), ValueError,
     ["sequence length 65 exceeds max_len=64"]),
    ("src/tgt batch", lambda: S2S.apply({"params": S2S_PARAMS}, tokens(0, (2, 4)),
                                        tokens(1, (3, 4))), ValueError,
     ["tgt has batch size 3, the source has 2"]),
    ("config heads", lambda: TransformerLM(dataclasses.replace(TINY, num_heads=3)), ValueError,
     ["d_model=32 must be divisible by num_heads=3"]),
    ("config GQA", lambda: TransformerLM(dataclasses.replace(TINY, num_kv_heads=3)), ValueError,
     ["num_heads=2 must be a multiple of num_kv_heads=3"]),
]


@pytest.mark.parametrize("name,call,exc,words", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input_raises_a_named_error(name, call, exc, words):
    with pytest.raises(exc) as info:
        call()
    for word in words:
        assert word in str(info.value), str(info.value)


def test_the_tables_cover_enough_cases():
    assert len(CLI_CASES) + len(API_CASES) >= 25
