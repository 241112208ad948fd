"""Generate text from a trained run: ``python -m transformer_jax.sample --run DIR --prompt "..."``.

Reads ``DIR/config.json``, restores the newest restorable checkpoint of ``DIR/checkpoints`` and
samples bytes with :func:`transformer_jax.decoding.generate` (KV cache; temperature, top-k,
top-p). Bad arguments or an unusable run directory give one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from transformer_jax import cli

__all__ = ["load_run", "main", "sample_text"]


def sample_text(model: Any, params: Any, prompt: str, *, max_new_tokens: int,
                context: int | None = None, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, seed: int = 0, device: Any = None) -> str:
    """Continue ``prompt`` by ``max_new_tokens`` bytes; returns prompt + continuation as text.

    A Transformer only ever sees positions it was trained on: generation runs in windows of at
    most ``context`` positions (the training ``seq_len``), each new window starting from the
    last ``context // 2`` bytes so far (at most two compilations: the first window and the
    rest). The recurrent baselines carry their state and need no windows.

    Args:
      model: a :class:`~transformer_jax.model.TransformerLM` or a
        :class:`~transformer_jax.rnn.RNNLM`.
      params: its parameters.
      prompt: the text to continue (UTF-8 bytes; an empty prompt starts from a newline).
      max_new_tokens: bytes to generate (>= 1).
      context: positions per window (default and upper bound: ``model.cfg.max_len``).
      temperature: softmax temperature (> 0).
      top_k: sample among the k most likely bytes only.
      top_p: nucleus sampling: the smallest set of bytes with probability >= p.
      seed: the sampling seed (key ``fold_in(PRNGKey(seed), 2)``: the "sampling" purpose).
      device: where to run (default: JAX's default device).
    """
    from transformer_jax import decoding, rnn
    from transformer_jax.data import ByteTokenizer

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    tok = ByteTokenizer()
    ids = [int(i) for i in (tok.encode(prompt) if prompt else tok.encode("\n"))]
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), 2)
    kw = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    with jax.default_device(device) if device is not None else contextlib.nullcontext():
        if isinstance(model, rnn.RNNLM):
            out = rnn.generate(model, params, np.asarray(ids, np.int32)[None], max_new_tokens,
                               rng=rng, **kw)
            return tok.decode(np.asarray(out)[0])
        ctx = min(context or model.cfg.max_len, model.cfg.max_len)
        if ctx < 2:
            raise ValueError(f"context must be >= 2, got {ctx}")
        text, window = list(ids), ids[-(ctx // 2):]
        for round_ in range(max_new_tokens):  # the loop ends long before this bound
            n = ctx + 1 - len(window)  # generate() feeds positions 0 .. T0 + n - 2 < ctx
            out = decoding.generate(model, params, np.asarray(window, np.int32)[None], n,
                                    rng=jax.random.fold_in(rng, round_), **kw)
            new = [int(i) for i in np.asarray(out)[0, len(window):]]
            take = min(n, max_new_tokens - (len(text) - len(ids)))
            text += new[:take]
            if len(text) - len(ids) >= max_new_tokens:
                break
            window = text[-(ctx // 2):]
    return tok.decode(np.asarray(text))


def load_run(run_dir: str | Path, *, step: int | None = None):
    """(model, params, step, model config, train config) of a run's newest usable checkpoint.

    Raises:
      transformer_jax.rundir.RunConfigError: no usable ``config.json`` in ``run_dir``.
      transformer_jax.checkpoint.CheckpointError: no checkpoint (or not ``step``) can be
        restored, e.g. truncated files or checkpoints of another model.
    """
    from transformer_jax import rundir, training
    from transformer_jax.checkpoint import Checkpointer, CheckpointError

    run_dir = Path(run_dir)
    model_cfg, tc = rundir.read_configs(run_dir)
    model = training.build_model(tc.model, model_cfg)
    tx = training.make_optimizer(tc, model_cfg.d_model)
    abstract = jax.eval_shape(lambda: training.init_state(model, tx, seed=0, seq_len=tc.seq_len))
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                            abstract)
    with Checkpointer(run_dir / "checkpoints") as ckpt:
        saved = ckpt.all_steps()
        if step is not None and step not in saved:
            raise CheckpointError(f"{run_dir / 'checkpoints'} has no checkpoint of step {step} "
                                  f"(saved steps: {', '.join(map(str, saved)) or 'none'})")
        restored = ckpt.restore(abstract, step=step, expect={"model": model_cfg.to_dict()},
                                set_aside=False)  # reading a run does not rearrange it
    if restored is None:
        raise CheckpointError(f"{run_dir / 'checkpoints'} holds no checkpoint yet; train first "
                              f"(python train.py --out {run_dir})")
    return model, restored.state.params, restored.step, model_cfg, tc


def _parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog="python -m transformer_jax.sample",
        description="Generate text from the latest checkpoint of a training run.")
    p.add_argument("--run", required=True, metavar="DIR", help="the run directory (train.py --out)")
    p.add_argument("--prompt", default="The ", help="text to continue (default: %(default)r)")
    p.add_argument("--max-new-tokens", type=int, default=200, metavar="N",
                   help="bytes to generate (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T",
                   help="softmax temperature > 0 (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="sample among the K most likely bytes only")
    p.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="nucleus sampling: smallest set of bytes with probability >= P")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--step", type=int, default=None,
                   help="use this checkpoint step instead of the latest")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.temperature <= 0:
        parser.error(f"--temperature must be > 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        parser.error(f"--top-k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        parser.error(f"--top-p must lie in (0, 1], got {args.top_p}")
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    from transformer_jax.checkpoint import CheckpointError

    try:
        model, params, step, _, tc = load_run(args.run, step=args.step)
        text = sample_text(model, params, args.prompt, max_new_tokens=args.max_new_tokens,
                           context=tc.seq_len, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, seed=args.seed)
    except (CheckpointError, ValueError) as e:  # RunConfigError is a ValueError
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print(f"[{args.run}, step {step}]", file=sys.stderr)
    print(text)
    return 0


if __name__ == "__main__":
    cli.plain_warnings("python -m transformer_jax.sample")
    sys.exit(main())
