"""The language-model workload: next-token prediction on a text corpus.

The Transformer LM (or a recurrent baseline, ``--model lstm|gru``) on ``TrainConfig.data``:
the embedded corpus or text files as bytes, or a dataset prepared by ``python -m
transformer_jax.prepare`` (token shards read on demand and their tokenizer, which the run
directory keeps a copy of). Batches are random crops, a pure function of (seed, step);
validation covers the whole validation split once; the end of training samples text from
``TrainConfig.sample_prompt``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from transformer_jax import decoding, models
from transformer_jax.config import ModelConfig, TrainConfig
from transformer_jax.data import ByteTokenizer, batches
from transformer_jax.data.prepared import LMData, load_lm_data
from transformer_jax.models import accounting
from transformer_jax.parallel import Placement, check_batch
from transformer_jax.runs.rundir import RunConfigError, write_text_atomic
from transformer_jax.train.step import eval_step, init_state
from transformer_jax.train.workload import (
    StepFunctions,
    Workload,
    compile_steps,
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


TOKENIZER = "tokenizer.json"  # the run directory's copy of a prepared dataset's tokenizer


def _check(model_cfg: ModelConfig, tc: TrainConfig, placement: Placement, data: LMData) -> None:
    vocab = data.tokenizer.vocab_size
    if model_cfg.vocab_size != vocab:
        raise RunConfigError(f"the data ({data.name}) has a vocabulary of {vocab} tokens, the "
                             f"model's vocab_size is {model_cfg.vocab_size}; they must agree "
                             "(train.py takes vocab_size from --data)")
    if tc.model == "transformer" and tc.data.seq_len > model_cfg.max_len:
        raise RunConfigError(f"seq_len {tc.data.seq_len} exceeds the model's max_len "
                             f"{model_cfg.max_len}; lower seq_len or raise max_len")
    check_batch(tc.data.batch_size, placement.batch_shards, tc.optim.grad_accum)
    batches.check_length(data.train, tc.data.seq_len, "train", f"{data.unit}s")
    batches.check_length(data.val, tc.data.seq_len, "validation", f"{data.unit}s")


def _check_run_tokenizer(out: Path, data: LMData) -> None:
    """Refuse to resume the run in ``out`` on data of another tokenizer."""
    if (out / TOKENIZER).is_file():
        kept, what = (out / TOKENIZER).read_text(encoding="utf-8"), str(out / TOKENIZER)
    elif (out / "config.json").is_file():  # a run on raw text: bytes
        kept, what = ByteTokenizer().to_json(), "bytes"
    else:
        return
    if kept != (data.tokenizer_json or ByteTokenizer().to_json()):
        raise RunConfigError(f"--data {data.name} has another tokenizer than the run in {out} "
                             f"was trained with ({what}); resume it on the same dataset, or "
                             "use another --out")


def keep_tokenizer(text: str, out: Path) -> None:
    """The run directory's copy of the data's tokenizer (``sample``/``translate --run`` read
    it), written atomically: never half a file."""
    write_text_atomic(out / TOKENIZER, text)


def workload(model_cfg: ModelConfig, tc: TrainConfig, placement: Placement, *,
             log: Any = None) -> Workload:
    """The language model on the data of ``tc.data.data``.

    Raises:
      RunConfigError, transformer_jax.data.DataError, transformer_jax.parallel.BatchSplitError:
        settings or data that cannot train (before anything compiles).
    """
    del log  # nothing to report beyond the loop's start-up line
    data = load_lm_data(tc.data.data, tc.data.val_fraction)
    _check(model_cfg, tc, placement, data)
    _check_run_tokenizer(Path(tc.out), data)
    fns = _functions(model_cfg, tc.step_identity(), tc.data.seq_len, placement)

    def sample(params: Any, step: int, device: Any) -> str:
        return decoding.sample_text(fns.model, params, tc.eval.sample_prompt,
                                    max_new_tokens=tc.eval.sample_tokens, context=tc.data.seq_len,
                                    temperature=tc.eval.sample_temperature, seed=tc.seed,
                                    device=device, tokenizer=data.tokenizer)

    return Workload(
        fns=fns,
        init_state=lambda seed: init_state(fns.model, fns.tx, seed=seed, seq_len=tc.data.seq_len),
        train_batches=lambda step, k, rows=slice(None): batches.train_batches(
            data.train, seed=tc.seed, step=step, num_steps=k, batch_size=tc.data.batch_size,
            seq_len=tc.data.seq_len, rows=rows),
        width=tc.data.seq_len + 1,
        validate=lambda params: validation_loss(
            fns, params, batches.eval_batches(data.val, batch_size=tc.eval.eval_batch_size,
                                              seq_len=tc.data.seq_len), placement),
        tokens_per_step=tc.data.batch_size * tc.data.seq_len,
        architecture=(f"{tc.model}: {model_cfg.num_decoder_layers} layers, d_model "
                      f"{model_cfg.d_model}"),
        description=(f"data {data.name} ({len(data.train):,} train / "
                     f"{len(data.val):,} val {data.unit}s)"),
        unit=data.unit,
        sample=sample if tc.eval.sample_tokens else None,
        bytes_per_target=data.bytes_per_target,
        run_files=(None if data.tokenizer_json is None else
                   functools.partial(keep_tokenizer, data.tokenizer_json)))
