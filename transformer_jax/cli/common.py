"""Shared by the command lines (``train.py``, ``-m transformer_jax.sample``/``.visualize``).

Bad input to a command line is one line on stderr that names the problem and what to do, and
exit status 2, never a traceback or a screenful of usage. Ctrl-C is one line too, and exit
status 130 (:func:`exits_on_ctrl_c`).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import warnings
from collections.abc import Callable, Sequence

from transformer_jax.runs import signals
from transformer_jax.runs.signals import EXIT_INTERRUPTED

__all__ = ["EXIT_INTERRUPTED", "EXIT_WRITE_FAILED", "ArgumentParser", "exits_on_ctrl_c",
           "explicit_options", "plain_warnings"]

EXIT_WRITE_FAILED = 74  # EX_IOERR of sysexits.h: "an error occurred while doing I/O on some file"


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


def exits_on_ctrl_c(prog: str, *, at_once: str | None = None) -> Callable:
    """Decorator for a command's ``main``: Ctrl-C ends it with one line and exit status 130.

    By default Ctrl-C raises ``KeyboardInterrupt`` as usual, so ``finally`` blocks and context
    managers clean up (a half-written output folder, say); the decorator turns it into
    ``prog: interrupted (Ctrl-C)`` instead of a traceback. With ``at_once=MESSAGE``, Ctrl-C
    ends the process at once with ``prog: MESSAGE``
    (:func:`transformer_jax.runs.signals.ctrl_c_ends_at_once`): for a command that handles a
    first Ctrl-C itself (``train.py``'s loop saves a checkpoint) and hands the second one here.
    """
    def decorate(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def wrapped(*args, **kwargs) -> int:
            handler = (contextlib.nullcontext() if at_once is None
                       else signals.ctrl_c_ends_at_once(f"{prog}: {at_once}"))
            try:
                with handler:
                    return main(*args, **kwargs)
            except KeyboardInterrupt:
                print(f"{prog}: interrupted (Ctrl-C)", file=sys.stderr)
                return EXIT_INTERRUPTED

        return wrapped

    return decorate


def plain_warnings(prog: str) -> None:
    """Print warnings as ``prog: warning: message`` (no file, line or source: not a traceback).

    Also one line for "unraisable" exceptions (each distinct one once): orbax's reader
    coroutines that fail on a truncated checkpoint are garbage-collected with their error, which
    Python would print as a traceback although the checkpointer has already handled it
    (fallback or one error). ``RuntimeError: Event loop is closed`` is dropped: asyncio raises
    it when a write that orbax gave up on (a full disk) completes after orbax closed the event
    loop of that save, and the checkpointer reports the failure itself.
    For a command line's ``__main__`` only: it replaces the hooks globally.
    """
    shown = set()

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{prog}: warning: {message}", file=file or sys.stderr)

    def unraisable(info):
        first = str(info.exc_value).splitlines()[0] if str(info.exc_value) else ""
        text = f"{type(info.exc_value).__name__}: {first[:200]}"
        if text in shown or text == "RuntimeError: Event loop is closed":
            return
        shown.add(text)
        print(f"{prog}: warning: ignored {text}", file=sys.stderr)

    warnings.showwarning = show
    sys.unraisablehook = unraisable
