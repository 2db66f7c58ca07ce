import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from oscar_compile.kernels import dequantize_keys, dequantize_values, quantize_keys, quantize_values, quantized_attention_ref
from testing_utils import bits, float_dtypes, head_dims, randn, seeds

shapes = st.tuples(
    st.sampled_from([1, 3]),  # batch
    st.sampled_from([1, 2]),  # kv heads
    st.sampled_from([1, 3]),  # query heads per kv head (GQA)
    st.sampled_from([1, 5]),  # query tokens
    st.sampled_from([32, 64]),  # quantized tokens
    st.sampled_from([0, 1, 17]),  # residual tokens
    head_dims,
)


def setup(shape, b, seed, rot_k, scl, rot_v, dtype=torch.float32):
    bsz, h, g, tq, tk, tr, d = shape
    q = randn((bsz, h * g, tq, d), dtype, seed)
    k, v = randn((bsz, h, tk + tr, d), dtype, seed + 1), randn((bsz, h, tk + tr, d), dtype, seed + 2)
    qk = quantize_keys(k[:, :, :tk], b, 32, rot_k, scl)
    qv = quantize_values(v[:, :, :tk], b, 32, rot_v)
    keys_all = torch.cat([dequantize_keys(qk), k[:, :, tk:].float()], 2)
    values_all = torch.cat([dequantize_values(qv), v[:, :, tk:].float()], 2)
    res_k, res_v = (k[:, :, tk:], v[:, :, tk:]) if tr else (None, None)
    return q, qk, qv, res_k, res_v, keys_all, values_all


@given(shape=shapes, b=bits, seed=seeds, rot_k=st.booleans(), scl=st.booleans(), rot_v=st.booleans(),
       scale=st.sampled_from([None, 0.05]))
def test_equals_dequantize_then_sdpa(shape, b, seed, rot_k, scl, rot_v, scale):
    q, qk, qv, rk, rv, keys_all, values_all = setup(shape, b, seed, rot_k, scl, rot_v)
    out = quantized_attention_ref(q, qk, qv, rk, rv, scale=scale)
    ref = F.scaled_dot_product_attention(q, keys_all, values_all, scale=scale, enable_gqa=True)
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


@given(shape=shapes, seed=seeds, dtype=float_dtypes)
def test_masks_and_causal_match_sdpa(shape, seed, dtype):
    q, qk, qv, rk, rv, keys_all, values_all = setup(shape, 2, seed, True, True, True, dtype)
    bsz, hq, tq, _ = q.shape
    total = keys_all.shape[2]
    gen = torch.Generator().manual_seed(seed)
    bool_mask = torch.rand(bsz, 1, tq, total, generator=gen) > 0.3
    bool_mask[..., 0] = True  # no fully masked rows (SDPA gives NaN there; we give 0)
    additive = torch.randn(bsz, hq, tq, total, generator=gen)
    qf = q.float()
    for kwargs in ({"attn_mask": bool_mask}, {"attn_mask": additive}, {"is_causal": True}):
        out = quantized_attention_ref(q, qk, qv, rk, rv, **kwargs)
        if kwargs.get("is_causal"):
            mask = torch.ones(tq, total, dtype=torch.bool).tril(total - tq)
            ref = F.scaled_dot_product_attention(qf, keys_all, values_all, attn_mask=mask, enable_gqa=True)
        else:
            ref = F.scaled_dot_product_attention(qf, keys_all, values_all, enable_gqa=True, **kwargs)
        tol = 2e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def test_softcap_and_fully_masked_rows():
    q, qk, qv, rk, rv, keys_all, values_all = setup((1, 2, 2, 3, 32, 5, 64), 2, 0, True, True, True)
    s = torch.einsum("bhqd,bhkd->bhqk", q, keys_all.repeat_interleave(2, 1)) / 8
    p = torch.softmax(torch.tanh(s / 2.0) * 2.0, -1)
    ref = p @ values_all.repeat_interleave(2, 1)
    torch.testing.assert_close(quantized_attention_ref(q, qk, qv, rk, rv, softcap=2.0), ref, atol=2e-5, rtol=1e-4)
    none = torch.zeros(1, 1, 3, 37, dtype=torch.bool)
    assert (quantized_attention_ref(q, qk, qv, rk, rv, attn_mask=none) == 0).all()


def test_residual_only_and_quantized_only():
    q, qk, qv, rk, rv, keys_all, values_all = setup((2, 2, 2, 1, 32, 9, 64), 2, 1, False, False, False)
    torch.testing.assert_close(
        quantized_attention_ref(q, None, None, rk, rv),
        F.scaled_dot_product_attention(q, rk, rv, enable_gqa=True),
    )
    torch.testing.assert_close(
        quantized_attention_ref(q, qk, qv),
        F.scaled_dot_product_attention(q, keys_all[:, :, :32], values_all[:, :, :32], enable_gqa=True),
        atol=2e-5, rtol=1e-4,
    )


def test_bad_inputs_are_rejected():
    q, qk, qv, rk, rv, *_ = setup((1, 2, 2, 1, 32, 3, 64), 2, 0, True, True, True)
    with pytest.raises(ValueError, match="query must be"):
        quantized_attention_ref(q[0], qk, qv, rk, rv)
    with pytest.raises(ValueError, match="nothing to attend"):
        quantized_attention_ref(q, None, None)
    with pytest.raises(ValueError, match="not a multiple of kv heads"):
        quantized_attention_ref(q[:, :3], qk, qv, rk, rv)
    with pytest.raises(ValueError, match="does not match"):
        quantized_attention_ref(q[..., :32], qk, qv, rk, rv)
    with pytest.raises(ValueError, match="both be given"):
        quantized_attention_ref(q, qk, None, rk, rv)
