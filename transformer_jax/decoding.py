"""Autoregressive decoding with a KV cache: sampling for the LM, greedy and beam search for seq2seq.

The cache is the Flax ``"cache"`` collection that the models fill when called with
``decode=True``: per decoder layer the self-attention keys/values ``[B, L, K, H]`` and a write
index, and for the encoder–decoder the cross-attention keys/values ``[B, S, K, H]``, projected
from the encoder output once on the first step. The encoder itself runs once.

Every public function is ``jax.jit``-compiled with the model and the lengths static and the
rest traced, so it compiles once per (model, batch, input length, output length) and the loop
runs inside XLA (``lax.fori_loop`` / ``lax.while_loop``).

Output conventions for the encoder–decoder (:func:`greedy_decode`, :func:`beam_search`): the
returned ``[B, L]`` tokens are the generated target WITHOUT the leading ``bos_id``; a finished
sequence contains its ``eos_id``, and every position after it is ``pad_id``. A sequence that
reached ``L`` tokens without ``eos_id`` is returned truncated (no ``eos_id``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from transformer_jax.model import Transformer, TransformerLM

__all__ = ["beam_search", "filter_logits", "generate", "greedy_decode", "init_cache",
           "sample_logits"]


# --------------------------------------------------------------------------------------
# Cache plumbing.
# --------------------------------------------------------------------------------------


def init_cache(model, params, batch_size: int, length: int, *, encoded=None, src=None):
    """A zero KV cache for ``length`` decoder positions (no forward pass is run).

    Args:
      model: a :class:`TransformerLM` or :class:`Transformer`.
      params: the model's parameters.
      batch_size: B.
      length: L, the number of decoder positions the cache holds (<= ``cfg.max_len``).
      encoded: [B, S, D] encoder output (encoder–decoder only; fixes the cross-cache shape).
      src: [B, S] source tokens (encoder–decoder only).

    Returns:
      The ``"cache"`` collection: a pytree of zeros.
    """
    dummy = jnp.zeros((batch_size, length), jnp.int32)
    if isinstance(model, Transformer):
        def shape_call(p, e, s):
            return model.apply({"params": p}, e, s, dummy, decode=True, mutable=["cache"],
                               method=Transformer.decode)[1]["cache"]
        shapes = jax.eval_shape(shape_call, params, encoded, src)
    else:
        def shape_call(p):
            return model.apply({"params": p}, dummy, decode=True, mutable=["cache"])[1]["cache"]
        shapes = jax.eval_shape(shape_call, params)
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _lm_step(model, params, cache, tokens):
    """Feed tokens [B, T] at the cache's position -> (logits [B, T, V], cache)."""
    logits, mut = model.apply({"params": params, "cache": cache}, tokens, decode=True,
                              mutable=["cache"])
    return logits, mut["cache"]


def _seq2seq_step(model, params, cache, tokens, encoded, src):
    """Decoder step; ``encoded=None`` reads the cross-attention keys/values from the cache."""
    logits, mut = model.apply({"params": params, "cache": cache}, encoded, src, tokens,
                              decode=True, mutable=["cache"], method=Transformer.decode)
    return logits, mut["cache"]


def _check_len(model, length: int, what: str) -> None:
    if length > model.cfg.max_len:
        raise ValueError(f"{what} needs {length} decoder positions, more than "
                         f"max_len={model.cfg.max_len}")


# --------------------------------------------------------------------------------------
# Sampling for the decoder-only LM.
# --------------------------------------------------------------------------------------


def filter_logits(logits, top_k=0, top_p=1.0):
    """Set logits outside the top-k and the nucleus (top-p) to -inf.

    Args:
      logits: [B, V] float.
      top_k: keep the k most likely tokens; 0 keeps all. May be traced.
      top_p: keep the smallest set of most likely tokens whose probability reaches top_p
        (Holtzman et al. 2020), computed after the top-k cut; >= 1 keeps all. May be traced.

    Returns:
      [B, V]: the kept logits unchanged, the rest -inf. At least one token is always kept.
    """
    V = logits.shape[-1]
    ranked = jnp.sort(logits, axis=-1)[..., ::-1]  # descending
    rank = jnp.arange(V)
    top_k = jnp.asarray(top_k, jnp.int32)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    in_k = rank < k
    probs = jax.nn.softmax(jnp.where(in_k, ranked, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = in_k & ((mass_before < top_p) | (top_p >= 1.0))
    n_keep = jnp.maximum(jnp.sum(keep, axis=-1, keepdims=True), 1)
    threshold = jnp.take_along_axis(ranked, n_keep - 1, axis=-1)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def sample_logits(logits, key, temperature, top_k=0, top_p=1.0):
    """Draw one token per row: argmax when ``temperature == 0``, else a filtered sample.

    Args:
      logits: [B, V] float.
      key: PRNG key.
      temperature: softmax temperature (may be traced); 0 means greedy.
      top_k: see :func:`filter_logits` (0: no limit; may be traced).
      top_p: see :func:`filter_logits` (1: no limit; may be traced).

    Returns:
      [B] int32 tokens.
    """
    hot = temperature > 0
    scaled = logits / jnp.where(hot, temperature, 1.0)
    sampled = jax.random.categorical(key, filter_logits(scaled, top_k, top_p), axis=-1)
    return jnp.where(hot, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)




@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def _generate(model, params, prompt, rng, temperature, top_k, top_p, *, max_new_tokens):
    B, T0 = prompt.shape
    cache = init_cache(model, params, B, T0 + max_new_tokens - 1)
    logits, cache = _lm_step(model, params, cache, prompt)  # prefill: the prompt in one pass
    logits = logits[:, -1]
    out = jnp.concatenate([prompt, jnp.zeros((B, max_new_tokens), prompt.dtype)], axis=1)

    def body(i, carry):
        out, logits, cache = carry
        tok = sample_logits(logits, jax.random.fold_in(rng, i), temperature, top_k, top_p)
        out = jax.lax.dynamic_update_slice(out, tok[:, None].astype(out.dtype), (0, T0 + i))
        logits, cache = _lm_step(model, params, cache, tok[:, None])
        return out, logits[:, -1], cache

    out, logits, _ = jax.lax.fori_loop(0, max_new_tokens - 1, body, (out, logits, cache))
    last = sample_logits(logits, jax.random.fold_in(rng, max_new_tokens - 1), temperature,
                   top_k, top_p)
    return out.at[:, -1].set(last.astype(out.dtype))


def generate(model, params, prompt, max_new_tokens: int, *, rng, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None):
    """Sample a continuation of ``prompt`` from a :class:`TransformerLM`, with a KV cache.

    The prompt is processed in one pass (prefill), then one token per step. Compiled once per
    (model, B, T0, max_new_tokens); temperature, top_k and top_p are traced (no recompile).

    Args:
      model: a :class:`TransformerLM`.
      params: its parameters.
      prompt: [B, T0] int tokens (dense, no padding), T0 >= 1.
      max_new_tokens: tokens to append; T0 + max_new_tokens - 1 must be <= ``cfg.max_len``.
      rng: PRNG key; step i samples with ``fold_in(rng, i)``.
      temperature: softmax temperature; 0 means greedy (argmax).
      top_k: sample only among the k most likely tokens (None: no limit).
      top_p: nucleus sampling threshold (None: no limit).

    Returns:
      [B, T0 + max_new_tokens] tokens: the prompt followed by the sampled tokens.
    """
    if not isinstance(model, TransformerLM):
        raise TypeError("generate() samples from a TransformerLM; use greedy_decode() or "
                        f"beam_search() for the encoder-decoder, got {type(model).__name__}")
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be [B, T0] with T0 >= 1, got shape {prompt.shape}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1] or be None, got {top_p}")
    if max_new_tokens == 0:
        return prompt
    _check_len(model, prompt.shape[1] + max_new_tokens - 1, "generate()")
    return _generate(model, params, prompt, rng, jnp.float32(temperature),
                     jnp.int32(0 if top_k is None else top_k),
                     jnp.float32(1.0 if top_p is None else top_p),
                     max_new_tokens=int(max_new_tokens))


# --------------------------------------------------------------------------------------
# Greedy decoding and beam search for the encoder–decoder.
# --------------------------------------------------------------------------------------


def _default_max_len(model, src, max_len):
    if not isinstance(model, Transformer):
        raise TypeError(f"expected an encoder-decoder Transformer, got {type(model).__name__}")
    if jnp.ndim(src) != 2:
        raise ValueError(f"src must be [B, S], got shape {jnp.shape(src)}")
    if max_len is None:  # §6.1: maximum output length = input length + 50
        max_len = min(jnp.shape(src)[1] + 50, model.cfg.max_len - 1)
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    _check_len(model, max_len + 1, "decoding")  # BOS plus max_len tokens are fed
    return int(max_len)


def _start(model, params, src, batch_size: int, max_len: int, repeat: int = 1):
    """Encode once, build the cache, feed BOS: -> (logits [B·repeat, 1, V], cache, src)."""
    encoded = model.apply({"params": params}, src, method=Transformer.encode)
    if repeat > 1:
        encoded, src = jnp.repeat(encoded, repeat, axis=0), jnp.repeat(src, repeat, axis=0)
    n = batch_size * repeat
    cache = init_cache(model, params, n, max_len + 1, encoded=encoded, src=src)
    bos = jnp.full((n, 1), model.cfg.bos_id, jnp.int32)
    logits, cache = _seq2seq_step(model, params, cache, bos, encoded, src)
    return logits, cache, src


@functools.partial(jax.jit, static_argnames=("model", "max_len"))
def _greedy(model, params, src, *, max_len):
    cfg = model.cfg
    B = src.shape[0]
    logits, cache, src = _start(model, params, src, B, max_len)

    def cond(state):
        i, _, done, _, _ = state
        return (i < max_len) & ~jnp.all(done)

    def body(state):
        i, tokens, done, logits, cache = state
        tok = jnp.where(done, cfg.pad_id, jnp.argmax(logits[:, -1], axis=-1)).astype(jnp.int32)
        tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, i))
        done = done | (tok == cfg.eos_id)
        logits, cache = _seq2seq_step(model, params, cache, tok[:, None], None, src)
        return i + 1, tokens, done, logits, cache

    tokens = jnp.full((B, max_len), cfg.pad_id, jnp.int32)
    state = (jnp.int32(0), tokens, jnp.zeros((B,), jnp.bool_), logits, cache)
    return jax.lax.while_loop(cond, body, state)[1]


def greedy_decode(model, params, src, max_len: int | None = None):
    """Greedy decoding for the encoder–decoder :class:`Transformer`.

    Args:
      model: a :class:`Transformer`.
      params: its parameters.
      src: [B, S] source tokens (``pad_id`` padded).
      max_len: L, tokens to generate at most; default S + 50 (§6.1), capped by ``max_len``.

    Returns:
      [B, L] int32 tokens, without BOS, ``eos_id`` included, ``pad_id`` after it.
    """
    max_len = _default_max_len(model, src, max_len)
    return _greedy(model, params, jnp.asarray(src, jnp.int32), max_len=max_len)


def _length_penalty(length, alpha: float):
    """((5 + |Y|) / 6)^α, Wu et al. 2016 (the paper's §6.1 uses α = 0.6)."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def _reorder(cache, batch_size: int, beams):
    """Gather the cache rows of the chosen beams [B, W] (flat batch index b·W + w)."""
    W = beams.shape[1]
    rows = (jnp.arange(batch_size)[:, None] * W + beams).reshape(-1)
    return jax.tree_util.tree_map(
        lambda x: x[rows] if x.ndim and x.shape[0] == batch_size * W else x, cache)


@functools.partial(jax.jit, static_argnames=("model", "beam_size", "alpha", "max_len"))
def _beam(model, params, src, *, beam_size, alpha, max_len):
    cfg, W, L = model.cfg, beam_size, max_len
    B, V = src.shape[0], model.cfg.vocab_size
    logits, cache, src_w = _start(model, params, src, B, L, repeat=W)
    neg_inf = jnp.float32(-jnp.inf)
    # Only beam 0 is alive at the start, so the first step expands one hypothesis, not W copies.
    live_lp = jnp.tile(jnp.where(jnp.arange(W) == 0, 0.0, neg_inf)[None], (B, 1))
    live = jnp.full((B, W, L), cfg.pad_id, jnp.int32)
    fin = jnp.full((B, W, L), cfg.pad_id, jnp.int32)
    fin_scores = jnp.full((B, W), neg_inf)

    def cond(state):
        i, _, live_lp, _, fin_scores, _, _ = state
        # Stop when no live hypothesis can beat the best finished one: log-probs only fall and,
        # for α >= 0, the penalty is largest at length L, so live_lp / lp(L) bounds its score.
        hopeless = live_lp[:, 0] / _length_penalty(L, alpha) < fin_scores[:, 0]
        return (i < L) & ~jnp.all(hopeless)

    def body(state):
        i, live, live_lp, fin, fin_scores, logits, cache = state
        logp = jax.nn.log_softmax(logits[:, -1].astype(jnp.float32)).reshape(B, W, V)
        cand_lp, cand = jax.lax.top_k((live_lp[:, :, None] + logp).reshape(B, W * V), 2 * W)
        beam, tok = cand // V, (cand % V).astype(jnp.int32)
        seqs = jnp.take_along_axis(live, beam[:, :, None], axis=1)  # [B, 2W, L]
        seqs = jnp.where(jnp.arange(L) == i, tok[:, :, None], seqs)
        is_eos = tok == cfg.eos_id
        # An EOS candidate finishes only if it ranks within the top W of this step (as in
        # Hugging Face's beam search); with W = 1 this makes beam search the greedy decoder.
        ends = is_eos & (jnp.arange(2 * W) < W) & jnp.isfinite(cand_lp)
        new_scores = jnp.where(ends, cand_lp / _length_penalty(i + 1, alpha), neg_inf)
        fin_scores, pick = jax.lax.top_k(jnp.concatenate([fin_scores, new_scores], 1), W)
        fin = jnp.take_along_axis(jnp.concatenate([fin, seqs], 1), pick[:, :, None], axis=1)
        # The W best candidates that did not end stay alive.
        live_lp, pick = jax.lax.top_k(jnp.where(is_eos, neg_inf, cand_lp), W)
        live = jnp.take_along_axis(seqs, pick[:, :, None], axis=1)
        cache = _reorder(cache, B, jnp.take_along_axis(beam, pick, axis=1))
        tok = jnp.take_along_axis(tok, pick, axis=1).reshape(B * W, 1)
        logits, cache = _seq2seq_step(model, params, cache, tok, None, src_w)
        return i + 1, live, live_lp, fin, fin_scores, logits, cache

    state = (jnp.int32(0), live, live_lp, fin, fin_scores, logits, cache)
    i, live, live_lp, fin, fin_scores, _, _ = jax.lax.while_loop(cond, body, state)
    # Hypotheses still alive at the end are truncated ones; they compete with the finished.
    scores = jnp.concatenate([fin_scores, live_lp / _length_penalty(i, alpha)], axis=1)
    finished = jnp.concatenate([jnp.isfinite(fin_scores), jnp.zeros_like(live_lp, bool)], 1)
    scores, order = jax.lax.top_k(scores, W)  # [B, W], best first
    seqs = jnp.take_along_axis(jnp.concatenate([fin, live], axis=1), order[:, :, None], axis=1)
    return seqs, scores, jnp.take_along_axis(finished, order, axis=1)


def beam_search(model, params, src, *, beam_size: int = 4, alpha: float = 0.6,
                max_len: int | None = None, all_hypotheses: bool = False):
    """Beam search for the encoder–decoder :class:`Transformer` (§6.1: beam 4, α = 0.6).

    Each step expands every live hypothesis by every token, keeps the 2W best candidates,
    moves those ending in ``eos_id`` (ranked within the top W) to the finished pool scored
    log P(Y | X) / ((5 + |Y|) / 6)^α (|Y| counts the EOS), and keeps the W best others alive.
    Decoding stops when no live hypothesis can beat the best finished one, or at ``max_len``.
    With ``beam_size=1`` and ``alpha=0`` this is exactly :func:`greedy_decode`.

    Args:
      model: a :class:`Transformer`.
      params: its parameters.
      src: [B, S] source tokens.
      beam_size: W.
      alpha: length-penalty exponent α (0 = raw log-probability).
      max_len: L, tokens to generate at most; default S + 50 (§6.1), capped by ``max_len``.
      all_hypotheses: return the W best hypotheses of each source, not only the best.

    Returns:
      (tokens [B, L] int32 — the best hypothesis, without BOS, ``eos_id`` included and
      ``pad_id`` after it; scores [B] float32 — its length-penalised log-probability). With
      ``all_hypotheses``: (tokens [B, W, L], scores [B, W] sorted best first, finished [B, W]
      bool — False for a hypothesis cut off at L without ``eos_id``, scored by its prefix).
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if beam_size * 2 > model.cfg.vocab_size:
        raise ValueError(f"beam_size={beam_size} needs vocab_size >= {2 * beam_size}")
    max_len = _default_max_len(model, src, max_len)
    tokens, scores, finished = _beam(model, params, jnp.asarray(src, jnp.int32),
                                     beam_size=int(beam_size), alpha=float(alpha),
                                     max_len=max_len)
    if all_hypotheses:
        return tokens, scores, finished
    return tokens[:, 0], scores[:, 0]
