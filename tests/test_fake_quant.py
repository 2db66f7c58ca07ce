import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from oscar_compile import OScaRConfig, fake_quantize
from testing_utils import bits, float_dtypes, head_dims, randn, seeds

configs = st.builds(
    OScaRConfig,
    bits=bits,
    residual_length=st.sampled_from([32, 64, 128]),
    rotate_keys=st.booleans(),
    rotate_values=st.booleans(),
    token_scaling=st.booleans(),
)


@given(
    batch=st.sampled_from([1, 3]),
    heads=st.sampled_from([1, 2]),
    tokens=st.integers(1, 300),
    d=head_dims,
    dtype=float_dtypes,
    config=configs,
    seed=seeds,
)
def test_shapes_dtypes_and_residual_tail(batch, heads, tokens, d, dtype, config, seed):
    k, v = randn((batch, heads, tokens, d), dtype, seed), randn((batch, heads, tokens, d), dtype, seed + 1)
    kh, vh = fake_quantize(k, v, config)
    assert kh.shape == k.shape and vh.shape == v.shape and kh.dtype == dtype and vh.dtype == dtype
    n = tokens // config.residual_length * config.residual_length
    assert torch.equal(kh[:, :, n:], k[:, :, n:]) and torch.equal(vh[:, :, n:], v[:, :, n:])
    if n:
        assert not torch.equal(kh[:, :, :n], k[:, :, :n])
        # 2-bit relative error of Gaussian data is well below 1 (and 4-bit far below)
        rel = ((kh[:, :, :n].float() - k[:, :, :n].float()).norm() / k[:, :, :n].float().norm()).item()
        assert rel < (0.6 if config.bits == 2 else 0.12)


@given(t1=st.integers(0, 400), extra=st.integers(1, 200), config=configs, seed=seeds)
def test_appending_tokens_never_changes_quantized_blocks(t1, extra, config, seed):
    k, v = randn((1, 2, t1 + extra, 64), seed=seed), randn((1, 2, t1 + extra, 64), seed=seed + 1)
    short_k, short_v = fake_quantize(k[:, :, :t1], v[:, :, :t1], config)
    long_k, long_v = fake_quantize(k, v, config)
    n = t1 // config.residual_length * config.residual_length
    assert torch.equal(short_k[:, :, :n], long_k[:, :, :n]) and torch.equal(short_v[:, :, :n], long_v[:, :, :n])


def test_inputs_are_not_modified_and_batch_items_are_independent():
    k, v = randn((3, 2, 256, 64), seed=0), randn((3, 2, 256, 64), seed=1)
    k0, v0 = k.clone(), v.clone()
    kh, vh = fake_quantize(k, v)
    assert torch.equal(k, k0) and torch.equal(v, v0)
    kh1, vh1 = fake_quantize(k[1:2], v[1:2])
    assert torch.equal(kh[1:2], kh1) and torch.equal(vh[1:2], vh1)


def test_four_bits_are_closer_than_two():
    k, v = randn((1, 2, 256, 64), seed=0), randn((1, 2, 256, 64), seed=1)
    e2 = (fake_quantize(k, v, OScaRConfig(bits=2))[0] - k).norm()
    e4 = (fake_quantize(k, v, OScaRConfig(bits=4))[0] - k).norm()
    assert e4 < 0.3 * e2


def test_bad_input_gets_a_clear_error():
    k = randn((1, 2, 128, 64))
    with pytest.raises(ValueError, match="4-D"):
        fake_quantize(k[0], k[0])
    with pytest.raises(ValueError, match="same shape"):
        fake_quantize(k, k[:, :1])
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        fake_quantize(k.double(), k.double())
    with pytest.raises(ValueError, match="head_dim 80"):
        fake_quantize(randn((1, 1, 128, 80)), randn((1, 1, 128, 80)))
    bad = k.clone()
    bad[0, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        fake_quantize(bad, k)
    big = k.clone()
    big[0, 0, 3, 3] = 1e6
    with pytest.raises(ValueError, match="fp16 range"):
        fake_quantize(k, big)
    # non-finite values in the full-precision tail are passed through, like a bf16 cache would
    tail = randn((1, 2, 130, 64))
    tail[0, 0, 129, 0] = float("inf")
    assert torch.isinf(fake_quantize(tail, tail)[0][0, 0, 129, 0])
