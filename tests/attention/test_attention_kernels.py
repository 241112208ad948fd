"""Block bookkeeping of the blockwise kernel, checked against brute force over the mask.

The blockwise loops skip the blocks outside ``[lo, hi)`` of ``block_bounds`` and drop the mask
on its ``[a, b)``; both are pure integer arithmetic, so every (query block, key block) pair of
random layouts is checked here, in both directions, against the boolean mask ``valid`` draws.
"""

import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from transformer_jax.attention import blockwise
from transformer_jax.attention import kernels as ak


@st.composite
def layouts(draw):
    T, S = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    causal = draw(st.booleans())
    window = draw(st.one_of(st.none(), st.tuples(st.integers(0, 12), st.integers(0, 12))))
    bq, bk = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    nq, nk = -(-T // bq), -(-S // bk)
    q_len, kv_len = draw(st.integers(0, T)), draw(st.integers(0, S))
    spec = ak.Spec(is_causal=causal, window=window, block_q=bq, block_k=bk)
    return spec, nq, nk, q_len, kv_len


def _block_validity(spec, nq, nk, q_len, kv_len):
    """any/all-valid [nq, nk] of every block of the padded [nq·bq, nk·bk] score matrix."""
    bq, bk = spec.block_q, spec.block_k
    ok = np.asarray(ak.valid(spec, 0, nq * bq, 0, nk * bk, jnp.int32(q_len), jnp.int32(kv_len)))
    blocks = ok.reshape(nq, bq, nk, bk)
    return blocks.any(axis=(1, 3)), blocks.all(axis=(1, 3))


def _check_block_loops(n, some, full, spec, q_len, kv_len, transposed):
    """Row i of some/full [n_i, n]: the loop over blocks [lo, hi) of outer block i must visit
    every block with a visible pair, and skip the mask on [a, b) = exactly the fully visible
    ones (none when an arbitrary mask is present)."""
    for i in range(some.shape[0]):
        bounds = blockwise.block_bounds(spec, i, n, q_len, kv_len, False, transposed)
        lo, a, b, hi = (int(x) for x in bounds)
        visited = np.zeros(n, bool)
        visited[lo:hi] = True
        unmasked = np.zeros(n, bool)
        unmasked[a:b] = True
        assert not (some[i] & ~visited).any(), "a block with visible keys is skipped"
        np.testing.assert_array_equal(unmasked, full[i])  # exactly the fully visible blocks
        masked = blockwise.block_bounds(spec, i, n, q_len, kv_len, True, transposed)
        assert tuple(int(x) for x in masked) == (lo, lo, lo, hi)


@given(layouts())
def test_key_blocks_visited_and_unmasked_match_brute_force(layout):
    spec, nq, nk, q_len, kv_len = layout
    some, full = _block_validity(spec, nq, nk, q_len, kv_len)
    _check_block_loops(nk, some, full, spec, q_len, kv_len, transposed=False)


@given(layouts())
def test_query_blocks_visited_and_unmasked_match_brute_force(layout):
    spec, nq, nk, q_len, kv_len = layout
    some, full = _block_validity(spec, nq, nk, q_len, kv_len)
    _check_block_loops(nq, some.T, full.T, spec, q_len, kv_len, transposed=True)
