"""``python -m transformer_jax.sample``: runs :mod:`transformer_jax.cli.sample`."""

import sys

from transformer_jax.cli.entry import run

if __name__ == "__main__":
    sys.exit(run("python -m transformer_jax.sample", "transformer_jax.cli.sample"))
