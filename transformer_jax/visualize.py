"""``python -m transformer_jax.visualize``: runs :mod:`transformer_jax.cli.visualize`."""

import sys

from transformer_jax.cli.common import plain_warnings
from transformer_jax.cli.visualize import main

if __name__ == "__main__":
    plain_warnings("python -m transformer_jax.visualize")
    sys.exit(main())
