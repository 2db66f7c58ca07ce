"""Reference OScaR quantization of keys and values (DESIGN.md §2.1–2.4, §2.7), in plain torch.

This is the CPU path and the oracle for the Triton kernels: every kernel must produce the same codes
(and the same fp16 group parameters) as these functions.

Asymmetric rule for one group ``x`` with ``L = 2**bits - 1`` levels, computed in fp32::

    mn    = fp16(min x)                     # stored
    scale = fp16((max x - min x) / L)       # stored
    code  = clamp(floor((x - mn) * inv + 0.5), 0, L)   where inv = 1 / scale (0 when scale == 0)
    x_hat = mn + scale * code

Codes are computed against the *stored* fp16 parameters so that dequantization reproduces exactly what
was measured; a constant group has ``scale == 0`` and dequantizes to ``mn`` (exact when the value is
representable in fp16). ``floor(y + 0.5)`` (not round-half-even) is the rounding every backend uses.

Keys (per layer, ``[B, Hkv, T, D]``):
  1. ``n_t = ||k_t||_2`` over all kv heads and channels (fp32; a zero norm counts as 1). The Hadamard
     rotation is orthonormal, so the norm is the same before and after it.
  2. per kv head ``h``: ``k'_h = k_h H`` if ``rotated[h]`` else ``k_h``; ``k'_h / n_t`` if ``scaled[h]``.
  3. per (head, channel), groups of ``group_size`` consecutive tokens, codes packed along tokens.
Values: ``v' = v H`` if ``rotated`` (one switch per layer), then per token groups of ``group_size``
consecutive channels, codes packed along channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .hadamard import hadamard_transform
from .packing import codes_per_byte, pack_codes, unpack_codes

__all__ = [
    "QuantizedKeys",
    "QuantizedValues",
    "quantize_groups",
    "dequantize_groups",
    "key_token_norms",
    "quantize_keys",
    "dequantize_keys",
    "dequantize_keys_transformed",
    "quantize_values",
    "dequantize_values",
    "dequantize_values_transformed",
    "head_flags",
]


def quantize_groups(x: torch.Tensor, bits: int, dim: int):
    """Quantize ``x`` with one (mn, scale) per slice along ``dim`` (the group axis).

    x: any float tensor; the reduction runs over ``dim``. Returns ``(codes uint8 same shape as x,
    mn fp16, scale fp16)`` where ``mn``/``scale`` keep ``dim`` with size 1.
    """
    levels = (1 << bits) - 1
    xf = x.to(torch.float32)
    lo = xf.amin(dim, keepdim=True)
    hi = xf.amax(dim, keepdim=True)
    mn = lo.to(torch.float16)
    scale = ((hi - lo) / levels).to(torch.float16)
    mn_f, scale_f = mn.to(torch.float32), scale.to(torch.float32)
    inv = torch.where(scale_f > 0, 1.0 / scale_f, torch.zeros_like(scale_f))
    codes = torch.floor((xf - mn_f) * inv + 0.5).clamp_(0, levels).to(torch.uint8)
    return codes, mn, scale


def dequantize_groups(codes: torch.Tensor, mn: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``mn + scale * code`` in fp32; ``mn``/``scale`` broadcast against ``codes``."""
    return mn.to(torch.float32) + scale.to(torch.float32) * codes.to(torch.float32)


def head_flags(flag, num_heads: int, device) -> torch.Tensor:
    """A per-kv-head bool tensor ``[Hkv]`` from a Python bool or a bool tensor of that shape."""
    if isinstance(flag, torch.Tensor):
        if flag.shape != (num_heads,) or flag.dtype != torch.bool:
            raise ValueError(
                f"per-head flag must be a bool tensor of shape ({num_heads},), "
                f"got {flag.dtype} {tuple(flag.shape)}"
            )
        return flag.to(device)
    return torch.full((num_heads,), bool(flag), dtype=torch.bool, device=device)


@dataclass
class QuantizedKeys:
    """Quantized keys of ``T`` tokens (``T`` a multiple of ``group_size``).

    ======== ================================== ======= ===========================================
    field    shape                              dtype   meaning
    ======== ================================== ======= ===========================================
    codes    ``[B, Hkv, T * bits // 8, D]``     uint8   codes packed along tokens (see packing.py)
    mn       ``[B, Hkv, T // group_size, D]``   fp16    group minimum
    scale    ``[B, Hkv, T // group_size, D]``   fp16    group step ``(max - min) / (2**bits - 1)``
    norms    ``[B, T]``                         fp32    omni-token key norm (always stored)
    rotated  ``[Hkv]``                          bool    head was Hadamard-rotated
    scaled   ``[Hkv]``                          bool    head was divided by ``norms``
    ======== ================================== ======= ===========================================
    """

    codes: torch.Tensor
    mn: torch.Tensor
    scale: torch.Tensor
    norms: torch.Tensor
    rotated: torch.Tensor
    scaled: torch.Tensor
    bits: int
    group_size: int

    @property
    def num_tokens(self) -> int:
        return self.norms.shape[-1]


@dataclass
class QuantizedValues:
    """Quantized values of ``T`` tokens.

    ======== ================================== ======= ===========================================
    field    shape                              dtype   meaning
    ======== ================================== ======= ===========================================
    codes    ``[B, Hkv, T, D * bits // 8]``     uint8   codes packed along channels
    mn       ``[B, Hkv, T, D // group_size]``   fp16    group minimum
    scale    ``[B, Hkv, T, D // group_size]``   fp16    group step
    ======== ================================== ======= ===========================================

    ``rotated`` (bool) says whether ``v H`` was quantized instead of ``v``.
    """

    codes: torch.Tensor
    mn: torch.Tensor
    scale: torch.Tensor
    rotated: bool
    bits: int
    group_size: int

    @property
    def num_tokens(self) -> int:
        return self.codes.shape[-2]


def _check_kv(x: torch.Tensor, name: str, group_size: int, token_groups: bool) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name} must be [B, Hkv, T, D], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a float tensor, got {x.dtype}")
    d = x.shape[-1]
    if d % group_size:
        raise ValueError(f"head_dim {d} not a multiple of group_size {group_size} ({name}: {tuple(x.shape)})")
    if token_groups and x.shape[2] % group_size:
        raise ValueError(
            f"{name} has {x.shape[2]} tokens, not a multiple of group_size {group_size}; "
            "only complete groups are quantized"
        )


def key_token_norms(keys: torch.Tensor) -> torch.Tensor:
    """Omni-token norm ``[B, T]`` fp32 of keys ``[B, Hkv, T, D]``: over all kv heads and channels; 0 -> 1."""
    norms = keys.to(torch.float32).square().sum(dim=(1, 3)).sqrt()
    return torch.where(norms > 0, norms, torch.ones_like(norms))


def _transform_keys(keys: torch.Tensor, rotated: torch.Tensor, scaled: torch.Tensor, norms: torch.Tensor):
    kf = keys.to(torch.float32)
    kf = torch.where(rotated[:, None, None], hadamard_transform(kf), kf)
    return torch.where(scaled[:, None, None], kf / norms[:, None, :, None], kf)


def quantize_keys(
    keys: torch.Tensor,
    bits: int = 2,
    group_size: int = 32,
    rotate=True,
    token_scaling=True,
) -> QuantizedKeys:
    """Quantize keys ``[B, Hkv, T, D]`` (``T`` a multiple of ``group_size``) per channel over token groups.

    ``rotate``/``token_scaling``: a bool for every head, or a bool tensor ``[Hkv]`` per head.
    """
    codes_per_byte(bits)
    _check_kv(keys, "keys", group_size, token_groups=True)
    b, h, t, d = keys.shape
    rotated = head_flags(rotate, h, keys.device)
    scaled = head_flags(token_scaling, h, keys.device)
    norms = key_token_norms(keys)
    x = _transform_keys(keys, rotated, scaled, norms)
    codes, mn, scale = quantize_groups(x.reshape(b, h, t // group_size, group_size, d), bits, dim=3)
    return QuantizedKeys(
        codes=pack_codes(codes.reshape(b, h, t, d), bits, dim=2),
        mn=mn.squeeze(3),
        scale=scale.squeeze(3),
        norms=norms,
        rotated=rotated,
        scaled=scaled,
        bits=bits,
        group_size=group_size,
    )


def dequantize_keys_transformed(q: QuantizedKeys) -> torch.Tensor:
    """Dequantized keys in the quantized space (rotated/divided as each head was), fp32 ``[B, Hkv, T, D]``."""
    codes = unpack_codes(q.codes, q.bits, dim=2)
    b, h, t, d = codes.shape
    g = q.group_size
    x = dequantize_groups(codes.reshape(b, h, t // g, g, d), q.mn[:, :, :, None], q.scale[:, :, :, None])
    return x.reshape(b, h, t, d)


def dequantize_keys(q: QuantizedKeys, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize back to the original key space: ``[B, Hkv, T, D]`` in ``dtype``."""
    x = dequantize_keys_transformed(q)
    x = torch.where(q.scaled[:, None, None], x * q.norms[:, None, :, None], x)
    x = torch.where(q.rotated[:, None, None], hadamard_transform(x), x)
    return x.to(dtype)


def quantize_values(values: torch.Tensor, bits: int = 2, group_size: int = 32, rotate: bool = True) -> QuantizedValues:
    """Quantize values ``[B, Hkv, T, D]`` per token over groups of ``group_size`` channels."""
    codes_per_byte(bits)
    _check_kv(values, "values", group_size, token_groups=False)
    b, h, t, d = values.shape
    x = hadamard_transform(values) if rotate else values.to(torch.float32)
    codes, mn, scale = quantize_groups(x.reshape(b, h, t, d // group_size, group_size), bits, dim=4)
    return QuantizedValues(
        codes=pack_codes(codes.reshape(b, h, t, d), bits, dim=3),
        mn=mn.squeeze(4),
        scale=scale.squeeze(4),
        rotated=bool(rotate),
        bits=bits,
        group_size=group_size,
    )


def dequantize_values_transformed(q: QuantizedValues) -> torch.Tensor:
    """Dequantized values in the quantized (possibly rotated) space, fp32 ``[B, Hkv, T, D]``."""
    codes = unpack_codes(q.codes, q.bits, dim=3)
    b, h, t, d = codes.shape
    g = q.group_size
    x = dequantize_groups(codes.reshape(b, h, t, d // g, g), q.mn[..., None], q.scale[..., None])
    return x.reshape(b, h, t, d)


def dequantize_values(q: QuantizedValues, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize back to the original value space: ``[B, Hkv, T, D]`` in ``dtype``."""
    x = dequantize_values_transformed(q)
    return (hadamard_transform(x) if q.rotated else x).to(dtype)
