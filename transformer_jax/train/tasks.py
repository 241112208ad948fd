"""``TrainConfig.task`` -> the function that builds its training workload.

"lm" is the byte-level language model (:mod:`transformer_jax.train.lm`); every
sequence-to-sequence task of :mod:`transformer_jax.data.seq2seq_tasks` trains the
encoder–decoder (:mod:`transformer_jax.train.seq2seq`), and "translate" with ``--data`` (a
dataset of ``prepare --pairs``) trains it on that corpus
(:mod:`transformer_jax.train.translation`). A new task registers its builder here.
"""

from __future__ import annotations

import typing
from collections.abc import Callable

from transformer_jax.config import ModelConfig, Task, TrainConfig
from transformer_jax.data.pair_dataset import check_kind
from transformer_jax.parallel import Placement
from transformer_jax.train import lm, seq2seq, translation
from transformer_jax.train.workload import Workload

__all__ = ["WORKLOADS", "build_workload"]

WORKLOADS: dict[str, Callable[..., Workload]] = {
    task: lm.workload if task == "lm" else seq2seq.workload for task in typing.get_args(Task)
}
"""Task name -> ``(model_cfg, train_cfg, placement, *, log) -> Workload``."""


def build_workload(model_cfg: ModelConfig, tc: TrainConfig, placement: Placement, *,
                   log: Callable[[str], None]) -> Workload:
    """The workload of ``tc.task`` (raises the builder's errors for settings that cannot train).

    A dataset of the other kind (pairs for the language model, a token stream for translation)
    is refused here, with one line (a DataError)."""
    if tc.task == "translate" and tc.data.data:
        return translation.workload(model_cfg, tc, placement, log=log)
    if tc.task == "lm":
        for path in tc.data.data:
            check_kind(path, "lm")
    return WORKLOADS[tc.task](model_cfg, tc, placement, log=log)
