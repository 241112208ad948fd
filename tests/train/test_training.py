"""Loss, schedules, optimizer, the pure step under jit / pmap / scan, and the loop's resume."""

import dataclasses
import functools
import io
import json
import math
import re
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax import data, models, parallel
from transformer_jax import train as training
from transformer_jax.config import PRESETS, RECIPES
from transformer_jax.runs import metrics
from transformer_jax.train import logger, loop, optim, tasks

DEFAULT_RUN = RECIPES["cpu-lm"].train  # the default run's training settings

MODEL = dataclasses.replace(PRESETS["tiny"], vocab_size=256, dropout_rate=0.0)
T, B = 16, 8


def _allclose(a, b, rtol=2e-5, atol=1e-5):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol,
                                                         atol=atol), a, b)


@pytest.fixture(scope="module")
def setup():
    # Adam divides by sqrt(v) + ε: a parameter whose true gradient is zero (the key bias —
    # softmax is shift-invariant) gets an update of ~lr from float32 noise alone, which differs
    # between summation orders. ε = 1e-6 keeps such noise tiny; real gradients are ≫ 1e-6.
    tc = DEFAULT_RUN.replace(steps=100, warmup=2, lr=3e-3, eps=1e-6, batch_size=B, seq_len=T)
    model = models.build_model("transformer", MODEL)
    tx = training.make_optimizer(tc, MODEL.d_model)
    state = training.init_state(model, tx, seed=0, seq_len=T)
    tokens = data.load_corpus().train
    batches = data.train_batches(tokens, seed=0, step=0, num_steps=2, batch_size=B, seq_len=T)
    step = functools.partial(training.train_steps, apply_fn=model.apply, tx=tx)
    return model, tx, state, batches, step


@pytest.fixture(scope="module")
def jit_result(setup):
    """Two steps of the plain jit path on one device: the reference for the other paths."""
    _, _, state, batches, step = setup
    return jax.device_get(parallel.jit_step(step)(jax.tree.map(jnp.copy, state), batches))


# ---- loss, schedule, optimizer -------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy_matches_float64_reference_and_ignores_padding(eps):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 5, 7)) * 3
    targets = rng.integers(0, 7, (2, 5))
    targets[1, 3:] = data.IGNORE
    total, count = training.cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(targets),
                                          label_smoothing=eps)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    q = np.full(logits.shape, eps / 7)  # (1 - ε)·onehot + ε/V (§5.4)
    real = targets != data.IGNORE
    q[real] += (1 - eps) * np.eye(7)[targets[real]]
    expected = -(q * logp).sum(-1)[real].sum()
    assert count == 8
    np.testing.assert_allclose(total, expected, rtol=1e-5)


def test_paper_schedule_is_section_5_3():
    tc = DEFAULT_RUN.replace(schedule="paper", warmup=4000, optimizer="adam")
    sched = training.make_schedule(tc, 512)
    for step in (1, 100, 4000, 10000):  # the paper counts steps from 1
        expected = 512**-0.5 * min(step**-0.5, step * 4000**-1.5)
        np.testing.assert_allclose(float(sched(step - 1)), expected, rtol=1e-5)


def test_cosine_and_constant_schedules():
    tc = DEFAULT_RUN.replace(lr=1e-3, warmup=10, steps=110, min_lr_ratio=0.1)
    sched = training.make_schedule(tc, 64)
    np.testing.assert_allclose(float(sched(0)), 1e-4, rtol=1e-5)  # first update: lr / warmup
    np.testing.assert_allclose(float(sched(9)), 1e-3, rtol=1e-5)  # peak after warmup
    np.testing.assert_allclose(float(sched(59)), 0.55e-3, rtol=1e-4)  # halfway down the cosine
    np.testing.assert_allclose(float(sched(109)), 1e-4, rtol=1e-5)  # lr · min_lr_ratio
    const = training.make_schedule(tc.replace(schedule="constant"), 64)
    np.testing.assert_allclose([float(const(s)) for s in (0, 9, 100)], [1e-4, 1e-3, 1e-3],
                               rtol=1e-5)


def test_weight_decay_only_on_matrices_and_embeddings(setup):
    _, _, state, _, _ = setup
    mask = optim._decay_mask(state.params)
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
    assert flat["['embed']['embedding']"]
    assert any(k.endswith("['kernel']") and v for k, v in flat.items())
    assert not any(v for k, v in flat.items() if k.endswith(("['bias']", "['scale']")))


def test_non_finite_gradients_skip_the_update():
    tc = DEFAULT_RUN.replace(max_nonfinite=3, steps_per_call=1)
    tx = training.make_optimizer(tc, 8)
    params = {"w": jnp.ones(3)}
    opt = tx.init(params)
    bad = {"w": jnp.array([1.0, jnp.nan, 0.0])}
    for i in range(1, 4):
        updates, opt = tx.update(bad, opt, params)
        assert float(jnp.abs(updates["w"]).sum()) == 0.0 and int(opt.notfinite_count) == i
    # The loop stops at max_nonfinite; optax's own limit (which would apply the bad update)
    # lies beyond what the loop can miss.
    updates, opt = tx.update(bad, opt, params)
    assert float(jnp.abs(updates["w"]).sum()) == 0.0


# ---- the step under jit, pmap, scan, accumulation -----------------------------------------


def test_pmap_on_4_devices_equals_single_device(setup, jit_result, devices):
    _, _, state, batches, step = setup
    devs = devices[:4]
    replicated = parallel.replicate(state, devs)
    new, m = parallel.pmap_step(step, devs)(replicated, parallel.shard_batches(batches, 4))
    new, m = jax.device_get((parallel.unreplicate(new), m))
    ref_state, ref_m = jit_result
    assert m["loss"].shape == (4, 2)  # [devices, steps], identical after pmean
    np.testing.assert_array_equal(m["loss"][0], m["loss"][3])
    _allclose(m["loss"][0], ref_m["loss"])
    _allclose(new.params, ref_state.params)
    assert int(new.step) == 2
    # The comparison is not vacuous: two steps moved the parameters.
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), new.params,
                         jax.device_get(state.params))
    assert max(jax.tree.leaves(moved)) > 1e-3


def test_scan_of_k_steps_equals_k_single_steps(setup, jit_result):
    _, _, state, batches, step = setup
    one = parallel.jit_step(step)
    s = jax.tree.map(jnp.copy, state)
    losses = []
    for i in range(2):
        s, m = one(s, batches[i:i + 1])
        losses.append(float(m["loss"][0]))
    ref_state, ref_m = jit_result
    _allclose(np.array(losses), ref_m["loss"])
    _allclose(jax.device_get(s.params), ref_state.params)


def test_gradient_accumulation_matches_one_big_batch(setup, jit_result):
    model, tx, state, batches, _ = setup
    step = functools.partial(training.train_steps, apply_fn=model.apply, tx=tx, grad_accum=4)
    new, m = jax.device_get(parallel.jit_step(step)(jax.tree.map(jnp.copy, state), batches))
    ref_state, ref_m = jit_result
    _allclose(m["loss"], ref_m["loss"])
    _allclose(new.params, ref_state.params)


def test_batch_not_divisible_by_devices_is_a_clear_error(devices, tmp_path):
    with pytest.raises(parallel.BatchSplitError, match="12 cannot be split evenly over 8"):
        parallel.check_batch(12, 8)
    with pytest.raises(parallel.BatchSplitError, match="2 accumulation"):
        parallel.check_batch(12, 4, grad_accum=2)
    assert parallel.check_batch(16, 4, grad_accum=2) == 2
    tc = DEFAULT_RUN.replace(out=str(tmp_path / "run"), batch_size=6, seq_len=T, parallel="pmap")
    with pytest.raises(parallel.BatchSplitError, match="6 cannot be split evenly over 4"):
        loop.run(MODEL, tc, devices=devices[:4])
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before doing anything


def test_shard_batches_layout():
    batches = np.arange(2 * 8 * 3).reshape(2, 8, 3)
    sharded = parallel.shard_batches(batches, 4)
    assert sharded.shape == (4, 2, 2, 3)
    np.testing.assert_array_equal(sharded[1, 0], batches[0, 2:4])  # device 1: rows 2..3


def test_parallel_modes(devices):
    assert parallel.resolve("auto", devices[:1]).kind == "jit"
    pmap = parallel.resolve("auto", devices[:4])
    assert pmap.kind == "pmap" and pmap.devices == tuple(devices[:4])
    assert pmap == parallel.resolve("pmap", devices[:4]) != parallel.resolve("none", devices[:4])
    assert parallel.resolve("none", devices[:4]).devices == (devices[0],)


# ---- the loop: resume, SIGTERM, divergence ------------------------------------------------


def _loop_config(out):
    return DEFAULT_RUN.replace(out=str(out), steps=30, batch_size=4, seq_len=T, warmup=5, lr=3e-3,
                       steps_per_call=5, log_every=10, eval_every=15, ckpt_every=10,
                       eval_batch_size=256, parallel="none", sample_tokens=0)


DROPOUT_MODEL = dataclasses.replace(MODEL, dropout_rate=0.1)  # per-step keys must resume too


def test_interrupted_then_resumed_run_is_bit_identical(tmp_path, devices, monkeypatch):
    full = loop.run(DROPOUT_MODEL, _loop_config(tmp_path / "full"), devices=devices[:1],
                    progress=False, log=lambda s: None)
    assert full.step == 30 and not full.interrupted and math.isfinite(full.val_loss)

    tc = _loop_config(tmp_path / "cut")
    placement = parallel.resolve("none", devices[:1])
    work = tasks.build_workload(DROPOUT_MODEL, tc, placement, log=lambda s: None)

    def sigterm_at_step_12(step, k, rows=slice(None)):  # SIGTERM arrives while step 12 runs
        if step <= 12 < step + k:
            signal.raise_signal(signal.SIGTERM)
        return work.train_batches(step, k, rows)

    cut = loop.run(DROPOUT_MODEL, tc, devices=devices[:1],
                   workload=dataclasses.replace(work, train_batches=sigterm_at_step_12),
                   progress=False, log=lambda s: None)
    assert cut.interrupted and cut.step == 15  # saved at the next step boundary
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored
    # Step 25 is no log point (log 10, eval 15, checkpoint 10): the stop writes no line, and
    # the checkpoint carries steps 21-25 into the line at 30.
    again = loop.run(DROPOUT_MODEL, tc, devices=devices[:1], stop_at=25, progress=False,
                     log=lambda s: None)
    assert again.interrupted and (again.start_step, again.step) == (15, 25)
    resumed = loop.run(DROPOUT_MODEL, tc, devices=devices[:1], progress=False,
                       log=lambda s: None)
    assert resumed.start_step == 25 and resumed.step == 30
    jax.tree.map(np.testing.assert_array_equal, resumed.state, full.state)  # bit for bit
    # The metrics log reads like one run: the same lines, the same numbers (times aside).
    assert _logged(tmp_path / "cut") == _logged(tmp_path / "full")
    assert [r["step"] for r in _logged(tmp_path / "cut")] == [10, 15, 20, 30]
    assert resumed.val_loss == full.val_loss


def _logged(out, keys=("step", "loss", "lr", "nonfinite_steps", "val_loss", "val_bpb")):
    """The lines of a run's metrics.jsonl, without times, throughput and MFU."""
    return [{k: r.get(k) for k in keys} for r in
            map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def test_resuming_with_another_model_is_refused(tmp_path, devices):
    first = loop.run(MODEL, _loop_config(tmp_path / "r"), devices=devices[:1], stop_at=5,
                     progress=False, log=lambda s: None)
    assert first.interrupted and first.step == 5
    other = dataclasses.replace(MODEL, d_model=64)
    with pytest.raises(loop.RunConfigError, match="d_model"):
        loop.run(other, _loop_config(tmp_path / "r"), devices=devices[:1], progress=False)


def test_diverging_run_stops_with_a_clear_error(tmp_path, devices):
    tc = _loop_config(tmp_path / "nan")
    placement = parallel.resolve("none", devices[:1])
    work = tasks.build_workload(MODEL, tc, placement, log=lambda s: None)

    def nan_init(seed):
        state = work.init_state(seed)
        return state.replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))

    with pytest.raises(loop.NonFiniteError, match="5 consecutive steps had non-finite"):
        loop.run(MODEL, tc, devices=devices[:1],
                 workload=dataclasses.replace(work, init_state=nan_init), progress=False,
                 log=lambda s: None)


def test_replicated_state_has_the_pmap_output_layout(devices):
    # Otherwise the second call of the step would compile again for the new input layout.
    tree = {"w": np.arange(6.0).reshape(2, 3), "step": np.int32(3)}
    rep = parallel.replicate(tree, devices[:4])
    np.testing.assert_array_equal(rep["w"][3], tree["w"])
    out = jax.pmap(lambda t: t, axis_name=parallel.AXIS, devices=devices[:4])(rep)
    assert all(o.sharding == r.sharding for o, r in zip(jax.tree.leaves(out), jax.tree.leaves(rep)))


def test_workload_hooks_reach_the_log_and_plain_progress_lines_without_a_terminal(
        tmp_path, devices, monkeypatch):
    tc = _loop_config(tmp_path / "hooks")
    placement = parallel.resolve("none", devices[:1])
    work = tasks.build_workload(MODEL, tc, placement, log=lambda s: None)
    intervals = []

    def interval_metrics(first, end):  # e.g. the real-token share of steps first … end - 1
        intervals.append((first, end))
        return {"share": end / 100}

    def eval_metrics(params):  # e.g. BLEU on a fixed slice
        assert jax.tree.structure(params) == jax.tree.structure(work.init_state(0).params)
        return {"bleu": 12.5}

    monkeypatch.setattr(sys, "stderr", io.StringIO())  # no terminal: no bar
    lines = []
    loop.run(MODEL, tc, devices=devices[:1], log=lines.append,
             workload=dataclasses.replace(work, interval_metrics=interval_metrics,
                                          eval_metrics=eval_metrics))
    records = [json.loads(line) for line in
               (tmp_path / "hooks" / "metrics.jsonl").read_text().splitlines()]
    assert intervals == [(0, 10), (10, 15), (15, 20), (20, 30)]
    assert [(r["step"], r["share"]) for r in records] == [(10, .1), (15, .15), (20, .2), (30, .3)]
    assert [(r["step"], r.get("bleu")) for r in records if "val_loss" in r] == [(15, 12.5),
                                                                              (30, 12.5)]
    assert next(line for line in lines if line.startswith("step 15: val_loss")).endswith(
        ", bleu 12.5")
    # One plain progress line per metrics line: step, loss, tokens/s, time left.
    progress = [re.fullmatch(r"step (\d+)/30: loss (\d\.\d{4}), ([\d,]+|-) tokens/s, "
                             r"ETA (\d+m\d\ds|-)", line) for line in lines]
    assert [int(m[1]) for m in progress if m] == [10, 15, 20, 30]
    assert [float(m[2]) for m in progress if m] == [round(r["loss"], 4) for r in records]


def test_an_mfu_over_100_percent_is_never_shown(tmp_path, devices, monkeypatch):
    probes = []

    def busy_probe(*args, **kwargs):  # a matmul probe taken while the machine was loaded
        probes.append(1)
        return 1e6

    monkeypatch.setattr(metrics, "cpu_matmul_probe", busy_probe)
    result = loop.run(MODEL, _loop_config(tmp_path / "mfu"), devices=devices[:1], stop_at=10,
                      progress=False, log=lambda s: None)
    (record,) = metrics.read_jsonl(tmp_path / "mfu" / "metrics.jsonl")
    assert record["step"] == 10 and record["tokens_per_s"] > 0  # timed: steps 5-10
    assert record["mfu"] is None and record["mfu_unreliable"] is True
    assert len(probes) == 3  # at the start, then twice more before giving up
    assert math.isnan(result.mfu) and "above the measured peak of 0.001 GFLOP/s" in \
        result.mfu_note


@pytest.mark.parametrize("progress, stderr_tty, stdout_tty, expected", [
    (None, True, True, (True, False)),  # a terminal: the bar alone
    (None, True, False, (True, True)),  # train.py | tee log: the bar, and lines in the log
    (None, False, False, (False, True)),  # no terminal (a batch job): lines
    (False, True, True, (False, True)),  # --no-progress: lines instead of the bar
])
def test_a_progress_bar_on_a_terminal_and_plain_lines_where_none_is_seen(
        progress, stderr_tty, stdout_tty, expected, monkeypatch):
    for name, tty in (("stderr", stderr_tty), ("stdout", stdout_tty)):
        stream = io.StringIO()
        stream.isatty = lambda tty=tty: tty
        monkeypatch.setattr(sys, name, stream)
    assert logger.progress_modes(progress) == expected
