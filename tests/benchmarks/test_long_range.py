"""benchmarks/long_range.py: the masked loss, parameter matching, and that training learns."""

import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import long_range  # noqa: E402

from transformer_jax.config import ModelConfig  # noqa: E402
from transformer_jax.data.copy_task import CopyTask  # noqa: E402
from transformer_jax.models.transformer import TransformerLM  # noqa: E402


def tiny_lm(task: CopyTask) -> TransformerLM:
    return TransformerLM(ModelConfig(
        vocab_size=task.vocab_size, d_model=32, num_heads=2, num_encoder_layers=0,
        num_decoder_layers=1, d_ff=64, dropout_rate=0.0, max_len=task.seq_len, norm="pre",
        positions="learned"))


def test_masked_loss_uses_only_the_recalled_positions():
    task = CopyTask(distance=16)
    model = tiny_lm(task)
    batch = task.batch(seed=0, step=0, batch_size=4)
    params = model.init(jax.random.PRNGKey(0), batch["inputs"])["params"]
    loss_fn = jax.jit(lambda p, b: long_range.masked_loss(p, model, b))  # one compile
    loss, acc = loss_fn(params, batch)
    # Independent reference: log-softmax in float64 NumPy at the weighted positions.
    logits = np.asarray(model.apply({"params": params}, batch["inputs"]), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    rows, cols = np.nonzero(batch["weights"])
    tgt = batch["targets"][rows, cols]
    np.testing.assert_allclose(loss, -logp[rows, cols, tgt].mean(), rtol=1e-5)
    np.testing.assert_allclose(acc, (logits[rows, cols].argmax(-1) == tgt).mean())
    # Changing an unweighted target (a blank's successor) must not change the loss.
    other = dict(batch, targets=batch["targets"].copy())
    other["targets"][:, 5] = (other["targets"][:, 5] + 1) % task.vocab_size
    assert batch["weights"][:, 5].sum() == 0
    np.testing.assert_allclose(loss_fn(params, other)[0], loss)


def test_lstm_width_matches_the_transformer_parameter_count():
    models = long_range.build_models(CopyTask(distance=16), "learned")
    (_, n_tf), (_, n_lstm) = models["transformer"], models["lstm"]
    assert abs(n_lstm - n_tf) / n_tf < 0.05


def test_train_drives_the_loss_down_at_distance_16():
    task = CopyTask(distance=16)
    r = long_range.train(tiny_lm(task), task, steps=60, batch_size=8, lr=1e-2, eval_size=64)
    first_loss = r["curve"][0][1]
    assert first_loss > 0.8 * np.log(task.alphabet)  # starts near chance (ln 8 ≈ 2.08)
    assert r["loss"] < 0.5 * first_loss
    assert r["accuracy"] > 2 / task.alphabet  # held-out: twice chance already
    assert r["wall_s"] > 0 and r["compile_s"] > 0

