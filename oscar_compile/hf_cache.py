"""``OScaRCache``: a static, compileable transformers ``Cache`` holding every attention layer in OScaR form.

Use::

    cache = OScaRCache(model.config, max_cache_len=1024, oscar_config=OScaRConfig())
    use_oscar_attention(model)                      # attn_implementation "oscar" (+ its mask function)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=64)

or :func:`use_oscar_cache` (the hook ``oscar.compile`` calls), which does both and makes ``generate``
build an ``OScaRCache`` by default.

Each attention layer holds an :class:`~oscar_compile.kv_tensor.OScaRKeyCache` /
:class:`~oscar_compile.kv_tensor.OScaRValueCache` pair in place of the bf16 ``keys``/``values`` (see that
module for the write-then-attend mapping). ``update`` records the step's tokens (``index_copy_``), the
``"oscar"`` attention function hands the halves to ``oscar::sdpa``, which attends and then appends.

* **Left padding**: pads are read from the attention mask and never stored; each prompt in a batch keeps
  the quantization groups (and so the outputs) it has alone.
* **Sliding-window layers** (Mistral, Gemma2 ``sliding_attention``) are quantized; the full history is kept
  and ``window=`` is applied in attention (same rule as transformers' mask: key ``j`` visible from query
  ``p`` iff ``p - window < j <= p``). Other layer types (chunked attention, linear attention, ...) keep
  transformers' own static layer and are listed in :attr:`OScaRCache.kept_layers`.
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

transformers 5.17 passes ``cache_kwargs`` (with ``cache_position``) to ``update`` and calls the model
with ``past_key_values=``; 5.24 passes no positions and names it ``cache=`` (``past_key_values=`` still
accepted): both are handled.
"""

from __future__ import annotations

import functools
import inspect
from typing import Optional

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import ops
from .config import OScaRConfig
from .kv_tensor import OScaRKeyCache, clear_pending, is_oscar_cache, layer_nbytes, new_kv_cache

__all__ = [
    "OScaRCache",
    "OScaRLayer",
    "oscar_attention_forward",
    "register_oscar_attention",
    "use_oscar_attention",
    "use_oscar_cache",
    "cache_kwarg_name",
]

ATTN_IMPLEMENTATION = "oscar"


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


class OScaRLayer(CacheLayerMixin):
    """One attention layer's OScaR cache (static, compileable)."""

    is_compileable = True
    is_croppable = True

    def __init__(self, max_cache_len: int, config: OScaRConfig, window: Optional[int] = None, **kwargs):
        super().__init__()
        self.requested_len = max_cache_len  # what a transformers StaticLayer would hold
        r = config.residual_length
        self.max_cache_len = -(-max_cache_len // r) * r  # capacity: rounded up to whole residual blocks
        self.config = config
        self.window = window
        self.is_sliding = window is not None
        # positions seen (left pads included), device tensor like StaticLayer so compiled code reads no int
        self.cumulative_length = torch.tensor(0, dtype=torch.int64)
        self.host_length = 0  # the same count on the host, for the overflow check
        self._host_stale = False
        self.first_step = True  # nothing stored yet: the next step decides "auto" key flags, may skip the stored pass

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # key_states: [B, Hkv, T, D]
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
        if not _is_compiling():  # static addresses: CUDA graphs capture the state in place, no input copies
            # AOTAutograd takes a subclass input's static-ness for all its inner tensors: mark the halves
            for half in (self.keys, self.values, *self._deciding):
                torch._dynamo.mark_static_address(half)
                for name in half.tensor_data_names:
                    torch._dynamo.mark_static_address(getattr(half, name))
            torch._dynamo.mark_static_address(self.cumulative_length)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
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
        keys, values = self.keys, self.values
        if self.first_step:  # a Python bool: Dynamo guards on it and replays the store
            self.first_step = False
            keys, values = self._deciding
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
        if bool(((lengths % r) < n).any()):  # host sync: crop is a host-side operation
            raise NotImplementedError(
                f"OScaR cache: cannot crop {n} tokens, some are already quantized (residual holds {(lengths % r).tolist()})"
            )
        for half in (self.keys, self.values):
            half.lengths.sub_(n)
        self.cumulative_length.sub_(n)
        self.host_length, self._host_stale = int(self.cumulative_length), False

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


def _static_layer_class(kind: str):
    """transformers' own static layer class for a layer type we do not quantize."""
    try:
        from transformers.cache_utils import STATIC_LAYER_TYPE_MAPPING

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
        quantize_sliding: quantize sliding-window layers (True) or keep them in transformers'
            bf16 ``StaticSlidingWindowLayer`` (False; reported in :attr:`kept_layers`).
    """

    def __init__(
        self,
        config,
        max_cache_len: int,
        oscar_config: Optional[OScaRConfig] = None,
        *,
        quantize_sliding: bool = True,
        **kwargs,
    ):
        self.oscar_config = oscar_config or OScaRConfig()
        self._max_cache_len = max_cache_len  # (transformers 5.17's Cache has a read-only max_cache_len)
        text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        layer_types, layer_kwargs = _layer_types(text_config)
        layers, self.kept_layers = [], {}
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        quantizable = head_dim % self.oscar_config.group_size == 0  # the layout needs whole channel groups
        for i, (kind, kw) in enumerate(zip(layer_types, layer_kwargs)):
            if not quantizable and kind in ("full_attention", "sliding_attention"):
                layers.append(_static_layer_class(kind)(max_cache_len=max_cache_len, **kw))
                self.kept_layers[i] = f"{kind} (head_dim {head_dim} not a multiple of group_size {self.oscar_config.group_size})"
            elif kind == "full_attention":
                layers.append(OScaRLayer(max_cache_len, self.oscar_config))
            elif kind == "sliding_attention" and quantize_sliding:
                layers.append(OScaRLayer(max_cache_len, self.oscar_config, window=kw["sliding_window"]))
            else:
                layers.append(_static_layer_class(kind)(max_cache_len=max_cache_len, **kw))
                self.kept_layers[i] = kind
        super().__init__(layers=layers)

    @property
    def max_cache_len(self) -> int:
        """Positions per sequence asked for (OScaR layers hold it rounded up to whole residual blocks)."""
        return self._max_cache_len

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
        """``{"oscar_bytes", "static_cache_bytes", "ratio", "kept_layers"}`` (after the first forward)."""
        ours, theirs = self.nbytes(), self.bf16_nbytes()
        return {
            "oscar_bytes": ours,
            "static_cache_bytes": theirs,
            "ratio": theirs / ours if ours else float("nan"),
            "kept_layers": dict(self.kept_layers),
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
    """transformers attention function: OScaR cache halves go to ``oscar::sdpa``; plain tensors too (softcap)
    or to transformers' SDPA. query ``[B, Hq, T, D]`` -> ``([B, T, Hq, D], None)``."""
    if is_oscar_cache(key):
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
    out = ops.sdpa(query, key, value, attention_mask, scale=scaling, softcap=softcap, is_causal=causal)
    return out.transpose(1, 2).contiguous(), None


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


def use_oscar_cache(model, oscar_config: Optional[OScaRConfig] = None, max_cache_len: Optional[int] = None, **cache_kwargs):
    """Make ``model`` attend through OScaR and ``model.generate`` use a fresh :class:`OScaRCache` by default.

    ``max_cache_len`` None: sized per call as prompt length + ``max_new_tokens`` (or ``max_length``).
    A cache passed explicitly (``past_key_values=`` / ``cache=``) is used as is. Returns the model.
    """
    use_oscar_attention(model)
    config = oscar_config or OScaRConfig()
    generate = model.generate
    if getattr(generate, "_oscar_wrapped", False):
        generate = generate.__wrapped__

    @functools.wraps(generate)
    def oscar_generate(*args, **kwargs):
        if kwargs.get("past_key_values") is None and kwargs.get("cache") is None:
            length = max_cache_len
            if length is None:
                inputs = kwargs.get("input_ids", args[0] if args else None)
                if inputs is None:
                    inputs = kwargs.get("inputs_embeds")
                gen_cfg = kwargs.get("generation_config") or model.generation_config
                new = kwargs.get("max_new_tokens", gen_cfg.max_new_tokens)
                length = inputs.shape[1] + new if new is not None else kwargs.get("max_length", gen_cfg.max_length)
            kwargs[cache_kwarg_name(model)] = OScaRCache(model.config, length, config, **cache_kwargs)
        return generate(*args, **kwargs)

    oscar_generate._oscar_wrapped = True
    model.generate = oscar_generate
    return model
