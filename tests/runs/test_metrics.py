"""Metric writers (JSONL + TensorBoard), FLOP counts, peak FLOP/s and the loss plot."""

import itertools
import json
import math
import types

import pytest

from transformer_jax.models import accounting
from transformer_jax.runs import metrics


def test_flops_per_token_formula():
    # 6·N + 12·L·T·D (Kaplan et al. 2020): the peer's 4×128 GPT at T=64 is ≈ 5.2 MFLOP per token.
    assert accounting.flops_per_token(n_params=1000, n_layers=2, seq_len=8, d_model=4) == 6000 + 768
    n = 12 * 4 * 128**2 + 65 * 128
    assert accounting.flops_per_token(n_params=n, n_layers=4, seq_len=64,
                                   d_model=128) == pytest.approx(5.16e6, rel=0.01)


@pytest.mark.parametrize("kind, expected", [
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5p", 459e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
])
def test_peak_flops_table_per_chip_times_devices(kind, expected):
    dev = types.SimpleNamespace(platform="gpu", device_kind=kind)
    flops, source = metrics.peak_flops([dev, dev])
    assert flops == 2 * expected and "2 ×" in source


def test_unknown_accelerator_gives_nan_not_a_guess():
    flops, source = metrics.peak_flops([types.SimpleNamespace(platform="gpu", device_kind="X1")])
    assert math.isnan(flops) and "unknown" in source


def test_cpu_probe_measures_a_plausible_rate(devices):
    rate = metrics.cpu_matmul_probe(256, 3)
    assert 1e8 < rate < 1e13
    # Fake CPU devices share the cores: the probe is not multiplied by the device count.
    flops, source = metrics.peak_flops(devices[:4])
    assert flops == metrics.cpu_matmul_probe() and "probe" in source


def test_writer_jsonl_tensorboard_and_resume_truncation(tmp_path):
    with metrics.MetricsWriter(tmp_path) as w:
        for step in (10, 20, 30):
            w.write({"step": step, "loss": 1.0 / step, "lr": 1e-3, "tokens_per_s": 100.0,
                     "mfu": 0.5})
        w.write({"step": 30, "loss": 0.1, "lr": 1e-3, "tokens_per_s": None, "mfu": None,
                 "val_loss": 1.5, "val_bpb": 1.5 / math.log(2)})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # strict JSON: no NaN tokens
    assert [r["step"] for r in records] == [10, 20, 30, 30]
    assert set(metrics.METRIC_KEYS) <= set(records[0]) and records[3]["tokens_per_s"] is None
    assert list(tmp_path.glob("tensorboard/events.out.tfevents.*"))
    # Resuming from step 20 drops what the interrupted run logged after its checkpoint.
    with metrics.MetricsWriter(tmp_path, resume_step=20) as w:
        w.write({"step": 30, "loss": 0.2, "lr": 1e-3, "tokens_per_s": 1.0, "mfu": 0.1})
    steps_losses = [(r["step"], r["loss"]) for r in metrics.read_jsonl(tmp_path / "metrics.jsonl")]
    assert steps_losses == [(10, 0.1), (20, 0.05), (30, 0.2)]
    # A fresh (non-resumed) writer starts an empty log.
    metrics.MetricsWriter(tmp_path, tensorboard=False).close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_read_jsonl_skips_a_line_cut_by_a_kill(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert metrics.read_jsonl(path) == [{"step": 1, "loss": 2.0}]


def test_plot_loss_writes_a_png(tmp_path):
    records = [{"step": s, "loss": 5.0 / s} for s in range(1, 20)]
    records[-1]["val_loss"] = 0.4
    metrics.plot_loss(records, tmp_path / "loss.png", title="t")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _events(directory):
    """Every event of the TensorBoard files in ``directory`` (TFRecord: length, crc, data, crc)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    events = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            events.append(Event.FromString(data[at + 12:at + 12 + length]))
            at += 12 + length + 4
    return events


def test_tensorboard_events_hold_the_scalars_and_a_resume_purges_later_points(tmp_path,
                                                                             monkeypatch):
    # Files 9 and 10 of this process: their names must sort in the order they were opened
    # (TensorBoard reads them in name order; unpadded, "10" sorted before "9").
    monkeypatch.setattr(metrics, "_EVENT_FILES", itertools.count(9))
    with metrics.MetricsWriter(tmp_path) as w:
        for step in (10, 20, 30):
            w.write({"step": step, "loss": 1.0 / step, "lr": 1e-3, "tokens_per_s": None})
    with metrics.MetricsWriter(tmp_path, resume_step=20) as w:  # the same second: a new file
        w.write({"step": 30, "loss": 0.5, "lr": 1e-3, "tokens_per_s": 7.0})
    events = _events(tmp_path / "tensorboard")
    scalars = [(e.step, v.tag, round(v.simple_value, 6)) for e in events
               for v in e.summary.value]
    assert scalars == [(10, "loss", 0.1), (10, "lr", 0.001), (20, "loss", 0.05), (20, "lr", 0.001),
                       (30, "loss", round(1 / 30, 6)), (30, "lr", 0.001),
                       (30, "loss", 0.5), (30, "lr", 0.001), (30, "tokens_per_s", 7.0)]
    # TensorBoard drops the first run's points from step 21 on (SessionLog START at 21).
    starts = [e.step for e in events if e.HasField("session_log")]
    assert starts == [21]


def test_an_mfu_over_1_probes_again_and_else_is_none(monkeypatch):
    readings = iter([1e9, 4e9, 1e9, 1e9])  # the start (busy), a re-probe (quiet), then busy
    monkeypatch.setattr(metrics, "cpu_matmul_probe", lambda *a, **k: next(readings))
    cpu = [types.SimpleNamespace(platform="cpu")]
    util = metrics.Utilisation(cpu, flops_per_token=1e6, reprobes=3)
    assert util(500.0) == pytest.approx(0.5) and util.note == ""  # 0.5 GFLOP/s of 1: no probe
    assert util(2000.0) == pytest.approx(0.5) and util.peak == 4e9  # 2 GFLOP/s: probed again
    assert util(None) is None and util.note == ""
    # Above even the best reading after the re-probes left: unknown, and why.
    assert util(5000.0) is None and util.peak == 4e9
    assert util.note.startswith("the model ran at 5 GFLOP/s, above the measured peak of 4 GFLOP/s")
    # An accelerator's peak is a data-sheet figure: nothing to probe again.
    gpu = [types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")]
    assert metrics.Utilisation(gpu, flops_per_token=1e9)(2e6) is None


def test_resume_drops_a_line_at_the_resume_step_that_a_whole_run_would_not_write(tmp_path):
    with metrics.MetricsWriter(tmp_path, tensorboard=False) as w:
        for step in (10, 20, 25):  # 25: written by an older version that stopped there
            w.write({"step": step, "loss": 1.0 / step})
    with metrics.MetricsWriter(tmp_path, tensorboard=False, resume_step=25,
                               keep_resume_line=False) as w:
        w.write({"step": 30, "loss": 0.5})
    assert [r["step"] for r in metrics.read_jsonl(tmp_path / "metrics.jsonl")] == [10, 20, 30]
