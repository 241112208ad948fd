"""Property-based test of the attention kernel (hypothesis) against the float64 reference.

``test_attention_api.py`` holds the float32 property over shapes and masks; here the random shapes,
masks and grouped-query layouts also run in bfloat16 and float16, and where a mask or the
sequence lengths rule keys out, those keys and values are replaced by garbage — huge values
behind the mask, NaN in padded slots (an uninitialised buffer) — which must not change a single
bit of the output. One compilation per example serves both checks. The "ci" profile
(tests/conftest.py) runs 10 examples; ``HYPOTHESIS_PROFILE=thorough`` runs 300.
"""

import jax
import jax.numpy as jnp
import numpy as np
from attention_reference import make_inputs, randn, reference
from hypothesis import example, given
from hypothesis import strategies as st

from transformer_jax.attention import dot_product_attention

# dtype -> (atol, rtol) against float64 on the same (rounded) inputs. Logits and softmax run in
# float32 whatever the input dtype, so the error is about the output's rounding: 2^-8 relative
# for bfloat16, 2^-11 for float16, on outputs of magnitude up to ~3.
DTYPES = {"float32": (3e-6, 2e-5), "bfloat16": (2e-2, 2e-2), "float16": (4e-3, 4e-3)}


@given(dtype=st.sampled_from(sorted(DTYPES)),
       masking=st.sampled_from(["none", "causal", "mask", "bias", "lengths", "window"]),
       B=st.integers(1, 2), T=st.integers(1, 20), S=st.integers(1, 20),
       K=st.sampled_from([1, 2]), G=st.sampled_from([1, 2, 4]), H=st.sampled_from([4, 8, 16]),
       impl=st.sampled_from(["exact", "blockwise"]), block=st.sampled_from([4, 8, (2, 8)]),
       seed=st.integers(0, 2**16))
# Always run, whatever the profile draws: a bf16 mask with hidden keys through the blockwise
# path with grouped heads, and a causal float32 multi-query layout.
@example(dtype="bfloat16", masking="mask", B=2, T=13, S=9, K=2, G=2, H=8, impl="blockwise",
         block=(2, 8), seed=7)
@example(dtype="float32", masking="causal", B=1, T=17, S=17, K=1, G=4, H=16, impl="exact",
         block=4, seed=3)
def test_kernel_matches_float64_reference_and_ignores_ruled_out_keys(
        dtype, masking, B, T, S, K, G, H, impl, block, seed):
    dtype = jnp.dtype(dtype)
    q, k, v = make_inputs(B, T, S, K * G, K, H, dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed)
    kw, ref_kw = {}, {}
    ruled_out = None  # [B, S, 1, 1] keys no query may see, and what to put there
    if masking == "causal":
        kw["is_causal"] = ref_kw["is_causal"] = True
    elif masking == "mask":  # random per (t, s), and some key columns hidden from every query
        columns = rng.random(S) < 0.7
        mask = (rng.random((B, 1, T, S)) < 0.7) & columns
        kw["mask"] = ref_kw["mask"] = jnp.asarray(mask)
        ruled_out = (jnp.broadcast_to(jnp.asarray(~columns)[None, :, None, None], (B, S, 1, 1)),
                     jnp.asarray(1e4 * rng.standard_normal(k.shape), dtype))
    elif masking == "bias":  # a float32 bias with low-precision inputs is added in float32
        kw["bias"] = ref_kw["bias"] = randn(seed + 5, (K * G, T, S))
    elif masking == "lengths":
        kw["query_seq_lengths"] = ref_kw["q_lens"] = jnp.asarray(rng.integers(0, T + 1, B))
        kv_lens = jnp.asarray(rng.integers(0, S + 1, B))
        kw["key_value_seq_lengths"] = ref_kw["kv_lens"] = kv_lens
        ruled_out = ((jnp.arange(S)[None, :] >= kv_lens[:, None])[..., None, None],
                     jnp.full(k.shape, jnp.nan, dtype))
    elif masking == "window":
        kw["local_window_size"] = ref_kw["window"] = (seed % 4, seed % 3)
    attend = jax.jit(lambda q, k, v: dot_product_attention(
        q, k, v, implementation=impl, block_size=block, **kw))
    out = attend(q, k, v)
    assert out.dtype == dtype and out.shape == q.shape
    atol, rtol = DTYPES[dtype.name]
    np.testing.assert_allclose(np.asarray(out, np.float64), reference(q, k, v, **ref_kw),
                               atol=atol, rtol=rtol)
    if ruled_out is not None:
        where, garbage = ruled_out
        out2 = attend(q, jnp.where(where, garbage, k), jnp.where(where, -garbage, v))
        np.testing.assert_array_equal(np.asarray(out2, np.float32), np.asarray(out, np.float32))
