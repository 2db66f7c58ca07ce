"""Quantize-on-write: append new keys/values to a layer's cache (DESIGN.md §2.5).

Semantics (every backend): for each sequence ``b``, the new tokens ``new_*[b, :, skip[b]:]`` (the first
``skip[b]`` are left padding and are never stored) go after the sequence's residual tokens; every
complete block of ``residual_length`` tokens is quantized once into slots ``[Q_b, Q_b + R)`` and the
rest becomes the new residual. ``lengths[b]`` grows by the number of stored tokens.

Order within a model step: attention first (``cache_attention``: the step's queries see the stored
cache plus the step's own keys/values at full precision), then this append. So a prompt attends to
itself at full precision and later chunks attend to the quantized past plus themselves (§2.6).
"""

from __future__ import annotations

import torch

from .cache_layout import CacheFormat, CacheTensors
from .quantization import quantize_keys, quantize_values

__all__ = ["append_kv_ref", "check_append_inputs"]


def check_append_inputs(cache: CacheTensors, new_keys: torch.Tensor, new_values: torch.Tensor, skip) -> None:
    """Shape/dtype/device checks shared by every append backend (no host sync)."""
    if new_keys.dim() != 4 or new_keys.shape != new_values.shape:
        raise ValueError(
            f"new keys/values must both be [B, Hkv, T_new, D]; got {tuple(new_keys.shape)} and {tuple(new_values.shape)}"
        )
    b, h, _, d = cache.residual_keys.shape
    nb, nh, _, nd = new_keys.shape
    if (nb, nh, nd) != (b, h, d):
        raise ValueError(
            f"new keys {tuple(new_keys.shape)} do not match the cache (B={b}, Hkv={h}, D={d})"
        )
    if new_keys.device != cache.lengths.device or new_values.device != cache.lengths.device:
        raise ValueError(f"new keys on {new_keys.device}, values on {new_values.device}, cache on {cache.lengths.device}")
    if not new_keys.is_floating_point() or not new_values.is_floating_point():
        raise TypeError(f"new keys/values must be float, got {new_keys.dtype}/{new_values.dtype}")
    if skip is not None and (skip.shape != (b,) or skip.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"skip must be an int tensor of shape ({b},), got {skip.dtype} {tuple(skip.shape)}")


@torch.no_grad()
def append_kv_ref(
    cache: CacheTensors,
    fmt: CacheFormat,
    new_keys: torch.Tensor,
    new_values: torch.Tensor,
    skip: torch.Tensor | None = None,
) -> None:
    """Append ``new_keys``/``new_values`` ``[B, Hkv, T_new, D]`` to ``cache`` in place (reference).

    skip: int ``[B]``, leading tokens of this chunk not to store (left padding); None means 0.
    Raises ValueError when a sequence would exceed the cache's ``max_len`` (nothing is written then).
    Host-synchronizing reference: the CPU path and the oracle for the Triton kernel.
    """
    check_append_inputs(cache, new_keys, new_values, skip)
    r = fmt.residual_length
    per_byte = 8 // fmt.bits
    g = fmt.group_size
    t_new = new_keys.shape[2]
    lengths = cache.lengths.tolist()
    skips = [0] * len(lengths) if skip is None else skip.tolist()
    for b, (length, s) in enumerate(zip(lengths, skips)):
        if not 0 <= s <= t_new:
            raise ValueError(f"skip[{b}] = {s} outside [0, {t_new}]")
        if length + t_new - s > cache.max_len:
            raise ValueError(
                f"cache overflow: sequence {b} holds {length} tokens, appending {t_new - s} exceeds max_len {cache.max_len}"
            )
    for b, (length, s) in enumerate(zip(lengths, skips)):
        n_quant, n_res = length // r * r, length % r
        keys = torch.cat([cache.residual_keys[b, :, :n_res], new_keys[b, :, s:].to(cache.residual_keys.dtype)], 1)
        values = torch.cat([cache.residual_values[b, :, :n_res], new_values[b, :, s:].to(cache.residual_values.dtype)], 1)
        n_blocks = keys.shape[1] // r
        if n_blocks:
            done = n_blocks * r
            qk = quantize_keys(keys[None, :, :done], fmt.bits, g, cache.key_rotated, cache.key_scaled)
            qv = quantize_values(values[None, :, :done], fmt.bits, g, fmt.rotate_values)
            t0, t1 = n_quant, n_quant + done
            cache.key_codes[b, :, t0 // per_byte : t1 // per_byte] = qk.codes[0]
            cache.key_mn[b, :, t0 // g : t1 // g] = qk.mn[0]
            cache.key_scale[b, :, t0 // g : t1 // g] = qk.scale[0]
            cache.key_norms[b, t0:t1] = qk.norms[0]
            cache.value_codes[b, :, t0:t1] = qv.codes[0]
            cache.value_mn[b, :, t0:t1] = qv.mn[0]
            cache.value_scale[b, :, t0:t1] = qv.scale[0]
        rest = keys.shape[1] - n_blocks * r
        cache.residual_keys[b, :, :rest] = keys[:, n_blocks * r :]
        cache.residual_values[b, :, :rest] = values[:, n_blocks * r :]
        cache.lengths[b] = length + t_new - s
