"""``python -m transformer_jax.prepare``: runs :mod:`transformer_jax.cli.prepare`."""

import sys

from transformer_jax.cli.common import plain_warnings
from transformer_jax.cli.prepare import main

if __name__ == "__main__":
    plain_warnings("python -m transformer_jax.prepare")
    sys.exit(main())
