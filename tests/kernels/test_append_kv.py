"""Triton quantize-on-write (kernels.append_kv.append_kv) against the reference append_kv_ref.

Storage must be bit-identical: codes, fp16 (mn, scale), norms, residual, lengths. Both caches start
poisoned (0xFF codes, NaN parameters/norms/residual) so an element the kernel forgets to write shows.

Why two input families: the omni-token norm is a sum of Hkv * D squares; the kernel and torch add
them in different orders, and torch's CPU sqrt is not correctly rounded, so for arbitrary inputs a norm
can differ in the last ulp (and so may a code of a token-scaled head, by one level at a rounding tie).
``exact_norm_keys`` draws keys whose sums of squares are exact and perfect squares: then every step is
exactly defined and everything, norms included, must match bit for bit. Arbitrary Gaussian inputs are
checked bit-exact on every field that does not depend on the norm, and norms to a few ulps.

CPU runs the kernels in the Triton interpreter (tests/conftest.py); with ``OSCAR_TEST_CUDA=1`` on a
GPU the same tests run compiled, at larger shapes.
"""

import math
import os

import numpy as np
import pytest
import torch

from hypothesis import given, settings
from hypothesis import strategies as st

from oscar_compile.kernels import CacheFormat, allocate_cache
from oscar_compile.kernels.append_kv import append_kv, append_kv_ref, check_overflow, overflowed
from testing_utils import poisoned_cache

ON_GPU = bool(os.environ.get("OSCAR_TEST_CUDA")) and torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
# realistic shapes on the GPU, interpreter-sized shapes on CPU
HEADS = (1, 2, 4, 8) if ON_GPU else (1, 2, 3)
DIMS = (64, 96, 128, 256) if ON_GPU else (32, 64, 96)
RESIDUALS = (128,) if ON_GPU else (32, 64)
MAX_T = 700 if ON_GPU else 90
EXAMPLES = 10 if ON_GPU else 25
NORM_RTOL = 1e-6  # a few fp32 ulps: different summation order / sqrt rounding of the same sum


def _bits_view(t: torch.Tensor) -> torch.Tensor:
    """Integer view for bitwise comparison (NaN poison compares equal to itself)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.view(ints[t.element_size()]) if t.is_floating_point() else t


def clone_cache(cache):
    return type(cache)(*(t.clone() for t in cache))


def exact_norm_keys(batch, heads, t, dim, seed):
    """Keys k = n / 16 with integer n, |n| <= 6 except 4 entries per token chosen so that
    sum(n**2) over (heads, dim) is a perfect square: the norm is exact in fp32 in any order."""
    rng = np.random.default_rng(seed)
    n = rng.integers(-6, 7, size=(batch, t, heads * dim))
    squares = {}
    for a in range(18):
        for b in range(a, 18):
            for c in range(b, 18):
                for e in range(c, 18):
                    squares.setdefault(a * a + b * b + c * c + e * e, (a, b, c, e))
    for bi in range(batch):
        for ti in range(t):
            pos = rng.choice(heads * dim, size=4, replace=False)
            n[bi, ti, pos] = 0
            s = int((n[bi, ti] ** 2).sum())
            m = math.isqrt(s)
            m += m * m < s
            fill = np.array(squares[m * m - s]) * rng.choice((-1, 1), size=4)
            n[bi, ti, pos] = fill
    k = torch.from_numpy(n.reshape(batch, t, heads, dim).transpose(0, 2, 1, 3).copy()).float() / 16
    return k


def assert_storage_equal(cache, ref, exact_norms=True, skip_fields=()):
    for name, a, b in zip(cache._fields, cache, ref):
        if name in skip_fields:
            continue
        if name == "key_norms" and not exact_norms:
            torch.testing.assert_close(a, b, rtol=NORM_RTOL, atol=0, equal_nan=True, msg=f"key_norms differ")
            continue
        if not torch.equal(_bits_view(a), _bits_view(b)):
            diff = (_bits_view(a) != _bits_view(b)).nonzero()
            raise AssertionError(f"{name} differs at {diff.shape[0]} elements, first {diff[:4].tolist()}")


@st.composite
def append_cases(draw):
    heads = draw(st.sampled_from(HEADS))
    r = draw(st.sampled_from(RESIDUALS))
    return dict(
        batch=draw(st.integers(1, 3)),
        heads=heads,
        dim=draw(st.sampled_from(DIMS)),
        bits=draw(st.sampled_from((2, 4))),
        r=r,
        group=draw(st.sampled_from((16, 32))),
        rotate_values=draw(st.booleans()),
        dtype=draw(st.sampled_from((torch.float32, torch.float16, torch.bfloat16))),
        in_dtype=draw(st.sampled_from((None, torch.float32))),  # None: same as the cache
        rot=draw(st.lists(st.booleans(), min_size=heads, max_size=heads)),
        scl=draw(st.lists(st.booleans(), min_size=heads, max_size=heads)),
        steps=draw(st.lists(st.integers(1, MAX_T), min_size=1, max_size=3)),
        skips=draw(st.lists(st.floats(0, 1), min_size=9, max_size=9)),
        seed=draw(st.integers(0, 2**20)),
    )


def _run_appends(case, make_keys, check):
    fmt = CacheFormat(case["bits"], case["group"], case["r"], case["rotate_values"])
    b, h, d = case["batch"], case["heads"], case["dim"]
    max_len = -(-sum(case["steps"]) // case["r"]) * case["r"] + case["r"]
    rot = torch.tensor(case["rot"], device=DEVICE)
    scl = torch.tensor(case["scl"], device=DEVICE)
    cache = poisoned_cache(DEVICE, b, h, max_len, d, fmt, case["dtype"], rot, scl)
    ref = clone_cache(cache)
    fracs = iter(case["skips"])
    for step, t in enumerate(case["steps"]):
        in_dtype = case["in_dtype"] or case["dtype"]
        k = make_keys(b, h, t, d, case["seed"] + step).to(in_dtype).to(DEVICE)
        v = (torch.randn(b, h, t, d, generator=torch.Generator().manual_seed(case["seed"] + 7 * step)) * 2)
        v = v.to(in_dtype).to(DEVICE)
        skip = torch.tensor([int(next(fracs) * t) for _ in range(b)], dtype=torch.int32, device=DEVICE)
        append_kv(cache, fmt, k, v, skip if step % 2 == 0 else None)
        append_kv_ref(ref, fmt, k, v, skip if step % 2 == 0 else None)
        check(cache, ref)


@settings(max_examples=EXAMPLES)
@given(case=append_cases())
def test_append_matches_reference_bit_exact(case):
    """Exact-norm keys: every stored byte equals the reference, after each of several appends."""
    # exact_norm_keys are multiples of 1/16 with |x| <= 17/16: exact in every float dtype
    _run_appends(case, exact_norm_keys, assert_storage_equal)


def _gaussian_keys(b, h, t, d, seed):
    return torch.randn(b, h, t, d, generator=torch.Generator().manual_seed(seed)) * 3


@settings(max_examples=EXAMPLES // 2 + 1)
@given(case=append_cases())
def test_append_gaussian_keys(case):
    """Arbitrary keys: norm-independent fields bit-exact, norms to a few ulps; heads not token-scaled
    have bit-exact key codes and group parameters too."""
    case = dict(case, scl=[False] * case["heads"])
    _run_appends(case, _gaussian_keys, lambda c, r: assert_storage_equal(c, r, exact_norms=False))


def test_decode_steps_cross_block_boundary():
    """T_new = 1 appends across a flush, with a sequence that is ahead by one token."""
    fmt = CacheFormat(2, 32, 32, True)
    h, d = 2, 64
    cache = poisoned_cache(DEVICE, 2, h, 128, d, fmt, torch.bfloat16, True, True)
    ref = clone_cache(cache)
    k0 = exact_norm_keys(2, h, 30, d, 1).to(torch.bfloat16).to(DEVICE)
    skip = torch.tensor([1, 0], dtype=torch.int32, device=DEVICE)
    append_kv(cache, fmt, k0, k0 * 2, skip)
    append_kv_ref(ref, fmt, k0, k0 * 2, skip)
    for step in range(5):
        k = exact_norm_keys(2, h, 1, d, 100 + step).to(torch.bfloat16).to(DEVICE)
        append_kv(cache, fmt, k, -k, None)
        append_kv_ref(ref, fmt, k, -k, None)
        assert_storage_equal(cache, ref)
    assert cache.lengths.tolist() == [34, 35]


def test_overflow_never_writes_out_of_bounds():
    """Overflow is not raised here (no host sync): the kernel writes nothing of the sequence, stays in
    bounds, and marks lengths past max_len, which check_overflow turns into a ValueError."""
    fmt = CacheFormat(2, 32, 32, True)
    cache = poisoned_cache(DEVICE, 1, 1, 64, 32, fmt, torch.float32, True, True)
    before = clone_cache(cache)
    k = exact_norm_keys(1, 1, 100, 32, 3).to(DEVICE)
    append_kv(cache, fmt, k, k, None)  # 100 tokens into a 64-token cache: must not crash or corrupt memory
    assert cache.lengths.tolist() == [100]
    assert_storage_equal(cache, before, skip_fields=("lengths",))  # nothing written
    assert overflowed(cache.lengths, cache.max_len).tolist() == [True]
    with pytest.raises(ValueError, match=r"overflow: sequence\(s\) \[0\] reached \[100\] tokens, past max_len 64"):
        check_overflow(cache.lengths, cache.max_len)
    with pytest.raises(ValueError, match="overflow"):
        append_kv_ref(clone_cache(before), fmt, k, k, None)


def test_overflow_marks_only_the_overflowing_sequence():
    """A batch where sequence 0 overflows and sequence 1 does not: sequence 1 appends exactly as the
    reference does alone, sequence 0 keeps its storage and is marked; the mark is sticky and grows; the
    op-level check (oscar_compile.ops.check_overflow) raises on the cache, not before the overflow."""
    from oscar_compile import ops

    fmt = CacheFormat(2, 32, 32, True)
    h, d = 2, 32
    cache = poisoned_cache(DEVICE, 2, h, 64, d, fmt, torch.bfloat16, True, True)
    k0 = exact_norm_keys(2, h, 40, d, 11).to(torch.bfloat16).to(DEVICE)
    append_kv(cache, fmt, k0, -k0, torch.tensor([0, 30], dtype=torch.int32, device=DEVICE))  # lengths 40 / 10
    assert cache.lengths.tolist() == [40, 10]
    ops.check_overflow(cache)  # no overflow yet: no error
    before = clone_cache(cache)
    k = exact_norm_keys(2, h, 30, d, 12).to(torch.bfloat16).to(DEVICE)
    append_kv(cache, fmt, k, k * 0.5, None)  # 40 + 30 > 64 for sequence 0; 10 + 30 = 40 for sequence 1
    assert cache.lengths.tolist() == [70, 40]
    assert overflowed(cache.lengths, cache.max_len).tolist() == [True, False]
    per_seq = lambda c, b: type(c)(*(t[b : b + 1] for t in c[:10]), *c[10:])  # noqa: E731
    assert_storage_equal(per_seq(cache, 0), per_seq(before, 0), skip_fields=("lengths",))
    ref1 = clone_cache(per_seq(before, 1))
    append_kv_ref(ref1, fmt, k[1:2], k[1:2] * 0.5, None)
    assert_storage_equal(per_seq(cache, 1), ref1)
    with pytest.raises(ValueError, match=r"sequence\(s\) \[0\] reached \[70\] tokens, past max_len 64"):
        ops.check_overflow(cache)
    # sticky: a later one-token step writes nothing more for sequence 0 and the mark grows
    one = exact_norm_keys(2, h, 1, d, 13).to(torch.bfloat16).to(DEVICE)
    append_kv(cache, fmt, one, one, None)
    append_kv_ref(ref1, fmt, one[1:2], one[1:2], None)
    assert cache.lengths.tolist() == [71, 41]
    assert_storage_equal(per_seq(cache, 0), per_seq(before, 0), skip_fields=("lengths",))
    assert_storage_equal(per_seq(cache, 1), ref1)
    with pytest.raises(ValueError, match=r"\[71\] tokens"):
        ops.check_overflow(cache.lengths, cache.max_len)


def test_validation_errors():
    fmt = CacheFormat(2, 32, 32, True)
    cache = poisoned_cache(DEVICE, 1, 2, 64, 32, fmt, torch.float32, True, True)
    with pytest.raises(ValueError, match="do not match"):
        append_kv(cache, fmt, torch.zeros(1, 3, 1, 32, device=DEVICE), torch.zeros(1, 3, 1, 32, device=DEVICE))
    with pytest.raises(ValueError, match="skip"):
        z = torch.zeros(1, 2, 1, 32, device=DEVICE)
        append_kv(cache, fmt, z, z, torch.zeros(2, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="group_size"):
        odd = CacheFormat(2, 24, 48, True)
        c2 = allocate_cache(1, 1, 48, 48, odd, torch.float32, DEVICE)
        z = torch.zeros(1, 1, 1, 48, device=DEVICE)
        append_kv(c2, odd, z, z)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graph capture needs the GPU (run with OSCAR_TEST_CUDA=1)")
def test_decode_append_cuda_graph_capturable():
    fmt = CacheFormat(2, 32, 128, True)
    cache = poisoned_cache(DEVICE, 2, 8, 1024, 128, fmt, torch.bfloat16, True, True)
    ref = clone_cache(cache)
    k = exact_norm_keys(2, 8, 120, 128, 5).to(torch.bfloat16).to(DEVICE)
    append_kv(cache, fmt, k, k, None)
    append_kv_ref(ref, fmt, k, k, None)
    step_k = torch.empty(2, 8, 1, 128, dtype=torch.bfloat16, device=DEVICE)
    step_v = torch.empty_like(step_k)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        append_kv(clone_cache(cache), fmt, step_k, step_v, None)  # warm-up compile
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        append_kv(cache, fmt, step_k, step_v, None)
    for step in range(12):  # crosses the block boundary at 128
        k1 = exact_norm_keys(2, 8, 1, 128, 50 + step).to(torch.bfloat16).to(DEVICE)
        step_k.copy_(k1)
        step_v.copy_(-k1)
        graph.replay()
        append_kv_ref(ref, fmt, k1, -k1, None)
    torch.cuda.synchronize()
    assert_storage_equal(cache, ref)
