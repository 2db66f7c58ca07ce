"""kernels.cpu_attention.cache_attention_cpu (the CPU decode/prefill step's attention) against cache_attention_ref."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from oscar_compile.kernels import CacheFormat, allocate_cache, append_kv_ref, cache_attention_ref
from oscar_compile.kernels import cpu_attention
from oscar_compile.kernels.cpu_attention import cache_attention_cpu
from testing_utils import bits, randn, seeds


@given(
    b=bits,
    seed=seeds,
    kv_heads=st.integers(1, 3),
    group=st.integers(1, 3),
    head_dim=st.sampled_from((32, 64, 96)),
    residual=st.sampled_from((32, 64)),
    stored=st.lists(st.integers(0, 300), min_size=1, max_size=2),  # partial residual blocks, empty caches
    t_new=st.integers(0, 5),  # 0: no new keys/values
    data=st.data(),
    rot_v=st.booleans(),
    dtype=st.sampled_from((torch.float32, torch.bfloat16)),
    chunk_blocks=st.integers(1, 3),  # quantized blocks per chunk: several chunks per sequence
)
def test_matches_reference(b, seed, kv_heads, group, head_dim, residual, stored, t_new, data, rot_v, dtype, chunk_blocks):
    bsz, d = len(stored), head_dim
    fmt = CacheFormat(b, 32, residual, rot_v)
    rot_k = torch.tensor(data.draw(st.lists(st.booleans(), min_size=kv_heads, max_size=kv_heads)))
    scl = torch.tensor(data.draw(st.lists(st.booleans(), min_size=kv_heads, max_size=kv_heads)))
    cache = allocate_cache(bsz, kv_heads, 384, d, fmt, dtype, rotate_keys=rot_k, token_scaling=scl)
    t = max(stored)
    append_kv_ref(cache, fmt, randn((bsz, kv_heads, t, d), dtype, seed), randn((bsz, kv_heads, t, d), dtype, seed + 1),
                  torch.tensor([t - n for n in stored], dtype=torch.int32))  # fmt: skip
    tq = max(t_new, 1)
    q = randn((bsz, kv_heads * group, tq, d), dtype, seed + 2)
    new = skip = None
    if t_new:
        new = randn((bsz, kv_heads, tq, d), dtype, seed + 3), randn((bsz, kv_heads, tq, d), dtype, seed + 4)
        skip = torch.tensor(data.draw(st.lists(st.integers(0, tq), min_size=bsz, max_size=bsz)), dtype=torch.int32)
    kw = dict(
        scale=data.draw(st.sampled_from((None, 0.3))),
        softcap=data.draw(st.sampled_from((None, 4.0))),
        window=data.draw(st.sampled_from((None, 1, 40))),
    )
    chunk = cpu_attention.CHUNK_ELEMENTS
    cpu_attention.CHUNK_ELEMENTS = chunk_blocks * residual * kv_heads * d
    try:
        got = cache_attention_cpu(q, cache, fmt, *(new or (None, None)), skip, **kw)
    finally:
        cpu_attention.CHUNK_ELEMENTS = chunk
    want = cache_attention_ref(q, cache, fmt, *(new or (None, None)), skip, **kw)
    assert got.dtype == dtype and got.shape == q.shape and got.is_contiguous()
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # same fp32 terms, summed in another order; bf16 output rounding
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_long_context_is_one_chunk_per_4k_tokens_of_smollm2():
    # chunks are whole residual blocks; SmolLM2-135M's layer (3 kv heads x 64 channels) dequantizes 4K tokens at once
    assert cpu_attention._chunk_tokens(3, 64, 128) == 5376
    assert cpu_attention._chunk_tokens(8, 128, 128) == 1024
    assert cpu_attention._chunk_tokens(64, 256, 128) == 128  # never less than one block


def test_rejects_what_the_reference_rejects():
    fmt = CacheFormat()
    cache = allocate_cache(1, 2, 128, 64, fmt, torch.float32)
    with pytest.raises(ValueError, match="query heads"):
        cache_attention_cpu(torch.zeros(1, 3, 1, 64), cache, fmt)
