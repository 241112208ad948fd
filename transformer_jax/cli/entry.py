"""How every command starts: import it, then run its ``main``.

Importing a command loads JAX, which takes a few seconds; a Ctrl-C in that time ends with one
line and exit status 130, like a Ctrl-C later on. This module and the package's ``__init__``
import nothing heavy, so the entry points (``train.py``, ``python -m transformer_jax.sample``,
...) reach the ``try`` at once.
"""

import importlib
import sys


def run(prog: str, module: str) -> int:
    """Run ``module.main()`` as the command ``prog``; returns its exit status."""
    try:
        command = importlib.import_module(module)
        from transformer_jax.cli import common
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    common.plain_warnings(prog)
    return command.main()
