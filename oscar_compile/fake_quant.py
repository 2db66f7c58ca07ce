"""``fake_quantize``: quantize then dequantize a whole K/V history with the residual rule.

The research and ablation entry point (and the oracle for the cache and the compiled path).
"""

from __future__ import annotations

import torch

from .config import OScaRConfig
from .kernels.key_transform import choose_key_flags
from .kernels.quantization import dequantize_keys, dequantize_values, quantize_keys, quantize_values

__all__ = ["fake_quantize", "resolve_key_flags"]

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


def resolve_key_flags(keys: torch.Tensor, config: OScaRConfig, queries: torch.Tensor | None = None):
    """Per-head key flags ``(rotate, scale)`` for a layer whose first quantization holds ``keys``.

    keys: ``[B, Hkv, T, D]`` the complete blocks quantized first (normally the prompt's); queries:
    optional ``[B, Hq, Tq, D]`` of that step (the prompt's). Bools pass through unchanged; ``"auto"`` is
    decided by ``kernels.key_transform.choose_key_flags``. Returns bools or bool tensors ``[Hkv]``.
    """
    if not config.adaptive_keys:
        return config.rotate_keys, config.token_scaling
    return choose_key_flags(
        keys, config.bits, config.group_size, queries=queries, rotate=config.rotate_keys, scale=config.token_scaling
    )


def fake_quantize(
    keys: torch.Tensor,
    values: torch.Tensor,
    config: OScaRConfig | None = None,
    queries: torch.Tensor | None = None,
    prompt_length: int | None = None,
):
    """Return ``(keys_hat, values_hat)``: what attention reads from an OScaR cache holding these tokens.

    keys, values: ``[B, Hkv, T, D]`` float32/float16/bfloat16, D a multiple of ``config.group_size``.
    The first ``floor(T / R) * R`` tokens (``R = config.residual_length``) are quantized in complete
    blocks and dequantized back to the original space; the tail is returned unchanged. Outputs have
    the inputs' shapes and dtypes. With ``rotate_keys``/``token_scaling == "auto"`` the per-head key
    transform is chosen from the quantized keys (all complete blocks, as when a prompt is prefilled in one
    step) and ``queries`` ``[B, Hq, Tq, D]`` when given (:func:`resolve_key_flags`), per sequence. So with
    "auto" a longer history may decide differently from a shorter one; the cache decides once, at its first
    quantization, and keeps the flags (pass that history here to reproduce it).

    prompt_length: the OScaR cache decides "auto" at its first step, from that step's keys and queries
    (``oscar_compile.kv_tensor``); pass the first step's length (and its ``queries``) to decide from
    ``keys[:, :, :prompt_length]`` instead, which reproduces the cache for batch 1 (a batched cache makes one
    joint decision for all its sequences). None: the quantized blocks decide, as above.

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
    if config.adaptive_keys:  # each sequence decides its own flags (batch items stay independent)
        parts = []
        for b in range(keys.shape[0]):
            q_b = None if queries is None else queries[b:b + 1]
            decide_k = head_k if prompt_length is None else keys[:, :, :prompt_length]
            rotate, scale = resolve_key_flags(decide_k[b:b + 1], config, q_b)
            parts.append(dequantize_keys(quantize_keys(head_k[b:b + 1], config.bits, config.group_size, rotate, scale), keys.dtype))
        k_deq = torch.cat(parts)
    else:
        qk = quantize_keys(head_k, config.bits, config.group_size, config.rotate_keys, config.token_scaling)
        k_deq = dequantize_keys(qk, keys.dtype)
    qv = quantize_values(head_v, config.bits, config.group_size, config.rotate_values)
    keys_hat = torch.cat([k_deq, keys[:, :, n_quant:]], dim=2)
    values_hat = torch.cat([dequantize_values(qv, values.dtype), values[:, :, n_quant:]], dim=2)
    return keys_hat, values_hat
