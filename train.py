"""``python train.py [flags]``: train a model; ``--help`` lists the flags.

A thin entry point: the command line lives in :mod:`transformer_jax.cli.train`.
"""

import sys

from transformer_jax.cli.entry import run

if __name__ == "__main__":
    sys.exit(run("train.py", "transformer_jax.cli.train"))
