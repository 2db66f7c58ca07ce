"""The quantized part of decode attention as a Gluon kernel (CUDA, sm_80+): no shared memory in the loop.

Same math as the split programs of ``cache_attention._cache_attn_split_kernel`` over whole 128-token tiles
(tile rows = 4 key groups x 4 query rows; keys: the group-scaled query dotted with the exact codes plus
the query . group-minimum bias; values: probabilities against values dequantized in fp16), but every
tensor of the loop has an explicit register layout:

* Each warp streams its own tiles (tensors carry a leading warp dimension, batched ``mma_v2``
  m16n8k16), with its own running max, sum and accumulators; the warps of a program merge once, at the
  end. The packed bytes are loaded straight into the MMA operand layouts, so nothing goes through
  shared memory in the loop and no warp waits for another.
* The reduction order is free: keys are dotted over channels in the order ``k = mid * 8 + hi * 2 + e``
  for channel ``d = hi * D/4 + mid * 2 + e``, so each lane's share of a token row is ``D / 4``
  consecutive bytes (16-byte loads) and the query is permuted the same way. Value byte columns are
  visited in the order ``n = lo * 8 + hi`` for column ``c = hi * VC/8 + lo``, so each lane's columns of a
  token are ``VC / 8`` consecutive bytes; the output channels are stored where they belong.
* The layouts are written as linear layouts (``DistributedLinearLayout``): the images of the operand
  layouts under these permutations. Every conversion to an operand layout is asserted trivial (a
  relabelling of registers), so the compiler proves that no data moves.

The byte layout itself (``kernels/packing.py``) does not change. The caller launches the residual and
new-token programs of the Triton kernel beside this one; both write the same partials, merged as before.
Gluon has no interpreter: the kernel is compiled for sm_90 on the CPU in the test suite
(``tests/kernels/test_cache_attention_gluon.py``: trivial conversions, no shared memory in the loop) and
checked against the reference on the GPU (``OSCAR_TEST_CUDA=1`` kernel tests,
``benchmarks/decode_attention.py --check``).
"""

from __future__ import annotations

from typing import Optional

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from .triton_utils import _ASM_2_0, _ASM_2_2, _ASM_2_4, _ASM_2_6, _ASM_4_0, _ASM_4_4  # inline-PTX code expansion

__all__ = ["launch_quantized_splits", "quantized_split_kernel", "quantized_splits", "supports"]

BLOCK_N = gl.constexpr(128)  # tokens per tile (one warp's step)


def supports(head_dim: int, d_pad: int, bits: int, group_size: int, residual_length: int) -> bool:
    """Whether this kernel serves a cache format (other formats use the Triton kernel alone).

    2 bits only: the kernel compiles for 4 bits too, but its 64-token fields need about twice the
    registers and it measured slower than the Triton kernel (H200, 1 x 128K: 192 vs 115 us).
    """
    return (head_dim == d_pad and head_dim in (64, 128) and bits == 2 and group_size == 32
            and residual_length % 128 == 0)  # fmt: skip


@gluon.constexpr_function
def _mma_layout(W):
    return gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[W, 1, 1], instr_shape=[1, 16, 8])


@gluon.constexpr_function
def _linear(W, reg, lanes, shape):
    # a [W, ...] layout: warp w holds batch index w; reg / lanes: bases over the trailing dims
    return gl.DistributedLinearLayout(
        reg_bases=[[0] + b for b in reg], lane_bases=[[0] + b for b in lanes],
        warp_bases=[[1 << i] + [0] * len(shape) for i in range(W.bit_length() - 1)],
        block_bases=[], shape=[W] + shape)  # fmt: skip


@gluon.constexpr_function
def _key_byte_layout(W, NS, D):
    # packed key bytes [W, NS token rows j, D channels d]: the image of the B operand [D, NS] under the
    # channel order; registers first walk D/4 consecutive channels (vector loads), then rows j+8, ...
    reg = [[0, 1 << b] for b in range((D // 4).bit_length() - 1)] + [[1 << b, 0] for b in range(3, NS.bit_length() - 1)]
    return _linear(W, reg, [[0, D // 4], [0, D // 2], [1, 0], [2, 0], [4, 0]], [NS, D])


@gluon.constexpr_function
def _query_layout(W, D, OPERAND_ORDER):
    # query-side tiles [W, 16 rows m, D channels d]: the image of the A operand; registers either in the
    # operand's order (channel pair, row + 8, channels) or with the D/4 consecutive channels first (loads)
    lanes = [[0, D // 4], [0, D // 2], [1, 0], [2, 0], [4, 0]]
    if OPERAND_ORDER:
        reg = [[0, 1], [8, 0]] + [[0, 1 << b] for b in range(1, (D // 4).bit_length() - 1)]
    else:
        reg = [[0, 1 << b] for b in range((D // 4).bit_length() - 1)] + [[8, 0]]
    return _linear(W, reg, lanes, [16, D])


@gluon.constexpr_function
def _query_groups_layout(W, D):
    # _query_layout(W, D, False) viewed as [W, 4 key groups gt, 4 query rows r, D] (row m = 4 gt + r): the
    # query is the same for every gt, so it is loaded once per row and broadcast (half the registers)
    reg = [[0, 0, 1 << b] for b in range((D // 4).bit_length() - 1)] + [[2, 0, 0]]
    lanes = [[0, 0, D // 4], [0, 0, D // 2], [0, 1, 0], [0, 2, 0], [1, 0, 0]]
    return _linear(W, reg, lanes, [4, 4, D])


@gluon.constexpr_function
def _value_byte_layout(W, NS, VC, OPERAND_ORDER):
    # packed value bytes [W, NS tokens j, VC byte columns c]: the image of the B operand [NS, VC] under the
    # column order; registers either in the operand's order (tokens first) or columns first (loads)
    cols = [[0, 1 << b] for b in range((VC // 8).bit_length() - 1)]
    toks = [[1, 0]] + [[1 << b, 0] for b in range(3, NS.bit_length() - 1)]
    reg = toks + cols if OPERAND_ORDER else cols + toks
    return _linear(W, reg, [[2, 0], [4, 0], [0, VC // 8], [0, VC // 4], [0, VC // 2]], [NS, VC])


@gluon.jit
def _codes(packed, BITS: gl.constexpr, I: gl.constexpr):
    # bit field I of every packed byte -> exact fp16 code, four bytes per inline-PTX call (the PTX of
    # triton_utils._codes_f16; named by the field's bit offset)
    if BITS == 2:
        if I == 0:
            asm: gl.constexpr = _ASM_2_0
        elif I == 1:
            asm: gl.constexpr = _ASM_2_2
        elif I == 2:
            asm: gl.constexpr = _ASM_2_4
        else:
            asm: gl.constexpr = _ASM_2_6
    else:
        if I == 0:
            asm: gl.constexpr = _ASM_4_0
        else:
            asm: gl.constexpr = _ASM_4_4
    return gl.inline_asm_elementwise(asm, "=r,=r,r", [packed], dtype=gl.float16, is_pure=True, pack=4)


@gluon.jit
def _index(N: gl.constexpr, DIM: gl.constexpr, L: gl.constexpr):
    # arange(N) along dimension DIM of a rank-3 layout L, shaped to broadcast against it
    if DIM == 0:
        return gl.arange(0, N, layout=gl.SliceLayout(1, gl.SliceLayout(2, L)))[:, None, None]
    elif DIM == 1:
        return gl.arange(0, N, layout=gl.SliceLayout(0, gl.SliceLayout(2, L)))[None, :, None]
    else:
        return gl.arange(0, N, layout=gl.SliceLayout(0, gl.SliceLayout(1, L)))[None, None, :]


@gluon.jit
def _channels_to_k(x, W: gl.constexpr, R: gl.constexpr, D: gl.constexpr):
    # [W, R, D] in channel order d = hi * D/4 + mid * 2 + e -> MMA order k = mid * 8 + hi * 2 + e
    y = gl.permute(gl.reshape(x, (W, R, 4, D // 8, 2)), (0, 1, 3, 2, 4))
    return gl.reshape(y, (W, R, D))


@gluon.jit
def _columns_to_n(x, W: gl.constexpr, R: gl.constexpr, VC: gl.constexpr):
    # [W, R, VC] in column order c = hi * VC/8 + lo -> MMA order n = lo * 8 + hi
    return gl.reshape(gl.permute(gl.reshape(x, (W, R, 8, VC // 8)), (0, 1, 3, 2)), (W, R, VC))


@gluon.jit
def _key_field_scores(qt, bias, kb, nrm_ptrs, scl, ok, W: gl.constexpr, NS: gl.constexpr, D: gl.constexpr,
                      BITS: gl.constexpr, I: gl.constexpr, B_OP: gl.constexpr, MMA: gl.constexpr):  # fmt: skip
    # scores (log2 units) [W, 16, NS] of the tokens in bit field I of each warp's key bytes; -inf where
    # not ok (a row scores the tokens of its own key group, in a tile of its warp's range)
    c = gl.permute(_channels_to_k(_codes(kb, BITS, I), W, NS, D), (0, 2, 1))
    s = mma_v2(qt, gl.convert_layout(c, B_OP, assert_trivial=True), gl.zeros([W, 16, NS], gl.float32, MMA))
    s = s + bias[:, :, None]
    nrm = gl.load(nrm_ptrs, mask=ok, other=1.0)
    s = s * gl.where(scl, nrm, 1.0)
    return gl.where(ok, s, float("-inf"))


@gluon.jit
def _probabilities(sc, m_safe, l_i, A_OP: gl.constexpr):
    # p = 2^(score - running max) as the fp16 A operand of the value MMA; the row sums added to l_i
    p = gl.exp2(sc - m_safe[:, :, None])
    return gl.convert_layout(p.to(gl.float16), A_OP, assert_trivial=True), l_i + gl.sum(p, axis=2)


@gluon.jit
def _value_field(acc, p, vb, vsc, vmn, W: gl.constexpr, NS: gl.constexpr, VC: gl.constexpr, BITS: gl.constexpr,
                 I: gl.constexpr, B_OP: gl.constexpr, LV_OP: gl.constexpr):  # fmt: skip
    # acc += p @ (values of bit field I of the byte columns, dequantized in fp16), columns in MMA order
    v = _codes(vb, BITS, I) * vsc + vmn
    v = _columns_to_n(gl.convert_layout(v, LV_OP, assert_trivial=True), W, NS, VC)
    return mma_v2(p, gl.convert_layout(v, B_OP, assert_trivial=True), acc)


@gluon.jit
def _store_merged(acc, m_i, l_i, o_ptrs, lse_ptrs, row_ok, NR: gl.constexpr, RB: gl.constexpr, VC: gl.constexpr,
                  PB: gl.constexpr, I: gl.constexpr, W: gl.constexpr, STORE_LSE: gl.constexpr):  # fmt: skip
    # merge the NR = W * NGT rows (warp, group) of each query row r by LSE; store channels PB * c(n) + I
    # of the normalized partial (and the row's LSE once); o_ptrs [RB] point at channel 0 of each row
    L3: gl.constexpr = gl.BlockedLayout([NR, 1, 1], [1, RB, 32 // RB], [1, 1, W], [2, 1, 0])
    LW: gl.constexpr = gl.SliceLayout(2, L3)  # [NR, RB]
    LO: gl.constexpr = gl.SliceLayout(0, L3)  # [RB, VC]
    m3 = gl.convert_layout(gl.reshape(m_i, (NR, RB)), LW)
    l3 = gl.convert_layout(gl.reshape(l_i, (NR, RB)), LW)
    a3 = gl.convert_layout(gl.reshape(acc, (NR, RB, VC)), L3)
    m_r = gl.max(m3, axis=0)
    m_safe = gl.where(m_r == float("-inf"), 0.0, m_r)
    w = gl.exp2(m3 - m_safe[None, :])  # exp2(-inf) = 0 for empty rows
    l_r = gl.sum(w * l3, axis=0)
    o = gl.sum(w[:, :, None] * a3, axis=0)
    has = gl.convert_layout(l_r > 0, gl.SliceLayout(1, LO))
    l_o = gl.convert_layout(l_r, gl.SliceLayout(1, LO))
    o = gl.where(has[:, None], o / gl.where(has, l_o, 1.0)[:, None], 0.0)
    n = gl.arange(0, VC, layout=gl.SliceLayout(0, LO))
    cols = ((n // 8) + (n % 8) * (VC // 8)) * PB + I  # output channel of MMA column n
    rows_ok = gl.convert_layout(row_ok, gl.SliceLayout(1, LO))
    gl.store(gl.convert_layout(o_ptrs, gl.SliceLayout(1, LO))[:, None] + cols[None, :], o, mask=rows_ok[:, None])
    if STORE_LSE:
        lse = gl.where(l_r > 0, m_r + gl.log2(gl.where(l_r > 0, l_r, 1.0)), float("-inf"))
        gl.store(lse_ptrs, gl.convert_layout(lse, row_ok.type.layout), mask=row_ok)


@gluon.jit
def quantized_split_kernel(
    qrot, key_codes, key_mn, key_scale, key_norms, val_codes, val_mn, val_scale,  #
    lengths, skip, key_scaled, part_o, part_lse,  #
    T_Q, MAX_LEN, Q0, T_LOC,  #
    sqb, sqh, sqt, sqd,  #
    skcb, skch, skct, skcd, skmb, skmh, skmg, skmd, sknb, sknt,  #
    svcb, svch, svct, svcd, svmb, svmh, svmt, svmg,  #
    HKV: gl.constexpr, GROUP: gl.constexpr, D: gl.constexpr, BITS: gl.constexpr,  #
    SPLITS: gl.constexpr, SPARTS: gl.constexpr, HAS_SKIP: gl.constexpr, W: gl.constexpr,  #
):
    """Split programs over the quantized prefix: grid (row blocks, B * Hkv, SPLITS), ``W`` warps each.

    ``qrot``: the queries rotated (where the head's keys are), scaled by ``qk_scale * log2(e)``, fp32
    ``[B, Hq, T_Q, D]`` (``cache_attention._rotated_queries_kernel``).

    Writes the same partials as the Triton split kernel's programs ``split < SPLITS``:
    ``part_o [B * Hkv, GROUP * T_LOC, SPARTS, D]`` fp32 (normalized) and ``part_lse`` (log2 units).
    Warp ``w`` of a program takes tiles ``start + (W * i + w) * 128`` of the split's range.
    """
    MMA: gl.constexpr = _mma_layout(W)
    A_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B_OP: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    PB: gl.constexpr = 8 // BITS  # codes per byte
    G: gl.constexpr = 32
    NS: gl.constexpr = BLOCK_N // PB  # tokens per bit field of a tile
    VC: gl.constexpr = D // PB  # value byte columns
    JG: gl.constexpr = G // PB  # key byte rows per group; value byte columns per group
    NGT: gl.constexpr = BLOCK_N // G
    RB: gl.constexpr = 16 // NGT  # query rows per program
    LK: gl.constexpr = _key_byte_layout(W, NS, D)
    LQ: gl.constexpr = _query_layout(W, D, False)
    LQ_OP: gl.constexpr = _query_layout(W, D, True)
    LV: gl.constexpr = _value_byte_layout(W, NS, VC, False)
    LV_OP: gl.constexpr = _value_byte_layout(W, NS, VC, True)

    mb = gl.program_id(0)
    pid_bh = gl.program_id(1)
    split = gl.program_id(2)
    b = pid_bh // HKV
    h = pid_bh % HKV
    ROW0 = Q0 * GROUP
    length = gl.minimum(gl.load(lengths + b), MAX_LEN)
    n_quant = length // BLOCK_N * BLOCK_N  # residual_length is a multiple of the tile (supports())
    s = 0
    if HAS_SKIP:
        s = gl.minimum(gl.maximum(gl.load(skip + b).to(gl.int32), 0), T_Q)
    chunk = gl.cdiv(gl.cdiv(n_quant, SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = gl.minimum(start + chunk, n_quant)

    # the rotated, pre-scaled query (fp32, from the caller) of row (gt, r) = query row r of this block,
    # loaded once per r and broadcast over the key groups gt
    LQ4: gl.constexpr = _query_groups_layout(W, D)
    LQR: gl.constexpr = gl.SliceLayout(1, LQ4)  # [W, RB, D]
    r_q = _index(RB, 1, LQR)
    row_q = ROW0 + mb * RB + r_q
    qi_q = row_q // GROUP
    row_ok = (qi_q < T_Q) & (qi_q >= s) & (qi_q < Q0 + T_LOC) & (_index(W, 0, LQR) >= 0)
    q_ptrs = qrot + b * sqb + (h * GROUP + row_q % GROUP) * sqh + qi_q * sqt + _index(D, 2, LQR) * sqd
    q1 = gl.load(q_ptrs, mask=row_ok, other=0.0)
    qd = gl.reshape(gl.broadcast(gl.expand_dims(q1, 1), gl.zeros([W, NGT, RB, D], gl.float32, LQ4))[0], (W, 16, D))
    qd = gl.convert_layout(qd, LQ, assert_trivial=True)
    scl = gl.load(key_scaled + h) != 0

    # loop-invariant offsets (int32) inside a tile; warp w's tile starts at t0 + 128 w
    wq = BLOCK_N * _index(W, 0, LQ)
    kp_offs = (_index(16, 1, LQ) // RB) * skmg + _index(D, 2, LQ) * skmd
    wk = BLOCK_N * _index(W, 0, LK)
    kc_offs = _index(NS, 1, LK) * skct + _index(D, 2, LK) * skcd
    ws = BLOCK_N * _index(W, 0, MMA)
    gsel = (_index(16, 1, MMA) // RB) == (_index(NS, 2, MMA) // JG)  # row (gt, r) scores group gt only
    nrm_offs = (PB * _index(NS, 2, MMA)) * sknt
    wv = BLOCK_N * _index(W, 0, LV)
    jv = PB * _index(NS, 1, LV)
    cv = _index(VC, 2, LV)
    vc_offs = jv * svct + cv * svcd
    vp_offs = jv * svmt + (cv // JG) * svmg
    key_mn_h = key_mn + b * skmb + h * skmh
    key_scale_h = key_scale + b * skmb + h * skmh
    key_codes_h = key_codes + b * skcb + h * skch
    key_norms_b = key_norms + b * sknb
    val_codes_h = val_codes + b * svcb + h * svch
    val_mn_h = val_mn + b * svmb + h * svmh
    val_scale_h = val_scale + b * svmb + h * svmh

    m_i = gl.full([W, 16], float("-inf"), gl.float32, gl.SliceLayout(2, MMA))
    l_i = gl.zeros([W, 16], gl.float32, gl.SliceLayout(2, MMA))
    acc0 = gl.zeros([W, 16, VC], gl.float32, MMA)
    acc1 = gl.zeros([W, 16, VC], gl.float32, MMA)
    acc2 = gl.zeros([W, 16, VC], gl.float32, MMA)
    acc3 = gl.zeros([W, 16, VC], gl.float32, MMA)
    for t0 in range(start, end, W * BLOCK_N):
        # a warp whose tile lies past the range reads tile t0 again (in bounds) and masks its scores
        tq = t0 + gl.where(t0 + wq < end, wq, 0)
        tk = t0 + gl.where(t0 + wk < end, wk, 0)
        tv = t0 + gl.where(t0 + wv < end, wv, 0)
        ok_s = gsel & ((t0 + ws) < end)
        ksc = gl.load(key_scale_h + (tq // G) * skmg + kp_offs).to(gl.float32)
        kmn = gl.load(key_mn_h + (tq // G) * skmg + kp_offs).to(gl.float32)
        kb = gl.load(key_codes_h + (tk // PB) * skct + kc_offs)
        qt = gl.convert_layout(qd * ksc, LQ_OP, assert_trivial=True).to(gl.float16)
        qt = gl.convert_layout(_channels_to_k(qt, W, 16, D), A_OP, assert_trivial=True)
        bias = gl.convert_layout(gl.sum(qd * kmn, axis=2), gl.SliceLayout(2, MMA))
        nrm_t = key_norms_b + (t0 + ws) * sknt + nrm_offs
        s0 = _key_field_scores(qt, bias, kb, nrm_t, scl, ok_s, W, NS, D, BITS, 0, B_OP, MMA)
        s1 = _key_field_scores(qt, bias, kb, nrm_t + sknt, scl, ok_s, W, NS, D, BITS, 1, B_OP, MMA)
        mx = gl.maximum(gl.max(s0, axis=2), gl.max(s1, axis=2))
        if BITS == 2:
            s2 = _key_field_scores(qt, bias, kb, nrm_t + 2 * sknt, scl, ok_s, W, NS, D, BITS, 2, B_OP, MMA)
            s3 = _key_field_scores(qt, bias, kb, nrm_t + 3 * sknt, scl, ok_s, W, NS, D, BITS, 3, B_OP, MMA)
            mx = gl.maximum(mx, gl.maximum(gl.max(s2, axis=2), gl.max(s3, axis=2)))
        m_new = gl.maximum(m_i, mx)
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m_i - m_safe)
        l_i = l_i * alpha
        acc0 = acc0 * alpha[:, :, None]
        acc1 = acc1 * alpha[:, :, None]
        if BITS == 2:
            acc2 = acc2 * alpha[:, :, None]
            acc3 = acc3 * alpha[:, :, None]
        for i in gl.static_range(PB):  # token field i: tokens t0 + 128 w + PB * j + i
            if i == 0:
                sc = s0
            elif i == 1:
                sc = s1
            elif i == 2:
                sc = s2
            else:
                sc = s3
            p, l_i = _probabilities(sc, m_safe, l_i, A_OP)
            vb = gl.load(val_codes_h + (tv + i) * svct + vc_offs)
            vsc = gl.load(val_scale_h + (tv + i) * svmt + vp_offs)
            vmn = gl.load(val_mn_h + (tv + i) * svmt + vp_offs)
            acc0 = _value_field(acc0, p, vb, vsc, vmn, W, NS, VC, BITS, 0, B_OP, LV_OP)
            acc1 = _value_field(acc1, p, vb, vsc, vmn, W, NS, VC, BITS, 1, B_OP, LV_OP)
            if BITS == 2:
                acc2 = _value_field(acc2, p, vb, vsc, vmn, W, NS, VC, BITS, 2, B_OP, LV_OP)
                acc3 = _value_field(acc3, p, vb, vsc, vmn, W, NS, VC, BITS, 3, B_OP, LV_OP)
        m_i = m_new

    # partials: [B * Hkv, GROUP * T_LOC, SPARTS, D] and [..., SPARTS]
    LR: gl.constexpr = gl.SliceLayout(0, gl.BlockedLayout([1, 1], [1, 32], [1, W], [1, 0]))
    r_out = mb * RB + gl.arange(0, RB, layout=LR)
    o_ok = r_out // GROUP < T_LOC
    slot = (pid_bh.to(gl.int64) * (GROUP * T_LOC) + r_out) * SPARTS + split
    o_ptrs = part_o + slot * D
    NR: gl.constexpr = W * NGT
    _store_merged(acc0, m_i, l_i, o_ptrs, part_lse + slot, o_ok, NR, RB, VC, PB, 0, W, True)
    _store_merged(acc1, m_i, l_i, o_ptrs, part_lse + slot, o_ok, NR, RB, VC, PB, 1, W, False)
    if BITS == 2:
        _store_merged(acc2, m_i, l_i, o_ptrs, part_lse + slot, o_ok, NR, RB, VC, PB, 2, W, False)
        _store_merged(acc3, m_i, l_i, o_ptrs, part_lse + slot, o_ok, NR, RB, VC, PB, 3, W, False)


def launch_quantized_splits(qrot: torch.Tensor, key_codes: torch.Tensor, key_mn: torch.Tensor,
                             key_scale: torch.Tensor, key_norms: torch.Tensor, value_codes: torch.Tensor,
                             value_mn: torch.Tensor, value_scale: torch.Tensor, lengths: torch.Tensor,
                             skip: Optional[torch.Tensor], key_scaled: torch.Tensor, part_o: torch.Tensor,
                             part_lse: torch.Tensor, q0: int, t_loc: int, max_len: int, bits: int, splits: int,
                             sparts: int, row_blocks: int, warps: int, maxnreg: int) -> None:  # fmt: skip
    """Launch :func:`quantized_split_kernel` (qrot ``[B, Hq, T, D]`` fp32; cache tensors as ``CacheTensors``)."""
    bsz, hq, tq, d = qrot.shape
    hkv = key_scaled.shape[0]
    quantized_split_kernel[(row_blocks, bsz * hkv, splits)](
        qrot, key_codes, key_mn, key_scale, key_norms, value_codes, value_mn, value_scale,
        lengths, lengths if skip is None else skip, key_scaled, part_o, part_lse, tq, max_len, q0, t_loc,
        *qrot.stride(), *key_codes.stride(), *key_mn.stride(), *key_norms.stride(),
        *value_codes.stride(), *value_mn.stride(),
        HKV=hkv, GROUP=hq // hkv, D=d, BITS=bits, SPLITS=splits, SPARTS=sparts,
        HAS_SKIP=skip is not None, W=warps, num_warps=warps, **({"maxnreg": maxnreg} if maxnreg else {}),
    )  # fmt: skip


# The same launch as an opaque op, for traced code (not wrap_triton: torch.compile's user-kernel path handles
# Triton kernels, not Gluon ones), so a traced graph keeps it as one node (CUDA graphs capture it like any op).
quantized_splits = torch.library.custom_op("oscar::gluon_quantized_splits", mutates_args=("part_o", "part_lse"))(
    launch_quantized_splits)  # fmt: skip


@quantized_splits.register_fake
def _(*args, **kwargs) -> None:
    return None
