"""The model configuration: :class:`ModelConfig`, one frozen dataclass for every model.

Every field is a plain Python value (dtypes are strings) so a config round-trips through JSON
with :meth:`ModelConfig.to_dict` / :meth:`ModelConfig.from_dict`; variants are made with
:func:`dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax.numpy as jnp

from transformer_jax.config.fields import at_least, check, from_dict, rule

__all__ = ["COMPUTE_ONLY", "ModelConfig"]

DTypeName = Literal["float32", "bfloat16", "float16"]
Norm = Literal["post", "pre"]
NormType = Literal["layernorm", "rmsnorm"]
Positions = Literal["sinusoidal", "learned", "rope"]
Activation = Literal["relu", "gelu", "swiglu"]
AttentionImpl = Literal["auto", "exact", "blockwise", "xla", "cudnn"]
Remat = Literal["none", "block", "dots"]
DenseBackward = Literal["matmul", "jax"]

_NO_FLAG = {"flag": False}  # set from the data or the tokenizer, not on the command line


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
        the merged token axis: :mod:`~transformer_jax.models.matmul`; faster on a CPU, where
        XLA's layout of JAX's own rule transposes the cotangent inside the fused backward) or
        "jax" (JAX's own transpose rule). Same numbers; kept as a switch so the difference can
        be measured on any backend (``benchmarks/train_throughput.py``).
    """

    vocab_size: int = dataclasses.field(metadata={"min": 1, **_NO_FLAG})
    d_model: int = at_least(512, 1)
    num_heads: int = at_least(8, 1, aliases=("--heads",))
    num_kv_heads: int | None = None
    num_encoder_layers: int = at_least(6, 0)
    num_decoder_layers: int = at_least(6, 1, aliases=("--layers",))
    d_ff: int = at_least(2048, 1)
    dropout_rate: float = rule(0.1, lambda x: 0.0 <= x < 1.0, "lie in [0, 1)",
                               aliases=("--dropout",))
    max_len: int = at_least(512, 1)
    norm: Norm = "post"
    norm_type: NormType = "layernorm"
    positions: Positions = "sinusoidal"
    activation: Activation = "relu"
    qk_norm: bool = False
    use_bias: bool = dataclasses.field(default=True, metadata={"aliases": ("--bias",)})
    share_embeddings: bool = dataclasses.field(default=True,
                                               metadata={"aliases": ("--tie-embeddings",)})
    pad_id: int = dataclasses.field(default=0, metadata=_NO_FLAG)
    bos_id: int = dataclasses.field(default=1, metadata=_NO_FLAG)
    eos_id: int = dataclasses.field(default=2, metadata=_NO_FLAG)
    dtype: DTypeName = "float32"
    param_dtype: DTypeName = "float32"
    attention_impl: AttentionImpl = "auto"
    layer_norm_eps: float = rule(1e-6, lambda x: x > 0, "be positive")
    remat: Remat = "none"
    scan_layers: bool = False
    dense_backward: DenseBackward = "matmul"

    def __post_init__(self):
        if self.num_kv_heads is None:  # frozen: the documented default is filled in once here
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        check(self)
        kv = self.num_kv_heads
        if not isinstance(kv, int) or isinstance(kv, bool) or kv < 1:
            raise ValueError(f"num_kv_heads must be a positive int, got {kv!r}")
        for name in ("pad_id", "bos_id", "eos_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ValueError(
                    f"{name} must be an int in [0, vocab_size={self.vocab_size}), got {value!r}"
                )

    def check_attention(self) -> None:
        """Check the shape of the attention heads (only the Transformers have them, so an RNN
        baseline's config is not refused over options it does not use).

        Raises:
          ValueError: D is not a multiple of N, N not a multiple of K, or rotary positions
            with an odd head dim.
        """
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model={self.d_model} must be divisible by num_heads={self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads} (grouped-query attention)"
            )
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head dim, got "
                             f"d_model / num_heads = {self.head_dim}")

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
    def storage_dtype(self) -> jnp.dtype:
        """The jnp dtype of :attr:`param_dtype`: how parameters are stored."""
        return jnp.dtype(self.param_dtype)

    # ---- serialisation ------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        return from_dict(cls, d)


COMPUTE_ONLY = ("remat", "attention_impl", "dense_backward")
"""ModelConfig fields that change how a model computes, not what: a run may resume with others."""
