"""The pure training step: the train state, the loss, and the train/eval steps.

* :class:`TrainState`: params, optimizer state, step, and the dropout root key.
* :func:`cross_entropy`: token cross-entropy with optional label smoothing (§5.4), ignoring
  padding (targets equal to :data:`transformer_jax.data.IGNORE`).
* :func:`train_step`: one optimizer step, pure: ``(state, batch) -> (state, metrics)``, with
  gradient accumulation and, under ``pmap``, ``lax.pmean`` of gradients and metrics;
  :func:`train_steps` runs several of them in one ``lax.scan`` (one dispatch, same semantics).
* :func:`eval_step`: summed validation NLL and token count of one batch.

Nothing here reads data or writes files: the loop that drives the steps (data, checkpoints,
metrics, SIGTERM) is :func:`transformer_jax.train.loop.run`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from transformer_jax.data.batches import IGNORE

__all__ = ["TrainState", "cross_entropy", "eval_step", "init_state", "train_step", "train_steps"]


@struct.dataclass
class TrainState:
    """Everything that changes during training; a pytree (checkpointed as a whole).

    Attributes:
      step: int32 scalar, optimizer steps taken (skipped non-finite steps count too: the data
        order follows it).
      params: the model parameters.
      opt_state: the optimizer state (``optax.apply_if_finite`` around the chain).
      rng: the dropout root key (raw uint32 [2]); step ``s`` uses ``fold_in(rng, s)``.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def cross_entropy(logits: jax.Array, targets: jax.Array, *, label_smoothing: float = 0.0,
                  z_loss: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """Summed token cross-entropy (nats) and the number of real (non-padding) targets.

    With label smoothing ε (§5.4) the target distribution is (1 - ε)·onehot + ε / V.

    Args:
      logits: [B, T, V] (any float dtype; computed in float32).
      targets: [B, T] int; positions equal to ``IGNORE`` (-1) get zero weight.
      label_smoothing: ε in [0, 1).
      z_loss: coefficient of log(Z)² added per real target (0: none).

    Returns:
      (sum of losses over real targets, number of real targets), float32 scalars.
    """
    logits = logits.astype(jnp.float32)
    weights = (targets != IGNORE).astype(jnp.float32)
    safe = jnp.where(targets == IGNORE, 0, targets)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    nll = log_z - jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    if label_smoothing:
        uniform = log_z - jnp.mean(logits, axis=-1)  # cross-entropy against the uniform target
        nll = (1.0 - label_smoothing) * nll + label_smoothing * uniform
    if z_loss:
        nll = nll + z_loss * jnp.square(log_z)
    return jnp.sum(nll * weights), jnp.sum(weights)


def init_state(model: nn.Module, tx: optax.GradientTransformation, *, seed: int,
               seq_len: int | None = None,
               input_lengths: tuple[int, ...] | None = None) -> TrainState:
    """A fresh state: params from ``fold_in(PRNGKey(seed), 0)``, dropout root from ``..., 1``.

    The model is initialised on int32 zeros [1, T] for each length of ``input_lengths`` (one
    per positional input, e.g. (S, T) for the encoder–decoder), or of ``(seq_len,)``.
    Compiled once per (model, optimizer, lengths); the seed is a traced argument.
    """
    lengths = input_lengths if input_lengths is not None else (seq_len,)
    return _init_state(model, tx, tuple(lengths), jnp.asarray(seed, jnp.uint32))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _init_state(model, tx, lengths, seed):
    root = jax.random.PRNGKey(seed)
    params_key, dropout_key = jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)
    params = model.init(params_key, *(jnp.zeros((1, n), jnp.int32) for n in lengths))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=dropout_key)


def _inputs(batch: jax.Array) -> jax.Array:
    """Model inputs [B, T] of a [B, T + 1] batch; padding (IGNORE) becomes the valid id 0."""
    return jnp.maximum(batch[:, :-1], 0)


def _summed_loss_and_grads(apply_fn, params, batch, key, *, label_smoothing, dropout,
                           z_loss=0.0):
    """((summed loss, real-target count), gradients of the sum) of one [b, T + 1] batch."""
    def loss_fn(p):
        logits = apply_fn({"params": p}, _inputs(batch), deterministic=not dropout,
                          rngs={"dropout": key})
        return cross_entropy(logits, batch[:, 1:], label_smoothing=label_smoothing,
                             z_loss=z_loss)

    return jax.value_and_grad(loss_fn, has_aux=True)(params)


def train_step(state: TrainState, batch: jax.Array, *, apply_fn: Callable[..., Any],
               tx: optax.GradientTransformation, label_smoothing: float = 0.0,
               grad_accum: int = 1, dropout: bool = False, z_loss: float = 0.0,
               axis_name: str | None = None,
               loss_and_grads: Callable[..., Any] | None = None,
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on one batch: pure, so it runs under jit, pmap or scan alike.

    Args:
      state: the current :class:`TrainState`.
      batch: [B, T + 1] int32 (this device's share of the global batch under pmap); another
        layout where ``loss_and_grads`` reads one (the encoder–decoder packs source and target).
      apply_fn: the model's ``apply``.
      tx: the optimizer from :func:`make_optimizer`.
      label_smoothing: ε of the loss (§5.4).
      grad_accum: split ``batch`` into this many micro-batches, one forward/backward each.
      dropout: run the model in training mode (needs ``dropout_rate > 0`` to matter).
      z_loss: coefficient of the log(Z)² term of the training loss (0: none).
      axis_name: the pmapped axis to average gradients and metrics over; ``None`` under jit.
      loss_and_grads: ``(apply_fn, params, batch, key, *, label_smoothing, dropout, z_loss) ->
        ((summed loss, number of real targets), gradients of the summed loss)`` of one
        micro-batch; default: the language model's next-token loss. The encoder–decoder's is
        :func:`transformer_jax.train.seq2seq.loss_and_grads`. Sums and counts are combined over
        micro-batches and devices before dividing, so the step's loss is the mean over every
        real target of the global batch on every path, even when parts hold different numbers
        of targets (padding).

    Returns:
      (new state, metrics): ``loss`` (mean training loss), ``grad_norm`` (global norm before
      clipping) and ``nonfinite`` (consecutive non-finite steps, from ``apply_if_finite``).
    """
    key = jax.random.fold_in(state.rng, state.step)  # per-step dropout randomness
    if axis_name is not None:  # different dropout masks on different devices
        key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
    grads_of = functools.partial(loss_and_grads or _summed_loss_and_grads, apply_fn,
                                 label_smoothing=label_smoothing, dropout=dropout, z_loss=z_loss)
    if grad_accum == 1:
        (total, count), grads = grads_of(state.params, batch, key)
    else:
        micro = batch.reshape(grad_accum, batch.shape[0] // grad_accum, batch.shape[1])

        def accumulate(carry, xs):
            mb, i = xs
            sums_i, grads_i = grads_of(state.params, mb, jax.random.fold_in(key, i))
            return jax.tree.map(jnp.add, carry, (sums_i, grads_i)), None

        zero = jnp.zeros((), jnp.float32)
        zeros = ((zero, zero), jax.tree.map(jnp.zeros_like, state.params))
        ((total, count), grads), _ = jax.lax.scan(accumulate, zeros,
                                                  (micro, jnp.arange(grad_accum)))
    if axis_name is not None:  # data parallelism: every replica applies the same mean gradient
        # Means of sums and of counts: their ratio is the mean over every real target of the
        # global batch, also when devices hold different numbers of targets (a mean of
        # per-device means would weight a device's targets by 1 / its count).
        total, count, grads = jax.lax.pmean((total, count, grads), axis_name)
    denom = jnp.maximum(count, 1.0)
    loss, grads = total / denom, jax.tree.map(lambda g: g / denom, grads)
    # apply_if_finite looks at the gradients only; a non-finite loss with finite gradients
    # (e.g. an Inf cut off by a where) is as suspect, so it poisons them and is skipped too.
    grads = jax.tree.map(lambda g: jnp.where(jnp.isfinite(loss), g, jnp.nan), grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "nonfinite": opt_state.notfinite_count}
    return new_state, metrics


def train_steps(state: TrainState, batches: jax.Array, **step_kwargs) -> tuple[TrainState, Any]:
    """:func:`train_step` over ``batches[k, B, T + 1]`` in one ``lax.scan``: k steps, one call.

    Returns:
      (state after k steps, metrics with a leading [k] axis).
    """
    return jax.lax.scan(functools.partial(train_step, **step_kwargs), state, batches)


def eval_step(params: Any, batch: jax.Array, *,
              apply_fn: Callable[..., Any]) -> tuple[jax.Array, jax.Array]:
    """Summed validation NLL (nats, no smoothing) and real-target count of a [B, T + 1] batch."""
    logits = apply_fn({"params": params}, _inputs(batch), deterministic=True)
    return cross_entropy(logits, batch[:, 1:])
