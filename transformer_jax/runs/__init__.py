"""A run on disk: its directory and ``config.json``, orbax checkpoints, metrics writers, and
:func:`~transformer_jax.runs.load.load_run`, the one reader every command uses.
"""
