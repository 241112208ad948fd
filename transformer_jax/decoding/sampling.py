"""Sampling from a language model: one loop over its decoding step.

The model's ``start_decoding`` (the protocol of :mod:`transformer_jax.decoding`) feeds the
prompt and returns the step: the Transformer's state is its KV cache (the Flax ``"cache"``
collection), the RNN's its recurrent carry. :func:`generate` knows nothing else of the model.

:func:`generate` is ``jax.jit``-compiled with the model and the lengths static and the rest
traced, so it compiles once per (model, batch, prompt length, new tokens); the loop runs inside
XLA (``lax.fori_loop``).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.data.tokenizer import ByteTokenizer

__all__ = ["filter_logits", "generate", "sample_logits", "sample_text"]


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
    logits, state, step = model.start_decoding(params, prompt, T0 + max_new_tokens - 1)
    out = jnp.concatenate([prompt, jnp.zeros((B, max_new_tokens), prompt.dtype)], axis=1)

    def body(i, carry):
        out, logits, state = carry
        tok = sample_logits(logits, jax.random.fold_in(rng, i), temperature, top_k, top_p)
        out = jax.lax.dynamic_update_slice(out, tok[:, None].astype(out.dtype), (0, T0 + i))
        logits, state = step(tok[:, None], state)
        return out, logits[:, -1], state

    out, logits, _ = jax.lax.fori_loop(0, max_new_tokens - 1, body,
                                       (out, logits[:, -1], state))
    last = sample_logits(logits, jax.random.fold_in(rng, max_new_tokens - 1), temperature,
                         top_k, top_p)
    return out.at[:, -1].set(last.astype(out.dtype))


def generate(model, params, prompt, max_new_tokens: int, *, rng, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None):
    """Sample a continuation of ``prompt`` from a language model (KV cache or recurrent carry).

    The prompt is processed in one pass (prefill), then one token per step. Compiled once per
    (model, B, T0, max_new_tokens); temperature, top_k and top_p are traced (no recompile).

    Args:
      model: a language model, one with ``start_decoding`` and ``context_limit``
        (:class:`~transformer_jax.models.TransformerLM`, :class:`~transformer_jax.models.RNNLM`).
      params: its parameters.
      prompt: [B, T0] int tokens (dense, no padding), T0 >= 1.
      max_new_tokens: tokens to append; for the Transformer, T0 + max_new_tokens - 1 must be
        <= ``cfg.max_len``.
      rng: PRNG key; step i samples with ``fold_in(rng, i)``.
      temperature: softmax temperature; 0 means greedy (argmax).
      top_k: sample only among the k most likely tokens (None: no limit).
      top_p: nucleus sampling threshold (None: no limit).

    Returns:
      [B, T0 + max_new_tokens] tokens: the prompt followed by the sampled tokens.
    """
    if not hasattr(model, "context_limit"):
        raise TypeError("generate() samples from a language model; use greedy_decode() or "
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
    limit = model.context_limit()
    if limit is not None and prompt.shape[1] + max_new_tokens - 1 > limit:
        raise ValueError(f"generate() needs {prompt.shape[1] + max_new_tokens - 1} decoder "
                         f"positions, more than max_len={limit}")
    return _generate(model, params, prompt, rng, jnp.float32(temperature),
                     jnp.int32(0 if top_k is None else top_k),
                     jnp.float32(1.0 if top_p is None else top_p),
                     max_new_tokens=int(max_new_tokens))


def sample_text(model: Any, params: Any, prompt: str, *, max_new_tokens: int,
                context: int | None = None, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, seed: int = 0, device: Any = None,
                tokenizer: Any = None) -> str:
    """Continue ``prompt`` by ``max_new_tokens`` tokens; returns prompt + continuation as text.

    A Transformer only ever sees positions it was trained on: generation runs in windows of at
    most ``context`` positions (the training ``seq_len``), each new window starting from the
    last ``context // 2`` tokens so far (at most two compilations: the first window and the
    rest). A model without a context limit (the recurrent baselines) runs in one pass.

    Args:
      model: a language model (``start_decoding`` and ``context_limit``).
      params: its parameters.
      prompt: the text to continue (an empty prompt starts from a newline).
      max_new_tokens: tokens to generate (>= 1).
      context: positions per window (default and upper bound: the model's context limit).
      temperature: softmax temperature (> 0).
      top_k: sample among the k most likely tokens only.
      top_p: nucleus sampling: the smallest set of tokens with probability >= p.
      seed: the sampling seed (key ``fold_in(PRNGKey(seed), 2)``: the "sampling" purpose).
      device: where to run (default: JAX's default device).
      tokenizer: encodes the prompt and decodes the result (default: bytes,
        :class:`~transformer_jax.data.ByteTokenizer`; a run's own is ``load_run(...).tokenizer``).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    tok = ByteTokenizer() if tokenizer is None else tokenizer
    ids = [int(i) for i in (tok.encode(prompt) if prompt else tok.encode("\n"))]
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), 2)
    kw = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    limit = model.context_limit()
    with jax.default_device(device) if device is not None else contextlib.nullcontext():
        if limit is None:
            out = generate(model, params, np.asarray(ids, np.int32)[None], max_new_tokens,
                           rng=rng, **kw)
            return tok.decode(np.asarray(out)[0])
        ctx = min(context or limit, limit)
        if ctx < 2:
            raise ValueError(f"context must be >= 2, got {ctx}")
        text, window = list(ids), ids[-(ctx // 2):]
        for round_ in range(max_new_tokens):  # the loop ends long before this bound
            n = ctx + 1 - len(window)  # generate() feeds positions 0 .. T0 + n - 2 < ctx
            out = generate(model, params, np.asarray(window, np.int32)[None], n,
                           rng=jax.random.fold_in(rng, round_), **kw)
            new = [int(i) for i in np.asarray(out)[0, len(window):]]
            take = min(n, max_new_tokens - (len(text) - len(ids)))
            text += new[:take]
            if len(text) - len(ids) >= max_new_tokens:
                break
            window = text[-(ctx // 2):]
    return tok.decode(np.asarray(text))
