"""``python -m transformer_jax.translate``: runs :mod:`transformer_jax.cli.translate`."""

import sys

from transformer_jax.cli.entry import run

if __name__ == "__main__":
    sys.exit(run("python -m transformer_jax.translate", "transformer_jax.cli.translate"))
