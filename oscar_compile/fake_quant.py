"""``fake_quantize``: quantize then dequantize a whole K/V history with the residual rule.

The research and ablation entry point (and the oracle for the cache and the compiled path).
"""

from __future__ import annotations

import torch

from .config import OScaRConfig
from .kernels.quantization import dequantize_keys, dequantize_values, quantize_keys, quantize_values

__all__ = ["fake_quantize"]

_FP16_MAX = 65504.0


def _check(keys: torch.Tensor, values: torch.Tensor) -> None:
    for name, x in (("keys", keys), ("values", values)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, Hkv, T, D], got {getattr(x, 'shape', type(x))}")
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if keys.shape != values.shape:
        raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} must have the same shape")
    if keys.device != values.device:
        raise ValueError(f"keys on {keys.device} but values on {values.device}")


def fake_quantize(keys: torch.Tensor, values: torch.Tensor, config: OScaRConfig | None = None):
    """Return ``(keys_hat, values_hat)``: what attention reads from an OScaR cache holding these tokens.

    keys, values: ``[B, Hkv, T, D]`` float32/float16/bfloat16, D a multiple of ``config.group_size``.
    The first ``floor(T / R) * R`` tokens (``R = config.residual_length``) are quantized in complete
    blocks and dequantized back to the original space; the tail is returned unchanged. Outputs have
    the inputs' shapes and dtypes.

    Raises ValueError for non-finite inputs in the quantized prefix and for values beyond the fp16 range
    of the group parameters (the cache could not represent them).
    """
    config = config or OScaRConfig()
    _check(keys, values)
    t = keys.shape[2]
    n_quant = (t // config.residual_length) * config.residual_length
    if n_quant == 0:
        return keys.clone(), values.clone()
    head_k, head_v = keys[:, :, :n_quant], values[:, :, :n_quant]
    for name, x in (("keys", head_k), ("values", head_v)):
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} contain non-finite values in the tokens to quantize")
        if x.abs().max() > _FP16_MAX:
            raise ValueError(f"{name} exceed the fp16 range ({_FP16_MAX}) of the quantization parameters")
    qk = quantize_keys(head_k, config.bits, config.group_size, config.rotate_keys, config.token_scaling)
    qv = quantize_values(head_v, config.bits, config.group_size, config.rotate_values)
    keys_hat = torch.cat([dequantize_keys(qk, keys.dtype), keys[:, :, n_quant:]], dim=2)
    values_hat = torch.cat([dequantize_values(qv, values.dtype), values[:, :, n_quant:]], dim=2)
    return keys_hat, values_hat
