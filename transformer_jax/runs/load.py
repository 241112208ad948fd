"""Read a trained run: :func:`load_run`, the one loader every command uses.

``sample``, ``translate`` and ``visualize`` (and anyone's own script) read a run directory
the same way: its ``config.json`` says which model was trained, and the newest restorable
checkpoint (or a chosen step, or the mean of the last few) gives its parameters. The
checkpoint is restored as it is stored, so reading a run needs neither the optimizer nor the
devices it was trained on; reading never rearranges the run directory.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Literal

import jax

from transformer_jax import models
from transformer_jax.config import ModelConfig, TrainConfig
from transformer_jax.data import ByteTokenizer
from transformer_jax.data.bpe import load_tokenizer
from transformer_jax.data.seq2seq_tasks import Seq2SeqTask, get_task
from transformer_jax.runs import rundir
from transformer_jax.runs.checkpoint import Checkpointer, CheckpointError, average_trees
from transformer_jax.runs.identity import checkpoint_expectation

__all__ = ["LoadedRun", "load_run"]


@dataclasses.dataclass(frozen=True)
class LoadedRun:
    """A trained run, ready to use.

    Attributes:
      run_dir: the run directory.
      model: the Flax module (:class:`~transformer_jax.models.TransformerLM`, an RNN, or for
        seq2seq tasks the encoder–decoder that ``--model`` named: the
        :class:`~transformer_jax.models.Transformer` or an
        :class:`~transformer_jax.models.RNNSeq2Seq`).
      params: its parameters, on the default device.
      steps: the checkpoint steps the parameters come from (several when averaged).
      model_cfg: the model configuration.
      train_cfg: the training settings.
      task: the generated sequence-to-sequence task, or ``None`` for a language model and
        for translation on a parallel dataset (``tokenizer`` then holds its subwords).
      tokenizer: the run directory's ``tokenizer.json`` (a prepared dataset's, copied at the
        start of training), else bytes.
    """

    run_dir: Path
    model: Any
    params: Any
    steps: list[int]
    model_cfg: ModelConfig
    train_cfg: TrainConfig
    task: Seq2SeqTask | None
    tokenizer: Any = dataclasses.field(default_factory=ByteTokenizer)

    @property
    def step(self) -> int:
        """The newest step the parameters come from."""
        return self.steps[-1]


def load_run(run_dir: str | os.PathLike, *, step: int | None = None, average_last: int = 1,
             kind: Literal["lm", "seq2seq"] | None = None) -> LoadedRun:
    """The model and parameters of a run directory.

    Args:
      run_dir: a ``train.py --out`` directory.
      step: use this checkpoint step (default: the newest that restores).
      average_last: use the mean parameters of the newest this many checkpoints (§6.1).
      kind: the kind of run the caller can use ("lm" or "seq2seq"); another kind is refused
        before any checkpoint is read, with the command that reads it.

    Raises:
      transformer_jax.runs.rundir.RunConfigError: no usable ``config.json`` in ``run_dir``, or
        a run of another ``kind``.
      transformer_jax.runs.checkpoint.CheckpointError: no checkpoint (or not ``step``) can be
        restored, e.g. none saved yet, truncated files or checkpoints of another model.
    """
    run_dir = Path(run_dir)
    model_cfg, tc = rundir.read_configs(run_dir)
    _check_kind(run_dir, tc, kind)
    if tc.task == "lm":
        model, task = models.build_model(tc.model, model_cfg), None
    elif tc.task == "translate" and tc.data.data:  # a parallel dataset: no generated task
        model, task = models.build_seq2seq(tc.model, model_cfg), None
    else:
        model, task = models.build_seq2seq(tc.model, model_cfg), get_task(tc.task)
    expect = checkpoint_expectation(model_cfg)
    with Checkpointer(run_dir / "checkpoints") as ckpt:
        saved = ckpt.all_steps()
        if not saved:
            raise CheckpointError(f"{run_dir / 'checkpoints'} holds no checkpoint yet; train "
                                  f"first (python train.py --out {run_dir})")
        if step is not None and step not in saved:
            raise CheckpointError(f"{run_dir / 'checkpoints'} has no checkpoint of step {step} "
                                  f"(saved steps: {', '.join(map(str, saved))})")
        if average_last > 1:
            steps = saved[-average_last:]
            trees = [ckpt.restore(step=s, **expect).state["params"]
                     for s in steps]
            params = average_trees(trees)
        else:  # reading a run does not rearrange it: no setting aside of damaged steps
            restored = ckpt.restore(step=step, set_aside=False, **expect)
            params, steps = restored.state["params"], [restored.step]
    return LoadedRun(run_dir=run_dir, model=model, params=jax.device_put(params),
                     steps=steps, model_cfg=model_cfg, train_cfg=tc, task=task,
                     tokenizer=_tokenizer(run_dir))


def _tokenizer(run_dir: Path) -> Any:
    """The run's ``tokenizer.json``, or bytes for a run on raw text."""
    path = run_dir / "tokenizer.json"
    if not path.is_file():
        return ByteTokenizer()
    try:
        return load_tokenizer(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise rundir.RunConfigError(f"{path} cannot be read ({e}); copy tokenizer.json from "
                                    "the dataset the run was trained on") from None


def _check_kind(run_dir: Path, tc: TrainConfig, kind: str | None) -> None:
    if kind == "seq2seq" and tc.task == "lm":
        raise rundir.RunConfigError(
            f"{run_dir} holds a language model, not a sequence-to-sequence task (use python -m "
            "transformer_jax.sample)")
    if kind == "lm" and tc.task != "lm":
        raise rundir.RunConfigError(
            f"{run_dir} holds the encoder-decoder of the {tc.task} task, not a language model "
            "(use python -m transformer_jax.translate)")
