"""Greedy decoding and beam search for an encoder–decoder, over its decoding step.

The model's ``start_decoding`` (the protocol of :mod:`transformer_jax.decoding`) encodes the
source once, feeds the first step (BOS), and returns the step for the rest: the Transformer's
state is its KV cache (the cross-attention keys and values projected from the encoder output
once), the RNN translator's its recurrent carry and the encoder states. The search knows
nothing else of the model.

Both functions are ``jax.jit``-compiled with the model and the lengths static, so they compile
once per (model, batch, source length, output length) and the loop runs inside XLA
(``lax.while_loop``).

Output conventions: the returned ``[B, L]`` tokens are the generated target WITHOUT the
leading ``bos_id``; a finished sequence contains its ``eos_id``, and every position after it is
``pad_id``. A sequence that reached ``L`` tokens without ``eos_id`` is returned truncated (no
``eos_id``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["beam_search", "greedy_decode", "translate"]


def _default_max_len(model, src, max_len):
    if not hasattr(model, "start_decoding") or hasattr(model, "context_limit"):
        # A language model decodes through the same protocol, but continues its input.
        raise TypeError(f"expected an encoder-decoder, got {type(model).__name__}")
    if jnp.ndim(src) != 2:
        raise ValueError(f"src must be [B, S], got shape {jnp.shape(src)}")
    if max_len is None:  # §6.1: maximum output length = input length + 50
        max_len = min(jnp.shape(src)[1] + 50, model.cfg.max_len - 1)
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if max_len + 1 > model.cfg.max_len:  # BOS plus max_len tokens are fed
        raise ValueError(f"decoding needs {max_len + 1} decoder positions, more than "
                         f"max_len={model.cfg.max_len}")
    return int(max_len)


@functools.partial(jax.jit, static_argnames=("model", "max_len"))
def _greedy(model, params, src, *, max_len):
    cfg = model.cfg
    B = src.shape[0]
    logits, dec, step = model.start_decoding(params, src, max_len + 1)

    def cond(state):
        i, _, done, _, _ = state
        return (i < max_len) & ~jnp.all(done)

    def body(state):
        i, tokens, done, logits, dec = state
        tok = jnp.where(done, cfg.pad_id, jnp.argmax(logits[:, -1], axis=-1)).astype(jnp.int32)
        tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, i))
        done = done | (tok == cfg.eos_id)
        logits, dec = step(tok[:, None], dec)
        return i + 1, tokens, done, logits, dec

    tokens = jnp.full((B, max_len), cfg.pad_id, jnp.int32)
    state = (jnp.int32(0), tokens, jnp.zeros((B,), jnp.bool_), logits, dec)
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


@functools.partial(jax.jit, static_argnames=("model", "beam_size", "alpha", "max_len"))
def _beam(model, params, src, *, beam_size, alpha, max_len):
    cfg, W, L = model.cfg, beam_size, max_len
    B, V = src.shape[0], model.cfg.vocab_size
    logits, dec, step = model.start_decoding(params, src, L + 1, repeat=W)
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
        i, live, live_lp, fin, fin_scores, logits, dec = state
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
        # The state rows of the chosen hypotheses [B, W] (flat index b·W + w).
        rows = (jnp.arange(B)[:, None] * W + jnp.take_along_axis(beam, pick, axis=1)).reshape(-1)
        tok = jnp.take_along_axis(tok, pick, axis=1).reshape(B * W, 1)
        logits, dec = step(tok, dec, rows)
        return i + 1, live, live_lp, fin, fin_scores, logits, dec

    state = (jnp.int32(0), live, live_lp, fin, fin_scores, logits, dec)
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


def translate(model, params, task: Any, sentences: Sequence[str], *, beam_size: int = 4,
              alpha: float = 0.6, greedy: bool = False) -> list[str]:
    """Decode space-separated source sentences of a sequence-to-sequence ``task``.

    Args:
      model: the encoder–decoder.
      params: its parameters.
      task: a :class:`~transformer_jax.data.seq2seq_tasks.Seq2SeqTask` (vocabulary, lengths).
      sentences: source sentences, words separated by spaces (case is ignored).
      beam_size: W (§6.1: 4).
      alpha: length penalty α (§6.1: 0.6).
      greedy: greedy decoding instead of beam search.

    Returns:
      The target sentences, words separated by spaces.

    Raises:
      ValueError: an empty sentence, one too long for the task, or a word outside its vocabulary.
    """
    words = [s.lower().split() for s in sentences]
    for w, s in zip(words, sentences):
        if not w:
            raise ValueError(f"empty source sentence {s!r}")
    src = task.source_ids(words)
    max_len = task.max_tgt_len + 1  # room for <eos>
    if greedy:
        out = greedy_decode(model, params, src, max_len=max_len)
    else:
        out = beam_search(model, params, src, beam_size=beam_size, alpha=alpha,
                          max_len=max_len)[0]
    return [" ".join(task.decode(row)) for row in np.asarray(out)]
