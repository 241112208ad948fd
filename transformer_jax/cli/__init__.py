"""The command lines: ``train.py`` (:mod:`~transformer_jax.cli.train`), ``python -m
transformer_jax.sample`` / ``.translate`` / ``.visualize``, and their shared one-line error
handling (:mod:`~transformer_jax.cli.common`). Library modules never import these.
"""
