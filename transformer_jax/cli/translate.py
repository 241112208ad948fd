"""Translate with a trained run: ``python -m transformer_jax.translate --run DIR "a sentence"``.

Reads ``DIR/config.json`` of a ``train.py --task ...`` run, restores its newest checkpoint (or
the mean of the last ``--average-last`` ones, §6.1) and decodes each sentence with beam search
(beam 4, α = 0.6, §6.1) or ``--greedy``. Words are separated by spaces, as the task writes them
(``"3 4 + 1 9"`` for addition). A missing run, a language-model run, or a word outside the task's
vocabulary gives one line on stderr and exit status 2; Ctrl-C one line and exit status 130.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from transformer_jax import decoding
from transformer_jax.cli.common import ArgumentParser, exits_on_ctrl_c
from transformer_jax.runs.checkpoint import CheckpointError
from transformer_jax.runs.load import load_run

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m transformer_jax.translate",
        description="Translate sentences with the latest checkpoint of a seq2seq training run.")
    p.add_argument("sentences", nargs="+", metavar="SENTENCE", help="source sentence(s)")
    p.add_argument("--run", required=True, metavar="DIR", help="the run directory (train.py --out)")
    p.add_argument("--average-last", type=int, default=1, metavar="N",
                   help="average the parameters of the last N checkpoints (default: 1)")
    p.add_argument("--beam-size", type=int, default=4, metavar="W",
                   help="beam width (default: %(default)s, §6.1)")
    p.add_argument("--alpha", type=float, default=0.6,
                   help="length penalty exponent (default: %(default)s, §6.1)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of beam search")
    return p


@exits_on_ctrl_c("python -m transformer_jax.translate")
def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.average_last < 1:
        parser.error(f"--average-last must be >= 1, got {args.average_last}")
    if args.beam_size < 1:
        parser.error(f"--beam-size must be >= 1, got {args.beam_size}")
    try:
        run = load_run(args.run, average_last=args.average_last, kind="seq2seq")
        outputs = decoding.translate(run.model, run.params, run.task, args.sentences,
                                     beam_size=args.beam_size, alpha=args.alpha,
                                     greedy=args.greedy)
    except (CheckpointError, ValueError) as e:  # RunConfigError is a ValueError
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    steps = run.steps
    print(f"[{args.run}: {run.task.name}, step {steps[-1]}"
          + (f", averaged over {len(steps)} checkpoints" if len(steps) > 1 else "") + "]",
          file=sys.stderr)
    for text in outputs:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
