"""Shared helpers for the benchmark scripts: flags, devices, timing, figures and result files.

Every script takes ``--quick`` (its target points only) and ``--out`` (default
benchmarks/results/<name>/) and writes results.json (with :func:`describe_machine`),
results.md and its figures there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

RESULTS_ROOT = Path(__file__).resolve().parent / "results"


def arg_parser(doc: str, quick_help: str) -> argparse.ArgumentParser:
    """The flags every benchmark takes, ``--quick`` and ``--out``; scripts add their own.

    The description is the first paragraph of the script's docstring ``doc``.
    """
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default: benchmarks/results/<name>/)")
    return parser


def fake_cpu_devices(n: int) -> None:
    """Ask XLA for ``n`` CPU devices; call before JAX initialises its backend (first jax use).

    The fake devices share the host's cores (XLA already uses all of them for one device), so
    they test that a parallel path runs and what it costs, not a speed-up. On accelerators
    the flag is ignored. An explicit count already in XLA_FLAGS wins.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def describe_machine() -> dict:
    """Name the device the numbers were taken on (results without it are meaningless)."""
    dev = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    kind = dev.device_kind if dev.platform != "cpu" else f"CPU ({cpu}, {os.cpu_count()} cores)"
    return {
        "device": f"{dev.platform}: {kind}",
        "platform": dev.platform,
        "device_count": jax.device_count(),
        "jax_version": jax.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def round_robin_times(fns: dict[str, Callable[[], object]], min_rounds: int, *,
                      seconds: float = 0.0, warmups: int = 1) -> dict[str, list[float]]:
    """Wall seconds of every timed call of each function, interleaved so load hits all alike.

    Every function is called ``warmups`` times first (the first call compiles), then rounds
    call each one in turn until there are ``min_rounds`` rounds and ``seconds`` have passed;
    each call is blocked until its result is ready.
    """
    for _ in range(warmups):
        for fn in fns.values():
            jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    rounds, t_end = 0, time.perf_counter() + seconds
    while rounds < min_rounds or time.perf_counter() < t_end:
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
        rounds += 1
    return times


def time_round_robin(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall seconds per call of each function over ``repeats`` interleaved rounds,
    after one warm-up call each (:func:`round_robin_times`)."""
    times = round_robin_times(fns, repeats)
    return {name: statistics.median(ts) for name, ts in times.items()}


def lm_param_shapes(model) -> dict:
    """The ``params`` tree of a Flax language model as shapes only (nothing is allocated)."""
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, 8), jnp.int32)))["params"]


def lm_num_params(model) -> int:
    """Parameter count of a Flax language model, from its shapes."""
    from transformer_jax.models import count_params  # Flax: only the model benchmarks need it

    return count_params(lm_param_shapes(model))


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """A markdown table of `rows` with (key, header) columns; floats get 3 significant digits."""

    def fmt(value):
        if value is None:
            return "–"
        if isinstance(value, float):
            return f"{value:.3g}"
        return str(value)

    lines = ["| " + " | ".join(h for _, h in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(k)) for k, _ in columns) + " |")
    return "\n".join(lines)


def targets_table(goals: Sequence[dict]) -> str:
    """The markdown table of target rows (``target``, ``value``, ``limit``, ``met``)."""
    return markdown_table(goals, [("target", "target"), ("value", "measured"),
                                  ("limit", "target"), ("met", "met")])


def print_targets(goals: Sequence[dict], fmt: Callable[[float], str]) -> None:
    """One line per target: its measured value (``fmt``), or n/a, and its limit."""
    for g in goals:
        value = "n/a" if g["value"] is None else fmt(g["value"])
        print(f"{g['target']}: {value} (target {g['limit']})")


def figure(ncols: int = 1, *, figsize: tuple[float, float], dpi: int = 100):
    """(figure, axes) of one row of ``ncols`` plots, drawn without pyplot (no GUI backend,
    no global figure state)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    return fig, fig.subplots(1, ncols)


def save_figure(fig, path: Path) -> Path:
    """Lay out ``fig`` tightly and write it to ``path`` at the figure's dpi."""
    fig.tight_layout()
    fig.savefig(path)
    return path


def write_results(name: str, payload: dict, markdown: str, out_dir: Path | None = None) -> Path:
    """Write results.json and results.md under benchmarks/results/<name>/ (or out_dir)."""
    out = Path(out_dir) if out_dir else RESULTS_ROOT / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / "results.md").write_text(markdown + "\n")
    return out
