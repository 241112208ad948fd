"""What every config dataclass shares: checks declared on the fields, dict round trips, and the
attribute descriptions that become ``--help`` text.

A field declares its rules in its metadata, so a rule is written once, beside the field:

* a ``Literal[...]`` type is the list of allowed values;
* ``metadata={"min": 1}`` (see :func:`at_least`) bounds an int from below;
* ``metadata={"rule": (predicate, "in words")}`` (see :func:`rule`) checks anything else;
* ``metadata={"aliases": ("--heads",)}`` gives the command-line flag more names;
* ``metadata={"flag": False}`` keeps a field off the command line (set from the data).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import typing
from collections.abc import Callable
from typing import Any

__all__ = ["at_least", "attribute_docs", "check", "choices", "from_dict", "rule"]


def at_least(default: Any, low: int, **metadata: Any) -> Any:
    """A dataclass field holding an int ``>= low`` (``default`` as its default)."""
    return dataclasses.field(default=default, metadata={"min": low, **metadata})


def rule(default: Any, holds: Callable[[Any], bool], words: str, **metadata: Any) -> Any:
    """A dataclass field whose value must satisfy ``holds`` ("must <words>" when it does not)."""
    return dataclasses.field(default=default, metadata={"rule": (holds, words), **metadata})


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def choices(cls: type, name: str) -> tuple[Any, ...]:
    """The allowed values of field ``name`` of ``cls`` (its ``Literal`` type), or ``()``."""
    hint = _hints(cls)[name]
    return typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else ()


def check(obj: Any) -> None:
    """Check every field of the dataclass instance ``obj`` against its declared rules.

    Raises:
      ValueError: the first field that breaks its rule, by name, with the value seen.
    """
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        allowed = choices(type(obj), f.name)
        if allowed and value not in allowed:
            raise ValueError(f"{f.name} must be one of {allowed}, got {value!r}")
        if "min" in f.metadata:
            low = f.metadata["min"]
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                kind = "a positive int" if low == 1 else f"an int >= {low}"
                raise ValueError(f"{f.name} must be {kind}, got {value!r}")
        if "rule" in f.metadata:
            holds, words = f.metadata["rule"]
            if not holds(value):  # a NaN fails every comparison, so it fails here too
                raise ValueError(f"{f.name} must {words}, got {value!r}")


def from_dict(cls: type, d: dict[str, Any]) -> Any:
    """``cls(**d)`` for a config dataclass, naming any keys that are not its fields."""
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    return cls(**d)


@functools.cache
def attribute_docs(cls: type) -> dict[str, str]:
    """Field name -> its description in the ``Attributes:`` section of ``cls``'s docstring.

    The docstring is where each field is described once; ``--help`` reads it from there.
    """
    lines = (cls.__doc__ or "").splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:")
    except StopIteration:
        return {}
    docs: dict[str, str] = {}
    name = None
    for line in lines[start + 1:]:
        m = re.match(r"^\s{2,6}(\w+): ?(.*)$", line)
        if m and m.group(1) in {f.name for f in dataclasses.fields(cls)}:
            name, docs[m.group(1)] = m.group(1), m.group(2)
        elif name and line.strip():
            docs[name] += " " + line.strip()
        elif not line.strip() and name:
            continue
    return {k: " ".join(v.split()) for k, v in docs.items()}
