"""Attention of a step's queries over a layer's OScaR cache plus the step's own keys/values.

Semantics (every backend): for sequence ``b`` with ``L = lengths[b]`` stored tokens (quantized
``[0, Q)`` then residual), and this step's tokens ``new_*[b, :, skip[b]:]`` at positions ``L, L+1, ...``,
query ``i >= skip[b]`` attends to every stored token and to the step's tokens ``skip[b] .. i`` (causal,
at full precision; they are appended after attention, see ``append_kv``). Query rows ``i < skip[b]``
(left padding) return zeros. ``window`` (sliding-window layers): a query at position ``p`` sees only
positions ``> p - window``. ``softcap``: scores become ``tanh(s / softcap) * softcap``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .attention_ref import quantized_attention_ref
from .cache_layout import CacheFormat, CacheTensors, check_triton_cache
from .hadamard import hadamard_block_size
from .quantization import QuantizedKeys, QuantizedValues
from .new_token_attention import causal_attention, causal_attention_lse, merge_attention, uses_dense_new_tokens
from .triton_utils import _codes_f16, _fwht_rows, _to_dtype, next_pow2, num_sms

try:  # the Gluon kernel for the quantized prefix on CUDA (imported here so its op registers once, untraced)
    from . import cache_attention_gluon
except (ImportError, AttributeError):  # a Triton without Gluon, or without the Gluon API it uses: Triton alone
    cache_attention_gluon = None

__all__ = ["cache_attention", "cache_attention_ref", "check_attention_inputs", "num_kv_splits", "split_launch_config"]


def check_attention_inputs(query, cache: CacheTensors, new_keys, new_values, skip) -> None:
    """Shape/dtype/device checks shared by every attention backend (no host sync)."""
    if query.dim() != 4:
        raise ValueError(f"query must be [B, Hq, T, D], got shape {tuple(query.shape)}")
    b, h, _, d = cache.residual_keys.shape
    qb, hq, tq, qd = query.shape
    if qb != b or qd != d:
        raise ValueError(f"query {tuple(query.shape)} does not match the cache (B={b}, D={d})")
    if hq < 1 or hq % h:
        raise ValueError(f"query heads {hq} not a multiple of the cache's kv heads {h} (>= 1; query {tuple(query.shape)})")
    if new_keys is not None:
        if new_keys.shape != new_values.shape or new_keys.shape != (b, h, tq, d):
            raise ValueError(
                f"new keys {tuple(new_keys.shape)} / values {tuple(new_values.shape)} must be "
                f"[B={b}, Hkv={h}, T={tq}, D={d}] to match the query {tuple(query.shape)}"
            )
        if new_keys.dtype != new_values.dtype or not new_keys.is_floating_point():
            raise TypeError(f"new keys/values must share one float dtype, got {new_keys.dtype}/{new_values.dtype}")
        if new_keys.device != cache.lengths.device or new_values.device != cache.lengths.device:
            raise ValueError(
                f"new keys on {new_keys.device}, values on {new_values.device}, cache on {cache.lengths.device}"
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


def sequence_full_precision(cache: CacheTensors, fmt: CacheFormat, new_keys, new_values, b: int, length: int,
                            skip: int) -> tuple:
    """Sequence ``b``'s split at ``length`` stored tokens: ``(n_quant, keys, values)`` with ``n_quant`` the
    quantized prefix and keys/values ``[1, Hkv, n, D]`` (cache dtype) its full-precision tokens after it: the
    residual window, then the step's own tokens from ``skip`` on (if given)."""
    r = fmt.residual_length
    n_quant, n_res = length // r * r, length % r
    res_k = [cache.residual_keys[b : b + 1, :, :n_res]]
    res_v = [cache.residual_values[b : b + 1, :, :n_res]]
    if new_keys is not None:
        res_k.append(new_keys[b : b + 1, :, skip:].to(res_k[0].dtype))
        res_v.append(new_values[b : b + 1, :, skip:].to(res_v[0].dtype))
    return n_quant, torch.cat(res_k, 2), torch.cat(res_v, 2)


def attention_mask(total: int, n_q: int, window, device) -> torch.Tensor:
    """``[n_q, total]`` bool: the last ``n_q`` of ``total`` positions query causally (and within ``window``)."""
    q_pos = torch.arange(total - n_q, total, device=device)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed


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
    out = torch.zeros_like(query)
    lengths = cache.lengths.tolist()
    skips = [0] * bsz if skip is None else skip.tolist()
    for b in range(bsz):
        s = skips[b]
        n_quant, res_k, res_v = sequence_full_precision(cache, fmt, new_keys, new_values, b, lengths[b], s)
        keys, values = _sequence_slices(cache, fmt, b, n_quant)
        total = n_quant + res_k.shape[2]
        if total == 0 or s >= tq:
            continue
        allowed = attention_mask(total, tq - s, window, query.device)
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


# ---------------------------------------------------------------------------------------------------
# Triton split-K ("flash-decoding") attention over the packed cache
#
# One launch pair serves the query positions [Q0, Q0 + T_LOC) (all of them unless B * Hq * T_q exceeds
# MAX_SCRATCH_ROWS; then the launcher loops over slices: bounded scratch, and row blocks stay in grid
# axis 0, the one without a 65535 limit).
# stage 1, _cache_attn_split_kernel, grid (row blocks, B * Hkv, SPLITS + RSPLITS). Programs split < SPLITS
#   each stream one slice of the quantized prefix [0, Q); the RSPLITS programs after them each attend
#   to a slice of the full-precision residual window (the last one also to the step's new tokens;
#   original space, fp32, causal). Each writes its normalized partial output and log2-sum-exp (fp32).
# stage 2, _cache_attn_merge_kernel, grid (GROUP * T_LOC, B * Hkv): merges the quantized splits by LSE,
#   applies the inverse value rotation H once, then merges in the residual partials (one shot); it can
#   also store each row's natural-log sum of exp (the flash route below merges with it).
#
# The quantized stage never dequantizes keys and never interleaves bit fields back into token/channel
# order. Per tile: _tile_scores (keys), _online_softmax_step, _tile_values (values).
# * Rows. A program serves RB query rows (row = i * GROUP + g: all query heads of its kv head, so the
#   packed cache is read once per kv head) times the NGT = BLOCK_N / G quantization groups of a tile:
#   tile row m = gt * RB + r. Row (gt, r) only scores the tokens of group gt of every tile, so each
#   row is an independent online softmax over a quarter of the tokens; the NGT rows of one query row
#   are merged by LSE once, after the loop. With 4 query heads per kv head and T_q = 1 the 16 rows of
#   the MMA are all real work (no padding to M = 16). Tiles are always 16 rows (TUNING["tile_rows"]):
#   64-row tiles make Triton 3.6 use wgmma on Hopper, which computed wrong scores here.
# * Keys, algebraically: score = n_t * (q . mn_gt + sum_d (q_d * scale_{gt,d}) * code_{t,d}). Per tile
#   and row the fp16 operand is q * scale of the row's group and the bias q . mn is an fp32 row sum;
#   the codes are small exact integers in fp16. Keys are packed along tokens (byte (j, d) holds tokens
#   PB*j + i at bits BITS*i, PB = 8 // BITS): token subset i is the [BLOCK_N / PB, D] tile
#   (bytes >> BITS*i) & MASK, scored with its own tl.dot; rows of other groups are masked to -inf.
# * Values are dequantized (fp16 FMA with the per-token, per-32-channel parameters) per token subset i
#   (rows PB*j + i) and channel subset k (channels PB*c + k, the bit fields of the packed bytes), each a
#   [BLOCK_N / PB, D / PB] tile (loaded as [tokens, channel group, byte] so one parameter load serves
#   a group's bytes); accumulator k holds output channels PB*c + k and is stored to those columns.
# * Bit fields become fp16 four bytes at a time in inline PTX (triton_utils._codes_f16), in the MMA
#   operand layout (Triton converts the packed bytes, not the fp16 codes, to that layout).
# Steps of >= DENSE_MIN_QUERIES positions (prefill) take the flash route (kernels/new_token_attention.py):
# the kernels attend to the stored tokens only (ATTEND_NEW=False) and flash attention to the step's own
# tokens, merged by LSE; shorter multi-token steps, softcap and windows run the new-token loop here
# (CUDA cores, O(T_q^2) per kv head: fine for a few tokens). Each row block re-reads the stored cache, so
# a long step over a long stored cache (chunked prefill) is not tuned.
# Measured decode speed on the H200, what limits it and what was tried: benchmarks/README.md.

@triton.jit
def _softcap_log2(x, softcap):
    # natural-units score -> softcap * tanh(x / softcap), in log2 units. tanh(y) = 1 - 2 / (exp(2y) + 1).
    y = x / softcap
    t = 1.0 - 2.0 / (tl.exp2(y * (2.0 * 1.4426950408889634)) + 1.0)
    return t * (softcap * 1.4426950408889634)


@triton.jit
def _key_subset_scores(kb, i: tl.constexpr, qt, bias, nrm_ptrs, scl, gsel, tok, q_pos, n_quant, softcap, window,  #
                       BITS: tl.constexpr, ASM: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr,  #
                       CAUSAL: tl.constexpr, MASK_N: tl.constexpr):  # fmt: skip
    # scores (log2 units) of token subset i of a tile: tokens tok = t0 + PB * j + i, [BM, BLOCK_N / PB]
    codes = _codes_f16(kb, BITS, i, ASM)
    sc = tl.dot(qt, tl.trans(codes)) + bias[:, None]
    if MASK_N:
        nrm = tl.load(nrm_ptrs, mask=tok < n_quant, other=1.0)
    else:
        nrm = tl.load(nrm_ptrs)
    sc = sc * tl.where(scl, nrm, 1.0)[None, :]
    if SOFTCAP:
        sc = _softcap_log2(sc, softcap)
    ok = gsel
    if CAUSAL:
        ok = ok & (tok[None, :] <= q_pos[:, None])
    if WINDOW:
        ok = ok & (tok[None, :] > q_pos[:, None] - window)
    if MASK_N:
        ok = ok & (tok < n_quant)[None, :]
    return tl.where(ok, sc, float("-inf"))


@triton.jit
def _value_subset(acc0, acc1, acc2, acc3, p, vb, vmn, vsc, BITS: tl.constexpr, ASM: tl.constexpr):
    # acc_k += p @ dequant(channel subset k of the value bytes vb); p [BM, NS] fp16, vb [NS, NGV, JG]
    # uint8 (token, channel group, byte), vmn/vsc [NS, NGV, 1] fp16
    NS: tl.constexpr = vb.shape[0]
    VC: tl.constexpr = vb.shape[1] * vb.shape[2]
    acc0 += tl.dot(p, tl.reshape(_codes_f16(vb, BITS, 0, ASM) * vsc + vmn, (NS, VC)))
    acc1 += tl.dot(p, tl.reshape(_codes_f16(vb, BITS, 1, ASM) * vsc + vmn, (NS, VC)))
    if BITS == 2:
        acc2 += tl.dot(p, tl.reshape(_codes_f16(vb, BITS, 2, ASM) * vsc + vmn, (NS, VC)))
        acc3 += tl.dot(p, tl.reshape(_codes_f16(vb, BITS, 3, ASM) * vsc + vmn, (NS, VC)))
    return acc0, acc1, acc2, acc3


@triton.jit
def _load_value_subset(val_codes_h, val_mn_h, val_scale_h, t0, i, svct, svmt, vc_offs, vm_offs, c_ok3, e_ok3, tok,  #
                       n_quant, EVEN_C: tl.constexpr, MASK_N: tl.constexpr):  # fmt: skip
    # value bytes [NS, NGV, JG] and group parameters [NS, NGV, 1] of token subset i (rows t0 + PB * j + i)
    if EVEN_C and not MASK_N:
        vb = tl.load(val_codes_h + (t0 + i) * svct + vc_offs)
        vmn = tl.load(val_mn_h + (t0 + i) * svmt + vm_offs)
        vsc = tl.load(val_scale_h + (t0 + i) * svmt + vm_offs)
    else:
        v_mask = c_ok3
        p_mask = e_ok3
        if MASK_N:
            v_mask = v_mask & (tok + i < n_quant)[:, None, None]
            p_mask = p_mask & (tok + i < n_quant)[:, None, None]
        vb = tl.load(val_codes_h + (t0 + i) * svct + vc_offs, mask=v_mask, other=0)
        vmn = tl.load(val_mn_h + (t0 + i) * svmt + vm_offs, mask=p_mask, other=0.0)
        vsc = tl.load(val_scale_h + (t0 + i) * svmt + vm_offs, mask=p_mask, other=0.0)
    return vb, vmn, vsc


@triton.jit
def _tile_scores(key_mn_h, key_scale_h, key_codes_h, key_norms_b, t0, km_offs, kc_offs, nrm_offs, skmg, skct, sknt,  #
                 qd, scl, gsel, gt, tok, q_pos, d_ok, n_quant, softcap, window, G: tl.constexpr, BITS: tl.constexpr,  #
                 ASM: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, CAUSAL: tl.constexpr,  #
                 EVEN_D: tl.constexpr, MASK_N: tl.constexpr):  # fmt: skip
    # scores (log2 units) of the tile's PB token subsets, each [BM, BLOCK_N / PB] (subset i: tokens
    # tok + i); with 4-bit codes (2 subsets) s2, s3 repeat s0, s1 and are not used
    PB: tl.constexpr = 8 // BITS
    if EVEN_D and not MASK_N:
        kmn = tl.load(key_mn_h + (t0 // G) * skmg + km_offs)
        ksc = tl.load(key_scale_h + (t0 // G) * skmg + km_offs)
    else:
        kp_mask = d_ok[None, :]
        if MASK_N:
            kp_mask = kp_mask & (t0 + gt * G < n_quant)[:, None]
        kmn = tl.load(key_mn_h + (t0 // G) * skmg + km_offs, mask=kp_mask, other=0.0)
        ksc = tl.load(key_scale_h + (t0 // G) * skmg + km_offs, mask=kp_mask, other=0.0)
    qt = (qd * ksc.to(tl.float32)).to(tl.float16)  # the row's query times its group's key step
    bias = tl.sum(qd * kmn.to(tl.float32), axis=1)  # the row's query . its group's key minimum
    if EVEN_D and not MASK_N:
        kb = tl.load(key_codes_h + (t0 // PB) * skct + kc_offs)
    else:
        kc_mask = d_ok[None, :]
        if MASK_N:
            kc_mask = kc_mask & (tok < n_quant)[:, None]
        kb = tl.load(key_codes_h + (t0 // PB) * skct + kc_offs, mask=kc_mask, other=0)
    s0 = _key_subset_scores(kb, 0, qt, bias, key_norms_b + t0 * sknt + nrm_offs, scl, gsel, tok, q_pos, n_quant,
                            softcap, window, BITS, ASM, SOFTCAP, WINDOW, CAUSAL, MASK_N)  # fmt: skip
    s1 = _key_subset_scores(kb, 1, qt, bias, key_norms_b + (t0 + 1) * sknt + nrm_offs, scl, gsel, tok + 1, q_pos,
                            n_quant, softcap, window, BITS, ASM, SOFTCAP, WINDOW, CAUSAL, MASK_N)  # fmt: skip
    if BITS == 2:
        s2 = _key_subset_scores(kb, 2, qt, bias, key_norms_b + (t0 + 2) * sknt + nrm_offs, scl, gsel, tok + 2, q_pos,
                                n_quant, softcap, window, BITS, ASM, SOFTCAP, WINDOW, CAUSAL, MASK_N)  # fmt: skip
        s3 = _key_subset_scores(kb, 3, qt, bias, key_norms_b + (t0 + 3) * sknt + nrm_offs, scl, gsel, tok + 3, q_pos,
                                n_quant, softcap, window, BITS, ASM, SOFTCAP, WINDOW, CAUSAL, MASK_N)  # fmt: skip
    else:
        s2, s3 = s0, s1
    return s0, s1, s2, s3


@triton.jit
def _online_softmax_step(m_i, l_i, s0, s1, s2, s3, BITS: tl.constexpr):
    # online softmax over one tile's subset scores (log2 units): new running max and sum, the factor
    # alpha that rescales what was accumulated before, and the tile's probabilities p_i = 2^(s_i - max)
    mx = tl.maximum(tl.max(s0, axis=1), tl.max(s1, axis=1))
    if BITS == 2:
        mx = tl.maximum(mx, tl.maximum(tl.max(s2, axis=1), tl.max(s3, axis=1)))
    m_new = tl.maximum(m_i, mx)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p0 = tl.exp2(s0 - m_safe[:, None])
    p1 = tl.exp2(s1 - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p0, axis=1) + tl.sum(p1, axis=1)
    if BITS == 2:
        p2 = tl.exp2(s2 - m_safe[:, None])
        p3 = tl.exp2(s3 - m_safe[:, None])
        l_i += tl.sum(p2, axis=1) + tl.sum(p3, axis=1)
    else:
        p2, p3 = p0, p1
    return m_new, l_i, alpha, p0, p1, p2, p3


@triton.jit
def _tile_values(acc0, acc1, acc2, acc3, p0, p1, p2, p3, val_codes_h, val_mn_h, val_scale_h, t0, svct, svmt, vc_offs,  #
                 vm_offs, c_ok3, e_ok3, tok, n_quant, BITS: tl.constexpr, ASM: tl.constexpr, EVEN_C: tl.constexpr,  #
                 MASK_N: tl.constexpr):  # fmt: skip
    # acc_k += p_i @ values of token subset i, channel subset k, for every token subset i of the tile
    PB: tl.constexpr = 8 // BITS
    for i in tl.static_range(PB):
        if i == 0:
            p = p0
        elif i == 1:
            p = p1
        elif i == 2:
            p = p2
        else:
            p = p3
        vb, vmn, vsc = _load_value_subset(val_codes_h, val_mn_h, val_scale_h, t0, i, svct, svmt, vc_offs, vm_offs,
                                          c_ok3, e_ok3, tok, n_quant, EVEN_C, MASK_N)  # fmt: skip
        acc0, acc1, acc2, acc3 = _value_subset(acc0, acc1, acc2, acc3, p.to(tl.float16), vb, vmn, vsc, BITS, ASM)
    return acc0, acc1, acc2, acc3


@triton.jit
def _store_group_merged(acc, m_i, l_i, k, o_ptrs, lse_ptrs, row_ok, col_ok,  #
                        NGT: tl.constexpr, RB: tl.constexpr, VC: tl.constexpr, PB: tl.constexpr,  #
                        STORE_LSE: tl.constexpr):  # fmt: skip
    # merge the NGT independent softmax rows (gt, r) of each query row r by LSE and store channel
    # subset k (output channels PB * c + k) of the normalized partial; lse once (k == 0)
    m3 = tl.reshape(m_i, (NGT, RB))
    m_r = tl.max(m3, axis=0)
    m_safe = tl.where(m_r == float("-inf"), 0.0, m_r)
    w = tl.exp2(m3 - m_safe[None, :])  # exp2(-inf) = 0 for empty rows
    l_r = tl.sum(w * tl.reshape(l_i, (NGT, RB)), axis=0)
    o = tl.sum(w[:, :, None] * tl.reshape(acc, (NGT, RB, VC)), axis=0)
    has = l_r > 0
    o = tl.where(has[:, None], o / tl.where(has, l_r, 1.0)[:, None], 0.0)
    cols = tl.arange(0, VC) * PB + k
    tl.store(o_ptrs + cols[None, :], o, mask=row_ok[:, None] & col_ok[None, :])
    if STORE_LSE:
        lse = tl.where(has, m_r + tl.log2(tl.where(has, l_r, 1.0)), float("-inf"))
        tl.store(lse_ptrs, lse, mask=row_ok)


@triton.jit
def _attend_full(kb, vb, st_k, sd_k, st_v, sd_v, first, hi, base_pos, qs, q_pos, m_i, l_i, acc,  #
                 softcap, window, cache_ty: tl.constexpr,  #
                 HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_R: tl.constexpr,  #
                 SOFTCAP: tl.constexpr, WINDOW: tl.constexpr):  # fmt: skip
    # online softmax of the rows qs [RB, D_PAD] (fp32, pre-scaled) over full-precision tokens
    # r in [first, hi) of one source (residual or new) at positions base_pos + r, cast to the cache
    # dtype first (as the reference does); fp32 products and sums (CUDA cores), m_i/l_i in log2 units.
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    for r0 in range(first, hi, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < hi
        kv_mask = r_ok[:, None] & d_ok[None, :]
        kt = tl.load(kb + r[:, None] * st_k + offs_d[None, :] * sd_k, mask=kv_mask, other=0.0)
        kt = _to_dtype(kt, cache_ty).to(tl.float32)
        sc = tl.sum(qs[:, None, :] * kt[None, :, :], axis=2)
        if SOFTCAP:
            sc = _softcap_log2(sc, softcap)
        pos = base_pos + r
        ok = r_ok[None, :] & (pos[None, :] <= q_pos[:, None])
        if WINDOW:
            ok = ok & (pos[None, :] > q_pos[:, None] - window)
        sc = tl.where(ok, sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(sc - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vt = tl.load(vb + r[:, None] * st_v + offs_d[None, :] * sd_v, mask=kv_mask, other=0.0)
        vt = _to_dtype(vt, cache_ty).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vt[None, :, :], axis=1)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _cache_attn_split_kernel(
    q, key_codes, key_mn, key_scale, key_norms, val_codes, val_mn, val_scale,  #
    res_k, res_v, new_k, new_v, lengths, skip, key_rotated, key_scaled, part_o, part_lse,  #
    qk_scale, softcap, window, hscale, T_Q, MAX_LEN, Q0, T_LOC,  #
    sqb, sqh, sqt, sqd,  #
    skcb, skch, skct, skcd, skmb, skmh, skmg, skmd, sknb, sknt,  #
    svcb, svch, svct, svcd, svmb, svmh, svmt, svmg,  #
    srb, srh, srt, srd, swb, swh, swt, swd,  #
    snb, snh, snt, snd, svb, svh, svt, svd,  #
    HKV: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,  #
    LOG2_HB: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, R: tl.constexpr,  #
    RB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, VC: tl.constexpr,  #
    SPLITS: tl.constexpr, RSPLITS: tl.constexpr,  #
    HAS_SKIP: tl.constexpr, HAS_NEW: tl.constexpr, ATTEND_NEW: tl.constexpr, SOFTCAP: tl.constexpr,  #
    WINDOW: tl.constexpr, ASM: tl.constexpr, FIRST_SPLIT: tl.constexpr,  #
):
    # Inductor passes Python floats to user Triton kernels as fp64; keep all math in fp32
    qk_scale, softcap, hscale = tl.cast(qk_scale, tl.float32), tl.cast(softcap, tl.float32), tl.cast(hscale, tl.float32)
    # grid (row blocks, B * Hkv, SPLITS + RSPLITS - FIRST_SPLIT); this launch serves query positions
    # [Q0, Q0 + T_LOC). FIRST_SPLIT = SPLITS: only the residual programs (the Gluon kernel takes the others)
    mb = tl.program_id(0)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2) + FIRST_SPLIT
    b = pid_bh // HKV
    h = pid_bh % HKV
    ROW0 = Q0 * GROUP  # global row of local row 0
    PB: tl.constexpr = 8 // BITS  # codes per byte
    NGT: tl.constexpr = BLOCK_N // G  # quantization groups per tile
    BM: tl.constexpr = NGT * RB  # tile rows (group in tile, query row)
    NS: tl.constexpr = BLOCK_N // PB  # tokens per subset
    JG: tl.constexpr = G // PB  # subset rows per group (key bytes), channel bytes per group (values)
    EVEN_D: tl.constexpr = HEAD_DIM == D_PAD
    EVEN_C: tl.constexpr = EVEN_D and VC * PB == D_PAD  # value byte columns need no mask
    MASK_N: tl.constexpr = (R % BLOCK_N) != 0
    SPARTS: tl.constexpr = SPLITS + RSPLITS

    length = tl.minimum(tl.load(lengths + b), MAX_LEN)
    n_quant = length // R * R
    s = 0
    if HAS_SKIP:
        s = tl.minimum(tl.maximum(tl.load(skip + b).to(tl.int32), 0), T_Q)
    n_q = T_Q - s
    total = length
    if HAS_NEW:
        total = length + n_q

    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    if FIRST_SPLIT < SPLITS and split < SPLITS:
        rows_m = tl.arange(0, BM)
        gt = rows_m // RB  # group of the tile this row scores
        row = ROW0 + mb * RB + rows_m % RB
        qi = row // GROUP
        qg = row % GROUP
        row_ok = (qi < T_Q) & (qi >= s) & (qi < Q0 + T_LOC)
        q_pos = total - n_q + qi - s
        # this split's token range inside [lo, n_quant), in whole BLOCK_N tiles
        lo = 0
        if WINDOW:
            first_i = tl.maximum((ROW0 + mb * RB) // GROUP, s)
            lo = tl.maximum(total - n_q + first_i - s - window + 1, 0) // BLOCK_N * BLOCK_N
        span = tl.maximum(n_quant - lo, 0)
        chunk = tl.cdiv(tl.cdiv(span, SPLITS), BLOCK_N) * BLOCK_N
        start = lo + split * chunk
        end = tl.minimum(start + chunk, n_quant)

        q_ptrs = q + b * sqb + (h * GROUP + qg)[:, None] * sqh + qi[:, None] * sqt + offs_d[None, :] * sqd
        qf = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        rot = tl.load(key_rotated + h) != 0
        scl = tl.load(key_scaled + h) != 0
        qf = tl.where(rot, _fwht_rows(qf, BM, D_PAD, LOG2_HB) * hscale, qf)
        if SOFTCAP:
            qd = qf * qk_scale
        else:
            qd = qf * (qk_scale * 1.4426950408889634)

        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        acc0 = tl.zeros([BM, VC], tl.float32)
        acc1 = tl.zeros([BM, VC], tl.float32)
        acc2 = tl.zeros([BM, VC], tl.float32)
        acc3 = tl.zeros([BM, VC], tl.float32)
        offs_j = tl.arange(0, NS)
        gsel = gt[:, None] == (offs_j // JG)[None, :]  # row (gt, r) scores the tokens of group gt only
        causal = WINDOW or not HAS_NEW
        # loop-invariant int32 offsets (pointer tensors would hold 64 bits per element across the loop)
        # keys: group parameters per tile row, packed codes [NS, D]
        km_offs = offs_d[None, :] * skmd + gt[:, None] * skmg
        kc_offs = offs_d[None, :] * skcd + offs_j[:, None] * skct
        nrm_offs = (PB * offs_j) * sknt
        # values: token subset i is rows t0 + PB * j + i; byte column c holds channels PB*c .. PB*c+PB-1
        offs_c = tl.arange(0, VC)
        c_ok = offs_c < HEAD_DIM // PB
        # value tiles are loaded as [NS, VC // JG, JG] (token, channel group, byte in group) so each
        # (token, group) parameter is one load broadcast over its bytes; reshaped to [NS, VC] for the dot
        offs_e = tl.arange(0, VC // JG)
        offs_cc = tl.arange(0, JG)
        col3 = offs_e[None, :, None] * JG + offs_cc[None, None, :]
        c_ok3 = col3 < HEAD_DIM // PB
        e_ok3 = offs_e[None, :, None] < HEAD_DIM // G
        vc_offs = col3 * svcd + (PB * offs_j)[:, None, None] * svct
        vm_offs = offs_e[None, :, None] * svmg + (PB * offs_j)[:, None, None] * svmt
        key_mn_h = key_mn + b * skmb + h * skmh
        key_scale_h = key_scale + b * skmb + h * skmh
        key_codes_h = key_codes + b * skcb + h * skch
        key_norms_b = key_norms + b * sknb
        val_codes_h = val_codes + b * svcb + h * svch
        val_mn_h = val_mn + b * svmb + h * svmh
        val_scale_h = val_scale + b * svmb + h * svmh
        for t0 in range(start, end, BLOCK_N):
            tok = t0 + PB * offs_j  # subset 0's tokens
            s0, s1, s2, s3 = _tile_scores(key_mn_h, key_scale_h, key_codes_h, key_norms_b, t0, km_offs, kc_offs,
                                          nrm_offs, skmg, skct, sknt, qd, scl, gsel, gt, tok, q_pos, d_ok, n_quant,
                                          softcap, window, G, BITS, ASM, SOFTCAP, WINDOW, causal, EVEN_D,
                                          MASK_N)  # fmt: skip
            m_i, l_i, alpha, p0, p1, p2, p3 = _online_softmax_step(m_i, l_i, s0, s1, s2, s3, BITS)
            acc0, acc1, acc2, acc3 = _tile_values(acc0 * alpha[:, None], acc1 * alpha[:, None], acc2 * alpha[:, None],
                                                  acc3 * alpha[:, None], p0, p1, p2, p3, val_codes_h, val_mn_h,
                                                  val_scale_h, t0, svct, svmt, vc_offs, vm_offs, c_ok3, e_ok3, tok,
                                                  n_quant, BITS, ASM, EVEN_C, MASK_N)  # fmt: skip

        # partials of the launch's rows: [B * Hkv, GROUP * T_LOC, SPLITS + RSPLITS, D_PAD] and [..., SPARTS]
        r_out = mb * RB + tl.arange(0, RB)
        o_ok = r_out // GROUP < T_LOC
        slot = (pid_bh.to(tl.int64) * (GROUP * T_LOC) + r_out) * SPARTS + split
        o_ptrs = part_o + slot[:, None] * D_PAD
        _store_group_merged(acc0, m_i, l_i, 0, o_ptrs, part_lse + slot, o_ok, c_ok, NGT, RB, VC, PB, True)
        _store_group_merged(acc1, m_i, l_i, 1, o_ptrs, part_lse + slot, o_ok, c_ok, NGT, RB, VC, PB, False)
        if BITS == 2:
            _store_group_merged(acc2, m_i, l_i, 2, o_ptrs, part_lse + slot, o_ok, c_ok, NGT, RB, VC, PB, False)
            _store_group_merged(acc3, m_i, l_i, 3, o_ptrs, part_lse + slot, o_ok, c_ok, NGT, RB, VC, PB, False)
    else:
        # the residual window and the step's new tokens, at full precision in the original space
        offs_rr = tl.arange(0, RB)
        row_r = ROW0 + mb * RB + offs_rr
        qi_r = row_r // GROUP
        qg_r = row_r % GROUP
        row_ok_r = (qi_r < T_Q) & (qi_r >= s) & (qi_r < Q0 + T_LOC)
        q_pos_r = total - n_q + qi_r - s
        q_ptrs_r = q + b * sqb + (h * GROUP + qg_r)[:, None] * sqh + qi_r[:, None] * sqt + offs_d[None, :] * sqd
        qs_r = tl.load(q_ptrs_r, mask=row_ok_r[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        if SOFTCAP:
            qs_r = qs_r * qk_scale
        else:
            qs_r = qs_r * (qk_scale * 1.4426950408889634)
        m_i_r = tl.full([RB], float("-inf"), tl.float32)
        l_i_r = tl.zeros([RB], tl.float32)
        acc_r = tl.zeros([RB, D_PAD], tl.float32)
        cache_ty_r = res_k.dtype.element_ty
        # residual slots [0, length - n_quant) sit at positions n_quant + r; this program takes slots
        # [rs * R / RSPLITS, (rs + 1) * R / RSPLITS) and the last one also the step's new tokens
        rs = split - SPLITS
        r_lo = rs * (R // RSPLITS)
        r_hi = tl.minimum(r_lo + R // RSPLITS, length - n_quant)
        m_i_r, l_i_r, acc_r = _attend_full(
            res_k + b * srb + h * srh, res_v + b * swb + h * swh, srt, srd, swt, swd,
            r_lo, r_hi, n_quant, qs_r, q_pos_r, m_i_r, l_i_r, acc_r, softcap, window, cache_ty_r,
            HEAD_DIM, D_PAD, BLOCK_R, SOFTCAP, WINDOW)  # fmt: skip
        if ATTEND_NEW:  # this step's tokens j in [s, last row's i] at positions length + j - s (causal)
            hi_r = tl.minimum((ROW0 + mb * RB + RB - 1) // GROUP + 1, T_Q)
            hi_r = tl.where(rs == RSPLITS - 1, hi_r, s)
            m_i_r, l_i_r, acc_r = _attend_full(
                new_k + b * snb + h * snh, new_v + b * svb + h * svh, snt, snd, svt, svd,
                s, hi_r, length - s, qs_r, q_pos_r, m_i_r, l_i_r, acc_r, softcap, window, cache_ty_r,
                HEAD_DIM, D_PAD, BLOCK_R, SOFTCAP, WINDOW)  # fmt: skip
        has_r = l_i_r > 0
        o_r = tl.where(has_r[:, None], acc_r / tl.where(has_r, l_i_r, 1.0)[:, None], 0.0)
        lse_r = tl.where(has_r, m_i_r + tl.log2(tl.where(has_r, l_i_r, 1.0)), float("-inf"))
        o_ok_r = (row_r - ROW0) // GROUP < T_LOC
        slot_r = (pid_bh.to(tl.int64) * (GROUP * T_LOC) + (row_r - ROW0)) * SPARTS + split
        tl.store(part_o + slot_r[:, None] * D_PAD + offs_d[None, :], o_r, mask=o_ok_r[:, None])
        tl.store(part_lse + slot_r, lse_r, mask=o_ok_r)


@triton.jit
def _rotated_queries_kernel(q, key_rotated, out, qk_scale, hscale, T_Q, sqb, sqh, sqt, sqd,  #
                            HQ: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, LOG2_HB: tl.constexpr,  #
                            TB: tl.constexpr):  # fmt: skip
    # grid (B * Hq, cdiv(T_Q, TB)): out [B, Hq, T_Q, D] fp32 = the query rows, rotated where the kv head's
    # keys are, times qk_scale * log2(e): what the split kernel computes per program, done once for the
    # Gluon kernel (same operations in the same order)
    qk_scale, hscale = tl.cast(qk_scale, tl.float32), tl.cast(hscale, tl.float32)
    pid = tl.program_id(0)
    b = pid // HQ
    hq = pid % HQ
    t = tl.program_id(1) * TB + tl.arange(0, TB)
    d = tl.arange(0, D)
    ok = (t < T_Q)[:, None]
    x = tl.load(q + b * sqb + hq * sqh + t[:, None] * sqt + d[None, :] * sqd, mask=ok, other=0.0).to(tl.float32)
    rot = tl.load(key_rotated + hq // GROUP) != 0
    x = tl.where(rot, _fwht_rows(x, TB, D, LOG2_HB) * hscale, x)
    x = x * (qk_scale * 1.4426950408889634)
    tl.store(out + (pid.to(tl.int64) * T_Q + t[:, None]) * D + d[None, :], x, mask=ok)


@triton.jit
def _cache_attn_merge_kernel(
    part_o, part_lse, skip, out, lse_out, T_Q, hscale, Q0, T_LOC,  #
    sob, soh, sot, sod, slb, slh, slt,  #
    HKV: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,  #
    LOG2_HB: tl.constexpr, SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, RSPLITS: tl.constexpr,  #
    ROTATE_V: tl.constexpr, HAS_SKIP: tl.constexpr, STORE_LSE: tl.constexpr,  #
):
    hscale = tl.cast(hscale, tl.float32)  # fp64 when launched by Inductor
    # grid (GROUP * T_LOC, B * Hkv): one program per (local query row = i * GROUP + g, sequence, kv head)
    row = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    h = pid_bh % HKV
    qi = row // GROUP + Q0
    qg = row % GROUP
    s = 0
    if HAS_SKIP:
        s = tl.minimum(tl.maximum(tl.load(skip + b).to(tl.int32), 0), T_Q)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    o_ptrs = out + b * sob + (h * GROUP + qg) * soh + qi * sot + offs_d * sod
    lse_ptr = lse_out + b * slb + (h * GROUP + qg) * slh + qi * slt
    if qi < s:  # left padding: zeros
        tl.store(o_ptrs, _to_dtype(tl.zeros([D_PAD], tl.float32), out.dtype.element_ty), mask=d_ok)
        if STORE_LSE:
            tl.store(lse_ptr, float("-inf"))
        return
    base = (pid_bh.to(tl.int64) * (GROUP * T_LOC) + row) * (SPLITS + RSPLITS)
    # 1. merge the splits of the quantized prefix by their log2-sum-exp (one load of all splits)
    sp = tl.arange(0, SPLITS_P2)
    lse = tl.load(part_lse + base + sp, mask=sp < SPLITS, other=float("-inf"))
    # (padding channels d >= HEAD_DIM of the quantized partials are never written: masked here)
    o_s = tl.load(part_o + (base + sp)[:, None] * D_PAD + offs_d[None, :],
                  mask=(sp < SPLITS)[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
    m_q = tl.max(lse, axis=0)
    mq_safe = tl.where(m_q == float("-inf"), 0.0, m_q)
    w = tl.exp2(lse - mq_safe)
    l_q = tl.sum(w, axis=0)
    has_q = l_q > 0
    o_q = tl.sum(w[:, None] * o_s, axis=0) / tl.where(has_q, l_q, 1.0)
    if ROTATE_V:  # back from the rotated value space: o = o' H
        o_q = tl.reshape(_fwht_rows(tl.reshape(o_q, (1, D_PAD)), 1, D_PAD, LOG2_HB), (D_PAD,)) * hscale
    lse_q = tl.where(has_q, m_q + tl.log2(tl.where(has_q, l_q, 1.0)), float("-inf"))
    # 2. the residual + new tokens partials (original space)
    rp = tl.arange(0, RSPLITS)
    lse_r = tl.load(part_lse + base + SPLITS + rp)
    o_r = tl.load(part_o + (base + SPLITS + rp)[:, None] * D_PAD + offs_d[None, :])
    m = tl.maximum(lse_q, tl.max(lse_r, axis=0))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    wq = tl.exp2(lse_q - m_safe)
    wr = tl.exp2(lse_r - m_safe)
    l = wq + tl.sum(wr, axis=0)
    o_sum = wq * tl.where(has_q, o_q, 0.0) + tl.sum(wr[:, None] * o_r, axis=0)
    o = tl.where(l > 0, o_sum / tl.where(l > 0, l, 1.0), 0.0)
    tl.store(o_ptrs, _to_dtype(o, out.dtype.element_ty), mask=d_ok)
    if STORE_LSE:  # natural-log sum of exp(score) over everything attended (-inf: nothing)
        tl.store(lse_ptr, tl.where(l > 0, (m_safe + tl.log2(tl.where(l > 0, l, 1.0))) * 0.6931471805599453, float("-inf")))


def num_kv_splits(
    batch: int,
    kv_heads: int,
    row_blocks: int,
    max_len: int,
    num_sms: int,
    block_n: int,
    programs_per_sm: int = 2,
    min_tiles: int = 4,
) -> int:
    """Splits of the quantized prefix per (sequence, kv head, row block): a pure function of static sizes.

    Aims at about ``programs_per_sm`` programs per multiprocessor over ``batch * kv_heads * row_blocks``
    programs, never fewer than ``min_tiles`` tiles of ``block_n`` tokens per split at a full cache, at most 64.
    Depends on the cache capacity, not on the (device-side) lengths, so it is fixed for a captured
    decode step.
    """
    programs = max(1, batch * kv_heads * row_blocks)
    want = -(-programs_per_sm * num_sms // programs)
    cap = max(1, max_len // (min_tiles * block_n))
    return max(1, min(want, cap, 64))


# Launch parameters of the split (stage 1) kernel; benchmarks/decode_attention.py --sweep explores them.
# Keyed on nothing that changes per step (never on sequence length). "block_n": tokens per tile
# (NGT = block_n / group_size groups); "tile_rows": MMA rows per tile, NGT * RB with RB query rows per
# program. Keep it below 64: at 64 rows Triton 3.6 lowers the dots to Hopper's wgmma, and those scores
# came out wrong on the H200 (max error 0.22 against the reference for 5 query positions, any of asm /
# stages / register cap; 16 rows correct in every case; benchmarks/README.md, 2026-11-29);
# "maxnreg": register cap per thread, head_dim 128 only (occupancy: 4 CTAs per SM at 128 registers with
# a few spills beat 3 CTAs at 168 without; head_dim 64 spills ~3x more under the same cap and was not
# measured, so other sizes run uncapped); "asm": inline-PTX code expansion; "min_tiles": fewest tiles
# per split at a full cache (2: at batch 1 x 8K, 1-tile splits spend more on partials and the merge
# than they gain in parallelism); "residual_splits": programs sharing the full-precision residual window.
# "gluon": the quantized prefix through kernels/cache_attention_gluon.py where it applies (CUDA, its
# formats, steps with new tokens and no softcap/window, at least "min_token_heads" cache slots
# (batch x kv heads x capacity): below that its extra launches cost more than it saves, 1 x 8K on the
# H200), None: the Triton kernel alone; "warps": warps per program (each streams its own tiles),
# "programs_per_sm" / "min_tiles" as below, per program of "warps" tiles; "maxnreg": register cap. "long": the settings used instead when each split streams at least "long_tiles" tiles at a full cache
# (batch 1 x 128K, batch 8 x 32K): 2 warps uncapped (fewer layout exchanges between warps per tile,
# no spills) beat 4 warps there, and lose where splits are short. Defaults: the H200 sweep of 2026-11-29
# (32/8 heads, D=128, INT2; benchmarks/README.md).
TUNING = {
    "gluon": {"warps": 4, "programs_per_sm": 4, "min_tiles": 2, "min_token_heads": 1 << 17},
    "block_n": 128,
    "tile_rows": 16,
    "num_warps": 4,
    "num_stages": 3,
    "programs_per_sm": 4,
    "maxnreg": 128,
    "asm": True,
    "min_tiles": 2,
    "residual_splits": 4,
    "long_tiles": 8,
    "long": {"num_warps": 2, "maxnreg": 0, "programs_per_sm": 8},
}


def split_launch_config(batch: int, kv_heads: int, row_blocks: int, max_len: int, num_sms: int, block_n: int,
                        head_dim_pad: int) -> tuple[int, dict]:
    """(splits, launch settings) of the split kernel: a pure function of static sizes and ``TUNING``.

    The settings are ``num_warps``, ``num_stages`` and ``maxnreg`` (0: uncapped), from ``TUNING`` or, when
    every split streams at least ``TUNING["long_tiles"]`` tiles at a full cache, from ``TUNING["long"]``.
    """
    cfg = {k: TUNING[k] for k in ("num_warps", "num_stages", "maxnreg", "programs_per_sm")}
    splits = num_kv_splits(batch, kv_heads, row_blocks, max_len, num_sms, block_n, cfg["programs_per_sm"],
                           TUNING["min_tiles"])  # fmt: skip
    tiles = -(-max_len // block_n)
    if TUNING.get("long") and -(-tiles // splits) >= TUNING["long_tiles"]:
        cfg.update(TUNING["long"])
        splits = num_kv_splits(batch, kv_heads, row_blocks, max_len, num_sms, block_n, cfg["programs_per_sm"],
                               TUNING["min_tiles"])  # fmt: skip
    if head_dim_pad > 128:
        cfg["num_warps"] = 8
    if head_dim_pad != 128:  # the register cap was measured for head_dim 128 only (other sizes spill more)
        cfg["maxnreg"] = 0
    return splits, cfg


@torch.no_grad()
def cache_attention(
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
    stored_empty: bool = False,
) -> torch.Tensor:
    """Triton attention over the packed cache; same semantics as :func:`cache_attention_ref`.

    Steps of ``DENSE_MIN_QUERIES`` or more query positions with new tokens (prefill; fp16/bf16, no softcap
    or window) attend to their own tokens with flash attention (``kernels.new_token_attention``) and to
    the stored ones with the split kernel, merged by log-sum-exp. ``stored_empty``: the caller promises
    ``cache.lengths == 0`` for every sequence, and such a step skips the stored-token pass (a launch of
    tens of thousands of programs that would find nothing to read).

    query ``[B, Hq, T, D]`` fp16/bf16/fp32, new keys/values ``[B, Hkv, T, D]`` or None ->
    ``[B, Hq, T, D]`` contiguous, query dtype. head_dim 32, 64, 96, 128 or 256 (``cache_layout.
    TRITON_HEAD_DIMS``; ``check_triton_format`` owns the limits). Two launches (split-K
    stage over the quantized prefix and, in extra programs, the residual and new tokens; merge stage);
    where ``TUNING["gluon"]`` routes the quantized prefix to ``kernels/cache_attention_gluon.py`` (CUDA,
    2-bit, large caches), four: query rotation, the Gluon split kernel, the residual programs, the merge.
    Scratch for the partials is allocated here from static sizes; no host synchronization.

    Numerics: the quantized part dots fp16 operands with fp32 accumulation: for keys the rotated,
    pre-scaled query times each group's fp16 scale (rounded to fp16 once) against the exact integer
    codes, plus the fp32 bias query . group minimum; for values the probabilities against values
    dequantized in fp16 from their group parameters. Softmax, merge, residual and new tokens are fp32.
    A query whose scaled value (or its product with a key scale) exceeds the fp16 range is not supported.
    """
    if (new_keys is None) != (new_values is None):
        raise ValueError("new_keys and new_values must both be given or both be None")
    check_attention_inputs(query, cache, new_keys, new_values, skip)
    check_triton_cache(cache, fmt, attention=True)  # group size, head_dim (query's, checked equal), lengths
    bsz, hq, tq, d = query.shape
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be a positive float or None, got {softcap}")
    if window is not None and (int(window) != window or window < 1):
        raise ValueError(f"window must be a positive int or None, got {window}")
    scale = d**-0.5 if scale is None else float(scale)
    if bsz == 0 or tq == 0 or hq == 0:
        return torch.empty((bsz, hq, tq, d), dtype=query.dtype, device=query.device)
    if uses_dense_new_tokens(query, new_keys, softcap, window):
        # long multi-token steps (prefill): the stored tokens through the split kernel, the step's own
        # tokens through flash attention, merged by their log-sum-exp
        cache_dtype = cache.residual_keys.dtype
        new_keys, new_values = new_keys.to(cache_dtype), new_values.to(cache_dtype)
        if stored_empty:
            return causal_attention(query, new_keys, new_values, skip, scale)
        out_n, lse_n = causal_attention_lse(query, new_keys, new_values, skip, scale)
        out_c, lse_c = _launch(query, cache, fmt, new_keys, new_values, skip, scale, softcap, window,
                               attend_new=False, lse=True)  # fmt: skip
        return merge_attention(out_c, lse_c, out_n, lse_n).to(query.dtype)
    return _launch(query, cache, fmt, new_keys, new_values, skip, scale, softcap, window, attend_new=True, lse=False)[0]


def _gluon_kernel(query, fmt: CacheFormat, d: int, d_pad: int, has_new: bool, softcap, window, slots: int):
    """The Gluon module when its kernel serves this launch (CUDA, ``TUNING["gluon"]``, a format and step it
    supports: new tokens given, no softcap or window, ``slots`` = batch x kv heads x capacity at least
    ``min_token_heads``), else None."""
    cfg = TUNING.get("gluon")
    if query.device.type != "cuda" or not cfg or not has_new or softcap is not None or window is not None:
        return None
    if slots < cfg.get("min_token_heads", 0):
        return None
    if cache_attention_gluon is None:
        return None
    if not cache_attention_gluon.supports(d, d_pad, fmt.bits, fmt.group_size, fmt.residual_length):
        return None
    if torch.cuda.get_device_capability(query.device) < (8, 0):
        return None
    return cache_attention_gluon


# Most scratch rows (sequences x query heads x query positions) one launch pair serves; longer steps are
# launched in slices of query positions (keeps the partials' scratch and the grid bounded).
MAX_SCRATCH_ROWS = 1 << 17


def _launch(query, cache, fmt, new_keys, new_values, skip, scale, softcap, window, *, attend_new: bool, lse: bool):
    """Split + merge launches over query slices -> (out, lse or None).

    ``attend_new=False`` with new keys given: the queries sit after the step's tokens as usual but
    attend only to the stored tokens (the caller attends to the step's tokens). ``lse``: also return the
    natural-log sum of exp(scores) per query row ``[B, Hq, T]`` fp32 (``-inf`` where nothing was
    attended) and write ``out`` in fp32.
    """
    g, r, bits = fmt.group_size, fmt.residual_length, fmt.bits
    bsz, hq, tq, d = query.shape
    hkv = cache.residual_keys.shape[1]
    out = torch.empty((bsz, hq, tq, d), dtype=torch.float32 if lse else query.dtype, device=query.device)
    lse_out = torch.empty((bsz, hq, tq), dtype=torch.float32, device=query.device) if lse else None
    group = hq // hkv
    d_pad = next_pow2(d)
    hb = hadamard_block_size(d)
    per_byte = 8 // bits
    t_loc = max(1, min(tq, MAX_SCRATCH_ROWS // (bsz * hq)))
    rows = group * t_loc
    # a tile holds whole groups, >= 16 tokens per bit subset, and never more than the residual block
    # when that is possible (else the last tile of the quantized prefix is masked)
    block_n = max(TUNING["block_n"], g, 16 * per_byte)
    ngt = block_n // g
    rb = max(1, TUNING["tile_rows"] // ngt)
    num_mb = -(-rows // rb)
    gluon = _gluon_kernel(query, fmt, d, d_pad, new_keys is not None, softcap, window, bsz * hkv * cache.max_len)
    if gluon is not None:  # the Gluon kernel takes the quantized prefix; Triton programs the residual only
        gt = TUNING["gluon"]
        splits = num_kv_splits(bsz, hkv, num_mb, cache.max_len, num_sms(query.device), block_n * gt["warps"],
                               gt["programs_per_sm"], gt["min_tiles"])  # fmt: skip
        cfg = {k: TUNING[k] for k in ("num_warps", "num_stages", "maxnreg")}
    else:
        splits, cfg = split_launch_config(bsz, hkv, num_mb, cache.max_len, num_sms(query.device), block_n, d_pad)
    rsplits = max(1, min(TUNING["residual_splits"], r // 32))  # powers of two: r is a multiple of 32
    rsplits = 1 << (rsplits.bit_length() - 1)
    while r % rsplits:
        rsplits //= 2
    part_o = torch.empty((bsz, hkv, rows, splits + rsplits, d_pad), dtype=torch.float32, device=query.device)
    part_lse = torch.empty((bsz, hkv, rows, splits + rsplits), dtype=torch.float32, device=query.device)
    has_skip, has_new = skip is not None, new_keys is not None
    skip_arg = skip if has_skip else cache.lengths
    nk = new_keys if has_new else cache.residual_keys
    nv = new_values if has_new else cache.residual_values
    c = cache
    cap_regs = query.device.type == "cuda" and bool(cfg["maxnreg"])
    first_split = 0 if gluon is None else splits
    if gluon is not None:  # the queries rotated and scaled once, for every split program of the Gluon kernel
        qrot = torch.empty((bsz, hq, tq, d), dtype=torch.float32, device=query.device)
        torch.library.wrap_triton(_rotated_queries_kernel)[(bsz * hq, triton.cdiv(tq, 16))](
            query, c.key_rotated, qrot, scale, 1.0 / math.sqrt(hb), tq, *query.stride(),
            HQ=hq, GROUP=group, D=d, LOG2_HB=hb.bit_length() - 1, TB=16, num_warps=4)  # fmt: skip
        # eager: the launcher itself (no op dispatch); traced: the opaque op
        traced = torch.compiler.is_compiling() or type(query) is not torch.Tensor
        launch_gluon = gluon.quantized_splits if traced else gluon.launch_quantized_splits
    for q0 in range(0, tq, t_loc):
        n_loc = min(t_loc, tq - q0)
        row_blocks = -(-group * n_loc // rb)
        scalars = (scale, float(softcap or 1.0), int(window or 0), 1.0 / math.sqrt(hb), tq, c.max_len, q0, n_loc)
        if gluon is not None:
            launch_gluon(
                qrot, c.key_codes, c.key_mn, c.key_scale, c.key_norms, c.value_codes, c.value_mn, c.value_scale,
                c.lengths, skip, c.key_scaled, part_o, part_lse, q0, n_loc, c.max_len, bits, splits,
                splits + rsplits, row_blocks, gt["warps"], gt.get("maxnreg", 0))  # fmt: skip
        torch.library.wrap_triton(_cache_attn_split_kernel)[(row_blocks, bsz * hkv, splits + rsplits - first_split)](
            query, c.key_codes, c.key_mn, c.key_scale, c.key_norms, c.value_codes, c.value_mn, c.value_scale,
            c.residual_keys, c.residual_values, nk, nv, c.lengths, skip_arg, c.key_rotated, c.key_scaled,
            part_o, part_lse,
            *scalars,
            *query.stride(),
            *c.key_codes.stride(), *c.key_mn.stride(), *c.key_norms.stride(),
            *c.value_codes.stride(), *c.value_mn.stride(),
            *c.residual_keys.stride(), *c.residual_values.stride(), *nk.stride(), *nv.stride(),
            HKV=hkv, GROUP=group, HEAD_DIM=d, D_PAD=d_pad, LOG2_HB=hb.bit_length() - 1, BITS=bits, G=g, R=r,
            RB=rb, BLOCK_N=block_n, BLOCK_R=max(1, 8192 // (rb * d_pad)), RSPLITS=rsplits,
            VC=max(16, d_pad // per_byte), SPLITS=splits,
            HAS_SKIP=has_skip, HAS_NEW=has_new, ATTEND_NEW=has_new and attend_new, SOFTCAP=softcap is not None,
            WINDOW=window is not None, ASM=query.device.type == "cuda" and TUNING["asm"], FIRST_SPLIT=first_split,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
            **({"maxnreg": cfg["maxnreg"]} if cap_regs else {}),
        )  # fmt: skip
        # without lse the kernel never stores through its LSE pointer: part_lse stands in (no allocation)
        torch.library.wrap_triton(_cache_attn_merge_kernel)[(group * n_loc, bsz * hkv)](
            part_o, part_lse, skip_arg, out, part_lse if lse_out is None else lse_out, tq, 1.0 / math.sqrt(hb),
            q0, n_loc, *out.stride(), *((0, 0, 0) if lse_out is None else lse_out.stride()),
            HKV=hkv, GROUP=group, HEAD_DIM=d, D_PAD=d_pad, LOG2_HB=hb.bit_length() - 1,
            SPLITS=splits, SPLITS_P2=next_pow2(splits), RSPLITS=rsplits, ROTATE_V=bool(fmt.rotate_values),
            HAS_SKIP=has_skip, STORE_LSE=lse,
            num_warps=4,
        )  # fmt: skip
    return out, lse_out
