"""Train a byte-level Transformer language model: ``python train.py [flags]``.

With no flags: the "cpu-lm" preset on the embedded corpus (the Python reference manual that ships
with CPython), about 4 to 5 minutes on 2 CPU cores. Flags override the preset; ``--help`` lists them.
``--task translate`` (or reverse, sort, add) trains the encoder–decoder on a generated
sequence-to-sequence task instead, with the paper's recipe ("cpu-seq2seq" preset and
:data:`transformer_jax.train.seq2seq.TRAIN_DEFAULTS`; ``--task translate --help`` shows them), and
evaluates the test split with greedy and beam search at the end.
Re-running a command with the same ``--out`` resumes from the run's latest checkpoint.
Exit status: 0 done (or stopped by SIGTERM with a checkpoint), 1 training diverged, 2 bad input
(or ``--out`` in use by another run), 74 a checkpoint or ``metrics.jsonl`` could not be written
(full disk, no permission, read-only filesystem; the last good checkpoint is intact), 130
stopped by Ctrl-C (the first Ctrl-C saves a checkpoint at the end of the step in progress; a
second one stops at once without saving).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
import typing
from collections.abc import Sequence

from transformer_jax.cli import common as cli
from transformer_jax.config import PRESETS, ModelConfig, TrainConfig
from transformer_jax.data.prepared import data_vocab_size, is_prepared
from transformer_jax.data.seq2seq_tasks import get_task
from transformer_jax.parallel import distributed
from transformer_jax.runs.checkpoint import CheckpointError
from transformer_jax.train import loop, tasks

_DEFAULTS = TrainConfig()

# Config field -> the flag that sets it, so that error messages name what the user typed.
_FLAGS = {"num_decoder_layers": "--layers", "d_model": "--d-model", "num_heads": "--heads",
          "num_kv_heads": "--heads", "d_ff": "--d-ff", "dropout_rate": "--dropout",
          "dtype": "--dtype", "seq_len": "--seq-len", "batch_size": "--batch-size",
          "grad_accum": "--grad-accum", "steps": "--steps", "lr": "--lr", "warmup": "--warmup",
          "weight_decay": "--weight-decay", "grad_clip": "--grad-clip",
          "label_smoothing": "--label-smoothing", "seed": "--seed", "log_every": "--log-every",
          "eval_every": "--eval-every", "ckpt_every": "--ckpt-every",
          "steps_per_call": "--steps-per-call", "sample_tokens": "--sample-tokens",
          "average_last": "--average-last", "max_nonfinite": "--max-nonfinite",
          "norm_type": "--norm-type", "qk_norm": "--qk-norm", "use_bias": "--bias",
          "share_embeddings": "--tie-embeddings", "attention_impl": "--attention-impl",
          "scan_layers": "--scan-layers", "z_loss": "--z-loss"}

# (option given, condition on the other flags, why it has no effect): refused, not ignored.
_CONFLICTS = (
    ("lr", lambda a: a.schedule == "paper",
     ("--lr has no effect with --schedule paper (its rate is d_model^-0.5 · min(step^-0.5, "
      "step · warmup^-1.5), §5.3); drop --lr or use --schedule cosine or constant")),
    ("weight_decay", lambda a: a.optimizer == "adam",
     ("--weight-decay has no effect with --optimizer adam (the paper's Adam has none); drop "
      "it or use --optimizer adamw")),
    ("prompt", lambda a: a.sample_tokens == 0,
     "--prompt has no effect with --sample-tokens 0; drop one of them"),
)


def _flagify(message: str) -> str:
    """Replace config field names in an error message by the flags that set them."""
    return re.sub(r"\b(" + "|".join(sorted(_FLAGS, key=len, reverse=True)) + r")\b",
                  lambda m: _FLAGS[m.group(1)], message)


class _HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to flags that have a default and do not mention one."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" not in text and action.default not in (None, False, argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def _choices(name: str) -> tuple[str, ...]:
    hints = typing.get_type_hints(TrainConfig)
    return typing.get_args(hints[name])


_TASKS = ("lm", "translate", "reverse", "sort", "add")


def _task_of(argv: Sequence[str] | None) -> str:
    """The --task value (its defaults decide the other flags' defaults), "lm" if absent/bad."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--task", default="lm")
    task = pre.parse_known_args(argv)[0].task
    return task if task in _TASKS else "lm"


def build_parser(task: str = "lm") -> argparse.ArgumentParser:
    """The argument parser; every flag documents its default (those of ``task``)."""
    d = tasks.defaults(task)
    p = cli.ArgumentParser(
        prog="train.py",
        description="Train a byte-level Transformer LM (Vaswani et al., 2017) with JAX/Flax. "
                    "Flags override the preset. Outputs go to --out: config.json, metrics.jsonl, "
                    "tensorboard/, checkpoints/, samples.txt, loss.png. Re-running with the same "
                    "--out resumes from the latest checkpoint.",
        formatter_class=_HelpFormatter)
    _model_flags(p.add_argument_group("model"), d, task)
    _architecture_flags(p.add_argument_group(
        "architecture and scale (default: the preset's; cpu-lm, cpu-modern and modern-lm set "
        "the modern options)"))
    _data_flags(p.add_argument_group("data"), d)
    _optimization_flags(p.add_argument_group("optimization"), d)
    _run_flags(p.add_argument_group("run"), d)
    _host_flags(p.add_argument_group("multi-host (every host runs the same command)"))
    return p


def _model_flags(g, d: TrainConfig, task: str) -> None:
    """--task, --preset and the model's shape."""
    g.add_argument("--task", choices=_TASKS, default="lm",
                   help="lm: byte-level language model on --data; translate, reverse, sort, "
                        "add: the encoder-decoder on a generated seq2seq task (the paper's "
                        "recipe; defaults change, see --task translate --help)")
    g.add_argument("--preset", choices=sorted(PRESETS),
                   default="cpu-lm" if task == "lm" else "cpu-seq2seq",
                   help="model preset (vocab: 256 bytes for lm, else the task's)")
    g.add_argument("--model", choices=_choices("model"), default=d.model, help="model family")
    g.add_argument("--layers", type=int,
                   help="decoder layers L, and encoder layers for seq2seq tasks (default: the "
                        "preset's)")
    g.add_argument("--d-model", type=int, metavar="D", help="model width (default: the preset's)")
    g.add_argument("--heads", type=int, metavar="N",
                   help="attention heads (default: the preset's)")
    g.add_argument("--d-ff", type=int, metavar="F",
                   help="feed-forward width (default: the preset's)")
    g.add_argument("--dropout", type=float, help="dropout rate, §5.4 (default: the preset's)")
    g.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="compute dtype; parameters stay float32 (default: the preset's)")


def _architecture_flags(g) -> None:
    """The layers' options (the paper's defaults vs the modern LM's) and memory/compile time."""
    model = typing.get_type_hints(ModelConfig)
    for flag, field, text in (
            ("--norm", "norm", "post: LayerNorm(x + f(x)) as in §3.1; pre: x + f(LayerNorm(x))"),
            ("--norm-type", "norm_type", "layernorm (§3.1) or rmsnorm (Zhang & Sennrich 2019)"),
            ("--positions", "positions", "sinusoidal (§3.5), learned, or rope (rotary, Su et "
                                         "al. 2021)"),
            ("--activation", "activation", "feed-forward: relu (§3.3), gelu, or swiglu "
                                           "(Shazeer 2020)"),
            ("--attention-impl", "attention_impl", "the attention kernel's implementation"),
            ("--remat", "remat", "rematerialise each block in the backward pass: block keeps "
                                 "only its input, dots also the weight matmuls' outputs")):
        g.add_argument(flag, choices=typing.get_args(model[field]), help=text)
    g.add_argument("--qk-norm", action=argparse.BooleanOptionalAction,
                   help="RMS-normalise queries and keys per head (Dehghani et al. 2023)")
    g.add_argument("--bias", action=argparse.BooleanOptionalAction,
                   help="biases in projections and LayerNorms (the paper's; off in modern LMs)")
    g.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction,
                   help="output projection tied to the input embedding (§3.4)")
    g.add_argument("--scan-layers", action=argparse.BooleanOptionalAction,
                   help="run each stack of blocks as one nn.scan: compile time independent of "
                        "depth; parameters get a leading layer axis (checkpoints of the other "
                        "layout are refused)")


def _data_flags(g, d: TrainConfig) -> None:
    """--data and the batch shape."""
    g.add_argument("--data", nargs="+", metavar="PATH", default=None,
                   help="text files or folders (default: the embedded pydoc_data corpus; the "
                        "last 10%% of each file's bytes is the validation split), or one "
                        "dataset folder written by python -m transformer_jax.prepare (its "
                        "tokenizer sets the vocabulary)")
    g.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per sequence T")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="global batch (sequences per optimizer step, all devices together)")


def _optimization_flags(g, d: TrainConfig) -> None:
    """The optimizer, schedule and step."""
    g.add_argument("--steps", type=int, default=d.steps, help="optimizer steps")
    g.add_argument("--optimizer", choices=_choices("optimizer"), default=d.optimizer,
                   help="adamw, or adam: the paper's Adam (β1 0.9, β2 0.98, ε 1e-9; §5.3)")
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (not for paper)")
    g.add_argument("--schedule", choices=_choices("schedule"), default=d.schedule,
                   help="cosine: warmup then cosine decay to lr/10; constant: warmup then lr; "
                        "paper: d_model^-0.5·min(step^-0.5, step·warmup^-1.5) (§5.3)")
    g.add_argument("--warmup", type=int, default=d.warmup, help="warmup steps")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="AdamW weight decay (matrices and embeddings)")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip,
                   help="clip gradients to this global norm (0: off)")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum,
                   help="gradient-accumulation micro-batches per step")
    g.add_argument("--label-smoothing", type=float, default=d.label_smoothing,
                   help="label smoothing of the training loss (§5.4 uses 0.1)")
    g.add_argument("--z-loss", type=float, default=d.z_loss, metavar="C",
                   help="add C·log(Z)² per target to the training loss (PaLM uses 1e-4)")
    g.add_argument("--max-nonfinite", type=int, default=d.max_nonfinite, metavar="N",
                   help="stop after N consecutive steps with a non-finite loss or gradients "
                        "(each is skipped; exit status 1)")


def _run_flags(g, d: TrainConfig) -> None:
    """Seed, run directory, intervals, placement and the end-of-run sample."""
    g.add_argument("--seed", type=int, default=d.seed, help="seed of params, dropout and data")
    g.add_argument("--out", metavar="DIR", default=None,
                   help="run directory (default: runs/<preset>[-<model overrides>])")
    g.add_argument("--log-every", type=int, default=d.log_every, help="steps between log lines")
    g.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="steps between validation passes")
    g.add_argument("--ckpt-every", type=int, default=d.ckpt_every,
                   help="steps between checkpoints")
    g.add_argument("--steps-per-call", type=int, default=d.steps_per_call,
                   help="optimizer steps per compiled call (lax.scan; same results)")
    g.add_argument("--parallel", choices=_choices("parallel"), default=d.parallel,
                   help="auto: pmap over all local devices if more than one, else jit "
                        "(sharded with --mesh or several processes); pmap; sharded: jit on a "
                        "device mesh with sharded parameters and optimizer state; shard_map: "
                        "data-parallel shard_map step on the mesh; none: jit on one device")
    g.add_argument("--mesh", default=d.mesh, metavar="AXIS=N,...",
                   help="mesh axis sizes for sharded/shard_map, e.g. data=2,fsdp=2,tensor=1 "
                        "(their product must be the device count; -1 takes the rest; "
                        "default: data over all devices)")
    g.add_argument("--sample-tokens", type=int, default=d.sample_tokens,
                   help="bytes to generate at the end (0: none)")
    g.add_argument("--prompt", default=d.sample_prompt, help="prompt of the final sample")
    g.add_argument("--average-last", type=int, default=d.average_last, metavar="N",
                   help="seq2seq tasks: evaluate with the mean parameters of the last N "
                        "checkpoints (§6.1 averages 5)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _host_flags(g) -> None:
    """Multi-host start-up."""
    g.add_argument("--coordinator", metavar="HOST:PORT",
                   help="process 0's address: starts jax.distributed; 'auto' detects a "
                        "managed cluster (Cloud TPU, SLURM, Open MPI, Kubernetes)")
    g.add_argument("--num-processes", type=int, metavar="P",
                   help="number of processes (with --coordinator HOST:PORT)")
    g.add_argument("--process-id", type=int, metavar="I",
                   help="this process's index in [0, P) (with --coordinator HOST:PORT)")


def configs_from_args(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig]:
    """Preset + flag overrides -> (ModelConfig, TrainConfig). Raises ValueError on bad values."""
    base = PRESETS[args.preset]
    overrides = {"num_decoder_layers": args.layers, "d_model": args.d_model,
                 "num_heads": args.heads, "d_ff": args.d_ff, "dropout_rate": args.dropout,
                 "dtype": args.dtype, "norm": args.norm, "norm_type": args.norm_type,
                 "positions": args.positions, "activation": args.activation,
                 "qk_norm": args.qk_norm, "use_bias": args.bias,
                 "share_embeddings": args.tie_embeddings, "attention_impl": args.attention_impl,
                 "remat": args.remat, "scan_layers": args.scan_layers}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "num_heads" in overrides:  # keep the preset's multi-head (not grouped) attention
        overrides["num_kv_heads"] = overrides["num_heads"]
    if args.task == "lm":
        model_cfg = dataclasses.replace(
            base, vocab_size=data_vocab_size(args.data or ()),
            max_len=max(base.max_len, args.seq_len), **overrides)
        name = args.preset
    else:
        if "num_decoder_layers" in overrides:  # --layers sets both stacks (6 and 6 in §3.1)
            overrides["num_encoder_layers"] = overrides["num_decoder_layers"]
        model_cfg = dataclasses.replace(base, vocab_size=get_task(args.task).vocab_size,
                                        **overrides)
        name = args.task if args.preset == "cpu-seq2seq" else f"{args.task}-{args.preset}"
    short = {"num_decoder_layers": "L", "d_model": "D", "num_heads": "N", "d_ff": "F",
             "dropout_rate": "drop", "dtype": "", "norm": "", "norm_type": "", "positions": "",
             "activation": "", "qk_norm": "qknorm", "use_bias": "bias",
             "share_embeddings": "tied", "scan_layers": "scan"}
    for key, tag in short.items():  # remat and attention_impl change no parameter: same run
        if key in overrides:
            value = overrides[key]
            name += (f"-{tag}{value}" if not isinstance(value, bool) else
                     f"-{tag}" if value else f"-no{tag}")
    if args.model != "transformer":
        name += f"-{args.model}"
    train_cfg = TrainConfig(
        model=args.model, data=tuple(args.data or ()), out=args.out or f"runs/{name}",
        seed=args.seed, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
        grad_accum=args.grad_accum, optimizer=args.optimizer, lr=args.lr,
        schedule=args.schedule, warmup=args.warmup, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, label_smoothing=args.label_smoothing,
        log_every=args.log_every, eval_every=args.eval_every, ckpt_every=args.ckpt_every,
        steps_per_call=args.steps_per_call, parallel=args.parallel, mesh=args.mesh,
        sample_tokens=args.sample_tokens, sample_prompt=args.prompt, task=args.task,
        average_last=args.average_last,
        max_to_keep=max(_DEFAULTS.max_to_keep, args.average_last),
        max_nonfinite=args.max_nonfinite, z_loss=args.z_loss)
    return model_cfg, train_cfg


def configure(argv: Sequence[str] | None = None) -> tuple[ModelConfig, TrainConfig]:
    """The configurations a command line trains with, without training.

    Parses ``argv`` and checks the flags as :func:`main` does; a bad command exits as
    ``main`` would (``SystemExit`` with status 2 and one line naming the problem).
    """
    parser = build_parser(_task_of(argv))
    args = parser.parse_args(argv)
    given = cli.explicit_options(build_parser, argv)
    for option, applies, message in _CONFLICTS:
        if option in given and applies(args):
            parser.error(message)
    try:
        model_cfg, train_cfg = configs_from_args(args)
        distributed.check_flags(args.coordinator, args.num_processes, args.process_id)
    except ValueError as e:
        parser.error(_flagify(str(e)))
    return model_cfg, train_cfg


@cli.exits_on_ctrl_c("train.py", at_once="stopped at once by Ctrl-C, without saving; the "
                     "checkpoints saved before are intact: run the same command to resume")
def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, train, print where everything went; returns the exit status."""
    parser = build_parser(_task_of(argv))
    args = parser.parse_args(argv)
    given = cli.explicit_options(build_parser, argv)
    for option, applies, message in _CONFLICTS:
        if option in given and applies(args):
            parser.error(message)
    try:
        model_cfg, train_cfg = configs_from_args(args)
        distributed.check_flags(args.coordinator, args.num_processes, args.process_id)
    except ValueError as e:
        parser.error(_flagify(str(e)))
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)

    try:
        result = loop.run(model_cfg, train_cfg, progress=False if args.no_progress else None,
                          log=None)
    except (ValueError, CheckpointError) as e:  # RunConfigError, DataError, BatchSplitError, ...
        parser.exit(2, f"{parser.prog}: error: {_flagify(str(e))}\n")
    except loop.NonFiniteError as e:
        print(f"train.py: {e}", file=sys.stderr)
        return 1
    except loop.OutputError as e:  # a checkpoint or metrics.jsonl that cannot be written
        print(f"train.py: error: {e}", file=sys.stderr)
        return cli.EXIT_WRITE_FAILED
    if result.interrupted or not distributed.is_lead():  # the loop said where it saved
        return cli.EXIT_INTERRUPTED if result.stopped_by == "SIGINT" else 0
    _report(result, train_cfg)
    return 0


def _report(r: loop.RunResult, train_cfg: TrainConfig) -> None:
    """The closing lines: validation loss, throughput, the evaluation or sample, the files."""
    minutes, seconds = divmod(r.wall_s, 60)
    speed = (f"{r.tokens_per_s:,.0f} tokens/s (median), MFU {100 * r.mfu:.1f}%"
             if math.isfinite(r.tokens_per_s) else "too few steps after compilation to time")
    unit = "byte" if train_cfg.task == "lm" else "token"
    per = unit  # val_bpb is bits per byte of text for any language model
    if train_cfg.task == "lm" and len(train_cfg.data) == 1 and is_prepared(train_cfg.data[0]):
        unit = "token"
    print(f"step {r.step}: val_loss {r.val_loss:.4f} nats/{unit} ({r.val_bpb:.3f} bits/{per}); "
          f"{speed}; wall {int(minutes)}m{seconds:04.1f}s")
    if r.evaluation:
        e = r.evaluation
        print(f"test exact match: greedy {e['test_exact_match_greedy']:.4f}, beam "
              f"{e['test_exact_match_beam']:.4f}; BLEU: greedy {e['test_bleu_greedy']:.2f}, "
              f"beam {e['test_bleu_beam']:.2f}")
    if r.sample:
        print(f"sample (prompt {train_cfg.sample_prompt!r}):\n{r.sample}\n")
    written = [name for name in ("config.json", "metrics.jsonl", "tensorboard/", "checkpoints/",
                                 "samples.txt", "loss.png") if (r.out / name).exists()]
    print(f"wrote {r.out.resolve()}/: {', '.join(written)}")


if __name__ == "__main__":
    cli.plain_warnings("train.py")
    sys.exit(main())
