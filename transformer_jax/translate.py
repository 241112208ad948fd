"""``python -m transformer_jax.translate``: runs :mod:`transformer_jax.cli.translate`."""

import sys

from transformer_jax.cli.common import plain_warnings
from transformer_jax.cli.translate import main

if __name__ == "__main__":
    plain_warnings("python -m transformer_jax.translate")
    sys.exit(main())
