"""Storage of one layer's OScaR KV cache: the tensors every cache kernel reads and writes.

The cache is preallocated to ``max_len`` tokens per sequence (a multiple of ``residual_length``), so
shapes are static and a decode step can be captured in a CUDA graph. Each sequence ``b`` stores its
own tokens from slot 0 (left padding is never written), so sequences of different lengths keep the
quantization groups they would have alone. ``lengths[b]`` is the number of tokens stored:

* slots ``[0, Q_b)`` with ``Q_b = lengths[b] // R * R`` are quantized (complete blocks of ``R``);
* the newest ``lengths[b] % R`` tokens sit in ``residual_*[b, :, :lengths[b] % R]`` at full precision,
  in the original (unrotated, unscaled) space.

=============== ========================================= ======= =====================================
field           shape                                     dtype   meaning
=============== ========================================= ======= =====================================
key_codes       ``[B, Hkv, max_len * bits // 8, D]``      uint8   key codes, packed along tokens
key_mn          ``[B, Hkv, max_len // G, D]``             fp16    key group minimum (per channel)
key_scale       ``[B, Hkv, max_len // G, D]``             fp16    key group step
key_norms       ``[B, max_len]``                          fp32    omni-token key norm
value_codes     ``[B, Hkv, max_len, D * bits // 8]``      uint8   value codes, packed along channels
value_mn        ``[B, Hkv, max_len, D // G]``             fp16    value group minimum (per token)
value_scale     ``[B, Hkv, max_len, D // G]``             fp16    value group step
residual_keys   ``[B, Hkv, R, D]``                        model   newest keys, original space
residual_values ``[B, Hkv, R, D]``                        model   newest values, original space
lengths         ``[B]``                                   int32   tokens stored per sequence
key_rotated     ``[Hkv]``                                 bool    head's keys (and queries) are rotated
key_scaled      ``[Hkv]``                                 bool    head's keys are divided by the norm
=============== ========================================= ======= =====================================

``G`` is ``group_size``, ``R`` is ``residual_length``. The per-head key flags are state, not format:
they may be decided at run time (before the first block is quantized) and must not change after.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .packing import codes_per_byte

__all__ = ["CacheFormat", "CacheTensors", "allocate_cache", "cache_nbytes"]


class CacheFormat(NamedTuple):
    """Static format of a layer's cache (compile-time constants for the kernels)."""

    bits: int = 2
    group_size: int = 32
    residual_length: int = 128
    rotate_values: bool = True


class CacheTensors(NamedTuple):
    """One layer's cache storage; see the module docstring for shapes and dtypes."""

    key_codes: torch.Tensor
    key_mn: torch.Tensor
    key_scale: torch.Tensor
    key_norms: torch.Tensor
    value_codes: torch.Tensor
    value_mn: torch.Tensor
    value_scale: torch.Tensor
    residual_keys: torch.Tensor
    residual_values: torch.Tensor
    lengths: torch.Tensor
    key_rotated: torch.Tensor
    key_scaled: torch.Tensor

    @property
    def max_len(self) -> int:
        return self.value_codes.shape[2]

    @property
    def head_dim(self) -> int:
        return self.residual_keys.shape[-1]


def _check_format(fmt: CacheFormat, max_len: int, head_dim: int) -> None:
    codes_per_byte(fmt.bits)
    if fmt.residual_length % fmt.group_size:
        raise ValueError(f"residual_length {fmt.residual_length} not a multiple of group_size {fmt.group_size}")
    if max_len <= 0 or max_len % fmt.residual_length:
        raise ValueError(f"max_len {max_len} must be a positive multiple of residual_length {fmt.residual_length}")
    if head_dim % fmt.group_size:
        raise ValueError(f"head_dim {head_dim} not a multiple of group_size {fmt.group_size}")


def allocate_cache(
    batch: int,
    kv_heads: int,
    max_len: int,
    head_dim: int,
    fmt: CacheFormat,
    dtype: torch.dtype,
    device=None,
    rotate_keys=True,
    token_scaling=True,
) -> CacheTensors:
    """Zeroed storage for ``batch`` sequences of up to ``max_len`` tokens; ``lengths`` start at 0.

    ``rotate_keys``/``token_scaling``: initial per-head key flags (bool, or bool tensor ``[Hkv]``).
    """
    _check_format(fmt, max_len, head_dim)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"cache dtype must be float16, bfloat16 or float32, got {dtype}")
    per_byte = codes_per_byte(fmt.bits)
    g, r = fmt.group_size, fmt.residual_length
    kw = dict(device=device)

    def flags(flag):
        if isinstance(flag, torch.Tensor):
            return flag.to(device=device, dtype=torch.bool).clone()
        return torch.full((kv_heads,), bool(flag), dtype=torch.bool, **kw)

    return CacheTensors(
        key_codes=torch.zeros(batch, kv_heads, max_len // per_byte, head_dim, dtype=torch.uint8, **kw),
        key_mn=torch.zeros(batch, kv_heads, max_len // g, head_dim, dtype=torch.float16, **kw),
        key_scale=torch.zeros(batch, kv_heads, max_len // g, head_dim, dtype=torch.float16, **kw),
        key_norms=torch.ones(batch, max_len, dtype=torch.float32, **kw),
        value_codes=torch.zeros(batch, kv_heads, max_len, head_dim // per_byte, dtype=torch.uint8, **kw),
        value_mn=torch.zeros(batch, kv_heads, max_len, head_dim // g, dtype=torch.float16, **kw),
        value_scale=torch.zeros(batch, kv_heads, max_len, head_dim // g, dtype=torch.float16, **kw),
        residual_keys=torch.zeros(batch, kv_heads, r, head_dim, dtype=dtype, **kw),
        residual_values=torch.zeros(batch, kv_heads, r, head_dim, dtype=dtype, **kw),
        lengths=torch.zeros(batch, dtype=torch.int32, **kw),
        key_rotated=flags(rotate_keys),
        key_scaled=flags(token_scaling),
    )


def cache_nbytes(cache: CacheTensors) -> int:
    """Exact bytes held by the cache's tensors."""
    return sum(t.numel() * t.element_size() for t in cache)
