"""The device mesh's axis names and the syntax of ``--mesh`` (the mesh itself is built in
:mod:`transformer_jax.parallel.sharding`)."""

from __future__ import annotations

__all__ = ["AXES", "DATA", "FSDP", "TENSOR", "mesh_axes"]

DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
AXES = (DATA, FSDP, TENSOR)
"""Mesh axis names, outermost first (data parallelism crosses hosts best: it talks least)."""


def mesh_axes(spec: str) -> dict[str, int]:
    """The syntax of ``--mesh``: ``"data=2,fsdp=-1"`` -> ``{"data": 2, "fsdp": -1}``.

    Raises:
      ValueError: an unknown or repeated axis, a size that is not a positive integer (or -1,
        once); the message names ``--mesh``.
    """
    sizes: dict[str, int] = {}
    for part in spec.split(","):
        name, sep, value = (s.strip() for s in part.partition("="))
        if not sep or name not in AXES or name in sizes:
            raise ValueError(f"--mesh {spec!r}: expected comma-separated AXIS=SIZE, each AXIS "
                             f"once, from {', '.join(AXES)}; got {part.strip()!r}")
        try:
            size = int(value)
        except ValueError:
            size = 0
        if size < 1 and not (size == -1 and -1 not in sizes.values()):
            raise ValueError(f"--mesh {spec!r}: the size of {name} must be a positive integer "
                             f"(or -1 once, for the remaining devices), got {value!r}")
        sizes[name] = size
    return sizes
