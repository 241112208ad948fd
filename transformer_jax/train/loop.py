"""The training loop: ``python train.py`` is :func:`run` with flags turned into configs.

:func:`run` builds the :class:`~transformer_jax.train.workload.Workload` of
``TrainConfig.task`` (:mod:`transformer_jax.train.tasks`), or takes one, and trains it; the loop
knows nothing of the task. Its parts: :class:`~transformer_jax.train.logger.MetricsLog`
(``metrics.jsonl``, progress, MFU), :class:`~transformer_jax.train.evaluator.Evaluator`
(validation) and :class:`~transformer_jax.train.saver.Saver` (checkpoints).

One run directory holds ``config.json``, ``metrics.jsonl``, ``tensorboard/``, ``checkpoints/``,
``samples.txt`` and ``loss.png``. Running again into the same directory resumes from the newest
restorable checkpoint; because the batches of step ``s`` depend only on ``(seed, s)`` and the
step boundaries of every compiled call are absolute multiples (of ``steps_per_call`` and of the
log/eval/checkpoint intervals), a resumed run makes exactly the calls, and reaches exactly the
parameters, of an uninterrupted one; its ``metrics.jsonl`` holds the same lines, with the same
numbers apart from times, throughput and MFU (:mod:`transformer_jax.train.logger`).

The host never waits for the device except to read metrics of the previous call (one call
ahead), at log points, and at evaluation/checkpoint points. SIGTERM and a first Ctrl-C (SIGINT)
set a flag (:class:`~transformer_jax.runs.signals.StopSignals`); the loop saves at the next step
boundary and returns normally (``train.py`` then exits 0 after SIGTERM, 130 after Ctrl-C). A
second Ctrl-C goes to the SIGINT handler installed before the loop: the command line's ends the
process at once without saving.

Process 0 holds the run directory's lock (:mod:`transformer_jax.runs.lock`) from before the
workload is built until everything is written: a second run into the same directory stops at
once. A checkpoint or ``metrics.jsonl`` that cannot be written ends the run with
:class:`~transformer_jax.runs.rundir.OutputError`; ``samples.txt`` and ``loss.png`` (and
TensorBoard events) that cannot be written are a warning.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from transformer_jax.config import ModelConfig, TrainConfig
from transformer_jax.parallel import Placement, distributed, resolve
from transformer_jax.runs import lock, metrics, rundir, signals
from transformer_jax.runs.checkpoint import Checkpointer
from transformer_jax.runs.identity import checkpoint_expectation
from transformer_jax.runs.rundir import OutputError, RunConfigError
from transformer_jax.train.evaluator import Evaluator
from transformer_jax.train.logger import Clock, MetricsLog, NonFiniteError
from transformer_jax.train.saver import LOG_INTERVAL, Saver
from transformer_jax.train.tasks import build_workload
from transformer_jax.train.workload import Workload

__all__ = ["NonFiniteError", "OutputError", "RunConfigError", "RunResult", "run"]


@dataclasses.dataclass
class RunResult:
    """What :func:`run` did.

    Attributes:
      out: the run directory.
      step: the step training stopped at.
      start_step: the step it started (or resumed) from.
      val_loss: the last validation loss (nats per :attr:`unit`), or NaN if none ran.
      val_bpb: the same in bits per :attr:`bits_per`.
      tokens_per_s: median training throughput over this run's log intervals.
      mfu: model-FLOPs utilisation at that throughput; NaN when unknown (:attr:`mfu_note`).
      wall_s: wall time of :func:`run`, compilation included.
      interrupted: stopped early by SIGTERM, Ctrl-C (or ``stop_at``), checkpoint saved.
      sample: the text generated at the end ("" if none).
      state: the final :class:`~transformer_jax.train.step.TrainState` (host arrays,
        unreplicated).
      evaluation: the workload's final evaluation (the last ``metrics.jsonl`` line), or {}.
      stopped_by: the signal that stopped the run ("SIGTERM" or "SIGINT"), or ``None``.
      unit: what ``val_loss`` is per ("byte", "token").
      bits_per: what ``val_bpb`` is per: "byte" of text for any language model, else
        :attr:`unit`.
      mfu_note: why :attr:`mfu` is NaN although the run was timed ("" otherwise): the
        measured peak lay below what the model achieved.
      n_params: the model's parameter count.
      flops_per_token: training FLOPs per token (the :attr:`mfu` numerator's estimate).
      tokens_per_step: tokens (targets, for a sequence-to-sequence task) a step trains on,
        over an epoch's batches; ``step · tokens_per_step · flops_per_token`` is the
        training compute so far.
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
    stopped_by: str | None = None
    unit: str = "byte"
    bits_per: str = "byte"
    mfu_note: str = ""
    n_params: int = 0
    flops_per_token: float = math.nan
    tokens_per_step: float = math.nan


def run(model_cfg: ModelConfig, tc: TrainConfig, *, devices: Sequence[Any] | None = None,
        workload: Workload | None = None, stop_at: int | None = None,
        progress: bool | None = None, log: Callable[[str], None] | None = None,
        accept_changes: bool = False) -> RunResult:
    """Train (or resume) a model on ``tc.task``; write everything into ``tc.out``.

    Args:
      model_cfg: the model (for the language model its ``vocab_size`` must be 256: bytes; for a
        seq2seq task, the task's vocabulary size).
      tc: the training settings.
      devices: devices to use (default: all local devices), resolved with ``tc.loop.parallel``.
      workload: what to train, built for the placement that ``devices`` and ``tc.loop``
        resolve to (default: :func:`~transformer_jax.train.tasks.build_workload` of
        ``tc.task``).
      stop_at: stop at this step as if SIGTERM had arrived (checkpoint, no final eval/sample).
      progress: show a tqdm bar; ``None``: only when stderr is a terminal. Without a bar, or
        with stdout not a terminal, a plain progress line every ``tc.loop.log_every`` steps.
      log: where messages go (default: ``tqdm.write``, which keeps the bar intact).
      accept_changes: resume a run in ``tc.out`` whose training settings differ in more than
        :data:`~transformer_jax.runs.identity.FREE_ON_RESUME` (refused otherwise).

    Returns:
      A :class:`RunResult`.

    Raises:
      RunConfigError, transformer_jax.data.DataError, transformer_jax.parallel.BatchSplitError:
        bad settings (before training).
      transformer_jax.runs.lock.RunLocked: another run holds ``tc.out`` (a RunConfigError).
      NonFiniteError: ``tc.optim.max_nonfinite`` consecutive non-finite gradients.
      OutputError: a checkpoint or ``metrics.jsonl`` could not be written.
    """
    t_start = time.perf_counter()
    try:
        placement = resolve(tc.loop.parallel, devices, tc.loop.mesh)
    except ValueError as e:
        raise RunConfigError(str(e)) from None
    lead = distributed.is_lead()
    if not lead:  # in a multi-host run only process 0 writes logs and files
        log, progress = (lambda message: None), False
    log = log or tqdm.write
    out = Path(tc.out)
    # Process 0 claims the directory before the data is read: a second run stops at once.
    with lock.hold_lead(out):
        work = (workload if workload is not None
                else build_workload(model_cfg, tc, placement, log=log))
        changed = False
        if lead:  # refuses another run's or an unwritable directory
            changed = rundir.prepare(out, model_cfg, tc, log, accept_changes=accept_changes)
            if work.run_files is not None:
                work.run_files(out)
        result = _session(work, model_cfg, tc, placement, Clock(t_start), changed=changed,
                          stop_at=stop_at, progress=progress, log=log)
        if lead:
            result.sample = "" if result.interrupted else _write_sample(
                work, result.state.params, result.step, out, tc, placement)
            _plot(out, model_cfg, tc)
    result.wall_s = time.perf_counter() - t_start
    return result


def _session(work: Workload, model_cfg: ModelConfig, tc: TrainConfig, placement: Placement,
             clock: Clock, *, changed: bool, stop_at: int | None, progress: bool | None,
             log: Callable[[str], None]) -> RunResult:
    """Restore or start, train, then save (interrupted) or evaluate (finished)."""
    out, lead = Path(tc.out), distributed.is_lead()
    end = min(tc.schedule.steps, stop_at) if stop_at is not None else tc.schedule.steps
    with Checkpointer(out / "checkpoints", max_to_keep=tc.loop.max_to_keep,
                      cleanup_tmp=True) as ckpt, signals.StopSignals() as stop:
        state, start, carried = _restore_or_init(ckpt, work, model_cfg, tc, placement, log)
        if changed and start < end:  # only a run that trains it again rewrites its config
            rundir.update_config(out, model_cfg, tc)
        writer = (metrics.MetricsWriter(out, resume_step=start or None,
                                        keep_resume_line=_logs_at(start, tc)) if lead else None)
        logger = MetricsLog(work, tc, placement, writer, log, start, progress, clock, carried,
                            model_cfg.d_model)
        _announce(work, placement, logger.util, log)
        evaluator = Evaluator(work, placement, log, clock)
        saver = Saver(ckpt, placement, model_cfg, tc, clock)
        try:
            state, step = _train(work, tc, placement, state, start, end, stop, logger,
                                 evaluator, saver)
            interrupted = step < tc.schedule.steps
            if interrupted:
                saver.save(step, state, logger.carried())  # already saved unless nothing ran
                log(f"stopped at step {step}; checkpoint saved in {out.resolve()}/checkpoints; "
                    "run the same command to resume")
                evaluation = {}
            else:
                evaluation = evaluator.final(state, step, ckpt)
                if work.finish is not None:
                    logger.write({"step": step, **evaluation})
        finally:
            logger.close()
        final = placement.to_host(state)
    tok_s = float(np.median(logger.rates)) if lead and logger.rates else math.nan
    mfu, mfu_note = logger.mfu() if lead else (math.nan, "")
    bits, bits_per = work.bits(evaluator.val_loss)
    return RunResult(out=out, step=step, start_step=start, val_loss=evaluator.val_loss,
                     val_bpb=bits, tokens_per_s=tok_s, mfu=mfu, wall_s=math.nan,
                     interrupted=interrupted, sample="", state=final, evaluation=evaluation,
                     stopped_by=stop.by if interrupted else None, unit=work.unit,
                     bits_per=bits_per, mfu_note=mfu_note, n_params=work.fns.n_params,
                     flops_per_token=work.fns.flops_per_token,
                     tokens_per_step=work.tokens_per_step)


def _announce(work: Workload, placement: Placement, util: metrics.Utilisation,
              log: Callable[[str], None]) -> None:
    """The start-up line: the model, its FLOPs, where it runs, the data, the peak FLOP/s."""
    fns, dev0 = work.fns, placement.devices[0]
    mesh = "" if placement.mesh is None else f" (mesh {dict(placement.mesh.shape)})"
    log(f"{work.architecture}, {fns.n_params / 1e6:.2f}M params, "
        f"{fns.flops_per_token / 1e6:.1f} MFLOP/token; {placement.kind} on "
        f"{placement.num_devices} {dev0.platform} device(s){mesh}; {work.description}; "
        f"peak {util.peak / 1e9:.0f} GFLOP/s ({util.source})")


def _restore_or_init(ckpt: Checkpointer, work: Workload, model_cfg: ModelConfig,
                     tc: TrainConfig, placement: Placement,
                     log: Callable[[str], None]) -> tuple[Any, int, dict[str, Any] | None]:
    """(state, step, carried log interval): the newest restorable checkpoint, placed, or a
    fresh state at step 0."""
    init = functools.partial(work.init_state, tc.seed)
    fresh = jax.eval_shape(init)
    # Restored straight into this placement's shardings (whatever mesh saved it); a checkpoint
    # copied in from another model is refused by name.
    restored = ckpt.restore(placement.target(fresh), **checkpoint_expectation(model_cfg))
    if restored is None:
        return placement.init(init, fresh), 0, None
    start = restored.step
    log(f"resuming {tc.out} from step {start}" if start < tc.schedule.steps else
        f"{tc.out} is already trained to step {start} (--steps {tc.schedule.steps}): "
        "evaluating and sampling only")
    return placement.place(restored.state), start, restored.meta.get(LOG_INTERVAL)


def _logs_at(step: int, tc: TrainConfig) -> bool:
    """Whether a run writes a ``metrics.jsonl`` line at ``step``: every log, evaluation and
    checkpoint interval, and the last step. (A stop between these writes none: the checkpoint
    carries the unfinished interval instead.)"""
    every = (tc.loop.log_every, tc.loop.eval_every, tc.loop.ckpt_every)
    return step == tc.schedule.steps or any(step % e == 0 for e in every)


def _next_stop(step: int, end: int, tc: TrainConfig) -> int:
    """The next absolute step boundary: a multiple of every interval, or ``end``."""
    every = (tc.optim.steps_per_call, tc.loop.log_every, tc.loop.eval_every, tc.loop.ckpt_every)
    return min([end] + [(step // e + 1) * e for e in every])


def _train(work: Workload, tc: TrainConfig, placement: Placement, state: Any, step: int,
           end: int, stop: signals.StopSignals, logger: MetricsLog, evaluator: Evaluator,
           saver: Saver) -> tuple[Any, int]:
    """Run compiled calls from ``step`` up to ``end`` (or a stop signal); returns (state, step)."""
    n_timed, t_mark, warm, stop_now = 0, time.perf_counter(), False, False
    while step < end and not stop_now:
        k = _next_stop(step, end, tc) - step
        shape = (work.batch_shape(step, k) if work.batch_shape is not None
                 else (k, tc.data.batch_size, work.width))
        batches = placement.batches(  # each host loads its own rows
            functools.partial(work.train_batches, step, k), shape)
        state, call_metrics = work.fns.train(state, batches)
        logger.queue(call_metrics, step, k)
        n_timed, step = n_timed + k, step + k
        if not warm:  # exclude compilation from the throughput
            logger.drain(step)
            n_timed, t_mark, warm = 0, time.perf_counter(), True
        # With several hosts all stop together if any got a signal (one collective).
        stop_now = distributed.any_process(stop.set)
        logs = _logs_at(step, tc)
        if logs or step == end or stop_now:
            logger.drain(step)
            now = time.perf_counter()
            if logs:
                # None (JSON null) when the interval held only the compiling call.
                tok_s = n_timed * work.tokens_per_step / (now - t_mark) if n_timed else None
                record = logger.record(step, tok_s, now)
                if step % tc.loop.eval_every == 0 or step == tc.schedule.steps:
                    record.update(evaluator.validate(state, step))
                logger.write(record)
            if step % tc.loop.ckpt_every == 0 or step == end or stop_now:
                saver.save(step, state, logger.carried())
            n_timed, t_mark = 0, time.perf_counter()
    logger.drain(step)
    return state, step


def _write_sample(work: Workload, params: Any, step: int, out: Path, tc: TrainConfig,
                  placement: Placement) -> str:
    """The workload's end-of-run sample, appended to ``samples.txt`` ("" if it has none)."""
    if work.sample is None:
        return ""
    device = placement.local_device
    text = work.sample(params, step, device)
    try:
        with open(out / "samples.txt", "a") as f:
            f.write(f"--- step {step}, temperature {tc.eval.sample_temperature}, prompt "
                    f"{tc.eval.sample_prompt!r}\n{text}\n\n")
    except OSError as e:
        _not_written(out / "samples.txt", e, "the sample is printed only")
    return text


def _not_written(path: Path, error: OSError, consequence: str) -> None:
    """One warning for an output that is not worth ending a trained run for."""
    warnings.warn(f"cannot write {path} ({rundir.why_not_written(error)[0]}); {consequence}",
                  RuntimeWarning, stacklevel=2)


def _plot(out: Path, model_cfg: ModelConfig, tc: TrainConfig) -> None:
    """``loss.png`` from ``metrics.jsonl`` (a warning if it cannot be written)."""
    try:
        metrics.plot_loss(metrics.read_jsonl(out / "metrics.jsonl"), out / "loss.png",
                          title=f"{out.name}: {tc.model}, {model_cfg.num_decoder_layers}×"
                                f"{model_cfg.d_model}")
    except OSError as e:
        _not_written(out / "loss.png", e, "metrics.jsonl has the same numbers")
