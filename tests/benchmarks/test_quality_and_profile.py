"""benchmarks/quality_vs_time.py's crossing time and benchmarks/profile_step.py's op categories."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import profile_step  # noqa: E402
import quality_vs_time  # noqa: E402


def test_time_to_reach_interpolates_the_first_crossing():
    curve = [(10.0, 3.0), (20.0, 2.0), (30.0, 1.0), (40.0, 1.5), (50.0, 0.5)]
    assert quality_vs_time.time_to_reach(curve, 2.5) == pytest.approx(15.0)
    assert quality_vs_time.time_to_reach(curve, 1.0) == pytest.approx(30.0)  # met exactly
    assert quality_vs_time.time_to_reach(curve, 0.75) == pytest.approx(47.5)  # after a rise
    assert quality_vs_time.time_to_reach(curve, 3.5) == 10.0  # already there at the first point
    assert quality_vs_time.time_to_reach(curve, 0.1) is None  # never


def test_the_benchmark_runs_the_default_model_and_rnns_of_its_size(tmp_path):
    from benchmarks import common
    from transformer_jax.models import build_model

    sizes = {}
    for model in quality_vs_time.MODELS:
        model_cfg, tc = quality_vs_time.configs(model, 256, 1e-3, 1234, tmp_path)
        sizes[model] = common.lm_num_params(build_model(model, model_cfg))
        assert (tc.data.seq_len, tc.data.batch_size, tc.eval.sample_tokens) == (256, 4, 0)
        assert tc.schedule.steps % tc.loop.eval_every == 0 and tc.schedule.steps // tc.loop.eval_every >= 10
        assert model_cfg.max_len >= 256
    for rnn in ("lstm", "gru"):
        assert abs(sizes[rnn] / sizes["transformer"] - 1) < 0.05


def test_hlo_categories_name_matmuls_reductions_and_elementwise_fusions():
    def f(a, b):
        h = jnp.tanh(a @ b)
        return h.sum(axis=1), jnp.exp(a) * 2

    a = jnp.ones((64, 64))
    hlo = jax.jit(f).lower(a, a).compile().as_text()
    categories = set(profile_step.hlo_categories(hlo).values())
    assert {"matmul", "reduce"} <= categories


def test_profile_of_a_tiny_step_accounts_its_time():
    per_cat, ops, wall_ms, flops = profile_step.profile(1, 32, 2, 64, 16, 2, steps=2)
    assert wall_ms > 0 and flops > 0
    assert per_cat["matmul"] > 0
    assert sum(per_cat.values()) == pytest.approx(sum(o["thread_ms_per_step"] for o in ops))
