"""Command-line flags made from the config dataclasses, in one place.

Every field of :class:`~transformer_jax.config.ModelConfig` and of
:class:`~transformer_jax.config.TrainConfig`'s groups is a flag: its name is the field's name
in kebab case (``d_model`` -> ``--d-model``), with the extra names its metadata lists
(``--heads`` for ``num_heads``); its help is the field's description in the class docstring;
its choices are the field's ``Literal`` type. A flag that is not given is absent from the
parsed namespace, so "given" and "left to the recipe" are told apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from collections.abc import Iterator, Sequence
from typing import Any

from transformer_jax.config import ModelConfig, TrainConfig
from transformer_jax.config.fields import attribute_docs, choices
from transformer_jax.config.train import GROUPS

__all__ = ["FIELD_GROUPS", "add_config_flags", "field_flags", "flagify", "given",
           "model_overrides", "train_overrides"]

FIELD_GROUPS: tuple[tuple[str, str, type], ...] = (
    ("model", "model: the architecture (ModelConfig)", ModelConfig),
    ("train", "run: what is trained, and where it goes", TrainConfig),
    *((f"train.{name}", f"{name}: {(cls.__doc__ or '').splitlines()[0].rstrip('.')}", cls)
      for name, cls in GROUPS.items()),
)
"""(destination prefix, ``--help`` title, dataclass) of each group of flags, in help order."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_flags(cls: type) -> Iterator[tuple[dataclasses.Field, list[str]]]:
    """(field, its flag names) for every field of ``cls`` that is a flag."""
    for f in dataclasses.fields(cls):
        if f.metadata.get("flag", True) and not (cls is TrainConfig and f.name in GROUPS):
            yield f, [_flag(f.name), *f.metadata.get("aliases", ())]


def _kind(cls: type, f: dataclasses.Field) -> dict[str, Any]:
    """argparse keywords for the type of field ``f``."""
    hint = typing.get_type_hints(cls)[f.name]
    allowed = choices(cls, f.name)
    if allowed:
        return {"choices": allowed}
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(hint) is tuple:
        return {"nargs": "+", "metavar": f.metadata.get("metavar", "VALUE")}
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # int | None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return {"type": hint, "metavar": f.metadata.get("metavar", f.name.upper())}


def add_config_flags(parser: argparse.ArgumentParser, model_cfg: ModelConfig,
                     train_cfg: TrainConfig) -> dict[str, list[str]]:
    """Add one flag per config field, grouped as :data:`FIELD_GROUPS`.

    Args:
      parser: where the flags go.
      model_cfg, train_cfg: the values ``--help`` shows as defaults (a recipe's).

    Returns:
      Field name -> its flag names, for error messages (:func:`flagify`).
    """
    names: dict[str, list[str]] = {}
    for prefix, title, cls in FIELD_GROUPS:
        group = parser.add_argument_group(title)
        base: Any = model_cfg if cls is ModelConfig else train_cfg
        for part in prefix.split(".")[1:]:
            base = getattr(base, part)
        docs = attribute_docs(cls)
        for f, flags in field_flags(cls):
            if f.name in names:
                raise AssertionError(f"two config fields are named {f.name}")
            names[f.name] = flags
            default = getattr(base, f.name)
            shown = " ".join(default) if isinstance(default, tuple) else default
            text = docs.get(f.name, "").replace("%", "%%")
            group.add_argument(*flags, dest=f"{prefix}.{f.name}", default=argparse.SUPPRESS,
                               help=f"{text} (default: {shown!s})".replace("%(", "%%("),
                               **_kind(cls, f))
    return names


def given(args: argparse.Namespace, prefix: str) -> dict[str, Any]:
    """The flags of group ``prefix`` given on the command line: field name -> value."""
    return {dest[len(prefix) + 1:]: value for dest, value in vars(args).items()
            if dest.startswith(prefix + ".") and "." not in dest[len(prefix) + 1:]}


def model_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ModelConfig fields given on the command line."""
    return given(args, "model")


def train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields given, top-level and in groups, by field name (for
    :meth:`~transformer_jax.config.TrainConfig.replace`)."""
    out = given(args, "train")
    for name in GROUPS:
        out.update(given(args, f"train.{name}"))
    return out


# Field names that read as plain words in messages ("the data of ...") are left alone.
_WORDS = {"data", "model", "task", "out", "norm", "eval", "schedule", "optimizer", "positions",
          "activation", "mesh", "parallel", "remat", "max_len"}


def flagify(message: str, names: dict[str, list[str]], argv: Sequence[str] = ()) -> str:
    """Replace config field names in an error message by the flags that set them: the name
    the command line used (``--dropout``), else the field's own (``--dropout-rate``)."""
    typed = {a.split("=")[0] for a in argv}

    def flag(m: re.Match) -> str:
        options = names[m.group(1)]
        return next((o for o in options if o in typed), options[0])

    keys = sorted((k for k in names if k not in _WORDS), key=len, reverse=True)
    # Not inside a flag already written ("--lr") nor in a formula ("d_model^-0.5").
    return re.sub(r"(?<![-\w])(" + "|".join(keys) + r")(?![\w^])", flag, message)
