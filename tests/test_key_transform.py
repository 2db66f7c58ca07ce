"""choose_key_flags: the data-free per-head key transform behind rotate_keys/token_scaling="auto"."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from testing_utils import bits, randn, seeds

from oscar_compile import OScaRConfig, fake_quantize
from oscar_compile.fake_quant import resolve_key_flags
from oscar_compile.kernels.key_transform import CANDIDATES, FALLBACK_FLAGS, choose_key_flags, key_transform_errors
from oscar_compile.kernels.quantization import dequantize_keys, quantize_keys


HUGE = [5, 40]


def _outlier_channel_head(seed, t=128, d=64):
    # A Qwen2.5-like head: two channels ~30x the others (a bias-driven offset plus their own variation).
    k = randn((t, d), seed=seed)
    k[:, HUGE] = 30.0 + 8.0 * k[:, HUGE]
    return k


def _queries(seed, heads, t=16, d=64):
    # Queries that read the ordinary channels and barely the huge ones: rotating the keys would smear the
    # huge channels' range over the channels that matter.
    q = randn((1, heads, t, d), seed=seed)
    q[..., HUGE] *= 0.02
    return q


def _heavy_tailed_head(seed, t=128, d=64):
    # Every token has one spike (+-12) on a random channel: per-channel ranges are set by rare spikes in
    # most channels; a rotation spreads each spike thinly over all channels (the case OScaR targets).
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn((t, d), generator=gen)
    where = torch.randint(0, d, (t,), generator=gen)
    sign = torch.randint(0, 2, (t,), generator=gen) * 2 - 1
    k[torch.arange(t), where] += 12.0 * sign
    return k


@given(seed=seeds)
def test_rotation_off_for_a_head_with_a_few_huge_channels(seed):
    keys = torch.stack([_outlier_channel_head(seed), _outlier_channel_head(seed + 1)])[None]
    rotated, _ = choose_key_flags(keys, bits=2, group_size=32, queries=_queries(seed, 4))
    assert not rotated.any(), rotated


@given(seed=seeds)
def test_rotation_on_where_it_clearly_helps(seed):
    keys = torch.stack([_heavy_tailed_head(seed), _heavy_tailed_head(seed + 7)])[None]
    for queries in (None, randn((1, 4, 16, 64), seed=seed + 3)):  # keys-only proxy and real queries agree
        rotated, _ = choose_key_flags(keys, bits=2, group_size=32, queries=queries)
        assert rotated.all(), (rotated, key_transform_errors(keys, 2, 32, queries))


def test_each_head_decided_independently():
    keys = torch.stack([_outlier_channel_head(1), _heavy_tailed_head(2)])[None]
    rotated, scaled = choose_key_flags(keys, bits=2, group_size=32, queries=_queries(5, 2))
    assert rotated.tolist() == [False, True]
    assert rotated.dtype == scaled.dtype == torch.bool and rotated.shape == scaled.shape == (2,)


@given(seed=seeds, t=st.integers(0, 300), h=st.integers(1, 3), b=bits)
def test_deterministic_and_well_formed_for_any_length(seed, t, h, b):
    keys = randn((2, h, t, 32), seed=seed, scale=2.0)
    first = choose_key_flags(keys, bits=b, group_size=32)
    second = choose_key_flags(keys.clone(), bits=b, group_size=32)
    for x, y in zip(first, second):
        assert torch.equal(x, y) and x.dtype == torch.bool and x.shape == (h,)
    if t < 32:
        assert first[0].eq(FALLBACK_FLAGS[0]).all() and first[1].eq(FALLBACK_FLAGS[1]).all()


@given(seed=seeds)
def test_choice_minimizes_the_reported_error(seed):
    keys = randn((1, 2, 96, 32), seed=seed)
    keys[:, 0, :, 3] += 20.0
    errs = key_transform_errors(keys, 2, 32)
    rotated, scaled = choose_key_flags(keys, bits=2, group_size=32)
    for h in range(2):
        picked = CANDIDATES.index((bool(rotated[h]), bool(scaled[h])))
        assert errs[picked, h] == errs[:, h].min()


def test_error_matches_a_hand_computed_logit_error():
    keys = randn((1, 1, 64, 32), seed=3)
    queries = randn((1, 2, 5, 32), seed=4)  # two query heads share the kv head
    errs = key_transform_errors(keys, 2, 32, queries=queries)
    for i, (rot, scale) in enumerate(CANDIDATES):
        k_hat = dequantize_keys(quantize_keys(keys, 2, 32, rot, scale))[0, 0]
        q = queries[0].reshape(10, 32)
        e, r = q @ (keys[0, 0] - k_hat).T, q @ keys[0, 0].T
        e, r = e - e.mean(-1, keepdim=True), r - r.mean(-1, keepdim=True)  # softmax ignores row shifts
        torch.testing.assert_close(errs[i, 0], e.square().sum() / r.square().sum(), rtol=1e-4, atol=0)


def test_fixed_switches_restrict_the_candidates():
    keys = torch.stack([_outlier_channel_head(1), _heavy_tailed_head(2)])[None]
    rotated, scaled = choose_key_flags(keys, 2, 32, rotate=True)
    assert rotated.all()
    rotated, scaled = choose_key_flags(keys, 2, 32, rotate=False, scale=True)
    assert not rotated.any() and scaled.all()
    rotated, scaled = choose_key_flags(keys, 2, 32, rotate=True)
    assert rotated.all()
    rotated, scaled = choose_key_flags(keys, 2, 32, scale=False)
    assert not scaled.any()
    with pytest.raises(ValueError, match="rotate"):
        choose_key_flags(keys, 2, 32, rotate="yes")


def test_config_accepts_auto_and_keeps_presets():
    cfg = OScaRConfig(rotate_keys="auto", token_scaling="auto")
    assert cfg.adaptive_keys
    assert not OScaRConfig.paper().adaptive_keys and not OScaRConfig.kivi().adaptive_keys
    with pytest.raises(ValueError, match="rotate_values"):
        OScaRConfig(rotate_values="auto")
    with pytest.raises(ValueError, match="token_scaling"):
        OScaRConfig(token_scaling="maybe")


@given(seed=seeds, t=st.integers(0, 300))
def test_fake_quantize_auto_decides_on_the_quantized_blocks(seed, t):
    cfg = OScaRConfig(rotate_keys="auto", token_scaling="auto", residual_length=64)
    keys = randn((1, 2, t, 32), seed=seed)
    keys[:, 1, :, 7] += 25.0
    values = randn((1, 2, t, 32), seed=seed + 1)
    k_hat, v_hat = fake_quantize(keys, values, cfg)
    n = t // 64 * 64
    if n:
        rot, scale = choose_key_flags(keys[:, :, :n], 2, 32)
        assert torch.equal(torch.stack(resolve_key_flags(keys[:, :, :n], cfg)), torch.stack((rot, scale)))
        ref = dequantize_keys(quantize_keys(keys[:, :, :n], 2, 32, rot, scale))
        torch.testing.assert_close(k_hat[:, :, :n], ref, rtol=0, atol=0)
        fixed = fake_quantize(keys, values, cfg.replace(rotate_keys=bool(rot[0]), token_scaling=bool(scale[0])))
        if rot[0] == rot[1] and scale[0] == scale[1]:
            torch.testing.assert_close(k_hat, fixed[0], rtol=0, atol=0)
    torch.testing.assert_close(k_hat[:, :, n:], keys[:, :, n:], rtol=0, atol=0)
