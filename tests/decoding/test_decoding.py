"""Decoding: KV cache == full forward, sampling filters, generate, greedy and beam search."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from model_helpers import KEY, TINY, random_params
from model_helpers import tokens as _tokens

from transformer_jax.config import ModelConfig
from transformer_jax.decoding import (
    beam_search,
    filter_logits,
    generate,
    greedy_decode,
    sampling,
    search,
)
from transformer_jax.models import RNNLM, Transformer, TransformerLM


@pytest.fixture(scope="module")
def lm():
    # Grouped-query attention and learned positions: the other cache path from the seq2seq one.
    model = TransformerLM(dataclasses.replace(TINY, num_kv_heads=1, positions="learned"))
    params = random_params(model, _tokens(0, (2, 8)))
    return model, params, jax.jit(lambda p, x: model.apply({"params": p}, x))


@pytest.fixture(scope="module")
def copy_model():
    """An encoder–decoder trained to copy variable-length sources, so outputs end (EOS) at known
    places; also returns the parameters after a few dozen steps (half-trained: imperfect,
    non-trivial outputs) and a compiled full forward pass."""
    V, S, B = 16, 8, 64
    cfg = ModelConfig(vocab_size=V, d_model=64, num_heads=4, num_encoder_layers=1,
                      num_decoder_layers=1, d_ff=128, dropout_rate=0.0, max_len=24, norm="pre")
    model = Transformer(cfg)
    rng = np.random.default_rng(0)

    def batch(n=B):
        lengths = rng.integers(2, S + 1, n)
        src = rng.integers(3, V, (n, S))
        src[np.arange(S)[None] >= lengths[:, None]] = cfg.pad_id
        tgt_out = np.zeros((n, S + 1), np.int32)
        tgt_out[:, :S] = src
        tgt_out[np.arange(n), lengths] = cfg.eos_id
        tgt_in = np.concatenate([np.full((n, 1), cfg.bos_id), tgt_out[:, :-1]], 1)
        return src.astype(np.int32), tgt_in.astype(np.int32), tgt_out

    steps = 200
    tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 20, steps, 1e-3))
    params = jax.jit(model.init)(KEY, *batch()[:2])["params"]
    opt = tx.init(params)

    @jax.jit
    def train_step(params, opt, src, tgt_in, tgt_out):
        def loss_fn(p):
            ce = optax.softmax_cross_entropy_with_integer_labels(
                model.apply({"params": p}, src, tgt_in), tgt_out)
            weights = tgt_out != cfg.pad_id
            return (ce * weights).sum() / weights.sum()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    for i in range(steps):
        params, opt, loss = train_step(params, opt, *batch())
        if i == 40:
            half = params
    assert float(loss) < 0.1
    src, _, tgt_out = batch(16)
    expected = np.concatenate([tgt_out, np.zeros((16, 1), np.int32)], 1)  # L = S + 2
    fwd = jax.jit(lambda p, s, t: model.apply({"params": p}, s, t))
    return model, params, half, fwd, jnp.asarray(src), expected


# ---- the KV cache reproduces the full forward pass ------------------------------------------


def test_lm_cache_matches_full_forward(lm):
    model, params, fwd = lm
    x = _tokens(2, (2, 10))
    logits, cache, step = model.start_decoding(params, x[:, :4], 10)  # prefill 4 tokens
    step = jax.jit(step)  # then 1 at a time
    pieces = [logits]
    for t in range(4, 10):
        logits, cache = step(x[:, t:t + 1], cache)
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), fwd(params, x), atol=2e-5, rtol=0)


def test_seq2seq_cache_matches_full_forward(copy_model):
    model, _, params, fwd, src, expected = copy_model
    B, L = expected.shape
    tgt = jnp.concatenate([jnp.full((B, 1), model.cfg.bos_id), _tokens(4, (B, L - 1), high=16)],
                          1)
    logits, state, step = model.start_decoding(params, src, L)  # encodes, feeds BOS
    step = jax.jit(step)
    pieces = [logits]
    for t in range(1, L):  # cross-attention keys/values come from the cache
        logits, state = step(tgt[:, t:t + 1], state)
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), fwd(params, src, tgt), atol=2e-5,
                               rtol=0)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_rnn_greedy_generate_matches_the_full_forward(cell):
    """The one sampling loop drives the RNN's carry as it drives the KV cache."""
    cfg = dataclasses.replace(TINY, num_decoder_layers=2, d_model=16)
    model = RNNLM(cfg, cell_type=cell)
    params = model.init(KEY, jnp.zeros((1, 1), jnp.int32))["params"]
    prompt = _tokens(7, (2, 3))
    out = np.asarray(generate(model, params, prompt, 5, rng=KEY, temperature=0.0))
    seq = np.asarray(prompt)
    for _ in range(5):  # a plain loop: the whole sequence through the model, argmax of the last
        nxt = np.argmax(np.asarray(model.apply({"params": params}, seq))[:, -1], -1)
        seq = np.concatenate([seq, nxt[:, None].astype(seq.dtype)], 1)
    np.testing.assert_array_equal(out, seq)


# ---- sampling -------------------------------------------------------------------------------


def _reference_allowed(logits, top_k, top_p):
    """Independent NumPy definition of the allowed set: [B, V] bool."""
    logits = np.asarray(logits, np.float64)
    allowed = np.zeros(logits.shape, bool)
    for b, row in enumerate(logits):
        order = np.argsort(-row)[: top_k or len(row)]
        probs = np.exp(row[order] - row[order].max())
        probs /= probs.sum()
        n = np.searchsorted(np.cumsum(probs), top_p) + 1 if top_p < 1 else len(order)
        allowed[b, order[:n]] = True
    return allowed


_filter = jax.jit(filter_logits)  # top_k and top_p are traced: one compilation for all cases


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (1, 1.0), (5, 1.0), (0, 0.5), (7, 0.8),
                                          (0, 1e-6)])
def test_filter_logits_matches_reference(top_k, top_p):
    logits = 3 * jax.random.normal(jax.random.key(top_k), (4, 50))
    kept = np.isfinite(np.asarray(_filter(logits, top_k, top_p)))
    np.testing.assert_array_equal(kept, _reference_allowed(logits, top_k, top_p))
    assert kept.sum(-1).min() >= 1


@pytest.fixture(scope="module")
def prompt():
    return _tokens(5, (8, 3))


def test_greedy_generate_follows_the_argmax(lm, prompt):
    model, params, fwd = lm
    out = generate(model, params, prompt, 6, rng=KEY, temperature=0.0)
    assert out.shape == (8, 9) and out.dtype == prompt.dtype
    np.testing.assert_array_equal(out[:, :3], prompt)
    # Every generated token is the argmax of the full forward pass over its prefix.
    logits = fwd(params, out)
    np.testing.assert_array_equal(out[:, 3:], jnp.argmax(logits[:, 2:-1], -1))


@pytest.mark.parametrize("top_k, top_p", [(3, None), (None, 0.6), (4, 0.7)])
def test_samples_stay_inside_top_k_and_top_p(lm, prompt, top_k, top_p):
    model, params, fwd = lm
    temperature = 1.5
    for seed in range(3):
        out = generate(model, params, prompt, 6, rng=jax.random.key(seed),
                       temperature=temperature, top_k=top_k, top_p=top_p)
        logits = np.asarray(fwd(params, out))[:, 2:-1] / temperature
        allowed = _reference_allowed(logits.reshape(-1, logits.shape[-1]), top_k or 0,
                                     top_p or 1.0).reshape(logits.shape)
        chosen = np.take_along_axis(allowed, np.asarray(out[:, 3:])[..., None], -1)
        assert chosen.all(), f"sampled a token outside the allowed set (seed {seed})"


def test_generate_compiles_once_per_shape_and_uses_the_key(lm, prompt):
    model, params, _ = lm
    compiled = sampling._generate._cache_size()
    a = generate(model, params, prompt, 6, rng=jax.random.key(1), temperature=1.0)
    b = generate(model, params, prompt, 6, rng=jax.random.key(2), temperature=0.7, top_k=9,
                 top_p=0.95)
    c = generate(model, params, prompt, 6, rng=jax.random.key(1), temperature=1.0)
    assert (a != b).any()
    np.testing.assert_array_equal(a, c)
    # One (model, B, T0, max_new_tokens): at most one new compilation for the three calls.
    assert sampling._generate._cache_size() <= compiled + 1


def test_generate_rejects_bad_arguments(lm, copy_model, prompt):
    model, params, _ = lm
    with pytest.raises(ValueError, match="max_len"):
        generate(model, params, prompt, TINY.max_len, rng=KEY)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, params, prompt, 2, rng=KEY, top_p=0.0)
    with pytest.raises(TypeError, match="greedy_decode"):
        generate(copy_model[0], copy_model[1], prompt, 2, rng=KEY)
    np.testing.assert_array_equal(generate(model, params, prompt, 0, rng=KEY), prompt)


# ---- greedy decoding and beam search (encoder–decoder) --------------------------------------


def _sequence_scores(model, fwd, params, src, tokens, alpha):
    """Length-penalised log P(tokens | src) by teacher forcing, counting up to the first EOS."""
    cfg = model.cfg
    tgt_in = jnp.concatenate([jnp.full((len(src), 1), cfg.bos_id), tokens[:, :-1]], 1)
    logp = jax.nn.log_softmax(fwd(params, src, tgt_in), -1)
    token_lp = np.take_along_axis(np.asarray(logp), np.asarray(tokens)[..., None], -1)[..., 0]
    scores = []
    for row, lp in zip(np.asarray(tokens), token_lp):
        eos = np.flatnonzero(row == cfg.eos_id)
        n = eos[0] + 1 if len(eos) else len(row)
        scores.append(lp[:n].sum() / ((5 + n) / 6) ** alpha)
    return np.array(scores)


def _check_eos_layout(tokens, cfg):
    """Tokens up to the first EOS are real, everything after it is padding."""
    for row in np.asarray(tokens):
        eos = np.flatnonzero(row == cfg.eos_id)
        end = eos[0] if len(eos) else len(row)
        assert (row[:end] != cfg.pad_id).all() and (row[end + 1:] == cfg.pad_id).all(), row


@pytest.mark.parametrize("trained", [False, True])
def test_beam_one_equals_greedy(copy_model, trained):
    model, params, half, fwd, src, expected = copy_model
    params = params if trained else half
    L = expected.shape[1]
    greedy = greedy_decode(model, params, src, max_len=L)
    tokens, scores = beam_search(model, params, src, beam_size=1, alpha=0.0, max_len=L)
    assert greedy.shape == tokens.shape == expected.shape and scores.shape == (len(src),)
    np.testing.assert_array_equal(tokens, greedy)
    np.testing.assert_allclose(scores, _sequence_scores(model, fwd, params, src, greedy, 0.0),
                               atol=1e-4)
    _check_eos_layout(greedy, model.cfg)
    exact = (np.asarray(greedy) == expected).all(1)
    if trained:  # the copy task is solved, EOS placed after each source's own length
        assert exact.mean() >= 0.9, np.asarray(greedy)
    else:  # half-trained: wrong somewhere, so the comparison is not between two copies
        assert not exact.all()


@pytest.mark.parametrize("trained", [False, True])
def test_beam_search_eos_handling_and_scores(copy_model, trained):
    model, params, half, fwd, src, expected = copy_model
    params = params if trained else half
    tokens, scores = beam_search(model, params, src, beam_size=4, alpha=0.6,
                                 max_len=expected.shape[1])
    assert tokens.shape == expected.shape and tokens.dtype == jnp.int32
    _check_eos_layout(tokens, model.cfg)
    # The returned score is the length-penalised log-probability of the returned sequence ...
    ours = _sequence_scores(model, fwd, params, src, tokens, 0.6)
    np.testing.assert_allclose(scores, ours, atol=1e-4)
    # ... and, almost always, at least that of the greedy sequence.
    greedy = greedy_decode(model, params, src, max_len=expected.shape[1])
    assert (ours >= _sequence_scores(model, fwd, params, src, greedy, 0.6) - 1e-4).mean() >= 0.9
    if trained:
        assert (np.asarray(tokens) == expected).all(1).mean() >= 0.9


@pytest.mark.parametrize("trained", [False, True])
def test_beam_search_returns_sorted_finished_hypotheses(copy_model, trained):
    model, params, half, fwd, src, expected = copy_model
    params = params if trained else half
    W, L = 4, expected.shape[1]
    tokens, scores, finished = beam_search(model, params, src, beam_size=W, alpha=0.6,
                                           max_len=L, all_hypotheses=True)
    assert tokens.shape == (len(src), W, L) and scores.shape == finished.shape == (len(src), W)
    scores, finished = np.asarray(scores), np.asarray(finished)
    assert (np.diff(scores, axis=1) <= 1e-6).all(), scores  # best first
    best, best_score = beam_search(model, params, src, beam_size=W, alpha=0.6, max_len=L)
    np.testing.assert_array_equal(tokens[:, 0], best)
    np.testing.assert_allclose(scores[:, 0], best_score)
    for w in range(W):
        hyp = np.asarray(tokens[:, w])
        has_eos = (hyp == model.cfg.eos_id).any(1)
        np.testing.assert_array_equal(finished[:, w], has_eos)  # finished = ended by EOS
        ok = finished[:, w]  # (a truncated one may have stopped early: its score is a prefix's)
        _check_eos_layout(hyp[ok], model.cfg)
        np.testing.assert_allclose(  # each score is its own hypothesis' log-probability
            scores[ok, w], _sequence_scores(model, fwd, params, src[ok], hyp[ok], 0.6),
            atol=1e-4)
    assert len({tuple(t) for t in np.asarray(tokens[0])}) == W  # W distinct hypotheses
    if trained:
        assert finished[:, 0].mean() >= 0.9


def test_default_max_len_is_source_plus_50(copy_model):
    model = copy_model[0]  # max_len 24: capped at 23 (BOS + 23 tokens fill 24 positions)
    assert search._default_max_len(model, jnp.zeros((1, 5), jnp.int32), None) == 23
    tiny = Transformer(TINY)
    assert search._default_max_len(tiny, jnp.zeros((1, 5), jnp.int32), None) == 55
    with pytest.raises(ValueError, match="max_len"):
        search._default_max_len(tiny, jnp.zeros((1, 5), jnp.int32), TINY.max_len)
    with pytest.raises(TypeError):
        greedy_decode(TransformerLM(TINY), None, jnp.zeros((1, 5), jnp.int32))
