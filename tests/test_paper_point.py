"""The paper's claim on synthetic data: token-norm imbalance + outlier channels hurt KIVI, OScaR fixes them.

Keys: a few outlier channels (4x) and, every 16th token, a low-norm token (0.05x) that the queries
align with (as attention sinks do in real models: low key norm, large attention mass). Values: the same
outlier channels. OScaR-2 (rotate keys + values, scale keys) must have a lower attention-output error
than KIVI-2 (nothing rotated or scaled) on every seed, and clearly lower on average. Each switch alone is
printed (pytest -s). On this data key rotation carries most of the gain (mean relative output error over
16 seeds: KIVI-2 0.83, rotate keys 0.62, rotate values 0.78, scale keys 0.86, OScaR-2 0.55); on real models
key rotation can also hurt badly (DESIGN.md §2.8), which is why it is a separate switch.
"""

import pytest
import torch
import torch.nn.functional as F

from oscar_compile import OScaRConfig, fake_quantize

OSCAR_OVER_KIVI_MAX = 0.75  # mean OScaR-2 error must be at most this fraction of KIVI-2's

VARIANTS = {
    "KIVI-2": OScaRConfig.kivi(),
    "rotate keys": OScaRConfig.kivi(rotate_keys=True),
    "rotate values": OScaRConfig.kivi(rotate_values=True),
    "scale keys": OScaRConfig.kivi(token_scaling=True),
    "OScaR-2": OScaRConfig.paper(),
}


def imbalanced_qkv(seed, batch=1, kv_heads=8, group=2, tokens=512, head_dim=64):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, kv_heads, tokens, head_dim, generator=gen)
    keys[..., :4] *= 4.0
    keys[:, :, ::16] *= 0.05
    sink_dir = keys[:, :, ::16].mean(2, keepdim=True).repeat_interleave(group, 1)
    queries = 0.3 * torch.randn(batch, kv_heads * group, 16, head_dim, generator=gen)
    queries += 2.0 * head_dim**0.5 * sink_dir / sink_dir.norm(dim=-1, keepdim=True)
    values = torch.randn(batch, kv_heads, tokens, head_dim, generator=gen)
    values[..., :4] *= 4.0
    return queries, keys, values


def output_error(config, q, k, v):
    k_hat, v_hat = fake_quantize(k, v, config)
    ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    out = F.scaled_dot_product_attention(q, k_hat, v_hat, enable_gqa=True)
    return ((out - ref).norm() / ref.norm()).item()


def test_oscar_beats_kivi_on_norm_imbalance():
    mean = dict.fromkeys(VARIANTS, 0.0)
    seeds = range(8)
    for seed in seeds:
        q, k, v = imbalanced_qkv(seed)
        errors = {name: output_error(cfg, q, k, v) for name, cfg in VARIANTS.items()}
        print(f"seed {seed}: " + ", ".join(f"{n} {e:.3f}" for n, e in errors.items()))
        assert errors["OScaR-2"] < errors["KIVI-2"], (seed, errors)
        for name, e in errors.items():
            mean[name] += e / len(seeds)
    print("mean: " + ", ".join(f"{n} {e:.3f}" for n, e in mean.items()))
    assert mean["OScaR-2"] < OSCAR_OVER_KIVI_MAX * mean["KIVI-2"], mean


def test_four_bit_is_much_closer_than_two_bit():
    q, k, v = imbalanced_qkv(0)
    two = output_error(OScaRConfig.paper(), q, k, v)
    four = output_error(OScaRConfig.paper(bits=4), q, k, v)
    assert four < 0.3 * two
