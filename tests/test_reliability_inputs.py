"""Reliability issue, user inputs: out-of-range tokens (row 8), direct use of the cache halves (row 10) and
bad arguments (row 17) either work as documented or fail early with an error naming what was wrong."""

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import oscar_compile as oscar
from oscar_compile import OScaRConfig, fake_quantize, ops
from oscar_compile.kernels import CacheFormat, allocate_cache
from oscar_compile.kernels.append_kv import append_kv, append_kv_ref
from oscar_compile.kernels.cache_attention import cache_attention, cache_attention_ref
from oscar_compile.kernels.hadamard import hadamard_matrix, hadamard_transform
from oscar_compile.kernels.cache_layout import FP16_MAX, TRITON_HEAD_DIMS, check_triton_format
from oscar_compile.kv_tensor import OScaRKeyCache, cache_tensors, new_kv_cache
from testing_utils import randn

B, HKV, D, R = 1, 2, 32, 32
CONFIGS = {"adaptive": OScaRConfig(residual_length=R), "paper": OScaRConfig.paper(residual_length=R),
           "kivi": OScaRConfig.kivi(residual_length=R)}  # fmt: skip


@pytest.fixture(autouse=True)
def _quiet_fallback():
    with warnings.catch_warnings():  # the dequantize fallback's one-time warning is expected here
        warnings.filterwarnings("ignore", message="OScaR cache:")
        yield


# ----------------------------------------------------------------------------------------------------
# row 8: tokens beyond what the cache stores (fp16 group parameters) raise the error fake_quantize raises


def _big_tokens(seed, magnitude, t):
    # bf16 keys/values whose entries have the given magnitude, some signs flipped (groups of one sign and mixed)
    x = randn((B, HKV, t, D), seed=seed).abs() + 0.5
    sign = torch.where(randn((B, HKV, t, 1), seed=seed + 1) > 0, 1.0, -1.0)
    return (x * sign * magnitude).to(torch.bfloat16)


@settings(max_examples=16)
@given(
    log_mag=st.floats(0, 30),
    which=st.sampled_from(("keys", "values", "both")),
    config=st.sampled_from(sorted(CONFIGS)),
    seed=st.integers(0, 10_000),
)
def test_cache_write_beyond_fp16_raises_like_fake_quantize(log_mag, which, config, seed):
    """Prompt of R bf16 tokens (one block, quantized at the step's append) through a cache's halves and
    ops.sdpa: the cache raises ValueError exactly when fake_quantize does (same check, same message), leaves
    its state untouched then, and otherwise gives finite outputs, also for a decode step over the block."""
    cfg = CONFIGS[config]
    big = _big_tokens(seed, 10.0**log_mag, R)
    small = randn((B, HKV, R, D), seed=seed + 2).to(torch.bfloat16)
    k = big if which in ("keys", "both") else small
    v = big if which in ("values", "both") else small
    q = randn((B, 2 * HKV, R, D), seed=seed + 3).to(torch.bfloat16)
    kc, vc = new_kv_cache(B, HKV, 2 * R, D, cfg, torch.bfloat16)
    kc[:, :, 0:R] = k
    vc[:, :, 0:R] = v
    try:
        fake_quantize(k, v, cfg, queries=q, prompt_length=R)
        expected = None
    except ValueError as e:
        expected = str(e)
    if expected is not None:
        assert "fp16 range" in expected or "non-finite" in expected
        side = expected.split(" ")[0]  # "keys" / "values"
        with pytest.raises(ValueError, match=rf"{side} \(sequence 0\) (exceed the fp16 range|contain non-finite)"):
            ops.sdpa(q, kc, vc)
        assert kc.lengths.tolist() == vc.lengths.tolist() == [0]  # nothing stored
        assert not kc.key_mn.any() and not vc.value_mn.any()
        return
    out = ops.sdpa(q, kc, vc)
    assert torch.isfinite(out).all() and kc.lengths.tolist() == [R]
    assert torch.isfinite(kc.key_mn).all() and torch.isfinite(vc.value_mn).all()
    kc[:, :, R:R + 1], vc[:, :, R:R + 1] = small[:, :, :1], small[:, :, :1]
    assert torch.isfinite(ops.sdpa(q[:, :, :1], kc, vc)).all()


def test_row8_bf16_values_past_fp16_max_raise_in_both_routes():
    """The issue's case: bf16 values > 65504 (all of one sign: the group minimum itself overflows fp16)."""
    v = torch.full((B, HKV, R, D), 1.0e5, dtype=torch.bfloat16)
    k = randn((B, HKV, R, D), seed=1).to(torch.bfloat16)
    cfg = CONFIGS["adaptive"]
    with pytest.raises(ValueError, match="values exceed the fp16 range"):
        fake_quantize(k, v, cfg)
    kc, vc = new_kv_cache(B, HKV, 2 * R, D, cfg, torch.bfloat16)
    kc[:, :, 0:R], vc[:, :, 0:R] = k, v
    with pytest.raises(ValueError, match=rf"values \(sequence 0\) exceed the fp16 range \({FP16_MAX}\)"):
        ops.sdpa(randn((B, HKV, R, D), seed=2).to(torch.bfloat16), kc, vc)
    # the op directly, on a batch whose second sequence is the bad one: nothing of either is written
    fmt = CacheFormat(2, 32, R, True)
    cache = allocate_cache(2, HKV, 2 * R, D, fmt, torch.bfloat16)
    with pytest.raises(ValueError, match=r"values \(sequence 1\) exceed the fp16 range"):
        ops.append_kv(cache, fmt, torch.cat([k, k]), torch.cat([k, v]))
    assert cache.lengths.tolist() == [0, 0] and not cache.value_mn.any() and not cache.residual_values.any()


def test_rotation_overflow_is_caught_though_inputs_fit_fp16():
    """Values below 65504 whose Hadamard rotation grows past it: v = a (H_0 - H_1) rotates to a (e_0 - e_1)."""
    h = hadamard_matrix(D)
    v = (1e5 * (h[0] - h[1])).expand(B, HKV, R, D).contiguous()
    assert v.abs().max() < FP16_MAX and hadamard_transform(v).abs().max() > FP16_MAX
    k = randn((B, HKV, R, D))
    with pytest.raises(ValueError, match="values exceed the fp16 range"):
        fake_quantize(k, v, CONFIGS["paper"])
    fake_quantize(k, v, CONFIGS["kivi"])  # unrotated, the same values fit
    fmt = CacheFormat(2, 32, R, True)
    with pytest.raises(ValueError, match="fp16 range"):
        append_kv_ref(allocate_cache(B, HKV, R, D, fmt, torch.float32), fmt, k, v)


def test_cuda_append_docstring_says_what_happens_there():
    doc = " ".join(append_kv.__doc__.split())
    assert "does not check that the blocks it quantizes can be stored" in doc and "NaN" in doc


# ----------------------------------------------------------------------------------------------------
# row 10: the halves used directly, as a model's own code would


def _history(seed, t):
    return randn((B, HKV, t, D), seed=seed), randn((B, HKV, t, D), seed=seed + 1)


@settings(max_examples=10)
@given(
    batch=st.integers(1, 2),
    prompt=st.integers(0, 2 * R + 3),
    steps=st.integers(1, 3),
    negative=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_int_index_write_equals_one_token_slice_write(batch, prompt, steps, negative, seed):
    """k[:, :, p] = x stores exactly what k[:, :, p:p+1] = x[:, :, None] stores: same attention outputs,
    same state, for each decode step after a prompt (negative indices count from the end)."""
    cfg = CONFIGS["paper"]
    by_int, by_slice = new_kv_cache(batch, HKV, 4 * R, D, cfg, torch.float32), new_kv_cache(batch, HKV, 4 * R, D, cfg, torch.float32)
    gen = lambda s, t: randn((batch, HKV, t, D), seed=s)  # noqa: E731
    if prompt:
        q = randn((batch, 2 * HKV, prompt, D), seed=seed)
        k, v = gen(seed + 1, prompt), gen(seed + 2, prompt)
        for kc, vc in (by_int, by_slice):
            kc[:, :, 0:prompt], vc[:, :, 0:prompt] = k, v
            ops.sdpa(q, kc, vc)
    for i in range(steps):
        p = prompt + i
        x, y = gen(seed + 10 * i + 3, 1)[:, :, 0], gen(seed + 10 * i + 4, 1)[:, :, 0]  # [B, Hkv, D]
        q = randn((batch, 2 * HKV, 1, D), seed=seed + 10 * i + 5)
        kc, vc = by_int
        idx = p - kc.shape[2] if negative else p
        kc[:, :, idx] = x
        vc[:, :, idx] = y
        out_int = ops.sdpa(q, kc, vc)
        kc, vc = by_slice
        kc[:, :, p:p + 1], vc[:, :, p:p + 1] = x.unsqueeze(2), y.unsqueeze(2)
        out_slice = ops.sdpa(q, kc, vc)
        torch.testing.assert_close(out_int, out_slice, rtol=0, atol=0)
    for a, b in zip(cache_tensors(*by_int), cache_tensors(*by_slice)):
        assert torch.equal(a, b)
    assert by_int[0].lengths.tolist() == [prompt + steps] * batch
    # reads of the written token: dequantized contents, with and without the token dim
    kc = by_int[0]
    full = kc.dequantize()
    torch.testing.assert_close(kc[:, :, prompt], full[:, :, prompt], rtol=0, atol=0)
    torch.testing.assert_close(kc[:, :, prompt].unsqueeze(2), full[:, :, prompt:prompt + 1], rtol=0, atol=0)
    assert kc[:, :, prompt].shape == (batch, HKV, D)


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float32])
def test_dtype_conversions_return_plain_dequantized_tensors(cache_dtype):
    cfg = CONFIGS["paper"]
    kc, vc = new_kv_cache(B, HKV, 2 * R, D, cfg, cache_dtype)
    k, v = _history(7, R + 5)
    kc[:, :, 0:R + 5], vc[:, :, 0:R + 5] = k, v
    ops.sdpa(randn((B, HKV, R + 5, D), seed=9), kc, vc)
    logical = kc.dequantize()  # the logical contents in the cache dtype
    conversions = {
        torch.bfloat16: lambda t: t.to(torch.bfloat16),
        torch.float16: lambda t: t.half(),
        torch.float32: lambda t: t.float(),
        torch.float64: lambda t: t.to(dtype=torch.float64),
    }
    for dtype, convert in conversions.items():
        got = convert(kc)
        assert got.dtype == dtype and got.shape == kc.shape
        if dtype == cache_dtype:  # no conversion: torch returns the tensor itself
            assert got is kc
            continue
        assert type(got) is torch.Tensor
        torch.testing.assert_close(got, logical.to(dtype), rtol=0, atol=0)
    # a device move keeps the cache (its state moves); the same device is the tensor itself
    assert kc.to("cpu") is kc
    moved = kc.to("meta")
    assert isinstance(moved, OScaRKeyCache) and moved.key_codes.is_meta and moved.dtype == cache_dtype
    # reads keep working: reductions and clones see the dequantized contents
    assert torch.equal(kc.sum(), logical.sum()) and torch.equal(kc.clone().dequantize(), logical)
    assert torch.equal(kc[:, :, 3].clone().dequantize(), logical[:, :, 3])


def test_conversion_while_a_step_is_pending_refuses():
    """k.to(dtype) before the step's attention would read the cache without ever storing the step (e.g. eager
    matmul attention): refused like any other read, naming the pending tokens."""
    kc, vc = new_kv_cache(B, HKV, 2 * R, D, CONFIGS["paper"], torch.float32)
    kc[:, :, 0] = randn((B, HKV, D))
    with pytest.raises(NotImplementedError, match="pending"):
        kc.to(torch.bfloat16)


def test_int_index_write_broadcasts_like_a_tensor_or_fails_clearly():
    kc, vc = new_kv_cache(2, HKV, 2 * R, D, CONFIGS["paper"], torch.float32)
    with pytest.raises(IndexError, match="out of bounds"):
        kc[:, :, 2 * R] = randn((2, HKV, D))
    x = randn((HKV, D))  # broadcast over the batch, as into a plain tensor
    kc[:, :, 0], vc[:, :, 0] = x, x
    ops.sdpa(randn((2, HKV, 1, D)), kc, vc)
    assert torch.equal(kc[:, :, 0], x.expand(2, HKV, D)) and kc.lengths.tolist() == [1, 1]
    gqa = kc[:, :, None].expand(2, HKV, 2, 2 * R, D).reshape(2, 2 * HKV, 2 * R, D)
    with pytest.raises(NotImplementedError, match="GQA-expanded view"):
        gqa[:, :, 1] = randn((2, 2 * HKV, D))


# ----------------------------------------------------------------------------------------------------
# row 17: bad arguments fail early, naming the argument and what it accepts


@pytest.mark.parametrize(
    "field, value, accepted",
    [
        ("bits", 2.0, r"one of \(2, 4\)"),
        ("bits", True, r"one of \(2, 4\)"),
        ("group_size", 32.0, "a power of two"),
        ("group_size", True, "a power of two"),
        ("residual_length", 128.0, "a positive multiple of group_size"),
        ("residual_length", False, "a positive multiple of group_size"),
    ],
)
def test_config_int_fields_reject_floats_and_bools(field, value, accepted):
    with pytest.raises(TypeError, match=rf"OScaRConfig\.{field} must be an int \({accepted}.*got {value!r}"):
        OScaRConfig(**{field: value})


def test_config_normalizes_numpy_ints():
    c = OScaRConfig(bits=np.int64(4), group_size=np.int32(16), residual_length=np.int64(64))
    assert (c.bits, c.group_size, c.residual_length) == (4, 16, 64)
    assert all(type(x) is int for x in (c.bits, c.group_size, c.residual_length))


@given(g=st.integers(1, 64).map(lambda n: 8 * n))
def test_config_group_size_is_what_the_kernels_accept(g):
    """Every multiple of 8 the old rule took: the config accepts exactly the group sizes the Triton kernels'
    format check accepts (powers of two), and says why otherwise."""
    fmt = CacheFormat(2, g, 4 * g, True)
    try:
        check_triton_format(fmt)
        kernels_ok = True
    except ValueError:
        kernels_ok = False
    assert kernels_ok == (g & (g - 1) == 0)
    if kernels_ok:
        assert OScaRConfig(group_size=g, residual_length=4 * g).group_size == g
    else:
        with pytest.raises(ValueError, match=rf"OScaRConfig\.group_size must be a power of two >= 8 .*got {g}"):
            OScaRConfig(group_size=g, residual_length=4 * g)


def test_kernel_format_owner_is_what_the_launchers_and_allocation_check():
    odd = CacheFormat(2, 24, 48, True)
    with pytest.raises(ValueError, match="group_size must be a power of two >= 8"):
        append_kv(allocate_cache(1, 1, 48, 48, odd, torch.float32), odd, torch.zeros(1, 1, 1, 48), torch.zeros(1, 1, 1, 48))
    fmt = CacheFormat(2, 16, 32, True)
    c80 = allocate_cache(1, 1, 32, 80, fmt, torch.float32)  # the CPU reference runs head_dim 80
    assert cache_attention_ref(torch.zeros(1, 1, 1, 80), c80, fmt).shape == (1, 1, 1, 80)
    with pytest.raises(ValueError, match=r"head_dim 80 not supported by the Triton cache kernels; supported: \(32"):
        cache_attention(torch.zeros(1, 1, 1, 80), c80, fmt)
    # a CUDA cache is refused when it is allocated (never inside a kernel); checked before any CUDA call
    for g, d in ((16, 80), (16, 48), (32, 160)):
        with pytest.raises(ValueError, match=rf"head_dim {d} not supported by the Triton cache kernels"):
            allocate_cache(1, 1, 32, d, CacheFormat(2, g, 32, True), torch.bfloat16, "cuda")
    with pytest.raises(ValueError, match="group_size must be a power of two"):
        allocate_cache(1, 1, 48, 48, odd, torch.bfloat16, "cuda")
    assert all(d % 32 == 0 for d in TRITON_HEAD_DIMS)


def test_compile_names_the_config_argument():
    with pytest.raises(TypeError, match=r"config must be an OScaRConfig, got dict"):
        oscar.compile(torch.nn.Linear(2, 2), config={"bits": 2})


@pytest.mark.parametrize(
    "prompt_length, error, accepted",
    [(-5, ValueError, "got -5"), (0, ValueError, "got 0"), (1000, ValueError, "got 1000"), (2.5, TypeError, "got 2.5"),
     (True, TypeError, "got True")],
)  # fmt: skip
def test_fake_quantize_prompt_length(prompt_length, error, accepted):
    k, v = _history(3, 2 * R)
    cfg = CONFIGS["adaptive"]
    with pytest.raises(error, match=rf"prompt_length must be None or an int in \[1, T=64\].*{accepted}"):
        fake_quantize(k, v, cfg, prompt_length=prompt_length)
    # the bounds themselves are fine, and a history that quantizes nothing yet (shorter than the first step
    # while it is written) does not read it
    for ok in (1, 2 * R, np.int64(R)):
        fake_quantize(k, v, cfg, prompt_length=ok)
    short_k, short_v = k[:, :, : R - 1], v[:, :, : R - 1]
    assert all(torch.equal(a, b) for a, b in zip(fake_quantize(short_k, short_v, cfg, prompt_length=1000), (short_k, short_v)))
    if not isinstance(prompt_length, int) or prompt_length < 1:
        with pytest.raises(error, match="prompt_length"):
            fake_quantize(short_k, short_v, cfg, prompt_length=prompt_length)


@pytest.mark.parametrize("shape", [(0, HKV, 128, D), (1, 0, 128, D), (1, HKV, 128, 0)])
def test_fake_quantize_zero_sized_dims(shape):
    x = torch.zeros(shape)
    with pytest.raises(ValueError, match=r"B, Hkv and D must be >= 1"):
        fake_quantize(x, x, OScaRConfig.kivi())


def test_fake_quantize_type_and_pairing_errors():
    k, v = _history(5, 128)
    cfg = OScaRConfig.kivi()
    with pytest.raises(TypeError, match=r"keys must be a torch.Tensor \[B, Hkv, T, D\], got numpy.ndarray"):
        fake_quantize(k.numpy(), v.numpy(), cfg)
    with pytest.raises(TypeError, match=r"values must be a torch.Tensor"):
        fake_quantize(k, v.numpy(), cfg)
    with pytest.raises(TypeError, match=r"keys are torch.float32 but values torch.bfloat16"):
        fake_quantize(k, v.bfloat16(), cfg)
    with pytest.raises(ValueError, match=r"keys on cpu but values on meta"):
        fake_quantize(k, v.to("meta"), cfg)
    with pytest.raises(TypeError, match=r"config must be an OScaRConfig or None, got dict"):
        fake_quantize(k, v, {"bits": 2})
    with pytest.raises(TypeError, match=r"queries must be a torch.Tensor"):
        fake_quantize(k, v, OScaRConfig(), queries=np.zeros((1, 4, 8, D)))
    with pytest.raises(ValueError, match=r"queries must be \[B=1, Hq, Tq, D=32\] with Hq a positive multiple of Hkv=2"):
        fake_quantize(k, v, OScaRConfig(), queries=torch.zeros(1, 3, 8, D))
    # head_dim vs group_size is checked whatever T is (a short history is not quantized, yet still wrong)
    for t in (8, 128):
        x = torch.zeros(1, 1, t, 48)
        with pytest.raises(ValueError, match=r"head_dim 48 not a multiple of OScaRConfig.group_size 32"):
            fake_quantize(x, x, cfg)


@pytest.mark.parametrize(
    "name, value, error",
    [("batch", 0, ValueError), ("kv_heads", 0, ValueError), ("head_dim", 0, ValueError), ("max_len", 0, ValueError),
     ("batch", 2.0, TypeError), ("head_dim", True, TypeError), ("max_len", 128.0, TypeError)],
)  # fmt: skip
def test_allocate_cache_sizes(name, value, error):
    sizes = dict(batch=1, kv_heads=HKV, max_len=128, head_dim=D)
    sizes[name] = value
    with pytest.raises(error, match=rf"allocate_cache: {name} must be an int >= 1, got {value!r}"):
        allocate_cache(**sizes, fmt=CacheFormat(2, 32, 128, True), dtype=torch.float32)
    with pytest.raises(error, match=rf"allocate_cache: {name} must be an int >= 1"):  # the halves are built on it
        new_kv_cache(*sizes.values(), OScaRConfig.kivi(), torch.float32)


def test_ops_wrappers_reject_bad_pairs_and_empty_heads():
    fmt = CacheFormat(2, 32, R, True)
    cache = allocate_cache(1, HKV, 2 * R, D, fmt, torch.float32)
    k, v = _history(11, 4)
    with pytest.raises(TypeError, match=r"new keys/values must share one float dtype, got torch.float32/torch.bfloat16"):
        ops.append_kv(cache, fmt, k, v.bfloat16())
    q = randn((1, 2 * HKV, 4, D))
    with pytest.raises(TypeError, match=r"new keys/values must share one float dtype"):
        ops.attention(q, cache, fmt, k, v.half())
    with pytest.raises(ValueError, match=r"query heads 0 not a multiple of the cache's kv heads 2 \(>= 1"):
        ops.attention(torch.zeros(1, 0, 4, D), cache, fmt)
    assert cache.lengths.tolist() == [0]
    # a device mismatch between keys and values reaches the shared checks (the meta device stands in for a
    # second device here: the ops' dispatcher would route a meta tensor to the shape-only fake impl)
    with pytest.raises(ValueError, match=r"new keys on cpu, values on meta, cache on cpu"):
        append_kv_ref(cache, fmt, k, v.to("meta"))
    with pytest.raises(ValueError, match=r"new keys on cpu, values on meta, cache on cpu"):
        cache_attention_ref(q, cache, fmt, k, v.to("meta"))
