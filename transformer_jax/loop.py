"""The training loop: ``python train.py`` is :func:`run` with flags turned into configs.

The loop trains a :class:`Workload`: the byte-level language model by default, or, with
``TrainConfig.task``, the encoder–decoder on a sequence-to-sequence task
(:func:`transformer_jax.seq2seq.workload`, which also evaluates the test split at the end).

One run directory holds ``config.json``, ``metrics.jsonl``, ``tensorboard/``, ``checkpoints/``,
``samples.txt`` and ``loss.png``. Running again into the same directory resumes from the newest
restorable checkpoint; because the batches of step ``s`` depend only on ``(seed, s)`` and the
step boundaries of every compiled call are absolute multiples (of ``steps_per_call`` and of the
log/eval/checkpoint intervals), a resumed run makes exactly the calls, and reaches exactly the
parameters, of an uninterrupted one.

The host never waits for the device except to read metrics of the previous call (one call
ahead), at log points, and at evaluation/checkpoint points. SIGTERM sets a flag; the loop saves
at the next step boundary and returns normally (``train.py`` then exits 0).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import signal
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from transformer_jax import data, distributed, metrics, parallel, rundir, sharding, training
from transformer_jax.checkpoint import Checkpointer
from transformer_jax.config import ModelConfig, TrainConfig
from transformer_jax.model import count_params
from transformer_jax.rundir import RunConfigError

__all__ = ["NonFiniteError", "RunConfigError", "RunResult", "StepFunctions", "Workload", "run",
           "step_config"]

# Fields of TrainConfig that change the compiled train step (the others are the loop's).
_STEP_FIELDS = ("model", "steps", "grad_accum", "optimizer", "lr", "min_lr_ratio", "schedule",
                "warmup", "b1", "b2", "eps", "weight_decay", "grad_clip", "label_smoothing",
                "steps_per_call", "max_nonfinite", "task")


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or gradients ``max_nonfinite`` times in a row."""


@dataclasses.dataclass
class RunResult:
    """What :func:`run` did.

    Attributes:
      out: the run directory.
      step: the step training stopped at.
      start_step: the step it started (or resumed) from.
      val_loss: the last validation loss (nats per token), or NaN if none ran.
      val_bpb: the same in bits per byte.
      tokens_per_s: median training throughput over this run's log intervals.
      mfu: median model-FLOPs utilisation over the same intervals.
      wall_s: wall time of :func:`run`, compilation included.
      interrupted: stopped early by SIGTERM (or ``stop_at``), checkpoint saved.
      sample: the text generated at the end ("" if none).
      state: the final :class:`~transformer_jax.training.TrainState` (host arrays, unreplicated).
      evaluation: the workload's final evaluation (the last ``metrics.jsonl`` line), or {}.
    """

    out: Path
    step: int
    start_step: int
    val_loss: float
    val_bpb: float
    tokens_per_s: float
    mfu: float
    wall_s: float
    interrupted: bool
    sample: str
    state: Any = dataclasses.field(repr=False, default=None)
    evaluation: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class StepFunctions:
    """A workload's model, optimizer, compiled train step, jitted eval step and its FLOP count."""

    model: Any
    tx: Any
    train: Callable[..., Any]
    evaluate: Callable[..., Any]
    flops_per_token: float
    n_params: int


def step_config(tc: TrainConfig) -> TrainConfig:
    """``tc`` with only the fields that change the compiled step (the cache key of compiles)."""
    return TrainConfig(**{f: getattr(tc, f) for f in _STEP_FIELDS})


@functools.lru_cache(maxsize=8)
def _functions(model_cfg: ModelConfig, step_cfg: TrainConfig, seq_len: int,
               placement: parallel.Placement) -> StepFunctions:
    """Model, optimizer and jitted/pmapped step functions (cached: reruns reuse compilations)."""
    model = training.build_model(step_cfg.model, model_cfg)
    tx = training.make_optimizer(step_cfg, model_cfg.d_model)
    step = functools.partial(
        training.train_steps, apply_fn=model.apply, tx=tx,
        label_smoothing=step_cfg.label_smoothing, grad_accum=step_cfg.grad_accum,
        dropout=model_cfg.dropout_rate > 0)
    abstract_state = jax.eval_shape(
        lambda: training.init_state(model, tx, seed=0, seq_len=seq_len))
    train = placement.compile(step, abstract_state)
    evaluate = jax.jit(functools.partial(training.eval_step, apply_fn=model.apply))
    abstract = abstract_state.params
    flops = training.model_flops_per_token(abstract, model_cfg, seq_len, step_cfg.model)
    n_params = count_params(abstract)
    return StepFunctions(model, tx, train, evaluate, flops, n_params)


@dataclasses.dataclass(frozen=True)
class Workload:
    """What :func:`run` trains: a model with its steps, data and validation.

    Attributes:
      fns: the model, optimizer and compiled steps.
      init_state: seed -> a fresh :class:`~transformer_jax.training.TrainState` (also traced
        with ``jax.eval_shape`` to restore checkpoints).
      train_batches: (step, k, rows=slice(None)) -> [k, b, W] int32: rows ``rows`` of the
        global batches [k, B, W] of steps step … step + k - 1; a pure function of (seed, step).
        (On a multi-host mesh each process asks only for its own devices' rows.)
      width: W, the width of a batch row.
      validate: params -> mean validation loss (nats per target token).
      tokens_per_step: target tokens per optimizer step (the tokens/s numerator).
      description: the data part of the start-up log line.
      unit: what a target token is in log lines ("byte", "token").
      finish: optional (final params, checkpointer, step) -> a metrics record, written as the
        last line of ``metrics.jsonl`` when training completes (the seq2seq test evaluation).
    """

    fns: StepFunctions
    init_state: Callable[[int], Any]
    train_batches: Callable[..., np.ndarray]
    width: int
    validate: Callable[[Any], float]
    tokens_per_step: int
    description: str
    unit: str = "byte"
    finish: Callable[[Any, Checkpointer, int], dict[str, Any]] | None = None


def _lm_workload(model_cfg: ModelConfig, tc: TrainConfig,
                 placement: parallel.Placement) -> Workload:
    """The byte-level language model on the corpus of ``tc.data``."""
    corpus = data.load_corpus(tc.data, tc.val_fraction)
    _check_inputs(model_cfg, tc, placement, corpus)
    fns = _functions(model_cfg, step_config(tc), tc.seq_len, placement)
    return Workload(
        fns=fns,
        init_state=lambda seed: training.init_state(fns.model, fns.tx, seed=seed,
                                                    seq_len=tc.seq_len),
        train_batches=lambda step, k, rows=slice(None): data.train_batches(
            corpus.train, seed=tc.seed, step=step, num_steps=k, batch_size=tc.batch_size,
            seq_len=tc.seq_len, rows=rows),
        width=tc.seq_len + 1,
        validate=lambda params: _validate(fns, params, corpus.val, tc, placement),
        tokens_per_step=tc.batch_size * tc.seq_len,
        description=f"data {corpus.name} ({len(corpus.train):,} train / {len(corpus.val):,} "
                    "val bytes)")


def _check_inputs(model_cfg: ModelConfig, tc: TrainConfig, placement: parallel.Placement,
                  corpus: data.Corpus) -> None:
    if model_cfg.vocab_size != data.ByteTokenizer.vocab_size:
        raise RunConfigError(f"byte-level data needs vocab_size 256, got {model_cfg.vocab_size}")
    if tc.model == "transformer" and tc.seq_len > model_cfg.max_len:
        raise RunConfigError(f"seq_len {tc.seq_len} exceeds the model's max_len "
                             f"{model_cfg.max_len}; lower seq_len or raise max_len")
    parallel.check_batch(tc.batch_size, placement.batch_shards, tc.grad_accum)
    data.check_length(corpus.train, tc.seq_len, "train")
    data.check_length(corpus.val, tc.seq_len, "validation")


def _next_stop(step: int, end: int, tc: TrainConfig) -> int:
    """The next absolute step boundary: a multiple of every interval, or ``end``."""
    every = (tc.steps_per_call, tc.log_every, tc.eval_every, tc.ckpt_every)
    return min([end] + [(step // e + 1) * e for e in every])


def _validate(fns: StepFunctions, params: Any, tokens: np.ndarray, tc: TrainConfig,
              placement: parallel.Placement) -> float:
    """Mean NLL (nats per token) over the whole validation split."""
    total, count = 0.0, 0.0
    sums = [fns.evaluate(params, placement.eval_batch(b)) for b in
            data.eval_batches(tokens, batch_size=tc.eval_batch_size, seq_len=tc.seq_len)]
    for s, c in sharding.to_host(sums):  # gathered on every host of a multi-host mesh
        total, count = total + float(s), count + float(c)
    return total / max(count, 1.0)


class _NoWriter:
    """The metrics writer of processes other than 0: writes nothing."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class _SigtermFlag:
    """Context manager: SIGTERM sets ``self.set`` (main thread only) instead of killing us."""

    def __init__(self):
        self.set = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.set = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def run(model_cfg: ModelConfig, tc: TrainConfig, *, devices: Sequence[Any] | None = None,
        stop_at: int | None = None, progress: bool | None = None,
        log: Callable[[str], None] | None = None) -> RunResult:
    """Train (or resume) a model on ``tc.task``; write everything into ``tc.out``.

    Args:
      model_cfg: the model (for the language model its ``vocab_size`` must be 256: bytes; for a
        seq2seq task, the task's vocabulary size).
      tc: the training settings.
      devices: devices to use (default: all local devices), resolved with ``tc.parallel``.
      stop_at: stop at this step as if SIGTERM had arrived (checkpoint, no final eval/sample).
      progress: show a tqdm bar; ``None``: only when stderr is a terminal.
      log: where messages go (default: ``tqdm.write``, which keeps the bar intact).

    Returns:
      A :class:`RunResult`.

    Raises:
      RunConfigError, data.DataError, parallel.BatchSplitError: bad settings (before training).
      NonFiniteError: ``tc.max_nonfinite`` consecutive non-finite gradients.
    """
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    log = log or tqdm.write
    try:
        placement = parallel.resolve(tc.parallel, devices, tc.mesh)
    except ValueError as e:
        raise RunConfigError(str(e)) from None
    lead = distributed.is_lead()  # in a multi-host run only process 0 writes logs and files
    if not lead:
        log, progress = (lambda message: None), False
    if tc.task == "lm":
        work = _lm_workload(model_cfg, tc, placement)
    else:
        from transformer_jax import seq2seq

        work = seq2seq.workload(model_cfg, tc, placement, log=log)
    fns = work.fns
    out = Path(tc.out)
    if lead:  # refuses another run's or an unwritable directory
        rundir.prepare(out, model_cfg, tc, log)
    # This process's first device (every process's own under a multi-host mesh).
    dev0 = next(d for d in placement.devices if d.process_index == jax.process_index())
    end = min(tc.steps, stop_at) if stop_at is not None else tc.steps
    evaluation: dict[str, Any] = {}

    with Checkpointer(out / "checkpoints", max_to_keep=tc.max_to_keep) as ckpt, \
            _SigtermFlag() as sigterm:
        init = functools.partial(work.init_state, tc.seed)
        fresh = jax.eval_shape(init)
        # Restored straight into this placement's shardings (whatever mesh saved it); a
        # checkpoint copied in from another model is refused by name.
        restored = ckpt.restore(placement.target(fresh), expect={"model": model_cfg.to_dict()})
        if restored is not None:
            state, start = placement.place(restored.state), restored.step
            log(f"resuming {out} from step {start}" if start < tc.steps else
                f"{out} is already trained to step {start} (--steps {tc.steps}): "
                "evaluating and sampling only")
        else:
            state, start = placement.init(init, fresh), 0
        writer = (metrics.MetricsWriter(out, resume_step=start if restored else None) if lead
                  else _NoWriter())
        peak, peak_source = metrics.peak_flops(placement.devices)
        layers = (f"{model_cfg.num_decoder_layers}" if tc.task == "lm" else  # encoder+decoder
                  f"{model_cfg.num_encoder_layers}+{model_cfg.num_decoder_layers}")
        log(f"{tc.model}: {layers} layers, d_model {model_cfg.d_model}, "
            f"{fns.n_params / 1e6:.2f}M params, {fns.flops_per_token / 1e6:.1f} MFLOP/token; "
            f"{placement.kind} on "
            f"{placement.num_devices} {dev0.platform} device(s)"
            f"{'' if placement.mesh is None else f' (mesh {dict(placement.mesh.shape)})'}; "
            f"{work.description}; peak {peak / 1e9:.0f} GFLOP/s ({peak_source})")
        host_state = lambda: placement.to_host(state)
        unrep_params = lambda: placement.params(state)
        schedule = training.make_schedule(tc, model_cfg.d_model)
        meta = lambda step: {"step": step, "model": model_cfg.to_dict(), "train": tc.to_dict()}

        step, val_loss, last_eval = start, math.nan, -1
        interval: list[dict[str, np.ndarray]] = []
        rates: list[float] = []
        pending = None
        n_timed, t_mark, warm = 0, time.perf_counter(), False
        bar = tqdm(total=tc.steps, initial=start, unit="step", dynamic_ncols=True,
                   disable=(None if progress is None else not progress), desc="train")
        postfix: dict[str, str] = {}

        def drain():
            nonlocal pending
            if pending is None:
                return
            host = placement.to_host(pending)
            pending = None
            interval.append(host)
            if int(host["nonfinite"].max()) >= tc.max_nonfinite:
                raise NonFiniteError(
                    f"{tc.max_nonfinite} consecutive steps had non-finite losses or gradients "
                    f"(by step {step}); their updates were skipped and training stopped. Lower "
                    f"--lr, raise --warmup or use --grad-clip; the last good checkpoint is in "
                    f"{out / 'checkpoints'}")
            postfix["loss"] = f"{float(host['loss'][-1]):.4f}"
            bar.set_postfix(postfix, refresh=False)

        try:
            stop_now = False
            while step < end and not stop_now:
                stop = _next_stop(step, end, tc)
                batches = placement.batches(  # each host loads its own rows
                    functools.partial(work.train_batches, step, stop - step),
                    (stop - step, tc.batch_size, work.width))
                state, chunk_metrics = fns.train(state, batches)
                drain()  # the previous call's metrics: the device already has this call queued
                pending = chunk_metrics
                n_timed += stop - step
                bar.update(stop - step)
                step = stop
                if not warm:  # exclude compilation from the throughput
                    drain()
                    n_timed, t_mark, warm = 0, time.perf_counter(), True
                do_eval = step % tc.eval_every == 0 or step == tc.steps
                # With several hosts all stop together if any got SIGTERM (one collective).
                stop_now = distributed.any_process(sigterm.set)
                do_ckpt = step % tc.ckpt_every == 0 or step == end or stop_now
                if step % tc.log_every == 0 or do_eval or do_ckpt:
                    drain()
                    now = time.perf_counter()
                    # None (JSON null) when the interval held only the compiling call.
                    tok_s = (n_timed * work.tokens_per_step / (now - t_mark) if n_timed
                             else None)
                    if tok_s is not None:
                        rates.append(tok_s)
                    losses = np.concatenate([m["loss"] for m in interval])
                    # A step with a non-finite loss or gradient was skipped (apply_if_finite):
                    # count it, and average the loss over the steps that were applied.
                    skipped = int(sum((m["nonfinite"] > 0).sum() for m in interval))
                    finite = losses[np.isfinite(losses)]
                    record = {"step": step,
                              "loss": float(finite.mean()) if finite.size else None,
                              "nonfinite_steps": skipped,
                              "lr": float(schedule(step - 1)), "tokens_per_s": tok_s,
                              "mfu": None if tok_s is None else tok_s * fns.flops_per_token / peak,
                              # wall seconds since this process started (x axis of curves)
                              "time_s": now - t_start}
                    interval.clear()
                    if do_eval:
                        val_loss = work.validate(unrep_params())
                        last_eval = step
                        record.update(val_loss=val_loss, val_bpb=val_loss / math.log(2))
                        log(f"step {step}: val_loss {val_loss:.4f} nats/{work.unit} "
                            f"({val_loss / math.log(2):.3f} bits/{work.unit})")
                    writer.write(record)
                    postfix["tok/s"] = f"{tok_s:,.0f}" if tok_s else "-"
                    bar.set_postfix(postfix, refresh=False)
                    if do_ckpt:
                        ckpt.save(step, placement.saveable(state), meta(step))
                    n_timed, t_mark = 0, time.perf_counter()
            drain()
            interrupted = step < tc.steps
            if interrupted:
                ckpt.save(step, placement.saveable(state), meta(step))
                log(f"stopped at step {step}; checkpoint saved in {out.resolve()}/checkpoints; "
                    "run the same command to resume")
            elif last_eval != step:  # finished earlier: evaluate the restored state once
                val_loss = work.validate(unrep_params())
                log(f"step {step}: val_loss {val_loss:.4f} nats/{work.unit}")
            if not interrupted and work.finish is not None:
                evaluation = work.finish(sharding.to_host(unrep_params()), ckpt, step)
                writer.write({"step": step, **evaluation})
        finally:
            bar.close()
            writer.close()
        final = host_state()

    sample = ""
    if not lead:  # logs, samples and plots are process 0's
        return RunResult(out=out, step=step, start_step=start, val_loss=val_loss,
                         val_bpb=val_loss / math.log(2), tokens_per_s=math.nan, mfu=math.nan,
                         wall_s=time.perf_counter() - t_start, interrupted=interrupted,
                         sample="", state=final, evaluation=evaluation)
    if not interrupted and tc.sample_tokens and tc.task == "lm":
        from transformer_jax import sample as sampling

        sample = sampling.sample_text(fns.model, final.params, tc.sample_prompt,
                                      max_new_tokens=tc.sample_tokens, context=tc.seq_len,
                                      temperature=tc.sample_temperature, seed=tc.seed,
                                      device=dev0)
        with open(out / "samples.txt", "a") as f:
            f.write(f"--- step {step}, temperature {tc.sample_temperature}, prompt "
                    f"{tc.sample_prompt!r}\n{sample}\n\n")
    metrics.plot_loss(metrics.read_jsonl(out / "metrics.jsonl"), out / "loss.png",
                      title=f"{out.name}: {tc.model}, {model_cfg.num_decoder_layers}×"
                            f"{model_cfg.d_model}")
    tok_s = statistics.median(rates) if rates else math.nan
    return RunResult(out=out, step=step, start_step=start, val_loss=val_loss,
                     val_bpb=val_loss / math.log(2), tokens_per_s=tok_s,
                     mfu=tok_s * fns.flops_per_token / peak, wall_s=time.perf_counter() - t_start,
                     interrupted=interrupted, sample=sample, state=final, evaluation=evaluation)
