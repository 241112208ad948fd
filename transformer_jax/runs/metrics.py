"""What a training run reports: JSONL + TensorBoard writers, the peak FLOP/s for MFU, the loss plot.

* :class:`MetricsWriter` appends one JSON object per event to ``metrics.jsonl`` (always) and the
  same scalars to TensorBoard event files in ``tensorboardX``'s format (which, unlike
  ``clu.metric_writers`` and ``flax.metrics.tensorboard``, never imports TensorFlow). A
  ``metrics.jsonl`` that cannot be written is an :class:`~transformer_jax.runs.rundir.OutputError`
  (the run's record would have a hole); TensorBoard events that cannot be written are one
  warning, and the run goes on without them.
* :func:`peak_flops`: the device's peak. Accelerators from :data:`PEAK_FLOPS` (dense bf16
  numbers from the vendors' data sheets); on a CPU, a large float32 matmul measured once
  (:func:`cpu_matmul_probe`): the honest "peak" of a CPU, whose vendor figure no float32
  matmul reaches.
* :class:`Utilisation`: MFU, the model FLOPs of :mod:`transformer_jax.models.accounting` per
  second over that peak. A figure over 100% means the peak was measured low (a CPU probe taken
  while the machine was loaded): the probe is taken again, and a figure still over 100% is
  reported as unknown (``None``) with the reason, never shown.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np

from transformer_jax.runs.rundir import OutputError, why_not_written, write_text_atomic

__all__ = [
    "METRIC_KEYS",
    "PEAK_FLOPS",
    "MetricsWriter",
    "Utilisation",
    "cpu_matmul_probe",
    "peak_flops",
    "plot_loss",
    "read_jsonl",
]

METRIC_KEYS = ("step", "loss", "lr", "tokens_per_s", "mfu")
"""Keys of every ``metrics.jsonl`` line; evaluation lines add ``val_loss`` and ``val_bpb``."""

# (substring of jax's device_kind, lower-cased; peak dense bf16 FLOP/s per chip; name).
# Ordered: the first match wins, so the more specific names come first.
PEAK_FLOPS: tuple[tuple[str, float, str], ...] = (
    ("tpu v6 lite", 918e12, "TPU v6e (Trillium)"),
    ("tpu v6e", 918e12, "TPU v6e (Trillium)"),
    ("tpu v5 lite", 197e12, "TPU v5e"),
    ("tpu v5e", 197e12, "TPU v5e"),
    ("tpu v5p", 459e12, "TPU v5p"),
    ("tpu v5", 459e12, "TPU v5p"),
    ("tpu v4", 275e12, "TPU v4"),
    ("tpu v3", 123e12, "TPU v3"),
    ("b200", 2250e12, "NVIDIA B200"),
    ("h200", 989e12, "NVIDIA H200"),
    ("h100 pcie", 756e12, "NVIDIA H100 PCIe"),
    ("h100", 989e12, "NVIDIA H100 SXM"),
    ("a100", 312e12, "NVIDIA A100"),
    ("l4", 121e12, "NVIDIA L4"),
    ("v100", 125e12, "NVIDIA V100 (fp16 tensor cores)"),
)


@functools.cache
def cpu_matmul_probe(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a jitted float32 ``[n, n] @ [n, n]`` on the default CPU device (median of runs).

    Measured once per process (cached): on a shared machine the probe and the workload should
    be measured close together, and the probe (``repeats`` timed matmuls of ``n``² floats, after
    a compile) is too slow to repeat often.
    """
    import jax
    import jax.numpy as jnp

    cpu = jax.local_devices(backend="cpu")[0]
    a = jax.device_put(jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32),
                       cpu)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()  # compile + warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        matmul(a, a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2.0 * n**3 / float(np.median(times))


def peak_flops(devices: Sequence[Any]) -> tuple[float, str]:
    """Peak FLOP/s of ``devices`` together, and where the number comes from.

    Accelerators: :data:`PEAK_FLOPS` per chip times the number of devices. CPU: one matmul probe
    for the whole host (fake CPU devices share the same cores, so they are not multiplied).
    Unknown accelerators return ``(nan, ...)``: MFU is then reported as NaN rather than guessed.
    """
    dev = devices[0]
    if dev.platform == "cpu":
        return cpu_matmul_probe(), "CPU float32 matmul probe (2048², median of 5)"
    kind = str(getattr(dev, "device_kind", "")).lower()
    for pattern, flops, name in PEAK_FLOPS:
        if pattern in kind:
            return flops * len(devices), f"{len(devices)} × {name} dense bf16 peak"
    return math.nan, f"unknown device kind {kind!r}"


class Utilisation:
    """Model FLOPs utilisation (MFU): model FLOP/s achieved over the devices' peak FLOP/s.

    An MFU can never exceed 1; a figure that does says the peak is wrong. On a CPU the peak is
    a matmul probe (:func:`cpu_matmul_probe`), which reads low when other processes share the
    cores while it runs. Then the probe runs again (at most ``reprobes`` times per run; the
    highest reading is kept), and a figure still above 1 is ``None``: :attr:`note` says why.

    Args:
      devices: the devices the step runs on (:func:`peak_flops`).
      flops_per_token: the model's training FLOPs per token.
      reprobes: how many more CPU probes a run may take.

    Attributes:
      peak: the peak FLOP/s in use (``nan``: unknown accelerator, MFU ``nan``).
      source: where :attr:`peak` comes from.
      note: why the last figure asked for was ``None`` ("" when it was not).
      reprobes: the CPU probes this run may still take.
    """

    def __init__(self, devices: Sequence[Any], flops_per_token: float, *, reprobes: int = 2):
        self.peak, self.source = peak_flops(devices)
        self.flops_per_token, self.note = flops_per_token, ""
        self.reprobes = reprobes if devices[0].platform == "cpu" else 0

    def __call__(self, tokens_per_s: float | None) -> float | None:
        """The MFU of ``tokens_per_s`` (``None`` for ``None``, or when it would exceed 1)."""
        self.note = ""
        if tokens_per_s is None:
            return None
        mfu = tokens_per_s * self.flops_per_token / self.peak
        while mfu > 1.0 and self.reprobes > 0:
            self.reprobes -= 1
            probe = getattr(cpu_matmul_probe, "__wrapped__", cpu_matmul_probe)()  # not cached
            self.peak = max(self.peak, probe)
            mfu = tokens_per_s * self.flops_per_token / self.peak
        if mfu > 1.0:
            self.note = (f"the model ran at {tokens_per_s * self.flops_per_token / 1e9:.3g} "
                         f"GFLOP/s, above the measured peak of {self.peak / 1e9:.3g} GFLOP/s "
                         f"({self.source}): the peak was measured while the machine was busy")
            return None
        return mfu


def _clean(value: Any) -> Any:
    """JSON-friendly scalar (numpy/jax scalars to Python; NaN/inf kept as floats)."""
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    return float(value)


class MetricsWriter:
    """Appends metric events to ``<out>/metrics.jsonl`` and TensorBoard event files.

    Args:
      out_dir: the run directory.
      tensorboard: also write TensorBoard scalars (tensorboardX) under ``<out>/tensorboard``.
      resume_step: when resuming from a checkpoint at this step, JSONL lines (and TensorBoard
        points) from later steps — written by the interrupted run after its last checkpoint —
        are dropped, so the log reads like one uninterrupted run.
      keep_resume_line: keep the line at ``resume_step`` itself; ``False`` where an
        uninterrupted run writes none at that step (an interrupted run that saved between
        two log points, with a version that logged there).

    Raises:
      transformer_jax.runs.rundir.OutputError: ``metrics.jsonl`` cannot be written (here or in
        :meth:`write`); a resumed log is rewritten atomically, so it is never left half-cut.
    """

    def __init__(self, out_dir: str | Path, *, tensorboard: bool = True,
                 resume_step: int | None = None, keep_resume_line: bool = True):
        self.path = Path(out_dir) / "metrics.jsonl"
        purge = None if resume_step is None else resume_step + int(keep_resume_line)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if purge is not None and self.path.exists():
                kept = [r for r in read_jsonl(self.path) if r.get("step", 0) < purge]
                write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
            elif resume_step is None:
                write_text_atomic(self.path, "")
            self._file = self.path.open("a")
        except OSError as e:
            raise self._failed(e) from None
        self._tb = _EventFile(Path(out_dir) / "tensorboard", purge) if tensorboard else None

    def _failed(self, error: OSError) -> OutputError:
        why, todo = why_not_written(error)
        return OutputError(f"cannot write {self.path} ({why}); {todo}, then run the same "
                           "command to resume from the last checkpoint")

    def write(self, record: dict[str, Any]) -> None:
        """Write one event; ``record["step"]`` is the x axis."""
        record = {k: _clean(v) for k, v in record.items()}
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as e:
            raise self._failed(e) from None
        if self._tb is not None:
            self._tb.write(record["step"], {k: v for k, v in record.items() if k != "step" and
                                            isinstance(v, (int, float)) and not isinstance(v, bool)})

    def close(self) -> None:
        """Flush and close both writers (a failure here is a warning: every line was flushed)."""
        try:
            self._file.close()
        except OSError as e:
            warnings.warn(f"cannot close {self.path} ({why_not_written(e)[0]})", RuntimeWarning,
                          stacklevel=2)
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_EVENT_FILES = itertools.count()  # numbers this process's event files


class _EventFile:
    """TensorBoard scalars in tensorboardX's event-file format, written on the caller's thread.

    ``tensorboardX.SummaryWriter`` writes from a background thread: a failed write kills that
    thread with a traceback, and its bounded queue then blocks the training loop's next
    ``add_scalar`` for good. Here a failed write is one warning, and later events are dropped.
    """

    FLUSH_S = 30.0  # at most this long between flushes (TensorBoard reads the file live)

    def __init__(self, directory: Path, purge_step: int | None):
        self.directory, self._events, self._flushed = directory, None, time.monotonic()
        self._guard(self._open, purge_step)

    def _open(self, purge_step: int | None) -> None:
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        self.directory.mkdir(parents=True, exist_ok=True)
        # tensorboardX names the file by the second and the host only; a writer opened within
        # the same second (a quick resume) would truncate the previous file. The counter is
        # zero-padded because TensorBoard reads a directory's files in name order: file 10
        # must not sort before file 9.
        self._events = EventsWriter(str(self.directory / "events"),
                                    f".{os.getpid()}.{next(_EVENT_FILES):06d}")
        if purge_step is not None:  # as SummaryWriter(purge_step=...): TensorBoard drops points
            # at or after purge_step, logged by a run that was interrupted after its checkpoint
            self._events.write_event(Event(step=purge_step, file_version="brain.Event:2"))
            self._events.write_event(Event(step=purge_step, wall_time=time.time(),
                                           session_log=SessionLog(status=SessionLog.START)))
        self._events.flush()

    def write(self, step: int, scalars: dict[str, float]) -> None:
        """One event holding ``scalars`` at ``step`` (nothing once a write has failed)."""
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary
        from tensorboardX.summary import scalar

        if self._events is None:
            return
        values = [scalar(key, value).value[0] for key, value in scalars.items()]
        event = Event(step=step, wall_time=time.time(), summary=Summary(value=values))
        self._guard(self._events.write_event, event)
        if self._events is not None and time.monotonic() - self._flushed > self.FLUSH_S:
            self._guard(self._events.flush)
            self._flushed = time.monotonic()

    def close(self) -> None:
        if self._events is not None:
            self._guard(self._events.close)
            self._events = None

    def _guard(self, fn, *args) -> None:
        """``fn(*args)``; if it fails to write: one warning, the file closed, no more events."""
        try:
            fn(*args)
        except OSError as e:
            warnings.warn(f"cannot write TensorBoard events in {self.directory} "
                          f"({why_not_written(e)[0]}); the run goes on without them "
                          "(metrics.jsonl has every value)", RuntimeWarning, stacklevel=4)
            if self._events is not None:
                try:  # closes the file even though its buffer cannot be flushed
                    self._events.close()
                except OSError:
                    pass
            self._events = None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (blank or truncated last lines are skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill mid-write
    return records


def plot_loss(records: Sequence[dict[str, Any]], path: str | Path, *, title: str = "") -> None:
    """Training loss and validation loss (nats per token) against step, saved as a PNG."""
    # A bare Figure renders with Agg and leaves pyplot's global state (and backend) alone.
    from matplotlib.figure import Figure

    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
