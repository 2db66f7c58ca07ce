"""Triton building blocks shared by the cache kernels (append_kv, cache_attention).

* ``_fwht_rows``: the Walsh–Hadamard butterfly of :func:`kernels.hadamard.hadamard_transform` on the
  rows of a register tile, stage for stage in the same order (half = block/2 down to 1, ``a+b`` then
  ``a-b``), so fp32 results are bit-identical to the reference before the ``1/sqrt(block)`` factor.
* ``_codes_f16`` / ``_pack_tokens`` / ``_pack_channels``: the in-register form of the byte layout that
  ``kernels/packing.py`` documents (lowest bits first, ``8 // bits`` codes per byte; keys packed along
  tokens, values along channels). ``_codes_f16`` reads bit field ``i`` of every byte of a packed tile
  (the codes of elements ``per_byte * j + i``), as exact fp16, with an inline-PTX form for compiled
  CUDA. packing.py stays the one description of the layout; these helpers are its Triton mirror, tested
  bit-exact against it through the kernels that use them.
* host helpers: torch's scalar-division rule per device (for bit-exact codes), SM count.
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np
import torch
import triton
import triton.language as tl

__all__ = ["field_expansion", "hadamard_scale", "levels_scale", "num_sms", "next_pow2"]


def _fix_interpreter_loop_bounds() -> None:
    """Let ``range(lo, hi)`` with run-time bounds work under ``TRITON_INTERPRET=1`` with numpy >= 2.3.

    The Triton 3.6 interpreter holds scalars as 1-element arrays and converts loop bounds with
    ``int(array)``, which numpy 2.3+ rejects for arrays with ndim > 0 ("only 0-dimensional arrays can
    be converted to Python scalars"). Re-register ``__index__`` to read the single element. Only
    touches the interpreter (CPU test path); compiled GPU kernels are unaffected.
    """
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_oscar_fixed", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._oscar_fixed = True
    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1":
    _fix_interpreter_loop_bounds()


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def hadamard_scale(block: int, device: torch.device) -> float:
    """The fp32 factor the kernels apply after the butterflies, matching torch's ``y / sqrt(block)``.

    torch divides a float tensor by a Python scalar differently per device: the CPU kernel divides
    (``y / fp32(s)``), the CUDA kernel multiplies by the fp32 reciprocal (``y * (1 / fp32(s))``, see
    ``div_true_kernel_cuda``). The kernels take a ``SCALAR_RECIP`` constexpr and this factor so they
    round exactly like the reference on the same device.
    """
    s = np.float32(math.sqrt(block))
    return float(np.float32(1.0) / s) if device.type == "cuda" else float(s)


def levels_scale(bits: int, device: torch.device) -> float:
    """Same rule as :func:`hadamard_scale` for ``(max - min) / (2**bits - 1)``."""
    levels = np.float32((1 << bits) - 1)
    return float(np.float32(1.0) / levels) if device.type == "cuda" else float(levels)


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Multiprocessor count (host query, cached; 4 for the CPU interpreter)."""
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@triton.jit
def _scalar_scale(x, factor, SCALAR_RECIP: tl.constexpr):
    # x / s on CPU, x * (1/s) on CUDA: the way torch evaluates tensor / python-scalar (see hadamard_scale).
    if SCALAR_RECIP:
        return x * factor
    else:
        return tl.math.div_rn(x, factor)


@triton.jit
def _butterfly(x, M: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr):
    # one Sylvester stage on rows of x [M, D]: in each chunk of 2*HALF, (a, b) -> (a + b, a - b)
    y = tl.reshape(x, (M, D // (2 * HALF), 2, HALF))
    y = tl.permute(y, (0, 1, 3, 2))
    a, b = tl.split(y)
    y = tl.join(a + b, a - b)
    y = tl.permute(y, (0, 1, 3, 2))
    return tl.reshape(y, (M, D))


@triton.jit
def _fwht_rows(x, M: tl.constexpr, D: tl.constexpr, LOG2_HB: tl.constexpr):
    # x: [M, D] fp32 -> x @ blockdiag(H_b) * sqrt(b), b = 2**LOG2_HB <= 256 (unnormalized; caller scales).
    # Same stage order as hadamard.hadamard_transform: half = b/2, b/4, ..., 1.
    if LOG2_HB >= 8:
        x = _butterfly(x, M, D, 128)
    if LOG2_HB >= 7:
        x = _butterfly(x, M, D, 64)
    if LOG2_HB >= 6:
        x = _butterfly(x, M, D, 32)
    if LOG2_HB >= 5:
        x = _butterfly(x, M, D, 16)
    if LOG2_HB >= 4:
        x = _butterfly(x, M, D, 8)
    if LOG2_HB >= 3:
        x = _butterfly(x, M, D, 4)
    if LOG2_HB >= 2:
        x = _butterfly(x, M, D, 2)
    if LOG2_HB >= 1:
        x = _butterfly(x, M, D, 1)
    return x


def field_expansion(bits: int, field: int) -> tuple[int, int, int]:
    """(mask, magic, offset) that turn bit field ``field`` of a byte into an exact fp16 number.

    A 16-bit half holding a byte in its low 8 bits becomes ``(half & mask) | magic``: the field stays
    where it sits (at bit ``p = bits * field``) and ``magic`` is the fp16 exponent of ``2**(10 - p)``,
    so the field's lowest bit is worth 1 and the half reads as ``offset + code`` with
    ``offset = 2**(10 - p)``; subtracting ``offset`` in fp16 is exact (tests/kernels/test_packing.py).
    """
    p = bits * field
    return ((1 << bits) - 1) << p, (15 + 10 - p) << 10, 1024 >> p


def _code_asm(bits: int, field: int) -> str:
    # 4 packed bytes (one 32-bit register) -> bit field ``field`` of each as 4 exact fp16 (two f16x2
    # registers) with :func:`field_expansion`: prmt spreads bytes (b0, b1) / (b2, b3) into the low bytes
    # of the two halves of a register (the same two prmt for every field of a word, so ptxas computes
    # them once per word), lop3 computes (x & mask) | magic, sub.f16x2 removes the offset.
    mask, magic, offset = field_expansion(bits, field)
    offset_bits = int(np.array(offset, dtype=np.float16).view(np.uint16))

    def both(half):
        return f"{(half << 16) | half:#010x}"

    return (
        "{ .reg .b32 lo, hi, k; "
        "prmt.b32 lo, $2, 0, 0x4140; prmt.b32 hi, $2, 0, 0x4342; "
        f"mov.b32 k, {both(offset_bits)}; "
        f"lop3.b32 $0, lo, {both(mask)}, {both(magic)}, 0xEA; "
        f"lop3.b32 $1, hi, {both(mask)}, {both(magic)}, 0xEA; "
        "sub.rn.f16x2 $0, $0, k; sub.rn.f16x2 $1, $1, k; }"
    )


_ASM_2_0 = tl.constexpr(_code_asm(2, 0))
_ASM_2_2 = tl.constexpr(_code_asm(2, 1))
_ASM_2_4 = tl.constexpr(_code_asm(2, 2))
_ASM_2_6 = tl.constexpr(_code_asm(2, 3))
_ASM_4_0 = tl.constexpr(_code_asm(4, 0))
_ASM_4_4 = tl.constexpr(_code_asm(4, 1))


@triton.jit
def _codes_asm(packed, asm: tl.constexpr):
    return tl.inline_asm_elementwise(asm, "=r,=r,r", [packed], dtype=tl.float16, is_pure=True, pack=4)


@triton.jit
def _codes_f16(packed, BITS: tl.constexpr, I: tl.constexpr, ASM: tl.constexpr):
    # bit field I (codes at bits BITS*I) of packed uint8 codes (any tile shape) -> exact fp16.
    # ASM (compiled CUDA): four bytes per inline-PTX call, no per-element shifts and no int -> float
    # conversion (quarter-rate pipe). Otherwise (interpreter): 0x6400 | c is the fp16 number 1024 + c,
    # minus 1024, exact.
    if ASM:
        if BITS == 2:
            if I == 0:
                return _codes_asm(packed, _ASM_2_0)
            elif I == 1:
                return _codes_asm(packed, _ASM_2_2)
            elif I == 2:
                return _codes_asm(packed, _ASM_2_4)
            else:
                return _codes_asm(packed, _ASM_2_6)
        else:
            if I == 0:
                return _codes_asm(packed, _ASM_4_0)
            else:
                return _codes_asm(packed, _ASM_4_4)
    else:
        c = (packed >> (BITS * I)) & ((1 << BITS) - 1)
        return (c.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True) - 1024.0


@triton.jit
def _pack_tokens(codes, ROWS: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    # codes: [ROWS, D] int32 in [0, 2**BITS) -> [ROWS // PER_BYTE, D] uint8, token 4j+i at bits 2i.
    PER_BYTE: tl.constexpr = 8 // BITS
    shifts = tl.arange(0, PER_BYTE) * BITS
    c = tl.reshape(codes, (ROWS // PER_BYTE, PER_BYTE, D))
    return tl.sum(c << shifts[None, :, None], axis=1).to(tl.uint8)


@triton.jit
def _pack_channels(codes, ROWS: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    # codes: [ROWS, D] int32 -> [ROWS, D // PER_BYTE] uint8, channel 4j+i at bits 2i.
    PER_BYTE: tl.constexpr = 8 // BITS
    shifts = tl.arange(0, PER_BYTE) * BITS
    c = tl.reshape(codes, (ROWS, D // PER_BYTE, PER_BYTE))
    return tl.sum(c << shifts[None, None, :], axis=2).to(tl.uint8)


@triton.jit
def _quantize_tile(x, LEVELS: tl.constexpr, AXIS: tl.constexpr, lscale, SCALAR_RECIP: tl.constexpr):
    # x: fp32 tile; one (mn, scale) per slice reduced over AXIS (kept with size 1). Mirrors
    # quantization.quantize_groups op for op: mn = fp16(min), scale = fp16((max - min) / LEVELS),
    # inv = 1/scale (IEEE, 0 when scale == 0), code = clamp(floor((x - mn) * inv + 0.5), 0, LEVELS).
    # The launch sets enable_fp_fusion=False so (x - mn) * inv + 0.5 is not contracted into an FMA.
    lo = tl.min(x, axis=AXIS, keep_dims=True)
    hi = tl.max(x, axis=AXIS, keep_dims=True)
    mn = lo.to(tl.float16)
    sc = _scalar_scale(hi - lo, lscale, SCALAR_RECIP).to(tl.float16)
    mnf = mn.to(tl.float32)
    scf = sc.to(tl.float32)
    inv = tl.where(scf > 0, tl.math.div_rn(tl.full(scf.shape, 1.0, tl.float32), scf), 0.0)
    y = (x - mnf) * inv
    code = tl.floor(y + 0.5)
    code = tl.minimum(tl.maximum(code, 0.0), LEVELS).to(tl.int32)
    return code, mn, sc


@triton.jit
def _to_dtype(x, ty: tl.constexpr):
    # Cast through fp32 with round-to-nearest-even, like torch's .to(). fp32 -> bf16 is done with integer
    # ops (add 0x7FFF + lsb, keep the high half): the compiled cast rounds the same way, but the Triton
    # 3.6 interpreter truncates by default and its "rtne" mode rounds ties up. NaN stays NaN.
    x = x.to(tl.float32)
    if ty == tl.float32:
        return x
    elif ty == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        r = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
        r = tl.where(x != x, 0x7FC0, r)
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(ty)
