"""Causal attention of a long step's own tokens (prefill) with its log-sum-exp, and the LSE merge.

A step of ``T`` tokens attends to the stored cache and, causally, to its own tokens at full precision
(``cache_attention``'s semantics). For ``T >= DENSE_MIN_QUERIES`` the second part is ordinary causal
self-attention, which flash attention does on tensor cores; the split kernel's CUDA-core loop over new
tokens is quadratic in ``T`` and meant for decode steps. :func:`cache_attention` then attends to the
stored tokens alone, returning their log-sum-exp, and :func:`merge_attention` combines the two exactly.

Left padding (``skip[b]`` pad tokens at the start of sequence ``b``) is handled without a mask and
without a host sync: each sequence is rotated left by ``skip[b]`` (a device-side gather), so its real
tokens start at 0 and plain causal attention is exact for them; the result is rotated back and the pad
rows set to zero (``-inf`` log-sum-exp).
"""

from __future__ import annotations

import torch

__all__ = ["DENSE_MIN_QUERIES", "causal_attention", "causal_attention_lse", "merge_attention", "uses_dense_new_tokens"]

# Steps with at least this many query positions attend to their own tokens with flash attention.
DENSE_MIN_QUERIES = 64


def uses_dense_new_tokens(query: torch.Tensor, new_keys: torch.Tensor | None, softcap, window) -> bool:
    """Whether a step takes the flash-attention route (softcap and sliding windows stay in the kernel)."""
    if new_keys is None or softcap is not None or window is not None:
        return False
    if query.shape[2] < DENSE_MIN_QUERIES or query.dtype not in (torch.float16, torch.bfloat16):
        return False
    if query.device.type == "cuda":
        return torch.cuda.get_device_capability(query.device) >= (8, 0)
    return query.device.type == "cpu"


def _flash_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    # q/k/v [B, H, T, D], equal heads -> out [B, H, T, D] (q dtype), lse [B, H, T] fp32 (natural log)
    if q.device.type == "cuda":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
    return out, lse


def _gather_positions(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    # x [B, H, T, ...], index [B, T] -> x[b, :, index[b, t]]
    idx = index.reshape(index.shape[0], 1, index.shape[1], *([1] * (x.dim() - 3)))
    return x.gather(2, idx.expand(x.shape))


def causal_attention_lse(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    skip: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of a step's tokens to themselves, left pads excluded, with its log-sum-exp.

    query ``[B, Hq, T, D]``, keys/values ``[B, Hkv, T, D]`` (``Hq`` a multiple of ``Hkv``), skip ``[B]``
    int or None -> (out ``[B, Hq, T, D]`` query dtype, lse ``[B, Hq, T]`` fp32 natural log). Rows
    ``t < skip[b]`` give zeros and ``-inf``.
    """
    return _causal(query, keys, values, skip, scale, with_lse=True)


def causal_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, skip: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """:func:`causal_attention_lse` without the log-sum-exp: PyTorch's SDPA with native GQA, so the
    fastest backend of the device (cuDNN on Hopper) and no expanded copy of the keys/values."""
    return _causal(query, keys, values, skip, scale, with_lse=False)[0]


def _causal(query, keys, values, skip, scale, with_lse: bool):
    bsz, hq, t, _ = query.shape
    group = hq // keys.shape[1]
    keys, values = keys.to(query.dtype), values.to(query.dtype)
    if skip is not None:
        s = skip.to(torch.long).clamp(0, t)
        pos = torch.arange(t, device=query.device)
        rolled = (pos[None, :] + s[:, None]) % t  # rolled row i holds original row i + s
        query, keys, values = (_gather_positions(x, rolled) for x in (query, keys, values))
    lse = None
    if with_lse:
        if group > 1:
            keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
        out, lse = _flash_lse(query.contiguous(), keys.contiguous(), values.contiguous(), scale)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(
            query, keys, values, is_causal=True, scale=scale, enable_gqa=group > 1
        )
    if skip is not None:
        back = (pos[None, :] - s[:, None]) % t
        pad = pos[None, :] < s[:, None]  # [B, T]
        out = _gather_positions(out, back).masked_fill(pad[:, None, :, None], 0.0)
        if with_lse:
            lse = _gather_positions(lse, back).masked_fill(pad[:, None, :], float("-inf"))
    return out, lse


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> torch.Tensor:
    """Attention over two disjoint token sets from each one's normalized output and log-sum-exp.

    out ``[..., T, D]``, lse ``[..., T]`` (natural log, ``-inf`` = nothing attended) -> fp32 ``[..., T, D]``
    (zeros where both are empty).
    """
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w_a, w_b = torch.exp(lse_a - m), torch.exp(lse_b - m)
    total = w_a + w_b
    merged = out_a.float() * w_a[..., None] + out_b.float() * w_b[..., None]
    return merged / torch.where(total > 0, total, torch.ones_like(total))[..., None]
