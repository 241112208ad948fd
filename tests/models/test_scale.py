"""Accelerator-scale options: remat, scanned layers, the modern LM options, mixed precision."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from model_helpers import KEY, TINY
from model_helpers import tokens as _tokens

from transformer_jax import decoding
from transformer_jax.cli import train as train_cli
from transformer_jax.config import MODERN_OPTIONS, PRESETS
from transformer_jax.models import Transformer, TransformerLM
from transformer_jax.models.layers import apply_rotary
from transformer_jax.parallel import sharding
from transformer_jax.runs import rundir
from transformer_jax.runs.identity import model_identity
from transformer_jax.train import cross_entropy

LM = dataclasses.replace(TINY, num_decoder_layers=2, dropout_rate=0.1)
S2S = dataclasses.replace(TINY, num_encoder_layers=2, num_decoder_layers=2, dropout_rate=0.1)


def _lm_loss(cfg):
    model = TransformerLM(cfg)
    x = _tokens(0, (2, 12))

    def loss(params):
        logits = model.apply({"params": params}, x, deterministic=False,
                             rngs={"dropout": jax.random.PRNGKey(3)})
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    return model, x, jax.jit(jax.value_and_grad(loss))


def _s2s_loss(cfg):
    model = Transformer(cfg)
    src, tgt = _tokens(1, (2, 9), low=3), _tokens(2, (2, 7), low=3)

    def loss(params):
        logits = model.apply({"params": params}, src, tgt, deterministic=False,
                             rngs={"dropout": jax.random.PRNGKey(3)})
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    return model, (src, tgt), jax.jit(jax.value_and_grad(loss))


def _allclose(a, b, atol=1e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y),
                                                         atol=atol, rtol=1e-5), a, b)


def _stack(params, prefix, count, name):
    """Unscanned blocks ``prefix_i`` -> one scanned ``name/block`` with a leading layer axis."""
    params = dict(params)
    blocks = [params.pop(f"{prefix}_{i}") for i in range(count)]
    params[name] = {"block": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}
    return params


def _setup(kind):
    """(loss maker, config, model, its inputs, jitted loss-and-grad, initial params)."""
    make = _lm_loss if kind == "lm" else _s2s_loss
    cfg = LM if kind == "lm" else S2S
    model, inputs, fn = make(cfg)
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    return make, cfg, model, args, fn, model.init(KEY, *args)["params"]


# ---- rematerialisation -----------------------------------------------------------------------


@pytest.mark.parametrize("kind, policies", [("lm", ("block", "dots")),
                                             ("encoder_decoder", ("dots",))])
def test_remat_gives_the_same_loss_and_gradients(kind, policies):
    # Both policies go through the same per-block nn.remat: the encoder-decoder (three compiles
    # of a 2 + 2 layer model per policy) checks the one that keeps the most.
    make, cfg, model, args, fn, params = _setup(kind)
    ref = fn(params)
    for remat in policies:
        _allclose(make(dataclasses.replace(cfg, remat=remat))[2](params), ref)


def test_remat_changes_neither_parameters_nor_the_run_identity():
    remat = dataclasses.replace(LM, remat="dots")
    assert model_identity(remat.to_dict()) == model_identity(LM.to_dict())
    assert model_identity({k: v for k, v in LM.to_dict().items()  # a config from before these
                           if k not in ("remat", "scan_layers", "qk_norm")}) == \
        model_identity(LM.to_dict())
    assert model_identity(dataclasses.replace(LM, scan_layers=True).to_dict()) != \
        model_identity(LM.to_dict())


# ---- scanned layers ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lm", "encoder_decoder"])
def test_scanned_layers_equal_the_unscanned_model_restacked(kind):
    make, cfg, model, args, fn, params = _setup(kind)
    if kind == "lm":
        stacked = _stack(params, "layer", 2, "layers")
    else:
        stacked = _stack(_stack(params, "encoder", 2, "encoders"), "decoder", 2, "decoders")
    scanned = dataclasses.replace(cfg, scan_layers=True, remat="block")
    _, _, scanned_fn = make(scanned)
    assert jax.tree.structure(jax.eval_shape(
        lambda: type(model)(scanned).init(KEY, *args)["params"])) == jax.tree.structure(stacked)
    # Dropout draws per layer differ between the layouts (split keys vs named scopes): compare
    # the deterministic forward, and gradients without dropout.
    no_drop = dataclasses.replace(cfg, dropout_rate=0.0)
    (loss, grads), (loss_s, grads_s) = make(no_drop)[2](params), make(
        dataclasses.replace(scanned, dropout_rate=0.0))[2](stacked)
    np.testing.assert_allclose(loss_s, loss, rtol=1e-6)
    expected = (_stack(grads, "layer", 2, "layers") if kind == "lm" else
                _stack(_stack(grads, "encoder", 2, "encoders"), "decoder", 2, "decoders"))
    _allclose(grads_s, expected, atol=1e-6)
    assert np.isfinite(scanned_fn(stacked)[0])  # dropout runs inside the scan too


def test_scanned_kv_cache_decoding_equals_the_full_forward():
    cfg = dataclasses.replace(TINY, num_decoder_layers=2, scan_layers=True, **MODERN_OPTIONS)
    model = TransformerLM(cfg)
    x = _tokens(5, (2, 10))
    params = model.init(KEY, x)["params"]
    assert params["layers"]["block"]["mlp"]["wi"]["kernel"].shape[0] == 2  # the layer axis
    logits, cache, step = model.start_decoding(params, x[:, :3], 10)
    step = jax.jit(step)
    pieces = [logits]
    for t in range(3, 10):
        logits, cache = step(x[:, t:t + 1], cache)
        pieces.append(logits)
    full = model.apply({"params": params}, x)
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, atol=3e-5)


def test_scanned_parameters_keep_the_layer_axis_whole():
    mesh = {"data": 1, "fsdp": 2, "tensor": 2}
    plain = sharding.spec_for("params/layer_0/mlp/wi/kernel", (32, 64), mesh)
    scanned = sharding.spec_for("params/layers/block/mlp/wi/kernel", (4, 32, 64), mesh)
    assert tuple(scanned) == (None, *plain)
    qkv = sharding.spec_for("opt_state/0/mu/encoders/block/self_attention/qkv/kernel",
                            (4, 32, 3, 2, 16), mesh)
    assert tuple(qkv) == (None, "fsdp", None, "tensor", None)


# ---- the modern LM options -------------------------------------------------------------------


def test_rotary_scores_depend_only_on_the_offset():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32)

    def score(m, n):
        return float(jnp.sum(apply_rotary(q, jnp.array([m])) * apply_rotary(k, jnp.array([n]))))

    for m, n in [(0, 0), (3, 1), (7, 2), (40, 33)]:
        np.testing.assert_allclose(score(m + 11, n + 11), score(m, n), rtol=1e-5, atol=1e-5)
    assert abs(score(5, 0) - score(0, 5)) > 1e-3  # it does see the direction of the offset
    np.testing.assert_allclose(score(0, 0), float(jnp.sum(q * k)), rtol=1e-6)  # R(0) = I


# Alone: the two options that act on cached positions and keys; "all" covers the others (each
# is the same function of a token on the cached and the full path).
@pytest.mark.parametrize("option", [("positions", "rope"), ("qk_norm", True), ("all", None)],
                         ids=str)
def test_cached_decoding_equals_the_full_forward_for_every_option(option):
    name, value = option
    changes = MODERN_OPTIONS if name == "all" else {name: value}
    cfg = dataclasses.replace(TINY, num_decoder_layers=1, num_encoder_layers=1, **changes)
    lm = TransformerLM(cfg)
    x = _tokens(6, (2, 8))
    params = lm.init(KEY, x)["params"]
    logits, cache, step = lm.start_decoding(params, x[:, :1], 8)
    pieces = [logits]
    for t in range(1, 8):
        logits, cache = step(x[:, t:t + 1], cache)
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), lm.apply({"params": params}, x),
                               atol=3e-5)
    # The encoder-decoder: greedy decoding is the argmax of teacher forcing on its own output.
    s2s = Transformer(cfg)
    src = _tokens(7, (2, 6), low=3)
    p2 = s2s.init(KEY, src, src)["params"]
    out = decoding.greedy_decode(s2s, p2, src, max_len=5)
    tgt = jnp.concatenate([jnp.full((2, 1), cfg.bos_id), out[:, :-1]], 1)
    forced = jnp.argmax(s2s.apply({"params": p2}, src, tgt), -1)
    done = jnp.cumsum(out == cfg.eos_id, 1) - (out == cfg.eos_id) > 0  # after the first EOS
    np.testing.assert_array_equal(jnp.where(done, cfg.pad_id, forced), out)


def test_modern_presets_use_every_option():
    for name in ("modern-lm", "cpu-modern", "cpu-lm"):
        cfg = PRESETS[name]
        assert (cfg.norm, cfg.norm_type, cfg.positions, cfg.activation) == \
            ("pre", "rmsnorm", "rope", "swiglu")
        assert cfg.qk_norm and not cfg.use_bias and not cfg.share_embeddings
    with pytest.raises(ValueError, match="even head dim"):
        dataclasses.replace(TINY, d_model=30, num_heads=2, positions="rope").check_attention()


def test_z_loss_adds_the_squared_log_normaliser():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((2, 3, 5)) * 4
    targets = np.array([[0, 1, -1], [4, 2, 3]])
    total, count = cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(targets),
                                 z_loss=1e-2)
    log_z = np.log(np.exp(logits).sum(-1))
    nll = log_z - np.take_along_axis(logits, np.maximum(targets, 0)[..., None], -1)[..., 0]
    real = targets != -1
    np.testing.assert_allclose(total, np.sum((nll + 1e-2 * log_z**2) * real), rtol=1e-5)
    assert count == real.sum()


# ---- mixed precision --------------------------------------------------------------------------


def test_bfloat16_compute_keeps_parameters_moments_norms_and_logits_in_float32():
    cfg = dataclasses.replace(TINY, num_decoder_layers=1, dtype="bfloat16", **MODERN_OPTIONS)
    model = TransformerLM(cfg)
    x = _tokens(8, (2, 8))
    params = model.init(KEY, x)["params"]
    tx = optax.adamw(1e-3)
    assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype("float32")}
    assert {m.dtype for m in jax.tree.leaves(tx.init(params))
            if m.ndim} == {jnp.dtype("float32")}
    logits = model.apply({"params": params}, x)
    assert logits.dtype == jnp.float32
    eqns = list(_equations(jax.make_jaxpr(lambda p: model.apply({"params": p}, x))(params).jaxpr))
    weights = {p.shape for p in jax.tree.leaves(params) if p.ndim >= 2}
    matmuls = [e for e in eqns if e.primitive.name == "dot_general"]
    projections = [e for e in matmuls if any(v.aval.shape in weights for v in e.invars)]
    assert len(projections) >= 5  # qkv, out, the feed-forward's three, the output layer
    assert all(v.aval.dtype == jnp.bfloat16 for e in projections for v in e.invars)
    scores = [e for e in matmuls if e not in projections]  # QKᵀ (and PV): float32 results
    assert scores and all(e.outvars[0].aval.dtype == jnp.float32 for e in scores)
    # Normalisation statistics, the softmax and the logsumexp reduce in float32.
    reductions = [e for e in eqns if e.primitive.name in ("reduce_sum", "reduce_max")]
    assert reductions and all(e.invars[0].aval.dtype == jnp.float32 for e in reductions)


def _equations(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs nested in it (pjit, custom_vjp, ...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                yield from _equations(inner)


def test_the_flags_set_the_options_and_the_other_layout_is_refused(tmp_path):
    argv = ["--preset", "cpu-lm", "--positions", "rope", "--norm-type", "rmsnorm",
            "--activation", "swiglu", "--qk-norm", "--no-bias", "--no-tie-embeddings",
            "--remat", "dots", "--scan-layers", "--z-loss", "1e-4", "--out", str(tmp_path)]
    model_cfg, tc = train_cli.configure(argv)
    assert (model_cfg.positions, model_cfg.norm_type, model_cfg.activation) == \
        ("rope", "rmsnorm", "swiglu")
    assert model_cfg.qk_norm and not model_cfg.use_bias and not model_cfg.share_embeddings
    assert model_cfg.remat == "dots" and model_cfg.scan_layers and tc.optim.z_loss == 1e-4
    rundir.prepare(tmp_path, model_cfg, tc, print)
    rundir.prepare(tmp_path, dataclasses.replace(model_cfg, remat="none"), tc, print)  # resumes
    with pytest.raises(rundir.RunConfigError, match="differs in: scan_layers"):
        rundir.prepare(tmp_path, dataclasses.replace(model_cfg, scan_layers=False), tc, print)


def test_beam_search_with_scanned_layers_equals_the_unscanned_model():
    cfg = dataclasses.replace(TINY, num_encoder_layers=2, num_decoder_layers=3)
    src = _tokens(9, (3, 6), low=3)
    plain = Transformer(cfg)
    params = plain.init(KEY, src, src)["params"]
    stacked = _stack(_stack(params, "encoder", 2, "encoders"), "decoder", 3, "decoders")
    scanned = Transformer(dataclasses.replace(cfg, scan_layers=True))
    # At W = 1 the cache has 3 layers and 3 rows: the layer axis must not be taken for rows.
    for W in (1, 2):
        want = decoding.beam_search(plain, params, src, beam_size=W, max_len=6,
                                    all_hypotheses=True)
        got = decoding.beam_search(scanned, stacked, src, beam_size=W, max_len=6,
                                   all_hypotheses=True)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_allclose(got[1], want[1], atol=1e-5)
