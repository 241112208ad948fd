"""Generate text from a trained run: ``python -m transformer_jax.sample --run DIR --prompt "..."``.

Reads ``DIR/config.json``, restores the newest restorable checkpoint of ``DIR/checkpoints`` and
samples bytes with :func:`transformer_jax.decoding.generate` (KV cache; temperature, top-k,
top-p). Bad arguments or an unusable run directory give one line on stderr and exit status 2;
Ctrl-C one line and exit status 130.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from transformer_jax import decoding
from transformer_jax.cli import common as cli
from transformer_jax.runs.checkpoint import CheckpointError
from transformer_jax.runs.load import load_run

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog="python -m transformer_jax.sample",
        description="Generate text from the latest checkpoint of a training run.")
    p.add_argument("--run", required=True, metavar="DIR", help="the run directory (train.py --out)")
    p.add_argument("--prompt", default="The ", help="text to continue (default: %(default)r)")
    p.add_argument("--max-new-tokens", type=int, default=200, metavar="N",
                   help="bytes to generate (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T",
                   help="softmax temperature > 0 (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="sample among the K most likely bytes only")
    p.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="nucleus sampling: smallest set of bytes with probability >= P")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--step", type=int, default=None,
                   help="use this checkpoint step instead of the latest")
    return p


@cli.exits_on_ctrl_c("python -m transformer_jax.sample")
def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.temperature <= 0:
        parser.error(f"--temperature must be > 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        parser.error(f"--top-k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        parser.error(f"--top-p must lie in (0, 1], got {args.top_p}")
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    try:
        run = load_run(args.run, step=args.step, kind="lm")
        text = decoding.sample_text(run.model, run.params, args.prompt,
                                    max_new_tokens=args.max_new_tokens,
                                    context=run.train_cfg.data.seq_len, temperature=args.temperature,
                                    top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                    tokenizer=run.tokenizer)
    except (CheckpointError, ValueError) as e:  # RunConfigError is a ValueError
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    step = run.step
    print(f"[{args.run}, step {step}]", file=sys.stderr)
    print(text)
    return 0


if __name__ == "__main__":
    cli.plain_warnings("python -m transformer_jax.sample")
    sys.exit(main())
