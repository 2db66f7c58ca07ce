"""Attention over a layer's OScaR cache on the CPU: ``cache_attention_ref``'s semantics, fast enough to decode.

Same inputs, outputs and semantics as :func:`~.cache_attention.cache_attention_ref` (the oracle; tests compare
the two on random caches): the step's queries attend to every stored token (quantized prefix, then the
full-precision residual) and causally to the step's own tokens, with ``skip`` left pads, ``window`` and
``softcap``. It computes the same fp32 quantities (``mn + scale * code`` per element, ``n_t`` and the key
rotation on the scores, ``P v'`` rotated back by ``H``) in a different order, so results agree with the
reference up to float rounding.

Where the reference's time went (a decode step at 4K tokens, 3 kv heads, head_dim 64: ~10 ms per layer,
more than the rest of the model): unpacking the whole stored cache with broadcast tensor shifts (the
slowest elementwise path PyTorch has for uint8), an interleaving copy back into token/channel order, and
dequantization in separate fp32 passes. Here:

* codes are read one bit-field plane at a time (:func:`~.packing.unpack_plane`: a scalar shift and a mask).
  Key plane ``i`` holds tokens ``PB * j + i``, value plane ``i`` channels ``PB * c + i`` (``PB = 8 // bits``);
  nothing is interleaved back, except the small score and output tensors;
* each plane becomes fp32 ``mn + scale * code`` in one fused ``addcmul`` into a buffer of at most
  :data:`CHUNK_ELEMENTS` elements, then one batched matmul per chunk (all query heads of a kv head at once).
  The fp32 temporaries are bounded by the chunk, whatever the context: the cache stays packed, with no
  dequantized copy kept between steps.
"""

from __future__ import annotations

import torch

from .attention_ref import masked_softmax
from .cache_attention import attention_mask, check_attention_inputs, sequence_full_precision
from .cache_layout import CacheFormat, CacheTensors
from .hadamard import hadamard_transform
from .packing import codes_per_byte, unpack_plane

__all__ = ["CHUNK_ELEMENTS", "cache_attention_cpu"]

# Dequantized elements (kv heads x tokens x head_dim) per chunk: 4 MiB of fp32. Larger chunks mean fewer
# (Python-dispatched) ops per step; a 4K-token context of 3 kv heads x 64 channels is one chunk.
CHUNK_ELEMENTS = 1 << 20


def _chunk_tokens(kv_heads: int, head_dim: int, residual_length: int) -> int:
    # a multiple of residual_length (so of group_size and of the codes per byte): chunks start on a block
    return max(1, CHUNK_ELEMENTS // (kv_heads * head_dim * residual_length)) * residual_length


def _key_scores(q: torch.Tensor, cache: CacheTensors, fmt: CacheFormat, b: int, t0: int, t1: int) -> torch.Tensor:
    """``<q', k_hat'_t>`` for stored tokens ``[t0, t1)`` (whole groups) of sequence ``b``: q ``[Hkv, M, D]`` fp32
    (rotated as its head's keys) -> ``[Hkv, M, t1 - t0]`` fp32 in token order (no norm factor)."""
    pb, g = codes_per_byte(fmt.bits), fmt.group_size
    h, m, d = q.shape
    n = t1 - t0
    packed = cache.key_codes[b, :, t0 // pb : t1 // pb]  # [Hkv, n / PB, D], byte row j: tokens PB * j + i
    mn = cache.key_mn[b, :, t0 // g : t1 // g, None, :].to(torch.float32)  # [Hkv, n / G, 1, D]
    scale = cache.key_scale[b, :, t0 // g : t1 // g, None, :].to(torch.float32)
    k = torch.empty(h, pb, n // g, g // pb, d, device=q.device)  # plane-major rows: row i * (n / PB) + j is token PB * j + i
    for i in range(pb):
        codes = unpack_plane(packed, fmt.bits, i).view(h, n // g, g // pb, d)  # uint8: addcmul converts
        torch.addcmul(mn, codes, scale, out=k[:, i])
    s = torch.bmm(q, k.view(h, n, d).transpose(1, 2))  # [Hkv, M, n], plane-major
    return s.view(h, m, pb, n // pb).transpose(2, 3).reshape(h, m, n)


def _value_output(p: torch.Tensor, cache: CacheTensors, fmt: CacheFormat, b: int, t0: int, t1: int) -> torch.Tensor:
    """``P v_hat'`` over stored tokens ``[t0, t1)`` of sequence ``b``: p ``[Hkv, M, t1 - t0]`` fp32 (token order)
    -> ``[Hkv, M, D]`` fp32 in the quantized (possibly rotated) space."""
    pb, g = codes_per_byte(fmt.bits), fmt.group_size
    h, m, n = p.shape
    packed = cache.value_codes[b, :, t0:t1]  # [Hkv, n, D / PB], byte c: channels PB * c + i
    dp = packed.shape[-1]
    d = dp * pb
    mn = cache.value_mn[b, :, t0:t1, :, None].to(torch.float32)  # [Hkv, n, D / G, 1]
    scale = cache.value_scale[b, :, t0:t1, :, None].to(torch.float32)
    v = torch.empty(h, pb, n, d // g, g // pb, device=p.device)  # plane i: channels PB * c + i
    for i in range(pb):
        codes = unpack_plane(packed, fmt.bits, i).view(h, n, d // g, g // pb)
        torch.addcmul(mn, codes, scale, out=v[:, i])
    o = torch.matmul(p[:, None], v.view(h, pb, n, dp))  # [Hkv, PB, M, D / PB]
    return o.permute(0, 2, 3, 1).reshape(h, m, d)


@torch.no_grad()
def cache_attention_cpu(
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
    """query ``[B, Hq, T, D]``, new keys/values ``[B, Hkv, T, D]`` or None -> ``[B, Hq, T, D]`` (query dtype);
    :func:`~.cache_attention.cache_attention_ref`'s semantics (see the module docstring). Host-synchronizing."""
    check_attention_inputs(query, cache, new_keys, new_values, skip)
    bsz, hq, tq, d = query.shape
    hkv = cache.residual_keys.shape[1]
    group = hq // hkv
    scale = d**-0.5 if scale is None else scale
    r = fmt.residual_length
    chunk = _chunk_tokens(hkv, d, r)
    out = torch.zeros_like(query)
    lengths = cache.lengths.tolist()
    skips = [0] * bsz if skip is None else skip.tolist()
    for b in range(bsz):
        s = skips[b]
        n_quant, res_k, res_v = sequence_full_precision(cache, fmt, new_keys, new_values, b, lengths[b], s)
        res_k, res_v = res_k[0], res_v[0]  # [Hkv, n_r, D]
        total = n_quant + res_k.shape[1]
        if total == 0 or s >= tq:
            continue
        n_q = tq - s
        q = query[b, :, s:].to(torch.float32).reshape(hkv, group * n_q, d)  # rows (query head in group, position)
        parts = []
        if n_quant:
            q_rot = torch.where(cache.key_rotated[:, None, None], hadamard_transform(q), q)
            norms = torch.where(cache.key_scaled[:, None, None], cache.key_norms[b, None, None, :n_quant], 1.0)
            for t0 in range(0, n_quant, chunk):
                t1 = min(t0 + chunk, n_quant)
                parts.append(_key_scores(q_rot, cache, fmt, b, t0, t1) * norms[..., t0:t1])
        if res_k.shape[1]:
            parts.append(torch.bmm(q, res_k.to(torch.float32).transpose(1, 2)))
        scores = torch.cat(parts, -1) * scale  # [Hkv, M, total]
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        allowed = attention_mask(total, n_q, window, query.device)
        p = masked_softmax(scores.view(hkv, group, n_q, total), allowed).view(hkv, group * n_q, total)
        o = torch.zeros(hkv, group * n_q, d, device=query.device)
        if n_quant:
            for t0 in range(0, n_quant, chunk):
                t1 = min(t0 + chunk, n_quant)
                o += _value_output(p[..., t0:t1], cache, fmt, b, t0, t1)
            if fmt.rotate_values:
                o = hadamard_transform(o)
        if res_k.shape[1]:
            o += torch.bmm(p[..., n_quant:], res_v.to(torch.float32))
        out[b, :, s:] = o.view(hq, n_q, d).to(query.dtype)
    return out
