"""Hypothesis strategies and small helpers shared by the test modules (tests/ is on sys.path)."""

import torch
from hypothesis import strategies as st

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HEAD_DIMS = (32, 64, 96, 128, 256)  # 96: non-power-of-two (Hadamard blocks of 32)

float_dtypes = st.sampled_from(FLOAT_DTYPES)
head_dims = st.sampled_from(HEAD_DIMS)
bits = st.sampled_from((2, 4))
seeds = st.integers(0, 2**31 - 1)


def randn(shape, dtype=torch.float32, seed=0, scale=1.0):
    """Deterministic normal tensor (fp32 draw, then cast)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def poisoned_cache(device, batch, heads, max_len, dim, fmt, dtype, rot, scl):
    """A cache whose storage is poison (0xFF codes, NaN params/residual): unwritten elements show up."""
    from oscar_compile.kernels import allocate_cache

    cache = allocate_cache(batch, heads, max_len, dim, fmt, dtype, device, rotate_keys=rot, token_scaling=scl)
    for name in ("key_codes", "value_codes"):
        getattr(cache, name).fill_(0xFF)
    for name in ("key_mn", "key_scale", "key_norms", "value_mn", "value_scale", "residual_keys", "residual_values"):
        getattr(cache, name).fill_(float("nan"))
    return cache


def cache_arg(cache) -> dict:
    """``{"cache": cache}`` on transformers versions whose models take ``cache=`` (5.2x), else
    ``{"past_key_values": cache}`` (5.17): keyword arguments for ``generate`` / ``forward``."""
    import inspect

    from transformers import LlamaForCausalLM

    return {"cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values": cache}
