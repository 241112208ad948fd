"""Tokenize a corpus once for training: ``python -m transformer_jax.prepare SRC... --out DIR``.

SRC is any mix of text files, folders (read recursively), ``.jsonl`` files (one document per
line, the text in ``--text-field``) and the ``.gz`` form of either. DIR receives ``meta.json``,
``tokenizer.json`` and the token shards (:mod:`transformer_jax.data.prepare`); train on it with
``python train.py --data DIR``.

With ``--pairs SOURCE...`` it prepares text pairs for the encoder–decoder instead
(:mod:`transformer_jax.data.prepare_pairs`): two aligned text files, a TSV file or a JSONL file
(``.gz`` too); train on it with ``python train.py --task translate --data DIR``.

Bad input gives one line on stderr and exit status 2, and leaves DIR as it was; so does
Ctrl-C, with exit status 130 (the temporary folder is removed).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from transformer_jax.cli import common as cli
from transformer_jax.data import DataError
from transformer_jax.data.pair_files import pair_files
from transformer_jax.data.prepare import PrepareSettings, prepare_dataset
from transformer_jax.data.prepare_pairs import PairSettings, prepare_pairs, summary

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    d = PrepareSettings()
    p = cli.ArgumentParser(
        prog="python -m transformer_jax.prepare",
        description="Tokenize text sources into a dataset folder that train.py --data reads.")
    p.add_argument("sources", nargs="*", metavar="SRC",
                   help="text files, folders, .jsonl files, or their .gz form")
    p.add_argument("--out", required=True, metavar="DIR", help="the dataset folder to write")
    p.add_argument("--tokenizer", choices=("bpe", "byte"), default=d.tokenizer,
                   help="bpe: byte-level BPE trained on the sources; byte: UTF-8 bytes "
                        "(default: %(default)s)")
    p.add_argument("--vocab-size", type=int, metavar="N",
                   help="BPE vocabulary size, the special tokens included (default: 8192)")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val-fraction", type=float, metavar="F",
                     help="share of the tokens (the last ones) held out for validation "
                          "(default: 0.1, at most 1,048,576 tokens)")
    val.add_argument("--val-tokens", type=int, metavar="N",
                     help="hold out the last N tokens for validation")
    p.add_argument("--text-field", default=d.text_field,
                   help="the field of a .jsonl line that holds the text (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the dataset in --out (only once the new one is complete)")
    p.add_argument("--shard-mb", type=float, default=d.shard_bytes / 2**20, metavar="MIB",
                   help="largest token file, in MiB (default: %(default)g)")
    p.add_argument("--sample-mb", type=float, default=d.sample_bytes / 2**20, metavar="MIB",
                   help="text BPE is trained on: the first this many MiB of the sources, "
                        "never the validation tail (default: %(default)g)")
    _pair_flags(p)
    return p


PAIR_ONLY = ("valid_pairs", "test_pairs", "source_field", "target_field", "source_lang",
             "target_lang", "max_tokens", "max_ratio", "valid_fraction", "test_fraction")
LM_ONLY = ("tokenizer", "val_fraction", "val_tokens", "text_field", "shard_mb")


def _pair_flags(p) -> None:
    d = PairSettings()
    g = p.add_argument_group(
        "text pairs (--pairs)", "Prepare (source, target) pairs for the encoder-decoder "
        "(train.py --task translate): one BPE for both sides, filters, held-out splits.")
    g.add_argument("--pairs", nargs="+", metavar="SOURCE",
                   help="two aligned text files (source, then target: train.en train.de), or "
                        "one TSV (source<TAB>target) or JSONL file; .gz of each")
    for split in ("valid", "test"):
        g.add_argument(f"--{split}-pairs", nargs="+", metavar="SOURCE",
                       help=f"the {split} split's own pairs (same layouts), instead of holding "
                            "them out of --pairs by a hash of the source")
        g.add_argument(f"--{split}-fraction", type=float, metavar="F",
                       help=f"share of the --pairs held out for {split} by a hash of the "
                            "source (default: 0.01, at most 5,000 pairs)")
    for side in ("source", "target"):
        g.add_argument(f"--{side}-lang", metavar="LANG",
                       help=f"JSONL: the {side} text is the field translation.LANG")
        g.add_argument(f"--{side}-field", metavar="PATH",
                       help=f"JSONL: the dotted path of the {side} text (e.g. data.{side})")
    g.add_argument("--max-tokens", type=int, default=d.max_tokens, metavar="N",
                   help="drop pairs with more BPE tokens on either side (default: %(default)s)")
    g.add_argument("--max-ratio", type=float, default=d.max_ratio, metavar="R",
                   help="drop pairs whose sides' token counts differ by more than this factor "
                        "(Moses' clean-corpus-n rule; default: %(default)g)")


def _field(args, side: str) -> str | None:
    field, lang = getattr(args, f"{side}_field"), getattr(args, f"{side}_lang")
    return field or (f"translation.{lang}" if lang else None)


def _main_pairs(parser, args, given: set[str]) -> int:
    """``--pairs``: prepare text pairs (:func:`~transformer_jax.data.prepare_pairs.prepare_pairs`)."""
    if args.sources:
        parser.error(f"--pairs takes the pair files; {args.sources[0]} is extra (put them all "
                     "after --pairs)")
    wrong = sorted(given & set(LM_ONLY))
    if wrong:
        parser.error(f"--{wrong[0].replace('_', '-')} is for language-model text, not --pairs")
    for split in ("valid", "test"):
        if getattr(args, f"{split}_pairs") and getattr(args, f"{split}_fraction") is not None:
            parser.error(f"--{split}-fraction holds {split} pairs out of --pairs; with "
                         f"--{split}-pairs there is nothing to hold out: give one of them")
    settings = PairSettings(
        vocab_size=args.vocab_size or PairSettings.vocab_size, max_tokens=args.max_tokens,
        max_ratio=args.max_ratio, valid_fraction=args.valid_fraction,
        test_fraction=args.test_fraction, overwrite=args.overwrite,
        sample_bytes=int(args.sample_mb * 2**20))
    fields = (_field(args, "source"), _field(args, "target"))
    try:
        files = {name: pair_files(paths, *fields, what=flag) if paths else None
                 for name, paths, flag in (("train", args.pairs, "--pairs"),
                                           ("valid", args.valid_pairs, "--valid-pairs"),
                                           ("test", args.test_pairs, "--test-pairs"))}
        meta = prepare_pairs(files["train"], args.out, settings, valid=files["valid"],
                             test=files["test"], log=lambda m: print(m, file=sys.stderr))
    except DataError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print(f"wrote {args.out}: {summary(meta)}")
    return 0


@cli.exits_on_ctrl_c("python -m transformer_jax.prepare")
def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    given = cli.explicit_options(_parser, argv)
    if args.pairs:
        return _main_pairs(parser, args, given)
    if not args.sources:
        parser.error("give the text sources (SRC...), or text pairs with --pairs")
    extra = sorted(given & set(PAIR_ONLY))
    if extra:
        parser.error(f"--{extra[0].replace('_', '-')} is for text pairs: add --pairs SOURCE...")
    settings = PrepareSettings(
        tokenizer=args.tokenizer, vocab_size=args.vocab_size, val_fraction=args.val_fraction,
        val_tokens=args.val_tokens, text_field=args.text_field, overwrite=args.overwrite,
        shard_bytes=int(args.shard_mb * 2**20), sample_bytes=int(args.sample_mb * 2**20))
    try:
        meta = prepare_dataset(args.sources, args.out, settings,
                               log=lambda m: print(m, file=sys.stderr))
    except DataError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    tok = meta["tokenizer"]
    print(f"wrote {args.out}: {tok['kind']} tokenizer, vocabulary {tok['vocab_size']}, "
          f"{meta['documents']:,} documents; train {train['tokens']:,} tokens "
          f"({train['bytes'] / max(train['tokens'], 1):.2f} bytes/token) in "
          f"{len(train['shards'])} shard(s), validation {val['tokens']:,} tokens")
    return 0


if __name__ == "__main__":
    cli.plain_warnings("python -m transformer_jax.prepare")
    sys.exit(main())
