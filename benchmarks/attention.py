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

    python benchmarks/attention.py --quick      # the target points, ≤ 2 minutes on 2 cores
    python benchmarks/attention.py              # the sweep T = 256 … 16384, causal and not
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout: benchmarks.common and transformer_jax

from benchmarks import common  # noqa: E402
from transformer_jax.attention import dot_product_attention  # noqa: E402

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


def compiled(impl: str, is_causal: bool, mode: str, shape, dtype):
    """(compiled executable, its temp bytes) for forward or forward+backward."""
    f = attention_fn(impl, is_causal)
    if mode == "fwd":
        fn = jax.jit(f)
    else:
        # d/d(q, k, v) of <out, ct>: the cotangent is an input, so nothing folds away.
        fn = jax.jit(jax.grad(lambda q, k, v, ct: jnp.vdot(f(q, k, v), ct), argnums=(0, 1, 2)))
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
        rec = dict(impl=impl, batch=B, seq_len=T, causal=is_causal, mode=mode,
                   dtype=jnp.dtype(dtype).name, temp_bytes=temp, time_s=None, rounds=None)
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


def find(records, **kw):
    for r in records:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def targets(records) -> list[dict]:
    """The kernel's targets, as ratios of times or memory measured in this run."""
    out = []

    def ratio(a, b, key):
        if a and b and a.get(key) and b.get(key):
            return a[key] / b[key]
        return None

    p = dict(batch=4, seq_len=1024, causal=True, dtype="float32")
    for mode, limit in (("fwd", 0.6), ("fwdbwd", 0.8)):
        r = ratio(find(records, impl="exact", mode=mode, **p),
                  find(records, impl="jax.nn", mode=mode, **p), "time_s")
        out.append(dict(target=f"exact {mode} time / jax.nn (B4 T1024 causal)", value=r,
                        limit=f"≤ {limit}", met=None if r is None else r <= limit))
    p4 = dict(batch=4, seq_len=4096, causal=True, dtype="float32", mode="fwd")
    r = ratio(find(records, impl="blockwise", **p4), find(records, impl="exact", **p4), "time_s")
    out.append(dict(target="blockwise fwd time / exact (B4 T4096 causal)", value=r,
                    limit="≤ 0.75", met=None if r is None else r <= 0.75))
    p16 = dict(batch=1, seq_len=16384, causal=True, dtype="float32", mode="fwdbwd")
    r = ratio(find(records, impl="blockwise", **p16), find(records, impl="exact", **p16),
              "temp_bytes")
    out.append(dict(target="blockwise fwd+bwd temp memory / exact (B1 T16384 causal)", value=r,
                    limit="≤ 0.125", met=None if r is None else r <= 0.125))
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


def main(argv=None) -> int:
    parser = common.arg_parser(__doc__, "only the target points (≤ 2 min)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per point")
    parser.add_argument("--bf16", action="store_true", help="also sweep bfloat16 inputs")
    args = parser.parse_args(argv)
    repeats = args.repeats or (5 if args.quick else 7)
    dtypes = [jnp.float32] + ([jnp.bfloat16] if args.bf16 else [])
    machine = common.describe_machine()
    print(f"device: {machine['device']}", flush=True)
    records = []
    for B, T, causal, mode, dtype, impls, run in plan(args.quick, dtypes):
        if T <= 2048:
            reps = repeats
        elif args.quick:
            # The one long quick point gets more rounds, not fewer: on the shared 2-core CPU the
            # blockwise path's time per call at T 4096 is bimodal (620-670 ms or 880-1120 ms
            # in one 12-call run), and the median of 3 rounds landed on either mode
            # (ratios 0.66, 0.91, 1.00 in three quick runs of one day).
            reps = 2 * repeats - 1
        else:
            reps = max(3, repeats // 2)
        records.extend(measure_point(B, T, causal, mode, dtype, impls, reps, run))
    goals = targets(records)
    columns = [("impl", "impl"), ("batch", "B"), ("seq_len", "T"), ("causal", "causal"),
               ("mode", "mode"), ("dtype", "dtype"), ("time_ms", "time (ms)"), ("rounds", "runs"),
               ("time_vs_jax_nn", "time / jax.nn"), ("temp_mib", "temp MiB"),
               ("mem_vs_jax_nn", "mem / jax.nn")]
    rows = [dict(r, time_ms=None if r["time_s"] is None else r["time_s"] * 1e3,
                 temp_mib=None if r["temp_bytes"] is None else r["temp_bytes"] / 2**20)
            for r in records]
    md = [f"# Attention kernel benchmark\n\nDevice: {machine['device']}; "
          f"jax {machine['jax_version']}; {machine['date']}. N={N_HEADS}, H={HEAD_DIM}; "
          "times are medians of interleaved runs (column runs).\n",
          "## Targets\n", common.targets_table(goals),
          "\n## All points\n", common.markdown_table(rows, columns)]
    out = common.write_results(
        "attention", dict(machine, device=machine["device"], records=records, targets=goals,
                          repeats=repeats, quick=args.quick),
        "\n".join(md), args.out)
    plot(records, out)
    common.print_targets(goals, lambda v: f"{v:.3f}")
    print(f"wrote {out}/results.json, results.md, attention.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
