"""The attentional RNN encoder–decoder: a float64 NumPy loop as reference, the attention over the
source, the decoding protocol (greedy and beam search through it), the parameter and FLOP
formulas, and gradients to every parameter."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax.config import PRESETS, ModelConfig
from transformer_jax.decoding import beam_search, greedy_decode
from transformer_jax.models import accounting, build_seq2seq
from transformer_jax.models.rnn_seq2seq import RNNSeq2Seq, match_rnn_seq2seq_width

V, EOS, BOS, PAD = 11, 2, 1, 0
CFG = ModelConfig(vocab_size=V, d_model=8, num_heads=1, num_encoder_layers=2,
                  num_decoder_layers=2, d_ff=8, dropout_rate=0.0, max_len=16)
# Right-padded sources of different lengths (one with no padding), and decoder inputs.
SRC = np.array([[3, 4, 5, 6, 0, 0], [7, 3, 0, 0, 0, 0], [5, 9, 10, 4, 8, 3]], np.int32)
TGT = np.array([[1, 4, 3, 6, 5], [1, 8, 8, 2, 0], [1, 10, 9, 5, 3]], np.int32)


@pytest.fixture(scope="module", params=["lstm", "gru"])
def model_and_params(request):
    model = build_seq2seq(request.param, CFG)
    # Scaled-up parameters: the default initialisation gives nearly flat attention and logits,
    # which would hide mistakes in the weights and in the argmax paths.
    params = jax.tree.map(lambda x: 3.0 * x,
                          model.init(jax.random.PRNGKey(1), SRC, TGT)["params"])
    return model, params


@pytest.fixture(scope="module")
def forward(model_and_params):
    """(src, tgt) -> (logits [B, T, V], attention weights [B, 1, T, S]), compiled once."""
    model, params = model_and_params

    @jax.jit
    def run(src, tgt):
        logits, mut = model.apply({"params": params}, src, tgt, mutable=["intermediates"])
        return logits, mut["intermediates"]["attention_weights"][0]

    return run


# ---- an independent reference: the equations as float64 loops ------------------------------

def _sig(z):
    return 1 / (1 + np.exp(-z))


def _cell_step(kind, p, carry, x):
    """One step of Flax's OptimizedLSTMCell ((c, h) carry) or GRUCell (h carry)."""
    def lin(name):
        out = x @ p["i" + name]["kernel"] if "i" + name in p else 0
        out = out + (p["i" + name].get("bias", 0) if "i" + name in p else 0)
        return out
    if kind == "lstm":
        c, h = carry
        g = {n: x @ p["i" + n]["kernel"] + h @ p["h" + n]["kernel"] + p["h" + n]["bias"]
             for n in "ifgo"}
        c = _sig(g["f"]) * c + _sig(g["i"]) * np.tanh(g["g"])
        h = _sig(g["o"]) * np.tanh(c)
        return (c, h), h
    h = carry
    r = _sig(lin("r") + h @ p["hr"]["kernel"])
    z = _sig(lin("z") + h @ p["hz"]["kernel"])
    n = np.tanh(lin("n") + r * (h @ p["hn"]["kernel"] + p["hn"]["bias"]))
    h = (1 - z) * n + z * h
    return h, h


def _run(kind, p, xs, width):
    carry = (np.zeros(width), np.zeros(width)) if kind == "lstm" else np.zeros(width)
    outs = []
    for x in xs:
        carry, h = _cell_step(kind, p, carry, x)
        outs.append(h)
    return np.stack(outs)


def numpy_rnn_seq2seq(kind, params, src, tgt, residual=True):
    """Logits [B, T, V] and attention weights [B, T, S]: Luong et al. 2015 written out per
    sentence and per step (bidirectional first layer over the real tokens only)."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    E, D = p["embed"]["embedding"], CFG.d_model
    logits, attn = [], []
    for s_row, t_row in zip(np.asarray(src), np.asarray(tgt)):
        n = int(np.sum(s_row != PAD))
        S = len(s_row)
        x = E[s_row]  # [S, D]
        fwd = _run(kind, p["encoder_fwd"]["cell"], x, D // 2)  # over all S (padding masked)
        bwd = np.zeros((S, D // 2))
        bwd[:n] = _run(kind, p["encoder_bwd"]["cell"], x[:n][::-1], D // 2)[::-1]
        h = np.concatenate([fwd, bwd], axis=1)
        for i in range(CFG.num_encoder_layers - 1):
            out = np.zeros((S, D))
            out[:n] = _run(kind, p[f"upper_encoder_{i}"]["cell"], h[:n], D)
            h = out + h if residual else out
        keys = h @ p["score"]["kernel"]
        carries = [(np.zeros(D), np.zeros(D)) if kind == "lstm" else np.zeros(D)
                   for _ in range(CFG.num_decoder_layers)]
        feed = np.zeros(D)
        row_logits, row_attn = [], []
        for tok in t_row:
            inp = np.concatenate([E[tok], feed])
            for i in range(CFG.num_decoder_layers):
                carries[i], out = _cell_step(kind, p["decoder"]["step"][f"cell_{i}"],
                                             carries[i], inp)
                inp = out + inp if residual and i > 0 else out
            scores = keys[:n] @ inp
            a = np.exp(scores - scores.max())
            a /= a.sum()
            context = a @ h[:n]
            feed = np.tanh(np.concatenate([context, inp]) @ p["decoder"]["step"]["combine"]
                           ["kernel"])
            row_logits.append(feed @ E.T)
            row_attn.append(np.concatenate([a, np.zeros(S - n)]))
        logits.append(row_logits)
        attn.append(row_attn)
    return np.array(logits), np.array(attn)


def test_matches_a_plain_loop(model_and_params, forward):
    model, params = model_and_params
    logits, weights = forward(SRC, TGT)
    ref_logits, ref_attn = numpy_rnn_seq2seq(model.cell_type, params, SRC, TGT)
    assert logits.shape == (3, 5, V) and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert weights.shape == (3, 1, 5, 6)  # [B, 1, T, S]: the Transformer's layout, one head
    np.testing.assert_allclose(weights[:, 0], ref_attn, rtol=1e-4, atol=1e-5)


def test_attention_sums_to_one_over_the_source_and_padding_gets_none(forward):
    logits, weights = forward(SRC, TGT)
    weights = np.asarray(weights[:, 0])  # [B, T, S]
    pad = np.broadcast_to((SRC == PAD)[:, None, :], weights.shape)
    assert np.all(weights[pad] == 0.0)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
    assert np.all(weights[~pad] > 0)
    # More padding changes nothing (the backward direction starts at the last real token).
    wider = np.pad(SRC, ((0, 0), (0, 3)))
    np.testing.assert_allclose(forward(wider, TGT)[0], logits, rtol=1e-5, atol=1e-5)
    # A source of padding only (the filler rows of evaluation batches) gives no NaN.
    assert np.all(np.isfinite(forward(np.zeros_like(SRC), TGT)[0]))


def test_decoding_steps_equal_teacher_forcing(model_and_params, forward):
    model, params = model_and_params
    forced = forward(SRC, TGT)[0]
    logits, state, step = model.start_decoding(params, SRC, 5)
    step = jax.jit(step)
    got = [logits]
    for t in (slice(1, 3), slice(3, 4), slice(4, 5)):  # two tokens, then one at a time
        logits, state = step(jnp.asarray(TGT[:, t]), state)
        got.append(logits)
    np.testing.assert_allclose(jnp.concatenate(got, axis=1), forced, rtol=1e-5, atol=1e-5)
    # rows: row r of the state becomes a copy of row rows[r] (beam search's reordering).
    _, state, step = model.start_decoding(params, SRC, 5, repeat=2)  # rows 0 0 1 1 2 2
    step = jax.jit(step)
    rows = jnp.array([5, 4, 0, 1, 3, 2])
    logits, _ = step(jnp.repeat(TGT[:, 1:2], 2, axis=0)[rows], state, rows)
    np.testing.assert_allclose(logits[:, 0], jnp.repeat(forced[:, 1], 2, axis=0)[rows],
                               rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def greedy(model_and_params):
    model, params = model_and_params
    return np.asarray(greedy_decode(model, params, SRC, max_len=TGT.shape[1]))


def test_greedy_equals_teacher_forcing_on_its_argmax_path(greedy, forward):
    tgt_in = np.concatenate([np.full((3, 1), BOS), greedy[:, :-1]], axis=1)
    argmax = np.asarray(jnp.argmax(forward(SRC, tgt_in)[0], -1))
    for row, ref in zip(greedy, argmax):
        eos = np.flatnonzero(row == EOS)
        n = int(eos[0]) + 1 if len(eos) else len(row)
        np.testing.assert_array_equal(row[:n], ref[:n])
        assert np.all(row[n:] == PAD)


def test_beam_of_one_is_greedy_and_beam_scores_are_the_models(model_and_params, greedy,
                                                              forward):
    model, params = model_and_params
    L = TGT.shape[1]
    tokens, _ = beam_search(model, params, SRC, beam_size=1, alpha=0.0, max_len=L)
    np.testing.assert_array_equal(tokens, greedy)
    # Beam 4 reorders the carries every step: its scores are the teacher-forced ones.
    tokens, scores = beam_search(model, params, SRC, beam_size=4, alpha=0.6, max_len=L)
    tokens = np.asarray(tokens)
    tgt_in = np.concatenate([np.full((3, 1), BOS), tokens[:, :-1]], axis=1)
    logp = np.asarray(jax.nn.log_softmax(forward(SRC, tgt_in)[0], -1))
    for row, lp, score in zip(tokens, logp, np.asarray(scores)):
        eos = np.flatnonzero(row == EOS)
        n = int(eos[0]) + 1 if len(eos) else len(row)
        ref = lp[np.arange(n), row[:n]].sum() / ((5 + n) / 6) ** 0.6
        np.testing.assert_allclose(score, ref, rtol=1e-5, atol=1e-5)


def test_gradients_reach_every_parameter(model_and_params):
    model, params = model_and_params

    def loss(p):
        return jnp.mean(jax.nn.log_softmax(model.apply({"params": p}, SRC, TGT))[..., 3])

    grads = jax.jit(jax.grad(loss))(params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, jax.tree_util.keystr(path)


@pytest.mark.parametrize("cell_type", ["lstm", "gru"])
@pytest.mark.parametrize("share, bias", [(True, True), (False, True), (False, False)])
@pytest.mark.parametrize("layers", [(1, 1), (3, 2)])
def test_parameter_formula_matches_the_model(cell_type, share, bias, layers):
    cfg = dataclasses.replace(CFG, share_embeddings=share, use_bias=bias, d_model=12,
                              num_encoder_layers=layers[0], num_decoder_layers=layers[1])
    model = RNNSeq2Seq(cfg, cell_type)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), SRC, TGT))
    assert accounting.count_params(shapes) == accounting.rnn_seq2seq_num_params(cfg, cell_type)


@pytest.mark.parametrize("cell_type", ["lstm", "gru"])
@pytest.mark.parametrize("share", [True, False])
def test_flops_count_every_weight_matrix_once(cell_type, share):
    """Forward FLOPs = 2 × (every kernel, the output projection) + 4·S·D (scores, context)."""
    cfg = dataclasses.replace(CFG, share_embeddings=share)
    shapes = jax.eval_shape(lambda: RNNSeq2Seq(cfg, cell_type).init(
        jax.random.PRNGKey(0), SRC, TGT))["params"]
    kernels = sum(int(np.prod(x.shape)) for path, x in
                  jax.tree_util.tree_flatten_with_path(shapes)[0]
                  if jax.tree_util.keystr(path).endswith("['kernel']"))
    output = V * CFG.d_model if share else 0  # tied: the embedding is the output projection
    forward = 2 * (kernels + output) + 4 * 6 * CFG.d_model
    assert accounting.rnn_seq2seq_flops_per_token(cfg, cell_type, src_len=6,
                                                  training=False) == forward
    assert accounting.seq2seq_flops_per_token(0, cfg, 6, model=cell_type) == 3 * forward


@pytest.mark.parametrize("cell_type", ["lstm", "gru"])
def test_width_matched_to_a_transformer_within_ten_percent(cell_type):
    base = dataclasses.replace(PRESETS["cpu-seq2seq"], vocab_size=1000)
    target = accounting.num_params(base)
    cfg = match_rnn_seq2seq_width(target, base, cell_type=cell_type)
    got = accounting.rnn_seq2seq_num_params(cfg, cell_type)
    assert abs(got - target) / target < 0.1 and cfg.d_model % 8 == 0
    assert (cfg.num_encoder_layers, cfg.vocab_size) == (base.num_encoder_layers, 1000)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="d_model must be even"):
        RNNSeq2Seq(dataclasses.replace(CFG, d_model=7))
    with pytest.raises(ValueError, match="cell_type"):
        RNNSeq2Seq(CFG, cell_type="rnn")
    with pytest.raises(ValueError, match="model must be one of"):
        build_seq2seq("mamba", CFG)


def test_bfloat16_parameters_initialise_and_follow_float32():
    # Flax's orthogonal recurrent init has no bfloat16 QR on a CPU: the model draws it in float32.
    model = RNNSeq2Seq(dataclasses.replace(CFG, dtype="bfloat16", param_dtype="bfloat16"), "gru")
    params = jax.jit(model.init)(jax.random.PRNGKey(0), SRC, TGT)["params"]
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    logits = jax.jit(model.apply)({"params": params}, SRC, TGT)
    exact = RNNSeq2Seq(CFG, "gru").apply(
        {"params": jax.tree.map(lambda x: x.astype(jnp.float32), params)}, SRC, TGT)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, exact, atol=0.05 * float(np.abs(exact).max()))
