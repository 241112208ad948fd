"""Shared helpers for the benchmark scripts: timing, machine description, result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import jax

RESULTS_ROOT = Path(__file__).resolve().parent / "results"


def fake_cpu_devices(n: int) -> None:
    """Ask XLA for ``n`` CPU devices; call before JAX initialises its backend (first jax use).

    On accelerators the flag is ignored. An explicit count already in XLA_FLAGS wins.
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


def time_round_robin(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall seconds per call of each function, interleaved so load hits all alike.

    Every function is called once first (warm-up, after compilation), then `repeats` rounds
    call each one in turn; each call is blocked until its result is ready.
    """
    for fn in fns.values():
        jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


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


def write_results(name: str, payload: dict, markdown: str, out_dir: Path | None = None) -> Path:
    """Write results.json and results.md under benchmarks/results/<name>/ (or out_dir)."""
    out = Path(out_dir) if out_dir else RESULTS_ROOT / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / "results.md").write_text(markdown + "\n")
    return out
