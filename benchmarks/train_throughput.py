"""Training throughput: tokens/s, step time and MFU of the train step, pmap vs jit, by model size.

    python benchmarks/train_throughput.py --quick     # ≤ 2 min on 2 CPU cores
    python benchmarks/train_throughput.py             # more sizes and sequence lengths

For every (model size, sequence length) it times the same pure step
(:func:`transformer_jax.train.train_steps`) as the training loop runs it:

* ``jit k=1``: one optimizer step per compiled call — the baseline every ratio refers to;
* ``jit k=K``: K steps per call in one ``lax.scan`` (what ``train.py`` does);
* ``pmap×N k=K``: the data-parallel step over N devices. On a CPU these are N fake devices
  sharing the same cores, so the row tests that the path runs correctly, not a speed-up;
* ``jit k=1, JAX dense backward``: the baseline with ``dense_backward="jax"``, JAX's own
  transpose rule for the projections instead of the models' plain-matmul backward
  (:mod:`transformer_jax.models.matmul`). Its ``× jit k=1`` below 1 is that change's speed-up.

Timing: compile and one warm-up call first, then the variants of one size are called round-robin
(so machine load hits them alike), each call blocked with ``block_until_ready``; the median of
the repeats is reported. MFU = tokens/s · (6·N + 12·L·T·D) / peak. On a CPU the peak is a
2048² float32 matmul measured in the same run, before and after the timings: no float32 matmul
reaches the vendor's figure, and the speed of a shared machine drifts.
Writes results.json (with the machine), results.md and throughput.png into
benchmarks/results/train_throughput/.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import sys
import time
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout: benchmarks.common and transformer_jax

from benchmarks import common  # noqa: E402
from transformer_jax import data, models, parallel, train  # noqa: E402
from transformer_jax.config import PRESETS, RECIPES  # noqa: E402
from transformer_jax.models import accounting  # noqa: E402
from transformer_jax.runs import metrics  # noqa: E402

DEFAULT_RUN = RECIPES["cpu-lm"].train  # the default run's training settings

# (name, layers, d_model, heads, d_ff, seq_len, batch)
# The peer GPT's two published character-level shapes: its CPU config (4×128, T 64, B 12) and
# its headline config (6×384, T 256; at B 16 here), the shape of the MFU target.
QUICK = [
    ("4×128 (peer GPT CPU shape)", 4, 128, 4, 512, 64, 12),
    ("6×384 (peer GPT headline shape)", 6, 384, 6, 1536, 256, 16),
]
FULL = QUICK + [
    ("4×256", 4, 256, 4, 1024, 128, 16),
    ("4×256, T 512", 4, 256, 4, 1024, 512, 4),
    ("6×384, T 64", 6, 384, 6, 1536, 64, 16),
]


def _variants(layers, d_model, heads, d_ff, seq_len, batch, k, n_dev):
    """name -> (call() -> metrics, steps per call) for one size; all share the model."""
    cfg = dataclasses.replace(PRESETS["cpu-gpt"], num_decoder_layers=layers, d_model=d_model,
                              num_heads=heads, num_kv_heads=heads, d_ff=d_ff, dropout_rate=0.0,
                              max_len=max(seq_len, 64))
    tc = DEFAULT_RUN.replace(batch_size=batch, seq_len=seq_len, steps_per_call=k)
    model = models.build_model("transformer", cfg)
    tx = train.make_optimizer(tc, cfg.d_model)
    tokens = data.load_corpus().train
    flops = accounting.lm_flops_per_token(
        jax.eval_shape(lambda: train.init_state(model, tx, seed=0, seq_len=seq_len)).params,
        cfg, seq_len)
    devices = jax.local_devices()

    def make(kind, steps, n, backward="matmul"):
        model = models.build_model("transformer",
                                   dataclasses.replace(cfg, dense_backward=backward))
        step = functools.partial(train.train_steps, apply_fn=model.apply, tx=tx)
        if kind == "pmap":
            state = [parallel.replicate(train.init_state(model, tx, seed=0, seq_len=seq_len),
                                        devices[:n])]
            fn = parallel.pmap_step(step, devices[:n])
        else:
            state = [train.init_state(model, tx, seed=0, seq_len=seq_len)]
            fn = parallel.jit_step(step)
        counter = [0]

        def call():
            b = data.train_batches(tokens, seed=0, step=counter[0], num_steps=steps,
                                   batch_size=batch, seq_len=seq_len)
            counter[0] += steps
            if kind == "pmap":
                b = parallel.shard_batches(b, n)
            state[0], m = fn(state[0], b)
            return m

        return call, steps

    out = {"jit k=1": make("jit", 1, 1)}
    if k > 1:
        out[f"jit k={k}"] = make("jit", k, 1)
    if n_dev > 1 and batch % n_dev == 0 and len(devices) >= n_dev:
        out[f"pmap×{n_dev} k={k}"] = make("pmap", k, n_dev)
    out["jit k=1, JAX dense backward"] = make("jit", 1, 1, backward="jax")
    return out, flops


def _time(variants, seconds, min_repeats=3):
    """Median seconds per optimizer step of each variant (round-robin), and its call count."""
    times = common.round_robin_times({name: call for name, (call, _) in variants.items()},
                                     min_repeats, seconds=seconds, warmups=2)
    return ({name: statistics.median(times[name]) / steps
             for name, (_, steps) in variants.items()},
            {name: len(v) for name, v in times.items()})


def _plot(rows, path):
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    names = list(dict.fromkeys(r["variant"] for r in rows))
    fig, (ax_tok, ax_mfu) = common.figure(2, figsize=(8, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [s + i * width for s in range(len(sizes))]
        tok = [next((r["tokens_per_s"] for r in rows if r["size"] == s and r["variant"] == name),
                    0) for s in sizes]
        mfu = [next((100 * r["mfu"] for r in rows if r["size"] == s and r["variant"] == name),
                    0) for s in sizes]
        ax_tok.bar(xs, tok, width, label=name)
        ax_mfu.bar(xs, mfu, width, label=name)
    for ax, label in ((ax_tok, "tokens/s"), (ax_mfu, "MFU vs. matmul probe (%)")):
        ax.set_xticks([s + 0.4 - width / 2 for s in range(len(sizes))])
        ax.set_xticklabels([s.split(" (")[0] for s in sizes], fontsize=8)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    ax_tok.set_yscale("log")
    ax_mfu.legend(fontsize=7)
    fig.suptitle("Train-step throughput (median per step)")
    common.save_figure(fig, path)


def main(argv=None) -> int:
    parser = common.arg_parser(__doc__, "two sizes, few repeats (≤ 2 min)")
    parser.add_argument("--devices", type=int, default=2,
                        help="fake CPU devices for the pmap rows (ignored on accelerators)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="timing budget per size (default 15 quick, 30 full)")
    args = parser.parse_args(argv)
    common.fake_cpu_devices(args.devices)  # before the first JAX use below
    sizes = QUICK if args.quick else FULL
    seconds = args.seconds or (15.0 if args.quick else 30.0)
    k = 10
    t0 = time.perf_counter()
    on_cpu = jax.devices()[0].platform == "cpu"
    probe_before = metrics.cpu_matmul_probe.__wrapped__() if on_cpu else None
    if on_cpu:
        peak, peak_source = probe_before, "CPU float32 matmul probe (2048², median of 5)"
    else:
        peak, peak_source = metrics.peak_flops(jax.local_devices()[:1])
    rows = []
    for name, layers, d_model, heads, d_ff, seq_len, batch in sizes:
        # Big steps (≳ 0.1 s) gain nothing from several steps per call: time k=1 only.
        big = 12 * layers * d_model**2 * 6 * seq_len * batch > 2e10
        variants, flops = _variants(layers, d_model, heads, d_ff, seq_len, batch,
                                    1 if big else k, 1 if big else args.devices)
        per_step, n = _time(variants, seconds)
        base = per_step["jit k=1"]
        for variant, t in per_step.items():
            tok_s = batch * seq_len / t
            rows.append({"size": name, "layers": layers, "d_model": d_model, "seq_len": seq_len,
                         "batch": batch, "variant": variant, "step_ms": round(1e3 * t, 2),
                         "tokens_per_s": round(tok_s), "mfu": tok_s * flops / peak,
                         "vs_jit_k1": base / t, "repeats": n[variant],
                         "flops_per_token": flops})
            print(f"{name:26s} {variant:28s} {1e3 * t:9.2f} ms/step {tok_s:10.0f} tok/s "
                  f"MFU {100 * tok_s * flops / peak:5.1f}%  ×{base / t:.2f} vs jit k=1",
                  flush=True)
    probe_after = metrics.cpu_matmul_probe.__wrapped__() if probe_before is not None else None
    payload = {"machine": common.describe_machine(), "peak_flops": peak,
               "peak_source": peak_source, "cpu_probe_flops_before": probe_before,
               "cpu_probe_flops_after": probe_after, "quick": args.quick, "steps_per_call": k,
               "rows": rows,
               "wall_s": time.perf_counter() - t0}
    md = "\n".join([
        "# Train-step throughput", "",
        (f"Machine: {payload['machine']['device']}; peak {peak / 1e9:.0f} GFLOP/s "
        f"({peak_source}; probe after: "
        f"{(probe_after or float('nan')) / 1e9:.0f} GFLOP/s)."), "",
        common.markdown_table(rows, [("size", "model"), ("seq_len", "T"), ("batch", "B"),
                                     ("variant", "variant"), ("step_ms", "ms/step"),
                                     ("tokens_per_s", "tokens/s"), ("mfu", "MFU"),
                                     ("vs_jit_k1", "× jit k=1")]),
    ])
    folder = common.write_results("train_throughput", payload, md, args.out)
    _plot(rows, folder / "throughput.png")
    print(f"wrote {folder}/results.json, results.md, throughput.png "
          f"({payload['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
