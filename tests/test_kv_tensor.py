"""OScaRKeyCache / OScaRValueCache: the quantized cache as a tensor subclass a model writes and attends to."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

from oscar_compile import OScaRConfig, fake_quantize, ops
from oscar_compile.kernels import cache_nbytes
from oscar_compile.kv_tensor import KVView, OScaRKeyCache, OScaRValueCache, cache_tensors, kv_cache_from_hp, new_kv_cache
from testing_utils import randn

CFG = OScaRConfig.paper(residual_length=32)  # fixed key flags: batch items independent
B, HKV, GROUP, D, MAX_LEN = 2, 2, 2, 64, 128
ATOL = 2e-5  # fp32 models: the cache and the reference differ only in summation order


def repeat_kv(x, n):  # transformers' GQA expansion, written out (the pattern the subclass must see)
    b, h, t, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, t, d).reshape(b, h * n, t, d)


def reference_attention(q, hist_k, hist_v, k, v, config, *, window=None, softcap=None):
    """The reference rule: queries see fake_quantize(history) plus the step's own keys/values exactly."""
    fk, fv = fake_quantize(hist_k, hist_v, config) if hist_k.shape[2] else (hist_k, hist_v)
    keys = repeat_kv(torch.cat([fk, k], 2), q.shape[1] // k.shape[1]).double()
    values = repeat_kv(torch.cat([fv, v], 2), q.shape[1] // k.shape[1]).double()
    total, t = keys.shape[2], q.shape[2]
    scores = q.double() @ keys.transpose(-1, -2) * q.shape[-1] ** -0.5
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    q_pos = torch.arange(total - t, total)[:, None]
    k_pos = torch.arange(total)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ values).to(q.dtype)


def _write(kc, vc, k, v, pos, how):
    if how == "index_copy":
        kc.index_copy_(2, pos, k)
        vc.index_copy_(2, pos, v)
    elif how == "index_put":
        kc[:, :, pos] = k
        vc[:, :, pos] = v
    else:  # slice assignment
        a, b = int(pos[0]), int(pos[-1]) + 1
        kc[:, :, a:b] = k
        vc[:, :, a:b] = v


def test_layout_flatten_and_shapes():
    kc, vc = new_kv_cache(B, HKV, 100, D, CFG, torch.bfloat16)  # 100 rounds up to 128
    assert isinstance(kc, OScaRKeyCache) and isinstance(vc, OScaRValueCache)
    assert kc.shape == vc.shape == (B, HKV, MAX_LEN, D) and kc.dtype == vc.dtype == torch.bfloat16
    names, attrs = kc.__tensor_flatten__()
    assert names == OScaRKeyCache.tensor_data_names and attrs["view"] == KVView(1, False, 0, MAX_LEN)
    back = OScaRKeyCache.__tensor_unflatten__({n: getattr(kc, n) for n in names}, attrs, kc.shape, kc.stride())
    assert all(getattr(back, n) is getattr(kc, n) for n in names) and back.window is None
    # exact bytes: the CacheTensors of the layer plus each half's offsets and the value half's lengths copy
    layer = cache_tensors(kc, vc)
    extra = kc.offsets.nbytes + vc.offsets.nbytes + vc.lengths.nbytes
    assert kc.nbytes_quantized() + vc.nbytes_quantized() == cache_nbytes(layer) + extra
    assert "OScaRKeyCache" in repr(kc)
    assert kc.to("cpu") is kc
    moved = kc.to("meta")
    assert isinstance(moved, OScaRKeyCache) and moved.key_codes.is_meta and moved.shape == kc.shape


@settings(max_examples=12)
@given(
    chunks=st.lists(st.integers(1, 40), min_size=2, max_size=5),
    how=st.sampled_from(["index_copy", "index_put", "slice"]),
    bits=st.sampled_from((2, 4)),
    window=st.sampled_from((None, 24)),
    seed=st.integers(0, 10_000),
)
def test_write_then_sdpa_matches_reference(chunks, how, bits, window, seed):
    config = CFG.replace(bits=bits)
    kc, vc = new_kv_cache(B, HKV, MAX_LEN, D, config, torch.float32, window=window)
    hist_k = hist_v = torch.zeros(B, HKV, 0, D)
    pos0 = 0
    for i, t in enumerate(chunks):
        q = randn((B, HKV * GROUP, t, D), seed=seed + 3 * i)
        k, v = randn((B, HKV, t, D), seed=seed + 3 * i + 1), randn((B, HKV, t, D), seed=seed + 3 * i + 2)
        _write(kc, vc, k, v, torch.arange(pos0, pos0 + t), how)
        out = F.scaled_dot_product_attention(q, repeat_kv(kc, GROUP), repeat_kv(vc, GROUP))
        torch.testing.assert_close(out, reference_attention(q, hist_k, hist_v, k, v, config, window=window), rtol=0, atol=ATOL)
        hist_k, hist_v, pos0 = torch.cat([hist_k, k], 2), torch.cat([hist_v, v], 2), pos0 + t
    assert kc.lengths.tolist() == vc.lengths.tolist() == [pos0] * B
    # the stored state dequantizes to exactly what fake_quantize makes of the history
    fk, fv = fake_quantize(hist_k, hist_v, config)
    torch.testing.assert_close(kc.dequantize()[:, :, :pos0], fk, rtol=0, atol=1e-6)
    torch.testing.assert_close(vc.dequantize()[:, :, :pos0], fv, rtol=0, atol=1e-6)
    assert not kc.dequantize()[:, :, pos0:].any()


def test_softcap_and_gqa_without_expand():
    kc, vc = new_kv_cache(B, HKV, MAX_LEN, D, CFG, torch.float32)
    hist_k = hist_v = torch.zeros(B, HKV, 0, D)
    for i, t in enumerate((50, 1, 17)):
        q = randn((B, HKV * GROUP, t, D), seed=10 * i, scale=3.0)
        k, v = randn((B, HKV, t, D), seed=10 * i + 1, scale=3.0), randn((B, HKV, t, D), seed=10 * i + 2)
        kc.index_copy_(2, torch.arange(hist_k.shape[2], hist_k.shape[2] + t), k)
        vc.index_copy_(2, torch.arange(hist_k.shape[2], hist_k.shape[2] + t), v)
        out = ops.sdpa(q, kc, vc, softcap=5.0)  # the cache directly, GQA handled inside
        torch.testing.assert_close(out, reference_attention(q, hist_k, hist_v, k, v, CFG, softcap=5.0), rtol=0, atol=ATOL)
        hist_k, hist_v = torch.cat([hist_k, k], 2), torch.cat([hist_v, v], 2)


def _padded_mask(pads, t, total):
    # transformers-style 4-D bool mask for a chunk at positions [total - t, total), left pads per row
    q_pos = torch.arange(total - t, total)[:, None]
    k_pos = torch.arange(MAX_LEN)[None, :]
    causal = k_pos <= q_pos
    not_pad = k_pos[None] >= torch.tensor(pads)[:, None, None]
    return (causal[None] & not_pad)[:, None]


def test_left_padding_never_stored_and_matches_solo():
    lengths, pad = (45, 30), 15
    k_all = [randn((1, HKV, n + 3, D), seed=s) for s, n in zip((1, 2), lengths)]
    v_all = [randn((1, HKV, n + 3, D), seed=s + 10) for s, n in zip((1, 2), lengths)]
    q_all = [randn((1, HKV * GROUP, n + 3, D), seed=s + 20) for s, n in zip((1, 2), lengths)]
    solo = []
    for k, v, q, n in zip(k_all, v_all, q_all, lengths):
        kc, vc = new_kv_cache(1, HKV, MAX_LEN, D, CFG, torch.float32)
        outs = []
        for a, b in ((0, n), (n, n + 1), (n + 1, n + 3)):
            kc.index_copy_(2, torch.arange(a, b), k[:, :, a:b])
            vc.index_copy_(2, torch.arange(a, b), v[:, :, a:b])
            outs.append(ops.sdpa(q[:, :, a:b], kc, vc))
        solo.append(outs)
    # batch: sequence 1 is left-padded by 15 positions (pad keys are garbage and must be ignored)
    kc, vc = new_kv_cache(2, HKV, MAX_LEN, D, CFG, torch.float32)

    def batch_of(xs, a, b):
        x1 = xs[1][:, :, a - pad : b - pad] if a >= pad else torch.cat([torch.full_like(xs[1][:, :, :pad], 7.0), xs[1][:, :, : b - pad]], 2)
        return torch.cat([xs[0][:, :, a:b], x1])

    n = lengths[0]
    for step, (a, b) in enumerate(((0, n), (n, n + 1), (n + 1, n + 3))):
        kc.index_copy_(2, torch.arange(a, b), batch_of(k_all, a, b))
        vc.index_copy_(2, torch.arange(a, b), batch_of(v_all, a, b))
        out = ops.sdpa(batch_of(q_all, a, b), kc, vc, _padded_mask([0, pad], b - a, b))
        torch.testing.assert_close(out[:1], solo[0][step], rtol=0, atol=ATOL)
        rows = slice(pad, None) if step == 0 else slice(None)
        torch.testing.assert_close(out[1:, :, rows], solo[1][step][:, :, -out[1:, :, rows].shape[2] :], rtol=0, atol=ATOL)
        if step == 0:
            assert not out[1:, :, :pad].any()  # pad queries return zeros
    assert kc.lengths.tolist() == [n + 3, n + 3 - pad] and kc.offsets.tolist() == [0, pad]
    assert vc.offsets.tolist() == [0, pad]


def test_fallback_dequantizes_once_warned_and_refuses_unsafe_use():
    kc, vc = new_kv_cache(1, HKV, MAX_LEN, D, CFG, torch.float32)
    k, v = randn((1, HKV, 40, D), seed=1), randn((1, HKV, 40, D), seed=2)
    kc.index_copy_(2, torch.arange(40), k)
    vc.index_copy_(2, torch.arange(40), v)
    with pytest.raises(NotImplementedError, match="pending"):
        kc.transpose(2, 3)  # e.g. eager matmul attention: the written tokens would never be stored
    ops.sdpa(randn((1, HKV * GROUP, 40, D)), kc, vc)  # attends + appends the pending tokens
    fk, _ = fake_quantize(k, v, CFG)
    with pytest.warns(UserWarning, match="aten.mul.Tensor"):
        doubled = kc * 2
    assert type(doubled) is torch.Tensor
    torch.testing.assert_close(doubled[:, :, :40], 2 * fk, rtol=0, atol=1e-6)
    assert not doubled[:, :, 40:].any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per op
        kc * 3
    with pytest.raises(NotImplementedError, match="add_"):
        kc.add_(1.0)
    torch.testing.assert_close(kc.dequantize()[:, :, :40], fk, rtol=0, atol=1e-6)


def test_dequantize_places_pending_tokens_and_left_pads():
    kc, vc = new_kv_cache(2, HKV, MAX_LEN, D, CFG, torch.float32)
    k, v = randn((2, HKV, 50, D), seed=1), randn((2, HKV, 50, D), seed=2)
    kc.index_copy_(2, torch.arange(50), k)
    vc.index_copy_(2, torch.arange(50), v)
    assert torch.equal(kc.dequantize()[:, :, :50], k)  # pending: full precision at their positions
    ops.sdpa(randn((2, HKV * GROUP, 50, D)), kc, vc, _padded_mask([0, 10], 50, 50))
    fk0, _ = fake_quantize(k[:1], v[:1], CFG)
    fk1, _ = fake_quantize(k[1:, :, 10:], v[1:, :, 10:], CFG)  # the pads were never stored
    deq = kc.dequantize()
    torch.testing.assert_close(deq[:1, :, :50], fk0, rtol=0, atol=1e-6)
    torch.testing.assert_close(deq[1:, :, 10:50], fk1, rtol=0, atol=1e-6)
    assert not deq[1:, :, :10].any() and not deq[:, :, 50:].any()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_step_no_graph_breaks(backend):
    torch._dynamo.reset()
    counters.clear()

    def step(kc, vc, q, k, v, pos):
        kc.index_copy_(2, pos, k)
        vc.index_copy_(2, pos, v)
        return F.scaled_dot_product_attention(q, repeat_kv(kc, GROUP), repeat_kv(vc, GROUP)) + 1

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    eager_cache, compiled_cache = (new_kv_cache(B, HKV, MAX_LEN, D, CFG, torch.float32) for _ in range(2))
    pos0 = 0
    for i, t in enumerate((40, 1, 1, 1)):
        q = randn((B, HKV * GROUP, t, D), seed=i)
        k, v = randn((B, HKV, t, D), seed=i + 10), randn((B, HKV, t, D), seed=i + 20)
        pos = torch.arange(pos0, pos0 + t)
        torch.testing.assert_close(compiled(*compiled_cache, q, k, v, pos), step(*eager_cache, q, k, v, pos), rtol=0, atol=1e-6)
        pos0 += t
    for a, b in zip(cache_tensors(*compiled_cache), cache_tensors(*eager_cache)):
        assert torch.equal(a, b)
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] <= 2  # prefill shape and decode shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_hp_dequantizes_to_fake_quantize(dtype):
    k, v = randn((B, HKV, 75, D), dtype, seed=4), randn((B, HKV, 75, D), dtype, seed=5)
    kc, vc = kv_cache_from_hp(k, v, CFG, 100)
    assert kc.shape == (B, HKV, MAX_LEN, D) and kc.dtype == dtype and vc.lengths.tolist() == [75, 75]
    fk, fv = fake_quantize(k, v, CFG)
    tol = dict(rtol=0, atol=1e-6 if dtype == torch.float32 else 0)  # bf16: same fp32 dequant, same rounding
    torch.testing.assert_close(kc.dequantize()[:, :, :75], fk, **tol)
    torch.testing.assert_close(vc.dequantize()[:, :, :75], fv, **tol)
