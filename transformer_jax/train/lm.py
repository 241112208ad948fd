"""The language-model workload: next-byte prediction on a text corpus.

The byte-level Transformer LM (or a recurrent baseline, ``--model lstm|gru``) on
``TrainConfig.data`` (default: the embedded corpus); batches are random crops, a pure function
of (seed, step); validation covers the whole validation split once; the end of training
samples text from ``TrainConfig.sample_prompt``.
"""

from __future__ import annotations

import functools
from typing import Any

from transformer_jax import decoding, models
from transformer_jax.config import ModelConfig, TrainConfig
from transformer_jax.data import ByteTokenizer, Corpus, batches, load_corpus
from transformer_jax.models import accounting
from transformer_jax.parallel import Placement, check_batch
from transformer_jax.runs.rundir import RunConfigError
from transformer_jax.train.step import eval_step, init_state
from transformer_jax.train.workload import (
    StepFunctions,
    Workload,
    compile_steps,
    step_config,
    validation_loss,
)

__all__ = ["workload"]


@functools.lru_cache(maxsize=8)
def _functions(model_cfg: ModelConfig, step_cfg: TrainConfig, seq_len: int,
               placement: Placement) -> StepFunctions:
    """Model, optimizer and compiled steps (cached: reruns in one process reuse compilations)."""
    model = models.build_model(step_cfg.model, model_cfg)
    return compile_steps(
        model, step_cfg, model_cfg.d_model, placement,
        init_state=functools.partial(init_state, seq_len=seq_len), eval_step=eval_step,
        flops_per_token=lambda params: accounting.lm_flops_per_token(
            params, model_cfg, seq_len, step_cfg.model),
        dropout=model_cfg.dropout_rate > 0)


def _check(model_cfg: ModelConfig, tc: TrainConfig, placement: Placement,
           corpus: Corpus) -> None:
    if model_cfg.vocab_size != ByteTokenizer.vocab_size:
        raise RunConfigError(f"byte-level data needs vocab_size 256, got {model_cfg.vocab_size}")
    if tc.model == "transformer" and tc.seq_len > model_cfg.max_len:
        raise RunConfigError(f"seq_len {tc.seq_len} exceeds the model's max_len "
                             f"{model_cfg.max_len}; lower seq_len or raise max_len")
    check_batch(tc.batch_size, placement.batch_shards, tc.grad_accum)
    batches.check_length(corpus.train, tc.seq_len, "train")
    batches.check_length(corpus.val, tc.seq_len, "validation")


def workload(model_cfg: ModelConfig, tc: TrainConfig, placement: Placement, *,
             log: Any = None) -> Workload:
    """The byte-level language model on the corpus of ``tc.data``.

    Raises:
      RunConfigError, transformer_jax.data.DataError, transformer_jax.parallel.BatchSplitError:
        settings or data that cannot train (before anything compiles).
    """
    del log  # nothing to report beyond the loop's start-up line
    corpus = load_corpus(tc.data, tc.val_fraction)
    _check(model_cfg, tc, placement, corpus)
    fns = _functions(model_cfg, step_config(tc), tc.seq_len, placement)

    def sample(params: Any, step: int, device: Any) -> str:
        return decoding.sample_text(fns.model, params, tc.sample_prompt,
                                    max_new_tokens=tc.sample_tokens, context=tc.seq_len,
                                    temperature=tc.sample_temperature, seed=tc.seed,
                                    device=device)

    return Workload(
        fns=fns,
        init_state=lambda seed: init_state(fns.model, fns.tx, seed=seed, seq_len=tc.seq_len),
        train_batches=lambda step, k, rows=slice(None): batches.train_batches(
            corpus.train, seed=tc.seed, step=step, num_steps=k, batch_size=tc.batch_size,
            seq_len=tc.seq_len, rows=rows),
        width=tc.seq_len + 1,
        validate=lambda params: validation_loss(
            fns, params, batches.eval_batches(corpus.val, batch_size=tc.eval_batch_size,
                                              seq_len=tc.seq_len), placement),
        tokens_per_step=tc.batch_size * tc.seq_len,
        architecture=(f"{tc.model}: {model_cfg.num_decoder_layers} layers, d_model "
                      f"{model_cfg.d_model}"),
        description=(f"data {corpus.name} ({len(corpus.train):,} train / "
                     f"{len(corpus.val):,} val bytes)"),
        sample=sample if tc.sample_tokens else None)
