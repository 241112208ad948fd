"""What a training run reports while it trains: ``metrics.jsonl`` lines and progress.

:class:`MetricsLog` gathers the per-step metrics of the compiled calls (fetched one call behind,
so the host never waits for the device except at log points), and writes one
``metrics.jsonl`` line per log point with the interval's mean loss, the learning rate,
tokens/s and MFU (:class:`~transformer_jax.runs.metrics.Utilisation`). On a terminal a tqdm bar
shows the progress; without one, or with stdout piped or written to a file, a plain line every
``log_every`` steps: step, loss, tokens/s and the time left.

A run interrupted between two log points writes no line for its last steps: their per-step
losses go into the checkpoint's metadata (:meth:`MetricsLog.carried`), and the resumed run
starts its first interval with them (``carried=``), so its next line averages the same steps
as an uninterrupted run's and ``metrics.jsonl`` reads the same, times aside.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from transformer_jax.config import TrainConfig
from transformer_jax.parallel import Placement
from transformer_jax.runs import metrics
from transformer_jax.train.optim import make_schedule
from transformer_jax.train.workload import Workload

__all__ = ["Clock", "MetricsLog", "NonFiniteError", "progress_modes"]


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or gradients ``max_nonfinite`` times in a row."""


class Clock:
    """Wall seconds since the run started, and how many of them went to validation and saves.

    Args:
      t_start: ``time.perf_counter()`` when the run started.
    """

    def __init__(self, t_start: float):
        self.t_start, self.paused = t_start, 0.0

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        """Count the time inside the ``with`` as not training."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.paused += time.perf_counter() - t0

    def times(self, now: float) -> dict[str, float]:
        """``time_s`` (the curves' x axis) and ``train_s`` (the same less validation and
        checkpoints: comparable across evaluation intervals) at ``now``."""
        return {"time_s": now - self.t_start, "train_s": now - self.t_start - self.paused}


def _is_terminal(stream: Any) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


def progress_modes(progress: bool | None) -> tuple[bool, bool]:
    """(tqdm bar on stderr, plain progress lines): the bar when asked, by default when stderr
    is a terminal; plain lines where no bar is seen: no bar, or stdout piped or written to a
    file (``train.py | tee log``)."""
    bar = _is_terminal(sys.stderr) if progress is None else progress
    return bar, not (bar and _is_terminal(sys.stdout))


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class MetricsLog:
    """The metrics of one :func:`~transformer_jax.train.loop.run`: interval, writer, progress.

    Args:
      work: the workload (tokens per step, FLOPs per token, ``interval_metrics``).
      tc: the training settings (steps, ``max_nonfinite``, the schedule).
      placement: where the step runs (its devices give the peak FLOP/s).
      writer: the ``metrics.jsonl`` writer (``None`` on processes other than 0).
      log: where plain progress lines go.
      start: the step this run starts from.
      progress: show a tqdm bar; ``None``: when stderr is a terminal. Without a bar, or with
        stdout not a terminal, a plain line per log point.
      clock: the run's clock.
      carried: the per-step metrics of an interrupted interval, from the checkpoint's
        metadata (:meth:`carried`), or ``None``.
      d_model: D, for the learning-rate schedule.
    """

    def __init__(self, work: Workload, tc: TrainConfig, placement: Placement,
                 writer: metrics.MetricsWriter | None, log: Callable[[str], None], start: int,
                 progress: bool | None, clock: Clock, carried: dict[str, Any] | None,
                 d_model: int):
        self.work, self.tc, self.placement, self.writer, self.log = work, tc, placement, writer, log
        self.clock, self.schedule = clock, make_schedule(tc, d_model)
        self.util = metrics.Utilisation(placement.devices, work.fns.flops_per_token)
        self.rates: list[float] = []  # tokens/s of each timed interval
        self.first = start  # the first step of the interval being gathered
        self.interval: list[dict[str, np.ndarray]] = []
        if carried:
            self.first = int(carried["first"])
            self.interval.append({"loss": np.asarray(carried["loss"], np.float32),
                                  "nonfinite": np.asarray(carried["nonfinite"], np.int32)})
        self.pending = None
        bar, plain = progress_modes(progress)
        self.plain = plain and writer is not None
        self.bar = tqdm(total=tc.schedule.steps, initial=start, unit="step", dynamic_ncols=True,
                        disable=not bar, desc="train")
        self.postfix: dict[str, str] = {}

    def queue(self, call_metrics: Any, step: int, steps: int) -> None:
        """Hand over the metrics of the call just queued (steps ``step`` … ``step + steps - 1``),
        after fetching those of the call before it: the device has this one queued by now."""
        self.drain(step)
        self.pending = call_metrics
        self.bar.update(steps)

    def drain(self, step: int) -> None:
        """Fetch the metrics of the call in flight; stop on too many non-finite steps.

        Raises:
          NonFiniteError: ``max_nonfinite`` consecutive non-finite steps (by ``step``).
        """
        if self.pending is None:
            return
        host = self.placement.to_host(self.pending)
        self.pending = None
        self.interval.append(host)
        limit = self.tc.optim.max_nonfinite
        if int(host["nonfinite"].max()) >= limit:
            out = Path(self.tc.out) / "checkpoints"
            raise NonFiniteError(
                f"{limit} consecutive steps had non-finite losses or gradients (by step {step}); "
                "their updates were skipped and training stopped. Lower --lr, raise --warmup or "
                f"use --grad-clip; the last good checkpoint is in {out}")
        self.postfix["loss"] = f"{float(host['loss'][-1]):.4f}"
        self.bar.set_postfix(self.postfix, refresh=False)

    def record(self, step: int, tokens_per_s: float | None, now: float) -> dict[str, Any]:
        """The ``metrics.jsonl`` record of the interval ending at ``step`` (drained first);
        starts the next interval. Without a bar, prints the progress line.

        Args:
          step: the step the interval ends at.
          tokens_per_s: the interval's throughput; ``None`` (JSON null) when it held only the
            compiling call.
          now: when the interval ended (``time.perf_counter()``).
        """
        self.drain(step)
        losses = np.concatenate([m["loss"] for m in self.interval])
        # A step with a non-finite loss or gradient was skipped (apply_if_finite): count it,
        # and average the loss over the steps that were applied.
        skipped = int(sum((m["nonfinite"] > 0).sum() for m in self.interval))
        finite = losses[np.isfinite(losses)]
        probes, t0 = self.util.reprobes, time.perf_counter()
        mfu = self.util(tokens_per_s)
        if self.util.reprobes != probes:  # a CPU re-probe of the peak is not training time
            self.clock.paused += time.perf_counter() - t0
        record = {"step": step, "loss": float(finite.mean()) if finite.size else None,
                  "nonfinite_steps": skipped, "lr": float(self.schedule(step - 1)),
                  "tokens_per_s": tokens_per_s, "mfu": mfu, **self.clock.times(now)}
        if self.util.note:
            record["mfu_unreliable"] = True
        if self.work.interval_metrics is not None and self.writer is not None:
            record.update(self.work.interval_metrics(self.first, step))
        if tokens_per_s is not None:
            self.rates.append(tokens_per_s)
        self.interval.clear()
        self.first = step
        self.postfix["tok/s"] = f"{tokens_per_s:,.0f}" if tokens_per_s else "-"
        self.bar.set_postfix(self.postfix, refresh=False)
        if self.plain:
            self.log(self._progress_line(record))
        return record

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` to ``metrics.jsonl`` (on process 0; the others write nothing)."""
        if self.writer is not None:
            self.writer.write(record)

    def _progress_line(self, r: dict[str, Any]) -> str:
        steps, rate = self.tc.schedule.steps, r.get("tokens_per_s")
        loss = "-" if r["loss"] is None else f"{r['loss']:.4f}"
        eta = (_duration((steps - r["step"]) * self.work.tokens_per_step / rate) if rate
               else "-")
        speed = f"{rate:,.0f}" if rate else "-"
        return f"step {r['step']}/{steps}: loss {loss}, {speed} tokens/s, ETA {eta}"

    def carried(self) -> dict[str, Any] | None:
        """The interval gathered since the last line (for the checkpoint's metadata), or
        ``None`` when it is empty; call after :meth:`drain`."""
        if not self.interval:
            return None
        return {"first": self.first,
                "loss": np.concatenate([m["loss"] for m in self.interval]).tolist(),
                "nonfinite": np.concatenate([m["nonfinite"] for m in self.interval]).tolist()}

    def mfu(self) -> tuple[float, str]:
        """(median MFU of this run's intervals or NaN, why it is NaN or "")."""
        rate = float(np.median(self.rates)) if self.rates else None
        mfu = self.util(rate)
        return (np.nan if mfu is None else mfu), self.util.note

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
