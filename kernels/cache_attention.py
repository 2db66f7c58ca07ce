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
from .cache_layout import CacheFormat, CacheTensors
from .hadamard import hadamard_block_size
from .quantization import QuantizedKeys, QuantizedValues
from .triton_utils import _fwht_rows, _to_dtype, _unpack_channels_f16, _unpack_tokens_f16, next_pow2, num_sms

__all__ = ["cache_attention", "cache_attention_ref", "check_attention_inputs", "num_kv_splits"]


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


# ---------------------------------------------------------------------------------------------------
# Triton split-K ("flash-decoding") attention over the packed cache
#
# Rows: the GROUP query heads of one kv head times the T_q query positions, row = i * GROUP + g, in
# blocks of BLOCK_M (>= 16 for tl.dot). GQA: every program serves all query heads of its kv head, so
# the packed cache is read once per kv head.
#   stage 1, _cache_attn_split_kernel, grid (B * Hkv, SPLITS, row blocks): one split of the quantized
#     prefix [0, Q). Streams packed key codes + fp16 (mn, scale) + fp32 token norms, dequantizes in
#     registers, scores against the rotated query (per-head flag), multiplies by the token norm
#     (per-head flag), online softmax in fp32 with exp2, P @ V with dequantized value codes (still in
#     the rotated value space). Writes the split's normalized output and log2-sum-exp (fp32 scratch).
#   stage 2, _cache_attn_merge_kernel, grid (B * Hkv, GROUP * T_q): one program per query row. Loads
#     all splits' partials at once, merges them by LSE, applies the inverse value rotation H
#     (symmetric, self-inverse; block-diagonal for non-power-of-two D) once to the merged output, then
#     continues the same online softmax over the full-precision residual tokens and the step's new
#     tokens (original space, fp32, causal) and writes the output; left-padding rows write zeros.
# Large T_q (prefill chunks) runs the same two kernels (more row blocks, usually one split): correct
# for any T_q, but the per-row new-token loop costs O(T_q^2) vector work per kv head, so long prompts
# are slow on this path (prefill speed is not tuned). Measured decode speed on the H200 and what
# limits it: benchmarks/README.md (slower than cuDNN bf16 today: dequantization is not hidden).

_LOG2E = 1.4426950408889634


@triton.jit
def _softcap_log2(x, softcap):
    # natural-units score -> softcap * tanh(x / softcap), in log2 units. tanh(y) = 1 - 2 / (exp(2y) + 1).
    y = x / softcap
    t = 1.0 - 2.0 / (tl.exp2(y * (2.0 * 1.4426950408889634)) + 1.0)
    return t * (softcap * 1.4426950408889634)


@triton.jit
def _row_setup(lengths, skip, b, mb, T_Q, MAX_LEN,  #
               GROUP: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr,  #
               HAS_SKIP: tl.constexpr, HAS_NEW: tl.constexpr):  # fmt: skip
    # Per-sequence counts and per-row query positions (see cache_attention_ref for the semantics).
    length = tl.minimum(tl.load(lengths + b), MAX_LEN)
    n_quant = length // R * R
    s = 0
    if HAS_SKIP:
        s = tl.minimum(tl.maximum(tl.load(skip + b).to(tl.int32), 0), T_Q)
    n_q = T_Q - s
    total = length
    if HAS_NEW:
        total = length + n_q
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    qi = rows // GROUP
    qg = rows % GROUP
    row_ok = (qi < T_Q) & (qi >= s)
    q_pos = total - n_q + qi - s
    return length, n_quant, s, n_q, total, qi, qg, row_ok, q_pos


@triton.jit
def _cache_attn_split_kernel(
    q, key_codes, key_mn, key_scale, key_norms, val_codes, val_mn, val_scale,  #
    lengths, skip, key_rotated, key_scaled, part_o, part_lse,  #
    qk_scale, softcap, window, hscale, T_Q, MAX_LEN,  #
    sqb, sqh, sqt, sqd,  #
    skcb, skch, skct, skcd, skmb, skmh, skmg, skmd, sknb, sknt,  #
    svcb, svch, svct, svcd, svmb, svmh, svmt, svmg,  #
    HKV: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,  #
    LOG2_HB: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, R: tl.constexpr,  #
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, NUM_MB: tl.constexpr,  #
    HAS_SKIP: tl.constexpr, HAS_NEW: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr,  #
    MAGIC: tl.constexpr,  #
):
    # Inductor passes Python floats to user Triton kernels as fp64; keep all math in fp32
    qk_scale, softcap, hscale = tl.cast(qk_scale, tl.float32), tl.cast(softcap, tl.float32), tl.cast(hscale, tl.float32)
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    mb = tl.program_id(2)
    b = pid_bh // HKV
    h = pid_bh % HKV
    PER_BYTE: tl.constexpr = 8 // BITS
    NG: tl.constexpr = D_PAD // G
    EVEN_D: tl.constexpr = HEAD_DIM == D_PAD
    length, n_quant, s, n_q, total, qi, qg, row_ok, q_pos = _row_setup(
        lengths, skip, b, mb, T_Q, MAX_LEN, GROUP, R, BLOCK_M, HAS_SKIP, HAS_NEW)

    # this split's token range inside [lo, n_quant), in whole BLOCK_N tiles (n_quant is a multiple of
    # R, and BLOCK_N divides R, so tiles never straddle the end of the quantized prefix)
    lo = 0
    if WINDOW:
        first_i = tl.maximum((mb * BLOCK_M) // GROUP, s)
        lo = tl.maximum(total - n_q + first_i - s - window + 1, 0) // BLOCK_N * BLOCK_N
    span = tl.maximum(n_quant - lo, 0)
    chunk = tl.cdiv(tl.cdiv(span, SPLITS), BLOCK_N) * BLOCK_N
    start = lo + split * chunk
    end = tl.minimum(start + chunk, n_quant)

    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    q_ptrs = q + b * sqb + (h * GROUP + qg)[:, None] * sqh + qi[:, None] * sqt + offs_d[None, :] * sqd
    qf = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    rot = tl.load(key_rotated + h) != 0
    scl = tl.load(key_scaled + h) != 0
    qf = tl.where(rot, _fwht_rows(qf, BLOCK_M, D_PAD, LOG2_HB) * hscale, qf)
    if SOFTCAP:
        qd = (qf * qk_scale).to(tl.float16)
    else:
        qd = (qf * (qk_scale * 1.4426950408889634)).to(tl.float16)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    # pointers advance by one tile per iteration (no per-element index math in the loop)
    kc_ptrs = key_codes + b * skcb + h * skch + offs_d[None, :] * skcd \
        + (start // PER_BYTE + tl.arange(0, BLOCK_N // PER_BYTE))[:, None] * skct
    km_offs = b * skmb + h * skmh + offs_d[None, :] * skmd + (start // G + tl.arange(0, BLOCK_N // G))[:, None] * skmg
    nrm_ptrs = key_norms + b * sknb + (start + tl.arange(0, BLOCK_N)) * sknt
    vc_cols = tl.arange(0, D_PAD // PER_BYTE)
    vm_cols = tl.arange(0, NG)
    vc_ptrs = val_codes + b * svcb + h * svch + vc_cols[None, :] * svcd + (start + tl.arange(0, BLOCK_N))[:, None] * svct
    vm_offs = b * svmb + h * svmh + vm_cols[None, :] * svmg + (start + tl.arange(0, BLOCK_N))[:, None] * svmt
    for t0 in range(start, end, BLOCK_N):
        tok = t0 + tl.arange(0, BLOCK_N)
        # keys: [BLOCK_N / PER_BYTE, D] packed bytes -> codes, fp16 group params broadcast over G tokens
        if EVEN_D:
            kc = tl.load(kc_ptrs)
            kmn = tl.load(key_mn + km_offs)
            ksc = tl.load(key_scale + km_offs)
        else:
            kc = tl.load(kc_ptrs, mask=d_ok[None, :], other=0)
            kmn = tl.load(key_mn + km_offs, mask=d_ok[None, :], other=0.0)
            ksc = tl.load(key_scale + km_offs, mask=d_ok[None, :], other=0.0)
        # dequantize in fp16 in the [group, token, channel] shape, so each group's (mn, scale) row
        # broadcasts over its tokens without materializing a [BLOCK_N, D] parameter tile
        kcode = _unpack_tokens_f16(kc, BLOCK_N, D_PAD, BITS, G, MAGIC)
        k = tl.reshape(kcode * ksc[:, None, :] + kmn[:, None, :], (BLOCK_N, D_PAD))
        sc = tl.dot(qd, tl.trans(k))
        nrm = tl.load(nrm_ptrs)
        sc = sc * tl.where(scl, nrm, 1.0)[None, :]
        if SOFTCAP:
            sc = _softcap_log2(sc, softcap)
        if WINDOW or not HAS_NEW:
            ok = tok[None, :] <= q_pos[:, None]
            if WINDOW:
                ok = ok & (tok[None, :] > q_pos[:, None] - window)
            sc = tl.where(ok, sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(sc - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        # values: [BLOCK_N, D / PER_BYTE] packed bytes, fp16 (mn, scale) per token and G channels
        if EVEN_D:
            vc = tl.load(vc_ptrs)
            vmn = tl.load(val_mn + vm_offs)
            vsc = tl.load(val_scale + vm_offs)
        else:
            vcm = (vc_cols < HEAD_DIM // PER_BYTE)[None, :]
            vmm = (vm_cols < HEAD_DIM // G)[None, :]
            vc = tl.load(vc_ptrs, mask=vcm, other=0)
            vmn = tl.load(val_mn + vm_offs, mask=vmm, other=0.0)
            vsc = tl.load(val_scale + vm_offs, mask=vmm, other=0.0)
        vcode = _unpack_channels_f16(vc, BLOCK_N, D_PAD, BITS, G, MAGIC)
        v = tl.reshape(vcode * vsc[:, :, None] + vmn[:, :, None], (BLOCK_N, D_PAD))
        acc += tl.dot(p.to(tl.float16), v)
        m_i = m_new
        kc_ptrs += (BLOCK_N // PER_BYTE) * skct
        km_offs += (BLOCK_N // G) * skmg
        nrm_ptrs += BLOCK_N * sknt
        vc_ptrs += BLOCK_N * svct
        vm_offs += BLOCK_N * svmt

    has = l_i > 0
    o = tl.where(has[:, None], acc / tl.where(has, l_i, 1.0)[:, None], 0.0)
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    # partials of the real rows only: [B * Hkv, GROUP * T_Q, SPLITS, D_PAD] and [..., SPLITS]
    row = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = (pid_bh * (GROUP * T_Q) + row) * SPLITS + split
    st_ok = qi < T_Q
    tl.store(part_o + slot[:, None] * D_PAD + offs_d[None, :], o, mask=st_ok[:, None])
    tl.store(part_lse + slot, lse, mask=st_ok)


@triton.jit
def _attend_tail(kb, vb, st_k, sd_k, st_v, sd_v, first, hi, base_pos, qf, q_pos, m_i, l_i, acc,  #
                 softcap, window, cache_ty: tl.constexpr,  #
                 HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_R: tl.constexpr,  #
                 SOFTCAP: tl.constexpr, WINDOW: tl.constexpr):  # fmt: skip
    # One query row: online softmax over full-precision tokens r in [first, hi) of one source
    # (residual or new) at positions base_pos + r, cast to the cache dtype first (as the reference
    # does), fp32 throughout. qf [D_PAD], acc [D_PAD], m_i/l_i scalars (log2 domain).
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    for r0 in range(first, hi, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < hi
        kv_mask = r_ok[:, None] & d_ok[None, :]
        kt = tl.load(kb + r[:, None] * st_k + offs_d[None, :] * sd_k, mask=kv_mask, other=0.0)
        kt = _to_dtype(kt, cache_ty)
        sc = tl.sum(kt * qf[None, :], axis=1)
        if SOFTCAP:
            sc = _softcap_log2(sc, softcap)
        pos = base_pos + r
        ok = r_ok & (pos <= q_pos)
        if WINDOW:
            ok = ok & (pos > q_pos - window)
        sc = tl.where(ok, sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(sc - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        vt = tl.load(vb + r[:, None] * st_v + offs_d[None, :] * sd_v, mask=kv_mask, other=0.0)
        vt = _to_dtype(vt, cache_ty)
        acc = acc * alpha + tl.sum(p[:, None] * vt, axis=0)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _cache_attn_merge_kernel(
    q, res_k, res_v, new_k, new_v, lengths, skip, part_o, part_lse, out,  #
    qk_scale, softcap, window, hscale, T_Q, MAX_LEN,  #
    sqb, sqh, sqt, sqd, sob, soh, sot, sod,  #
    srb, srh, srt, srd, swb, swh, swt, swd,  #
    snb, snh, snt, snd, svb, svh, svt, svd,  #
    HKV: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,  #
    LOG2_HB: tl.constexpr, R: tl.constexpr, BLOCK_R: tl.constexpr,  #
    SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr,  #
    ROTATE_V: tl.constexpr, HAS_SKIP: tl.constexpr, HAS_NEW: tl.constexpr,  #
    SOFTCAP: tl.constexpr, WINDOW: tl.constexpr,  #
):
    # Inductor passes Python floats to user Triton kernels as fp64; keep all math in fp32
    qk_scale, softcap, hscale = tl.cast(qk_scale, tl.float32), tl.cast(softcap, tl.float32), tl.cast(hscale, tl.float32)
    # one program per (sequence, kv head, query row = i * GROUP + g)
    pid_bh = tl.program_id(0)
    row = tl.program_id(1)
    b = pid_bh // HKV
    h = pid_bh % HKV
    qi = row // GROUP
    qg = row % GROUP
    length = tl.minimum(tl.load(lengths + b), MAX_LEN)
    n_quant = length // R * R
    s = 0
    if HAS_SKIP:
        s = tl.minimum(tl.maximum(tl.load(skip + b).to(tl.int32), 0), T_Q)
    n_q = T_Q - s
    total = length
    if HAS_NEW:
        total = length + n_q
    q_pos = total - n_q + qi - s
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    o_ptrs = out + b * sob + (h * GROUP + qg) * soh + qi * sot + offs_d * sod
    if qi < s:  # left padding: zeros
        tl.store(o_ptrs, _to_dtype(tl.zeros([D_PAD], tl.float32), out.dtype.element_ty), mask=d_ok)
        return

    # 1. merge the splits of the quantized prefix by their log2-sum-exp (one load of all splits)
    sp = tl.arange(0, SPLITS_P2)
    slot = (pid_bh * (GROUP * T_Q) + row) * SPLITS + sp
    lse = tl.load(part_lse + slot, mask=sp < SPLITS, other=float("-inf"))
    o_s = tl.load(part_o + slot[:, None] * D_PAD + offs_d[None, :], mask=(sp < SPLITS)[:, None], other=0.0)
    m_q = tl.max(lse, axis=0)
    mq_safe = tl.where(m_q == float("-inf"), 0.0, m_q)
    w = tl.exp2(lse - mq_safe)
    l_q = tl.sum(w, axis=0)
    has_q = l_q > 0
    o_q = tl.sum(w[:, None] * o_s, axis=0) / tl.where(has_q, l_q, 1.0)
    if ROTATE_V:  # back from the rotated value space: o = o' H
        o_q = tl.reshape(_fwht_rows(tl.reshape(o_q, (1, D_PAD)), 1, D_PAD, LOG2_HB), (D_PAD,)) * hscale

    # 2. continue the online softmax over the residual and the step's new tokens (original space)
    m_i = tl.where(has_q, m_q + tl.log2(tl.where(has_q, l_q, 1.0)), float("-inf"))
    l_i = tl.where(has_q, 1.0, 0.0)
    acc = tl.where(has_q, o_q, 0.0)
    qf = tl.load(q + b * sqb + (h * GROUP + qg) * sqh + qi * sqt + offs_d * sqd, mask=d_ok, other=0.0)
    qf = qf.to(tl.float32)
    if SOFTCAP:
        qf = qf * qk_scale
    else:
        qf = qf * (qk_scale * 1.4426950408889634)
    cache_ty = res_k.dtype.element_ty
    # residual slots [0, length - n_quant) sit at positions n_quant + r
    m_i, l_i, acc = _attend_tail(
        res_k + b * srb + h * srh, res_v + b * swb + h * swh, srt, srd, swt, swd,
        0, length - n_quant, n_quant, qf, q_pos, m_i, l_i, acc, softcap, window, cache_ty,
        HEAD_DIM, D_PAD, BLOCK_R, SOFTCAP, WINDOW)  # fmt: skip
    if HAS_NEW:  # this step's tokens j in [s, i] at positions length + j - s (causal)
        m_i, l_i, acc = _attend_tail(
            new_k + b * snb + h * snh, new_v + b * svb + h * svh, snt, snd, svt, svd,
            s, qi + 1, length - s, qf, q_pos, m_i, l_i, acc, softcap, window, cache_ty,
            HEAD_DIM, D_PAD, BLOCK_R, SOFTCAP, WINDOW)  # fmt: skip

    o = tl.where(l_i > 0, acc / tl.where(l_i > 0, l_i, 1.0), 0.0)
    tl.store(o_ptrs, _to_dtype(o, out.dtype.element_ty), mask=d_ok)


def num_kv_splits(
    batch: int, kv_heads: int, row_blocks: int, max_len: int, num_sms: int, block_n: int, programs_per_sm: int = 2
) -> int:
    """Splits of the quantized prefix per (sequence, kv head, row block): a pure function of static sizes.

    Aims at about ``programs_per_sm`` programs per multiprocessor over ``batch * kv_heads * row_blocks``
    programs, never fewer than 4 tiles of ``block_n`` tokens per split at a full cache, at most 64.
    Depends on the cache capacity, not on the (device-side) lengths, so it is fixed for a captured
    decode step.
    """
    programs = max(1, batch * kv_heads * row_blocks)
    want = -(-programs_per_sm * num_sms // programs)
    cap = max(1, max_len // (4 * block_n))
    return max(1, min(want, cap, 64))


_SUPPORTED_HEAD_DIMS = (32, 64, 96, 128, 256)

# Launch parameters of the split (stage 1) kernel; benchmarks/decode_attention.py --sweep explores them.
# Keyed on nothing that changes per step (never on sequence length). Defaults: the best of the sweep on
# the H200 (2026-11-28, batch 1, 128K, 32/8 heads, D=128; see benchmarks/README.md). "magic" selects
# the bit-trick code -> fp16 conversion instead of the int -> fp16 conversion instruction (same speed
# there: the loop is bound by unpacking and layout conversions, not by the conversion pipe).
TUNING = {"block_n": 128, "num_warps": 4, "num_stages": 3, "programs_per_sm": 2, "magic": False}


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
) -> torch.Tensor:
    """Triton attention over the packed cache; same semantics as :func:`cache_attention_ref`.

    query ``[B, Hq, T, D]`` fp16/bf16/fp32, new keys/values ``[B, Hkv, T, D]`` or None ->
    ``[B, Hq, T, D]`` contiguous, query dtype. head_dim 32, 64, 96, 128 or 256. Two launches (split-K
    stage over the quantized prefix, merge stage with the residual and new tokens); scratch for the
    partials is allocated here from static sizes; no host synchronization.

    Numerics: the quantized part dots fp16 operands (query rotated and pre-scaled by the softmax scale,
    keys/values dequantized from their fp16 group parameters) with fp32 accumulation; softmax, merge,
    residual and new tokens are fp32. A query whose scaled value exceeds the fp16 range is not supported.
    """
    if (new_keys is None) != (new_values is None):
        raise ValueError("new_keys and new_values must both be given or both be None")
    check_attention_inputs(query, cache, new_keys, new_values, skip)
    g, r, bits = fmt.group_size, fmt.residual_length, fmt.bits
    if g & (g - 1) or g < 8:
        raise ValueError(f"Triton cache kernels need a power-of-two group_size >= 8, got {g}")
    if cache.lengths.dtype != torch.int32:
        raise TypeError(f"cache.lengths must be int32, got {cache.lengths.dtype}")
    bsz, hq, tq, d = query.shape
    hkv = cache.residual_keys.shape[1]
    if d not in _SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {d} not supported by the Triton kernel (query {tuple(query.shape)}); "
                         f"supported: {_SUPPORTED_HEAD_DIMS}; use cache_attention_ref for others")  # fmt: skip
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be a positive float or None, got {softcap}")
    if window is not None and (int(window) != window or window < 1):
        raise ValueError(f"window must be a positive int or None, got {window}")
    scale = d**-0.5 if scale is None else float(scale)
    out = torch.empty((bsz, hq, tq, d), dtype=query.dtype, device=query.device)
    if bsz == 0 or tq == 0 or hq == 0:
        return out
    group = hq // hkv
    d_pad = next_pow2(d)
    hb = hadamard_block_size(d)
    rows = group * tq
    block_m = min(max(16, next_pow2(rows)), 64)
    num_mb = -(-rows // block_m)
    block_n = min(64 if d_pad >= 256 else TUNING["block_n"], r & -r)
    splits = num_kv_splits(bsz, hkv, num_mb, cache.max_len, num_sms(query.device), block_n, TUNING["programs_per_sm"])
    part_o = torch.empty((bsz, hkv, rows, splits, d_pad), dtype=torch.float32, device=query.device)
    part_lse = torch.empty((bsz, hkv, rows, splits), dtype=torch.float32, device=query.device)
    has_skip, has_new = skip is not None, new_keys is not None
    skip_arg = skip if has_skip else cache.lengths
    nk = new_keys if has_new else cache.residual_keys
    nv = new_values if has_new else cache.residual_values
    c = cache
    common = dict(
        HKV=hkv, GROUP=group, HEAD_DIM=d, D_PAD=d_pad, LOG2_HB=hb.bit_length() - 1, R=r,
        BLOCK_M=block_m, SPLITS=splits, NUM_MB=num_mb,
        HAS_SKIP=has_skip, HAS_NEW=has_new, SOFTCAP=softcap is not None, WINDOW=window is not None,
    )  # fmt: skip
    scalars = (scale, float(softcap or 1.0), int(window or 0), 1.0 / math.sqrt(hb), tq, c.max_len)
    torch.library.wrap_triton(_cache_attn_split_kernel)[(bsz * hkv, splits, num_mb)](
        query, c.key_codes, c.key_mn, c.key_scale, c.key_norms, c.value_codes, c.value_mn, c.value_scale,
        c.lengths, skip_arg, c.key_rotated, c.key_scaled, part_o, part_lse,
        *scalars,
        *query.stride(),
        *c.key_codes.stride(), *c.key_mn.stride(), *c.key_norms.stride(),
        *c.value_codes.stride(), *c.value_mn.stride(),
        BITS=bits, G=g, BLOCK_N=block_n, MAGIC=bool(TUNING["magic"]), **common,
        num_warps=TUNING["num_warps"] if d_pad <= 128 else 8, num_stages=TUNING["num_stages"],
    )  # fmt: skip
    splits_p2 = next_pow2(splits)
    merge = {k: v for k, v in common.items() if k not in ("BLOCK_M", "NUM_MB")}
    torch.library.wrap_triton(_cache_attn_merge_kernel)[(bsz * hkv, rows)](
        query, c.residual_keys, c.residual_values, nk, nv, c.lengths, skip_arg, part_o, part_lse, out,
        *scalars,
        *query.stride(), *out.stride(),
        *c.residual_keys.stride(), *c.residual_values.stride(), *nk.stride(), *nv.stride(),
        BLOCK_R=max(16, min(64, 4096 // d_pad)), SPLITS_P2=splits_p2, ROTATE_V=bool(fmt.rotate_values), **merge,
        num_warps=4,
    )  # fmt: skip
    return out
