"""Bit packing of INT2/INT4 codes: the only module that shifts bits.

A packed tensor is ``uint8``. ``8 // bits`` consecutive codes along the *packed dim* share one byte,
lowest bits first::

    bits=2:  byte = c0 | c1 << 2 | c2 << 4 | c3 << 6      (codes of elements 4j .. 4j+3)
    bits=4:  byte = c0 | c1 << 4                          (codes of elements 2j, 2j+1)

The packed dim shrinks by ``8 // bits``; every other dim is unchanged. Where the KV cache packs:

=========  =========================================  ===========  ===========================
tensor     logical shape (codes)                      packed dim   packed shape (bits=2)
=========  =========================================  ===========  ===========================
keys       ``[B, Hkv, T, D]`` (per-channel groups)    tokens (T)   ``[B, Hkv, T // 4, D]``
values     ``[B, Hkv, T, D]`` (per-token groups)      channels (D) ``[B, Hkv, T, D // 4]``
=========  =========================================  ===========  ===========================

Why these axes: the decode kernel loads a tile of ``BLOCK_N`` tokens x ``D`` channels. Keys packed along
tokens keep each row of the tile ``D`` contiguous bytes (coalesced), a byte never straddles two
32-token quantization groups, and a row of packed bytes expands to ``8 // bits`` token rows with one
shift per row. Values packed along channels keep one token's ``D * bits / 8`` bytes contiguous and a
byte inside one 32-channel group. A kernel unpacks with ``(byte >> (bits * i)) & (2**bits - 1)`` where
``i`` is the element's index inside its byte.
"""

from __future__ import annotations

import torch

__all__ = ["SUPPORTED_BITS", "codes_per_byte", "pack_codes", "unpack_codes", "unpack_plane"]

SUPPORTED_BITS = (2, 4)


def codes_per_byte(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    return 8 // bits


def _shifts(bits: int, device) -> torch.Tensor:
    return torch.arange(0, 8, bits, dtype=torch.uint8, device=device)


def pack_codes(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack ``codes`` (uint8 values in ``[0, 2**bits)``) along ``dim``; that dim shrinks by ``8 // bits``."""
    per_byte = codes_per_byte(bits)
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    dim = dim % codes.dim()
    n = codes.shape[dim]
    if n % per_byte:
        raise ValueError(f"packed dim {dim} has size {n}, not a multiple of {per_byte} (bits={bits})")
    moved = codes.movedim(dim, -1)
    grouped = moved.reshape(*moved.shape[:-1], n // per_byte, per_byte)
    packed = (grouped << _shifts(bits, codes.device)).sum(-1, dtype=torch.uint8)
    return packed.movedim(-1, dim).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 codes, ``dim`` grows by ``8 // bits``."""
    per_byte = codes_per_byte(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed codes must be uint8, got {packed.dtype}")
    dim = dim % packed.dim()
    moved = packed.movedim(dim, -1)
    mask = (1 << bits) - 1
    codes = (moved.unsqueeze(-1) >> _shifts(bits, packed.device)) & mask
    codes = codes.reshape(*moved.shape[:-1], moved.shape[-1] * per_byte)
    return codes.movedim(-1, dim).contiguous()


def unpack_plane(packed: torch.Tensor, bits: int, i: int) -> torch.Tensor:
    """Bit field ``i`` of every byte: the uint8 codes of elements ``8 // bits * j + i`` along the packed dim.

    Same shape as ``packed``. Stacking the ``8 // bits`` planes right after the packed dim and merging the
    two dims gives :func:`unpack_codes`. A plane is two elementwise passes with scalar shift and mask (the
    CPU attention, ``kernels/cpu_attention.py``, dequantizes plane by plane and never interleaves the codes
    back into element order).
    """
    per_byte = codes_per_byte(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed codes must be uint8, got {packed.dtype}")
    if not 0 <= i < per_byte:
        raise ValueError(f"bit field {i} outside [0, {per_byte}) for bits={bits}")
    shifted = packed >> (bits * i) if i else packed
    return shifted if i == per_byte - 1 else shifted & ((1 << bits) - 1)
