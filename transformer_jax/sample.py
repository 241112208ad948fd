"""``python -m transformer_jax.sample``: runs :mod:`transformer_jax.cli.sample`."""

import sys

from transformer_jax.cli.common import plain_warnings
from transformer_jax.cli.sample import main

if __name__ == "__main__":
    plain_warnings("python -m transformer_jax.sample")
    sys.exit(main())
