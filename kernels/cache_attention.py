"""Attention of a step's queries over a layer's OScaR cache plus the step's own keys/values.

Semantics (every backend): for sequence ``b`` with ``L = lengths[b]`` stored tokens (quantized
``[0, Q)`` then residual), and this step's tokens ``new_*[b, :, skip[b]:]`` at positions ``L, L+1, ...``,
query ``i >= skip[b]`` attends to every stored token and to the step's tokens ``skip[b] .. i`` (causal,
at full precision; they are appended after attention, see ``append_kv``). Query rows ``i < skip[b]``
(left padding) return zeros. ``window`` (sliding-window layers): a query at position ``p`` sees only
positions ``> p - window``. ``softcap``: scores become ``tanh(s / softcap) * softcap``.
"""

from __future__ import annotations

import torch

from .attention_ref import quantized_attention_ref
from .cache_layout import CacheFormat, CacheTensors
from .quantization import QuantizedKeys, QuantizedValues

__all__ = ["cache_attention_ref", "check_attention_inputs"]


def check_attention_inputs(query, cache: CacheTensors, new_keys, new_values, skip) -> None:
    """Shape/dtype/device checks shared by every attention backend (no host sync)."""
    if query.dim() != 4:
        raise ValueError(f"query must be [B, Hq, T, D], got shape {tuple(query.shape)}")
    b, h, _, d = cache.residual_keys.shape
    qb, hq, tq, qd = query.shape
    if qb != b or qd != d:
        raise ValueError(f"query {tuple(query.shape)} does not match the cache (B={b}, D={d})")
    if hq % h:
        raise ValueError(f"query heads {hq} not a multiple of the cache's kv heads {h}")
    if new_keys is not None:
        if new_keys.shape != new_values.shape or new_keys.shape != (b, h, tq, d):
            raise ValueError(
                f"new keys {tuple(new_keys.shape)} / values {tuple(new_values.shape)} must be "
                f"[B={b}, Hkv={h}, T={tq}, D={d}] to match the query {tuple(query.shape)}"
            )
    if query.device != cache.lengths.device:
        raise ValueError(f"query on {query.device}, cache on {cache.lengths.device}")
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"query must be float16, bfloat16 or float32, got {query.dtype}")
    if skip is not None and (skip.shape != (b,) or skip.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"skip must be an int tensor of shape ({b},), got {skip.dtype} {tuple(skip.shape)}")


def _sequence_slices(cache: CacheTensors, fmt: CacheFormat, b: int, n_quant: int):
    per_byte, g = 8 // fmt.bits, fmt.group_size
    if n_quant == 0:
        return None, None
    keys = QuantizedKeys(
        codes=cache.key_codes[b : b + 1, :, : n_quant // per_byte],
        mn=cache.key_mn[b : b + 1, :, : n_quant // g],
        scale=cache.key_scale[b : b + 1, :, : n_quant // g],
        norms=cache.key_norms[b : b + 1, :n_quant],
        rotated=cache.key_rotated,
        scaled=cache.key_scaled,
        bits=fmt.bits,
        group_size=g,
    )
    values = QuantizedValues(
        codes=cache.value_codes[b : b + 1, :, :n_quant],
        mn=cache.value_mn[b : b + 1, :, :n_quant],
        scale=cache.value_scale[b : b + 1, :, :n_quant],
        rotated=fmt.rotate_values,
        bits=fmt.bits,
        group_size=g,
    )
    return keys, values


@torch.no_grad()
def cache_attention_ref(
    query: torch.Tensor,
    cache: CacheTensors,
    fmt: CacheFormat,
    new_keys: torch.Tensor | None = None,
    new_values: torch.Tensor | None = None,
    skip: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """query ``[B, Hq, T, D]``, new keys/values ``[B, Hkv, T, D]`` or None -> ``[B, Hq, T, D]`` (query dtype)."""
    check_attention_inputs(query, cache, new_keys, new_values, skip)
    bsz, hq, tq, d = query.shape
    r = fmt.residual_length
    out = torch.zeros_like(query)
    lengths = cache.lengths.tolist()
    skips = [0] * bsz if skip is None else skip.tolist()
    for b in range(bsz):
        length, s = lengths[b], skips[b]
        n_quant, n_res = length // r * r, length % r
        keys, values = _sequence_slices(cache, fmt, b, n_quant)
        res_k = [cache.residual_keys[b : b + 1, :, :n_res]]
        res_v = [cache.residual_values[b : b + 1, :, :n_res]]
        if new_keys is not None:
            res_k.append(new_keys[b : b + 1, :, s:].to(res_k[0].dtype))
            res_v.append(new_values[b : b + 1, :, s:].to(res_v[0].dtype))
        res_k, res_v = torch.cat(res_k, 2), torch.cat(res_v, 2)
        total = n_quant + res_k.shape[2]
        if total == 0 or s >= tq:
            continue
        n_q = tq - s
        q_pos = torch.arange(total - n_q, total, device=query.device)[:, None]
        k_pos = torch.arange(total, device=query.device)[None, :]
        allowed = k_pos <= q_pos
        if window is not None:
            allowed &= k_pos > q_pos - window
        out[b : b + 1, :, s:] = quantized_attention_ref(
            query[b : b + 1, :, s:],
            keys,
            values,
            res_k if res_k.shape[2] else None,
            res_v if res_v.shape[2] else None,
            scale=scale,
            attn_mask=allowed,
            softcap=softcap,
        )
    return out
