"""The recurrent baseline: shapes, a plain NumPy LSTM loop as reference, state carry-over,
parameter matching."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax.config import ModelConfig
from transformer_jax.models.accounting import rnn_flops_per_token
from transformer_jax.models.rnn import GRULM, LSTMLM, match_rnn_width

CFG = ModelConfig(vocab_size=32, d_model=16, num_heads=1, num_encoder_layers=0,
                  num_decoder_layers=2, d_ff=16, dropout_rate=0.0)
TOKENS = jax.random.randint(jax.random.PRNGKey(0), (2, 9), 0, 32)


@pytest.fixture(scope="module", params=["lstm", "gru"])
def model_and_params(request):
    model = (LSTMLM if request.param == "lstm" else GRULM)(CFG)
    params = model.init(jax.random.PRNGKey(1), TOKENS)["params"]
    return model, params


def numpy_lstm_lm(params, tokens):
    """The LSTM equations written out as a Python loop over time, in float64."""
    p = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params)
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    x = p["embed"]["embedding"][np.asarray(tokens)]  # [B, T, D]
    for layer in range(CFG.num_decoder_layers):
        c_ = p[f"cell_{layer}"]
        B, T, D = x.shape
        h, c = np.zeros((B, D)), np.zeros((B, D))
        outs = []
        for t in range(T):
            def gate(name, x_t=x[:, t]):
                return (x_t @ c_["i" + name]["kernel"] + h @ c_["h" + name]["kernel"]
                        + c_["h" + name]["bias"])
            i, f, g, o = sig(gate("i")), sig(gate("f")), np.tanh(gate("g")), sig(gate("o"))
            c = f * c + i * g
            h = o * np.tanh(c)
            outs.append(h)
        x = np.stack(outs, axis=1)
    return x @ p["embed"]["embedding"].T


def test_lstm_matches_a_plain_loop():
    model = LSTMLM(CFG)
    params = model.init(jax.random.PRNGKey(1), TOKENS)["params"]
    logits = model.apply({"params": params}, TOKENS)
    np.testing.assert_allclose(logits, numpy_lstm_lm(params, TOKENS), atol=1e-5, rtol=1e-5)


def test_shapes_causality_and_carry(model_and_params):
    model, params = model_and_params
    logits = model.apply({"params": params}, TOKENS)
    assert logits.shape == (2, 9, 32) and logits.dtype == jnp.float32
    # Changing the last token changes no earlier logit.
    changed = model.apply({"params": params}, TOKENS.at[:, -1].set((TOKENS[:, -1] + 1) % 32))
    np.testing.assert_array_equal(changed[:, :-1], logits[:, :-1])
    assert not np.allclose(changed[:, -1], logits[:, -1])
    # Running in two pieces with the carried state equals one run (generation relies on it).
    first, carry = model.apply({"params": params}, TOKENS[:, :4], return_carry=True)
    second = model.apply({"params": params}, TOKENS[:, 4:], carry=carry)
    np.testing.assert_allclose(jnp.concatenate([first, second], 1), logits, atol=1e-5)
    zero = model.init_carry(2)
    np.testing.assert_allclose(model.apply({"params": params}, TOKENS, carry=zero), logits,
                               atol=1e-6)


def test_dropout_needs_a_key_and_changes_outputs():
    model = LSTMLM(dataclasses.replace(CFG, dropout_rate=0.5))
    params = model.init(jax.random.PRNGKey(1), TOKENS)["params"]
    with pytest.raises(Exception, match="dropout"):
        model.apply({"params": params}, TOKENS, deterministic=False)
    a = model.apply({"params": params}, TOKENS, deterministic=False,
                    rngs={"dropout": jax.random.PRNGKey(2)})
    assert not np.allclose(a, model.apply({"params": params}, TOKENS))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("budget", [1_000_000, 3_000_000, 10_000_000])
def test_match_rnn_width_within_5_percent(cell, budget):
    cfg = match_rnn_width(budget, cell_type=cell, num_layers=2)
    model = (LSTMLM if cell == "lstm" else GRULM)(cfg)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), TOKENS))
    count = sum(x.size for x in jax.tree_util.tree_leaves(shapes))
    assert abs(count - budget) / budget < 0.05, (cfg.d_model, count)


def test_flops_per_token_counts_gates():
    cfg = dataclasses.replace(CFG, d_model=100, num_decoder_layers=1, vocab_size=10)
    assert rnn_flops_per_token(cfg, "lstm", training=False) == 8 * 100 * 200 + 2 * 100 * 10
    assert rnn_flops_per_token(cfg, "gru") == 3 * (6 * 100 * 200 + 2 * 100 * 10)
