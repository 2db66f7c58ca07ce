"""Walsh–Hadamard rotation used by OScaR (DESIGN.md §2.1).

``H`` is the Sylvester Hadamard matrix divided by ``sqrt(n)``: symmetric and orthonormal, so
``H @ H = I`` and rotating twice gives back the input.

A head_dim that is not a power of two (80, 96, 112, ...) is rotated block-diagonally: the blocks have
the size of the largest power of two that divides ``D`` (96 -> three blocks of 32, 80 -> five blocks
of 16). That keeps the rotation orthonormal and self-inverse for every ``D`` and lets a kernel rotate
each block independently. Smaller blocks mix fewer channels, so outliers are spread less for those
sizes; that is the price of exactness without padding.
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = ["hadamard_block_size", "hadamard_matrix", "hadamard_transform"]


def hadamard_block_size(head_dim: int) -> int:
    """Size of the diagonal Hadamard blocks for ``head_dim``: its largest power-of-two divisor."""
    if head_dim <= 0:
        raise ValueError(f"head_dim must be positive, got {head_dim}")
    return head_dim & -head_dim


@functools.lru_cache(maxsize=32)
def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_matrix(head_dim: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Dense ``[D, D]`` normalized (block-diagonal) Hadamard matrix; for tests and small kernels."""
    block = hadamard_block_size(head_dim)
    h = _sylvester(block) / math.sqrt(block)
    full = torch.block_diag(*([h] * (head_dim // block)))
    return full.to(dtype=dtype, device=device)


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """Rotate the last dim of ``x`` by the normalized Hadamard matrix: ``x @ H`` in O(D log D).

    x: ``[..., D]`` any float dtype. Computed in fp32, returned as fp32 (callers cast). Self-inverse.
    """
    d = x.shape[-1]
    block = hadamard_block_size(d)
    lead = x.shape[:-1]
    y = x.to(torch.float32).reshape(*lead, d // block, block)
    # Sylvester recursion H_2n = [[H_n, H_n], [H_n, -H_n]]: sum/difference of halves, then recurse.
    half = block // 2
    while half >= 1:
        y = y.reshape(*lead, d // block, block // (2 * half), 2, half)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        half //= 2
    return y.reshape(*lead, d) / math.sqrt(block)
