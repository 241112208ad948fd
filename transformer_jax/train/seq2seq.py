"""The encoder–decoder on a sequence-to-sequence task: its loss, its workload for the training
loop, and the paper's evaluation (greedy and beam search, exact match and corpus BLEU).

``--model`` picks the encoder–decoder (:func:`transformer_jax.models.build_seq2seq`): the
Transformer, or the attentional RNN translator ("lstm", "gru") that the paper's Table 2
compares with; everything below is the same for both.

``python train.py --task translate`` (or reverse, sort, add) runs
:func:`transformer_jax.train.loop.run` with :func:`workload`: the same loop, placement
(pmap/jit), checkpoints, metrics and resume as the language model; only the model, the
batches and the validation differ. The recipe is the paper's (the "translate" recipe of
:mod:`transformer_jax.config.recipes`): post-LN, shared embeddings (§3.4), Adam β = (0.9,
0.98), ε = 1e-9 with the warmup / inverse-square-root schedule (§5.3), label smoothing 0.1
(§5.4). When training
completes, the test split is decoded greedily and with beam search (beam 4, α = 0.6, §6.1),
optionally with the mean parameters of the last checkpoints (§6.1), and the scores become the
last line of ``metrics.jsonl``.

A batch is one int32 array [B, S + T + 2]
(:meth:`~transformer_jax.data.seq2seq_tasks.Seq2SeqTask.pack`): the padded source, then
``<bos>`` target ``<eos>`` padded; the decoder reads target[:-1] and predicts target[1:]
(teacher forcing), padding excluded from the loss.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import sacrebleu

from transformer_jax import decoding
from transformer_jax.config import ModelConfig, TrainConfig
from transformer_jax.data import IGNORE
from transformer_jax.data.seq2seq_tasks import PAD, Seq2SeqTask, get_task
from transformer_jax.models import accounting, build_seq2seq, count_params
from transformer_jax.parallel import Placement, check_batch
from transformer_jax.runs.checkpoint import Checkpointer
from transformer_jax.runs.rundir import RunConfigError
from transformer_jax.train.step import cross_entropy, init_state
from transformer_jax.train.workload import (
    StepFunctions,
    Workload,
    compile_steps,
    validation_loss,
)

__all__ = ["eval_step", "evaluate", "loss_and_grads", "workload"]

NUM_VALIDATION = 500
"""Validation examples (teacher-forced loss at every evaluation)."""
NUM_TEST = 500
"""Test examples decoded at the end of training."""

def _split(batch: jax.Array, src_len: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Packed [B, S + T + 2] -> (src [B, S], decoder input [B, T + 1], targets [B, T + 1])."""
    src, tgt = batch[:, :src_len], batch[:, src_len:]
    targets = tgt[:, 1:]
    return src, tgt[:, :-1], jnp.where(targets == PAD, IGNORE, targets)


def loss_and_grads(apply_fn: Callable[..., Any], params: Any, batch: jax.Array, key: jax.Array,
                   *, label_smoothing: float, dropout: bool, src_len: int, z_loss: float = 0.0):
    """((summed target-token loss, target count), gradients of the sum) of one packed batch.

    Plugs into :func:`~transformer_jax.train.step.train_step`, which divides by the count of
    the whole global batch.
    """
    def loss_fn(p):
        src, tgt_in, targets = _split(batch, src_len)
        logits = apply_fn({"params": p}, src, tgt_in, deterministic=not dropout,
                          rngs={"dropout": key})
        return cross_entropy(logits, targets, label_smoothing=label_smoothing, z_loss=z_loss)

    return jax.value_and_grad(loss_fn, has_aux=True)(params)


def eval_step(params: Any, batch: jax.Array, *, apply_fn: Callable[..., Any],
              src_len: int) -> tuple[jax.Array, jax.Array]:
    """Summed target NLL (nats, no smoothing) and real-target count of a packed batch."""
    src, tgt_in, targets = _split(batch, src_len)
    return cross_entropy(apply_fn({"params": params}, src, tgt_in), targets)


def _check(model_cfg: ModelConfig, tc: TrainConfig, task: Seq2SeqTask,
           placement: Placement) -> None:
    if model_cfg.vocab_size != task.vocab_size:
        raise RunConfigError(f"the {task.name} task has {task.vocab_size} tokens; the model's "
                             f"vocab_size is {model_cfg.vocab_size}")
    if (model_cfg.pad_id, model_cfg.bos_id, model_cfg.eos_id) != (0, 1, 2):
        raise RunConfigError("seq2seq tasks use pad/bos/eos ids 0/1/2")
    need = max(task.src_len, task.max_tgt_len + 2)
    if model_cfg.max_len < need:
        raise RunConfigError(f"the {task.name} task needs max_len >= {need}, the model has "
                             f"{model_cfg.max_len}")
    if model_cfg.num_encoder_layers < 1:
        raise RunConfigError("the encoder-decoder needs at least one encoder layer")
    check_batch(tc.data.batch_size, placement.batch_shards, tc.optim.grad_accum)


@functools.lru_cache(maxsize=8)
def _functions(model_cfg: ModelConfig, step_cfg: TrainConfig, src_len: int, tgt_len: int,
               placement: Placement) -> StepFunctions:
    """Model, optimizer and compiled steps (cached like the LM's: reruns reuse compilations)."""
    return compile_steps(
        build_seq2seq(step_cfg.model, model_cfg), step_cfg, model_cfg.d_model, placement,
        init_state=functools.partial(init_state, input_lengths=(src_len, tgt_len + 1)),
        eval_step=functools.partial(eval_step, src_len=src_len),
        flops_per_token=lambda params: accounting.seq2seq_flops_per_token(
            count_params(params), model_cfg, tgt_len + 1, model=step_cfg.model),
        dropout=model_cfg.dropout_rate > 0,
        loss_and_grads=functools.partial(loss_and_grads, src_len=src_len))


def _padded_batches(packed: np.ndarray, batch_size: int):
    """``packed`` in batches of ``batch_size`` rows, the last padded with empty rows."""
    n = len(packed)
    rows = -(-n // batch_size) * batch_size
    padded = np.concatenate([packed, np.zeros((rows - n, packed.shape[1]), np.int32)])
    return (padded[i:i + batch_size] for i in range(0, rows, batch_size))


def _abstract_state(model: Any, tx: Any, task: Seq2SeqTask, device: Any) -> Any:
    """The TrainState's shapes (with a device) for restoring checkpoints."""
    shapes = jax.eval_shape(lambda: init_state(
        model, tx, seed=0, input_lengths=(task.src_len, task.max_tgt_len + 1)))
    sharding = jax.sharding.SingleDeviceSharding(device)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        shapes)


def workload(model_cfg: ModelConfig, tc: TrainConfig, placement: Placement, *,
             log: Callable[[str], None]) -> Workload:
    """The :class:`~transformer_jax.train.workload.Workload` of the task ``tc.task``.

    Raises:
      RunConfigError, transformer_jax.parallel.BatchSplitError: settings that cannot train.
    """
    task = get_task(tc.task)
    _check(model_cfg, tc, task, placement)
    fns = _functions(model_cfg, tc.step_identity(), task.src_len, task.max_tgt_len, placement)
    val = task.pack(task.examples("validation", NUM_VALIDATION, seed=tc.seed))
    test = task.examples("test", NUM_TEST, seed=tc.seed)
    lengths = (task.src_len, task.max_tgt_len + 1)
    # Target tokens per step: <eos> included, padding not (the mean over one validation batch).
    tokens = float(np.mean(np.sum(val[:, task.src_len + 1:] != PAD, axis=1)))

    def finish(params: Any, ckpt: Checkpointer, step: int) -> dict[str, Any]:
        steps = [step]
        if tc.eval.average_last > 1:
            here = placement.local_device
            params, steps = ckpt.average(_abstract_state(fns.model, fns.tx, task, here),
                                         last=tc.eval.average_last, select=lambda s: s.params)
        result = evaluate(fns.model, params, task, test)
        result["average_steps"] = steps
        log(_report(result, task, test))
        record = {k: v for k, v in result.items() if k not in ("hypotheses", "average_steps")}
        # metrics.jsonl holds scalars: the averaged checkpoints as their count and first step.
        return {"averaged_checkpoints": len(steps), "averaged_from_step": steps[0], **record}

    return Workload(
        fns=fns,
        init_state=lambda seed: init_state(fns.model, fns.tx, seed=seed, input_lengths=lengths),
        # Each process builds the whole (small) global batch and keeps its rows.
        train_batches=lambda step, k, rows=slice(None): task.batches(
            tc.seed, step, k, tc.data.batch_size)[:, rows],
        width=val.shape[1],
        validate=lambda params: validation_loss(
            fns, params, _padded_batches(val, tc.eval.eval_batch_size), placement),
        tokens_per_step=round(tc.data.batch_size * tokens),
        architecture=(f"{tc.model}: {model_cfg.num_encoder_layers}+"
                      f"{model_cfg.num_decoder_layers} layers, d_model {model_cfg.d_model}"),
        description=(f"task {task.name} (V={task.vocab_size}, S={task.src_len}, "
                     f"T={task.max_tgt_len}; {len(val)} validation / {len(test)} test "
                     "examples, disjoint from training)"),
        unit="token", finish=finish)


def _decode_all(fn: Callable[[np.ndarray], Any], src: np.ndarray, batch_size: int) -> np.ndarray:
    """``fn`` over fixed-size batches of ``src`` (the last padded: one compilation)."""
    n = len(src)
    rows = -(-n // batch_size) * batch_size
    padded = np.concatenate([src, np.full((rows - n, src.shape[1]), PAD, np.int32)])
    outs = [np.asarray(fn(padded[i:i + batch_size])) for i in range(0, rows, batch_size)]
    return np.concatenate(outs)[:n]


def evaluate(model: Any, params: Any, task: Seq2SeqTask, examples: list, *,
             beam_size: int = 4, alpha: float = 0.6, batch_size: int = 250) -> dict[str, Any]:
    """Greedy and beam-search decoding of ``examples``: exact match and corpus BLEU.

    Args:
      model: the encoder–decoder.
      params: its parameters.
      task: the task (vocabulary, lengths).
      examples: (source words, reference words) pairs.
      beam_size: W (§6.1: 4).
      alpha: length penalty α (§6.1: 0.6).
      batch_size: sentences per decoding call.

    Returns:
      ``test_exact_match_greedy`` / ``_beam`` (fractions in [0, 1]), ``test_bleu_greedy`` /
      ``_beam`` (sacrebleu corpus BLEU, 0–100, on space-joined words), ``num_test``,
      ``beam_size``, ``alpha``, and ``hypotheses`` (greedy and beam word lists).
    """
    src = task.source_ids([s for s, _ in examples])
    max_len = task.max_tgt_len + 1  # room for <eos>
    greedy = _decode_all(lambda s: decoding.greedy_decode(model, params, s, max_len=max_len),
                         src, batch_size)
    beam = _decode_all(lambda s: decoding.beam_search(model, params, s, beam_size=beam_size,
                                                      alpha=alpha, max_len=max_len)[0],
                       src, batch_size)
    refs = [" ".join(t) for _, t in examples]
    out: dict[str, Any] = {"num_test": len(examples), "beam_size": beam_size, "alpha": alpha,
                           "hypotheses": {}}
    for name, tokens in (("greedy", greedy), ("beam", beam)):
        hyps = [" ".join(task.decode(row)) for row in tokens]
        out[f"test_exact_match_{name}"] = float(np.mean([h == r for h, r in zip(hyps, refs)]))
        out[f"test_bleu_{name}"] = float(sacrebleu.corpus_bleu(hyps, [refs]).score)
        out["hypotheses"][name] = hyps
    return out


def _report(result: dict[str, Any], task: Seq2SeqTask, examples: list, n: int = 3) -> str:
    """The printed summary: scores, then a few example translations (errors first)."""
    hyps = result["hypotheses"]["beam"]
    refs = [" ".join(t) for _, t in examples]
    order = sorted(range(len(examples)), key=lambda i: hyps[i] == refs[i])[:n]
    steps = result["average_steps"]
    lines = [f"test ({result['num_test']} {task.name} examples"
             + (f", parameters averaged over steps {steps}" if len(steps) > 1 else "") + "): "
             f"exact match greedy {100 * result['test_exact_match_greedy']:.1f}%, beam "
             f"{100 * result['test_exact_match_beam']:.1f}%; BLEU greedy "
             f"{result['test_bleu_greedy']:.2f}, beam {result['test_bleu_beam']:.2f} "
             f"(beam {result['beam_size']}, alpha {result['alpha']})"]
    for i in order:
        mark = "ok" if hyps[i] == refs[i] else "WRONG"
        lines += [f"  source: {' '.join(examples[i][0])}", f"  beam:   {hyps[i]}  [{mark}]",
                  f"  ref:    {refs[i]}"]
    return "\n".join(lines)
