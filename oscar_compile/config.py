"""``OScaRConfig``: the one set of knobs every backend reads (DESIGN.md §2)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, replace

from .kernels.cache_layout import CacheFormat, check_triton_format
from .kernels.key_transform import FALLBACK_FLAGS
from .kernels.packing import SUPPORTED_BITS

__all__ = ["AUTO", "OScaRConfig", "initial_key_flags"]

AUTO = "auto"


@dataclass(frozen=True)
class OScaRConfig:
    """How keys and values are quantized.

    Args:
        bits: code width, 2 (default) or 4.
        group_size: tokens per key group (per channel) and channels per value group (per token); a power
            of two >= 8 (the Triton kernels' limit, ``kernels.cache_layout.check_triton_format``). On CUDA the
            head dim must also be one the kernels support: checked when a cache is allocated.
        residual_length: newest tokens kept in full precision; a full block of this many is
            quantized at once. A positive multiple of ``group_size``.
        rotate_keys: Hadamard-rotate keys (and queries) before quantizing; a bool, or ``"auto"`` (the
            default): decided per layer and per kv head by ``kernels.key_transform.choose_key_flags`` from
            the keys and queries of the cache's first step (the prompt), then fixed until the cache is reset.
            A batch shares one decision per layer (flags are per kv head, not per sequence).
        rotate_values: Hadamard-rotate values before quantizing (output rotated back).
        token_scaling: divide each key token by its norm over all kv heads and channels; a bool or
            ``"auto"`` (decided like ``rotate_keys``, jointly with it).

    The default is the adaptive rule (:meth:`adaptive`: key rotation "auto", keys scaled, values rotated), the
    most robust 2-bit variant measured (benchmarks/README.md, "Accuracy"). All three switches on is the
    paper's OScaR (:meth:`paper`); all off is KIVI (:meth:`kivi`).
    """

    bits: int = 2
    group_size: int = 32
    residual_length: int = 128
    rotate_keys: bool | str = AUTO
    rotate_values: bool = True
    token_scaling: bool | str = True

    def __post_init__(self):
        accepted = {
            "bits": f"one of {SUPPORTED_BITS}",
            "group_size": "a power of two >= 8, e.g. 32",
            "residual_length": "a positive multiple of group_size, e.g. 128",
        }
        for name, what in accepted.items():  # ints only: 2.0 or True would reach the kernels as constexprs
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"OScaRConfig.{name} must be an int ({what}), got {v!r} ({type(v).__name__})")
            object.__setattr__(self, name, int(v))  # numpy ints become Python ints (frozen dataclass)
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"OScaRConfig.bits must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        # the Triton kernels' limit, checked here rather than at a cache's first step on the GPU
        check_triton_format(CacheFormat(self.bits, self.group_size, self.residual_length), where="OScaRConfig.")
        r = self.residual_length
        if r <= 0 or r % self.group_size:
            raise ValueError(
                f"OScaRConfig.residual_length must be a positive multiple of group_size "
                f"({self.group_size}), got {r!r}"
            )
        for name in ("rotate_keys", "token_scaling"):
            v = getattr(self, name)
            if not isinstance(v, bool) and v != AUTO:
                raise ValueError(f"OScaRConfig.{name} must be a bool or {AUTO!r}, got {v!r}")
        if not isinstance(self.rotate_values, bool):
            raise ValueError(f"OScaRConfig.rotate_values must be a bool, got {self.rotate_values!r}")

    @property
    def adaptive_keys(self) -> bool:
        """True when the key transform is decided at run time (``rotate_keys`` or ``token_scaling`` is auto)."""
        return self.rotate_keys == AUTO or self.token_scaling == AUTO

    @property
    def initial_key_flags(self) -> tuple[bool, bool]:
        """``(rotate, scale)`` every kv head holds before an "auto" decision (:func:`initial_key_flags`)."""
        return initial_key_flags(self.rotate_keys, self.token_scaling)

    @classmethod
    def paper(cls, **overrides) -> "OScaRConfig":
        """The paper's OScaR: rotate keys and values, scale keys by their omni-token norm."""
        return cls(**{"rotate_keys": True, "rotate_values": True, "token_scaling": True, **overrides})

    @classmethod
    def adaptive(cls, **overrides) -> "OScaRConfig":
        """Key rotation decided per layer and kv head from the prompt (``rotate_keys="auto"``), keys scaled
        by their omni-token norm, values rotated: the most robust 2-bit variant measured (benchmarks/README.md)."""
        return cls(**{"rotate_keys": AUTO, "rotate_values": True, "token_scaling": True, **overrides})

    @classmethod
    def kivi(cls, **overrides) -> "OScaRConfig":
        """KIVI: plain per-channel keys / per-token values, nothing rotated or scaled."""
        return cls(**{"rotate_keys": False, "rotate_values": False, "token_scaling": False, **overrides})

    @property
    def cache_format(self) -> CacheFormat:
        """The kernels' :class:`~oscar_compile.kernels.CacheFormat` of this config (the one conversion)."""
        return CacheFormat(self.bits, self.group_size, self.residual_length, self.rotate_values)

    def capacity(self, length: int) -> int:
        """Token slots a cache allocates for ``length`` positions: whole residual blocks (the one rounding)."""
        r = self.residual_length
        return -(-length // r) * r

    def replace(self, **changes) -> "OScaRConfig":
        return replace(self, **changes)


def initial_key_flags(rotate_keys, token_scaling) -> tuple[bool, bool]:
    """``(rotate, scale)`` before an "auto" decision: a fixed setting as given, "auto" as ``choose_key_flags``
    decides from fewer than ``group_size`` keys (``FALLBACK_FLAGS``)."""
    return tuple(fb if f == AUTO else f for f, fb in zip((rotate_keys, token_scaling), FALLBACK_FLAGS))
