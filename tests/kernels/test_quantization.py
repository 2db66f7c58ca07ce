import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from oscar_compile.kernels import (
    dequantize_groups,
    dequantize_keys,
    dequantize_keys_transformed,
    dequantize_values,
    dequantize_values_transformed,
    hadamard_transform,
    key_token_norms,
    quantize_groups,
    quantize_keys,
    quantize_values,
    unpack_codes,
)
from testing_utils import bits, float_dtypes, head_dims, randn, seeds

FP16_REL = 2.0**-10  # fp16 rounding of mn/scale (relative)


def max_abs_err_bound(x, mn, scale, levels):
    # |x - x_hat| <= scale/2 within the range, plus fp16 rounding of mn and scale (scale enters `levels` times)
    return scale.float() / 2 + FP16_REL * (mn.float().abs() + levels * scale.float()) + 1e-6 * x.abs().amax()


@given(b=bits, seed=seeds, n=st.sampled_from([1, 2, 5, 32]), spread=st.floats(1e-3, 1e3))
def test_group_error_within_half_a_step(b, seed, n, spread):
    x = randn((3, n, 32), seed=seed, scale=spread)
    codes, mn, scale = quantize_groups(x, b, dim=-1)
    levels = (1 << b) - 1
    assert codes.dtype == torch.uint8 and int(codes.max()) <= levels
    err = (dequantize_groups(codes, mn, scale) - x).abs()
    assert (err <= max_abs_err_bound(x, mn, scale, levels)).all()


@given(b=bits, value=st.sampled_from([0.0, 1.5, -3.25, 1024.0, 2.0**-14]))
def test_constant_group_dequantizes_exactly(b, value):
    x = torch.full((4, 32), value)
    codes, mn, scale = quantize_groups(x, b, dim=-1)
    assert (scale == 0).all() and (codes == 0).all()
    assert torch.equal(dequantize_groups(codes, mn, scale), x)


def test_hand_worked_two_bit_group():
    # min 0, max 3 -> scale 1: codes are the values themselves (0.5 rounds up: floor(x + 0.5))
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0, 0.5, 2.4]])
    codes, mn, scale = quantize_groups(x, 2, dim=-1)
    assert mn.item() == 0 and scale.item() == 1
    assert codes.tolist() == [[0, 1, 2, 3, 1, 2]]


def test_extremes_map_to_end_codes():
    x = randn((8, 32), seed=1)
    codes, _, _ = quantize_groups(x, 2, dim=-1)
    assert (codes.gather(1, x.argmin(1, keepdim=True)) == 0).all()
    assert (codes.gather(1, x.argmax(1, keepdim=True)) == 3).all()


kv_shapes = st.tuples(
    st.sampled_from([1, 3]),  # batch (1 and odd)
    st.sampled_from([1, 2, 4]),  # kv heads (1 = MQA)
    st.sampled_from([32, 64, 128]),  # tokens (complete groups)
    head_dims,
)


@given(shape=kv_shapes, b=bits, dtype=float_dtypes, seed=seeds, rot=st.booleans(), scl=st.booleans())
def test_key_codes_error_bound_in_quantized_space(shape, b, dtype, seed, rot, scl):
    k = randn(shape, dtype, seed)
    q = quantize_keys(k, b, 32, rot, scl)
    bsz, h, t, d = shape
    assert q.codes.shape == (bsz, h, t * b // 8, d) and q.codes.dtype == torch.uint8
    assert q.mn.shape == (bsz, h, t // 32, d) and q.mn.dtype == torch.float16
    assert q.norms.shape == (bsz, t) and q.norms.dtype == torch.float32
    x = k.float()
    if rot:
        x = hadamard_transform(x)
    if scl:
        x = x / key_token_norms(k)[:, None, :, None]
    x_hat = dequantize_keys_transformed(q)
    mn = q.mn.repeat_interleave(32, dim=2)
    scale = q.scale.repeat_interleave(32, dim=2)
    assert ((x_hat - x).abs() <= max_abs_err_bound(x, mn, scale, (1 << b) - 1)).all()


@given(shape=kv_shapes, b=bits, dtype=float_dtypes, seed=seeds, rot=st.booleans())
def test_value_codes_error_bound_in_quantized_space(shape, b, dtype, seed, rot):
    v = randn(shape, dtype, seed)
    q = quantize_values(v, b, 32, rot)
    bsz, h, t, d = shape
    assert q.codes.shape == (bsz, h, t, d * b // 8) and q.mn.shape == (bsz, h, t, d // 32)
    x = hadamard_transform(v) if rot else v.float()
    mn = q.mn.repeat_interleave(32, dim=3)
    scale = q.scale.repeat_interleave(32, dim=3)
    err = (dequantize_values_transformed(q) - x).abs()
    assert (err <= max_abs_err_bound(x, mn, scale, (1 << b) - 1)).all()


@given(shape=kv_shapes, b=bits, seed=seeds, rot=st.booleans(), scl=st.booleans())
def test_dequantize_keys_returns_to_original_space(shape, b, seed, rot, scl):
    # H is orthonormal: the per-(token, head) error norm in the original space equals the quantized-space
    # error norm times the token norm (when scaled), so dequantize_keys undoes exactly the transform.
    k = randn(shape, seed=seed)
    q = quantize_keys(k, b, 32, rot, scl)
    x = hadamard_transform(k) if rot else k
    norms = key_token_norms(k)[:, None, :]
    if scl:
        x = x / norms[..., None]
    err_q = (dequantize_keys_transformed(q) - x).norm(dim=-1)
    err_orig = (dequantize_keys(q) - k).norm(dim=-1)
    expect = err_q * norms if scl else err_q
    assert torch.allclose(err_orig, expect, rtol=1e-4, atol=1e-5)


@given(shape=kv_shapes, seed=seeds, rot=st.booleans())
def test_dequantize_values_returns_to_original_space(shape, seed, rot):
    v = randn(shape, seed=seed)
    q = quantize_values(v, 2, 32, rot)
    x = hadamard_transform(v) if rot else v
    err_q = (dequantize_values_transformed(q) - x).norm(dim=-1)
    assert torch.allclose((dequantize_values(q) - v).norm(dim=-1), err_q, rtol=1e-4, atol=1e-5)


@given(seed=seeds, token=st.integers(0, 63), exponent=st.integers(-6, 6), rot=st.booleans())
def test_scaling_a_token_by_power_of_two_keeps_all_codes(seed, token, exponent, rot):
    # with token scaling, k_t / ||k_t|| does not depend on ||k_t||: codes and group params are unchanged
    k = randn((2, 3, 64, 64), seed=seed)
    k2 = k.clone()
    k2[:, :, token] *= 2.0**exponent
    a, b = quantize_keys(k, 2, 32, rot, True), quantize_keys(k2, 2, 32, rot, True)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.mn, b.mn) and torch.equal(a.scale, b.scale)
    assert torch.allclose(b.norms[:, token], a.norms[:, token] * 2.0**exponent)


@given(seed=seeds, token=st.integers(0, 63), c=st.floats(0.01, 100.0))
def test_scaling_a_token_by_any_factor_changes_almost_no_codes(seed, token, c):
    k = randn((1, 4, 64, 64), seed=seed)
    k2 = k.clone()
    k2[:, :, token] *= c
    a, b = quantize_keys(k, 2, 32, True, True), quantize_keys(k2, 2, 32, True, True)
    changed = (unpack_codes(a.codes, 2, 2) != unpack_codes(b.codes, 2, 2)).float().mean()
    assert changed < 1e-3  # only float-rounding ties can flip


def test_without_scaling_a_big_token_changes_its_groups_codes():
    k = randn((1, 2, 64, 64), seed=3)
    k2 = k.clone()
    k2[:, :, 5] *= 64.0
    a, b = quantize_keys(k, 2, 32, False, False), quantize_keys(k2, 2, 32, False, False)
    assert not torch.equal(a.codes, b.codes)


def test_per_head_flags_apply_per_head():
    k = randn((2, 4, 32, 64), seed=5)
    rot = torch.tensor([True, False, True, False])
    scl = torch.tensor([True, True, False, False])
    mixed = quantize_keys(k, 2, 32, rot, scl)
    for h in range(4):
        alone = quantize_keys(k[:, h : h + 1] * 1.0, 2, 32, bool(rot[h]), bool(scl[h]))
        if not scl[h]:  # unscaled heads do not depend on the other heads' norms
            assert torch.equal(mixed.codes[:, h], alone.codes[:, 0])
    # the norm is over all heads, whatever the flags
    assert torch.allclose(mixed.norms, k.norm(dim=(1, 3)))


def test_zero_token_norm_counts_as_one():
    k = randn((1, 2, 32, 64), seed=0)
    k[:, :, 7] = 0
    q = quantize_keys(k, 2, 32, True, True)
    assert q.norms[0, 7] == 1.0
    assert torch.isfinite(dequantize_keys(q)).all()


@pytest.mark.parametrize(
    "shape, match",
    [((4, 32, 64), "B, Hkv, T, D"), ((1, 2, 32, 80), "head_dim 80"), ((1, 2, 40, 64), "multiple of group_size")],
)
def test_bad_key_shapes_are_rejected(shape, match):
    with pytest.raises(ValueError, match=match):
        quantize_keys(torch.randn(shape))


def test_bad_inputs_are_rejected():
    with pytest.raises(TypeError, match="float"):
        quantize_values(torch.ones(1, 1, 4, 32, dtype=torch.int64))
    with pytest.raises(ValueError, match="bits"):
        quantize_values(torch.randn(1, 1, 4, 32), bits=3)
    with pytest.raises(ValueError, match="per-head flag"):
        quantize_keys(torch.randn(1, 2, 32, 32), rotate=torch.tensor([True]))
