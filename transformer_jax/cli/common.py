"""Shared by the command lines (``train.py``, ``-m transformer_jax.sample``/``.visualize``).

Bad input to a command line is one line on stderr that names the problem and what to do, and
exit status 2, never a traceback or a screenful of usage.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence

__all__ = ["ArgumentParser", "explicit_options", "plain_warnings"]


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line (plus a pointer to ``--help``)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def explicit_options(build: Callable[[], argparse.ArgumentParser],
                     argv: Sequence[str] | None) -> set[str]:
    """Destinations of the options given on the command line ``argv`` (not left at defaults).

    Args:
      build: makes the parser (a fresh one: its defaults are suppressed here).
      argv: the arguments as given to ``parse_args``.
    """
    parser = build()
    for action in parser._actions:  # argparse has no public accessor
        action.default = argparse.SUPPRESS
        action.required = False
    namespace, _ = parser.parse_known_args(argv)
    return set(vars(namespace))


def plain_warnings(prog: str) -> None:
    """Print warnings as ``prog: warning: message`` (no file, line or source: not a traceback).

    Also one line for "unraisable" exceptions: orbax's reader coroutines that fail on a
    truncated checkpoint are garbage-collected with their error, which Python would print as a
    traceback although the checkpointer has already handled it (fallback or one error).
    For a command line's ``__main__`` only: it replaces the hooks globally.
    """
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{prog}: warning: {message}", file=file or sys.stderr)

    def unraisable(info):
        first = str(info.exc_value).splitlines()[0] if str(info.exc_value) else ""
        print(f"{prog}: warning: ignored {type(info.exc_value).__name__}: {first[:200]}",
              file=sys.stderr)

    warnings.showwarning = show
    sys.unraisablehook = unraisable
