"""Translate with a trained run: ``python -m transformer_jax.translate --run DIR "a sentence"``.

Reads ``DIR/config.json`` of a ``train.py --task ...`` run, restores its newest checkpoint (or
the mean of the last ``--average-last`` ones, §6.1) and decodes each sentence with beam search
(beam 4, α = 0.6, §6.1) or ``--greedy``. Words are separated by spaces, as the task writes them
(``"3 4 + 1 9"`` for addition); ``--list-vocab`` prints the words the task knows, one a line.
A missing run, a language-model run, or a word outside the task's vocabulary (the message names
a few it knows) gives one line on stderr and exit status 2; Ctrl-C one line and exit status 130.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from transformer_jax import decoding
from transformer_jax.cli.common import ArgumentParser, exits_on_ctrl_c
from transformer_jax.data.seq2seq_tasks import SPECIALS, Seq2SeqTask
from transformer_jax.runs.checkpoint import CheckpointError
from transformer_jax.runs.load import load_run

__all__ = ["main"]

_EXAMPLES = 8  # known words an unknown-word error names


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m transformer_jax.translate",
        description="Translate sentences with the latest checkpoint of a seq2seq training run.")
    p.add_argument("sentences", nargs="*", metavar="SENTENCE", help="source sentence(s)")
    p.add_argument("--run", required=True, metavar="DIR", help="the run directory (train.py --out)")
    p.add_argument("--average-last", type=int, default=1, metavar="N",
                   help="average the parameters of the last N checkpoints (default: 1)")
    p.add_argument("--beam-size", type=int, default=4, metavar="W",
                   help="beam width (default: %(default)s, §6.1)")
    p.add_argument("--alpha", type=float, default=0.6,
                   help="length penalty exponent (default: %(default)s, §6.1)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of beam search")
    p.add_argument("--list-vocab", action="store_true",
                   help="print the words of the run's task, one a line, and exit")
    return p


def _words(task: Seq2SeqTask) -> list[str]:
    """The words a sentence may use: the task's vocabulary without the special tokens."""
    return list(task.vocab[len(SPECIALS):])


def _unknown_word_hint(task: Seq2SeqTask, sentences: Sequence[str]) -> str:
    """A few words the task knows, when ``sentences`` use one it does not; else ""."""
    words = _words(task)
    if all(w in words for s in sentences for w in s.lower().split()):
        return ""
    more = f", ... ({len(words)} in all: --list-vocab)" if len(words) > _EXAMPLES else ""
    return f"; known words: {', '.join(words[:_EXAMPLES])}{more}"


@exits_on_ctrl_c("python -m transformer_jax.translate")
def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.average_last < 1:
        parser.error(f"--average-last must be >= 1, got {args.average_last}")
    if args.beam_size < 1:
        parser.error(f"--beam-size must be >= 1, got {args.beam_size}")
    if not args.sentences and not args.list_vocab:
        parser.error("give at least one SENTENCE to translate (or --list-vocab)")
    try:
        run = load_run(args.run, average_last=args.average_last, kind="seq2seq")
    except (CheckpointError, ValueError) as e:  # RunConfigError is a ValueError
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    if args.list_vocab:
        print("\n".join(_words(run.task)))
        return 0
    try:
        outputs = decoding.translate(run.model, run.params, run.task, args.sentences,
                                     beam_size=args.beam_size, alpha=args.alpha,
                                     greedy=args.greedy)
    except ValueError as e:
        parser.exit(2, f"{parser.prog}: error: {e}{_unknown_word_hint(run.task, args.sentences)}\n")
    steps = run.steps
    print(f"[{args.run}: {run.task.name}, step {steps[-1]}"
          + (f", averaged over {len(steps)} checkpoints" if len(steps) > 1 else "") + "]",
          file=sys.stderr)
    for text in outputs:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
