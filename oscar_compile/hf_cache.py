"""``OScaRCache``: a static, compileable transformers ``Cache`` holding every attention layer in OScaR form.

Use::

    cache = OScaRCache(model.config, max_cache_len=1024, oscar_config=OScaRConfig())
    use_oscar_attention(model)                      # attn_implementation "oscar" (+ its mask function)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=64)

or :func:`use_oscar_cache` (the hook ``oscar.compile`` calls), which does both and makes ``generate``
use an ``OScaRCache`` wherever transformers would build its default cache. :func:`hf_unsupported_reason` says
why a model cannot take an ``OScaRCache`` at all (then ``use_oscar_cache`` leaves it untouched): rules read
from the class and config, then a short behavioural probe (nothing quantized: OScaR must match transformers).
Layers an ``OScaRCache`` keeps in transformers' form are listed in ``kept_layers``, warned about by
``use_oscar_cache`` and added to ``oscar.compile``'s report.

Each attention layer holds an :class:`~oscar_compile.kv_tensor.OScaRKeyCache` /
:class:`~oscar_compile.kv_tensor.OScaRValueCache` pair in place of the bf16 ``keys``/``values`` (see that
module for the write-then-attend mapping). ``update`` records the step's tokens (``index_copy_``), the
``"oscar"`` attention function hands the halves to ``oscar::sdpa``, which attends and then appends.

* **Left padding**: pads are read from the attention mask and never stored; each prompt in a batch keeps
  the quantization groups (and so the outputs) it has alone.
* **Sliding-window layers** (Gemma2/3, Qwen2 ``sliding_attention``) of a model that also has global layers
  stay, by default, in transformers' own window-sized bf16 layer (``StaticSlidingWindowLayer``; listed in
  :attr:`OScaRCache.kept_layers`): measured better than quantizing them (benchmarks/README.md, "Sliding-window
  layers": bf16 quality, and a window-sized bf16 layer holds fewer bytes than a quantized whole history once
  the context passes ~5 windows). A model whose every layer slides (Mistral-style) has them quantized
  (keeping them would compress nothing). ``quantize_sliding=True`` / ``False`` forces either: the full history is kept and
  ``window=`` is applied in attention (same rule as transformers' mask: key ``j`` visible from query ``p`` iff
  ``p - window < j <= p``). Other layer types (chunked attention, linear attention, ...) keep transformers'
  own static layer and are listed in :attr:`OScaRCache.kept_layers`.
* **Bits budget** (``OScaRConfig(bits=2.5)``): each OScaR layer holds 2- or 4-bit codes
  (``oscar_config.layer(i)``, its own ``CacheFormat``). The allocation (``layer_bits``) is decided from the
  prompt before the cache is allocated: :class:`OScaRGenerate` (``use_oscar_cache`` / ``oscar.compile``) runs
  ``bit_budget.plan_layer_bits`` on each call's prompt; an ``OScaRCache`` built by hand needs a decided config
  (``plan_layer_bits(model, input_ids, config)`` or ``layer_bits=``).
* **Overflow**: a host-side counter of positions raises ``ValueError`` before anything is written past
  ``max_cache_len`` (no device sync). Inside a compiled region the counter is not read (it would be a
  guard, i.e. a recompile per step); there the append op refuses to overflow (the CPU reference raises
  ``ValueError``; the CUDA kernel must not write past ``max_len``) and the next eager call resyncs it.
* **Adaptive key flags** (``OScaRConfig()``'s default ``rotate_keys="auto"``): each layer decides its per-kv-head
  key rotation/scaling at its first step (the prompt) from that step's keys and queries, before attending
  (``kv_tensor``, "Adaptive key flags"). The layer keeps a host-side bool (``first_step``): the first
  step after allocation or :meth:`OScaRLayer.reset` goes through halves that decide (and promise an empty
  layer, ``stored_empty``, so a long prompt attends with flash attention alone), later steps through
  halves that do not, so decode never runs the choice. Under torch.compile Dynamo guards on that bool: at
  most one extra graph (the deciding prefill), no sync, no per-step recompile. A batch shares one decision.
* ``reorder_cache`` (beam search), ``reset``, ``crop`` (within the residual window only), memory
  accounting (:meth:`OScaRCache.nbytes`, :meth:`OScaRCache.bf16_nbytes`, :meth:`OScaRCache.memory_report`).
* **Static shapes under torch.compile**: the halves and their inner tensors are marked static
  (``torch._dynamo.mark_static``), so a cache of another length or batch is a new graph, never a symbolic
  dimension (the subclass's wrapper shape must be concrete ints; automatic dynamic shapes made the second
  length fail to trace).

transformers 5.17 passes ``cache_kwargs`` (with ``cache_position``) to ``update`` and calls the model
with ``past_key_values=``; 5.24 passes no positions and names it ``cache=`` (``past_key_values=`` still
accepted): both are handled.
"""

from __future__ import annotations

import functools
import inspect
import numbers
import warnings
import weakref
from collections.abc import Mapping
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

from . import ops
from .config import OScaRConfig
from .kernels.attention_ref import masked_softmax
from .kv_tensor import (
    OScaRKeyCache, clear_pending, is_oscar_cache, layer_nbytes, layer_slots, mark_static_state, new_kv_cache,
)  # fmt: skip
from .tensor_parallel import local_kv_heads

__all__ = [
    "OScaRCache",
    "OScaRGenerate",
    "OScaRLayer",
    "hf_unsupported_reason",
    "oscar_attention_forward",
    "register_oscar_attention",
    "layer_accounting",
    "use_oscar_attention",
    "use_oscar_cache",
    "cache_kwarg_name",
]

ATTN_IMPLEMENTATION = "oscar"


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def _check_length(name: str, value, owner: str) -> int:
    """``value`` as a positive int, or an error naming ``name`` and what is accepted."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}: {name} must be a positive int (cache positions per sequence), got {value!r}")
    if value <= 0:
        raise ValueError(f"{owner}: {name} must be a positive int (cache positions per sequence), got {value!r}")
    return int(value)


def _check_oscar_config(oscar_config, owner: str) -> OScaRConfig:
    if oscar_config is None:
        return OScaRConfig()
    if not isinstance(oscar_config, OScaRConfig):
        hint = " (build one with OScaRConfig(**settings))" if isinstance(oscar_config, Mapping) else ""
        raise TypeError(f"{owner}: oscar_config must be an OScaRConfig or None, got {type(oscar_config).__name__}{hint}")
    return oscar_config


# OScaRLayer owning each cache half it hands out (weak both ways), for the compile report's byte counts
_LAYER_OF = WeakIdKeyDictionary()


def layer_accounting(half) -> Optional[tuple[str, int]]:
    """``(label, static_bytes)`` of the :class:`OScaRLayer` that owns ``half`` (an OScaR key or value half,
    e.g. a compiled graph's input), or None if no layer owns it.

    ``label`` is the same for every half the layer hands out (its first-step and later halves are distinct
    graph inputs); ``static_bytes`` is :meth:`OScaRLayer.bf16_nbytes`, what transformers' static layer would
    hold in its place (window-sized for sliding layers, the length asked for rather than the capacity).
    """
    ref = _LAYER_OF.get(half)
    layer = ref() if ref is not None else None
    if layer is None or not layer.is_initialized:
        return None
    return f"OScaRCache.layers[{layer.index}]", layer.bf16_nbytes()


class OScaRLayer(CacheLayerMixin):
    """One attention layer's OScaR cache (static, compileable).

    Args:
        max_cache_len: positions per sequence asked for (what transformers' static layer would hold).
        config: quantization settings.
        window: sliding-window size of the layer, None for full attention.
        capacity: positions allocated, at least ``max_cache_len`` (default ``max_cache_len``); rounded up to
            whole ``config.residual_length`` blocks.
    """

    is_compileable = True
    is_croppable = True

    def __init__(self, max_cache_len: int, config: OScaRConfig, window: Optional[int] = None, capacity: Optional[int] = None):
        super().__init__()
        self.requested_len = max_cache_len  # what a transformers StaticLayer would hold
        capacity = max_cache_len if capacity is None else max(capacity, max_cache_len)
        self.max_cache_len = config.capacity(capacity)  # capacity: rounded up to whole residual blocks
        self.config = config
        self.window = window
        self.is_sliding = window is not None
        self.index: Optional[int] = None  # position in its OScaRCache (set by the cache)
        # positions seen (left pads included), device tensor like StaticLayer so compiled code reads no int
        self.cumulative_length = torch.tensor(0, dtype=torch.int64)
        self.host_length = 0  # the same count on the host, for the overflow check
        self._host_stale = False
        self.first_step = True  # nothing stored yet: the next step decides "auto" key flags, may skip the stored pass

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # key_states: [B, Hkv, T, D]
        if self.config.needs_allocation:
            self.config.layer(0)  # raises: the budget's per-layer allocation is decided before allocating
        if key_states.shape != value_states.shape:
            raise NotImplementedError(
                f"OScaR cache needs keys and values of one head_dim, got {tuple(key_states.shape)} / {tuple(value_states.shape)}"
            )
        self.device = key_states.device
        self.batch_size, self.num_heads, _, self.head_dim = key_states.shape
        self.dtype = key_states.dtype
        self.keys, self.values = new_kv_cache(
            self.batch_size, self.num_heads, self.max_cache_len, self.head_dim, self.config,
            key_states.dtype, self.device, self.window,
        )  # fmt: skip
        # the same state twice: first-step halves (decide the "auto" key flags; promise an empty layer, so a
        # long prompt skips the stored-token pass) and the halves of every later step
        self._deciding = (self.keys.with_stored_empty(True), self.values.with_stored_empty(True))
        self.keys, self.values = self.keys.with_key_decision(None), self.values.with_key_decision(None)
        self.cumulative_length = self.cumulative_length.to(self.device)
        halves = (self.keys, self.values, *self._deciding)
        if not _is_compiling():  # static addresses: CUDA graphs capture the state in place, no input copies
            mark_static_state(*halves)
            torch._dynamo.mark_static_address(self.cumulative_length)
            for half in halves:
                _LAYER_OF[half] = weakref.ref(self)
        self.is_initialized = True

    def _fits(self, key_states: torch.Tensor) -> bool:
        """Whether the allocated state has this step's batch, kv heads, head_dim, dtype and device."""
        b, h, _, d = key_states.shape
        return (b, h, d, key_states.dtype, key_states.device) == (
            self.batch_size, self.num_heads, self.head_dim, self.dtype, self.device
        )

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # an empty layer (new, or reset and reused by generate) allocates for the step it first sees
        if not self.is_initialized or (self.first_step and not self._fits(key_states)):
            self.lazy_initialization(key_states, value_states)
        t = key_states.shape[-2]
        if _is_compiling():
            # reading the host counter here would guard on it and recompile every step: a compiled step
            # only marks it stale (a constant store, no guard); the CPU reference also refuses overflow
            self._host_stale = True
        else:
            if self._host_stale:  # after compiled steps: one sync, outside the compiled decode loop
                self.host_length = int(self.cumulative_length)
                self._host_stale = False
                self.check_overflow()
            if self.host_length + t > self.max_cache_len:
                raise ValueError(
                    f"OScaR cache overflow: {self.host_length} positions stored, {t} more exceed max_cache_len "
                    f"{self.max_cache_len}; build the cache with a larger max_cache_len"
                )
            self.host_length += t
        cache_kwargs = args[0] if args and isinstance(args[0], dict) else kwargs.get("cache_kwargs") or {}
        positions = cache_kwargs.get("cache_position") if isinstance(cache_kwargs, dict) else None
        if positions is None:
            positions = torch.arange(t, device=self.device) + self.cumulative_length
        self.cumulative_length.add_(t)
        if self.first_step:  # a Python bool: Dynamo guards on it and replays the store
            self.first_step = False
            keys, values = self._deciding
        else:
            keys, values = self.keys, self.values
        keys.index_copy_(2, positions, key_states)
        values.index_copy_(2, positions, value_states)
        return keys, values

    @property
    def keys_decided(self) -> bool:
        """Whether the layer's key flags are fixed (not "auto", or its first step has run)."""
        return not (self.config.adaptive_keys and self.first_step)

    def get_mask_sizes(self, query_length: int = 0, *args) -> tuple[int, int]:
        # the mask covers every logical position; the window is applied by the attention op
        return self.max_cache_len, 0

    def get_seq_length(self, *args):
        return self.cumulative_length if self.is_initialized else 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def _state(self):
        for half in (self.keys, self.values):
            for name in half.tensor_data_names:
                if name not in ("key_rotated", "key_scaled"):
                    yield getattr(half, name)

    def reset(self) -> None:
        if self.is_initialized:
            for half in (*self._deciding, self.keys, self.values):
                clear_pending(half)
            for half in (self.keys, self.values):
                half.lengths.zero_()
                half.offsets.zero_()
            rotate0, scale0 = self.config.initial_key_flags  # the next step decides "auto" flags afresh
            self.keys.key_rotated.fill_(rotate0)
            self.keys.key_scaled.fill_(scale0)
        self.first_step = True
        self.cumulative_length.zero_()
        self.host_length = 0
        self._host_stale = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``b`` becomes old row ``beam_idx[b]`` (in place, addresses kept)."""
        if not self.is_initialized:
            return
        beam_idx = beam_idx.to(self.device)
        for t in self._state():
            t.copy_(t.index_select(0, beam_idx))

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the newest ``-tokens_to_remove`` tokens; only tokens still in the residual can be dropped."""
        if tokens_to_remove > 0:
            raise RuntimeError("OScaR layers can only be cropped by a negative number of tokens")
        n = -tokens_to_remove
        if n == 0 or not self.is_initialized:
            return
        r = self.config.residual_length
        lengths = self.keys.lengths
        self.check_overflow()  # subtracting would clear a CUDA overflow mark
        if bool(((lengths % r) < n).any()):  # host sync: crop is a host-side operation
            raise NotImplementedError(
                f"OScaR cache: cannot crop {n} tokens, some are already quantized (residual holds {(lengths % r).tolist()})"
            )
        for half in (self.keys, self.values):
            half.lengths.sub_(n)
        self.cumulative_length.sub_(n)
        self.host_length, self._host_stale = int(self.cumulative_length), False

    def check_overflow(self) -> None:
        """Raise ``ValueError`` if a compiled CUDA step overflowed this layer (the kernel marks ``lengths``
        past the capacity instead of raising: ``ops.check_overflow``). One host sync."""
        if self.is_initialized:
            ops.check_overflow(self.keys.lengths, self.keys.capacity)

    def nbytes(self) -> int:
        return layer_nbytes(self.keys, self.values) if self.is_initialized else 0

    def bf16_nbytes(self) -> int:
        """Bytes of the transformers static layer this one replaces (model dtype, window-sized if sliding)."""
        length = self.requested_len if self.window is None else min(self.window, self.requested_len)
        elt = torch.empty(0, dtype=self.dtype).element_size()
        return 2 * self.batch_size * self.num_heads * length * self.head_dim * elt


def _layer_types(config) -> tuple[list[str], list[dict]]:
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs

        types, kwargs = get_layer_types_and_kwargs(config)
        if isinstance(kwargs, dict):  # 5.17: one kwargs dict for every layer; 5.2x: a list, one per layer
            kwargs = [dict(kwargs) for _ in types]
        return list(types), kwargs
    except ImportError:  # older 5.x: same rule from the config fields
        n = config.num_hidden_layers
        window = getattr(config, "sliding_window", None)
        types = getattr(config, "layer_types", None) or (
            ["sliding_attention"] * n if window is not None else ["full_attention"] * n
        )
        kwargs = [{"sliding_window": window} if t == "sliding_attention" else {} for t in types]
        return list(types), kwargs


def _head_dim(text_config) -> int:
    return getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads


def _known_kinds() -> Optional[set]:
    """Layer types transformers' static cache knows (None on versions without the mapping)."""
    try:
        from transformers.cache_utils import STATIC_LAYER_TYPE_MAPPING
    except ImportError:
        return None
    return set(STATIC_LAYER_TYPE_MAPPING)


def _static_layer_class(kind: str):
    """transformers' own static layer class for a layer type we do not quantize."""
    try:
        from transformers.cache_utils import STATIC_LAYER_TYPE_MAPPING

        if kind not in STATIC_LAYER_TYPE_MAPPING:
            raise NotImplementedError(
                f"OScaRCache: layer type {kind!r} has no transformers static layer to keep it in "
                f"(known: {sorted(STATIC_LAYER_TYPE_MAPPING)}); the model cannot take an OScaRCache "
                "(hf_unsupported_reason says why)"
            )
        return STATIC_LAYER_TYPE_MAPPING[kind]
    except ImportError:  # older 5.x: full and sliding/chunked layers only
        from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

        if kind == "full_attention":
            return StaticLayer
        if kind in ("sliding_attention", "chunked_attention"):
            return StaticSlidingWindowLayer
        raise NotImplementedError(f"layer type {kind!r} is not supported by OScaRCache on this transformers version")


class OScaRCache(Cache):
    """Static transformers cache whose attention layers hold the OScaR 2-bit state.

    Args:
        config: the model's ``PretrainedConfig``.
        max_cache_len: positions per sequence (prompt, its left padding, and generated tokens); OScaR
            layers round it up to a multiple of ``oscar_config.residual_length``.
        oscar_config: quantization settings (default :class:`OScaRConfig`).
        quantize_sliding: keep sliding-window layers in transformers' window-sized
            ``StaticSlidingWindowLayer`` (False; reported in :attr:`kept_layers`) or quantize them with their
            whole history (True). None (default): kept when the model also has global (full-attention) layers
            (Gemma2/3-style hybrids: better quality, and fewer bytes once the context passes ~5 windows),
            quantized when every layer slides (Mistral-style: keeping them would compress nothing).
        capacity: positions to allocate, at least ``max_cache_len`` (default: ``max_cache_len``); lets
            ``generate`` reuse one cache for calls of different lengths (:class:`OScaRGenerate`).
            Memory accounting still compares with a static cache of ``max_cache_len``.
    """

    def __init__(
        self,
        config,
        max_cache_len: int,
        oscar_config: Optional[OScaRConfig] = None,
        *,
        quantize_sliding: Optional[bool] = None,
        capacity: Optional[int] = None,
    ):
        max_cache_len = _check_length("max_cache_len", max_cache_len, "OScaRCache")
        self.oscar_config = _check_oscar_config(oscar_config, "OScaRCache")
        if quantize_sliding is not None and not isinstance(quantize_sliding, bool):
            raise TypeError(f"OScaRCache: quantize_sliding must be a bool or None, got {quantize_sliding!r}")
        capacity = max_cache_len if capacity is None else _check_length("capacity", capacity, "OScaRCache")
        if capacity < max_cache_len:
            raise ValueError(f"OScaRCache: capacity {capacity} is smaller than max_cache_len {max_cache_len}")
        if not hasattr(config, "num_hidden_layers") and not hasattr(config, "get_text_config"):
            raise TypeError(f"OScaRCache: config must be the model's transformers PretrainedConfig, got {type(config).__name__}")
        self._max_cache_len = max_cache_len  # (transformers 5.17's Cache has a read-only max_cache_len)
        self._capacity = capacity
        text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        layer_types, layer_kwargs = _layer_types(text_config)
        layers, self.kept_layers = [], {}
        try:
            head_dim, why_not = _head_dim(text_config), None
        except Exception as e:  # per-layer attention sizes (heterogeneous configs): no single head_dim
            head_dim, why_not = None, f"no single head_dim in the config ({type(e).__name__})"
        if head_dim is not None and head_dim % self.oscar_config.group_size:  # the layout needs whole channel groups
            why_not = f"head_dim {head_dim} not a multiple of group_size {self.oscar_config.group_size}"
        if quantize_sliding is None:  # keep window layers beside global ones; a model of window layers only is quantized
            quantize_sliding = "full_attention" not in layer_types
        quantized = [i for i, kind in enumerate(layer_types) if why_not is None and (
            kind == "full_attention" or (kind == "sliding_attention" and quantize_sliding))]
        budget = self.oscar_config
        if budget.layer_bits is not None and len(budget.layer_bits) != len(quantized):
            raise ValueError(
                f"OScaRCache: oscar_config.layer_bits has {len(budget.layer_bits)} entries but the cache quantizes "
                f"{len(quantized)} layers ({quantized})"
            )
        for i, (kind, kw) in enumerate(zip(layer_types, layer_kwargs)):
            # a layer's own config (its bits under a budget); an undecided budget refuses to allocate
            layer_config = budget if budget.needs_allocation or i not in quantized else budget.layer(quantized.index(i))
            if why_not is not None and kind in ("full_attention", "sliding_attention"):
                layers.append(_static_layer_class(kind)(max_cache_len=capacity, **kw))
                self.kept_layers[i] = f"{kind} ({why_not})"
            elif kind == "full_attention":
                layers.append(OScaRLayer(max_cache_len, layer_config, capacity=capacity))
            elif kind == "sliding_attention" and quantize_sliding:
                layers.append(OScaRLayer(max_cache_len, layer_config, window=kw["sliding_window"], capacity=capacity))
            else:
                layers.append(_static_layer_class(kind)(max_cache_len=capacity, **kw))
                self.kept_layers[i] = kind if kind == "sliding_attention" else (  # quantize_sliding=False
                    f"{kind} (not full or sliding softmax attention: kept in transformers' {type(layers[-1]).__name__})"
                )
            if isinstance(layers[-1], OScaRLayer):
                layers[-1].index = i
        super().__init__(layers=layers)

    @property
    def max_cache_len(self) -> int:
        """Positions per sequence asked for (OScaR layers hold it rounded up to whole residual blocks)."""
        return self._max_cache_len

    @property
    def capacity(self) -> int:
        """Positions per sequence allocated (before rounding up to whole residual blocks)."""
        return self._capacity

    def early_initialization(self, batch_size: int, num_heads, head_dim, dtype: torch.dtype, device) -> None:
        """Allocate every layer now (transformers' ``Cache.early_initialization``, same arguments; ints or
        per-layer lists). An empty OScaR layer (new or reset) holding another shape reallocates. Allocating
        before a compiled forward keeps the state a graph input (marked static) instead of a graph output."""
        n = len(self.layers)
        heads = [num_heads] * n if isinstance(num_heads, int) else list(num_heads)
        dims = [head_dim] * n if isinstance(head_dim, int) else list(head_dim)
        if len(heads) != n or len(dims) != n:
            raise ValueError(f"early_initialization: num_heads/head_dim lists must have one entry per layer ({n})")
        for layer, h, d in zip(self.layers, heads, dims):
            probe = torch.empty((batch_size, h, 0, d), dtype=dtype, device=device)  # shape, dtype, device only
            if isinstance(layer, OScaRLayer):
                if not layer.is_initialized or (layer.first_step and not layer._fits(probe)):
                    layer.lazy_initialization(probe, probe)
            elif not layer.is_initialized:
                layer.lazy_initialization(probe, probe)

    def _reserve(self, max_cache_len: int) -> None:
        """A reused cache: accounting follows the largest length asked for so far, as transformers' own
        reuse of static caches across ``generate`` calls does (``_prepare_static_cache``)."""
        if max_cache_len > self._capacity:
            raise ValueError(f"OScaRCache: {max_cache_len} positions exceed the capacity {self._capacity}")
        self._max_cache_len = max(self._max_cache_len, max_cache_len)
        for layer in self.oscar_layers:
            layer.requested_len = max(layer.requested_len, max_cache_len)

    @property
    def oscar_layers(self) -> list[OScaRLayer]:
        return [layer for layer in self.layers if isinstance(layer, OScaRLayer)]

    def nbytes(self) -> int:
        """Exact bytes of the cache state: OScaR layers plus any layer kept in transformers' form."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, OScaRLayer):
                total += layer.nbytes()
            elif getattr(layer, "is_initialized", False):
                total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
        return total

    def bf16_nbytes(self) -> int:
        """Bytes transformers' ``StaticCache`` would hold for the same model, batch and max_cache_len."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, OScaRLayer):
                total += layer.bf16_nbytes() if layer.is_initialized else 0
            elif getattr(layer, "is_initialized", False):
                total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
        return total

    def memory_report(self) -> dict:
        """After the first forward (or ``early_initialization``)::

            {"oscar_bytes", "static_cache_bytes", "ratio", "kept_layers", "layer_bits", "bits_per_element"}

        ``oscar_bytes``: every byte the cache holds (OScaR layers and layers kept in transformers' form);
        ``static_cache_bytes``: what transformers' ``StaticCache`` would hold for the same ``max_cache_len``
        (window-sized sliding layers). ``layer_bits``: code width of each OScaR layer, by layer index.
        ``bits_per_element``: exact bits the OScaR layers hold per key/value element slot they allocate
        (codes, fp16 group parameters, key norms, the full-precision residual block, lengths, flags), so it
        exceeds the long-context figure (``2 + 1 + norms`` at 2 bits) for short caches."""
        ours, theirs = self.nbytes(), self.bf16_nbytes()
        layers = [la for la in self.oscar_layers if la.is_initialized]
        slots = sum(layer_slots(la.keys) for la in layers)
        return {
            "oscar_bytes": ours,
            "static_cache_bytes": theirs,
            "ratio": theirs / ours if ours else float("nan"),
            "kept_layers": dict(self.kept_layers),
            "layer_bits": {la.index: la.config.bits for la in self.oscar_layers},
            "bits_per_element": 8 * sum(la.nbytes() for la in layers) / slots if slots else float("nan"),
        }


# ----------------------------------------------------------------------------------------------------
# attention function and hooks


def oscar_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    sliding_window: Optional[int] = None,
    softcap: Optional[float] = None,
    **kwargs,
):
    """transformers attention function. query ``[B, Hq, T, D]``, key/value ``[B, Hkv, S, D]`` -> ``([B, T, Hq, D], None)``.

    OScaR cache halves go to ``oscar::sdpa`` (inference only: attention dropout raises). Plain tensors (no
    cache, or a layer kept in transformers' form): transformers' SDPA; with a tanh softcap, ``oscar::sdpa``,
    or :func:`_softcap_attention` (differentiable, applies dropout) when training or when gradients flow.
    """
    if is_oscar_cache(key):
        if dropout:
            raise NotImplementedError(
                f"layer {getattr(module, 'layer_idx', '?')}: attention dropout {dropout} (the module is in train()) "
                "over an OScaR cache; the OScaR cache is inference-only: call model.eval(), or run without a cache "
                "(use_cache=False)"
            )
        if kwargs.get("s_aux") is not None:
            raise NotImplementedError(
                f"layer {getattr(module, 'layer_idx', '?')}: attention sinks (s_aux, an extra softmax logit per head) "
                "over an OScaR cache; OScaR attention has no sink term (hf_unsupported_reason declines such models)"
            )
        if sliding_window is not None and key.window != sliding_window:
            raise ValueError(
                f"layer {getattr(module, 'layer_idx', '?')} attends with sliding_window={sliding_window} but its "
                f"OScaR cache was built with window={key.window}"
            )
        out = ops.sdpa(query, key, value, attention_mask, scale=scaling, softcap=softcap)
        return out.transpose(1, 2).contiguous(), None
    if softcap is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    causal = attention_mask is None and query.shape[2] > 1
    grads = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if dropout or grads:  # oscar::sdpa has no backward and no dropout
        training = module.training if isinstance(module, torch.nn.Module) else True
        out = _softcap_attention(query, key, value, attention_mask, scaling, softcap, causal, dropout if training else 0.0)
    else:
        out = ops.sdpa(query, key, value, attention_mask, scale=scaling, softcap=softcap, is_causal=causal)
    return out.transpose(1, 2).contiguous(), None


def _softcap_attention(query, key, value, attention_mask, scale, softcap, is_causal, dropout):
    """Attention with a tanh score softcap and dropout on the probabilities, in plain differentiable torch.

    query ``[B, Hq, T, D]``, key/value ``[B, Hkv, S, D]`` (``Hq`` a multiple of ``Hkv``), attention_mask bool
    (True = attend) or additive, broadcastable to ``[B, Hq, T, S]`` -> ``[B, Hq, T, D]`` in query's dtype.
    Same rule as ``oscar::sdpa`` (softmax in fp32; a row that may attend to nothing gives zeros).
    """
    n_rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(n_rep, 1), value.repeat_interleave(n_rep, 1)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(query, key.transpose(2, 3)).float() * scale
    scores = torch.tanh(scores / softcap) * softcap
    if is_causal:  # top-left aligned, as F.scaled_dot_product_attention
        t, s = scores.shape[-2:]
        scores = scores.masked_fill(~torch.ones(t, s, dtype=torch.bool, device=scores.device).tril(), float("-inf"))
    probs = masked_softmax(scores, attention_mask).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    return torch.matmul(probs, value)


@functools.lru_cache(maxsize=None)
def register_oscar_attention() -> str:
    """Register ``"oscar"`` with transformers' AttentionInterface *and* AttentionMaskInterface (without the
    mask registration transformers passes ``attention_mask=None`` with a static cache)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, oscar_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    return ATTN_IMPLEMENTATION


def use_oscar_attention(model) -> None:
    """Route the model's attention through :func:`oscar_attention_forward`."""
    name = register_oscar_attention()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # older 5.x
        model.config._attn_implementation = name


def cache_kwarg_name(model) -> str:
    """``"cache"`` (transformers >= 5.2x) or ``"past_key_values"`` (5.17): the model's cache argument."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


# ----------------------------------------------------------------------------------------------------
# which models can take an OScaRCache, and generate() with one


def hf_unsupported_reason(model, oscar_config: Optional[OScaRConfig] = None) -> Optional[str]:
    """Why ``model`` cannot take an :class:`OScaRCache` through :func:`use_oscar_cache`; None when it can.

    General rules read from the model's class and config, no model names:

    * an encoder-decoder config (T5, Bart, Whisper, ...): the decoder's cross-attention attends to the encoder
      output, not to tokens the decoder appends, and transformers pairs its self-attention cache with that
      one (``EncoderDecoderCache``);
    * no ``generate`` (not a generation model);
    * a class whose attention does not go through transformers' attention interface
      (``_supports_attention_backend`` False: Bloom's and Falcon's ALiBi, MPT, ...): attn_implementation
      ``"oscar"`` would never see the cache, and the model's own attention would read it some other way;
    * no static-cache support (``_can_compile_fullgraph`` False) or a cache of its own
      (``_supports_default_dynamic_cache()`` False: recurrent and linear-attention models);
    * an additive position bias in the config (``alibi``, or ``position_embedding_type`` other than rotary /
      absolute): scores need a bias the OScaR attention does not add;
    * no attention layer the OScaR layout can hold (no full or sliding attention layer, or a head_dim that is
      not a multiple of ``oscar_config.group_size``), no single head_dim (per-layer attention sizes), or a
      layer type transformers' static cache does not know;
    * a behavioural check, once per model (:func:`_probe_reason`): a 5-token prompt and one decode step through an
      ``OScaRCache`` (nothing quantized) must match transformers' ``DynamicCache`` to float error. It declines
      attention that is not plain softmax over the cached keys/values (differential attention, attention
      sinks, cache reads outside the attention interface), whatever the class flags say.
    """
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - hf_cache itself imports transformers
        return "transformers is not installed"
    cls = type(model).__name__
    if not isinstance(model, PreTrainedModel):
        return f"{cls} is not a transformers PreTrainedModel"
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return (
            f"{cls} is an encoder-decoder model: its cross-attention reads the encoder output, not a cache the "
            "decoder appends to, and transformers pairs the self-attention cache with it; the model keeps "
            "transformers' caches (self- and cross-attention left untouched)"
        )
    if not callable(getattr(model, "generate", None)):
        return f"{cls} has no generate() (not a generation model): there is no cache for OScaR to provide"
    if not getattr(type(model), "_supports_attention_backend", False):
        return (
            f"{cls}'s attention does not go through transformers' attention interface (_supports_attention_backend "
            "is False; e.g. ALiBi or other biases computed in the model's own attention), so an OScaR cache would "
            "be read by attention that cannot handle it"
        )
    if not getattr(type(model), "_can_compile_fullgraph", False):
        return f"{cls} does not support a static cache (_can_compile_fullgraph is False), which OScaRCache is"
    supports_cache = getattr(type(model), "_supports_default_dynamic_cache", None)
    if supports_cache is not None and not supports_cache():
        return f"{cls} manages a cache of its own (recurrent or linear attention), not transformers' Cache"
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if getattr(text, "alibi", False):
        return f"{cls} adds ALiBi position biases to the attention scores (config.alibi), which OScaR attention does not"
    position = getattr(text, "position_embedding_type", None)
    if isinstance(position, str) and position not in ("rope", "rotary", "absolute"):
        return f"{cls} uses position_embedding_type={position!r} (a bias on the scores), which OScaR attention does not add"
    try:
        kinds, _ = _layer_types(text)
    except Exception as e:  # noqa: BLE001 - any failure to read the layout is a reason, not a crash
        return f"{cls}: cannot read its attention layers from the config ({type(e).__name__}: {e})"
    try:
        head_dim = _head_dim(text)
    except Exception as e:  # noqa: BLE001 - e.g. heterogeneous configs: head_dim is a per-layer attribute
        return (
            f"{cls} has no single head_dim in its config (per-layer attention sizes: {type(e).__name__}); "
            "OScaRCache sizes every layer from one head_dim"
        )
    group = (oscar_config or OScaRConfig()).group_size
    if not any(k in ("full_attention", "sliding_attention") for k in kinds):
        return f"{cls} has no full or sliding attention layer (layer types {sorted(set(kinds))})"
    known = _known_kinds()
    unknown = sorted({k for k in kinds if known is not None and k not in known})
    if unknown:
        return f"{cls} has layer types transformers' static cache does not know ({unknown}): no layer to keep them in"
    if head_dim % group:
        return f"{cls} has head_dim {head_dim}, not a multiple of group_size {group}: no layer can hold OScaR state"
    return _probe_reason(model, oscar_config or OScaRConfig())


# model -> (group_size, reason or None): the behavioural check runs once per model
_PROBED = WeakIdKeyDictionary()
_PROBE_TOKENS = 6  # fewer than any residual_length (>= group_size >= 8): nothing is quantized in the probe


def _probe_reason(model, oscar_config: OScaRConfig) -> Optional[str]:
    """Whether the model's attention really is softmax attention over the cache it is handed: a 5-token
    prompt and one decode step, once with transformers' ``DynamicCache`` and once with an ``OScaRCache``
    (attn_implementation ``"oscar"``). No token is quantized in so short a sequence, so the two must agree to
    float error. A model that reads or reshapes the cached keys/values outside the attention interface
    (differential attention splitting the values, latent or compressed caches, extra score terms), raises
    over the cache halves, or leaves its attention layers' OScaR state unread gives a reason; None when it
    agrees. Skipped (None) for weights not materialised (meta) or spread over devices, where it cannot run.
    """
    hit = _PROBED.get(model)
    if hit is not None and hit[0] == oscar_config.group_size:
        return hit[1]
    params = [p for p in model.parameters()][:1]
    if not params or params[0].device.type == "meta" or len(set(getattr(model, "hf_device_map", {"": 0}).values())) > 1:
        return None
    reason = _run_probe(model, oscar_config)
    _PROBED[model] = (oscar_config.group_size, reason)
    return reason


def _run_probe(model, oscar_config: OScaRConfig) -> Optional[str]:
    cls = type(model).__name__
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embed, "num_embeddings", None) or getattr(model.config.get_text_config(decoder=True), "vocab_size", None)
    if not vocab:
        return None
    device = next(model.parameters()).device
    ids = (torch.arange(_PROBE_TOKENS, device=device) * 7919 + 11) % vocab
    ids = ids[None]
    name = cache_kwarg_name(model)
    config = model.config
    before = getattr(config, "_attn_implementation", None)
    training = model.training

    def two_steps(cache):
        model(input_ids=ids[:, :-1], use_cache=True, **{name: cache})
        return model(input_ids=ids[:, -1:], use_cache=True, **{name: cache}).logits[:, -1].float()

    model.eval()
    try:
        with torch.no_grad():
            try:
                plain = two_steps(DynamicCache(config=config))
            except TypeError:  # older 5.x: no config argument
                plain = two_steps(DynamicCache())
            except Exception:  # noqa: BLE001 - the plain model cannot run this probe: nothing to compare with
                return None
            use_oscar_attention(model)
            if oscar_config.is_budget:  # nothing is quantized in the probe: any code width will do
                oscar_config = oscar_config.replace(bits=2, layer_bits=None)
            cache = OScaRCache(config, _PROBE_TOKENS, oscar_config)
            try:
                ours = two_steps(cache)
            except Exception as e:  # noqa: BLE001
                return (
                    f"{cls}'s attention fails over an OScaR cache ({type(e).__name__}: {str(e)[:200]}): it uses the "
                    "cached keys/values outside transformers' attention interface (e.g. differential or latent "
                    "attention), so it keeps transformers' caches"
                )
    finally:
        if before is not None and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(before)
        elif before is not None:
            config._attn_implementation = before
        model.train(training)
    unread = [layer.index for layer in cache.oscar_layers if layer.host_length == 0]
    if len(unread) == len(cache.oscar_layers):
        return f"{cls} never writes to the OScaR cache layers it is given (its attention keeps a cache of its own)"
    err = float((ours - plain).norm() / plain.norm().clamp_min(1e-30))
    tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
    if not err <= tol:
        return (
            f"{cls}'s attention over an OScaR cache differs from transformers' with nothing quantized (relative logit "
            f"difference {err:.2g} > {tol:g}): it is not plain softmax attention over the cached keys/values (e.g. "
            "differential attention, score terms or cache reads outside the attention interface)"
        )
    return None


# generation modes that roll rejected tokens back out of the cache (crop); quantized tokens cannot be
_ROLLBACK_MODES = ("assisted_generation", "contrastive_search")


def _rollback_error(mode) -> NotImplementedError:
    return NotImplementedError(
        f"oscar_compile: generation mode {mode!r} (assistant_model= / prompt_lookup_num_tokens= / "
        "assisted or speculative decoding) rolls rejected tokens back out of the cache, which an OScaR cache "
        "cannot do once they are quantized. Generate without it, or pass transformers' cache for this call "
        "(e.g. cache=DynamicCache(), past_key_values= on transformers 5.17)."
    )


class OScaRGenerate:
    """``model.generate`` after :func:`use_oscar_cache`: transformers' own ``generate`` with an
    :class:`OScaRCache` wherever transformers would build its default cache.

    transformers decides whether a cache is used and how long it must be (``_prepare_cache_for_generation``
    receives ``generate``'s resolved settings: ``use_cache``, ``cache_implementation``, the batch after beam
    expansion, ``max_length - 1`` positions); :meth:`prepare_cache` is installed in its place and swaps the
    default ``DynamicCache`` for an OScaR one. So a cache passed in, ``use_cache=False`` (argument,
    generation config or model config), or a ``cache_implementation`` (argument or generation config) behave
    exactly as on the plain model, and ``inputs=``, ``max_length`` or no length argument at all size the cache
    as transformers sizes its own. Assisted / prompt-lookup generation is refused before generating
    (:func:`_rollback_error`).

    One cache is kept between calls (:attr:`cache`) and reset for the next call that fits it, so compiled
    graphs see the same shapes; a call that needs more positions allocates ``max(need, 2 x capacity)``
    (at most ``max_position_embeddings`` unless the call needs more): the number of distinct capacities, so
    of compiled graphs, grows with the log of the longest call. A cache the caller can still reach after a
    call (returned with ``return_dict_in_generate``) is not reused. ``max_cache_len`` fixes the capacity.

    A module-level class holding the model: ``copy.deepcopy(model)`` maps it to the copy (the copy generates
    with its own weights) and the model pickles (the kept cache is dropped from copies and pickles).
    """

    def __init__(self, model, oscar_config: OScaRConfig, max_cache_len: Optional[int], cache_kwargs: dict, inner=None):
        self.model = model
        self.oscar_config = oscar_config
        self.max_cache_len = max_cache_len
        self.cache_kwargs = dict(cache_kwargs)
        self.inner = inner  # an instance-level generate the model had before (called instead of the class's)
        self.cache: Optional[OScaRCache] = None  # kept between calls
        self._lent: list[OScaRCache] = []  # handed to calls still running

    @property
    def __wrapped__(self):  # inspect.signature / help() show transformers' generate
        return self.inner if self.inner is not None else type(self.model).generate.__get__(self.model)

    def __repr__(self) -> str:
        return f"OScaRGenerate({type(self.model).__name__}, {self.oscar_config!r}, cache={self.cache!r})"

    def __getstate__(self):
        state = dict(self.__dict__)
        state["cache"], state["_lent"] = None, []  # cache state is per process and per model
        return state

    def __call__(self, *args, **kwargs):
        depth = len(self._lent)
        out = None
        # a bits budget is allocated from this call's prompt (bit_budget.plan_layer_bits, in _lend)
        prompt = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
        self._prompt = (prompt, kwargs.get("attention_mask")) if isinstance(prompt, torch.Tensor) else None
        try:
            out = self.__wrapped__(*args, **kwargs)
            for cache in self._lent[depth:]:  # a compiled CUDA decode loop marks overflow, never raises in it
                for layer in cache.oscar_layers:
                    layer.check_overflow()
            return out
        finally:
            lent = self._lent[depth:]
            del self._lent[depth:]
            for cache in lent:
                if self.cache is None and not _exposes(out, cache):
                    self.cache = cache

    def prepare_cache(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length, *args, **kwargs):
        """Installed as the model's ``_prepare_cache_for_generation`` (same arguments)."""
        model = self.model
        if getattr(model, "_compiled_call_impl", None) is not None:
            # compiled in place (oscar.compile, nn.Module.compile): transformers' own auto-compile of the decode
            # step (CUDA, compileable cache) would wrap that compiled call in a second torch.compile whose
            # backend replaces ours (the OScaR backend then never sees the decode graphs)
            generation_config.disable_compile = True
        mode = getattr(generation_mode, "value", generation_mode)
        rollback = mode in _ROLLBACK_MODES or bool(getattr(generation_config, "is_assistant", False))
        if rollback and any(isinstance(v, OScaRCache) for v in model_kwargs.values()):
            raise _rollback_error(mode)
        before = dict(model_kwargs)
        result = type(model)._prepare_cache_for_generation(
            model, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length, *args, **kwargs
        )
        rows = batch_size * max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
        created = [k for k, v in model_kwargs.items() if isinstance(v, Cache) and before.get(k) is not v]
        if len(created) != 1 or type(model_kwargs[created[0]]) is not DynamicCache:
            for cache in model_kwargs.values():  # the caller's OScaRCache: allocated before the first forward too
                if isinstance(cache, OScaRCache):
                    self._allocate(cache, rows)
            return result  # no cache, the caller's, or one asked for by cache_implementation
        if generation_config.cache_implementation is not None:
            return result
        if rollback:
            raise _rollback_error(mode)
        need = max(int(max_cache_length), getattr(generation_config, "max_cache_len", None) or 0)
        model_kwargs[created[0]] = self._lend(need, rows)
        return result

    def _lend(self, need: int, rows: int) -> OScaRCache:
        """A reset cache for ``need`` positions and ``rows`` sequences (batch after beam / num_return_sequences
        expansion), allocated now: the kept one if it fits, else a new one (class docstring)."""
        if self.max_cache_len is not None and need > self.max_cache_len:
            raise ValueError(
                f"generate needs up to {need} cache positions (prompt + new tokens - 1) but use_oscar_cache was "
                f"given max_cache_len={self.max_cache_len}; pass a larger max_cache_len or None (sized per call)"
            )
        cache, self.cache = self.cache, None
        config = self._layer_config(cache)
        if cache is not None and cache.oscar_config != config:  # another allocation: other formats
            cache = None
        if cache is not None and cache.capacity >= need:
            cache.reset()
            cache._reserve(need)
        else:
            if self.max_cache_len is not None:
                capacity = self.max_cache_len
            elif cache is None:
                capacity = need
            else:
                limit = getattr(self.model.config.get_text_config(decoder=True), "max_position_embeddings", None)
                grown = 2 * cache.capacity if limit is None else min(2 * cache.capacity, limit)
                capacity = max(need, grown)
            cache = OScaRCache(self.model.config, need, config, capacity=capacity, **self.cache_kwargs)
        self._lent.append(cache)
        self._allocate(cache, rows)
        report = getattr(self.model, "oscar_report", None)  # oscar.compile's report lists kept layers one by one
        if report is not None and hasattr(report, "add_skipped"):
            for i, why in cache.kept_layers.items():
                report.add_skipped(f"OScaRCache.layers[{i}]", f"kept in transformers' form: {why}")
        return cache

    def _layer_config(self, kept: Optional[OScaRCache]) -> OScaRConfig:
        """The config of this call's cache: a bits budget gets its allocation from the call's prompt."""
        if not self.oscar_config.needs_allocation:
            return self.oscar_config
        from .bit_budget import plan_layer_bits

        prompt = getattr(self, "_prompt", None)
        if prompt is None:
            raise ValueError(
                f"generate with OScaRConfig(bits={self.oscar_config.bits}) (a bits budget) needs the prompt as "
                "input_ids (its allocation is decided from it)"
            )
        probe = kept if kept is not None else OScaRCache(self.model.config, 1, self.oscar_config, **self.cache_kwargs)
        quantized = [la.index for la in probe.oscar_layers]
        ids, mask = prompt
        return plan_layer_bits(self.model, ids, self.oscar_config.replace(layer_bits=None), quantized, attention_mask=mask)

    def _allocate(self, cache: OScaRCache, rows: int) -> None:
        """Allocate ``cache`` before the first forward, so under torch.compile its state is a graph input marked
        static rather than allocated inside the graph, where a cache length that changed between compiles is a
        symbolic int. A wrong guess (another dtype, or kv heads the config does not name) only reallocates."""
        if len(set(getattr(self.model, "hf_device_map", {"": 0}).values())) > 1:
            return  # layers spread over devices allocate at their first step
        text = self.model.config.get_text_config(decoder=True)
        # under tensor parallelism (tp_plan) a rank allocates its own kv heads only
        heads = local_kv_heads(self.model)
        cache.early_initialization(rows, heads, _head_dim(text), self.model.dtype, self.model.device)

    def release(self) -> None:
        """Drop the cache kept between calls (frees its memory; the next call allocates afresh)."""
        self.cache = None


def _exposes(out, cache) -> bool:
    """Whether ``generate``'s output hands ``cache`` back to the caller (e.g. ``return_dict_in_generate``)."""
    if isinstance(out, Mapping):
        return any(v is cache for v in out.values())
    return any(v is cache for v in getattr(out, "__dict__", {}).values())


def use_oscar_cache(model, oscar_config: Optional[OScaRConfig] = None, max_cache_len: Optional[int] = None, **cache_kwargs):
    """Make ``model`` attend through OScaR and ``model.generate`` use an :class:`OScaRCache` where transformers
    would build its default cache (:class:`OScaRGenerate`). Returns the model.

    ``max_cache_len`` None: sized per call as transformers sizes its own cache (one cache kept and reused
    between calls); an int: every call gets that capacity and a call that needs more raises ``ValueError``
    before generating. ``cache_kwargs``: :class:`OScaRCache` options (``quantize_sliding``). A cache passed
    explicitly (``past_key_values=`` / ``cache=``) is used as is.

    A model :func:`hf_unsupported_reason` rejects is left exactly as it was, with a ``UserWarning`` giving
    the reason. Calling it again replaces the settings (and drops the kept cache).
    """
    config = _check_oscar_config(oscar_config, "use_oscar_cache")
    if max_cache_len is not None:
        max_cache_len = _check_length("max_cache_len", max_cache_len, "use_oscar_cache")
    unknown = set(cache_kwargs) - {"quantize_sliding"}
    if unknown:
        raise TypeError(f"use_oscar_cache: unknown OScaRCache options {sorted(unknown)}; accepted: ['quantize_sliding']")
    if not isinstance(cache_kwargs.get("quantize_sliding", False), (bool, type(None))):
        raise TypeError(f"use_oscar_cache: quantize_sliding must be a bool or None, got {cache_kwargs['quantize_sliding']!r}")
    reason = hf_unsupported_reason(model, config)
    if reason is not None:
        warnings.warn(f"use_oscar_cache: model left untouched: {reason}", UserWarning, stacklevel=2)
        return model
    kept = OScaRCache(model.config, 1, config, **cache_kwargs).kept_layers  # layers only, nothing allocated
    unasked = {i: why for i, why in kept.items() if why != "sliding_attention"}  # quantize_sliding=False: asked for
    if unasked:
        listed = "; ".join(f"layer {i}: {why}" for i, why in unasked.items())
        warnings.warn(f"use_oscar_cache: {len(unasked)} layer(s) keep transformers' cache: {listed}", UserWarning, stacklevel=2)
    use_oscar_attention(model)
    current = model.__dict__.get("generate")
    inner = current.inner if isinstance(current, OScaRGenerate) else current
    wrapper = OScaRGenerate(model, config, max_cache_len, cache_kwargs, inner)
    model.generate = wrapper
    model._prepare_cache_for_generation = wrapper.prepare_cache
    return model
