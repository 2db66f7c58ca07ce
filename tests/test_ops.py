"""The oscar:: ops: opcheck, equality with the references, and compile."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from oscar_compile import ops
from oscar_compile.kernels import CacheFormat, allocate_cache, append_kv_ref, cache_attention_ref
from testing_utils import randn

FMT = CacheFormat(bits=2, group_size=32, residual_length=32, rotate_values=True)


def _filled_cache(fmt, lengths, batch=2, kv_heads=2, head_dim=64, max_len=128, dtype=torch.float32, seed=0):
    cache = allocate_cache(batch, kv_heads, max_len, head_dim, fmt, dtype)
    t = max(lengths)
    k = randn((batch, kv_heads, t, head_dim), dtype, seed)
    v = randn((batch, kv_heads, t, head_dim), dtype, seed + 1)
    skip = torch.tensor([t - n for n in lengths], dtype=torch.int32)
    append_kv_ref(cache, fmt, k, v, skip)
    return cache


def _clone(cache):
    return type(cache)(*(t.clone() for t in cache))


def test_schemas():
    append = torch.ops.oscar.append_kv.default._schema
    mutable = [a.name for a in append.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert tuple(mutable) == ops.APPEND_MUTATES
    attn = torch.ops.oscar.attention.default._schema
    assert not any(a.alias_info is not None and a.alias_info.is_write for a in attn.arguments)
    assert [a.name for a in attn.arguments[-3:]] == ["scale", "softcap", "window"]


def test_opcheck_append_kv():
    cache = _filled_cache(FMT, [20, 45])
    k, v = randn((2, 2, 40, 64), seed=3), randn((2, 2, 40, 64), seed=4)
    skip = torch.tensor([0, 7], dtype=torch.int32)
    torch.library.opcheck(torch.ops.oscar.append_kv.default, (*cache, k, v, skip, 2, 32, 32, True))
    torch.library.opcheck(torch.ops.oscar.append_kv.default, (*cache, k, v, None, 2, 32, 32, True))


@pytest.mark.parametrize("new", [True, False])
def test_opcheck_attention(new):
    cache = _filled_cache(FMT, [33, 70])
    q = randn((2, 4, 3, 64), seed=5)
    nk = randn((2, 2, 3, 64), seed=6) if new else None
    nv = randn((2, 2, 3, 64), seed=7) if new else None
    skip = torch.tensor([1, 0], dtype=torch.int32) if new else None
    for softcap, window in ((None, None), (20.0, 16)):
        args = (q, *cache, nk, nv, skip, 2, 32, 32, True, 0.125, softcap, window)
        torch.library.opcheck(torch.ops.oscar.attention.default, args)


@settings(max_examples=8)
@given(
    lengths=st.lists(st.integers(0, 70), min_size=2, max_size=2),
    t_new=st.integers(1, 40),
    bits=st.sampled_from((2, 4)),
    dtype=st.sampled_from((torch.float32, torch.bfloat16)),
    seed=st.integers(0, 1000),
)
def test_wrappers_match_references(lengths, t_new, bits, dtype, seed):
    fmt = FMT._replace(bits=bits)
    cache = _filled_cache(fmt, lengths, dtype=dtype, seed=seed)
    ref = _clone(cache)
    q = randn((2, 4, t_new, 64), dtype, seed + 2)
    k, v = randn((2, 2, t_new, 64), dtype, seed + 3), randn((2, 2, t_new, 64), dtype, seed + 4)
    skip = torch.tensor([0, t_new // 2], dtype=torch.int32)
    out = ops.attention(q, cache, fmt, k, v, skip, window=24)
    assert out.is_contiguous() and out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out, cache_attention_ref(q, ref, fmt, k, v, skip, window=24), rtol=0, atol=0)
    ops.append_kv(cache, fmt, k, v, skip)
    append_kv_ref(ref, fmt, k, v, skip)
    for a, b in zip(cache, ref):
        assert torch.equal(a, b)


def test_compiled_step_matches_eager():
    torch._dynamo.reset()
    cache, ref = allocate_cache(2, 2, 128, 64, FMT, torch.float32), allocate_cache(2, 2, 128, 64, FMT, torch.float32)

    def step(q, k, v, c):
        out = ops.attention(q, c, FMT, k, v)
        ops.append_kv(c, FMT, k, v)
        return out * 2

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    for i, t in enumerate((40, 1, 1, 30)):
        q = randn((2, 4, t, 64), seed=10 * i)
        k, v = randn((2, 2, t, 64), seed=10 * i + 1), randn((2, 2, t, 64), seed=10 * i + 2)
        torch.testing.assert_close(compiled(q, k, v, cache), step(q, k, v, ref), rtol=0, atol=0)
        for a, b in zip(cache, ref):
            assert torch.equal(a, b)
    assert cache.lengths.tolist() == [72, 72]


def test_overflow_raises():
    cache = _filled_cache(FMT, [120, 10])
    k = randn((2, 2, 9, 64))
    with pytest.raises(ValueError, match="overflow"):
        ops.append_kv(cache, FMT, k, k)


def test_attend_append_is_attention_then_append():
    cache = _filled_cache(FMT, [33, 70])
    ref = _clone(cache)
    q = randn((2, 4, 3, 64), seed=5)
    k, v = randn((2, 2, 3, 64), seed=6), randn((2, 2, 3, 64), seed=7)
    skip = torch.tensor([1, 0], dtype=torch.int32)
    torch.library.opcheck(torch.ops.oscar.attend_append.default, (q, *cache, k, v, skip, 2, 32, 32, True, 0.125, 20.0, 16))
    out = ops.attend_append(q, cache, FMT, k, v, skip, softcap=20.0, window=16)
    want = cache_attention_ref(q, ref, FMT, k, v, skip, softcap=20.0, window=16)
    append_kv_ref(ref, FMT, k, v, skip)
    assert torch.equal(out, want)
    for a, b in zip(cache, ref):
        assert torch.equal(a, b)


def test_compiled_attend_append_is_reinplaced():
    # attention and append as two ops: Inductor's reorder_for_locality sinks the (pure) attention below the
    # append, so the append's cache arguments are cloned and copied back every step; the fused op is not
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    cache = allocate_cache(1, 2, 128, 64, FMT, torch.float32)

    def step(q, k, v, *c):
        return ops.attend_append(q, type(cache)(*c), FMT, k, v) + 1

    q, k = randn((1, 4, 1, 64)), randn((1, 2, 1, 64), seed=1)
    _, code = run_and_get_code(torch.compile(step, fullgraph=True), q, k, k, *cache)
    code = "\n".join(code)
    assert "torch.ops.oscar.attend_append.default(arg" in code.replace("reinterpret_tensor(", "")
    assert "copy_" not in code and "clone" not in code


def test_sdpa_plain_tensors_matches_torch_and_opcheck():
    q, k, v = randn((2, 4, 5, 64)), randn((2, 2, 9, 64), seed=1), randn((2, 2, 9, 64), seed=2)
    mask = torch.rand(2, 1, 5, 9, generator=torch.Generator().manual_seed(3)) > 0.3
    mask[..., 0] = True
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(ops.sdpa(q, k, v, mask), want, rtol=0, atol=1e-5)
    causal = F.scaled_dot_product_attention(q, k[:, :, :5], v[:, :, :5], is_causal=True, enable_gqa=True)
    torch.testing.assert_close(ops.sdpa(q, k[:, :, :5], v[:, :, :5], is_causal=True), causal, rtol=0, atol=1e-5)
    capped = ops.sdpa(q * 10, k, v, softcap=2.0)
    scores = torch.tanh((q * 10).reshape(2, 2, 2, 5, 64) @ k[:, :, None].transpose(-1, -2) / 8 / 2.0) * 2.0
    want_capped = (scores.softmax(-1) @ v[:, :, None]).reshape(2, 4, 5, 64)
    torch.testing.assert_close(capped, want_capped, rtol=0, atol=1e-5)
    torch.library.opcheck(torch.ops.oscar.sdpa.default, (q, k, v, mask, 0.125, 3.0, False))


def test_left_pads_from_masks():
    # bool mask [B, 1, T, K] for a chunk at positions 4..7: row 1 has 2 left pads, row 0 none;
    # a sliding window (3) must not be mistaken for padding
    t, k_len = 4, 16
    pos = torch.arange(4, 8)
    q_pos, k_pos = pos[:, None], torch.arange(k_len)[None, :]
    base = (k_pos <= q_pos) & (k_pos > q_pos - 3)
    pads = torch.tensor([0, 6])
    mask = (base[None] & (k_pos[None] >= pads[:, None, None]))[:, None]
    assert ops.left_pads(mask, pos, 2).tolist() == [0, 2]
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    assert ops.left_pads(additive, pos, 2).tolist() == [0, 2]
    assert ops.left_pads(mask[:1], pos, 3).tolist() == [0, 0, 0]  # a batch-1 mask broadcasts
    torch.library.opcheck(torch.ops.oscar.left_pads.default, (mask, pos, 2))


def test_choose_key_flags_op_and_refresh():
    from oscar_compile.kernels import choose_key_flags

    k, q = randn((2, 2, 70, 64), seed=3, scale=2.0), randn((2, 4, 70, 64), seed=4)
    k[:, 1, :, 7] *= 30  # head 1: an outlier channel
    skip = torch.tensor([0, 6], dtype=torch.int32)
    torch.library.opcheck(torch.ops.oscar.choose_key_flags.default, (k, q, skip, 2, 32, None, True))
    # no pads: exactly choose_key_flags; fixed settings restrict the candidates
    assert all(torch.equal(a, b) for a, b in zip(ops.choose_key_flags(k, q, None, 2, 32), choose_key_flags(k, 2, 32, q)))
    rot, scl = ops.choose_key_flags(k, q, None, 2, 32, rotate=True, scale=False)
    assert rot.all() and not scl.any()
    # left pads are moved out of the way: 6 pads in a 70-token chunk leave 64 real keys (two whole groups)
    # and 64 real queries last, so the choice is exactly that on the real tokens alone
    got = ops.choose_key_flags(k[1:], q[1:], skip[1:], 2, 32, "auto", True)
    want = choose_key_flags(k[1:, :, 6:], 2, 32, queries=q[1:, :, 6:], rotate="auto", scale=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # refresh writes only while the layer holds no token
    flags = [torch.zeros(2, dtype=torch.bool), torch.ones(2, dtype=torch.bool)]
    ops.refresh_key_flags(*flags, torch.tensor([0, 5], dtype=torch.int32), torch.tensor([True, True]), False)
    assert flags[0].tolist() == [False, False] and flags[1].tolist() == [True, True]
    ops.refresh_key_flags(*flags, torch.zeros(2, dtype=torch.int32), torch.tensor([True, False]), False)
    assert flags[0].tolist() == [True, False] and flags[1].tolist() == [False, False]


@pytest.mark.parametrize("stored", [0, 5])
def test_refresh_key_flags_writes_only_while_the_layer_is_empty(stored):
    rotated, scaled = torch.tensor([False, True]), torch.tensor([True, True])
    lengths = torch.tensor([0, stored], dtype=torch.int32)
    new_r, new_s = torch.tensor([True, False]), torch.tensor([False, True])
    torch.library.opcheck(torch.ops.oscar.refresh_key_flags.default, (rotated.clone(), scaled.clone(), lengths, new_r, new_s))
    ops.refresh_key_flags(rotated, scaled, lengths, new_r, new_s)
    want = (new_r, new_s) if stored == 0 else (torch.tensor([False, True]), torch.tensor([True, True]))
    assert torch.equal(rotated, want[0]) and torch.equal(scaled, want[1])
    ops.refresh_key_flags(rotated, scaled, lengths, False, True)  # bools: every head alike
    if stored == 0:
        assert torch.equal(rotated, torch.tensor([False, False])) and torch.equal(scaled, torch.tensor([True, True]))


@settings(max_examples=6, deadline=None)
@given(t=st.integers(64, 90), group=st.sampled_from([1, 3]), pads=st.integers(0, 5), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_cpu_prefill_on_an_empty_cache_equals_the_reference(t, group, pads, dtype):
    # a long first step (stored_empty) on CPU attends with PyTorch's SDPA: same output, same stored state
    fmt = CacheFormat(2, 32, 32, True)
    q = randn((2, 2 * group, t, 32), dtype, seed=0)
    k, v = randn((2, 2, t, 32), dtype, seed=1), randn((2, 2, t, 32), dtype, seed=2)
    skip = torch.tensor([0, pads], dtype=torch.int32)
    fast, ref = allocate_cache(2, 2, 128, 32, fmt, dtype), allocate_cache(2, 2, 128, 32, fmt, dtype)
    out = ops.attend_append(q, fast, fmt, k, v, skip, stored_empty=True)
    want = cache_attention_ref(q, ref, fmt, k, v, skip)
    append_kv_ref(ref, fmt, k, v, skip)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, want, atol=tol, rtol=tol)
    for a, b in zip(fast, ref):
        assert torch.equal(a, b)
