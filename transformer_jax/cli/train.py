"""Train a model: ``python train.py [flags]``.

With no flags: the "cpu-lm" recipe, a byte-level language model on the embedded corpus (the
Python reference manual that ships with CPython), a few minutes on 2 CPU cores. ``--recipe NAME``
picks another named run (:data:`transformer_jax.config.RECIPES`), ``--config FILE`` reruns a
stored run's configuration, and every other flag overrides one setting (``--help`` lists them by
group, with the recipe's values). ``--task translate`` (or reverse, sort, add) trains the
encoder–decoder on a sequence-to-sequence task with the paper's recipe.

Re-running a command with the same ``--out`` resumes from the run's latest checkpoint; a command
whose settings would make it another run is refused (exit 2) before anything is written.
Exit status: 0 done (or stopped by SIGTERM with a checkpoint), 1 training diverged, 2 bad input
(or ``--out`` in use by another run), 74 a checkpoint or ``metrics.jsonl`` could not be written
(full disk, no permission, read-only filesystem; the last good checkpoint is intact), 75 a
host of a multi-host run stopped responding (start every process again: they resume), 130
stopped by Ctrl-C (the first Ctrl-C saves a checkpoint at the end of the step in progress; a
second one stops at once without saving).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from transformer_jax.cli import common as cli
from transformer_jax.cli import flags
from transformer_jax.config import RECIPES, ModelConfig, TrainConfig
from transformer_jax.data.pair_dataset import check_kind, open_pairs
from transformer_jax.data.prepared import data_vocab_size
from transformer_jax.data.seq2seq_tasks import get_task
from transformer_jax.parallel import distributed
from transformer_jax.parallel.mesh import mesh_axes
from transformer_jax.runs import rundir
from transformer_jax.runs.checkpoint import CheckpointError
from transformer_jax.train import loop

NON_FIELD_FLAGS = ("--recipe", "--preset", "--config", "--accept-changes", "--no-progress",
                   "--coordinator", "--num-processes", "--process-id", "--heartbeat-timeout",
                   "--help")
"""The flags that set no config field (tests check that every other flag is a field's)."""

# (field given, condition on the configs, why it has no effect): refused, not ignored.
_CONFLICTS = (
    ("lr", lambda tc: tc.schedule.schedule == "paper",
     ("--lr has no effect with --schedule paper (its rate is d_model^-0.5 · min(step^-0.5, "
      "step · warmup^-1.5), §5.3); drop --lr or use --schedule cosine or constant")),
    ("weight_decay", lambda tc: tc.optim.optimizer == "adam",
     ("--weight-decay has no effect with --optimizer adam (the paper's Adam has none); drop "
      "it or use --optimizer adamw")),
    ("sample_prompt", lambda tc: tc.eval.sample_tokens == 0,
     "--prompt has no effect with --sample-tokens 0; drop one of them"),
)

# Model fields a run's default name records when given, and how (remat, attention_impl and
# dense_backward change no parameter: the same run).
_NAME_TAGS = {"num_decoder_layers": "L", "num_encoder_layers": "E", "d_model": "D",
              "num_heads": "N", "num_kv_heads": "K", "d_ff": "F", "dropout_rate": "drop",
              "max_len": "len", "dtype": "", "param_dtype": "param-", "norm": "",
              "norm_type": "", "positions": "", "activation": "", "qk_norm": "qknorm",
              "use_bias": "bias", "share_embeddings": "tied", "scan_layers": "scan",
              "layer_norm_eps": "eps"}


class _HelpFormatter(argparse.HelpFormatter):
    """Wider help, so that the generated flags' descriptions stay readable."""

    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=32)


def _base(argv: Sequence[str] | None) -> tuple[str | None, ModelConfig, TrainConfig]:
    """(recipe name, model, training) that the flags of ``argv`` start from (for ``--help``'s
    defaults: a bad value here is reported by the full parse)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", "--preset")
    pre.add_argument("--task")
    pre.add_argument("--config")
    pre.add_argument("--data", nargs="+")
    known = pre.parse_known_args(argv)[0]
    if known.config:
        try:
            model_cfg, train_cfg = rundir.read_configs(_config_dir(known.config))
            return None, model_cfg, train_cfg
        except ValueError:
            pass
    name = known.recipe if known.recipe in RECIPES else _default_recipe(known.task, known.data)
    return name, RECIPES[name].model, RECIPES[name].train


def _config_dir(path: str) -> Path:
    """The run directory of ``--config`` (a ``config.json`` or the directory holding it)."""
    p = Path(path)
    return p.parent if p.name == rundir.CONFIG or p.suffix == ".json" else p


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser; ``--help`` shows the values of the recipe ``argv`` selects."""
    recipe, model_cfg, train_cfg = _base(argv)
    p = cli.ArgumentParser(
        prog="train.py",
        description="Train a Transformer (Vaswani et al., 2017) or an RNN baseline with "
                    "JAX/Flax. Flags override the recipe. Outputs go to --out: config.json, "
                    "metrics.jsonl, tensorboard/, checkpoints/, samples.txt, loss.png. "
                    "Re-running with the same --out resumes from the latest checkpoint.",
        formatter_class=_HelpFormatter)
    g = p.add_argument_group("recipe")
    g.add_argument("--recipe", "--preset", choices=list(RECIPES), default=None, metavar="NAME",
                   help="a named run, model and training together: "
                        + "; ".join(f"{k}: {r.about}" for k, r in RECIPES.items())
                        + f" (default: cpu-lm, or translate for a sequence task; here: "
                          f"{recipe or 'from --config'})")
    g.add_argument("--config", metavar="FILE",
                   help="start from a stored run's configuration (its config.json, or its run "
                        "directory): with a new --out it reruns that run exactly")
    g.add_argument("--accept-changes", action="store_true",
                   help="resume the run in --out even though these settings differ from its "
                        "own in more than the steps, intervals and placement (docs/training.md)")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress bar: a plain line every --log-every steps instead (the "
                        "default without a terminal)")
    names = flags.add_config_flags(p, model_cfg, train_cfg)
    p.set_defaults(_flag_names=names)
    _host_flags(p.add_argument_group("multi-host (every host runs the same command)"))
    return p


def _host_flags(g) -> None:
    """Multi-host start-up."""
    g.add_argument("--coordinator", metavar="HOST:PORT",
                   help="process 0's address: starts jax.distributed; 'auto' detects a "
                        "managed cluster (Cloud TPU, SLURM, Open MPI, Kubernetes)")
    g.add_argument("--num-processes", type=int, metavar="P",
                   help="number of processes (with --coordinator HOST:PORT)")
    g.add_argument("--process-id", type=int, metavar="I",
                   help="this process's index in [0, P) (with --coordinator HOST:PORT)")
    g.add_argument("--heartbeat-timeout", type=int, metavar="SECONDS",
                   help="a process that sends no heartbeat for this long counts as lost: the "
                        "others exit with status 75 and one line saying how to resume "
                        f"(default: jax's, {distributed.DEFAULT_HEARTBEAT_TIMEOUT_S})")


def _configs(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig]:
    """The recipe (or ``--config``) with the flags given applied. Raises ValueError."""
    model_over, train_over = flags.model_overrides(args), flags.train_overrides(args)
    if args.config:
        model_base, train_base = rundir.read_configs(_config_dir(args.config))
        name = None
    else:
        task = train_over.get("task", "lm")
        name = args.recipe or _default_recipe(task, train_over.get("data"))
        model_base, train_base = RECIPES[name].model, RECIPES[name].train
    tc = train_base.replace(**{k: v for k, v in train_over.items() if k != "out"})
    if "num_heads" in model_over and "num_kv_heads" not in model_over:
        model_over["num_kv_heads"] = model_over["num_heads"]  # multi-head, not grouped
    if tc.task == "lm":
        model_over.setdefault("max_len", max(model_base.max_len, tc.data.seq_len))
        for path in tc.data.data:
            check_kind(path, "lm")
        vocab = data_vocab_size(tc.data.data)
    elif tc.task == "translate" and tc.data.data:  # a corpus of prepare --pairs
        if "num_decoder_layers" in model_over:  # --layers sets both stacks (6 and 6 in §3.1)
            model_over.setdefault("num_encoder_layers", model_over["num_decoder_layers"])
        vocab = open_pairs(tc.data.data[0]).vocab_size
    else:
        if "num_decoder_layers" in model_over:  # --layers sets both stacks (6 and 6 in §3.1)
            model_over.setdefault("num_encoder_layers", model_over["num_decoder_layers"])
        vocab = get_task(tc.task).vocab_size
    model_cfg = dataclasses.replace(model_base, vocab_size=vocab, **model_over)
    if "average_last" in train_over and "max_to_keep" not in train_over:
        tc = tc.replace(max_to_keep=max(tc.loop.max_to_keep, tc.eval.average_last))
    out = train_over.get("out") or (tc.out if name is None else
                                    _run_name(name, tc, flags.given(args, "model")))
    tc = tc.replace(out=out)
    if tc.model == "transformer":
        model_cfg.check_attention()
    if tc.loop.mesh:
        mesh_axes(tc.loop.mesh)  # the syntax; the sizes are checked against the devices later
    for field, applies, message in _CONFLICTS:
        if field in train_over and applies(tc):
            raise ValueError(message)
    return model_cfg, tc


def _default_recipe(task: str | None, data) -> str:
    """The recipe of a command without ``--recipe``: cpu-lm for the language model,
    translate-text for translation on a corpus (``--data``), translate for a generated task."""
    if task in (None, "lm"):
        return "cpu-lm"
    return "translate-text" if task == "translate" and data else "translate"


def _run_name(recipe: str, tc: TrainConfig, model_given: dict) -> str:
    """``runs/<recipe or task>[-<dataset>][-<model flags>][-<family>]``: runs of different
    models or data get different directories by default."""
    name = recipe
    if tc.task != RECIPES[recipe].train.task:
        name = tc.task if recipe == "translate" else f"{tc.task}-{recipe}"
    if tc.data.data:
        stems = [Path(p.rstrip("/")).stem or "data" for p in tc.data.data]
        name += "-" + "+".join(stems[:2]) + (f"+{len(stems) - 2}" if len(stems) > 2 else "")
    for key, tag in _NAME_TAGS.items():
        if key in model_given:
            value = model_given[key]
            name += (f"-{tag}{value}" if not isinstance(value, bool) else
                     f"-{tag}" if value else f"-no{tag}")
    if tc.model != "transformer":
        name += f"-{tc.model}"
    return f"runs/{name}"


def _parse(argv: Sequence[str] | None):
    """(parser, args, model config, training config) of a command line; exits 2 on bad input."""
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        model_cfg, train_cfg = _configs(args)
        distributed.check_flags(args.coordinator, args.num_processes, args.process_id,
                                args.heartbeat_timeout)
    except ValueError as e:
        parser.error(flags.flagify(str(e), args._flag_names, argv or sys.argv[1:]))
    return parser, args, model_cfg, train_cfg


def configure(argv: Sequence[str] | None = None) -> tuple[ModelConfig, TrainConfig]:
    """The configurations a command line trains with, without training.

    Parses ``argv`` and checks the flags as :func:`main` does; a bad command exits as
    ``main`` would (``SystemExit`` with status 2 and one line naming the problem).
    """
    return _parse(argv)[2:]


@cli.exits_on_ctrl_c("train.py", at_once="stopped at once by Ctrl-C, without saving; the "
                     "checkpoints saved before are intact: run the same command to resume")
def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, train, print where everything went; returns the exit status."""
    parser, args, model_cfg, train_cfg = _parse(argv)
    # A lost peer ends this process in JAX's C++ runtime: a parent process turns that into one
    # line and exit status 75 (distributed.supervise).
    distributed.supervise(args.coordinator, args.num_processes,
                          f"{train_cfg.out}/checkpoints", args.heartbeat_timeout)
    distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                           args.heartbeat_timeout)
    try:
        result = loop.run(model_cfg, train_cfg, progress=False if args.no_progress else None,
                          log=None, accept_changes=args.accept_changes)
    except (ValueError, CheckpointError) as e:  # RunConfigError, DataError, BatchSplitError, ...
        message = flags.flagify(str(e), args._flag_names, argv or sys.argv[1:])
        parser.exit(2, f"{parser.prog}: error: {message}\n")
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
    # The loop has logged the final "step N: val_loss ..." line: not repeated here.
    mfu = (f"MFU {100 * r.mfu:.1f}%" if math.isfinite(r.mfu) else
           f"MFU not shown: {r.mfu_note}" if r.mfu_note else "MFU unknown")
    speed = (f"{r.tokens_per_s:,.0f} tokens/s (median), {mfu}"
             if math.isfinite(r.tokens_per_s) else "too few steps after compilation to time")
    print(f"done at step {r.step}: {speed}; wall {int(minutes)}m{seconds:04.1f}s")
    if r.evaluation and "test_bleu" in r.evaluation:  # a real corpus (train/translation.py)
        e = r.evaluation
        print(f"test BLEU {e['test_bleu']:.2f}, chrF {e['test_chrf']:.2f} (beam "
              f"{e['beam_size']}, alpha {e['alpha']}); copy-the-source BLEU "
              f"{e['copy_bleu']:.2f}\nsacreBLEU signature: {e['bleu_signature']}")
    elif r.evaluation:
        e = r.evaluation
        print(f"test exact match: greedy {e['test_exact_match_greedy']:.4f}, beam "
              f"{e['test_exact_match_beam']:.4f}; BLEU: greedy {e['test_bleu_greedy']:.2f}, "
              f"beam {e['test_bleu_beam']:.2f}")
    if r.sample:
        print(f"sample (prompt {train_cfg.eval.sample_prompt!r}):\n{r.sample}\n")
    written = [name for name in ("config.json", "metrics.jsonl", "tensorboard/", "checkpoints/",
                                 "samples.txt", "loss.png", "translations.test.txt")
               if (r.out / name).exists()]
    print(f"wrote {r.out.resolve()}/: {', '.join(written)}")


if __name__ == "__main__":
    cli.plain_warnings("train.py")
    sys.exit(main())
