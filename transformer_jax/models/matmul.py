"""The projections' contraction, with a backward pass written as plain matmuls.

:func:`dot_general` is what every ``nn.DenseGeneral`` of the models contracts with (its
``dot_general`` attribute). The forward pass is ``lax.dot_general`` unchanged. The backward pass
is a ``jax.custom_vjp`` that computes the two gradients of x[..., K] · w[K, F] directly:

* dx = dy · wᵀ, contracting F;
* dw = xᵀ · dy with the leading axes of x and dy merged into one (the tokens, M = B·T):
  a [K, M] × [M, F] matmul.

JAX's own transpose rule gives the same numbers, but XLA's CPU backend lays it out badly: for
dw it wanted the cotangent dy transposed, and fused that transpose into the element-wise op
producing dy (the SwiGLU backward in the default model), which then writes its output with a
stride of M floats. In a ``jax.profiler`` trace of the default step that one fusion was the
largest single item. The plain matmuls here give bit-identical gradients without that strided
write; ``benchmarks/train_throughput.py`` times the step with either rule (its "JAX dense
backward" rows).

Only the leading axes of x are merged, never the contracted or feature axes, so a kernel
sharded along K or F (FSDP, tensor parallelism) keeps its sharding; the token axis M is sharded
like the batch. A contraction of another form (batch dimensions, axes not at the end of x) falls
back to ``lax.dot_general``.
"""

from __future__ import annotations

import functools
import math

import jax
from jax import lax

__all__ = ["dot_general"]


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """``lax.dot_general`` with :func:`_matmul`'s backward pass when ``lhs``'s last k axes
    contract with ``rhs``'s first k (a dense layer), else ``lax.dot_general`` itself."""
    (lc, rc), (lb, rb) = dimension_numbers
    k = len(lc)
    dense = (not lb and not rb and 0 < k < lhs.ndim
             and tuple(lc) == tuple(range(lhs.ndim - k, lhs.ndim)) and tuple(rc) == tuple(range(k)))
    if not dense:
        return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
    return _matmul(lhs, rhs, k, precision, preferred_element_type)


def _contract(x, w, k: int, precision, preferred):
    """x [..., K1..Kk] · w [K1..Kk, F...] -> [..., F...]."""
    dims = ((tuple(range(x.ndim - k, x.ndim)), tuple(range(k))), ((), ()))
    return lax.dot_general(x, w, dims, precision=precision, preferred_element_type=preferred)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _matmul(x, w, k: int, precision, preferred):
    return _contract(x, w, k, precision, preferred)


def _matmul_fwd(x, w, k, precision, preferred):
    return _contract(x, w, k, precision, preferred), (x, w)


def _matmul_bwd(k, precision, preferred, residuals, dy):
    x, w = residuals
    n_out = w.ndim - k
    # dx = dy · wᵀ: contract the feature axes F of dy [..., F] and w [K, F].
    out_dims = tuple(range(dy.ndim - n_out, dy.ndim)), tuple(range(k, w.ndim))
    dx = lax.dot_general(dy, w, (out_dims, ((), ())), precision=precision,
                         preferred_element_type=x.dtype)
    # dw = xᵀ · dy over the merged token axis M: [M, K...] x [M, F...] -> [K..., F...].
    m = math.prod(x.shape[:-k])
    x2, dy2 = x.reshape((m,) + x.shape[-k:]), dy.reshape((m,) + dy.shape[-n_out:])
    dw = lax.dot_general(x2, dy2, (((0,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=w.dtype)
    return dx, dw


_matmul.defvjp(_matmul_fwd, _matmul_bwd)
