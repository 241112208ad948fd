"""The training loop: ``python train.py`` is :func:`run` with flags turned into configs.

:func:`run` builds the :class:`~transformer_jax.train.workload.Workload` of
``TrainConfig.task`` (:mod:`transformer_jax.train.tasks`) and hands it to :func:`train`, the
generic loop, which knows nothing of the task.

One run directory holds ``config.json``, ``metrics.jsonl``, ``tensorboard/``, ``checkpoints/``,
``samples.txt`` and ``loss.png``. Running again into the same directory resumes from the newest
restorable checkpoint; because the batches of step ``s`` depend only on ``(seed, s)`` and the
step boundaries of every compiled call are absolute multiples (of ``steps_per_call`` and of the
log/eval/checkpoint intervals), a resumed run makes exactly the calls, and reaches exactly the
parameters, of an uninterrupted one.

The host never waits for the device except to read metrics of the previous call (one call
ahead), at log points, and at evaluation/checkpoint points. SIGTERM and a first Ctrl-C (SIGINT)
set a flag; the loop saves at the next step boundary and returns normally (``train.py`` then
exits 0 after SIGTERM, 130 after Ctrl-C). A second Ctrl-C goes to the SIGINT handler installed
before the loop: the command line's ends the process at once without saving.

Process 0 holds the run directory's lock (:mod:`transformer_jax.runs.lock`) from before the
workload is built until everything is written: a second run into the same directory stops at
once. A checkpoint or ``metrics.jsonl`` that cannot be written ends the run with
:class:`~transformer_jax.runs.rundir.OutputError`; ``samples.txt`` and ``loss.png`` (and
TensorBoard events) that cannot be written are a warning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import signal
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from transformer_jax.config import ModelConfig, TrainConfig
from transformer_jax.parallel import Placement, distributed, resolve, sharding
from transformer_jax.runs import lock, metrics, rundir
from transformer_jax.runs.checkpoint import Checkpointer
from transformer_jax.runs.identity import checkpoint_expectation
from transformer_jax.runs.rundir import OutputError, RunConfigError
from transformer_jax.train.optim import make_schedule
from transformer_jax.train.tasks import build_workload
from transformer_jax.train.workload import Workload

__all__ = ["NonFiniteError", "OutputError", "RunConfigError", "RunResult", "run", "train"]


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or gradients ``max_nonfinite`` times in a row."""


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
      mfu: median model-FLOPs utilisation over the same intervals.
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


def run(model_cfg: ModelConfig, tc: TrainConfig, *, devices: Sequence[Any] | None = None,
        stop_at: int | None = None, progress: bool | None = None,
        log: Callable[[str], None] | None = None, accept_changes: bool = False) -> RunResult:
    """Train (or resume) a model on ``tc.task``; write everything into ``tc.out``.

    Args:
      model_cfg: the model (for the language model its ``vocab_size`` must be 256: bytes; for a
        seq2seq task, the task's vocabulary size).
      tc: the training settings.
      devices: devices to use (default: all local devices), resolved with ``tc.loop.parallel``.
      stop_at: stop at this step as if SIGTERM had arrived (checkpoint, no final eval/sample).
      progress: show a tqdm bar; ``None``: only when stderr is a terminal.
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
    if not distributed.is_lead():  # in a multi-host run only process 0 writes logs and files
        log, progress = (lambda message: None), False
    log = log or tqdm.write
    with _lead_lock(Path(tc.out)):  # before the data is read: a second run stops at once
        work = build_workload(model_cfg, tc, placement, log=log)
        return train(work, model_cfg, tc, placement, stop_at=stop_at, progress=progress,
                     log=log, t_start=t_start, accept_changes=accept_changes)


def train(work: Workload, model_cfg: ModelConfig, tc: TrainConfig, placement: Placement, *,
          stop_at: int | None = None, progress: bool | None = None,
          log: Callable[[str], None] = print, t_start: float | None = None,
          accept_changes: bool = False) -> RunResult:
    """The generic loop: train ``work`` on ``placement`` into ``tc.out`` (see :func:`run`)."""
    with _lead_lock(Path(tc.out)):
        return _train(work, model_cfg, tc, placement, stop_at=stop_at, progress=progress,
                      log=log, t_start=t_start, accept_changes=accept_changes)


def _lead_lock(out: Path) -> contextlib.AbstractContextManager:
    """The run directory's lock, held by process 0 only (the one that writes its files); when
    it is refused, every process raises its error (instead of waiting for process 0)."""
    return lock.hold_lead(out)


def _train(work: Workload, model_cfg: ModelConfig, tc: TrainConfig, placement: Placement, *,
           stop_at: int | None, progress: bool | None, log: Callable[[str], None],
           t_start: float | None, accept_changes: bool) -> RunResult:
    """:func:`train`, with the run directory locked."""
    t_start = time.perf_counter() if t_start is None else t_start
    out, lead = Path(tc.out), distributed.is_lead()
    changed = False
    if lead:  # refuses another run's or an unwritable directory
        changed = rundir.prepare(out, model_cfg, tc, log, accept_changes=accept_changes)
        if work.run_files is not None:
            work.run_files(out)
    end = min(tc.schedule.steps, stop_at) if stop_at is not None else tc.schedule.steps
    with Checkpointer(out / "checkpoints", max_to_keep=tc.loop.max_to_keep,
                      cleanup_tmp=True) as ckpt, _StopSignals() as signals:
        state, start = _restore_or_init(ckpt, work, model_cfg, tc, placement, out, log)
        if changed and start < end:  # only a run that trains it again rewrites its config
            rundir.update_config(out, model_cfg, tc)
        session = _Session(work, model_cfg, tc, placement, ckpt, out, lead, log, start,
                           progress, t_start)
        try:
            state, step = session.train(state, start, end, signals)
            interrupted = step < tc.schedule.steps
            evaluation = session.finish(state, step, interrupted)
        finally:
            session.close()
        final = placement.to_host(state)
    sample = ""
    if lead and not interrupted:
        sample = _write_sample(work, final.params, step, out, tc, placement)
    if lead:
        try:
            metrics.plot_loss(metrics.read_jsonl(out / "metrics.jsonl"), out / "loss.png",
                              title=f"{out.name}: {tc.model}, {model_cfg.num_decoder_layers}×"
                                    f"{model_cfg.d_model}")
        except OSError as e:
            _not_written(out / "loss.png", e, "metrics.jsonl has the same numbers")
    tok_s = statistics.median(session.rates) if lead and session.rates else math.nan
    return RunResult(out=out, step=step, start_step=start, val_loss=session.val_loss,
                     val_bpb=work.bits(session.val_loss)[0], tokens_per_s=tok_s,
                     mfu=tok_s * work.fns.flops_per_token / session.peak,
                     wall_s=time.perf_counter() - t_start, interrupted=interrupted,
                     sample=sample, state=final, evaluation=evaluation,
                     stopped_by=signals.by if interrupted else None, unit=work.unit,
                     bits_per=work.bits(session.val_loss)[1])


def _restore_or_init(ckpt: Checkpointer, work: Workload, model_cfg: ModelConfig,
                     tc: TrainConfig, placement: Placement, out: Path,
                     log: Callable[[str], None]) -> tuple[Any, int]:
    """(state, step): the newest restorable checkpoint, placed, or a fresh state at step 0."""
    init = functools.partial(work.init_state, tc.seed)
    fresh = jax.eval_shape(init)
    # Restored straight into this placement's shardings (whatever mesh saved it); a checkpoint
    # copied in from another model is refused by name.
    restored = ckpt.restore(placement.target(fresh), **checkpoint_expectation(model_cfg))
    if restored is None:
        return placement.init(init, fresh), 0
    start = restored.step
    log(f"resuming {out} from step {start}" if start < tc.schedule.steps else
        f"{out} is already trained to step {start} (--steps {tc.schedule.steps}): evaluating and "
        "sampling only")
    return placement.place(restored.state), start


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


def _next_stop(step: int, end: int, tc: TrainConfig) -> int:
    """The next absolute step boundary: a multiple of every interval, or ``end``."""
    every = (tc.optim.steps_per_call, tc.loop.log_every, tc.loop.eval_every, tc.loop.ckpt_every)
    return min([end] + [(step // e + 1) * e for e in every])


class _Session:
    """One call of :func:`train`: the progress bar, metrics writer and throughput clock."""

    def __init__(self, work: Workload, model_cfg: ModelConfig, tc: TrainConfig,
                 placement: Placement, ckpt: Checkpointer, out: Path, lead: bool,
                 log: Callable[[str], None], start: int, progress: bool | None,
                 t_start: float):
        self.work, self.tc, self.placement, self.ckpt, self.out = work, tc, placement, ckpt, out
        self.model_cfg, self.log, self.t_start = model_cfg, log, t_start
        self.writer = (metrics.MetricsWriter(out, resume_step=start if start else None) if lead
                       else _NoWriter())
        self.peak, peak_source = metrics.peak_flops(placement.devices)
        self.schedule = make_schedule(tc, model_cfg.d_model)
        self.val_loss, self.last_eval = math.nan, -1
        self.paused = 0.0  # wall seconds spent validating and checkpointing so far
        self.rates: list[float] = []
        self.interval: list[dict[str, np.ndarray]] = []
        self.pending = None
        self.bar = tqdm(total=tc.schedule.steps, initial=start, unit="step", dynamic_ncols=True,
                        disable=(None if progress is None else not progress), desc="train")
        self.postfix: dict[str, str] = {}
        fns, dev0 = work.fns, placement.devices[0]
        mesh = "" if placement.mesh is None else f" (mesh {dict(placement.mesh.shape)})"
        log(f"{work.architecture}, {fns.n_params / 1e6:.2f}M params, "
            f"{fns.flops_per_token / 1e6:.1f} MFLOP/token; {placement.kind} on "
            f"{placement.num_devices} {dev0.platform} device(s){mesh}; {work.description}; "
            f"peak {self.peak / 1e9:.0f} GFLOP/s ({peak_source})")

    def train(self, state: Any, step: int, end: int,
              signals: _StopSignals) -> tuple[Any, int]:
        """Run compiled calls up to ``end`` (or a stop signal); returns (state, step)."""
        tc, work = self.tc, self.work
        n_timed, t_mark, warm, stop_now = 0, time.perf_counter(), False, False
        while step < end and not stop_now:
            stop = _next_stop(step, end, tc)
            batches = self.placement.batches(  # each host loads its own rows
                functools.partial(work.train_batches, step, stop - step),
                (stop - step, tc.data.batch_size, work.width))
            state, chunk_metrics = work.fns.train(state, batches)
            self._drain(step)  # the previous call's metrics: the device has this call queued
            self.pending = chunk_metrics
            n_timed += stop - step
            self.bar.update(stop - step)
            step = stop
            if not warm:  # exclude compilation from the throughput
                self._drain(step)
                n_timed, t_mark, warm = 0, time.perf_counter(), True
            do_eval = step % tc.loop.eval_every == 0 or step == tc.schedule.steps
            # With several hosts all stop together if any got a signal (one collective).
            stop_now = distributed.any_process(signals.set)
            do_ckpt = step % tc.loop.ckpt_every == 0 or step == end or stop_now
            if step % tc.loop.log_every == 0 or do_eval or do_ckpt:
                self._drain(step)
                now = time.perf_counter()
                # None (JSON null) when the interval held only the compiling call.
                tok_s = n_timed * work.tokens_per_step / (now - t_mark) if n_timed else None
                self._log_interval(state, step, tok_s, now, do_eval)
                if do_ckpt:
                    self._save(step, state)
                n_timed, t_mark = 0, time.perf_counter()
        self._drain(step)
        return state, step

    def _drain(self, step: int) -> None:
        """Fetch the metrics of the call in flight; stop on too many non-finite steps."""
        if self.pending is None:
            return
        host = self.placement.to_host(self.pending)
        self.pending = None
        self.interval.append(host)
        limit = self.tc.optim.max_nonfinite
        if int(host["nonfinite"].max()) >= limit:
            raise NonFiniteError(
                f"{limit} consecutive steps had non-finite losses or gradients (by step {step}); "
                "their updates were skipped and training stopped. Lower --lr, raise --warmup or "
                f"use --grad-clip; the last good checkpoint is in {self.out / 'checkpoints'}")
        self.postfix["loss"] = f"{float(host['loss'][-1]):.4f}"
        self.bar.set_postfix(self.postfix, refresh=False)

    def _log_interval(self, state: Any, step: int, tok_s: float | None, now: float,
                      do_eval: bool) -> None:
        """One ``metrics.jsonl`` line for the steps since the last one (and validation)."""
        if tok_s is not None:
            self.rates.append(tok_s)
        losses = np.concatenate([m["loss"] for m in self.interval])
        # A step with a non-finite loss or gradient was skipped (apply_if_finite): count it,
        # and average the loss over the steps that were applied.
        skipped = int(sum((m["nonfinite"] > 0).sum() for m in self.interval))
        finite = losses[np.isfinite(losses)]
        record = {"step": step, "loss": float(finite.mean()) if finite.size else None,
                  "nonfinite_steps": skipped, "lr": float(self.schedule(step - 1)),
                  "tokens_per_s": tok_s,
                  "mfu": None if tok_s is None else tok_s * self.work.fns.flops_per_token
                  / self.peak,
                  "time_s": now - self.t_start,  # wall seconds since start: curves' x axis
                  # ... less validation and checkpoints: comparable across eval intervals
                  "train_s": now - self.t_start - self.paused}
        self.interval.clear()
        if do_eval:
            self._validate(state, step)
            record.update(val_loss=self.val_loss, val_bpb=self.work.bits(self.val_loss)[0])
        self.writer.write(record)
        self.postfix["tok/s"] = f"{tok_s:,.0f}" if tok_s else "-"
        self.bar.set_postfix(self.postfix, refresh=False)

    def _validate(self, state: Any, step: int) -> None:
        t0 = time.perf_counter()
        self.val_loss, self.last_eval = self.work.validate(self.placement.params(state)), step
        self.paused += time.perf_counter() - t0
        bits, per = self.work.bits(self.val_loss)
        self.log(f"step {step}: val_loss {self.val_loss:.4f} nats/{self.work.unit} "
                 f"({bits:.3f} bits/{per})")

    def _save(self, step: int, state: Any) -> None:
        t0 = time.perf_counter()
        meta = {"step": step, "model": self.model_cfg.to_dict(), "train": self.tc.to_dict()}
        self.ckpt.save(step, self.placement.saveable(state), meta)
        self.paused += time.perf_counter() - t0

    def finish(self, state: Any, step: int, interrupted: bool) -> dict[str, Any]:
        """Save an interrupted run; evaluate a finished one. Returns the final evaluation."""
        if interrupted:
            self._save(step, state)
            self.log(f"stopped at step {step}; checkpoint saved in {self.out.resolve()}/"
                     "checkpoints; run the same command to resume")
            return {}
        if self.last_eval != step:  # finished earlier: evaluate the restored state once
            self._validate(state, step)
        if self.work.finish is None:
            return {}
        params = sharding.to_host(self.placement.params(state))
        evaluation = self.work.finish(params, self.ckpt, step)
        self.writer.write({"step": step, **evaluation})
        return evaluation

    def close(self) -> None:
        self.bar.close()
        self.writer.close()


class _NoWriter:
    """The metrics writer of processes other than 0: writes nothing."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class _StopSignals:
    """Context manager: SIGTERM and a first Ctrl-C (SIGINT) set ``self.set`` instead of killing
    the process; the loop then saves at the next step boundary. ``self.by`` names the first.

    A second Ctrl-C is handed to the SIGINT handler that was installed before: the command
    line's ends the process at once (the checkpoints saved so far are complete; a save in flight
    is a temporary folder that the next run removes); Python's default raises
    ``KeyboardInterrupt``. Installed on the main thread only; an ignored SIGINT (a background
    job of a shell) stays ignored.
    """

    def __init__(self):
        self.set, self.by, self._ctrl_c = False, None, 0
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)
            if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
                self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            self._ctrl_c += 1
            if self._ctrl_c > 1:
                previous = self._previous[signal.SIGINT]
                if callable(previous):
                    previous(signum, frame)
                raise KeyboardInterrupt
            # Written straight to the file descriptor: a signal handler may interrupt a print.
            with contextlib.suppress(OSError, ValueError, AttributeError):
                os.write(sys.stderr.fileno(), b"Ctrl-C: saving a checkpoint after the step in "
                         b"progress; press Ctrl-C again to stop at once without saving\n")
        self.set = True
        self.by = self.by or signal.Signals(signum).name

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            if previous is not None:  # None: a handler not installed from Python
                signal.signal(signum, previous)
