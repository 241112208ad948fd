"""The optimizer: learning-rate schedules and AdamW (or the paper's Adam, §5.3) behind
global-norm clipping, wrapped in ``optax.apply_if_finite`` so a non-finite gradient skips the
update.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from transformer_jax.config import TrainConfig

__all__ = ["make_optimizer", "make_schedule"]


def make_schedule(tc: TrainConfig, d_model: int) -> optax.Schedule:
    """Learning rate as a function of the optimizer's update count (0-based).

    "cosine": linear warmup to ``lr`` over ``warmup`` steps, then cosine decay to
    ``lr · min_lr_ratio`` at ``steps``. "constant": warmup, then ``lr``. "paper" (§5.3):
    d_model^-0.5 · min(s^-0.5, s · warmup^-1.5) with s = count + 1 (the paper counts from 1).
    """
    sc = tc.schedule
    warmup, lr = sc.warmup, sc.lr

    def warm(s):  # the first update already uses lr / warmup, not 0
        return jnp.minimum(1.0, s / warmup) if warmup else jnp.ones_like(s)

    def schedule(count):
        s = jnp.asarray(count, jnp.float32) + 1.0
        if sc.schedule == "paper":
            return d_model**-0.5 * jnp.minimum(s**-0.5, s * warmup**-1.5)
        if sc.schedule == "constant":
            return lr * warm(s)
        frac = jnp.clip((s - warmup) / max(sc.steps - warmup, 1), 0.0, 1.0)
        cosine = sc.min_lr_ratio + (1 - sc.min_lr_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * frac))
        return lr * jnp.where(s <= warmup, warm(s), cosine)

    return schedule


def _decay_mask(params: Any) -> Any:
    """Weight decay on matrices and embeddings only (not biases or LayerNorm scales)."""
    def decays(path, _):
        name = getattr(path[-1], "key", str(path[-1]))
        return name in ("kernel", "embedding", "pos_embed")

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(tc: TrainConfig, d_model: int) -> optax.GradientTransformation:
    """Global-norm clipping -> AdamW (or §5.3 Adam), skipping non-finite updates.

    ``optax.apply_if_finite`` applies the update anyway after ``max_consecutive_errors``
    non-finite ones; the loop stops at ``tc.optim.max_nonfinite`` and sees the counter at most two
    dispatches late, so the optax limit is set beyond what the loop can miss.
    """
    schedule, o = make_schedule(tc, d_model), tc.optim
    if o.optimizer == "adam":
        inner = optax.adam(schedule, b1=0.9, b2=0.98, eps=1e-9)  # §5.3
    else:
        inner = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps,
                            weight_decay=o.weight_decay, mask=_decay_mask)
    chain = optax.chain(optax.clip_by_global_norm(o.grad_clip), inner) if o.grad_clip else inner
    return optax.apply_if_finite(chain, o.max_nonfinite + 2 * o.steps_per_call + 1)
