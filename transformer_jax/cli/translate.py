"""Translate with a trained run: ``python -m transformer_jax.translate --run DIR "a sentence"``.

Reads ``DIR/config.json`` of a ``train.py --task ...`` run, restores its newest checkpoint (or
the mean of the last ``--average-last`` ones, §6.1) and decodes each sentence with beam search
(beam 4, α = 0.6, §6.1) or ``--greedy``. Words are separated by spaces, as the task writes them
(``"3 4 + 1 9"`` for addition); ``--list-vocab`` prints the words the task knows, one a line.
A run trained on a parallel dataset (``train.py --task translate --data DIR``) translates raw
text through its subword tokenizer.

For real work: sentences as arguments, or one a line from ``--input FILE`` (or stdin), to
``--output FILE`` (or stdout), one line each in the input's order, batched by length; the
sentences per second go to stderr, and with ``--reference FILE`` (a line per input line)
sacreBLEU and chrF with their signatures.

A missing run, a language-model run, a word outside the task's vocabulary (the message names a
few it knows), or a reference whose line count differs from the input's gives one line on
stderr and exit status 2; Ctrl-C one line and exit status 130.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from transformer_jax import decoding
from transformer_jax.cli.common import ArgumentParser, exits_on_ctrl_c
from transformer_jax.data.seq2seq_tasks import SPECIALS, Seq2SeqTask
from transformer_jax.runs.checkpoint import CheckpointError
from transformer_jax.runs.load import load_run
from transformer_jax.train import translation

__all__ = ["main"]

_EXAMPLES = 8  # known words an unknown-word error names


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m transformer_jax.translate",
        description="Translate sentences with the latest checkpoint of a seq2seq training run.")
    p.add_argument("sentences", nargs="*", metavar="SENTENCE",
                   help="source sentence(s); none: one a line from --input FILE or stdin")
    p.add_argument("--input", metavar="FILE", help="source sentences, one a line")
    p.add_argument("--output", metavar="FILE",
                   help="write the translations here, one a line (default: stdout)")
    p.add_argument("--reference", metavar="FILE",
                   help="reference translations, one a line: print sacreBLEU and chrF (with "
                        "their signatures) to stderr")
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
    try:
        run = load_run(args.run, average_last=args.average_last, kind="seq2seq")
        if args.list_vocab and run.task is None:
            raise ValueError(f"{args.run} was trained on a parallel dataset: any text goes "
                             "(its subwords are in its tokenizer.json)")
        sentences, references = ([], None) if args.list_vocab else _inputs(args)
    except (CheckpointError, ValueError, OSError) as e:  # RunConfigError is a ValueError
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    if args.list_vocab:
        print("\n".join(_words(run.task)))
        return 0
    t0 = time.perf_counter()
    try:
        outputs = _translate(run, sentences, args)
    except ValueError as e:
        parser.exit(2, f"{parser.prog}: error: {e}{_unknown_word_hint(run.task, sentences)}\n")
    seconds = time.perf_counter() - t0
    try:
        _write(args.output, outputs)
    except OSError as e:
        parser.exit(2, f"{parser.prog}: error: cannot write --output {args.output}: "
                       f"{e.strerror or e}\n")
    steps = run.steps
    name = run.task.name if run.task is not None else ", ".join(run.train_cfg.data.data)
    print(f"[{args.run}: {name}, step {steps[-1]}"
          + (f", averaged over {len(steps)} checkpoints" if len(steps) > 1 else "")
          + f"; {len(outputs)} sentences in {seconds:.1f} s, "
          f"{len(outputs) / max(seconds, 1e-9):.1f} sentences/s]", file=sys.stderr)
    if references is not None:
        score = translation.score(outputs, references)
        print(f"BLEU {score['bleu']:.2f} ({score['bleu_signature']})\n"
              f"chrF {score['chrf']:.2f} ({score['chrf_signature']})", file=sys.stderr)
    return 0


def _translate(run, sentences: list[str], args: argparse.Namespace) -> list[str]:
    """The translations of ``sentences``, batched by length, in their order."""
    kwargs = {"beam_size": args.beam_size, "alpha": args.alpha, "greedy": args.greedy}
    if run.task is None:  # a parallel dataset's run: raw text through its subword tokenizer
        codec = translation.TextCodec(run.tokenizer, run.model_cfg.pad_id, run.model_cfg.eos_id)
        return translation.translate_texts(run.model, run.params, codec, sentences, **kwargs)
    return decoding.translate(run.model, run.params, run.task, sentences, **kwargs)


def _lines(path: str, flag: str) -> list[str]:
    """The lines of a UTF-8 file without their line ends (ValueError naming the file)."""
    try:
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\r\n") for line in f]
    except UnicodeDecodeError as e:
        raise ValueError(f"{flag} {path}: not UTF-8 (byte offset {e.start} of a line)") from None
    except OSError as e:
        raise ValueError(f"{flag} {path}: {e.strerror or e}") from None


def _inputs(args: argparse.Namespace) -> tuple[list[str], list[str] | None]:
    """(source sentences, reference lines or None); ValueError for inputs that disagree."""
    if args.sentences and args.input:
        raise ValueError("give sentences as arguments or --input FILE, not both")
    if args.sentences:
        sentences = list(args.sentences)
    elif args.input:
        sentences = _lines(args.input, "--input")
    else:
        sentences = _stdin_lines()
    if not sentences:
        raise ValueError("no sentences to translate: give SENTENCE arguments, --input FILE or "
                         "lines on stdin (or --list-vocab)")
    if args.reference is None:
        return sentences, None
    references = _lines(args.reference, "--reference")
    if len(references) != len(sentences):
        raise ValueError(f"--reference {args.reference} has {len(references)} lines, the input "
                         f"{len(sentences)} sentences; give one reference line per sentence")
    return sentences, references


def _stdin_lines() -> list[str]:
    """The lines piped in; none from a terminal (nobody waits for a typist) or a closed stdin."""
    try:
        if sys.stdin is None or sys.stdin.isatty():
            raise OSError
        return [line.rstrip("\r\n") for line in sys.stdin]
    except (OSError, ValueError):
        raise ValueError("give at least one SENTENCE to translate, --input FILE, lines on "
                         "stdin, or --list-vocab") from None


def _write(path: str | None, lines: list[str]) -> None:
    if path is None:
        print("\n".join(lines))
        return
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(text + "\n" for text in lines)


if __name__ == "__main__":
    sys.exit(main())
