"""train.py's flags are the config fields, recipes are named runs, and --config reruns a run."""

import dataclasses
import typing

import pytest

from transformer_jax.cli import train
from transformer_jax.cli.flags import FIELD_GROUPS, field_flags
from transformer_jax.config import PRESETS, RECIPES, ModelConfig, TrainConfig
from transformer_jax.config.train import GROUPS
from transformer_jax.runs import rundir


def _parser_flags() -> dict[str, str]:
    """Every option string of train.py -> the destination it sets."""
    parser = train.build_parser([])
    return {option: action.dest for action in parser._actions  # no public accessor
            for option in action.option_strings}


def test_every_field_has_a_flag_named_after_it_and_every_flag_a_field():
    options = _parser_flags()
    field_dests = set()
    for prefix, _, cls in FIELD_GROUPS:
        for f, names in field_flags(cls):
            flag = "--" + f.name.replace("_", "-")
            assert names[0] == flag and options[flag] == f"{prefix}.{f.name}"
            field_dests.add(f"{prefix}.{f.name}")
    unset = {f.name for f in dataclasses.fields(ModelConfig) if not f.metadata.get("flag", True)}
    assert unset == {"vocab_size", "pad_id", "bos_id", "eos_id"}  # set from the data
    for cls in (TrainConfig, *GROUPS.values()):  # every training field is a flag
        for f in dataclasses.fields(cls):
            assert cls is TrainConfig and f.name in GROUPS or any(
                d.endswith(f".{f.name}") for d in field_dests), f.name
    extra = {o for o, dest in options.items() if dest not in field_dests}
    assert extra == set(train.NON_FIELD_FLAGS) | {"-h"}
    no_forms = {o for o in options if o.startswith("--no-")} - extra  # --no-bias, ...
    assert all(options[o] in field_dests for o in no_forms)


def test_choices_come_from_the_literal_types_and_help_is_grouped():
    parser = train.build_parser([])
    by_dest = {a.dest: a for a in parser._actions}
    for name in ("positions", "norm", "attention_impl", "dtype"):
        hint = typing.get_type_hints(ModelConfig)[name]
        assert tuple(by_dest[f"model.{name}"].choices) == typing.get_args(hint)
    assert tuple(by_dest["train.optim.optimizer"].choices) == ("adamw", "adam")
    text = parser.format_help()
    for title in ("model:", "run:", "optim:", "schedule:", "data:", "loop:", "eval:"):
        assert f"\n{title}" in text, title
    assert "(default: 1600)" in text  # the recipe's value, not the neutral default's 1000


def test_the_default_is_the_cpu_lm_recipe_unchanged():
    model_cfg, tc = train.configure([])
    assert model_cfg == dataclasses.replace(PRESETS["cpu-lm"], vocab_size=256)
    # The default run's settings, value by value: its loss must not move with a refactor.
    assert (tc.task, tc.model, tc.seed, tc.out) == ("lm", "transformer", 0, "runs/cpu-lm")
    assert dataclasses.astuple(tc.schedule) == (1600, "cosine", 4e-3, 100, 0.1)
    o = tc.optim
    assert (o.optimizer, o.b1, o.b2, o.eps, o.weight_decay, o.grad_clip, o.grad_accum) == (
        "adamw", 0.9, 0.99, 1e-8, 0.3, 1.0, 1)
    assert (o.label_smoothing, o.z_loss, o.max_nonfinite, o.steps_per_call) == (0, 0, 5, 10)
    assert dataclasses.astuple(tc.data) == ((), 0.1, 12, 128, 0)
    assert dataclasses.astuple(tc.loop) == (50, 400, 400, 3, "auto", "")
    assert dataclasses.astuple(tc.eval) == (64, 1, 200, "The ", 0.8)


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_configures(name):
    model_cfg, tc = train.configure(["--recipe", name])
    recipe = RECIPES[name]
    assert tc.out == recipe.train.out and tc.schedule == recipe.train.schedule
    assert model_cfg.d_model == recipe.model.d_model


def test_the_paper_recipes_are_the_papers():
    for name, steps, average in (("paper-base", 100_000, 5), ("paper-big", 300_000, 20)):
        tc = RECIPES[name].train
        assert (tc.optim.optimizer, tc.optim.label_smoothing) == ("adam", 0.1)  # §5.3, §5.4
        assert (tc.schedule.schedule, tc.schedule.warmup, tc.schedule.steps) == (
            "paper", 4000, steps)  # §5.2, §5.3
        assert tc.eval.average_last == average and tc.loop.max_to_keep >= average  # §6.1
    assert RECIPES["paper-big"].model.dropout_rate == 0.3


def test_flags_override_the_recipe_and_preset_is_its_alias():
    model_cfg, tc = train.configure(["--preset", "cpu-gpt", "--heads", "4", "--d-model", "128",
                                     "--lr", "1e-3", "--no-bias", "--data", "a.txt"])
    assert (model_cfg.num_heads, model_cfg.num_kv_heads, model_cfg.d_model) == (4, 4, 128)
    assert not model_cfg.use_bias and tc.schedule.lr == 1e-3 and tc.data.data == ("a.txt",)
    assert tc.schedule.steps == RECIPES["cpu-gpt"].train.schedule.steps
    assert tc.out == "runs/cpu-gpt-a-D128-N4-nobias"  # the data and the model in the name


def test_a_flag_is_named_as_typed_in_errors(capsys):
    for typed in ("--dropout", "--dropout-rate"):
        with pytest.raises(SystemExit) as e:
            train.configure([typed, "1.5"])
        assert e.value.code == 2
        assert f"{typed} must lie in [0, 1)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.configure(["--recipe", "nope"])
    assert "--recipe" in capsys.readouterr().err


def test_an_option_a_model_does_not_use_is_not_refused():
    # rotary positions need an even head dim; an LSTM has no heads (444 / 4 = 111).
    model_cfg, tc = train.configure(["--model", "lstm", "--d-model", "444", "--layers", "2"])
    assert (model_cfg.d_model, model_cfg.num_decoder_layers, tc.model) == (444, 2, "lstm")
    assert tc.out == "runs/cpu-lm-L2-D444-lstm"
    with pytest.raises(SystemExit):  # the Transformer does use them
        train.configure(["--d-model", "444", "--layers", "2"])


def test_config_reruns_a_stored_run_exactly(tmp_path):
    argv = ["--recipe", "tiny", "--lr", "2e-3", "--seq-len", "32", "--dropout", "0.2",
            "--out", str(tmp_path / "x")]
    model_cfg, tc = train.configure(argv)
    (tmp_path / "x").mkdir()
    rundir.write_config(tmp_path / "x", model_cfg, tc)
    for where in (tmp_path / "x" / "config.json", tmp_path / "x"):
        again_model, again = train.configure(["--config", str(where), "--out", str(tmp_path / "y")])
        assert again_model == model_cfg and again == tc.replace(out=str(tmp_path / "y"))
    _, steps = train.configure(["--config", str(tmp_path / "x"), "--steps", "7"])
    assert steps == tc.replace(steps=7)  # flags still override; the out is the stored run's


def test_train_config_reads_the_flat_layout_of_earlier_versions():
    tc = RECIPES["translate"].train
    flat = {"task": "translate", "model": "transformer", "data": [], "val_fraction": 0.1,
            "out": "runs/translate", "seed": 0, "steps": 2500, "batch_size": 64,
            "seq_len": 128, "grad_accum": 1, "optimizer": "adam", "lr": 1e-3,
            "min_lr_ratio": 0.1, "schedule": "paper", "warmup": 400, "b1": 0.9, "b2": 0.99,
            "eps": 1e-8, "weight_decay": 0.0, "grad_clip": 0.0, "label_smoothing": 0.1,
            "z_loss": 0.0, "log_every": 50, "eval_every": 500, "ckpt_every": 100,
            "steps_per_call": 10, "parallel": "auto", "mesh": "", "max_to_keep": 5,
            "max_nonfinite": 5, "eval_batch_size": 64, "sample_tokens": 0,
            "sample_prompt": "The ", "sample_temperature": 0.8, "average_last": 5}
    assert TrainConfig.from_dict(flat) == tc
    assert TrainConfig.from_dict(tc.to_dict()) == tc
    with pytest.raises(ValueError, match="unknown"):
        TrainConfig.from_dict({**flat, "not_a_field": 1})
