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
        bits: code width of every layer, 2 (default) or 4; or a **bits budget** between them (``bits=2.5``,
            any number in (2, 4)): the average code bits per element over the attention layers. A budget
            gives 4 bits to the layers a data-free predictor ranks most damaged by 2 bits, computed from the
            first step's (the prompt's) keys, values and queries (``oscar_compile.bit_budget``), and 2 bits
            to the rest: ``floor(L * (bits - 2) / 2)`` layers of ``L`` get 4 bits, so the average never
            exceeds the budget. Decided once per sequence, like the "auto" key flags.
        layer_bits: the decided allocation, one code width (2 or 4) per attention layer the cache
            quantizes, in layer order; None until decided. Set by ``bit_budget`` (or by hand with
            :meth:`with_layer_bits`); its mean must not exceed ``bits``. Every backend reads a layer's
            settings through :meth:`layer`.
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

    bits: int | float = 2
    group_size: int = 32
    residual_length: int = 128
    rotate_keys: bool | str = AUTO
    rotate_values: bool = True
    token_scaling: bool | str = True
    layer_bits: tuple[int, ...] | None = None

    def __post_init__(self):
        accepted = {
            "group_size": "a power of two >= 8, e.g. 32",
            "residual_length": "a positive multiple of group_size, e.g. 128",
        }
        b = self.bits
        what = f"one of {SUPPORTED_BITS}, or a bits budget between them such as 2.5"
        if isinstance(b, bool) or not isinstance(b, numbers.Real) or (
                not isinstance(b, numbers.Integral) and float(b) in SUPPORTED_BITS):
            # 2.0 or True would reach the kernels as constexprs: a code width is an int, a budget a fraction
            raise TypeError(f"OScaRConfig.bits must be an int ({what}), got {b!r} ({type(b).__name__})")
        if not 2 <= b <= 4:
            raise ValueError(f"OScaRConfig.bits must be {what}, got {b!r}")
        object.__setattr__(self, "bits", int(b) if b in SUPPORTED_BITS else float(b))
        self._check_layer_bits()
        for name, what in accepted.items():  # ints only: 2.0 or True would reach the kernels as constexprs
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"OScaRConfig.{name} must be an int ({what}), got {v!r} ({type(v).__name__})")
            object.__setattr__(self, name, int(v))  # numpy ints become Python ints (frozen dataclass)
        # the Triton kernels' limit, checked here rather than at a cache's first step on the GPU
        check_triton_format(CacheFormat(min(SUPPORTED_BITS), self.group_size, self.residual_length), where="OScaRConfig.")
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

    def _check_layer_bits(self) -> None:
        lb = self.layer_bits
        if lb is None:
            return
        if isinstance(lb, (str, bytes)) or not hasattr(lb, "__iter__"):
            raise ValueError(f"OScaRConfig.layer_bits must be None or a sequence of 2s and 4s, got {lb!r}")
        lb = tuple(lb)
        if not lb or any(isinstance(x, bool) or not isinstance(x, numbers.Integral) or int(x) not in SUPPORTED_BITS
                         for x in lb):
            raise ValueError(f"OScaRConfig.layer_bits must be a non-empty sequence of {SUPPORTED_BITS}, got {lb!r}")
        lb = tuple(int(x) for x in lb)
        if not self.is_budget and set(lb) != {self.bits}:
            raise ValueError(f"OScaRConfig.layer_bits {lb} disagrees with bits={self.bits}; pass a budget (e.g. bits=2.5)")
        if sum(lb) > self.bits * len(lb) + 1e-9:
            raise ValueError(f"OScaRConfig.layer_bits averages {sum(lb) / len(lb):.4g} bits, over the budget bits={self.bits}")
        object.__setattr__(self, "layer_bits", lb)

    @property
    def is_budget(self) -> bool:
        """True when ``bits`` is a budget between 2 and 4 (per-layer 2/4-bit allocation), not one code width."""
        return self.bits not in SUPPORTED_BITS

    @property
    def needs_allocation(self) -> bool:
        """A budget whose per-layer allocation is not decided yet (``layer_bits`` None)."""
        return self.is_budget and self.layer_bits is None

    def with_layer_bits(self, layer_bits) -> "OScaRConfig":
        """This budget with its per-layer allocation decided (checked against the budget)."""
        return replace(self, layer_bits=tuple(layer_bits))

    def layer(self, index: int) -> "OScaRConfig":
        """The uniform config of the ``index``-th quantized layer (its own ``bits``, 2 or 4).

        A uniform config returns itself; a budget needs its allocation (``layer_bits``) first: the caches
        decide it at the first step (``oscar_compile.bit_budget``)."""
        if not self.is_budget:
            return self
        if self.layer_bits is None:
            raise ValueError(
                f"OScaRConfig(bits={self.bits}) is a bits budget whose per-layer allocation is not decided yet: "
                "it is decided from the first step's prompt (oscar_compile.bit_budget.plan_layer_bits / "
                "allocate_layer_bits), or pass layer_bits=(...)"
            )
        if not 0 <= index < len(self.layer_bits):
            raise ValueError(f"layer {index} has no entry in OScaRConfig.layer_bits (length {len(self.layer_bits)})")
        return replace(self, bits=self.layer_bits[index], layer_bits=None)

    @property
    def mean_code_bits(self) -> float:
        """Average code bits per element: ``bits`` for a uniform config, the allocation's mean for a decided
        budget, the budget itself before the allocation is decided."""
        if self.layer_bits is not None:
            return sum(self.layer_bits) / len(self.layer_bits)
        return float(self.bits)

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
        """The kernels' :class:`~oscar_compile.kernels.CacheFormat` of this config (the one conversion); a
        budget has one per layer: ``config.layer(i).cache_format``."""
        if self.is_budget:
            raise ValueError(f"OScaRConfig(bits={self.bits}) is a bits budget: each layer has its own format, "
                             "config.layer(i).cache_format")
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
