"""Shared by the model and decoding tests: tiny inputs and random parameters without ``init``."""

import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.config import PRESETS

TINY = PRESETS["tiny"]
KEY = jax.random.key(0)


def tokens(seed, shape, low=3, high=TINY.vocab_size):
    """Random int32 tokens in [low, high) (ids below 3 are pad/bos/eos)."""
    return jnp.asarray(np.random.default_rng(seed).integers(low, high, shape), jnp.int32)


def random_params(model, *inputs, seed=0):
    """Random parameters of the right shapes without compiling ``init`` (compiles dominate)."""
    shapes = jax.eval_shape(lambda *x: model.init(KEY, *x), *inputs)["params"]
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "scale":
            return jnp.asarray(1 + 0.1 * rng.standard_normal(leaf.shape), leaf.dtype)
        std = 0.1 if name == "bias" else leaf.shape[0] ** -0.5
        if name in ("embedding", "pos_embed"):
            std = leaf.shape[-1] ** -0.5
        return jnp.asarray(std * rng.standard_normal(leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)
