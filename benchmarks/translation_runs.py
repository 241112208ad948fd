"""The runs of ``benchmarks/translation.py``: one model trained and scored, or several compared.

The comparison is the paper's Table 2 claim at a small scale: self-attention reaches a better
translation model in less training time than recurrence. Each model trains on the same
prepared corpus for the same budget of training seconds: a 100-step probe of each model first
measures its step time, and the real run is given the steps that take the budget, so
that its cosine schedule ends with it. Compilation (one program per length bucket) falls
outside the budget, since it does not grow with training; the curves' time axis is
``metrics.jsonl``'s ``train_s`` (training seconds since the run started, compilation
included, validation and checkpoints excluded), so each model's curve carries its own.
Every model has its own peak learning rate: :data:`TUNED_LR`, or ``--sweep`` picks the one of
:data:`SWEEP_LR` with the lowest validation loss after a third of the budget's steps.

The models:

* the Transformer: the translate-text recipe (post-LN, Adam 0.9/0.98, label smoothing 0.1,
  warmup then cosine, the last 5 checkpoints averaged);
* ``transformer-pre``: the same model and training with each sublayer's layer normalisation
  moved before it (pre-LN, Xiong et al. 2020), the modern option that trains at higher rates
  with a short warmup; not the paper's model, compared beside it;
* the attentional RNN translator of the paper's era (``--model lstm`` or ``gru``:
  :class:`~transformer_jax.models.RNNSeq2Seq`, 2 + 2 layers, a bidirectional first encoder
  layer, Luong attention with input feeding) at the width whose parameter count is the
  Transformer's (:func:`~transformer_jax.models.match_rnn_seq2seq_width`), trained with the
  same recipe and loss, plus gradient clipping at norm 5 as Luong et al. (2015, §4) did.

The figures (:func:`compare`), of each Transformer against each RNN; the headline pair is the
first Transformer and the first RNN:

* ``time_to_rnn_bleu_ratio``: the training time at which the Transformer's validation BLEU
  first reaches the RNN's best validation BLEU (linear interpolation between evaluations),
  divided by the time at which the RNN first reached it;
* ``bleu_gain_at_equal_time``: the Transformer's test BLEU minus the RNN's, each after the
  same budget (beam 4, α 0.6, averaged checkpoints, sacreBLEU).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import jax

from transformer_jax.config import RECIPES, ModelConfig, TrainConfig
from transformer_jax.models import accounting, match_rnn_seq2seq_width
from transformer_jax.parallel import resolve
from transformer_jax.runs import metrics
from transformer_jax.train import loop
from transformer_jax.train.tasks import build_workload

MODELS = ("transformer", "transformer-pre", "lstm", "gru")
TRANSFORMERS = ("transformer", "transformer-pre")
RNN_LAYERS = 2  # encoder and decoder layers, as Luong et al. (2015) stacked 2-4 at this scale
RNN_GRAD_CLIP = 5.0  # Luong et al. (2015, §4): gradients rescaled when their norm exceeds 5
# Peak learning rates of a budgeted comparison, pinned from a sweep on the German catalogs
# (NOTES.md: the rates tried and the validation loss of each). The Transformer alone, at the
# recipe's steps, keeps the recipe's rate.
TUNED_LR = {"transformer": 1e-3, "transformer-pre": 4e-3, "lstm": 8e-3, "gru": 4e-3}
# Four rates a model, a factor of 2 apart: the post-LN Transformer's stop at 4e-3, above which
# it diverges from its warmup; pre-LN and the clipped RNNs train up to 1.6e-2.
_HIGH_RATES = (2e-3, 4e-3, 8e-3, 1.6e-2)
SWEEP_LR = {"transformer": (5e-4, 1e-3, 2e-3, 4e-3), "transformer-pre": _HIGH_RATES,
            "lstm": _HIGH_RATES, "gru": _HIGH_RATES}
PROBE_STEPS = 100
EVALS = 8  # validation points of a budgeted run


def model_config(name: str, vocab_size: int) -> ModelConfig:
    """The translate-text recipe's Transformer (``transformer-pre``: with pre-LN), or an RNN
    translator with as many parameters."""
    base = dataclasses.replace(RECIPES["translate-text"].model, vocab_size=vocab_size)
    if name == "transformer":
        return base
    if name == "transformer-pre":
        return dataclasses.replace(base, norm="pre")
    rnn = dataclasses.replace(base, num_encoder_layers=RNN_LAYERS, num_decoder_layers=RNN_LAYERS)
    return match_rnn_seq2seq_width(accounting.num_params(base), rnn, cell_type=name)


def train_config(name: str, dataset: Path, out: Path, *, steps: int | None = None,
                 lr: float | None = None, batch_tokens: int | None = None,
                 evals: int = 4) -> TrainConfig:
    """The translate-text recipe's training on ``dataset``, for ``steps`` at ``lr`` (default:
    the recipe's), validated ``evals`` times; checkpoints keep the recipe's share of the run
    between the first and the last of the averaged ones."""
    recipe = RECIPES["translate-text"].train
    steps = steps or recipe.schedule.steps
    every = max(recipe.loop.ckpt_every * steps // recipe.schedule.steps, 1)
    changes: dict[str, Any] = {} if name in TRANSFORMERS else {"grad_clip": RNN_GRAD_CLIP}
    return recipe.replace(
        model="transformer" if name in TRANSFORMERS else name, data=(str(dataset),),
        out=str(out), steps=steps,
        lr=lr or recipe.schedule.lr, warmup=min(recipe.schedule.warmup, steps // 10),
        eval_every=max(steps // evals, 1), ckpt_every=every,
        log_every=min(recipe.loop.log_every, max(steps // 20, 1)),
        batch_tokens=batch_tokens or recipe.data.batch_tokens, **changes)


def _run(model_cfg: ModelConfig, tc: TrainConfig, **kwargs) -> loop.RunResult:
    """``loop.run``, then its compiled programs dropped: each run compiles a program per
    length bucket, and one process that kept them all would run out of the kernel's memory
    mappings (LLVM: "Unable to allocate section memory") after a dozen runs."""
    try:
        return loop.run(model_cfg, tc, progress=False, **kwargs)
    finally:
        jax.clear_caches()


def train_and_score(name: str, model_cfg: ModelConfig, tc: TrainConfig,
                    log=print) -> dict[str, Any]:
    """Train ``tc`` into a fresh ``tc.out`` and evaluate it (§6.1); the figures of the run of
    model ``name`` (one of :data:`MODELS`)."""
    result = _run(model_cfg, tc, log=log)
    records = metrics.read_jsonl(Path(tc.out) / "metrics.jsonl")
    final = records[-1]
    flops_per_step = result.tokens_per_step * result.flops_per_token
    curve = [{"train_s": r["train_s"], "step": r["step"], "val_bleu": r["val_bleu"],
              "flops": r["step"] * flops_per_step} for r in records if "val_bleu" in r]
    shares = [r["real_share"] for r in records if "real_share" in r]
    return {"model": name, "lr": tc.schedule.lr, "steps": result.step,
            "params": result.n_params, "d_model": model_cfg.d_model,
            "layers": f"{model_cfg.num_encoder_layers}+{model_cfg.num_decoder_layers}",
            "test_bleu": final["test_bleu"], "chrf": final["test_chrf"],
            "best_val_bleu": max(c["val_bleu"] for c in curve), "curve": curve,
            "train_s": curve[-1]["train_s"], "run_wall_s": result.wall_s,
            "tokens_per_s": result.tokens_per_s, "flops_per_token": result.flops_per_token,
            "train_flops": curve[-1]["flops"],
            "decode_sentences_per_s": final["decode_sentences_per_s"],
            "bleu_signature": final["bleu_signature"], "chrf_signature": final["chrf_signature"],
            "real_share": {"mean": sum(shares) / max(len(shares), 1), "min": min(shares or [0])},
            "out": tc.out}


def steps_for_budget(model_cfg: ModelConfig, tc: TrainConfig, budget_s: float,
                     work: Path) -> int:
    """Optimizer steps that take ``budget_s`` seconds at ``tc``'s step time, measured by a
    probe of :data:`PROBE_STEPS` steps (compilation falls outside the budget: each
    length bucket compiles once, a cost that does not grow with training)."""
    probe = tc.replace(out=str(work), log_every=max(PROBE_STEPS // 20, 1))
    _run(model_cfg, probe, stop_at=PROBE_STEPS, log=lambda message: None)
    records = [r for r in metrics.read_jsonl(work / "metrics.jsonl") if "loss" in r]
    per_step = sorted((b["train_s"] - a["train_s"]) / (b["step"] - a["step"])
                      for a, b in zip(records, records[1:]))
    # The lower quartile of the probe's 20 intervals: up to one a length bucket holds a
    # compilation, so the lower quarter holds only steps.
    return max(PROBE_STEPS, int(budget_s / per_step[(len(per_step) - 1) // 4]))


def time_to_reach(curve: list[dict], target: float) -> float | None:
    """First training second at which ``curve``'s validation BLEU reaches ``target``,
    interpolated linearly between evaluations; ``None`` if it never does."""
    prev = None
    for point in curve:
        t, bleu = point["train_s"], point["val_bleu"]
        if bleu >= target:
            if prev is None or prev[1] == bleu:
                return t
            t0, b0 = prev
            return t0 + (t - t0) * (target - b0) / (bleu - b0)
        prev = (t, bleu)
    return None


def compare(transformer: dict, rnn: dict) -> dict[str, Any]:
    """The two figures of the Transformer against one RNN (the module docstring)."""
    target = rnn["best_val_bleu"]
    # An RNN that never scored has no time to its best.
    t_rnn = time_to_reach(rnn["curve"], target) if target > 0 else None
    t_transformer = time_to_reach(transformer["curve"], target) if target > 0 else None
    # The converse, for when the RNN leads: its time to the Transformer's best over the
    # Transformer's own.
    best = transformer["best_val_bleu"]
    t_own = time_to_reach(transformer["curve"], best) if best > 0 else None
    t_rnn_there = time_to_reach(rnn["curve"], best) if best > 0 else None
    return {"transformer": transformer["model"], "rnn": rnn["model"],
            "rnn_best_val_bleu": target, "rnn_time_to_best_s": t_rnn,
            "transformer_time_to_rnn_best_s": t_transformer,
            "transformer_best_val_bleu": best,
            "rnn_time_to_transformer_best_ratio": (t_rnn_there / t_own if t_rnn_there and t_own
                                                   else None),
            "time_to_rnn_bleu_ratio": (t_transformer / t_rnn if t_transformer and t_rnn
                                       else None),
            "bleu_gain_at_equal_time": transformer["test_bleu"] - rnn["test_bleu"],
            "train_tokens_per_s_ratio": transformer["tokens_per_s"] / rnn["tokens_per_s"],
            "decode_sentences_per_s_ratio": (transformer["decode_sentences_per_s"]
                                             / rnn["decode_sentences_per_s"])}


def compare_all(rows: list[dict]) -> list[dict[str, Any]]:
    """:func:`compare` of each Transformer's row with each RNN's, in the order of ``rows``:
    the first is the headline pair, the first Transformer against the first RNN."""
    transformers = [row for row in rows if row["model"] in TRANSFORMERS]
    return [compare(t, rnn) for t in transformers
            for rnn in rows if rnn["model"] not in TRANSFORMERS]


def sweep(model_cfg: ModelConfig, name: str, dataset: Path, work: Path, steps: int,
          batch_tokens: int | None, log=print) -> dict[float, dict[str, float]]:
    """{learning rate: {"val_loss", "val_bleu"}} of runs of ``steps`` at each of the model's
    :data:`SWEEP_LR`, with no test evaluation (a diverged run's loss is infinite). The choice
    is the lowest validation loss: after a third of a short budget, BLEU is still too close to
    0 to rank the rates."""
    tried = {}
    for lr in SWEEP_LR[name]:
        tc = train_config(name, dataset, work / f"sweep-{name}-{lr:g}", steps=steps, lr=lr,
                          batch_tokens=batch_tokens, evals=2)
        result = _run(model_cfg, tc, workload=_without_test(model_cfg, tc),
                      log=lambda message: None)
        bleu = [r["val_bleu"] for r in metrics.read_jsonl(Path(tc.out) / "metrics.jsonl")
                if "val_bleu" in r]
        loss = result.val_loss if math.isfinite(result.val_loss) else math.inf
        tried[lr] = {"val_loss": loss, "val_bleu": bleu[-1] if bleu else 0.0}
        log(f"sweep {name} lr {lr:g}: {steps} steps, validation loss {loss:.3f}, "
            f"BLEU {tried[lr]['val_bleu']:.2f}")
    return tried


def _without_test(model_cfg: ModelConfig, tc: TrainConfig):
    """The run's workload without its test evaluation: a sweep compares validation BLEU."""
    placement = resolve(tc.loop.parallel, None, tc.loop.mesh)
    work = build_workload(model_cfg, tc, placement, log=lambda message: None)
    return dataclasses.replace(work, finish=None)
