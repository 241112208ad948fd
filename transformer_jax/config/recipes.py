"""Named configurations: model presets (:data:`PRESETS`) and recipes (:data:`RECIPES`).

A preset is a model alone. A recipe is a whole run, model and training together: ``python
train.py --recipe NAME`` trains it, and flags override it. Each recipe changes only what it must
from the neutral defaults of :class:`~transformer_jax.config.TrainConfig`, one line of reason per
value.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformer_jax.config.model import ModelConfig
from transformer_jax.config.train import (
    DataConfig,
    EvalConfig,
    LoopConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
)

__all__ = ["MODERN_OPTIONS", "PRESETS", "RECIPES", "Recipe"]

MODERN_OPTIONS: dict[str, Any] = {
    "norm": "pre", "norm_type": "rmsnorm", "positions": "rope", "activation": "swiglu",
    "qk_norm": True, "use_bias": False, "share_embeddings": False}
"""The options MaxText and Levanter ship, together: pre-RMSNorm, rotary positions, SwiGLU,
QK-norm, no biases, untied output embedding (the presets modern-lm, cpu-modern, cpu-lm)."""

PRESETS: dict[str, ModelConfig] = {
    # Table 3, row "base": N=6, d_model=512, d_ff=2048, h=8, P_drop=0.1. vocab_size is a
    # placeholder for the ~37k shared BPE vocabulary of §5.1; set it with dataclasses.replace.
    "paper-base": ModelConfig(
        vocab_size=37000, d_model=512, num_heads=8, num_encoder_layers=6,
        num_decoder_layers=6, d_ff=2048, dropout_rate=0.1, max_len=512,
    ),
    # Table 3, row "big": d_model=1024, d_ff=4096, h=16, P_drop=0.3.
    "paper-big": ModelConfig(
        vocab_size=37000, d_model=1024, num_heads=16, num_encoder_layers=6,
        num_decoder_layers=6, d_ff=4096, dropout_rate=0.3, max_len=512,
    ),
    # GPT-2 small (Radford et al. 2019): 12 layers, 768 wide, 12 heads, 1024 context, pre-LN,
    # learned positions, GELU, tied output embedding, 50257 BPE tokens.
    "gpt2-small": ModelConfig(
        vocab_size=50257, d_model=768, num_heads=12, num_encoder_layers=0,
        num_decoder_layers=12, d_ff=3072, dropout_rate=0.1, max_len=1024, norm="pre",
        positions="learned", activation="gelu", share_embeddings=True,
    ),
    # The model of the default run (the cpu-lm recipe): a byte-level (V=256) LM with the modern
    # options, sized for a few minutes on 2 CPU cores. The embedded corpus (420 kB) is seen
    # many times in such a run, hence the dropout.
    "cpu-lm": ModelConfig(
        vocab_size=256, d_model=128, num_heads=4, num_encoder_layers=0,
        num_decoder_layers=4, d_ff=384, dropout_rate=0.1, max_len=256,
        **MODERN_OPTIONS,
    ),
    # A GPT-2-style LM (pre-LN LayerNorm, learned positions, GELU, biases, tied output
    # embedding) of 4 × 192: the architecture the minimal GPT peers use, for like-for-like
    # throughput comparisons.
    "cpu-gpt": ModelConfig(
        vocab_size=256, d_model=192, num_heads=6, num_encoder_layers=0,
        num_decoder_layers=4, d_ff=768, dropout_rate=0.0, max_len=256, norm="pre",
        positions="learned", activation="gelu", share_embeddings=True,
    ),
    # The translate recipe's model: the paper's post-LN encoder–decoder with shared embeddings
    # and sinusoidal positions, shrunk to train in minutes on 2 CPU cores. vocab_size is set
    # from the task. No dropout: the generated data never repeats a batch.
    "cpu-seq2seq": ModelConfig(
        vocab_size=256, d_model=128, num_heads=4, num_encoder_layers=2,
        num_decoder_layers=2, d_ff=512, dropout_rate=0.0, max_len=32,
    ),
    # The translate-text recipe's model: the paper's post-LN encoder-decoder with shared
    # embeddings (§3.4), sized for minutes on 2 CPU cores (~11 MFLOP a target token with a
    # 4k vocabulary). vocab_size is set from the data. No dropout: a few passes over the data
    # are too few to overfit. max_len 512: sinusoidal positions cost no parameters, and a test
    # source may be long.
    "cpu-translate": ModelConfig(
        vocab_size=4000, d_model=128, num_heads=4, num_encoder_layers=3,
        num_decoder_layers=3, d_ff=512, dropout_rate=0.0, max_len=512,
    ),
    # MODERN_OPTIONS at GPT-2 small's size and vocabulary; SwiGLU's F = 8/3·D rounded to 64
    # gives the same matmul FLOPs as a 4·D ReLU network.
    "modern-lm": ModelConfig(
        vocab_size=50257, d_model=768, num_heads=12, num_encoder_layers=0,
        num_decoder_layers=12, d_ff=2048, dropout_rate=0.0, max_len=1024,
        **MODERN_OPTIONS,
    ),
    # modern-lm's options at cpu-gpt's size (4 × 192).
    "cpu-modern": ModelConfig(
        vocab_size=256, d_model=192, num_heads=6, num_encoder_layers=0,
        num_decoder_layers=4, d_ff=512, dropout_rate=0.0, max_len=256,
        **MODERN_OPTIONS,
    ),
    # For tests: compiles in seconds.
    "tiny": ModelConfig(
        vocab_size=256, d_model=32, num_heads=2, num_encoder_layers=2,
        num_decoder_layers=2, d_ff=64, dropout_rate=0.0, max_len=64,
    ),
}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A named run: the model, the training settings, and what the run is for.

    Attributes:
      model: the model (a language model's ``vocab_size`` is set from its data, a
        sequence-to-sequence task's from the task).
      train: the training settings; ``train.out`` is the default run directory.
      about: one line for ``--help``.
    """

    model: ModelConfig
    train: TrainConfig
    about: str


def _cpu_lm_training(out: str) -> TrainConfig:
    """The default run's training: a byte-level LM in a few minutes on 2 CPU cores."""
    return TrainConfig(
        out=out,
        schedule=ScheduleConfig(
            steps=1600,  # of 12 × 128 tokens: a run of a few minutes on 2 CPU cores
            lr=4e-3,  # a small model (4 × 128) takes a high peak rate; cosine decays it
        ),
        optim=OptimConfig(
            weight_decay=0.3,  # the 420 kB corpus is seen many times: regularise harder
            steps_per_call=10,  # fewer dispatches: a 4 × 128 step is short on a CPU
        ),
        data=DataConfig(batch_size=12),  # 12 × 128 tokens: the step stays short on a CPU
        loop=LoopConfig(eval_every=400, ckpt_every=400),  # 4 validations over the run
    )


def _paper_training(out: str, *, steps: int, average_last: int) -> TrainConfig:
    """§5.3–§6.1: Adam (0.9, 0.98, 1e-9), warmup 4000 then 1/√step, label smoothing 0.1."""
    return TrainConfig(
        task="translate", out=out,
        optim=OptimConfig(
            optimizer="adam",  # β1 0.9, β2 0.98, ε 1e-9 (§5.3)
            weight_decay=0.0,  # the paper's Adam has none
            grad_clip=0.0,  # the paper clips nothing
            label_smoothing=0.1,  # ε_ls = 0.1 (§5.4)
        ),
        schedule=ScheduleConfig(
            steps=steps,  # 100k base, 300k big (§5.2)
            schedule="paper",  # d_model^-0.5 · min(step^-0.5, step · warmup^-1.5) (§5.3)
            warmup=4000,  # §5.3
        ),
        # ~25000 source and 25000 target tokens a batch (§5.1)
        data=DataConfig(batch_tokens=25_000),
        loop=LoopConfig(
            ckpt_every=1500,  # ~10 minutes at the paper's 0.4 s a step (§5.2, §6.1)
            eval_every=1500,
            max_to_keep=average_last,
        ),
        eval=EvalConfig(average_last=average_last, sample_tokens=0),  # §6.1
    )


RECIPES: dict[str, Recipe] = {
    "cpu-lm": Recipe(
        PRESETS["cpu-lm"], _cpu_lm_training("runs/cpu-lm"),
        "the default: a byte-level LM with the modern options, minutes on 2 CPU cores"),
    "cpu-gpt": Recipe(
        PRESETS["cpu-gpt"], _cpu_lm_training("runs/cpu-gpt"),
        "the default run's training with the GPT-2 architecture of the minimal GPT peers"),
    "cpu-modern": Recipe(
        PRESETS["cpu-modern"], _cpu_lm_training("runs/cpu-modern"),
        "the default run's training with the modern options at cpu-gpt's size (4 × 192)"),
    "translate": Recipe(
        PRESETS["cpu-seq2seq"],
        _paper_training("runs/translate", steps=2500, average_last=5).replace(
            warmup=400,  # 4000 (§5.3) is longer than this whole run
            steps_per_call=10,  # fewer dispatches of a short step
            batch_size=64, batch_tokens=0,  # generated pairs, batched by sentence
            eval_every=500,
            ckpt_every=100,  # the last 5 (averaged, §6.1) span 400 steps
        ),  # 2500 steps: minutes on 2 CPU cores; the test score is stable by then
        "the paper's recipe (§5.3–§6.1) at CPU size, on a generated sequence task"),
    "translate-text": Recipe(
        PRESETS["cpu-translate"],
        # 1600 steps: within the translation benchmark's 10-minute budget on 2 CPUs
        _paper_training("runs/translate-text", steps=1600, average_last=5).replace(
            # The paper's schedule would peak at d^-0.5 · warmup^-0.5 = 6e-3 for this width
            # and a warmup that fits the run, too high for post-LN; a cosine decay ends the
            # short run annealed.
            schedule="cosine", lr=2e-3,
            warmup=100,  # 4000 (§5.3) is longer than this whole run
            # 1500 slots a side: in a fixed time, twice the updates of 3000-slot batches
            # learned faster (benchmarks/results/translation/NOTES.md)
            batch_tokens=1500,
            eval_every=400,
            ckpt_every=100,  # the last 5 (averaged, §6.1) span 400 steps
        ),
        "the paper's recipe (§5.1-§6.1) at CPU size, on a real parallel corpus (--data DIR "
        "from prepare --pairs)"),
    "paper-base": Recipe(
        PRESETS["paper-base"], _paper_training("runs/paper-base", steps=100_000, average_last=5),
        "Transformer base on WMT-sized data (§5–6): for accelerators"),
    "paper-big": Recipe(
        PRESETS["paper-big"],
        _paper_training("runs/paper-big", steps=300_000, average_last=20),  # §5.2, §6.1
        "Transformer big (§5–6, Table 3): for accelerators"),
    "modern-lm": Recipe(
        dataclasses.replace(PRESETS["modern-lm"], dtype="bfloat16"),  # accelerators run bf16
        TrainConfig(
            out="runs/modern-lm",
            # GPT-2 small's training as nanoGPT's config/train_gpt2.py runs it:
            schedule=ScheduleConfig(steps=600_000, lr=6e-4, warmup=2000),
            optim=OptimConfig(b2=0.95,  # GPT-3 (Brown et al. 2020, §C) and nanoGPT
                              grad_accum=40),  # 480 × 1024 tokens ≈ 0.5M a step
            data=DataConfig(batch_size=480, seq_len=1024),
            loop=LoopConfig(eval_every=2000, ckpt_every=2000),
        ),
        "a GPT-2-small-sized LM with the modern options: for accelerators"),
    "tiny": Recipe(
        PRESETS["tiny"], _cpu_lm_training("runs/tiny"),
        "the default run's training on a model that compiles in seconds (tests)"),
}
"""``--recipe`` name -> :class:`Recipe`. ``python train.py`` runs ``cpu-lm``; a
sequence-to-sequence ``--task`` without a recipe runs ``translate``."""
