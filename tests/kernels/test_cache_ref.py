"""The reference cache (append_kv_ref + cache_attention_ref) against the fake_quantize oracle."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from oscar_compile import OScaRConfig, fake_quantize
from oscar_compile.kernels import CacheFormat, allocate_cache, append_kv_ref, cache_attention_ref, cache_nbytes
from testing_utils import bits, randn, seeds

R = 32  # small residual window keeps shapes small


def oracle(q, hist_k, hist_v, new_k, new_v, config):
    """Step rule: queries see fake_quantize(history) then the step's own tokens at full precision (causal)."""
    kh, vh = fake_quantize(hist_k, hist_v, config)
    keys, values = torch.cat([kh, new_k], 2), torch.cat([vh, new_v], 2)
    tq, total = q.shape[2], keys.shape[2]
    mask = torch.ones(tq, total, dtype=torch.bool).tril(total - tq)
    return F.scaled_dot_product_attention(q.float(), keys.float(), values.float(), attn_mask=mask, enable_gqa=True)


@given(
    chunks=st.lists(st.sampled_from([1, 1, 3, 31, 32, 33, 70]), min_size=1, max_size=5),
    b=bits,
    seed=seeds,
    rot_k=st.booleans(),
    rot_v=st.booleans(),
    scl=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_steps_match_fake_quantize_oracle(chunks, b, seed, rot_k, rot_v, scl, dtype):
    bsz, h, g, d = 2, 2, 2, 64
    config = OScaRConfig(bits=b, residual_length=R, rotate_keys=rot_k, rotate_values=rot_v, token_scaling=scl)
    fmt = CacheFormat(b, 32, R, rot_v)
    cache = allocate_cache(bsz, h, 256, d, fmt, dtype, rotate_keys=rot_k, token_scaling=scl)
    hist_k = torch.zeros(bsz, h, 0, d, dtype=dtype)
    hist_v = torch.zeros(bsz, h, 0, d, dtype=dtype)
    for i, tn in enumerate(chunks):
        q = randn((bsz, h * g, tn, d), dtype, seed + 3 * i)
        nk, nv = randn((bsz, h, tn, d), dtype, seed + 3 * i + 1), randn((bsz, h, tn, d), dtype, seed + 3 * i + 2)
        out = cache_attention_ref(q, cache, fmt, nk, nv)
        ref = oracle(q, hist_k, hist_v, nk, nv, config)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
        append_kv_ref(cache, fmt, nk, nv)
        hist_k, hist_v = torch.cat([hist_k, nk], 2), torch.cat([hist_v, nv], 2)
        assert cache.lengths.tolist() == [hist_k.shape[2]] * bsz


@given(seed=seeds, split=st.integers(1, 95))
def test_appending_never_requantizes_old_blocks(seed, split):
    fmt = CacheFormat(2, 32, R, True)
    k, v = randn((1, 2, 96, 64), seed=seed), randn((1, 2, 96, 64), seed=seed + 1)
    once = allocate_cache(1, 2, 128, 64, fmt, torch.float32)
    append_kv_ref(once, fmt, k, v)
    twice = allocate_cache(1, 2, 128, 64, fmt, torch.float32)
    append_kv_ref(twice, fmt, k[:, :, :split], v[:, :, :split])
    before = [t.clone() for t in twice]
    append_kv_ref(twice, fmt, k[:, :, split:], v[:, :, split:])
    for name in once._fields:
        a, b_ = getattr(once, name), getattr(twice, name)
        if name.startswith("residual"):  # slots past lengths % R hold stale data by design
            a, b_ = a[:, :, : 96 % R], b_[:, :, : 96 % R]
        assert torch.equal(a, b_), name
    # blocks complete before the second append are bit-identical afterwards
    done = split // R * R
    assert torch.equal(twice.value_codes[:, :, :done], before[4][:, :, :done])
    assert torch.equal(twice.key_codes[:, :, : done // 4], before[0][:, :, : done // 4])


def test_left_padding_is_skipped_and_each_sequence_matches_alone():
    fmt = CacheFormat(2, 32, R, True)
    k, v, q = randn((2, 2, 50, 64), seed=0), randn((2, 2, 50, 64), seed=1), randn((2, 4, 50, 64), seed=2)
    skip = torch.tensor([0, 13], dtype=torch.int32)
    batch = allocate_cache(2, 2, 128, 64, fmt, torch.float32)
    out = cache_attention_ref(q, batch, fmt, k, v, skip)
    append_kv_ref(batch, fmt, k, v, skip)
    assert batch.lengths.tolist() == [50, 37]
    assert (out[1, :, :13] == 0).all()
    for b, s in enumerate(skip.tolist()):
        alone = allocate_cache(1, 2, 128, 64, fmt, torch.float32)
        ref = cache_attention_ref(q[b : b + 1, :, s:], alone, fmt, k[b : b + 1, :, s:], v[b : b + 1, :, s:])
        torch.testing.assert_close(out[b : b + 1, :, s:], ref)
        append_kv_ref(alone, fmt, k[b : b + 1, :, s:], v[b : b + 1, :, s:])
        n = 50 - s
        assert torch.equal(alone.value_codes[0, :, :n], batch.value_codes[b, :, :n])
        assert torch.equal(alone.residual_keys[0, :, : n % R], batch.residual_keys[b, :, : n % R])


def test_sliding_window_limits_visible_positions():
    fmt = CacheFormat(2, 32, R, True)
    cache = allocate_cache(1, 1, 128, 64, fmt, torch.float32)
    k, v = randn((1, 1, 40, 64), seed=0), randn((1, 1, 40, 64), seed=1)
    append_kv_ref(cache, fmt, k, v)
    q, nk, nv = randn((1, 1, 1, 64), seed=2), randn((1, 1, 1, 64), seed=3), randn((1, 1, 1, 64), seed=4)
    out = cache_attention_ref(q, cache, fmt, nk, nv, window=8)
    # the window (7 residual tokens + the new one) is all full precision: plain attention over it
    ref = F.scaled_dot_product_attention(q, torch.cat([k[:, :, -7:], nk], 2), torch.cat([v[:, :, -7:], nv], 2))
    torch.testing.assert_close(out, ref)


def test_overflow_is_an_error_and_writes_nothing():
    fmt = CacheFormat(2, 32, R, True)
    cache = allocate_cache(2, 1, 64, 64, fmt, torch.float32)
    append_kv_ref(cache, fmt, randn((2, 1, 60, 64)), randn((2, 1, 60, 64)))
    before = [t.clone() for t in cache]
    with pytest.raises(ValueError, match="cache overflow"):
        append_kv_ref(cache, fmt, randn((2, 1, 5, 64)), randn((2, 1, 5, 64)))
    assert all(torch.equal(a, b) for a, b in zip(before, cache))


def test_shape_and_device_errors():
    fmt = CacheFormat(2, 32, R, True)
    cache = allocate_cache(2, 2, 64, 64, fmt, torch.float32)
    with pytest.raises(ValueError, match="do not match the cache"):
        append_kv_ref(cache, fmt, randn((2, 3, 1, 64)), randn((2, 3, 1, 64)))
    with pytest.raises(ValueError, match="B, Hkv, T_new, D"):
        append_kv_ref(cache, fmt, randn((2, 2, 1, 64)), randn((2, 2, 2, 64)))
    with pytest.raises(ValueError, match="not a multiple of the cache's kv heads"):
        cache_attention_ref(randn((2, 3, 1, 64)), cache, fmt)
    with pytest.raises(ValueError, match="must be"):
        cache_attention_ref(randn((2, 4, 1, 64)), cache, fmt, randn((2, 2, 2, 64)), randn((2, 2, 2, 64)))
    with pytest.raises(ValueError, match="max_len"):
        allocate_cache(1, 1, 100, 64, fmt, torch.float32)
    with pytest.raises(ValueError, match="head_dim 80"):
        allocate_cache(1, 1, 64, 80, fmt, torch.float32)


@pytest.mark.parametrize("b", [2, 4])
def test_cache_bytes_match_the_documented_bits_per_element(b):
    fmt = CacheFormat(b, 32, 128, True)
    bsz, h, t, d = 1, 8, 4096, 128
    cache = allocate_cache(bsz, h, t, d, fmt, torch.bfloat16)
    elements = bsz * h * t * d
    residual = 2 * bsz * h * 128 * d * 2
    per_element_bits = (cache_nbytes(cache) - residual) * 8 / (2 * elements)
    # b bits + 2 fp16 per 32 elements (= 1 bit) + fp32 norm per token shared by h*d elements
    expected = b + 1 + 32 / (2 * h * d)
    assert abs(per_element_bits - expected) < 1e-3
