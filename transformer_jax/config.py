"""Configuration: the model and training dataclasses, named presets, and the ``--mesh`` syntax.

Variants are made with :func:`dataclasses.replace`, e.g.
``dataclasses.replace(PRESETS["paper-base"], vocab_size=37000, dtype="bfloat16")``.
Every field is a plain Python value (dtypes are strings) so a config round-trips through JSON
with :meth:`ModelConfig.to_dict` / :meth:`ModelConfig.from_dict`. This module is the bottom
of the package: every other module may import it, and it imports nothing of the package and
no JAX sharding (the mesh syntax is parsed here; the mesh is built in
:mod:`transformer_jax.parallel.sharding`).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

import jax.numpy as jnp

__all__ = ["AXES", "COMPUTE_ONLY", "MODERN_OPTIONS", "PRESETS", "ModelConfig", "TrainConfig",
           "mesh_axes", "model_identity"]

DTypeName = Literal["float32", "bfloat16", "float16"]
Norm = Literal["post", "pre"]
NormType = Literal["layernorm", "rmsnorm"]
Positions = Literal["sinusoidal", "learned", "rope"]
Activation = Literal["relu", "gelu", "swiglu"]
AttentionImpl = Literal["auto", "exact", "blockwise", "xla", "cudnn"]
Remat = Literal["none", "block", "dots"]
DenseBackward = Literal["matmul", "jax"]

def _from_dict(cls, d: dict[str, Any]):
    """``cls(**d)`` for a config dataclass, naming any keys that are not its fields."""
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    return cls(**d)


_CHOICES = {  # field -> allowed values, checked once in __post_init__
    "norm": typing.get_args(Norm),
    "norm_type": typing.get_args(NormType),
    "positions": typing.get_args(Positions),
    "remat": typing.get_args(Remat),
    "activation": typing.get_args(Activation),
    "attention_impl": typing.get_args(AttentionImpl),
    "dense_backward": typing.get_args(DenseBackward),
    "dtype": typing.get_args(DTypeName),
    "param_dtype": typing.get_args(DTypeName),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Hyper-parameters of the encoder–decoder :class:`~transformer_jax.models.Transformer` and
    the decoder-only :class:`~transformer_jax.models.TransformerLM`.

    Attributes:
      vocab_size: V, one vocabulary shared by source and target (§3.4, §5.1: shared BPE).
      d_model: D, the width of every residual stream (512 base, §3.1).
      num_heads: N, query heads (8 base, §3.2.2).
      num_kv_heads: K, key/value heads; ``None`` means ``num_heads`` (the paper's multi-head
        attention). Fewer gives grouped-query attention (N must be a multiple of K).
      num_encoder_layers: encoder blocks (6, §3.1); unused by the LM.
      num_decoder_layers: decoder blocks (6, §3.1); the LM's layer count.
      d_ff: F, inner width of the position-wise feed-forward network (2048 base, §3.3).
      dropout_rate: residual dropout P_drop on each sub-layer output and on the sum of
        embeddings and positions (§5.4).
      max_len: longest sequence the positions cover (learned positions have this many rows).
      norm: "post" = LayerNorm(x + Sublayer(x)) as in the paper (§3.1); "pre" =
        x + Sublayer(LayerNorm(x)) with a final LayerNorm (GPT-2, Xiong et al. 2020).
      norm_type: "layernorm" (§3.1, Ba et al. 2016) or "rmsnorm" (Zhang & Sennrich 2019: no
        mean, no bias).
      positions: "sinusoidal" (§3.5) or "learned" position embeddings added to the input, or
        "rope": rotary positions applied to the self-attention queries and keys (Su et al.
        2021).
      activation: feed-forward non-linearity: "relu" (§3.3), "gelu" (GPT-2) or "swiglu"
        (Shazeer 2020: a gated unit with a third matrix).
      qk_norm: RMS-normalise queries and keys per head before the dot product (Dehghani et
        al. 2023); bounds the logits.
      use_bias: biases in the projections and LayerNorms (the paper's); off in most modern LMs.
      share_embeddings: one matrix for source embeddings, target embeddings and the pre-softmax
        projection (§3.4); for the LM, the output projection is tied to the input embedding.
      pad_id: padding token; source keys equal to it are masked out of attention.
      bos_id: beginning-of-sequence token; the decoder's first input in seq2seq decoding.
      eos_id: end-of-sequence token; decoding stops a hypothesis when it is emitted.
      dtype: compute dtype name ("float32", "bfloat16", "float16"); LayerNorm statistics,
        attention softmax and the returned logits stay float32.
      param_dtype: parameter storage dtype name.
      attention_impl: passed to the attention kernel: "exact", "blockwise", "xla"
        (``jax.nn.dot_product_attention``), "cudnn" (its fused GPU kernel) or "auto" (the
        kernel chooses).
      layer_norm_eps: LayerNorm / RMSNorm epsilon.
      remat: rematerialisation of each block in the backward pass (``jax.checkpoint``): "none";
        "block" (keep only each block's input, recompute the rest); "dots" (also keep the
        outputs of the weight matmuls). Same numbers, less activation memory, more compute.
      scan_layers: run each stack of blocks as one ``nn.scan`` (parameters get a leading layer
        axis): compile time no longer grows with depth. A checkpoint of the other layout is
        refused (the config differs in ``scan_layers``).
      dense_backward: the projections' backward pass: "matmul" (two plain matmuls, dw over
        the merged token axis: :mod:`~transformer_jax.models.matmul`; the default run's step
        1.35× faster on a 2-core CPU) or "jax" (JAX's own transpose rule). Same numbers; kept
        as a switch so the difference can be measured on any backend
        (``benchmarks/train_throughput.py``).
    """

    vocab_size: int
    d_model: int = 512
    num_heads: int = 8
    num_kv_heads: int | None = None
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    d_ff: int = 2048
    dropout_rate: float = 0.1
    max_len: int = 512
    norm: Norm = "post"
    norm_type: NormType = "layernorm"
    positions: Positions = "sinusoidal"
    activation: Activation = "relu"
    qk_norm: bool = False
    use_bias: bool = True
    share_embeddings: bool = True
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    dtype: DTypeName = "float32"
    param_dtype: DTypeName = "float32"
    attention_impl: AttentionImpl = "auto"
    layer_norm_eps: float = 1e-6
    remat: Remat = "none"
    scan_layers: bool = False
    dense_backward: DenseBackward = "matmul"

    def __post_init__(self):
        if self.num_kv_heads is None:  # frozen: the documented default is filled in once here
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        for name in ("vocab_size", "d_model", "num_heads", "num_kv_heads", "num_decoder_layers",
                     "d_ff", "max_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.num_encoder_layers, int) or self.num_encoder_layers < 0:
            raise ValueError(
                f"num_encoder_layers must be a non-negative int, got {self.num_encoder_layers!r}"
            )
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model={self.d_model} must be divisible by num_heads={self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads} (grouped-query attention)"
            )
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must lie in [0, 1), got {self.dropout_rate!r}")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head dim, got "
                             f"d_model / num_heads = {self.head_dim}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps must be positive, got {self.layer_norm_eps!r}")
        for name in ("pad_id", "bos_id", "eos_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ValueError(
                    f"{name} must be an int in [0, vocab_size={self.vocab_size}), got {value!r}"
                )

    # ---- derived ------------------------------------------------------------------------

    @property
    def head_dim(self) -> int:
        """H = d_k = d_v = d_model / num_heads (64 base, §3.2.2)."""
        return self.d_model // self.num_heads

    @property
    def compute_dtype(self) -> jnp.dtype:
        """The jnp dtype of :attr:`dtype`."""
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self) -> jnp.dtype:
        """The jnp dtype of :attr:`param_dtype`."""
        return jnp.dtype(self.param_dtype)

    # ---- serialisation ------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        return _from_dict(cls, d)


COMPUTE_ONLY = ("remat", "attention_impl", "dense_backward")
"""ModelConfig fields that change how a model computes, not what: a run may resume with others."""


def model_identity(d: dict[str, Any]) -> dict[str, Any]:
    """The fields of a (saved) ModelConfig dict that decide the model, for comparing two runs.

    Fields an older version did not write get their defaults (so its runs still resume);
    :data:`COMPUTE_ONLY` fields are dropped. A dict that is not a valid config is returned as
    it is (and then differs from every valid one).
    """
    try:
        full = ModelConfig.from_dict(d).to_dict()
    except (TypeError, ValueError):
        return dict(d)
    return {k: v for k, v in full.items() if k not in COMPUTE_ONLY}


MODERN_OPTIONS: dict[str, Any] = dict(
    norm="pre", norm_type="rmsnorm", positions="rope", activation="swiglu", qk_norm=True,
    use_bias=False, share_embeddings=False)
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
    # The default training run (python train.py, with TrainConfig's defaults): a byte-level
    # (V=256) LM with the modern options, sized for a 5-minute budget on 2 CPU cores. On the
    # embedded corpus (420 kB) such a run sees the text many times, so the budget buys
    # context (T 128) and steps for a small model, with dropout (and TrainConfig's weight
    # decay 0.3) against overfitting; the README's "Default run" section has the measurements
    # that chose it.
    "cpu-lm": ModelConfig(
        vocab_size=256, d_model=128, num_heads=4, num_encoder_layers=0,
        num_decoder_layers=4, d_ff=384, dropout_rate=0.1, max_len=256,
        **MODERN_OPTIONS,
    ),
    # A GPT-2-style LM (pre-LN LayerNorm, learned positions, GELU, biases, tied output
    # embedding) of 4 × 192: the architecture the minimal GPT peers use, for like-for-like
    # throughput comparisons, and the default run before the modern options.
    "cpu-gpt": ModelConfig(
        vocab_size=256, d_model=192, num_heads=6, num_encoder_layers=0,
        num_decoder_layers=4, d_ff=768, dropout_rate=0.0, max_len=256, norm="pre",
        positions="learned", activation="gelu", share_embeddings=True,
    ),
    # python train.py --task translate|reverse|sort|add: the paper's post-LN encoder–decoder with
    # shared embeddings and sinusoidal positions, shrunk to train in minutes on 2 CPU cores.
    # vocab_size is set from the task. No dropout: the generated data never repeats a batch.
    "cpu-seq2seq": ModelConfig(
        vocab_size=256, d_model=128, num_heads=4, num_encoder_layers=2,
        num_decoder_layers=2, d_ff=512, dropout_rate=0.0, max_len=32,
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


# ---- the device mesh (--mesh) ---------------------------------------------------------------

DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
AXES = (DATA, FSDP, TENSOR)
"""Mesh axis names, outermost first (data parallelism crosses hosts best: it talks least)."""


def mesh_axes(spec: str) -> dict[str, int]:
    """The syntax of ``--mesh``: ``"data=2,fsdp=-1"`` -> ``{"data": 2, "fsdp": -1}``.

    Raises:
      ValueError: an unknown or repeated axis, a size that is not a positive integer (or -1,
        once); the message names ``--mesh``.
    """
    sizes: dict[str, int] = {}
    for part in spec.split(","):
        name, sep, value = (s.strip() for s in part.partition("="))
        if not sep or name not in AXES or name in sizes:
            raise ValueError(f"--mesh {spec!r}: expected comma-separated AXIS=SIZE, each AXIS "
                             f"once, from {', '.join(AXES)}; got {part.strip()!r}")
        try:
            size = int(value)
        except ValueError:
            size = 0
        if size < 1 and not (size == -1 and -1 not in sizes.values()):
            raise ValueError(f"--mesh {spec!r}: the size of {name} must be a positive integer "
                             f"(or -1 once, for the remaining devices), got {value!r}")
        sizes[name] = size
    return sizes


# ---- training -----------------------------------------------------------------------------

ModelName = Literal["transformer", "lstm", "gru"]
Optimizer = Literal["adamw", "adam"]
Schedule = Literal["cosine", "paper", "constant"]
ParallelMode = Literal["auto", "pmap", "sharded", "shard_map", "none"]
Task = Literal["lm", "translate", "reverse", "sort", "add"]

_TRAIN_CHOICES = {
    "model": typing.get_args(ModelName),
    "optimizer": typing.get_args(Optimizer),
    "schedule": typing.get_args(Schedule),
    "parallel": typing.get_args(ParallelMode),
    "task": typing.get_args(Task),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Settings of a language-model training run (:func:`transformer_jax.train.loop.run`).

    The defaults are the ``python train.py`` run (with the "cpu-lm" model preset, 4 × 128): a
    byte-level LM on the embedded corpus, 1600 steps of 12 × 128 bytes (~16 TFLOP), sized for a
    5-minute budget on a 2-core CPU (the README's "Default run" section has the measurements
    that chose it, and the run's wall time).

    Attributes:
      task: "lm" (byte-level language modelling on ``data``) or a sequence-to-sequence task
        of :mod:`transformer_jax.data.seq2seq_tasks` ("translate", "reverse", "sort", "add") for the
        encoder–decoder; those ignore ``data``, ``seq_len`` and the sample settings.
      model: model family: "transformer" (:class:`~transformer_jax.models.TransformerLM`), or
        the recurrent baselines "lstm" / "gru" (:mod:`transformer_jax.models.rnn`).
      data: text files or folders; empty means the embedded corpus (``pydoc_data.topics``).
      val_fraction: share of each file's bytes (its end) held out for validation.
      out: the run directory (config, metrics, checkpoints, samples); re-using it resumes.
      seed: root of all randomness: parameters, dropout and the data order.
      steps: optimizer steps to train for (the schedule's length).
      batch_size: global batch B (sequences per optimizer step, over all devices and
        accumulation micro-batches).
      seq_len: T, tokens per training sequence.
      grad_accum: micro-batches per optimizer step; gradients are averaged over them.
      optimizer: "adamw" (decoupled weight decay, Loshchilov & Hutter) or "adam": the paper's
        Adam with β1 = 0.9, β2 = 0.98, ε = 1e-9 (§5.3) and no weight decay.
      lr: peak learning rate ("cosine", "constant"); unused by "paper".
      min_lr_ratio: the cosine schedule decays to ``lr * min_lr_ratio`` at ``steps``.
      schedule: "cosine" (linear warmup, cosine decay), "constant" (linear warmup), or "paper":
        d_model^-0.5 · min(step^-0.5, step · warmup^-1.5) (§5.3).
      warmup: warmup steps.
      b1: AdamW β1.
      b2: AdamW β2.
      eps: AdamW ε.
      weight_decay: AdamW decoupled weight decay on matrices and embeddings (not biases or
        LayerNorm scales).
      grad_clip: clip gradients to this global norm; 0 disables clipping.
      label_smoothing: ε_ls of the training loss (§5.4 uses 0.1); evaluation never smooths.
      z_loss: coefficient of log(Z)² added to the training loss per target (PaLM, Chowdhery et
        al. 2022, uses 1e-4): keeps the softmax normaliser near 1. Evaluation leaves it out.
      log_every: steps between metric lines (and progress-bar updates of loss and tokens/s).
      eval_every: steps between validation passes (the last step is always evaluated).
      ckpt_every: steps between checkpoints (the last step is always saved).
      steps_per_call: optimizer steps run by one compiled call (a ``lax.scan``); fewer
        dispatches, identical per-step semantics. Checkpoints fall on multiples of it when the
        intervals above are multiples of it.
      parallel: "auto" (pmap over all local devices when there is more than one, else jit;
        "sharded" with a ``mesh`` or several processes), "pmap", "sharded" (jit on a device
        mesh, state sharded by :data:`transformer_jax.parallel.sharding.PARAM_RULES`),
        "shard_map" (data-parallel step on the mesh), or "none" (jit on one device).
      mesh: axis sizes of the device mesh for "sharded"/"shard_map", e.g.
        "data=2,fsdp=2,tensor=1" (axes left out are 1; -1 takes the remaining devices); ""
        means data parallelism over all devices.
      max_to_keep: checkpoints kept on disk.
      max_nonfinite: stop after this many consecutive steps with non-finite gradients (they are
        skipped by ``optax.apply_if_finite`` until then).
      eval_batch_size: windows per validation batch.
      sample_tokens: bytes generated at the end of training (0: no sample).
      sample_prompt: the prompt of that sample.
      sample_temperature: its softmax temperature.
      average_last: seq2seq tasks: evaluate the test split with the mean parameters of the
        last this many checkpoints (the paper averages the last 5, §6.1); 1: the final ones.
    """

    task: Task = "lm"

    model: ModelName = "transformer"
    data: tuple[str, ...] = ()
    val_fraction: float = 0.1
    out: str = "runs/cpu-lm"
    seed: int = 0
    steps: int = 1600
    batch_size: int = 12
    seq_len: int = 128
    grad_accum: int = 1
    optimizer: Optimizer = "adamw"
    lr: float = 4e-3
    min_lr_ratio: float = 0.1
    schedule: Schedule = "cosine"
    warmup: int = 100
    b1: float = 0.9
    b2: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.3
    grad_clip: float = 1.0
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    log_every: int = 50
    eval_every: int = 400
    ckpt_every: int = 400
    steps_per_call: int = 10
    parallel: ParallelMode = "auto"
    mesh: str = ""
    max_to_keep: int = 3
    max_nonfinite: int = 5
    eval_batch_size: int = 64
    sample_tokens: int = 200
    sample_prompt: str = "The "
    sample_temperature: float = 0.8
    average_last: int = 1

    def __post_init__(self):
        object.__setattr__(self, "data", tuple(str(p) for p in self.data))
        for name, allowed in _TRAIN_CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "eval_every",
                     "ckpt_every", "steps_per_call", "max_to_keep", "max_nonfinite",
                     "eval_batch_size", "average_last"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("seed", "warmup", "sample_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size={self.batch_size} must be divisible by "
                             f"grad_accum={self.grad_accum}")
        if self.mesh:
            mesh_axes(self.mesh)  # the syntax; the sizes are checked against the devices later
        if self.schedule == "paper" and self.warmup == 0:
            raise ValueError("the paper schedule needs warmup > 0 (§5.3 uses 4000)")
        checks = {  # field -> (holds, the rule in words)
            "val_fraction": (0.0 < self.val_fraction < 1.0, "lie in (0, 1)"),
            "lr": (self.lr > 0.0, "be > 0"),
            "min_lr_ratio": (0.0 <= self.min_lr_ratio <= 1.0, "lie in [0, 1]"),
            "b1": (0.0 <= self.b1 < 1.0, "lie in [0, 1)"),
            "b2": (0.0 <= self.b2 < 1.0, "lie in [0, 1)"),
            "eps": (self.eps > 0.0, "be > 0"),
            "weight_decay": (self.weight_decay >= 0.0, "be >= 0"),
            "grad_clip": (self.grad_clip >= 0.0, "be >= 0 (0: no clipping)"),
            "label_smoothing": (0.0 <= self.label_smoothing < 1.0, "lie in [0, 1)"),
            "z_loss": (self.z_loss >= 0.0, "be >= 0"),
            "sample_temperature": (self.sample_temperature > 0.0, "be > 0"),
        }
        for name, (ok, rule) in checks.items():
            if not ok:  # `not ok` also catches NaN, which fails every comparison
                raise ValueError(f"{name} must {rule}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field (``data`` as a list)."""
        d = dataclasses.asdict(self)
        d["data"] = list(self.data)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        return _from_dict(cls, d)
