"""Triton cache attention (kernels.cache_attention.cache_attention) against cache_attention_ref.

Caches are filled by the reference append (random lengths per sequence, left padding, per-head key
flags), then queried with and without the step's new keys, with skip, softcap and sliding windows.
Unused cache storage is poisoned (0xFF codes, NaN parameters/residual) so a read outside the valid
range shows as NaN, and the output buffer is allocated over NaN-filled memory so an unwritten element
shows too.

Tolerances: the quantized part dots fp16 operands (query and dequantized keys/values, 11-bit
significands) with fp32 accumulation, everything else is fp32; outputs are rounded to the query dtype.
A score of magnitude |s| thus carries an error of about |s| * 2**-11; with scores up to ~30 that is a
~1% relative change of a softmax weight, which bounds the output error below. The same bound holds for
fp32 queries (they are rounded to fp16 for the tensor-core dot too); bf16 adds its own output rounding.

CPU runs the kernels in the Triton interpreter; ``OSCAR_TEST_CUDA=1`` on a GPU runs the same tests
compiled, at realistic shapes (head_dim 128, 8 kv heads, thousands of tokens).
"""

import os
import sys
from unittest.mock import patch

import pytest
import torch

from hypothesis import given, settings
from hypothesis import strategies as st

from oscar_compile.kernels import CacheFormat, allocate_cache
from oscar_compile.kernels.append_kv import append_kv_ref
from oscar_compile.kernels import new_token_attention
from oscar_compile.kernels.cache_attention import cache_attention, cache_attention_ref, num_kv_splits
from testing_utils import poisoned_cache

ON_GPU = bool(os.environ.get("OSCAR_TEST_CUDA")) and torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
HEADS = (2, 8) if ON_GPU else (1, 2)
GROUPS = (1, 4, 3) if ON_GPU else (1, 2, 3)
DIMS = (64, 96, 128, 256) if ON_GPU else (32, 64, 96)
RESIDUALS = (128,) if ON_GPU else (32, 64)
MAX_STORED = 5000 if ON_GPU else 200
EXAMPLES = 12 if ON_GPU else 30
# |kernel - reference| <= ATOL + RTOL * |reference|, per output dtype
FP16_DOT_TOL = 1e-2
TOLERANCES = {torch.float32: (FP16_DOT_TOL,) * 2, torch.float16: (FP16_DOT_TOL,) * 2, torch.bfloat16: (1.6e-2, 1.6e-2)}


def _randn(shape, seed, dtype, scale=1.0):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype).to(DEVICE)


def filled_cache(fmt, lengths, heads, dim, dtype, rot, scl, seed, max_len=None):
    batch = len(lengths)
    t = max(max(lengths), 1)
    max_len = max_len or (-(-t // fmt.residual_length) + 1) * fmt.residual_length
    cache = poisoned_cache(DEVICE, batch, heads, max_len, dim, fmt, dtype, rot, scl)
    # keys with a per-token magnitude spread (what token scaling is for) and a per-channel offset
    k = _randn((batch, heads, t, dim), seed, torch.float32)
    k = k * (0.2 + 3 * torch.rand(batch, 1, t, 1, generator=torch.Generator().manual_seed(seed + 1))).to(DEVICE)
    k = (k + _randn((1, heads, 1, dim), seed + 2, torch.float32)).to(dtype)
    v = _randn((batch, heads, t, dim), seed + 3, dtype)
    skip = torch.tensor([t - n for n in lengths], dtype=torch.int32, device=DEVICE)
    append_kv_ref(cache, fmt, k, v, skip)
    return cache


def nan_out_memory(shape, dtype):
    """Leave NaN in the allocator's freed block, so an output element the kernel skips stays NaN."""
    torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def assert_attention_close(out, ref):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert not torch.isnan(out).any(), "unwritten (NaN) output elements or NaN from poisoned storage"
    atol, rtol = TOLERANCES[out.dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


@st.composite
def attention_cases(draw):
    heads = draw(st.sampled_from(HEADS))
    batch = draw(st.integers(1, 3))
    tq = draw(st.sampled_from((1, 1, 2, 5, 16, 24)))
    return dict(
        heads=heads,
        group=draw(st.sampled_from(GROUPS)),
        dim=draw(st.sampled_from(DIMS)),
        bits=draw(st.sampled_from((2, 4))),
        r=draw(st.sampled_from(RESIDUALS)),
        rotate_values=draw(st.booleans()),
        dtype=draw(st.sampled_from((torch.float32, torch.float16, torch.bfloat16))),
        lengths=draw(st.lists(st.integers(0, MAX_STORED), min_size=batch, max_size=batch)),
        tq=tq,
        new=draw(st.booleans()),
        skips=draw(st.lists(st.integers(0, tq), min_size=batch, max_size=batch)),
        use_skip=draw(st.booleans()),
        rot=draw(st.lists(st.booleans(), min_size=heads, max_size=heads)),
        scl=draw(st.lists(st.booleans(), min_size=heads, max_size=heads)),
        window=draw(st.sampled_from((None, None, 1, 40, 150))),
        softcap=draw(st.sampled_from((None, None, 5.0, 30.0))),
        scale=draw(st.sampled_from((None, 0.08))),
        seed=draw(st.integers(0, 2**20)),
    )


@settings(max_examples=EXAMPLES)
@given(case=attention_cases())
def test_attention_matches_reference(case):
    fmt = CacheFormat(case["bits"], 32, case["r"], case["rotate_values"])
    h, d, dtype, tq = case["heads"], case["dim"], case["dtype"], case["tq"]
    rot = torch.tensor(case["rot"], device=DEVICE)
    scl = torch.tensor(case["scl"], device=DEVICE)
    cache = filled_cache(fmt, case["lengths"], h, d, dtype, rot, scl, case["seed"])
    b = len(case["lengths"])
    q = _randn((b, h * case["group"], tq, d), case["seed"] + 10, dtype)
    nk = _randn((b, h, tq, d), case["seed"] + 11, dtype) if case["new"] else None
    nv = _randn((b, h, tq, d), case["seed"] + 12, dtype) if case["new"] else None
    skip = torch.tensor(case["skips"], dtype=torch.int32, device=DEVICE) if case["use_skip"] else None
    kw = dict(scale=case["scale"], softcap=case["softcap"], window=case["window"])
    nan_out_memory(q.shape, dtype)
    out = cache_attention(q, cache, fmt, nk, nv, skip, **kw)
    assert_attention_close(out, cache_attention_ref(q, cache, fmt, nk, nv, skip, **kw))


@pytest.mark.parametrize("bits", [2, 4])
def test_decode_gqa_long_context(bits):
    """One decode token, 4 query heads per kv head, several splits, mixed key flags per head."""
    fmt = CacheFormat(bits, 32, 128 if ON_GPU else 32, True)
    lengths = [9000, 3001, 129] if ON_GPU else [300, 97, 33]
    h, d = (8, 128) if ON_GPU else (2, 64)
    rot = torch.tensor([True, False] * (h // 2), device=DEVICE)
    scl = torch.tensor([True, True, False, False] * max(1, h // 4), device=DEVICE)[:h]
    cache = filled_cache(fmt, lengths, h, d, torch.bfloat16, rot, scl, seed=bits)
    q = _randn((3, 4 * h, 1, d), 5, torch.bfloat16)
    nk, nv = _randn((3, h, 1, d), 6, torch.bfloat16), _randn((3, h, 1, d), 7, torch.bfloat16)
    nan_out_memory(q.shape, torch.bfloat16)
    out = cache_attention(q, cache, fmt, nk, nv)
    assert_attention_close(out, cache_attention_ref(q, cache, fmt, nk, nv))


@pytest.mark.parametrize("bits", [2, 4])
def test_decode_partial_tiles_and_small_gqa(bits):
    """Residual block shorter than a kernel tile (the quantized prefix ends inside a tile), one query
    head per kv head and a chunk of 3 query positions (tile rows padded), softcap."""
    fmt = CacheFormat(bits, 32, 64 if ON_GPU else 32, False)
    lengths = [4000, 2111] if ON_GPU else [230, 70]
    h, d = (4, 128) if ON_GPU else (2, 64)
    cache = filled_cache(fmt, lengths, h, d, torch.float16, True, True, seed=11 + bits)
    q = _randn((2, h, 3, d), 12, torch.float16)
    nk, nv = _randn((2, h, 3, d), 13, torch.float16), _randn((2, h, 3, d), 14, torch.float16)
    nan_out_memory(q.shape, torch.float16)
    out = cache_attention(q, cache, fmt, nk, nv, softcap=20.0)
    assert_attention_close(out, cache_attention_ref(q, cache, fmt, nk, nv, softcap=20.0))


@pytest.mark.parametrize("bits", [2, 4])
def test_decode_wide_heads(bits):
    """head_dim 256 (8 value channel groups, 8 warps) with 2 query heads per kv head, bf16."""
    fmt = CacheFormat(bits, 32, 128 if ON_GPU else 32, True)
    lengths = [3000, 700] if ON_GPU else [100, 45]
    h, d = 2, 256
    rot = torch.tensor([True, False], device=DEVICE)
    cache = filled_cache(fmt, lengths, h, d, torch.bfloat16, rot, True, seed=21 + bits)
    q = _randn((2, 2 * h, 1, d), 22, torch.bfloat16)
    nk, nv = _randn((2, h, 1, d), 23, torch.bfloat16), _randn((2, h, 1, d), 24, torch.bfloat16)
    nan_out_memory(q.shape, torch.bfloat16)
    out = cache_attention(q, cache, fmt, nk, nv)
    assert_attention_close(out, cache_attention_ref(q, cache, fmt, nk, nv))


def test_empty_cache_and_padding_rows():
    """Nothing stored: a query sees only the step's tokens; left-padded rows return zeros."""
    fmt = CacheFormat(2, 32, 32, True)
    cache = filled_cache(fmt, [0, 0], 2, 32, torch.float32, True, True, seed=1)
    q = _randn((2, 4, 3, 32), 2, torch.float32)
    nk, nv = _randn((2, 2, 3, 32), 3, torch.float32), _randn((2, 2, 3, 32), 4, torch.float32)
    skip = torch.tensor([3, 1], dtype=torch.int32, device=DEVICE)
    nan_out_memory(q.shape, torch.float32)
    out = cache_attention(q, cache, fmt, nk, nv, skip)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(out[1, :, 0], torch.zeros_like(out[1, :, 0]))
    assert_attention_close(out, cache_attention_ref(q, cache, fmt, nk, nv, skip))


@st.composite
def long_step_cases(draw):
    heads = draw(st.sampled_from(HEADS))
    batch = draw(st.integers(1, 3))
    tq = draw(st.sampled_from((2, 5, 16, 33)))
    return dict(
        heads=heads,
        group=draw(st.sampled_from(GROUPS)),
        dim=draw(st.sampled_from(DIMS)),
        bits=draw(st.sampled_from((2, 4))),
        rotate_values=draw(st.booleans()),
        dtype=draw(st.sampled_from((torch.float16, torch.bfloat16))),
        lengths=draw(st.lists(st.integers(0, MAX_STORED), min_size=batch, max_size=batch)),
        tq=tq,
        skips=draw(st.one_of(st.none(), st.lists(st.integers(0, tq), min_size=batch, max_size=batch))),
        seed=draw(st.integers(0, 2**20)),
    )


@settings(max_examples=EXAMPLES, deadline=None)
@given(case=long_step_cases())
def test_long_steps_flash_route_matches_reference(case):
    """Multi-token steps past DENSE_MIN_QUERIES (lowered here to 2): stored tokens through the kernel
    with their log-sum-exp, the step's own tokens through flash attention, merged; left pads rotated."""
    fmt = CacheFormat(case["bits"], 32, RESIDUALS[0], case["rotate_values"])
    h, d, dtype, tq, b = case["heads"], case["dim"], case["dtype"], case["tq"], len(case["lengths"])
    cache = filled_cache(fmt, case["lengths"], h, d, dtype, True, True, case["seed"])
    q = _randn((b, h * case["group"], tq, d), case["seed"] + 10, dtype)
    nk, nv = _randn((b, h, tq, d), case["seed"] + 11, dtype), _randn((b, h, tq, d), case["seed"] + 12, dtype)
    skip = None if case["skips"] is None else torch.tensor(case["skips"], dtype=torch.int32, device=DEVICE)
    with patch.object(new_token_attention, "DENSE_MIN_QUERIES", 2):
        assert new_token_attention.uses_dense_new_tokens(q, nk, None, None)
        nan_out_memory(q.shape, dtype)
        out = cache_attention(q, cache, fmt, nk, nv, skip)
    assert_attention_close(out, cache_attention_ref(q, cache, fmt, nk, nv, skip))


def test_stored_empty_promise_skips_the_stored_pass():
    """On an empty cache the promise gives the reference result (flash attention over the step alone)."""
    fmt = CacheFormat(2, 32, RESIDUALS[0], True)
    h, d = (2, 128) if ON_GPU else (1, 32)
    cache = filled_cache(fmt, [0, 0], h, d, torch.bfloat16, True, True, seed=41)
    q = _randn((2, 4 * h, 6, d), 42, torch.bfloat16)
    nk, nv = _randn((2, h, 6, d), 43, torch.bfloat16), _randn((2, h, 6, d), 44, torch.bfloat16)
    skip = torch.tensor([0, 2], dtype=torch.int32, device=DEVICE)
    with patch.object(new_token_attention, "DENSE_MIN_QUERIES", 2):
        out = cache_attention(q, cache, fmt, nk, nv, skip, stored_empty=True)
    assert_attention_close(out, cache_attention_ref(q, cache, fmt, nk, nv, skip))


def test_flash_route_rule():
    """Which steps take the flash route: long, fp16/bf16, no softcap, no sliding window."""
    n = new_token_attention.DENSE_MIN_QUERIES
    q, k = torch.zeros(1, 2, n, 32, dtype=torch.bfloat16), torch.zeros(1, 1, n, 32, dtype=torch.bfloat16)
    assert new_token_attention.uses_dense_new_tokens(q, k, None, None)
    assert not new_token_attention.uses_dense_new_tokens(q[:, :, 1:], k[:, :, 1:], None, None)
    assert not new_token_attention.uses_dense_new_tokens(q, None, None, None)
    assert not new_token_attention.uses_dense_new_tokens(q, k, 30.0, None)
    assert not new_token_attention.uses_dense_new_tokens(q, k, None, 4096)
    assert not new_token_attention.uses_dense_new_tokens(q.float(), k.float(), None, None)


def test_merge_attention_is_attention_over_the_union():
    """Two disjoint token sets merged by log-sum-exp equal one softmax over both; empty sides drop out."""
    g = torch.Generator().manual_seed(0)
    scores, values = torch.randn(3, 5, 11, generator=g), torch.randn(3, 11, 8, generator=g)
    scores[0, :, 4:] = float("-inf")  # one side empty for this row block
    full = torch.softmax(scores, -1) @ values
    parts = []
    for sl in (slice(0, 4), slice(4, 11)):
        sc = scores[..., sl]
        lse = torch.logsumexp(sc, -1)
        out = (torch.softmax(sc, -1) @ values[:, sl]).nan_to_num(0.0)
        parts += [out, lse]
    torch.testing.assert_close(new_token_attention.merge_attention(*parts), full, atol=1e-5, rtol=1e-5)
    empty = torch.full((2, 3), float("-inf"))
    zeros = torch.zeros(2, 3, 4)
    assert torch.equal(new_token_attention.merge_attention(zeros, empty, zeros, empty), zeros)


@pytest.mark.parametrize("dense", [False, True])
def test_query_slices(dense):
    """Steps longer than one launch's scratch run as several query slices (MAX_SCRATCH_ROWS lowered):
    same result as the reference, on the kernel route (window, softcap) and the flash route."""
    fmt = CacheFormat(2, 32, RESIDUALS[0], True)
    h, d = (2, 128) if ON_GPU else (1, 32)
    cache = filled_cache(fmt, [150, 40], h, d, torch.bfloat16, True, False, seed=31)
    q = _randn((2, 3 * h, 9, d), 32, torch.bfloat16)
    nk, nv = _randn((2, h, 9, d), 33, torch.bfloat16), _randn((2, h, 9, d), 34, torch.bfloat16)
    skip = torch.tensor([0, 4], dtype=torch.int32, device=DEVICE)
    kw = {} if dense else dict(window=60, softcap=25.0)
    launcher_module = sys.modules["oscar_compile.kernels.cache_attention"]  # (the package exports the function)
    with patch.object(launcher_module, "MAX_SCRATCH_ROWS", 2 * 3 * h * 2), \
            patch.object(new_token_attention, "DENSE_MIN_QUERIES", 2 if dense else 10**6):  # fmt: skip
        nan_out_memory(q.shape, torch.bfloat16)
        out = cache_attention(q, cache, fmt, nk, nv, skip, **kw)
    assert_attention_close(out, cache_attention_ref(q, cache, fmt, nk, nv, skip, **kw))


def test_num_kv_splits_is_pure_and_bounded():
    assert num_kv_splits(1, 8, 1, 131072, 132, 128) == num_kv_splits(1, 8, 1, 131072, 132, 128)
    for args in [(1, 8, 1, 131072, 132, 128), (32, 8, 1, 4096, 132, 128), (4, 3, 2, 256, 4, 64)]:
        s = num_kv_splits(*args)
        assert 1 <= s <= 64
        assert s <= max(1, args[3] // (4 * args[5]))
    assert num_kv_splits(1, 8, 1, 131072, 132, 128) > num_kv_splits(32, 8, 1, 131072, 132, 128)


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 64), kv_heads=st.integers(1, 16), blocks=st.integers(1, 2048), sms=st.sampled_from([4, 78, 132]),
       d_pad=st.sampled_from([32, 64, 128, 256]))  # fmt: skip
def test_split_launch_config_rule(batch, kv_heads, blocks, sms, d_pad):
    from oscar_compile.kernels.cache_attention import TUNING, split_launch_config

    max_len = blocks * 128
    splits, cfg = split_launch_config(batch, kv_heads, 1, max_len, sms, 128, d_pad)
    assert (splits, cfg) == split_launch_config(batch, kv_heads, 1, max_len, sms, 128, d_pad)  # pure
    assert 1 <= splits <= 64
    # the rule: 4-warp settings, unless their splits would each stream >= long_tiles tiles at a full cache
    short = num_kv_splits(batch, kv_heads, 1, max_len, sms, 128, TUNING["programs_per_sm"], TUNING["min_tiles"])
    want = {k: TUNING[k] for k in ("num_warps", "num_stages", "maxnreg", "programs_per_sm")}
    if -(-blocks // short) >= TUNING["long_tiles"]:
        want.update(TUNING["long"])
    assert splits == num_kv_splits(batch, kv_heads, 1, max_len, sms, 128, want["programs_per_sm"], TUNING["min_tiles"])
    assert cfg["num_warps"] == (8 if d_pad > 128 else want["num_warps"])
    assert cfg["num_stages"] == want["num_stages"]
    assert cfg["maxnreg"] == (want["maxnreg"] if d_pad == 128 else 0)


def test_validation_errors():
    fmt = CacheFormat(2, 32, 32, True)
    cache = filled_cache(fmt, [5], 1, 32, torch.float32, True, True, seed=0)
    q = torch.zeros(1, 2, 1, 32, device=DEVICE)
    with pytest.raises(ValueError, match="softcap"):
        cache_attention(q, cache, fmt, softcap=-1.0)
    with pytest.raises(ValueError, match="window"):
        cache_attention(q, cache, fmt, window=0)
    with pytest.raises(ValueError, match="both"):
        cache_attention(q, cache, fmt, torch.zeros(1, 1, 1, 32, device=DEVICE), None)
    odd = CacheFormat(2, 32, 32, True)
    with pytest.raises(ValueError, match="head_dim 160"):  # refused when the cache is built (CUDA) or used
        c160 = allocate_cache(1, 1, 32, 160, odd, torch.float32, DEVICE)
        cache_attention(torch.zeros(1, 1, 1, 160, device=DEVICE), c160, odd)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graph capture needs the GPU (run with OSCAR_TEST_CUDA=1)")
def test_decode_attention_cuda_graph_capturable():
    fmt = CacheFormat(2, 32, 128, True)
    cache = filled_cache(fmt, [4000, 700], 8, 128, torch.bfloat16, True, True, seed=3, max_len=8192)
    for t in cache[:9]:  # lengths will move: make every slot hold finite data
        if t.is_floating_point():
            t.nan_to_num_(0.5)
    q = _randn((2, 32, 1, 128), 4, torch.bfloat16)
    nk, nv = _randn((2, 8, 1, 128), 5, torch.bfloat16), _randn((2, 8, 1, 128), 6, torch.bfloat16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        cache_attention(q, cache, fmt, nk, nv)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cache_attention(q, cache, fmt, nk, nv)
    for step in range(3):
        cache.lengths.add_(37)  # lengths change between replays: read on the device
        q.copy_(_randn(q.shape, 40 + step, torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        assert_attention_close(out.clone(), cache_attention_ref(q, cache, fmt, nk, nv))
