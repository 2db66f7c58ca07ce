"""Reference attention over an OScaR cache: quantized prefix + full-precision residual (DESIGN.md §2.5).

Computed the way the fused kernel computes it, in fp32: scores against quantized keys in the rotated,
norm-divided space (``n_t * <q', k_hat'_t> * softmax_scale``), scores against the residual in the
original space, one softmax over both, ``P @ v_hat'`` rotated back by ``H`` plus ``P @ v_residual``.
Mathematically equal to dequantize-then-SDPA (tests check that).

Token order of the attended sequence: the quantized tokens first, then the residual tokens.
"""

from __future__ import annotations

import torch

from .hadamard import hadamard_transform
from .quantization import (
    QuantizedKeys,
    QuantizedValues,
    dequantize_keys_transformed,
    dequantize_values_transformed,
)

__all__ = ["masked_softmax", "quantized_attention_ref"]


def _check_inputs(query, keys, values, residual_keys, residual_values):
    if query.dim() != 4:
        raise ValueError(f"query must be [B, Hq, Tq, D], got shape {tuple(query.shape)}")
    if (keys is None) != (values is None):
        raise ValueError("quantized keys and values must both be given or both be None")
    if (residual_keys is None) != (residual_values is None):
        raise ValueError("residual keys and values must both be given or both be None")
    if keys is None and residual_keys is None:
        raise ValueError("nothing to attend to: no quantized and no residual keys")
    b, hq, _, d = query.shape
    shapes = []
    if keys is not None:
        kb, kh, kt, kd = keys.mn.shape[0], keys.mn.shape[1], keys.num_tokens, keys.mn.shape[-1]
        if values.num_tokens != kt:
            raise ValueError(f"quantized keys hold {kt} tokens but values hold {values.num_tokens}")
        shapes.append(("quantized keys", (kb, kh, kd)))
    if residual_keys is not None:
        if residual_keys.shape != residual_values.shape:
            raise ValueError(
                f"residual keys {tuple(residual_keys.shape)} and values {tuple(residual_values.shape)} differ"
            )
        rb, rh, _, rd = residual_keys.shape
        shapes.append(("residual keys", (rb, rh, rd)))
    for name, (kb, kh, kd) in shapes:
        if kb != b or kd != d:
            raise ValueError(f"query {tuple(query.shape)} does not match {name} (B={kb}, D={kd})")
        if hq % kh:
            raise ValueError(f"query heads {hq} not a multiple of kv heads {kh} ({name})")
    return shapes[0][1][1]


def masked_softmax(scores: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dim of fp32 ``scores`` after a bool (True = attend) or additive mask;
    a row that may attend to nothing gives zeros (not NaN)."""
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(torch.float32)
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)


def quantized_attention_ref(
    query: torch.Tensor,
    keys: QuantizedKeys | None,
    values: QuantizedValues | None,
    residual_keys: torch.Tensor | None = None,
    residual_values: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of ``query`` over quantized keys/values followed by the residual window.

    query: ``[B, Hq, Tq, D]``; residual_keys/values: ``[B, Hkv, Tr, D]`` (original space);
    ``Hq`` a multiple of ``Hkv`` (GQA). attn_mask: bool (True = attend) or additive float, broadcastable
    to ``[B, Hq, Tq, Tq_total]`` with ``Tq_total = quantized tokens + Tr``. ``is_causal``: the queries are
    the last ``Tq`` positions (bottom-right aligned). ``softcap``: ``tanh(s / c) * c`` on scores.
    A query row that may attend to nothing returns zeros. Returns ``[B, Hq, Tq, D]`` in ``query.dtype``.
    """
    hkv = _check_inputs(query, keys, values, residual_keys, residual_values)
    b, hq, tq, d = query.shape
    group = hq // hkv
    scale = d**-0.5 if scale is None else scale
    qf = query.to(torch.float32).reshape(b, hkv, group, tq, d)

    score_parts = []
    if keys is not None:
        q_rot = torch.where(keys.rotated[:, None, None, None], hadamard_transform(qf), qf)
        k_hat = dequantize_keys_transformed(keys)  # [B, Hkv, Tk, D]
        s = torch.einsum("bhgqd,bhkd->bhgqk", q_rot, k_hat)
        norm_factor = torch.where(keys.scaled[None, :, None], keys.norms[:, None, :], torch.ones_like(keys.norms[:, None, :]))
        score_parts.append(s * norm_factor[:, :, None, None, :])
    if residual_keys is not None:
        score_parts.append(torch.einsum("bhgqd,bhkd->bhgqk", qf, residual_keys.to(torch.float32)))
    scores = torch.cat(score_parts, dim=-1) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.reshape(b, hq, tq, -1)
    total = scores.shape[-1]

    if is_causal:
        q_pos = torch.arange(total - tq, total, device=query.device)[:, None]
        allowed = torch.arange(total, device=query.device)[None, :] <= q_pos
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = masked_softmax(scores, attn_mask).reshape(b, hkv, group, tq, total)

    out = torch.zeros(b, hkv, group, tq, d, dtype=torch.float32, device=query.device)
    n_quant = 0
    if keys is not None:
        n_quant = keys.num_tokens
        o = torch.einsum("bhgqk,bhkd->bhgqd", probs[..., :n_quant], dequantize_values_transformed(values))
        out = out + (hadamard_transform(o) if values.rotated else o)
    if residual_keys is not None:
        out = out + torch.einsum("bhgqk,bhkd->bhgqd", probs[..., n_quant:], residual_values.to(torch.float32))
    return out.reshape(b, hq, tq, d).to(query.dtype)
