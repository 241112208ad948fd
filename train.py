"""``python train.py [flags]``: train a model; ``--help`` lists the flags.

A thin entry point: the command line lives in :mod:`transformer_jax.cli.train`.
"""

import sys

from transformer_jax.cli.common import plain_warnings
from transformer_jax.cli.train import main

if __name__ == "__main__":
    plain_warnings("train.py")
    sys.exit(main())
