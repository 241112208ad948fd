"""The training loop: ``python train.py`` is :func:`run` with flags turned into configs.

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

from transformer_jax import data, metrics, parallel, rundir, training
from transformer_jax.checkpoint import Checkpointer
from transformer_jax.config import ModelConfig, TrainConfig
from transformer_jax.rundir import RunConfigError

__all__ = ["NonFiniteError", "RunConfigError", "RunResult", "run"]

# Fields of TrainConfig that change the compiled train step (the others are the loop's).
_STEP_FIELDS = ("model", "steps", "grad_accum", "optimizer", "lr", "min_lr_ratio", "schedule",
                "warmup", "b1", "b2", "eps", "weight_decay", "grad_clip", "label_smoothing",
                "steps_per_call", "max_nonfinite")


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


@dataclasses.dataclass(frozen=True)
class _Functions:
    model: Any
    tx: Any
    train: Callable[..., Any]
    evaluate: Callable[..., Any]
    flops_per_token: float
    n_params: int


@functools.lru_cache(maxsize=8)
def _functions(model_cfg: ModelConfig, step_cfg: TrainConfig, seq_len: int,
               placement: parallel.Placement) -> _Functions:
    """Model, optimizer and jitted/pmapped step functions (cached: reruns reuse compilations)."""
    model = training.build_model(step_cfg.model, model_cfg)
    tx = training.make_optimizer(step_cfg, model_cfg.d_model)
    step = functools.partial(
        training.train_steps, apply_fn=model.apply, tx=tx,
        label_smoothing=step_cfg.label_smoothing, grad_accum=step_cfg.grad_accum,
        dropout=model_cfg.dropout_rate > 0)
    train = (parallel.pmap_step(step, placement.devices) if placement.kind == "pmap"
             else parallel.jit_step(step))
    evaluate = jax.jit(functools.partial(training.eval_step, apply_fn=model.apply))
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                                 np.zeros((1, seq_len), np.int32))["params"])
    flops = training.model_flops_per_token(abstract, model_cfg, seq_len, step_cfg.model)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
    return _Functions(model, tx, train, evaluate, flops, n_params)


def _check_inputs(model_cfg: ModelConfig, tc: TrainConfig, placement: parallel.Placement,
                  corpus: data.Corpus) -> None:
    if model_cfg.vocab_size != data.ByteTokenizer.vocab_size:
        raise RunConfigError(f"byte-level data needs vocab_size 256, got {model_cfg.vocab_size}")
    if tc.model == "transformer" and tc.seq_len > model_cfg.max_len:
        raise RunConfigError(f"seq_len {tc.seq_len} exceeds the model's max_len "
                             f"{model_cfg.max_len}; lower seq_len or raise max_len")
    parallel.check_batch(tc.batch_size, placement.num_devices, tc.grad_accum)
    data.check_length(corpus.train, tc.seq_len, "train")
    data.check_length(corpus.val, tc.seq_len, "validation")


def _next_stop(step: int, end: int, tc: TrainConfig) -> int:
    """The next absolute step boundary: a multiple of every interval, or ``end``."""
    every = (tc.steps_per_call, tc.log_every, tc.eval_every, tc.ckpt_every)
    return min([end] + [(step // e + 1) * e for e in every])


def _validate(fns: _Functions, params: Any, tokens: np.ndarray, tc: TrainConfig) -> float:
    """Mean NLL (nats per token) over the whole validation split."""
    total, count = 0.0, 0.0
    sums = [fns.evaluate(params, b) for b in
            data.eval_batches(tokens, batch_size=tc.eval_batch_size, seq_len=tc.seq_len)]
    for s, c in jax.device_get(sums):
        total, count = total + float(s), count + float(c)
    return total / max(count, 1.0)


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
    """Train (or resume) a language model; write everything into ``tc.out``.

    Args:
      model_cfg: the model (its ``vocab_size`` must be 256: bytes).
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
    placement = parallel.resolve(tc.parallel, devices)
    corpus = data.load_corpus(tc.data, tc.val_fraction)
    _check_inputs(model_cfg, tc, placement, corpus)
    out = Path(tc.out)
    rundir.prepare(out, model_cfg, tc, log)  # refuses another run's or an unwritable directory
    step_cfg = TrainConfig(**{f: getattr(tc, f) for f in _STEP_FIELDS})
    fns = _functions(model_cfg, step_cfg, tc.seq_len, placement)
    dev0 = placement.devices[0]
    end = min(tc.steps, stop_at) if stop_at is not None else tc.steps
    tokens_per_step = tc.batch_size * tc.seq_len

    with Checkpointer(out / "checkpoints", max_to_keep=tc.max_to_keep) as ckpt, \
            _SigtermFlag() as sigterm:
        with jax.default_device(dev0):
            fresh = jax.eval_shape(lambda: training.init_state(fns.model, fns.tx, seed=tc.seed,
                                                               seq_len=tc.seq_len))
        sharding = jax.sharding.SingleDeviceSharding(dev0)
        restored = ckpt.restore(jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), fresh),
            expect={"model": model_cfg.to_dict()})  # checkpoints copied in from another model
        if restored is not None:
            state, start = restored.state, restored.step
            log(f"resuming {out} from step {start}" if start < tc.steps else
                f"{out} is already trained to step {start} (--steps {tc.steps}): "
                "evaluating and sampling only")
        else:
            with jax.default_device(dev0):
                state = training.init_state(fns.model, fns.tx, seed=tc.seed, seq_len=tc.seq_len)
            start = 0
        if placement.kind == "pmap":
            state = parallel.replicate(state, placement.devices)
        writer = metrics.MetricsWriter(out, resume_step=start if restored else None)
        peak, peak_source = metrics.peak_flops(placement.devices)
        log(f"{tc.model}: {model_cfg.num_decoder_layers} layers, d_model {model_cfg.d_model}, "
            f"{fns.n_params / 1e6:.2f}M params, {fns.flops_per_token / 1e6:.1f} MFLOP/token; "
            f"{placement.kind} on "
            f"{placement.num_devices} {dev0.platform} device(s); data {corpus.name} "
            f"({len(corpus.train):,} train / {len(corpus.val):,} val bytes); peak "
            f"{peak / 1e9:.0f} GFLOP/s ({peak_source})")
        host_state = lambda: jax.device_get(
            parallel.unreplicate(state) if placement.kind == "pmap" else state)
        unrep_params = lambda: (parallel.unreplicate(state.params)
                                if placement.kind == "pmap" else state.params)
        schedule = training.make_schedule(tc, model_cfg.d_model)

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
            host = jax.device_get(pending)
            pending = None
            if placement.kind == "pmap":
                host = {k: v[0] for k, v in host.items()}
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
            while step < end and not sigterm.set:
                stop = _next_stop(step, end, tc)
                batches = data.train_batches(corpus.train, seed=tc.seed, step=step,
                                             num_steps=stop - step, batch_size=tc.batch_size,
                                             seq_len=tc.seq_len)
                if placement.kind == "pmap":
                    batches = parallel.shard_batches(batches, placement.num_devices)
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
                do_ckpt = step % tc.ckpt_every == 0 or step == end or sigterm.set
                if step % tc.log_every == 0 or do_eval or do_ckpt:
                    drain()
                    now = time.perf_counter()
                    # None (JSON null) when the interval held only the compiling call.
                    tok_s = n_timed * tokens_per_step / (now - t_mark) if n_timed else None
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
                        val_loss = _validate(fns, unrep_params(), corpus.val, tc)
                        last_eval = step
                        record.update(val_loss=val_loss, val_bpb=val_loss / math.log(2))
                        log(f"step {step}: val_loss {val_loss:.4f} nats/byte "
                            f"({val_loss / math.log(2):.3f} bits/byte)")
                    writer.write(record)
                    postfix["tok/s"] = f"{tok_s:,.0f}" if tok_s else "-"
                    bar.set_postfix(postfix, refresh=False)
                    if do_ckpt:
                        ckpt.save(step, host_state(), {"step": step, "model": model_cfg.to_dict(),
                                                       "train": tc.to_dict()})
                    n_timed, t_mark = 0, time.perf_counter()
            drain()
            interrupted = step < tc.steps
            if interrupted:
                ckpt.save(step, host_state(), {"step": step, "model": model_cfg.to_dict(),
                                               "train": tc.to_dict()})
                log(f"stopped at step {step}; checkpoint saved in {out.resolve()}/checkpoints; "
                    "run the same command to resume")
            elif last_eval != step:  # finished earlier: evaluate the restored state once
                val_loss = _validate(fns, unrep_params(), corpus.val, tc)
                log(f"step {step}: val_loss {val_loss:.4f} nats/byte")
        finally:
            bar.close()
            writer.close()
        final = host_state()

    sample = ""
    if not interrupted and tc.sample_tokens:
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
                     interrupted=interrupted, sample=sample, state=final)
