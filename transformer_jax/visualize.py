"""``python -m transformer_jax.visualize``: runs :mod:`transformer_jax.cli.visualize`."""

import sys

from transformer_jax.cli.entry import run

if __name__ == "__main__":
    sys.exit(run("python -m transformer_jax.visualize", "transformer_jax.cli.visualize"))
