"""ModelConfig: validation, presets, derived values, JSON round trip."""

import dataclasses
import json

import jax.numpy as jnp
import pytest

from transformer_jax.config import PRESETS, ModelConfig
from transformer_jax.models import accounting


def test_presets_match_the_paper_and_gpt2():
    base, big = PRESETS["paper-base"], PRESETS["paper-big"]
    # Table 3: base N=6, d_model=512, d_ff=2048, h=8, P_drop=0.1; big 1024/4096/16, 0.3.
    assert (base.num_encoder_layers, base.num_decoder_layers) == (6, 6)
    assert (base.d_model, base.d_ff, base.num_heads, base.dropout_rate) == (512, 2048, 8, 0.1)
    assert (big.d_model, big.d_ff, big.num_heads, big.dropout_rate) == (1024, 4096, 16, 0.3)
    for cfg in (base, big):
        assert (cfg.norm, cfg.positions, cfg.share_embeddings) == ("post", "sinusoidal", True)
        assert cfg.head_dim == 64  # d_k = d_v = 64 (§3.2.2)
    gpt2 = PRESETS["gpt2-small"]
    assert (gpt2.num_decoder_layers, gpt2.d_model, gpt2.num_heads, gpt2.max_len) == (
        12, 768, 12, 1024)
    assert (gpt2.norm, gpt2.positions) == ("pre", "learned")
    for name in ("cpu-lm", "cpu-gpt", "cpu-modern"):  # the default run's and its relatives
        cpu = PRESETS[name]
        assert cpu.vocab_size == 256 and accounting.num_params(cpu, "lm") < 5_000_000
    gpt = PRESETS["cpu-gpt"]  # the minimal GPT peers' architecture
    assert (gpt.norm_type, gpt.positions, gpt.activation, gpt.share_embeddings) == (
        "layernorm", "learned", "gelu", True)
    assert {"paper-base", "paper-big", "gpt2-small", "cpu-lm", "cpu-gpt", "tiny"} <= set(PRESETS)


def test_defaults_and_derived():
    cfg = ModelConfig(vocab_size=100, d_model=64, num_heads=4)
    assert cfg.num_kv_heads == 4  # defaults to num_heads
    assert cfg.head_dim == 16
    assert (cfg.pad_id, cfg.bos_id, cfg.eos_id) == (0, 1, 2)
    bf16 = dataclasses.replace(cfg, dtype="bfloat16")
    assert bf16.compute_dtype == jnp.bfloat16 and bf16.storage_dtype == jnp.float32
    gqa = dataclasses.replace(cfg, num_kv_heads=2)
    assert gqa.num_kv_heads == 2 and accounting.num_params(gqa) < accounting.num_params(cfg)


def test_frozen_and_keyword_only():
    cfg = PRESETS["tiny"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.d_model = 64
    with pytest.raises(TypeError):
        ModelConfig(256)  # keyword-only


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"d_model": 30, "num_heads": 4}, "divisible"),
        ({"num_heads": 4, "num_kv_heads": 3}, "multiple"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"d_ff": -1}, "d_ff"),
        ({"num_decoder_layers": 0}, "num_decoder_layers"),
        ({"num_encoder_layers": -1}, "num_encoder_layers"),
        ({"max_len": 0}, "max_len"),
        ({"norm": "sandwich"}, "norm"),
        ({"positions": "rotary"}, "positions"),
        ({"activation": "swish"}, "activation"),
        ({"dtype": "float64"}, "dtype"),
        ({"param_dtype": "int8"}, "param_dtype"),
        ({"attention_impl": "flash"}, "attention_impl"),
        ({"dropout_rate": 1.0}, "dropout_rate"),
        ({"eos_id": 256}, "eos_id"),
        ({"pad_id": -1}, "pad_id"),
        ({"d_model": 32.0}, "d_model"),
    ],
)
def test_invalid_configs_raise(changes, match):
    with pytest.raises(ValueError, match=match):  # head shapes: when a Transformer is made
        dataclasses.replace(PRESETS["tiny"], **changes).check_attention()


def test_json_round_trip():
    for cfg in PRESETS.values():
        text = json.dumps(cfg.to_dict())
        assert ModelConfig.from_dict(json.loads(text)) == cfg
    d = PRESETS["tiny"].to_dict()
    assert d["dtype"] == "float32" and isinstance(d["num_kv_heads"], int)
    with pytest.raises(ValueError, match="unknown"):
        ModelConfig.from_dict({**d, "not_a_field": 1})


def test_num_params_estimate_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        accounting.num_params(PRESETS["tiny"], "encoder_only")
