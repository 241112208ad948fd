"""The encoder–decoder on a real parallel corpus: ``python train.py --task translate --data DIR``.

``DIR`` is a dataset written by ``python -m transformer_jax.prepare --pairs`` (one BPE for both
sides, §5.1). The model, loss, optimizer, checkpoints and loop are those of the generated
sequence tasks (:mod:`transformer_jax.train.seq2seq`); what differs is the data and the
evaluation:

* Batches by token count, as §5.1 ("each training batch contained a set of sentence pairs
  containing approximately 25000 source tokens and 25000 target tokens"): ``--batch-tokens``
  slots a side, pairs of similar length together (:mod:`transformer_jax.data.token_batches`).
  The length buckets are the fewest (at most :data:`MAX_BUCKETS`) whose batches hold at least
  :data:`REAL_SHARE` real tokens: each bucket is one array shape, so one compiled program.
  A batch is a pure function of (seed, step), so resuming is bit-exact.
* At every evaluation: the validation loss per target token, and BLEU of greedy decoding on
  the first :data:`NUM_BLEU` validation pairs (cheap, so it can run often).
* At the end: the test split decoded as §6.1 does (beam 4, α = 0.6, at most input length + 50
  tokens, the mean parameters of the last checkpoints), scored with sacreBLEU and chrF on
  detokenised text beside the copy-the-source baseline; the hypotheses go to
  ``translations.test.txt`` in the run directory.

Batches change shape from step to step (one shape per bucket), so one compiled call runs one
step (``steps_per_call`` 1).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import sacrebleu

from transformer_jax import decoding
from transformer_jax.config import ModelConfig, TrainConfig
from transformer_jax.data import token_batches as tb
from transformer_jax.data.pair_dataset import PairDataset, check_kind, open_pairs
from transformer_jax.models import accounting, build_seq2seq, count_params
from transformer_jax.parallel import Placement, distributed
from transformer_jax.runs.checkpoint import Checkpointer
from transformer_jax.runs.rundir import RunConfigError, write_text_atomic
from transformer_jax.train import seq2seq
from transformer_jax.train.lm import keep_tokenizer
from transformer_jax.train.step import init_state
from transformer_jax.train.workload import (
    StepFunctions,
    Workload,
    compile_steps,
    validation_loss,
)

__all__ = ["HYPOTHESES", "TextCodec", "decode_texts", "plan", "score", "translate_texts",
           "workload"]

REAL_SHARE = 0.85
"""The share of a training batch's token slots that must hold real tokens."""
MAX_BUCKETS = 16
"""At most this many length buckets (compiled train programs), whatever the share."""
EVAL_BUCKETS = 3
"""Length buckets of validation and decoding batches (one compiled program each)."""
NUM_BLEU = 200
"""Validation pairs decoded greedily for BLEU at every evaluation."""
HYPOTHESES = "translations.test.txt"
"""The run directory's file of test hypotheses, one line per test pair, in test order."""
DECODE_TOKENS = 4096
"""Source slots per decoding call (rows × source length; beam search multiplies by W)."""


def plan(lengths: np.ndarray, batch_tokens: int, row_multiple: int = 1) -> tb.BatchPlan:
    """The training batches: the fewest length buckets (up to :data:`MAX_BUCKETS`) whose
    batches are at least :data:`REAL_SHARE` real tokens (the optimal boundaries of
    :func:`~transformer_jax.data.token_batches.optimal_boundaries`)."""
    best = None
    for k in range(1, MAX_BUCKETS + 1):
        best = tb.plan_batches(lengths, batch_tokens, num_buckets=k, row_multiple=row_multiple)
        if best.real_share >= REAL_SHARE or len(best.boundaries) < k:  # no more lengths to split
            break
    return best


def batch_tokens(tc: TrainConfig, lengths: np.ndarray) -> int:
    """``tc.data.batch_tokens``, or (0) ``batch_size`` pairs of the mean length a batch."""
    if tc.data.batch_tokens:
        return tc.data.batch_tokens
    return max(int(tc.data.batch_size * (lengths.max(axis=1).mean() + 1)),
               int(lengths.max()) + 1)


def _loss_and_grads(apply_fn, params, batch, key, **kwargs):
    """:func:`seq2seq.loss_and_grads` with the source length read from the batch shape."""
    return seq2seq.loss_and_grads(apply_fn, params, batch, key,
                                  src_len=tb.source_length(batch), **kwargs)


def _eval_step(params, batch, *, apply_fn):
    return seq2seq.eval_step(params, batch, apply_fn=apply_fn, src_len=tb.source_length(batch))


@functools.lru_cache(maxsize=8)
def _functions(model_cfg: ModelConfig, step_cfg: TrainConfig, mean_len: int,
               placement: Placement) -> StepFunctions:
    """Model, optimizer and steps (jit compiles each bucket's shape once, on first use)."""
    return compile_steps(
        build_seq2seq(step_cfg.model, model_cfg), step_cfg, model_cfg.d_model, placement,
        # The parameters do not depend on the lengths (sinusoidal positions): any will do.
        init_state=functools.partial(init_state, input_lengths=(8, 8)),
        eval_step=_eval_step,
        flops_per_token=lambda params: accounting.seq2seq_flops_per_token(
            count_params(params), model_cfg, mean_len, model=step_cfg.model),
        dropout=model_cfg.dropout_rate > 0, loss_and_grads=_loss_and_grads)


def _check(model_cfg: ModelConfig, tc: TrainConfig, data: PairDataset,
           placement: Placement) -> None:
    if model_cfg.vocab_size != data.vocab_size:
        raise RunConfigError(f"the data ({data.path}) has a vocabulary of {data.vocab_size} "
                             f"tokens, the model's vocab_size is {model_cfg.vocab_size}; they "
                             "must agree (train.py takes vocab_size from --data)")
    ids = (data.pad_id, data.bos_id, data.eos_id)
    if (model_cfg.pad_id, model_cfg.bos_id, model_cfg.eos_id) != ids:
        raise RunConfigError(f"the data's pad/bos/eos ids are {ids}, the model's "
                             f"{(model_cfg.pad_id, model_cfg.bos_id, model_cfg.eos_id)}")
    longest = int(data.train.lengths.max()) + 2
    if model_cfg.max_len < longest:
        raise RunConfigError(f"the longest training pair needs max_len >= {longest}, the model "
                             f"has {model_cfg.max_len}; raise max_len or prepare with a lower "
                             "--max-tokens")
    if model_cfg.num_encoder_layers < 1:
        raise RunConfigError("the encoder-decoder needs at least one encoder layer")
    if tc.optim.steps_per_call != 1:
        raise RunConfigError(f"steps_per_call {tc.optim.steps_per_call}: batches of text pairs "
                             "change shape from step to step (one per length bucket), so one "
                             "compiled call runs one step; use steps_per_call 1")
    if placement.mesh is not None:
        raise RunConfigError("translation batches by length run on --parallel pmap or none "
                             "for now; the mesh kinds take one batch shape a run")


def workload(model_cfg: ModelConfig, tc: TrainConfig, placement: Placement, *,
             log: Callable[[str], None]) -> Workload:
    """The encoder–decoder on the parallel dataset ``tc.data.data``.

    Raises:
      RunConfigError, transformer_jax.data.DataError: settings or data that cannot train.
    """
    if len(tc.data.data) != 1:
        raise RunConfigError("--task translate takes one --data folder written by python -m "
                             f"transformer_jax.prepare --pairs, got {len(tc.data.data)} paths")
    check_kind(tc.data.data[0], "pairs")
    data = open_pairs(tc.data.data[0])
    _check(model_cfg, tc, data, placement)
    lengths = data.train.lengths
    tokens = batch_tokens(tc, lengths)
    train_plan = plan(lengths, tokens, placement.batch_shards * tc.optim.grad_accum)
    val_plan = tb.plan_batches(data.valid.lengths, tokens, num_buckets=EVAL_BUCKETS)
    fns = _functions(model_cfg, tc.step_identity(), int(lengths.max(axis=1).mean()) + 1,
                     placement)
    ids = {"pad_id": data.pad_id, "bos_id": data.bos_id, "eos_id": data.eos_id}
    bleu_slice = min(NUM_BLEU, len(data.valid))
    bleu_sources = data.valid.pairs(np.arange(bleu_slice))[0]
    bleu_refs = [t for _, t in data.valid.texts(bleu_slice)]

    def train_batches(step: int, k: int, rows: slice = slice(None)) -> np.ndarray:
        return np.stack([tb.train_batch(data.train, train_plan, seed=tc.seed, step=s, rows=rows,
                                        **ids) for s in range(step, step + k)])

    def batch_shape(step: int, k: int) -> tuple[int, int, int]:
        shapes = {train_plan.shapes()[train_plan.batch_pairs(tc.seed, s)[0]]
                  for s in range(step, step + k)}
        if len(shapes) != 1:
            raise ValueError(f"steps {step}..{step + k - 1} have batches of several shapes")
        return (k, *shapes.pop())

    def interval_metrics(first: int, end: int) -> dict[str, Any]:
        return {"real_share": _real_share(train_plan, lengths, tc.seed, first, end)}

    def eval_metrics(params: Any) -> dict[str, Any]:
        hyps = decode_texts(fns.model, params, data, bleu_sources, greedy=True)
        return {"val_bleu": score(hyps, bleu_refs)["bleu"]}

    def finish(params: Any, ckpt: Checkpointer, step: int) -> dict[str, Any]:
        return _finish(fns, data, tc, placement, params, ckpt, step, log)

    share = train_plan.real_share
    return Workload(
        fns=fns,
        init_state=lambda seed: init_state(fns.model, fns.tx, seed=seed, input_lengths=(8, 8)),
        train_batches=train_batches,
        width=int(2 * train_plan.boundaries.max() + 2),
        validate=lambda params: validation_loss(
            fns, params, tb.eval_batches(data.valid, val_plan, **ids), placement),
        tokens_per_step=round(_targets_per_step(train_plan, lengths)),
        architecture=(f"{tc.model}: {model_cfg.num_encoder_layers}+"
                      f"{model_cfg.num_decoder_layers} layers, d_model {model_cfg.d_model}"),
        description=(f"pairs {data.path} (V={data.vocab_size}; {len(data.train):,} train / "
                     f"{len(data.valid):,} valid / {len(data.test):,} test pairs); batches of "
                     f"{tokens:,} token slots a side in {len(train_plan.boundaries)} length "
                     f"buckets, {100 * share:.1f}% real tokens"),
        unit="token", finish=finish,
        run_files=functools.partial(keep_tokenizer, data.tokenizer_json),
        interval_metrics=interval_metrics, eval_metrics=eval_metrics, batch_shape=batch_shape)


def _real_share(plan_: tb.BatchPlan, lengths: np.ndarray, seed: int, first: int,
                end: int) -> float:
    """The share of the token slots of the batches of steps first … end - 1 that are real."""
    real = slots = 0
    for s in range(first, end):
        bucket, index = plan_.batch_pairs(seed, s)
        real += int(lengths[index].astype(np.int64).sum()) + 2 * len(index)
        slots += len(index) * (2 * int(plan_.boundaries[bucket]) + 2)
    return real / max(slots, 1)


def _targets_per_step(plan_: tb.BatchPlan, lengths: np.ndarray) -> float:
    """Expected target tokens (``<eos>`` included) of a batch, over an epoch."""
    per_row = [lengths[m, 1].astype(np.float64).mean() + 1 for m in plan_.members]
    return float(np.dot(plan_.chunks * plan_.rows, per_row) / plan_.batches_per_epoch)


def score(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """sacreBLEU (its default 13a tokenisation of detokenised text, Post 2018) and chrF.

    Returns:
      ``bleu`` and ``chrf`` (0–100), ``bleu_signature`` and ``chrf_signature``.
    """
    bleu, chrf = sacrebleu.metrics.BLEU(), sacrebleu.metrics.CHRF()
    hyps, refs = list(hypotheses), [list(references)]
    return {"bleu": float(bleu.corpus_score(hyps, refs).score),
            "chrf": float(chrf.corpus_score(hyps, refs).score),
            "bleu_signature": str(bleu.get_signature()),
            "chrf_signature": str(chrf.get_signature())}


def decode_texts(model: Any, params: Any, data: Any, sources: Sequence[np.ndarray], *,
                 greedy: bool = False, beam_size: int = 4, alpha: float = 0.6,
                 extra: int = 50) -> list[str]:
    """Decode token-id sources into detokenised texts, in the input's order.

    Sources are batched by length (:data:`EVAL_BUCKETS` widths, each batch filled to a fixed
    row count: one compiled program a width). Each output is at most its source's length +
    ``extra`` tokens (§6.1: input length + 50), and never more than the model's positions
    allow; a source longer than ``max_len`` is cut to it.

    Args:
      model: the encoder–decoder.
      params: its parameters.
      data: anything with ``detokenize(ids) -> str`` and ``pad_id``
        (:class:`~transformer_jax.data.pair_dataset.PairDataset`, or the tokenizer of a run).
      sources: [S_i] token ids each, without ``<bos>``/``<eos>``.
      greedy: greedy decoding instead of beam search.
      beam_size, alpha: beam search's W and length penalty α (§6.1: 4 and 0.6).
      extra: tokens allowed beyond the source length.
    """
    if not len(sources):
        return []
    cap = model.cfg.max_len
    lengths = np.asarray([max(min(len(s), cap), 1) for s in sources], np.int64)
    bounds = tb.optimal_boundaries(lengths, EVAL_BUCKETS)
    bucket = np.searchsorted(bounds, lengths)
    out: list[str] = [""] * len(sources)
    for k, width in enumerate(bounds.tolist()):
        members = np.flatnonzero(bucket == k)
        if not members.size:
            continue
        rows = max(1, min(len(members), DECODE_TOKENS // width))
        max_len = min(width + extra, cap - 1)
        for a in range(0, len(members), rows):
            chunk = members[a:a + rows]
            src = np.full((rows, width), data.pad_id, np.int32)
            for r, i in enumerate(chunk):
                src[r, :lengths[i]] = sources[i][:lengths[i]]
            if greedy:
                ids = decoding.greedy_decode(model, params, src, max_len=max_len)
            else:
                ids = decoding.beam_search(model, params, src, beam_size=beam_size,
                                           alpha=alpha, max_len=max_len)[0]
            ids = np.asarray(ids)
            for r, i in enumerate(chunk):
                out[i] = data.detokenize(ids[r, :lengths[i] + extra])
    return out


class TextCodec:
    """A run's tokenizer as :func:`decode_texts` and :func:`translate_texts` use it.

    Attributes:
      tokenizer: the run's (or dataset's) BPE tokenizer, both sides.
      pad_id, eos_id: the model's special ids.
    """

    def __init__(self, tokenizer: Any, pad_id: int, eos_id: int):
        self.tokenizer, self.pad_id, self.eos_id = tokenizer, pad_id, eos_id

    def encode(self, text: str) -> np.ndarray:
        """[S] source ids of ``text`` (no ``<bos>``/``<eos>``, as ``prepare --pairs`` writes)."""
        return np.asarray(self.tokenizer.encode(text))

    def detokenize(self, ids) -> str:
        """[L] decoder output -> text: up to the first ``<eos>``, special tokens dropped."""
        ids = np.asarray(ids).reshape(-1)
        stop = np.flatnonzero(ids == self.eos_id)
        ids = ids[:stop[0]] if stop.size else ids
        return self.tokenizer.decode(ids[ids >= len(self.tokenizer.special_ids)])


def translate_texts(model: Any, params: Any, codec: TextCodec, texts: Sequence[str],
                    **kwargs: Any) -> list[str]:
    """Translate raw texts with a model trained on a parallel dataset, in the input's order.

    Args:
      model, params: the encoder–decoder and its parameters.
      codec: the run's tokenizer (:class:`TextCodec`).
      texts: source texts, one per output.
      **kwargs: :func:`decode_texts`'s ``greedy``, ``beam_size``, ``alpha``.
    """
    sources = [codec.encode(t.rstrip("\n")) for t in texts]
    return [one_line(h) for h in decode_texts(model, params, codec, sources, **kwargs)]


def one_line(text: str) -> str:
    """``text`` with its line breaks (any that ``str.splitlines`` knows) made spaces: one
    translation, one line of a file."""
    return " ".join(text.splitlines()) if text else text


def _finish(fns: StepFunctions, data: PairDataset, tc: TrainConfig, placement: Placement,
            params: Any, ckpt: Checkpointer, step: int,
            log: Callable[[str], None]) -> dict[str, Any]:
    """The test evaluation of §6.1: averaged checkpoints, beam 4, α 0.6, sacreBLEU + chrF."""
    steps = [step]
    if tc.eval.average_last > 1:
        sharding = jax.sharding.SingleDeviceSharding(placement.local_device)
        shapes = jax.eval_shape(lambda: init_state(fns.model, fns.tx, seed=0,
                                                   input_lengths=(8, 8)))
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                               sharding=sharding), shapes)
        params, steps = ckpt.average(abstract, last=tc.eval.average_last,
                                     select=lambda s: s.params)
    texts = data.test.texts()
    sources = data.test.pairs(np.arange(len(data.test)))[0]
    start = time.perf_counter()
    hyps = [one_line(h) for h in decode_texts(fns.model, params, data, sources)]
    decode_s = time.perf_counter() - start  # compilation of the decoding buckets included
    refs = [t for _, t in texts]
    result = score(hyps, refs)
    copy = score([s for s, _ in texts], refs)
    out = Path(tc.out)
    if distributed.is_lead():
        write_text_atomic(out / HYPOTHESES, "".join(one_line(h) + "\n" for h in hyps))
    record = {"test_bleu": result["bleu"], "test_chrf": result["chrf"],
              "copy_bleu": copy["bleu"], "copy_chrf": copy["chrf"],
              "bleu_signature": result["bleu_signature"],
              "chrf_signature": result["chrf_signature"], "num_test": len(hyps),
              "beam_size": 4, "alpha": 0.6, "averaged_checkpoints": len(steps),
              "averaged_from_step": steps[0], "decode_s": decode_s,
              "decode_sentences_per_s": len(hyps) / decode_s}
    log(f"test ({len(hyps):,} pairs, beam 4, alpha 0.6, max length input + 50"
        + (f", parameters averaged over steps {steps}" if len(steps) > 1 else "")
        + f"): BLEU {result['bleu']:.2f}, chrF {result['chrf']:.2f}; copy-the-source BLEU "
        f"{copy['bleu']:.2f}, chrF {copy['chrf']:.2f}; {len(hyps) / decode_s:.1f} sentences/s"
        f"\n  sacreBLEU {result['bleu_signature']}"
        f"\n  chrF {result['chrf_signature']}\n  hypotheses: {out / HYPOTHESES}")
    return record
