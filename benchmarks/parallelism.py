"""Parallelism: step time of pmap vs sharded jit vs shard_map over 1–8 devices, and the
per-device memory of parameters + optimizer state under DP, FSDP and tensor parallelism.

    python benchmarks/parallelism.py --quick     # ≤ 2 min on 2 CPU cores (8 fake devices)
    python benchmarks/parallelism.py             # more repeats, and the FSDP step too

Step time: the pure train step (:func:`transformer_jax.train.train_steps`, k steps per call)
placed by :func:`transformer_jax.parallel.resolve` exactly as ``train.py --parallel …`` does:

* ``jit×1``: one device — the baseline every ratio refers to (timed in every group);
* ``pmap×N``: replicated state, batch split over N devices, ``lax.pmean``;
* ``sharded×N``: ``jit`` on a ``data=N`` mesh (``--parallel sharded``); without ``--quick``
  also ``fsdp=N`` (parameters and Adam moments split N ways);
* ``shard_map×N``: the per-device step on the mesh with ``lax.pmean``.

Timing: compile and one warm-up call first, then the variants of one device count are called
round-robin (so machine load hits them alike), each blocked with ``block_until_ready``; the
median per optimizer step is reported. ON A CPU THE N DEVICES ARE FAKE: they share the same
cores (XLA already uses all of them for one device), so these rows show that every path runs
and what its overhead is — not a speed-up. Real speed-ups need real accelerators (README).

Memory: per-device bytes of parameters and optimizer state (AdamW μ and ν) of a GPT-2-small
sized LM under the :data:`transformer_jax.parallel.sharding.PARAM_RULES` table on 8 devices,
from the per-device shard shapes the arrays get (``NamedSharding.shard_shape``;
tests/parallel/test_sharding.py checks real arrays against the same table).

Writes results.json (with the machine), results.md, step_time.png and memory.png into
benchmarks/results/parallelism/.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout: benchmarks.common and transformer_jax

from benchmarks import common  # noqa: E402
from transformer_jax import data, models, parallel, train  # noqa: E402
from transformer_jax.config import PRESETS, RECIPES  # noqa: E402

DEFAULT_RUN = RECIPES["cpu-lm"].train  # the default run's training settings

# The timed model: 2 × 128, T 64, B 16 (divisible by 8 devices), k steps per call.
TIMED = dataclasses.replace(PRESETS["cpu-gpt"], num_decoder_layers=2, d_model=128, num_heads=4,
                            num_kv_heads=4, d_ff=512, max_len=64)
SEQ_LEN, BATCH, K = 64, 16, 5
# The memory model: GPT-2 small (124M parameters) as a language model.
MEMORY_MODEL = PRESETS["gpt2-small"]
LAYOUTS = [  # (name, --parallel, --mesh) on 8 devices
    ("DP", "sharded", "data=8"),
    ("FSDP", "sharded", "fsdp=8"),
    ("DP × FSDP", "sharded", "data=2,fsdp=4"),
    ("DP × TP", "sharded", "data=2,tensor=4"),
    ("FSDP × TP", "sharded", "fsdp=2,tensor=4"),
]


def _step_and_state(cfg, seq_len, k):
    tc = DEFAULT_RUN.replace(batch_size=BATCH, seq_len=seq_len, steps_per_call=k)
    model = models.build_model("transformer", cfg)
    tx = train.make_optimizer(tc, cfg.d_model)
    step = functools.partial(train.train_steps, apply_fn=model.apply, tx=tx)
    init = lambda: train.init_state(model, tx, seed=0, seq_len=seq_len)
    return step, init


def _variant(placement, step, init, tokens):
    """call() -> metrics: one compiled call of k steps on fresh batches, state carried."""
    abstract = jax.eval_shape(init)
    fn = placement.compile(step, abstract)
    state = [placement.init(init, abstract)]
    counter = [0]

    def call():
        load = functools.partial(data.train_batches, tokens, seed=0, step=counter[0],
                                 num_steps=K, batch_size=BATCH, seq_len=SEQ_LEN)
        counter[0] += K
        state[0], m = fn(state[0], placement.batches(load, (K, BATCH, SEQ_LEN + 1)))
        return m

    return call


def _time(variants, seconds, min_repeats=5):
    """Median seconds per optimizer step of each variant (round-robin), and its call count."""
    times = common.round_robin_times(variants, min_repeats, seconds=seconds, warmups=2)
    return ({name: statistics.median(v) / K for name, v in times.items()},
            {name: len(v) for name, v in times.items()})


def step_times(counts, seconds, full):
    """Rows of (devices, variant, ms/step, × jit×1) for every device count."""
    step, init = _step_and_state(TIMED, SEQ_LEN, K)
    tokens = data.load_corpus().train
    devices = jax.local_devices()
    baseline = _variant(parallel.resolve("none", devices[:1]), step, init, tokens)
    rows = []
    for n in counts:
        variants = {"jit×1": baseline,
                    f"pmap×{n}": _variant(parallel.resolve("pmap", devices[:n]), step, init,
                                          tokens),
                    f"sharded×{n}": _variant(parallel.resolve("sharded", devices[:n],
                                                              f"data={n}"), step, init, tokens),
                    f"shard_map×{n}": _variant(parallel.resolve("shard_map", devices[:n]),
                                               step, init, tokens)}
        if full and n > 1:
            variants[f"sharded fsdp×{n}"] = _variant(
                parallel.resolve("sharded", devices[:n], f"fsdp={n}"), step, init, tokens)
        per_step, reps = _time(variants, seconds)
        for name, t in per_step.items():
            if name == "jit×1" and n > 1:
                continue  # the baseline row is shown once; every group still timed it
            rows.append({"devices": n, "variant": name.split("×")[0], "name": name,
                         "step_ms": round(1e3 * t, 3), "jit_ms": round(1e3 * per_step["jit×1"], 3),
                         "vs_jit": per_step["jit×1"] / t,
                         "tokens_per_s": round(BATCH * SEQ_LEN / t), "repeats": reps[name]})
            print(f"{n} device(s) {name:18s} {1e3 * t:8.2f} ms/step  "
                  f"×{per_step['jit×1'] / t:.2f} vs jit×1", flush=True)
    return rows


def memory_rows(n_devices):
    """Per-device bytes of params + optimizer state under each layout (from the table)."""
    _, init = _step_and_state(MEMORY_MODEL, 128, 1)
    abstract = jax.eval_shape(init)  # shapes only: nothing is allocated
    devices = jax.devices()[:n_devices]

    def per_device(tree, shardings):
        return sum(int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
                   for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))

    one = parallel.resolve("none", devices[:1])
    layouts = [("one device", one)] + [
        (name, parallel.resolve(kind, devices, mesh)) for name, kind, mesh in LAYOUTS]
    rows = []
    for name, placement in layouts:
        sh = placement.shardings(abstract)
        params = per_device(abstract.params, sh.params)
        opt = per_device(abstract.opt_state, sh.opt_state)
        mesh = "" if placement.mesh is None else ",".join(
            f"{k}={v}" for k, v in placement.mesh.shape.items() if v > 1)
        rows.append({"layout": name, "mesh": mesh or "–", "params_mb": params / 2**20,
                     "opt_state_mb": opt / 2**20, "total_mb": (params + opt) / 2**20})
    full = rows[0]["total_mb"]
    for r in rows:
        r["fraction"] = r["total_mb"] / full
        print(f"{r['layout']:12s} {r['mesh']:18s} params {r['params_mb']:7.1f} MiB  "
              f"optimizer {r['opt_state_mb']:7.1f} MiB  ({100 * r['fraction']:.0f}% of one "
              "device)", flush=True)
    return rows


def _plot(step_rows, mem_rows, folder, fake):
    fig, ax = common.figure(figsize=(6, 4))
    for variant in dict.fromkeys(r["variant"] for r in step_rows if r["name"] != "jit×1"):
        pts = [(r["devices"], 1 / r["vs_jit"]) for r in step_rows if r["variant"] == variant]
        ax.plot(*zip(*pts), marker="o", label=variant)
    ax.axhline(1.0, color="gray", ls="--", label="jit, 1 device")
    ax.set_xscale("log", base=2)
    ax.set_xticks([r["devices"] for r in step_rows], [str(r["devices"]) for r in step_rows])
    ax.set_xlabel("devices" + (" (fake CPU devices share the same cores)" if fake else ""))
    ax.set_ylabel("step time / jit on 1 device (same rounds)")
    ax.set_title("Train step by parallel path" + (
        ": fake devices show overhead, not speed-up" if fake else ""), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    common.save_figure(fig, folder / "step_time.png")

    fig, ax = common.figure(figsize=(7, 3.8))
    names = [r["layout"] + ("" if r["mesh"] == "–" else "\n" + r["mesh"].replace(",", "\n"))
             for r in mem_rows]
    params = [r["params_mb"] for r in mem_rows]
    ax.bar(names, params, label="parameters")
    ax.bar(names, [r["opt_state_mb"] for r in mem_rows], bottom=params,
           label="optimizer state (AdamW μ, ν)")
    ax.set_ylabel("MiB per device")
    ax.set_title(f"GPT-2 small ({MEMORY_MODEL.num_decoder_layers}×{MEMORY_MODEL.d_model}): "
                 "state per device, 8 devices", fontsize=9)
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=8)
    common.save_figure(fig, folder / "memory.png")


def main(argv=None) -> int:
    parser = common.arg_parser(__doc__, "few repeats, no FSDP step (≤ 2 min)")
    parser.add_argument("--devices", type=int, default=8,
                        help="fake CPU devices (ignored on accelerators); counts 1, 2, 4, … up "
                             "to it")
    parser.add_argument("--seconds", type=float, default=None,
                        help="timing budget per device count (default 3 quick, 15 full)")
    args = parser.parse_args(argv)
    common.fake_cpu_devices(args.devices)  # before the first JAX use below
    t0 = time.perf_counter()
    n_max = len(jax.local_devices())
    counts = [n for n in (1, 2, 4, 8, 16) if n <= n_max]
    seconds = args.seconds or (3.0 if args.quick else 15.0)
    machine = common.describe_machine()
    fake = jax.devices()[0].platform == "cpu"
    step_rows = step_times(counts, seconds, full=not args.quick)
    mem_rows = memory_rows(min(8, len(jax.devices())))
    payload = {"machine": machine, "fake_devices": fake, "quick": args.quick,
               "timed_model": {"layers": TIMED.num_decoder_layers, "d_model": TIMED.d_model,
                               "seq_len": SEQ_LEN, "batch": BATCH, "steps_per_call": K},
               "memory_model": "gpt2-small", "step_rows": step_rows, "memory_rows": mem_rows,
               "wall_s": time.perf_counter() - t0}
    caveat = ("**These devices are fake CPU devices sharing the same cores: the step times show "
              "that every path runs and what it costs in overhead, not a speed-up.** "
              if fake else "")
    md = "\n".join([
        "# Parallelism: pmap vs sharded jit vs shard_map", "",
        (f"Machine: {machine['device']}, {machine['device_count']} device(s); "
        f"jax {machine['jax_version']}. {caveat}"),
        "",
        (f"## Step time ({TIMED.num_decoder_layers}×{TIMED.d_model} LM, T {SEQ_LEN}, global "
        f"batch {BATCH}, {K} steps per call; median per step, variants interleaved)"), "",
        common.markdown_table(step_rows, [("devices", "devices"), ("name", "variant"),
                                          ("step_ms", "ms/step"), ("tokens_per_s", "tokens/s"),
                                          ("jit_ms", "jit×1 ms/step (same rounds)"),
                                          ("vs_jit", "× jit, 1 device"), ("repeats", "calls")]),
        "",
        (f"## Per-device memory: GPT-2 small LM ({MEMORY_MODEL.num_decoder_layers}×"
        f"{MEMORY_MODEL.d_model}, V {MEMORY_MODEL.vocab_size}), float32 parameters + AdamW "
        "state, on 8 devices"), "",
        "From the per-device shard shapes of the sharding table (activations not included).",
        "",
        common.markdown_table(mem_rows, [("layout", "layout"), ("mesh", "--mesh"),
                                         ("params_mb", "params MiB"),
                                         ("opt_state_mb", "optimizer MiB"),
                                         ("total_mb", "total MiB"), ("fraction", "× one device")]),
    ])
    folder = common.write_results("parallelism", payload, md, args.out)
    _plot(step_rows, mem_rows, folder, fake)
    print(f"wrote {folder}/results.json, results.md, step_time.png, memory.png "
          f"({payload['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
