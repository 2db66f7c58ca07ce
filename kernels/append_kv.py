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
import triton
import triton.language as tl

from .cache_layout import CacheFormat, CacheTensors, check_storable, check_triton_cache
from .hadamard import hadamard_block_size
from .quantization import quantize_keys, quantize_values
from .triton_utils import (
    _fwht_rows,
    _pack_channels,
    _pack_tokens,
    _quantize_tile,
    _scalar_scale,
    _to_dtype,
    hadamard_scale,
    levels_scale,
    next_pow2,
)

__all__ = ["append_kv", "append_kv_ref", "check_append_inputs", "check_overflow", "overflowed"]


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
    if min(b, h, d) < 1:
        raise ValueError(f"new keys {tuple(new_keys.shape)}: B, Hkv and D must be >= 1 (only T_new may be 0)")
    if new_keys.device != cache.lengths.device or new_values.device != cache.lengths.device:
        raise ValueError(f"new keys on {new_keys.device}, values on {new_values.device}, cache on {cache.lengths.device}")
    if not new_keys.is_floating_point() or new_keys.dtype != new_values.dtype:
        raise TypeError(f"new keys/values must share one float dtype, got {new_keys.dtype}/{new_values.dtype}")
    if skip is not None and (skip.shape != (b,) or skip.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"skip must be an int tensor of shape ({b},), got {skip.dtype} {tuple(skip.shape)}")


def overflowed(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """Per-sequence overflow flags, bool ``[B]`` on ``lengths``' device (no host sync).

    ``lengths``: a cache's ``lengths`` ``[B]``; ``max_len``: its capacity (``CacheTensors.max_len``).
    True where the Triton append marked an overflow (``lengths[b] > max_len``, see :func:`append_kv`).
    Plain torch ops, so a compiled step may fold the flags into its own outputs.
    """
    return lengths > max_len


def check_overflow(lengths: torch.Tensor, max_len: int) -> None:
    """Raise ``ValueError`` if any sequence's ``lengths`` passed ``max_len`` (an overflow the Triton
    append marked instead of raising). Eager only: one host sync (reads a ``[B]`` tensor)."""
    over = overflowed(lengths, max_len)
    if not bool(over.any()):
        return
    seqs = over.nonzero().flatten().tolist()
    reached = lengths[over].tolist()
    raise ValueError(
        f"cache overflow: sequence(s) {seqs} reached {reached} tokens, past max_len {max_len} (the append "
        f"that crossed it wrote nothing for them; the cache must be reset or rebuilt with a larger max_len)"
    )


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
    Raises ValueError when a sequence would exceed the cache's ``max_len``, and when a block to quantize
    cannot be stored (``cache_layout.check_storable``: non-finite tokens, or group parameters beyond the
    fp16 range, e.g. bf16 values > 65504, the error ``fake_quantize`` raises on the same tokens); nothing is
    written then. Host-synchronizing reference: the CPU path and the oracle for the Triton kernel.
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
    staged = []  # every sequence's blocks are quantized and checked before anything is written
    for b, (length, s) in enumerate(zip(lengths, skips)):
        n_res = length % r
        keys = torch.cat([cache.residual_keys[b, :, :n_res], new_keys[b, :, s:].to(cache.residual_keys.dtype)], 1)
        values = torch.cat([cache.residual_values[b, :, :n_res], new_values[b, :, s:].to(cache.residual_values.dtype)], 1)
        n_blocks = keys.shape[1] // r
        qk = qv = None
        if n_blocks:
            done = n_blocks * r
            qk = quantize_keys(keys[None, :, :done], fmt.bits, g, cache.key_rotated, cache.key_scaled)
            qv = quantize_values(values[None, :, :done], fmt.bits, g, fmt.rotate_values)
            check_storable(f"keys (sequence {b})", keys[:, :done], qk.mn, qk.scale, qk.norms)
            check_storable(f"values (sequence {b})", values[:, :done], qv.mn, qv.scale)
        staged.append((keys, values, n_blocks, qk, qv))
    for b, ((length, s), (keys, values, n_blocks, qk, qv)) in enumerate(zip(zip(lengths, skips), staged)):
        if n_blocks:
            t0, t1 = length // r * r, length // r * r + n_blocks * r
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


# ---------------------------------------------------------------------------------------------------
# Triton quantize-on-write
#
# Two launches, both sized for the worst case from static shapes only (no host sync, CUDA-graph
# capturable); each program reads lengths[b] / skip[b] on the device and exits early when it has no work:
#   1. _append_quantize_kernel, grid (max groups, B, Hkv): one program per (32-token group of a block
#      that completes in this append, sequence, kv head). It reads the old residual and the new tokens,
#      computes the omni-token norms (over all kv heads), rotates / divides / quantizes / packs.
#   2. _append_residual_kernel, grid (B,): writes the new residual tokens and bumps lengths[b].
# Running them in this order (stream order) is what makes the in-place update race-free: the residual
# slots that kernel 2 overwrites are the ones kernel 1 reads, and every program of kernel 1 reads
# lengths[b]; kernel 2 has one program per sequence, which reads lengths[b] before it writes it.


@triton.jit
def _load_combined(res_ptr, new_ptr, b, hh, c, n_res, s, offs_d, d_ok,  #
                   srb, srh, srt, srd, snb, snh, snt, snd):  # fmt: skip
    # Tokens c (combined index: old residual first, then this chunk's stored tokens) of head hh,
    # [G, D_PAD] fp32. New tokens are first cast to the cache dtype, as append_kv_ref does.
    from_res = c < n_res
    j = s + c - n_res
    r_ptrs = res_ptr + b * srb + hh * srh + c[:, None] * srt + offs_d[None, :] * srd
    n_ptrs = new_ptr + b * snb + hh * snh + j[:, None] * snt + offs_d[None, :] * snd
    xr = tl.load(r_ptrs, mask=from_res[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    xn = tl.load(n_ptrs, mask=(~from_res)[:, None] & d_ok[None, :], other=0.0)
    xn = _to_dtype(xn, res_ptr.dtype.element_ty).to(tl.float32)
    return tl.where(from_res[:, None], xr, xn)


@triton.jit
def _append_quantize_kernel(
    new_k, new_v, res_k, res_v,  #
    key_codes, key_mn, key_scale, key_norms, val_codes, val_mn, val_scale,  #
    lengths, skip, key_rotated, key_scaled,  #
    T_NEW, MAX_LEN, hscale, lscale,  #
    snb, snh, snt, snd, svb, svh, svt, svd,  # new keys / new values strides
    srb, srh, srt, srd, swb, swh, swt, swd,  # residual keys / residual values strides
    skcb, skch, skct, skcd, skmb, skmh, skmg, skmd, sknb, sknt,  # key codes, key mn/scale, norms
    svcb, svch, svct, svcd, svmb, svmh, svmt, svmg,  # value codes, value mn/scale
    HKV: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, LOG2_HB: tl.constexpr,  #
    BITS: tl.constexpr, G: tl.constexpr, R: tl.constexpr, ROTATE_V: tl.constexpr,  #
    HAS_SKIP: tl.constexpr, SCALAR_RECIP: tl.constexpr,  #
):
    # Inductor passes Python floats to user Triton kernels as fp64: the codes must come from fp32 math
    hscale, lscale = tl.cast(hscale, tl.float32), tl.cast(lscale, tl.float32)
    gi = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    PER_BYTE: tl.constexpr = 8 // BITS
    LEVELS: tl.constexpr = (1 << BITS) - 1
    NG: tl.constexpr = D_PAD // G
    length = tl.load(lengths + b)
    s = 0
    if HAS_SKIP:
        s = tl.minimum(tl.maximum(tl.load(skip + b).to(tl.int32), 0), T_NEW)
    n = T_NEW - s
    n_res = length % R
    q0 = length - n_res
    n_groups = (n_res + n) // R * (R // G)
    t0 = q0 + gi * G
    # Nothing to flush for this group, or overflow (the sequence would pass max_len, or already did):
    # then nothing of the sequence is written (the residual kernel marks lengths[b], see append_kv).
    # Without overflow every flushed group ends at or before length + n <= max_len: never out of bounds.
    if (gi >= n_groups) | (length + n > MAX_LEN):
        return
    c = gi * G + tl.arange(0, G)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM

    # omni-token norm over all kv heads and channels (fp32, sqrt correctly rounded; 0 -> 1)
    sq = tl.zeros([G], dtype=tl.float32)
    for hh in range(HKV):
        x = _load_combined(res_k, new_k, b, hh, c, n_res, s, offs_d, d_ok, srb, srh, srt, srd, snb, snh, snt, snd)
        sq += tl.sum(x * x, axis=1)
    norm = tl.sqrt_rn(sq)
    norm = tl.where(norm > 0, norm, 1.0)
    tok = t0 + tl.arange(0, G)
    if h == 0:
        tl.store(key_norms + b * sknb + tok * sknt, norm)

    # keys of head h: rotate (per-head flag), divide by the norm (per-head flag), per-channel groups
    x = _load_combined(res_k, new_k, b, h, c, n_res, s, offs_d, d_ok, srb, srh, srt, srd, snb, snh, snt, snd)
    rot = tl.load(key_rotated + h) != 0
    scl = tl.load(key_scaled + h) != 0
    xr = _scalar_scale(_fwht_rows(x, G, D_PAD, LOG2_HB), hscale, SCALAR_RECIP)
    x = tl.where(rot, xr, x)
    x = tl.where(scl, tl.math.div_rn(x, norm[:, None]), x)
    code, mn, sc = _quantize_tile(x, LEVELS, 0, lscale, SCALAR_RECIP)
    packed = _pack_tokens(code, G, D_PAD, BITS)
    prow = t0 // PER_BYTE + tl.arange(0, G // PER_BYTE)
    tl.store(key_codes + b * skcb + h * skch + prow[:, None] * skct + offs_d[None, :] * skcd, packed,
             mask=d_ok[None, :])  # fmt: skip
    mn_ptr = b * skmb + h * skmh + (t0 // G) * skmg + offs_d[None, :] * skmd
    tl.store(key_mn + mn_ptr, mn, mask=d_ok[None, :])
    tl.store(key_scale + mn_ptr, sc, mask=d_ok[None, :])

    # values of head h: optional rotation (layer switch), per-token groups of G channels
    v = _load_combined(res_v, new_v, b, h, c, n_res, s, offs_d, d_ok, swb, swh, swt, swd, svb, svh, svt, svd)
    if ROTATE_V:
        v = _scalar_scale(_fwht_rows(v, G, D_PAD, LOG2_HB), hscale, SCALAR_RECIP)
    vcode, vmn, vsc = _quantize_tile(tl.reshape(v, (G, NG, G)), LEVELS, 2, lscale, SCALAR_RECIP)
    vpacked = _pack_channels(tl.reshape(vcode, (G, D_PAD)), G, D_PAD, BITS)
    pcol = tl.arange(0, D_PAD // PER_BYTE)
    tl.store(val_codes + b * svcb + h * svch + tok[:, None] * svct + pcol[None, :] * svcd, vpacked,
             mask=(pcol < HEAD_DIM // PER_BYTE)[None, :])  # fmt: skip
    gcol = tl.arange(0, NG)
    vp = b * svmb + h * svmh + tok[:, None] * svmt + gcol[None, :] * svmg
    tl.store(val_mn + vp, tl.reshape(vmn, (G, NG)), mask=(gcol < HEAD_DIM // G)[None, :])
    tl.store(val_scale + vp, tl.reshape(vsc, (G, NG)), mask=(gcol < HEAD_DIM // G)[None, :])


@triton.jit
def _append_residual_kernel(
    new_k, new_v, res_k, res_v, lengths, skip,  #
    T_NEW, MAX_LEN,  #
    snb, snh, snt, snd, svb, svh, svt, svd,  #
    srb, srh, srt, srd, swb, swh, swt, swd,  #
    HKV: tl.constexpr, HKV_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,  #
    R: tl.constexpr, BLOCK_T: tl.constexpr, HAS_SKIP: tl.constexpr,  #
):
    b = tl.program_id(0)
    length = tl.load(lengths + b)
    s = 0
    if HAS_SKIP:
        s = tl.minimum(tl.maximum(tl.load(skip + b).to(tl.int32), 0), T_NEW)
    n = T_NEW - s
    n_res = length % R
    n_blocks = (n_res + n) // R
    rest = n_res + n - n_blocks * R
    # overflow (length + n > max_len, or a sequence already marked): write no residual token, only the
    # mark below (lengths[b] = length + n > max_len, which check_overflow reports)
    rest = tl.where(length + n > MAX_LEN, 0, rest)
    # residual slot r takes stored token j = r + off of this chunk (j < 0: an old residual token that
    # stays where it is, only possible when no block completes)
    off = n_blocks * R - n_res
    first = n_res * (n_blocks == 0).to(tl.int32)  # max(0, -off)
    hh = tl.arange(0, HKV_PAD)
    offs_d = tl.arange(0, D_PAD)
    hd_ok = (hh < HKV)[:, None, None] & (offs_d < HEAD_DIM)[None, None, :]
    for r0 in range(first, rest, BLOCK_T):
        r = r0 + tl.arange(0, BLOCK_T)
        j = s + r + off
        m = hd_ok & (r < rest)[None, :, None]
        src = b * snb + hh[:, None, None] * snh + j[None, :, None] * snt + offs_d[None, None, :] * snd
        k = tl.load(new_k + src, mask=m)
        dst = b * srb + hh[:, None, None] * srh + r[None, :, None] * srt + offs_d[None, None, :] * srd
        tl.store(res_k + dst, _to_dtype(k, res_k.dtype.element_ty), mask=m)
        src = b * svb + hh[:, None, None] * svh + j[None, :, None] * svt + offs_d[None, None, :] * svd
        v = tl.load(new_v + src, mask=m)
        dst = b * swb + hh[:, None, None] * swh + r[None, :, None] * swt + offs_d[None, None, :] * swd
        tl.store(res_v + dst, _to_dtype(v, res_v.dtype.element_ty), mask=m)
    tl.store(lengths + b, length + n)


@torch.no_grad()
def append_kv(
    cache: CacheTensors,
    fmt: CacheFormat,
    new_keys: torch.Tensor,
    new_values: torch.Tensor,
    skip: torch.Tensor | None = None,
) -> None:
    """Triton quantize-on-write, same semantics and bit-identical storage as :func:`append_kv_ref`.

    new_keys/new_values: ``[B, Hkv, T_new, D]`` (any strides, any float dtype; cast to the cache dtype
    like the reference). skip: int ``[B]`` leading tokens not stored, or None.

    No host synchronization: lengths and skip are read in the kernels, the grids are sized from
    ``T_new`` only, and programs with nothing to flush exit at once, so a decode step can be captured in
    a CUDA graph. Consequently this launcher cannot raise on overflow (``lengths[b] + stored > max_len``,
    where the reference raises ``ValueError`` before writing anything). Instead, per sequence, the
    kernels write nothing of an overflowing sequence (its stored tokens stay as they were; the other
    sequences append normally) and set ``lengths[b]`` to ``lengths[b] + stored``, past ``max_len``: the
    overflow mark. It is sticky (a marked sequence overflows again on any later append, and the mark
    only grows) until the cache is reset, and it is read on the device, so a compiled or CUDA-graph step
    needs no host sync for it: :func:`overflowed` gives the per-sequence flags as a device tensor and
    :func:`check_overflow` (``oscar_compile.ops.check_overflow``) raises ``ValueError`` on the next
    eager check (one host sync). A marked cache's contents are not to be attended to (the attention
    kernels clamp ``lengths`` to ``max_len``, which does not make them right). ``skip`` outside
    ``[0, T_new]`` is clamped.

    Codes match the reference bit for bit given the same fp32 keys after rotation and norm division:
    the butterflies run in the reference's order, divisions use IEEE ``div_rn``, ``sqrt_rn`` for the
    norm, torch's per-device scalar-division rule (triton_utils.hadamard_scale), and the kernel is
    compiled without FMA contraction. The norm's fp32 sum runs in a different order than torch's
    reduction, so for general inputs a norm may differ in the last ulp (exactly equal whenever the sum
    of squares is exact, which the tests use to check codes bit for bit).

    Unlike the reference, the launcher does not check that the blocks it quantizes can be stored (that
    needs a host sync): non-finite tokens, or tokens whose group minimum/step falls beyond the fp16 range
    (e.g. bf16 values > 65504 in magnitude, after the rotation), are stored as inf/NaN parameters, and
    attention over them returns NaN. ``append_kv_ref`` (the CPU path) and ``fake_quantize`` raise
    ``ValueError`` on the same tokens (``cache_layout.check_storable``).
    """
    check_append_inputs(cache, new_keys, new_values, skip)
    check_triton_cache(cache, fmt, attention=False)  # the format limits check_triton_format owns
    bsz, hkv, t_new, d = new_keys.shape
    if t_new == 0 or bsz == 0:
        return
    g, r, bits = fmt.group_size, fmt.residual_length, fmt.bits
    d_pad = next_pow2(d)
    hb = hadamard_block_size(d)
    dev = new_keys.device
    has_skip = skip is not None
    skip_arg = skip if has_skip else cache.lengths
    c = cache
    nk, nv, rk, rv = new_keys, new_values, c.residual_keys, c.residual_values
    new_strides = (*nk.stride(), *nv.stride())
    res_strides = (*rk.stride(), *rv.stride())
    max_groups = (r - 1 + t_new) // r * (r // g)
    if max_groups:
        # Triton launch through wrap_triton so torch.library.triton_op can trace it.
        torch.library.wrap_triton(_append_quantize_kernel)[(max_groups, bsz, hkv)](
            nk, nv, rk, rv,
            c.key_codes, c.key_mn, c.key_scale, c.key_norms, c.value_codes, c.value_mn, c.value_scale,
            c.lengths, skip_arg, c.key_rotated, c.key_scaled,
            t_new, c.max_len, hadamard_scale(hb, dev), levels_scale(bits, dev),
            *new_strides, *res_strides,
            *c.key_codes.stride(), *c.key_mn.stride(), *c.key_norms.stride(),
            *c.value_codes.stride(), *c.value_mn.stride(),
            HKV=hkv, HEAD_DIM=d, D_PAD=d_pad, LOG2_HB=hb.bit_length() - 1,
            BITS=bits, G=g, R=r, ROTATE_V=bool(fmt.rotate_values),
            HAS_SKIP=has_skip, SCALAR_RECIP=dev.type == "cuda",
            num_warps=4, enable_fp_fusion=False,
        )  # fmt: skip
    hkv_pad = next_pow2(hkv)
    block_t = max(1, min(next_pow2(min(t_new, r)), 8192 // (hkv_pad * d_pad)))
    torch.library.wrap_triton(_append_residual_kernel)[(bsz,)](
        nk, nv, rk, rv, c.lengths, skip_arg,
        t_new, c.max_len,
        *new_strides, *res_strides,
        HKV=hkv, HKV_PAD=hkv_pad, HEAD_DIM=d, D_PAD=d_pad, R=r, BLOCK_T=block_t, HAS_SKIP=has_skip,
        num_warps=4,
    )  # fmt: skip
