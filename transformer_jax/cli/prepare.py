"""Tokenize a corpus once for training: ``python -m transformer_jax.prepare SRC... --out DIR``.

SRC is any mix of text files, folders (read recursively), ``.jsonl`` files (one document per
line, the text in ``--text-field``) and the ``.gz`` form of either. DIR receives ``meta.json``,
``tokenizer.json`` and the token shards (:mod:`transformer_jax.data.prepare`); train on it with
``python train.py --data DIR``. Bad input gives one line on stderr and exit status 2, and
leaves DIR as it was; so does Ctrl-C, with exit status 130 (the temporary folder is removed).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from transformer_jax.cli import common as cli
from transformer_jax.data import DataError
from transformer_jax.data.prepare import PrepareSettings, prepare_dataset

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    d = PrepareSettings()
    p = cli.ArgumentParser(
        prog="python -m transformer_jax.prepare",
        description="Tokenize text sources into a dataset folder that train.py --data reads.")
    p.add_argument("sources", nargs="+", metavar="SRC",
                   help="text files, folders, .jsonl files, or their .gz form")
    p.add_argument("--out", required=True, metavar="DIR", help="the dataset folder to write")
    p.add_argument("--tokenizer", choices=("bpe", "byte"), default=d.tokenizer,
                   help="bpe: byte-level BPE trained on the sources; byte: UTF-8 bytes "
                        "(default: %(default)s)")
    p.add_argument("--vocab-size", type=int, metavar="N",
                   help="BPE vocabulary size, the end-of-text token included (default: 8192)")
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
    return p


@cli.exits_on_ctrl_c("python -m transformer_jax.prepare")
def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
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
