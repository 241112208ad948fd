"""Shared by the attention tests: a float64 NumPy reference written from the formula, and
random inputs in the ``jax.nn.dot_product_attention`` layout."""

import jax
import jax.numpy as jnp
import numpy as np


def reference(q, k, v, bias=None, mask=None, *, is_causal=False, q_lens=None, kv_lens=None,
              window=None, scale=None, return_probs=False):
    """float64 NumPy attention, [B,T,N,H] x [B,S,K,H]; all-masked rows give zeros."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    k = np.repeat(k, N // K, axis=2)  # grouped-query: query head n uses kv head n // G
    v = np.repeat(v, N // K, axis=2)
    scale = 1.0 / np.sqrt(H) if scale is None else scale
    logits = np.einsum("btnh,bsnh->bnts", q, k) * scale
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)
    ok = np.ones((B, N, T, S), bool)
    if mask is not None:
        ok &= np.asarray(mask)
    t = np.arange(T)[:, None]
    s = np.arange(S)[None, :]
    if is_causal:
        ok &= s <= t
    if window is not None:
        ok &= (s >= t - window[0]) & (s <= t + window[1])
    if q_lens is not None:
        ok &= (np.arange(T)[None, :] < np.asarray(q_lens)[:, None])[:, None, :, None]
    if kv_lens is not None:
        ok &= (np.arange(S)[None, :] < np.asarray(kv_lens)[:, None])[:, None, None, :]
    logits = np.where(ok, logits, -np.inf)
    m = logits.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.where(ok, np.exp(logits - m), 0.0)
    denom = p.sum(-1, keepdims=True)
    p = p / np.where(denom > 0, denom, 1.0)
    if return_probs:
        return p
    return np.einsum("bnts,bsnh->btnh", p, v)


def randn(key, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.PRNGKey(key), shape, jnp.float32).astype(dtype)


def make_inputs(B=2, T=37, S=45, N=4, K=2, H=8, dtype=jnp.float32, seed=0):
    return (randn(seed, (B, T, N, H), dtype), randn(seed + 1, (B, S, K, H), dtype),
            randn(seed + 2, (B, S, K, H), dtype))
