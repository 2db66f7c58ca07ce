"""Storage of one layer's OScaR KV cache: the tensors every cache kernel reads and writes.

The cache is preallocated to ``max_len`` tokens per sequence (a multiple of ``residual_length``), so
shapes are static and a decode step can be captured in a CUDA graph. Each sequence ``b`` stores its
own tokens from slot 0 (left padding is never written), so sequences of different lengths keep the
quantization groups they would have alone. ``lengths[b]`` is the number of tokens stored:

* slots ``[0, Q_b)`` with ``Q_b = lengths[b] // R * R`` are quantized (complete blocks of ``R``);
* the newest ``lengths[b] % R`` tokens sit in ``residual_*[b, :, :lengths[b] % R]`` at full precision,
  in the original (unrotated, unscaled) space.

=============== ========================================= ======= =====================================
field           shape                                     dtype   meaning
=============== ========================================= ======= =====================================
key_codes       ``[B, Hkv, max_len * bits // 8, D]``      uint8   key codes, packed along tokens
key_mn          ``[B, Hkv, max_len // G, D]``             fp16    key group minimum (per channel)
key_scale       ``[B, Hkv, max_len // G, D]``             fp16    key group step
key_norms       ``[B, max_len]``                          fp32    omni-token key norm
value_codes     ``[B, Hkv, max_len, D * bits // 8]``      uint8   value codes, packed along channels
value_mn        ``[B, Hkv, max_len, D // G]``             fp16    value group minimum (per token)
value_scale     ``[B, Hkv, max_len, D // G]``             fp16    value group step
residual_keys   ``[B, Hkv, R, D]``                        model   newest keys, original space
residual_values ``[B, Hkv, R, D]``                        model   newest values, original space
lengths         ``[B]``                                   int32   tokens stored per sequence
key_rotated     ``[Hkv]``                                 bool    head's keys (and queries) are rotated
key_scaled      ``[Hkv]``                                 bool    head's keys are divided by the norm
=============== ========================================= ======= =====================================

``G`` is ``group_size``, ``R`` is ``residual_length``. The per-head key flags are state, not format:
they may be decided at run time (before the first block is quantized) and must not change after.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch

from .packing import codes_per_byte

__all__ = [
    "FP16_MAX", "TRITON_HEAD_DIMS", "CacheFormat", "CacheTensors", "allocate_cache", "cache_nbytes",
    "check_storable", "check_triton_cache", "check_triton_format",
]  # fmt: skip

FP16_MAX = 65504.0  # largest finite fp16: the group minimum/step are stored in fp16

# head dims the Triton attention kernel (kernels.cache_attention) tiles; other multiples of group_size run on
# the reference path only
TRITON_HEAD_DIMS = (32, 64, 96, 128, 256)


class CacheFormat(NamedTuple):
    """Static format of a layer's cache (compile-time constants for the kernels)."""

    bits: int = 2
    group_size: int = 32
    residual_length: int = 128
    rotate_values: bool = True


class CacheTensors(NamedTuple):
    """One layer's cache storage; see the module docstring for shapes and dtypes."""

    key_codes: torch.Tensor
    key_mn: torch.Tensor
    key_scale: torch.Tensor
    key_norms: torch.Tensor
    value_codes: torch.Tensor
    value_mn: torch.Tensor
    value_scale: torch.Tensor
    residual_keys: torch.Tensor
    residual_values: torch.Tensor
    lengths: torch.Tensor
    key_rotated: torch.Tensor
    key_scaled: torch.Tensor

    @property
    def max_len(self) -> int:
        return self.value_codes.shape[2]

    @property
    def head_dim(self) -> int:
        return self.residual_keys.shape[-1]


def check_triton_format(fmt: CacheFormat, head_dim: int | None = None, where: str = "") -> None:
    """Raise ``ValueError`` unless the Triton cache kernels can run ``fmt`` (and ``head_dim`` when given).

    The one owner of the kernels' format limits: ``group_size`` a power of two >= 8 (a tile holds whole
    groups, and its sizes are powers of two) for both kernels, ``head_dim`` one of ``TRITON_HEAD_DIMS``
    for the attention kernel. ``OScaRConfig`` checks the group size when it is built, :func:`allocate_cache`
    checks both for a cache on a CUDA device, and the launchers (:func:`check_triton_cache`) check again.
    ``where``: prefix naming the caller's field in the message (e.g. ``"OScaRConfig."``).
    """
    g = fmt.group_size
    if g < 8 or g & (g - 1):
        raise ValueError(
            f"{where}group_size must be a power of two >= 8 (8, 16, 32, 64, ...: the Triton cache kernels' "
            f"tiles hold whole groups), got {g}"
        )
    if head_dim is not None and head_dim not in TRITON_HEAD_DIMS:
        raise ValueError(
            f"{where}head_dim {head_dim} not supported by the Triton cache kernels; supported: {TRITON_HEAD_DIMS} "
            "(other multiples of group_size run on the reference path only: a CPU cache, cache_attention_ref)"
        )


def check_triton_cache(cache: "CacheTensors", fmt: CacheFormat, attention: bool) -> None:
    """Launcher-side checks of a cache handed to a Triton kernel (host-side, no sync): the format
    (:func:`check_triton_format`; the head_dim too for ``attention``), int32 ``lengths`` and a residual
    buffer of ``residual_length`` tokens."""
    check_triton_format(fmt, cache.head_dim if attention else None)
    if cache.lengths.dtype != torch.int32:
        raise TypeError(f"cache.lengths must be int32, got {cache.lengths.dtype}")
    if cache.residual_keys.shape[2] != fmt.residual_length:
        raise ValueError(
            f"residual buffer holds {cache.residual_keys.shape[2]} tokens, fmt says residual_length {fmt.residual_length}"
        )


def check_storable(name: str, tokens: torch.Tensor, *params: torch.Tensor) -> None:
    """Raise ``ValueError`` unless quantized ``tokens`` fit the cache's storage.

    ``tokens``: the tokens just quantized (before rotation/scaling); ``params``: what quantization derived
    from them (fp16 group minimum and step, fp32 key norms). The tokens must be finite, and so must the
    parameters: a group whose minimum or step lies beyond the fp16 range (``FP16_MAX``, after the Hadamard
    rotation, which can grow an entry by up to sqrt(head_dim), and the key norm division) would be stored
    as inf and attended as NaN. Host-synchronizing: for the reference path (``append_kv_ref``) and
    ``fake_quantize``; the Triton append does not check (``kernels.append_kv.append_kv``).
    """
    if not bool(torch.isfinite(tokens).all()):
        raise ValueError(f"{name} contain non-finite values in the tokens to quantize")
    if not all(bool(torch.isfinite(p).all()) for p in params):
        peak = float(tokens.abs().max())
        raise ValueError(
            f"{name} exceed the fp16 range ({FP16_MAX}) of the quantization parameters: a group minimum or step "
            f"(fp16), or a key norm (fp32), would not be finite (largest |input| {peak:.6g}, before the rotation "
            "and norm division), and attention would return NaN"
        )


def _positive_int(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"allocate_cache: {name} must be an int >= 1, got {v!r} ({type(v).__name__})")
    if v < 1:
        raise ValueError(f"allocate_cache: {name} must be an int >= 1, got {v}")


def _check_format(fmt: CacheFormat, max_len: int, head_dim: int) -> None:
    codes_per_byte(fmt.bits)
    if fmt.residual_length % fmt.group_size:
        raise ValueError(f"residual_length {fmt.residual_length} not a multiple of group_size {fmt.group_size}")
    if max_len <= 0 or max_len % fmt.residual_length:
        raise ValueError(f"max_len {max_len} must be a positive multiple of residual_length {fmt.residual_length}")
    if head_dim % fmt.group_size:
        raise ValueError(f"head_dim {head_dim} not a multiple of group_size {fmt.group_size}")


def allocate_cache(
    batch: int,
    kv_heads: int,
    max_len: int,
    head_dim: int,
    fmt: CacheFormat,
    dtype: torch.dtype,
    device=None,
    rotate_keys=True,
    token_scaling=True,
) -> CacheTensors:
    """Zeroed storage for ``batch`` sequences of up to ``max_len`` tokens; ``lengths`` start at 0.

    ``rotate_keys``/``token_scaling``: initial per-head key flags (bool, or bool tensor ``[Hkv]``).
    A cache on a CUDA device must fit the Triton kernels (:func:`check_triton_format`): checked here, not
    at its first step.
    """
    for name, v in (("batch", batch), ("kv_heads", kv_heads), ("max_len", max_len), ("head_dim", head_dim)):
        _positive_int(name, v)
    _check_format(fmt, max_len, head_dim)
    on = torch.device(device) if device is not None else torch.get_default_device()
    if on.type == "cuda":
        check_triton_format(fmt, head_dim)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"cache dtype must be float16, bfloat16 or float32, got {dtype}")
    per_byte = codes_per_byte(fmt.bits)
    g, r = fmt.group_size, fmt.residual_length
    kw = dict(device=device)

    def flags(flag):
        if isinstance(flag, torch.Tensor):
            return flag.to(device=device, dtype=torch.bool).clone()
        return torch.full((kv_heads,), bool(flag), dtype=torch.bool, **kw)

    return CacheTensors(
        key_codes=torch.zeros(batch, kv_heads, max_len // per_byte, head_dim, dtype=torch.uint8, **kw),
        key_mn=torch.zeros(batch, kv_heads, max_len // g, head_dim, dtype=torch.float16, **kw),
        key_scale=torch.zeros(batch, kv_heads, max_len // g, head_dim, dtype=torch.float16, **kw),
        key_norms=torch.ones(batch, max_len, dtype=torch.float32, **kw),
        value_codes=torch.zeros(batch, kv_heads, max_len, head_dim // per_byte, dtype=torch.uint8, **kw),
        value_mn=torch.zeros(batch, kv_heads, max_len, head_dim // g, dtype=torch.float16, **kw),
        value_scale=torch.zeros(batch, kv_heads, max_len, head_dim // g, dtype=torch.float16, **kw),
        residual_keys=torch.zeros(batch, kv_heads, r, head_dim, dtype=dtype, **kw),
        residual_values=torch.zeros(batch, kv_heads, r, head_dim, dtype=dtype, **kw),
        lengths=torch.zeros(batch, dtype=torch.int32, **kw),
        key_rotated=flags(rotate_keys),
        key_scaled=flags(token_scaling),
    )


def cache_nbytes(cache: CacheTensors) -> int:
    """Exact bytes held by the cache's tensors."""
    return sum(t.numel() * t.element_size() for t in cache)
