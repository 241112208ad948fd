"""Where the train step's time goes: a ``jax.profiler`` trace of train.py's step, per XLA op.

    python benchmarks/profile_step.py --quick                 # 6×384, T 256, B 16, 3 steps
    python benchmarks/profile_step.py --layers 4 --d-model 192 --heads 6 --d-ff 768 \\
        --seq-len 64 --batch 12                                # any other shape

The step is :func:`transformer_jax.train.train_steps` exactly as ``train.py`` compiles it (one
optimizer step per call here). After a warm-up call, ``--steps`` calls are traced; the trace's
XLA thunks (fusions, custom calls, copies) are summed by name and each is put in a category by
what its HLO computation contains:

* ``matmul``: a dot (weights and attention scores alike; XLA fuses the epilogue into it);
* ``reduce``: a reduction (softmax and normalisation statistics, loss, gradient norms);
* ``elementwise``: other fusions (activations, normalisation, the optimizer update);
* ``layout``: copies and transposes that only move data;
* ``other``: everything else.

Times are summed over XLA's worker threads, so ``thread ms / step`` can exceed the wall time
per step (2 cores: up to 2×). Writes results.json and results.md into
benchmarks/results/profile_step/ (or ``--out``).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import glob
import re
import sys
import tempfile
import time
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout: benchmarks.common and transformer_jax

from benchmarks import common  # noqa: E402
from transformer_jax import data, models, train  # noqa: E402
from transformer_jax.config import PRESETS, RECIPES  # noqa: E402
from transformer_jax.models import accounting  # noqa: E402
from transformer_jax.runs import metrics  # noqa: E402

DEFAULT_RUN = RECIPES["cpu-lm"].train  # the default run's training settings

CATEGORIES = ("matmul", "reduce", "elementwise", "layout", "other")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = \S+ (\w[\w-]*)\(")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")


def hlo_categories(hlo: str) -> dict[str, str]:
    """Instruction name -> category, from compiled HLO text (fusions by their bodies)."""
    bodies: dict[str, set[str]] = {}
    current = None
    entries: list[tuple[str, str, str | None]] = []
    for line in hlo.splitlines():
        if line.rstrip().endswith("{") and "=" not in line.split("(")[0]:
            current = line.split()[0].lstrip("%") if not line.startswith("ENTRY") else \
                line.split()[1].lstrip("%")
            bodies[current] = set()
            continue
        m = _INSTR.match(line)
        if m and current is not None:
            name, op = m.groups()
            bodies[current].add(op)
            called = _CALLS.search(line)
            entries.append((name, op, called.group(1) if called else None))

    out = {}
    for name, op, called in entries:
        ops = bodies.get(called, set()) | {op}
        if ops & {"dot", "convolution"}:
            out[name] = "matmul"
        elif ops & {"reduce", "reduce-window"}:
            out[name] = "reduce"
        elif ops <= {"copy", "transpose", "bitcast", "parameter", "fusion", "tuple",
                     "get-tuple-element", "broadcast", "reshape", "slice", "concatenate",
                     "dynamic-slice", "dynamic-update-slice"}:
            out[name] = "layout"
        elif op == "fusion":
            out[name] = "elementwise"
        else:
            out[name] = "other"
    return out


def _trace_events(trace_dir: str) -> collections.Counter:
    """Thunk name -> summed thread nanoseconds of every XLA op in the trace."""
    path = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0]
    totals: collections.Counter = collections.Counter()
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        if plane.name != "/host:CPU" and not plane.name.startswith("/device:"):
            continue
        for line in plane.lines:
            if line.name == "python" or "Steps" in line.name:
                continue
            for ev in line.events:
                name = ev.name
                if name.startswith(("ThreadpoolListener", "ThunkExecutor", "end: ", "$")):
                    continue  # the runtime's bookkeeping and Python frames, not XLA ops
                totals[name] += ev.duration_ns
    return totals


def profile(layers, d_model, heads, d_ff, seq_len, batch, steps, preset="cpu-gpt"):
    """(per-category ms/step, top ops, wall ms/step, MFLOP/token) of the traced step."""
    cfg = dataclasses.replace(PRESETS[preset], num_decoder_layers=layers, d_model=d_model,
                              num_heads=heads, num_kv_heads=heads, d_ff=d_ff, dropout_rate=0.0,
                              max_len=max(seq_len, PRESETS[preset].max_len))
    tc = DEFAULT_RUN.replace(batch_size=batch, seq_len=seq_len, steps_per_call=1)
    model = models.build_model("transformer", cfg)
    tx = train.make_optimizer(tc, cfg.d_model)
    step = jax.jit(functools.partial(train.train_steps, apply_fn=model.apply, tx=tx),
                   donate_argnums=0)
    state = train.init_state(model, tx, seed=0, seq_len=seq_len)
    tokens = data.load_corpus().train
    flops = accounting.lm_flops_per_token(state.params, cfg, seq_len)

    def batches(i):
        return data.train_batches(tokens, seed=0, step=i, num_steps=1, batch_size=batch,
                                  seq_len=seq_len)

    fn = step.lower(state, batches(0)).compile()  # compiled once: its HLO names the ops
    categories = hlo_categories(fn.as_text())
    for i in range(2):  # warm up
        state, m = fn(state, batches(i))
    jax.block_until_ready(m)
    walls = []
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for i in range(steps):
                t0 = time.perf_counter()
                state, m = fn(state, batches(2 + i))
                jax.block_until_ready(m)
                walls.append(time.perf_counter() - t0)
        totals = _trace_events(trace_dir)
    per_cat = dict.fromkeys(CATEGORIES, 0.0)
    ops = []
    for name, ns in totals.items():
        cat = categories.get(name, "other")
        per_cat[cat] += ns / 1e6 / steps
        ops.append({"op": name, "category": cat, "thread_ms_per_step": ns / 1e6 / steps})
    ops.sort(key=lambda r: -r["thread_ms_per_step"])
    return per_cat, ops, 1e3 * sorted(walls)[len(walls) // 2], flops


def main(argv=None) -> int:
    parser = common.arg_parser(__doc__, "3 traced steps")
    for flag, default in (("--layers", 6), ("--d-model", 384), ("--heads", 6), ("--d-ff", 1536),
                          ("--seq-len", 256), ("--batch", 16)):
        parser.add_argument(flag, type=int, default=default)
    parser.add_argument("--preset", default="cpu-gpt", help="the options (norm, activation, ...)")
    parser.add_argument("--steps", type=int, default=None, help="traced steps (3 quick, 10)")
    parser.add_argument("--top", type=int, default=25, help="ops listed")
    args = parser.parse_args(argv)
    steps = args.steps or (3 if args.quick else 10)
    shape = (args.layers, args.d_model, args.heads, args.d_ff, args.seq_len, args.batch)
    probe = metrics.cpu_matmul_probe.__wrapped__() if jax.default_backend() == "cpu" else None
    per_cat, ops, wall_ms, flops = profile(*shape, steps, args.preset)
    tokens = args.batch * args.seq_len
    mfu = tokens * flops / (wall_ms / 1e3) / probe if probe else None
    name = f"{args.layers}×{args.d_model}, F {args.d_ff}, T {args.seq_len}, B {args.batch}"
    payload = {"machine": common.describe_machine(), "shape": name, "preset": args.preset,
               "steps": steps, "wall_ms_per_step": wall_ms, "tokens_per_s": tokens / wall_ms * 1e3,
               "mflop_per_token": flops / 1e6, "cpu_probe_flops": probe, "mfu_vs_probe": mfu,
               "categories_thread_ms_per_step": per_cat, "ops": ops[:100]}
    total = sum(per_cat.values())
    cat_rows = [{"category": c, "ms": v, "share": v / total} for c, v in per_cat.items()]
    md = "\n".join([
        f"# Train-step profile: {name} ({args.preset} options)", "",
        f"Machine: {payload['machine']['device']}; {payload['machine']['date']}. Wall "
        f"{wall_ms:.0f} ms/step (median of {steps} traced), {payload['tokens_per_s']:.0f} "
        f"tokens/s" + (f", MFU {100 * mfu:.1f}% of the {probe / 1e9:.0f} GFLOP/s matmul probe"
                       if mfu else "") + ".", "",
        common.markdown_table(cat_rows, [("category", "category"), ("ms", "thread ms/step"),
                                         ("share", "share")]), "",
        common.markdown_table(ops[:args.top], [("op", "XLA op"), ("category", "category"),
                                               ("thread_ms_per_step", "thread ms/step")]),
    ])
    folder = common.write_results("profile_step", payload, md, args.out)
    print(md)
    print(f"wrote {folder}/results.json, results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
