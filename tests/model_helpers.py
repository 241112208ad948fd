"""Shared by the model and decoding tests: tiny inputs and random parameters without ``init``."""

import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.config import PRESETS, RECIPES

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


def write_seq2seq_run(out, task_name="reverse", seeds=(0, 1)):
    """A ``train.py --task`` run directory with checkpoints of untrained parameters (no training).

    One checkpoint per seed, at steps 10, 20, ...: ``init_state`` with that seed. Returns
    (model config, train config).
    """
    import dataclasses
    import json

    from transformer_jax import train as training
    from transformer_jax.data.seq2seq_tasks import get_task
    from transformer_jax.models.transformer import Transformer
    from transformer_jax.runs.checkpoint import Checkpointer

    task = get_task(task_name)
    cfg = dataclasses.replace(TINY, vocab_size=task.vocab_size, num_encoder_layers=1,
                              num_decoder_layers=1, max_len=24)
    tc = RECIPES["translate"].train.replace(task=task_name, out=str(out))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"model": cfg.to_dict(), "train": tc.to_dict()}))
    model, tx = Transformer(cfg), training.make_optimizer(tc, cfg.d_model)
    lengths = (task.src_len, task.max_tgt_len + 1)
    with Checkpointer(out / "checkpoints") as ckpt:
        for i, seed in enumerate(seeds):
            step = 10 * (i + 1)  # the metadata the training loop writes with each checkpoint
            meta = {"step": step, "model": cfg.to_dict(), "train": tc.to_dict()}
            ckpt.save(step, training.init_state(model, tx, seed=seed, input_lengths=lengths),
                      meta)
    return cfg, tc
