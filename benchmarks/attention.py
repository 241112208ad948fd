"""How fast and how lean is our attention kernel? Time and compiled memory vs sequence length.

Compares, in one run and on one machine:
  * ``exact``     — transformer_jax, exact path (scores materialised; causal rows in chunks)
  * ``blockwise`` — transformer_jax, online softmax over key blocks, recomputing backward
  * ``jax.nn``    — ``jax.nn.dot_product_attention`` (the XLA path), the baseline of the ratios
  * ``naive``     — a plain einsum + masked softmax + einsum, as most tutorials write it
  * ``exact, dropout 0.1`` — the exact path with dropout on the probabilities (forward+backward
    points only): what the hashed masks cost over ``exact`` (``jax.nn`` has no dropout)

For each point it records forward and forward+backward wall time (median of interleaved
repeats after a warm-up) and the compiled temporary memory
(``jax.jit(f).lower(...).compile().memory_analysis().temp_size_in_bytes``). Points whose
temporaries would not fit comfortably in memory are compiled (memory recorded) but not run.

Beside the sweep, every run records:
  * compile time: ``.lower(...).compile()`` of a fresh ``jit`` of causal forward+grad at
    B4 T1024 N8 H64, median of interleaved compiles, for exact, blockwise and jax.nn;
  * collectives: in a child process on 8 fake CPU devices, the collective ops in the compiled
    HLO with the batch and head axes sharded on an Auto mesh (B over 2, N and K over 4), for
    each implementation, forward and forward+backward; and ring attention's, sequence sharded;
  * ring attention (``--ring``): per-device compiled memory and time of causal forward+grad
    over P = 1, 2, 4, … devices of the machine (fake CPU devices here: ``--ring-devices``),
    beside the exact and blockwise paths on one device.

    python benchmarks/attention.py --quick      # the target points, ≤ 2 minutes on 2 cores
    python benchmarks/attention.py              # the sweep T = 256 … 16384, causal and not
    python benchmarks/attention.py --ring --ring-devices 8   # ring attention only
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout: benchmarks.common and transformer_jax

from benchmarks import common
from transformer_jax.attention import dot_product_attention, ring_attention

IMPLS = ("exact", "blockwise", "jax.nn", "naive")
DROPOUT = "exact, dropout 0.1"
N_HEADS, HEAD_DIM = 8, 64
# Do not run a point whose compiled temporaries exceed this (the machine has 24 GB).
RUN_LIMIT_BYTES = 6 * 2**30


def naive_attention(q, k, v, *, is_causal):
    """The textbook version: [B, N, T, S] scores, boolean mask, softmax, weighted sum."""
    scores = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    if is_causal:
        T, S = scores.shape[-2:]
        scores = jnp.where(jnp.tril(jnp.ones((T, S), bool)), scores, -1e30)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(scores, axis=-1), v)


def attention_fn(impl: str, is_causal: bool):
    if impl == "jax.nn":
        return functools.partial(jax.nn.dot_product_attention, is_causal=is_causal)
    if impl == "naive":
        return functools.partial(naive_attention, is_causal=is_causal)
    if impl == DROPOUT:
        return functools.partial(dot_product_attention, is_causal=is_causal,
                                 implementation="exact", dropout_rate=0.1,
                                 dropout_rng=jax.random.PRNGKey(0))
    return functools.partial(dot_product_attention, is_causal=is_causal, implementation=impl)


def _fwd_grad(f):
    """d/d(q, k, v) of <out, ct>: the cotangent is an input, so nothing folds away. (A sum of
    products, not ``jnp.vdot``: vdot flattens, which all-gathers a sharded output.)"""
    return jax.grad(lambda q, k, v, ct: jnp.sum(f(q, k, v) * ct), argnums=(0, 1, 2))


def compiled(impl: str, is_causal: bool, mode: str, shape, dtype):
    """(compiled executable, its temp bytes) for forward or forward+backward."""
    f = attention_fn(impl, is_causal)
    if mode == "fwd":
        fn = jax.jit(f)
    else:
        # d/d(q, k, v) of <out, ct>: the cotangent is an input, so nothing folds away.
        fn = jax.jit(_fwd_grad(f))
    spec = jax.ShapeDtypeStruct(shape, dtype)
    args = (spec,) * (3 if mode == "fwd" else 4)
    exe = fn.lower(*args).compile()
    mem = exe.memory_analysis()
    return exe, int(mem.temp_size_in_bytes) if mem is not None else None


def measure_point(B, T, is_causal, mode, dtype, impls, repeats, run=True):
    shape = (B, T, N_HEADS, HEAD_DIM)
    keys = jax.random.split(jax.random.PRNGKey(T), 4)
    args = [jax.random.normal(k, shape, jnp.float32).astype(dtype) for k in keys]
    args = args[:3] if mode == "fwd" else args
    records, runnable = [], {}
    for impl in impls:
        exe, temp = compiled(impl, is_causal, mode, shape, dtype)
        rec = {"impl": impl, "batch": B, "seq_len": T, "causal": is_causal, "mode": mode,
                   "dtype": jnp.dtype(dtype).name, "temp_bytes": temp, "time_s": None, "rounds": None}
        records.append(rec)
        if run and (temp is None or temp <= RUN_LIMIT_BYTES):
            runnable[impl] = functools.partial(exe, *args)
    if runnable:
        times = common.time_round_robin(runnable, repeats)
        for rec in records:
            rec["time_s"] = times.get(rec["impl"])
            rec["rounds"] = repeats if rec["time_s"] is not None else None
    base = next((r for r in records if r["impl"] == "jax.nn"), None)
    for rec in records:
        if base and base["time_s"] and rec["time_s"]:
            rec["time_vs_jax_nn"] = rec["time_s"] / base["time_s"]
        if base and base["temp_bytes"] and rec["temp_bytes"] is not None:
            rec["mem_vs_jax_nn"] = rec["temp_bytes"] / base["temp_bytes"]
    tag = f"B={B} T={T} {'causal' if is_causal else 'full'} {mode} {rec['dtype']}"
    print(tag + ": " + ", ".join(
        f"{r['impl']} {r['time_s'] * 1e3:.1f} ms" if r["time_s"] else f"{r['impl']} (not run)"
        for r in records), flush=True)
    return records


def plan(quick: bool, dtypes):
    """(B, T, causal, mode, dtype, impls, run) points; quick keeps just the target points.

    ``run=False`` compiles for the memory figure only (T 16384 fwd+bwd takes ~20 s a call).
    """
    if quick:
        return [
            (4, 1024, True, "fwd", jnp.float32, IMPLS, True),
            (4, 1024, True, "fwdbwd", jnp.float32, IMPLS + (DROPOUT,), True),
            (4, 4096, True, "fwd", jnp.float32, ("exact", "blockwise"), True),
            (1, 16384, True, "fwdbwd", jnp.float32, IMPLS, False),
        ]
    points = []
    for dtype in dtypes:
        for T in (256, 512, 1024, 2048, 4096, 8192, 16384):
            B = 4 if T <= 4096 else 1
            for causal in (True, False):
                for mode in ("fwd", "fwdbwd"):
                    impls = IMPLS + (DROPOUT,) if mode == "fwdbwd" and T <= 4096 else IMPLS
                    points.append((B, T, causal, mode, dtype, impls, True))
    return points


COMPILE_SHAPE = (4, 1024, N_HEADS, HEAD_DIM)
COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter")


def compile_times(rounds: int) -> list[dict]:
    """Seconds to lower and to compile a fresh ``jit`` of causal fwd+grad at COMPILE_SHAPE.

    A fresh function each round, so nothing is reused from an earlier compile; rounds are
    interleaved over the implementations, so the machine's load hits them alike.
    """
    spec = jax.ShapeDtypeStruct(COMPILE_SHAPE, jnp.float32)
    times = {impl: ([], []) for impl in ("exact", "blockwise", "jax.nn")}
    for _ in range(rounds):
        for impl, (lower_s, compile_s) in times.items():
            fn = jax.jit(_fwd_grad(attention_fn(impl, True)))
            start = time.perf_counter()
            lowered = fn.lower(spec, spec, spec, spec)
            mid = time.perf_counter()
            lowered.compile()
            lower_s.append(mid - start)
            compile_s.append(time.perf_counter() - mid)
    base = statistics.median(times["jax.nn"][1])
    records = [{"impl": impl, "shape": list(COMPILE_SHAPE), "rounds": rounds,
                    "lower_s": statistics.median(lo), "compile_s": statistics.median(co),
                    "compile_vs_jax_nn": statistics.median(co) / base}
               for impl, (lo, co) in times.items()]
    print("compile (causal fwd+grad B4 T1024): " + ", ".join(
        f"{r['impl']} {r['compile_s']:.2f} s" for r in records), flush=True)
    return records


def count_collectives(hlo: str) -> dict[str, int]:
    """Collective ops in a compiled module's text (an async ``-start`` counted once)."""
    return {name: len(re.findall(rf"= [^=]*\b{name}(-start)?\(", hlo)) for name in COLLECTIVES}


def collectives_here() -> list[dict]:
    """(Run on 8 devices.) Collectives of each implementation with batch and heads sharded on
    an Auto mesh, and of ring attention with the sequence sharded."""
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    B, T = 4, 256  # where data moves does not depend on T; compiling is quicker
    rows = []
    for kv_heads in (N_HEADS, 4):
        sharded = NamedSharding(mesh, P("data", None, "model", None))
        shapes = [jax.ShapeDtypeStruct((B, T, heads, HEAD_DIM), jnp.float32, sharding=sharded)
                  for heads in (N_HEADS, kv_heads, kv_heads)]
        for impl in ("exact", "blockwise", "jax.nn"):
            f = attention_fn(impl, True)
            for mode, fn, args in (("fwd", f, shapes), ("fwdbwd", _fwd_grad(f), shapes * 2)):
                hlo = jax.jit(fn).lower(*args[:4]).compile().as_text()
                rows.append(dict(impl=impl, mode=mode, kv_heads=kv_heads,
                                 sharded="B over 2, heads over 4", **count_collectives(hlo)))
    ring_mesh = jax.make_mesh((4,), ("seq",), axis_types=(AxisType.Auto,),
                              devices=jax.devices()[:4])
    seq = NamedSharding(ring_mesh, P(None, "seq"))
    shapes = [jax.ShapeDtypeStruct((1, T, N_HEADS, HEAD_DIM), jnp.float32, sharding=seq)] * 4
    f = functools.partial(ring_attention, mesh=ring_mesh, axis_name="seq", is_causal=True)
    for mode, fn in (("fwd", f), ("fwdbwd", _fwd_grad(f))):
        n_args = 3 if mode == "fwd" else 4
        hlo = jax.jit(fn).lower(*shapes[:n_args]).compile().as_text()
        rows.append(dict(impl="ring", mode=mode, kv_heads=N_HEADS, sharded="T over 4",
                         **count_collectives(hlo)))
    return rows


def collectives() -> list[dict]:
    """:func:`collectives_here` in a child process with 8 fake CPU devices (XLA reads the
    device count once, at start-up; the timed points here run on the default device)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    done = subprocess.run([sys.executable, __file__, "--collectives-child"], env=env,
                          capture_output=True, text=True, check=True)
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    print("collectives (B, heads sharded): " + ", ".join(
        f"{r['impl']} {r['mode']} K{r['kv_heads']} {sum(r[c] for c in COLLECTIVES)}"
        for r in rows), flush=True)
    return rows


def ring_points(quick: bool) -> list[dict]:
    """Ring attention's causal fwd+grad over P = 1, 2, 4, … of this machine's devices against
    the exact and blockwise paths on one device: temp memory per device and time (B1, T 4096,
    or 2048 with ``quick``)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    T = 2048 if quick else 4096
    shape = (1, T, N_HEADS, HEAD_DIM)
    args = [jax.random.normal(k, shape, jnp.float32) for k in jax.random.split(
        jax.random.PRNGKey(0), 4)]
    counts = [n for n in (1, 2, 4, 8, 16) if n <= len(jax.devices())]
    records, runnable = [], {}
    for name in ["exact", "blockwise"] + [f"ring P={n}" for n in counts]:
        if name.startswith("ring"):
            n = int(name.split("=")[1])
            mesh = jax.make_mesh((n,), ("seq",), devices=jax.devices()[:n])
            f = functools.partial(ring_attention, mesh=mesh, axis_name="seq", is_causal=True)
            placed = [jax.device_put(x, NamedSharding(mesh, P(None, "seq"))) for x in args]
        else:
            f, placed = attention_fn(name, True), args
        exe = jax.jit(_fwd_grad(f)).lower(*placed).compile()
        temp = exe.memory_analysis().temp_size_in_bytes
        records.append({"impl": name, "batch": 1, "seq_len": T, "causal": True, "mode": "fwdbwd",
                            "temp_mib_per_device": temp / 2**20, "time_s": None})
        runnable[name] = functools.partial(exe, *placed)
    times = common.time_round_robin(runnable, 3 if quick else 5)
    for rec in records:
        rec["time_s"] = times[rec["impl"]]
    print(f"ring (B1 T{T} causal fwd+grad): " + ", ".join(
        f"{r['impl']} {r['temp_mib_per_device']:.0f} MiB {r['time_s'] * 1e3:.0f} ms"
        for r in records), flush=True)
    return records


def find(records, **kw):
    for r in records:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def targets(records, compiles=(), sharded=()) -> list[dict]:
    """The kernel's targets, as ratios of times or memory measured in this run."""
    out = []
    exact = next((r for r in compiles if r["impl"] == "exact"), None)
    if exact:
        r = exact["compile_vs_jax_nn"]
        out.append({"target": "exact compile time / jax.nn (causal fwd+grad B4 T1024)",
                        "value": r, "limit": "≤ 2", "met": r <= 2})
    ours = [r for r in sharded if r["impl"] in ("exact", "blockwise")]
    if ours:
        n = sum(r[c] for r in ours for c in COLLECTIVES)
        out.append({"target": "collectives, exact + blockwise, B and heads sharded",
                        "value": float(n), "limit": "0", "met": n == 0})

    def ratio(a, b, key):
        if a and b and a.get(key) and b.get(key):
            return a[key] / b[key]
        return None

    p = {"batch": 4, "seq_len": 1024, "causal": True, "dtype": "float32"}
    for mode, limit in (("fwd", 0.6), ("fwdbwd", 0.8)):
        r = ratio(find(records, impl="exact", mode=mode, **p),
                  find(records, impl="jax.nn", mode=mode, **p), "time_s")
        out.append({"target": f"exact {mode} time / jax.nn (B4 T1024 causal)", "value": r,
                        "limit": f"≤ {limit}", "met": None if r is None else r <= limit})
    p4 = {"batch": 4, "seq_len": 4096, "causal": True, "dtype": "float32", "mode": "fwd"}
    r = ratio(find(records, impl="blockwise", **p4), find(records, impl="exact", **p4), "time_s")
    out.append({"target": "blockwise fwd time / exact (B4 T4096 causal)", "value": r,
                    "limit": "≤ 0.75", "met": None if r is None else r <= 0.75})
    p16 = {"batch": 1, "seq_len": 16384, "causal": True, "dtype": "float32", "mode": "fwdbwd"}
    r = ratio(find(records, impl="blockwise", **p16), find(records, impl="exact", **p16),
              "temp_bytes")
    out.append({"target": "blockwise fwd+bwd temp memory / exact (B1 T16384 causal)", "value": r,
                    "limit": "≤ 0.125", "met": None if r is None else r <= 0.125})
    return out


def plot(records, out_dir: Path) -> None:
    fig, axes = common.figure(3, figsize=(15, 4.2), dpi=110)
    for ax, (mode, key, label) in zip(axes, [("fwd", "time_s", "forward time (s)"),
                                             ("fwdbwd", "time_s", "forward+backward time (s)"),
                                             ("fwdbwd", "temp_bytes", "fwd+bwd temp memory (B)")]):
        for impl in IMPLS + (DROPOUT,):
            pts = sorted((r["seq_len"], r[key] / r["batch"]) for r in records
                         if r["impl"] == impl and r["mode"] == mode and r["causal"]
                         and r["dtype"] == "float32" and r.get(key))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set(xscale="log", yscale="log", xlabel="sequence length T",
               ylabel=label + " per example", title=f"causal, N={N_HEADS}, H={HEAD_DIM}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    common.save_figure(fig, out_dir / "attention.png")


def _ring_main(args, machine) -> None:
    records = ring_points(args.quick)
    columns = [("impl", "impl"), ("batch", "B"), ("seq_len", "T"), ("mode", "mode"),
               ("temp_mib_per_device", "temp MiB per device"), ("time_ms", "time (ms)")]
    rows = [dict(r, time_ms=r["time_s"] * 1e3) for r in records]
    md = [(f"# Ring attention\n\nDevice: {machine['device']} x {machine['device_count']}; "
           f"jax {machine['jax_version']}; {machine['date']}. N={N_HEADS}, H={HEAD_DIM}, "
           "causal forward+grad; ring over P devices, exact and blockwise on one.\n"),
          common.markdown_table(rows, columns)]
    out = common.write_results("attention", dict(machine, records=records, quick=args.quick),
                               "\n".join(md), args.out or common.RESULTS_ROOT / "attention" / "ring")
    print(f"wrote {out}/results.json, results.md")


def _points(args, repeats: int, dtypes) -> list[dict]:
    records = []
    for B, T, causal, mode, dtype, impls, run in plan(args.quick, dtypes):
        if T <= 2048:
            reps = repeats
        elif args.quick:
            # The one long quick point gets more rounds, not fewer: on a shared CPU the
            # blockwise path's time per call at T 4096 can be bimodal, and the median of a
            # few rounds lands on either mode (benchmarks/results/attention/NOTES.md).
            reps = 2 * repeats - 1
        else:
            reps = max(3, repeats // 2)
        records.extend(measure_point(B, T, causal, mode, dtype, impls, reps, run))
    return records


def main(argv=None) -> int:
    parser = common.arg_parser(__doc__, "only the target points (≤ 2 min)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per point")
    parser.add_argument("--bf16", action="store_true", help="also sweep bfloat16 inputs")
    parser.add_argument("--ring", action="store_true",
                        help="only ring attention over the machine's devices")
    parser.add_argument("--ring-devices", type=int, default=None,
                        help="with --ring on a CPU: this many fake CPU devices")
    parser.add_argument("--collectives-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.collectives_child:
        print(json.dumps(collectives_here()))
        return 0
    if args.ring_devices:
        common.fake_cpu_devices(args.ring_devices)  # before JAX starts its backend
    repeats = args.repeats or (5 if args.quick else 7)
    dtypes = [jnp.float32] + ([jnp.bfloat16] if args.bf16 else [])
    machine = common.describe_machine()
    print(f"device: {machine['device']}", flush=True)
    if args.ring:
        _ring_main(args, machine)
        return 0
    records = _points(args, repeats, dtypes)
    compiles = compile_times(3 if args.quick else 5)
    sharded = collectives()
    goals = targets(records, compiles, sharded)
    columns = [("impl", "impl"), ("batch", "B"), ("seq_len", "T"), ("causal", "causal"),
               ("mode", "mode"), ("dtype", "dtype"), ("time_ms", "time (ms)"), ("rounds", "runs"),
               ("time_vs_jax_nn", "time / jax.nn"), ("temp_mib", "temp MiB"),
               ("mem_vs_jax_nn", "mem / jax.nn")]
    rows = [dict(r, time_ms=None if r["time_s"] is None else r["time_s"] * 1e3,
                 temp_mib=None if r["temp_bytes"] is None else r["temp_bytes"] / 2**20)
            for r in records]
    md = [(f"# Attention kernel benchmark\n\nDevice: {machine['device']}; "
           f"jax {machine['jax_version']}; {machine['date']}. N={N_HEADS}, H={HEAD_DIM}; "
           "times are medians of interleaved runs (column runs).\n"),
          "## Targets\n", common.targets_table(goals),
          ("\n## Compile time\n\nA fresh `jit` of causal forward+grad at B4 T1024, "
           "`.lower().compile()`, median of interleaved rounds.\n"),
          common.markdown_table(compiles, [("impl", "impl"), ("lower_s", "lower (s)"),
                                           ("compile_s", "compile (s)"),
                                           ("compile_vs_jax_nn", "compile / jax.nn"),
                                           ("rounds", "rounds")]),
          ("\n## Collectives in the compiled HLO\n\n8 fake CPU devices, Auto mesh; causal "
           "attention, B4 T256. Ring attention shards T; the others shard B and the heads "
           "(N, and K when K = 4).\n"),
          common.markdown_table(sharded, [("impl", "impl"), ("mode", "mode"),
                                          ("kv_heads", "K"), ("sharded", "sharded")]
                                + [(c, c) for c in COLLECTIVES]),
          "\n## All points\n", common.markdown_table(rows, columns)]
    out = common.write_results(
        "attention", dict(machine, device=machine["device"], records=records, targets=goals,
                          compile_times=compiles, collectives=sharded, repeats=repeats,
                          quick=args.quick),
        "\n".join(md), args.out)
    plot(records, out)
    common.print_targets(goals, lambda v: f"{v:.3f}")
    print(f"wrote {out}/results.json, results.md, attention.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
