"""Memory and compile time at scale: rematerialisation and scanned layers, measured by XLA.

    python benchmarks/memory.py --quick     # ≤ 2-3 min on 2 CPU cores
    python benchmarks/memory.py             # also unrolled layers (remat, 24-layer compile)

Two questions, both answered from the compiled train step without running it (so the numbers
hold on a CPU for shapes that would need an accelerator's memory to run):

* **Remat** (``--remat none|block|dots``): memory of one optimizer step of ``gpt2-small``
  (12 × 768, vocabulary 50257) at T 1024, B 8, two ways: XLA's temporary buffers
  (``jax.jit(step).lower(...).compile().memory_analysis()``) and the residuals the forward
  pass keeps for the backward (the leaves of the ``jax.vjp`` closure: what remat decides).
  On the CPU, XLA's temp size shows the saving only for scanned layers: with the blocks
  unrolled, its scheduler runs the recomputation early, so the measured temp barely moves
  even though the saved residuals shrink. Ratios are against ``none``, in the same run.
* **Scanned layers** (``--scan-layers``): wall time of ``lower(...).compile()`` of the train
  step for 2, 12 and 24 layers, scanned and not (a 256-wide LM: compile time depends on the
  graph, not on tensor sizes). The ratio is against the 2-layer step of the same layout.

Writes results.json (with the machine), results.md and compile_time.png into
benchmarks/results/memory/.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout: benchmarks.common and transformer_jax

from benchmarks import common  # noqa: E402
from transformer_jax import models, train  # noqa: E402
from transformer_jax.config import PRESETS, RECIPES  # noqa: E402
from transformer_jax.models import accounting  # noqa: E402
from transformer_jax.runs import metrics  # noqa: E402

DEFAULT_RUN = RECIPES["cpu-lm"].train  # the default run's training settings

REMAT_SHAPE = {"preset": "gpt2-small", "seq_len": 1024, "batch": 8}
COMPILE_CFG = dataclasses.replace(PRESETS["cpu-gpt"], d_model=256, num_heads=4, num_kv_heads=4,
                                  d_ff=1024, max_len=128)
COMPILE_T, COMPILE_B = 128, 4


def _compiled_step(cfg, seq_len: int, batch: int):
    """(compiled one-step train function, seconds to lower and compile it, fresh-state fn)."""
    model = models.build_model("transformer", cfg)
    tc = DEFAULT_RUN.replace(batch_size=batch, seq_len=seq_len, steps_per_call=1)
    tx = train.make_optimizer(tc, cfg.d_model)
    fresh = functools.partial(train.init_state, model, tx, seed=0, seq_len=seq_len)
    state = jax.eval_shape(fresh)
    batches = jax.ShapeDtypeStruct((1, batch, seq_len + 1), jnp.int32)
    step = functools.partial(train.train_steps, apply_fn=model.apply, tx=tx)
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0,)).lower(state, batches).compile()
    return compiled, time.perf_counter() - t0, fresh


def _tokens_per_s(compiled, fresh, cfg, seq_len: int, batch: int, steps: int) -> dict:
    """Median step time of ``steps`` timed calls (after one warm-up): tokens/s and MFU."""
    state = fresh()
    batches = jax.random.randint(jax.random.PRNGKey(1), (1, batch, seq_len + 1), 0,
                                 cfg.vocab_size)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        state, out = compiled(state, batches)
        jax.block_until_ready(out)
        if i:  # the first call pays for transfers and allocation
            times.append(time.perf_counter() - t0)
    tok_s = batch * seq_len / statistics.median(times)
    params = jax.eval_shape(lambda: fresh().params)
    flops = accounting.lm_flops_per_token(params, cfg, seq_len)
    peak, _ = metrics.peak_flops(jax.devices())
    return {"tokens_per_s": tok_s, "mfu": tok_s * flops / peak}


def _residual_bytes(cfg, seq_len: int, batch: int) -> int:
    """Bytes the forward pass keeps for the backward (the vjp's residuals; what remat cuts)."""
    model = models.build_model("transformer", cfg)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                               jnp.zeros((1, 8), jnp.int32)))["params"]
    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)

    def residuals(p, x):  # the vjp closure is a pytree whose leaves are the residuals
        return jax.vjp(lambda q: model.apply({"params": q}, x).mean(), p)[1]

    shapes = jax.eval_shape(residuals, params, tokens)
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(shapes))


def remat_memory(layouts: tuple[bool, ...], dtype: str, run_steps: int) -> list[dict]:
    """Temporary bytes of the gpt2-small step for each remat setting and layer layout."""
    rows = []
    base = PRESETS[REMAT_SHAPE["preset"]]
    T, B = REMAT_SHAPE["seq_len"], REMAT_SHAPE["batch"]
    for scan in layouts:
        for remat in ("none", "block", "dots"):
            cfg = dataclasses.replace(base, remat=remat, scan_layers=scan, dropout_rate=0.0,
                                      dtype=dtype)
            compiled, seconds, fresh = _compiled_step(cfg, T, B)
            mem = compiled.memory_analysis()
            rows.append({"scan_layers": scan, "remat": remat,
                         "temp_bytes": int(mem.temp_size_in_bytes),
                         "residual_bytes": _residual_bytes(cfg, T, B),
                         "argument_bytes": int(mem.argument_size_in_bytes), "compile_s": seconds})
            if run_steps:
                rows[-1].update(_tokens_per_s(compiled, fresh, cfg, T, B, run_steps))
            print(f"scan {scan!s:5s} remat {remat:5s}: XLA temp "
                  f"{mem.temp_size_in_bytes / 2**30:.2f} GiB, residuals "
                  f"{rows[-1]['residual_bytes'] / 2**30:.2f} GiB, compile {seconds:.1f} s",
                  flush=True)
    for row in rows:
        none = next(r for r in rows if r["scan_layers"] == row["scan_layers"]
                    and r["remat"] == "none")
        row["temp_ratio_vs_none"] = row["temp_bytes"] / none["temp_bytes"]
        row["residual_ratio_vs_none"] = row["residual_bytes"] / none["residual_bytes"]
    return rows


def compile_times(depths: tuple[int, ...], unscanned_depths: tuple[int, ...]) -> list[dict]:
    """Compile seconds of the train step by depth, scanned and not.

    One untimed compile of each layout first: the first compile of a process also pays for
    one-time tracing and compilation of shared helpers, which would inflate the first point.
    """
    for scan in (True, False):
        _compiled_step(dataclasses.replace(COMPILE_CFG, num_decoder_layers=1, scan_layers=scan),
                       COMPILE_T, COMPILE_B)
    rows = []
    for scan, layer_counts in ((True, depths), (False, unscanned_depths)):
        for layers in layer_counts:
            cfg = dataclasses.replace(COMPILE_CFG, num_decoder_layers=layers, scan_layers=scan)
            _, seconds, _ = _compiled_step(cfg, COMPILE_T, COMPILE_B)
            rows.append({"scan_layers": scan, "layers": layers, "compile_s": seconds})
            print(f"scan {scan!s:5s} layers {layers:2d}: compile {seconds:.1f} s", flush=True)
    for row in rows:
        first = next(r for r in rows if r["scan_layers"] == row["scan_layers"])
        row["ratio_vs_shallowest"] = row["compile_s"] / first["compile_s"]
    return rows


def _plot(rows: list[dict], path: Path) -> None:
    fig, ax = common.figure(figsize=(5.5, 3.8))
    for scan, label in ((True, "scanned (nn.scan)"), (False, "unrolled")):
        points = [(r["layers"], r["compile_s"]) for r in rows if r["scan_layers"] == scan]
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    ax.set_xlabel("layers")
    ax.set_ylabel("train-step compile time (s)")
    ax.set_title("Compile time vs depth")
    ax.legend()
    common.save_figure(fig, path)


def main(argv=None) -> int:
    parser = common.arg_parser(__doc__, "scanned layers for remat, and the compile curve "
                                        "without the unrolled 24-layer step")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype of the gpt2-small step (default: %(default)s)")
    parser.add_argument("--run", type=int, default=0, metavar="STEPS",
                        help="also run each gpt2-small step STEPS times and report tokens/s "
                             "and MFU (needs the device memory; for accelerators)")
    args = parser.parse_args(argv)
    machine = common.describe_machine()
    memory = remat_memory((True,) if args.quick else (True, False), args.dtype, args.run)
    curve = compile_times((2, 12, 24), (2, 12) if args.quick else (2, 12, 24))
    block = next(r for r in memory if r["remat"] == "block" and r["scan_layers"])[
        "temp_ratio_vs_none"]
    deep = next(r for r in curve if r["scan_layers"] and r["layers"] == 24)["ratio_vs_shallowest"]
    goals = [
        {"target": "remat=block XLA temp memory vs none (gpt2-small, T 1024, B 8, scanned)",
         "value": block, "limit": "≤ 0.333", "met": block <= 1 / 3},
        {"target": "scanned 24-layer compile vs scanned 2-layer", "value": deep,
         "limit": "≤ 1.5", "met": deep <= 1.5},
    ]
    markdown = "\n\n".join([
        f"Machine: {machine['device']}, jax {machine['jax_version']}, {machine['date']}",
        common.markdown_table(
            [{**r, "temp_gib": r["temp_bytes"] / 2**30,
              "residual_gib": r["residual_bytes"] / 2**30} for r in memory],
            [("scan_layers", "scanned"), ("remat", "remat"), ("temp_gib", "XLA temp (GiB)"),
             ("temp_ratio_vs_none", "vs none"), ("residual_gib", "residuals (GiB)"),
             ("residual_ratio_vs_none", "vs none"), ("compile_s", "compile (s)"),
             ("tokens_per_s", "tokens/s"), ("mfu", "MFU")]),
        common.markdown_table(curve, [("scan_layers", "scanned"), ("layers", "layers"),
                                      ("compile_s", "compile (s)"),
                                      ("ratio_vs_shallowest", "vs 2 layers")]),
        common.targets_table(goals)])
    out = common.write_results("memory", {"machine": machine, "quick": args.quick,
                                          "dtype": args.dtype,
                                          "remat": memory, "compile": curve, "goals": goals},
                               markdown, args.out)
    _plot(curve, out / "compile_time.png")
    common.print_targets(goals, lambda x: f"{x:.3f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
