"""One layer's OScaR KV cache as a pair of torchao-style tensor subclasses.

A bf16 static cache is two tensors ``keys``/``values`` ``[B, Hkv, max_len, D]`` that model code writes with
``index_copy_`` (or ``k[:, :, pos] = k_new`` / slice assignment), expands for GQA (``repeat_kv``) and feeds
to attention. :class:`OScaRKeyCache` and :class:`OScaRValueCache` stand in for them: same logical shape and
dtype, but they hold the packed OScaR state (the :class:`~oscar_compile.kernels.CacheTensors` fields,
split by side), so the bf16 cache is never allocated.

Write-then-attend vs attend-then-append
---------------------------------------
Model code writes the step's keys/values into the cache *before* attention; OScaR's step is attention over
the stored history plus the step's own tokens at full precision, *then* quantize-on-write (DESIGN §2, the
reference rule: a step's queries see ``fake_quantize(history before the step)`` plus the step's tokens
exactly). The mapping chosen here:

* a **write** stores nothing: it records the step's new keys (or values) and their positions as *pending*
  on the half written to (a plain Python dict shared with the views made from it);
* **attention** (``torch.ops.oscar.sdpa`` with the halves as key/value, reached from
  ``F.scaled_dot_product_attention`` or from the ``"oscar"`` transformers attention function) consumes the
  pending tokens: attention over the stored cache plus the pending tokens, then append of the same tokens,
  as one ``oscar::attend_append`` op (two ops would make Inductor copy the cache every step).

So the numerics equal the reference rule by construction. The pending dict is plain Python state: under
``torch.compile`` both the write and the attention run inside one traced forward (Dynamo records them as
ops on the subclass; AOTAutograd runs both ``__torch_dispatch__`` handlers in one trace), so the pending
tensors become direct graph edges; nothing crosses a graph boundary. A layer whose pending tokens are never
attended (its attention fell back to dequantize) raises at the next write instead of silently dropping
tokens.

Adaptive key flags (``OScaRConfig`` ``rotate_keys``/``token_scaling`` "auto"): the per-kv-head flags
``key_rotated``/``key_scaled`` are decided at the layer's first step, from that step's new keys and queries
(``oscar::choose_key_flags``, left pads moved out of the way), and written in place *before* the step
attends and appends; they never change while the layer stores a token. The static attribute
``key_decision`` (None, or the config's ``(rotate_keys, token_scaling)``) says whether an instance decides:
an attended write of at least ``group_size`` tokens through an instance with ``key_decision`` set computes
the choice and writes it only if the layer holds no token yet (a device-side check, no host sync; fewer
than ``group_size`` keys would give ``OScaRConfig.initial_key_flags``, which the flags already hold).
``OScaRLayer`` (``hf_cache``) hands out an instance with ``key_decision`` set for the first step only (a
host-side bool on the layer), so decode steps never run the choice; bare halves from :func:`new_kv_cache`
keep it set, and their later multi-token steps compute a choice the device-side check discards.
A batch shares one decision (the flags are ``[Hkv]``): under "auto" a prompt batched with others may get
other flags (so other outputs) than alone.

Left padding: the write does not know which tokens are padding; the attention reads it from the mask it
is given (a pad position is one the mask forbids on the diagonal, i.e. a token that may not attend to
itself) and passes ``skip`` to both ops, so pads are never stored. ``offsets[b]`` (the pads skipped) maps
stored slot ``j`` to logical position ``offsets[b] + j`` for the exact dequantize.

Sliding-window layers: ``window`` (int or None) is passed to ``oscar::attention``; the history is kept
whole (quantized), the window is applied in attention.

Any other op falls back to an exact dequantize of the logical tensor (stored tokens dequantized at their
logical positions, zeros elsewhere) with a one-time warning naming the op. It raises
``NotImplementedError`` while a step's tokens are pending (the model attends some other way, e.g. eager
matmul attention, and the tokens would never be stored), and for in-place ops other than the writes.
Dtype conversions (``k.to(torch.bfloat16)``, ``k.half()``, ``k.float()``) take that route and return a plain
tensor of the asked dtype; a device move alone (``k.to("cuda")``) moves the state and stays a cache.
``k[:, :, i]`` (an int on the token dim) is a one-token view: reads dequantize, and ``k[:, :, i] = x``
writes like ``k[:, :, i:i + 1] = x[:, :, None]``.

Fields (``G`` group size, ``R`` residual length, ``M`` max_len, a multiple of ``R``):

=============== ================================ ======= ========== ==================================
field           shape                            dtype   half       meaning
=============== ================================ ======= ========== ==================================
key_codes       ``[B, Hkv, M * bits // 8, D]``   uint8   keys       packed along tokens
key_mn          ``[B, Hkv, M // G, D]``          fp16    keys       key group minimum
key_scale       ``[B, Hkv, M // G, D]``          fp16    keys       key group step
key_norms       ``[B, M]``                       fp32    keys       omni-token key norm
residual_keys   ``[B, Hkv, R, D]``               model   keys       newest keys, full precision
key_rotated     ``[Hkv]``                        bool    keys       per-head key rotation flag
key_scaled      ``[Hkv]``                        bool    keys       per-head key scaling flag
value_codes     ``[B, Hkv, M, D * bits // 8]``   uint8   values     packed along channels
value_mn        ``[B, Hkv, M, D // G]``          fp16    values     value group minimum
value_scale     ``[B, Hkv, M, D // G]``          fp16    values     value group step
residual_values ``[B, Hkv, R, D]``               model   values     newest values, full precision
lengths         ``[B]``                          int32   both       tokens stored per sequence
offsets         ``[B]``                          int32   both       left pads skipped per sequence
=============== ================================ ======= ========== ==================================

Each half keeps its own ``lengths``/``offsets`` (the value half's are copied from the key half's after
every append) so the two subclass instances never share storage.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .quiet_import import quiet_torchao_import

with quiet_torchao_import():
    from torchao.utils import TorchAOBaseTensor

from . import ops  # noqa: E402  (after torchao's quiet import)
from .config import OScaRConfig, initial_key_flags
from .kernels.cache_layout import CacheFormat, CacheTensors, allocate_cache
from .kernels.quantization import QuantizedKeys, QuantizedValues, dequantize_keys, dequantize_values

__all__ = ["OScaRKeyCache", "OScaRValueCache", "KVView", "new_kv_cache", "kv_cache_from_hp", "is_oscar_cache"]

aten = torch.ops.aten


class KVView(NamedTuple):
    """Which logical view of the layer's cache a subclass instance is (views share the state).

    ``n_rep`` > 1: GQA-expanded (``repeat_kv``); ``five_d``: the intermediate ``[B, Hkv, n_rep, T, D]``
    of ``repeat_kv``; ``start``/``stop``: token range along dim 2 (``k[:, :, a:b]``); ``squeeze``: the
    token dim is indexed away (``k[:, :, i]``, ``stop == start + 1``): the shape lacks it; ``transposed``:
    the halves stand in for a ``[B, S, Hkv, D]`` buffer (Meta's reference Llama layout; shape
    ``[B, T, Hkv, D]``), a read-only stand-in: every op on it reads the dequantized contents and in-place
    ops raise (a write through a slice of it lands in that copy); the graph pass replaces the model's writes
    and attention on it by ``cache_step``.
    """

    n_rep: int
    five_d: bool
    start: int
    stop: int
    squeeze: bool = False
    transposed: bool = False


# ----------------------------------------------------------------------------------------------------
# pending tokens (write -> attention): a plain dict on each instance, shared with the views made from it.
# Not a flattened attribute: Dynamo would guard on it (a recompile for every new cache), and AOTAutograd
# re-creates the instances for each trace anyway, so writes and the attention of one trace share it.


def _sources_hash() -> str:
    import hashlib
    import pathlib

    here = pathlib.Path(__file__).parent
    return hashlib.sha256(b"".join((here / name).read_bytes() for name in ("kv_tensor.py", "ops.py"))).hexdigest()[:16]


_SOURCES_HASH = _sources_hash()


def _is_real(t: torch.Tensor) -> bool:
    """A tensor of an eager step (not a fake/functional tensor of a trace)."""
    return type(t) is torch.Tensor and not t.is_meta and not torch._is_functional_tensor(t)


def _record(half: "_OScaRHalf", new: torch.Tensor, positions: torch.Tensor) -> None:
    stale = half._pending.get("new")
    if stale is not None and _is_real(stale[0]):
        raise RuntimeError(
            f"OScaR cache: the previous step's {half.role} were written but never attended through "
            "torch.ops.oscar.sdpa (the layer's attention fell back to dequantize), so they were never stored. "
            "Route the layer's attention through F.scaled_dot_product_attention or attn_implementation='oscar'."
        )
    # a stale fake/functional entry is left over from an aborted trace: replace it
    half._pending["new"] = (new, positions)


def _take(half: "_OScaRHalf"):
    return half._pending.pop("new", None)


def _peek(half: "_OScaRHalf"):
    return half._pending.get("new")


def clear_pending(half: "_OScaRHalf") -> None:
    half._pending.clear()


# ----------------------------------------------------------------------------------------------------
# the subclasses

# key_decision: None, or the config's (rotate_keys, token_scaling) while this instance decides the "auto" flags;
# stored_empty: the holder promises the layer stores no token when this instance is attended (first step);
# seq_len: logical positions of the root view (<= the capacity, which is whole residual blocks)
_ATTRS = [
    "bits", "group_size", "residual_length", "rotate_values", "window", "key_decision", "stored_empty", "seq_len",
    "view",
]  # fmt: skip


class _OScaRHalf(TorchAOBaseTensor):
    """Shared behaviour of the key and value halves (not instantiated)."""

    role: str
    tensor_attribute_names = _ATTRS

    def __new__(cls, *args):
        n = len(cls.tensor_data_names)
        tensors, attrs = args[:n], args[n:]
        residual = tensors[cls.tensor_data_names.index(cls._residual_name)]
        b, hkv, _, d = residual.shape
        view = KVView(*attrs[-1])
        t = view.stop - view.start
        shape = (b, hkv, view.n_rep, t, d) if view.five_d else (b, hkv * view.n_rep, t, d)
        shape = shape[:-2] + shape[-1:] if view.squeeze else shape
        shape = (shape[0], shape[2], shape[1], shape[3]) if view.transposed else shape
        self = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=residual.dtype, device=residual.device)
        for name, value in zip(cls.tensor_data_names, tensors):
            setattr(self, name, value)
        for name, value in zip(cls.tensor_attribute_names, attrs):
            setattr(self, name, value)
        self.view = view
        self._pending = {}
        return self

    def __init__(self, *args):
        pass

    # -- helpers -------------------------------------------------------------------------------------
    @property
    def max_len(self) -> int:
        """Logical positions of the root view (``seq_len``); the state holds ``capacity >= max_len`` slots."""
        return self.seq_len

    @property
    def capacity(self) -> int:
        """Token slots of the state: ``max_len`` rounded up to whole residual blocks."""
        return self._max_len()

    @property
    def fmt(self) -> CacheFormat:
        return CacheFormat(self.bits, self.group_size, self.residual_length, self.rotate_values)

    @property
    def is_root(self) -> bool:
        return self.view._replace(transposed=False) == KVView(1, False, 0, self.seq_len)

    def _with_view(self, view: KVView, **changes):
        tensors = [getattr(self, n) for n in self.tensor_data_names]
        attrs = [changes.get(n, getattr(self, n)) for n in self.tensor_attribute_names[:-1]]
        out = type(self)(*tensors, *attrs, view)
        out._pending = self._pending  # views see the tokens written through the cache they come from
        return out

    def with_key_decision(self, decision):
        """This instance (same state, same pending tokens) with ``key_decision`` set to ``decision``."""
        return self._with_view(self.view, key_decision=None if decision is None else tuple(decision))

    def with_stored_empty(self, stored_empty: bool):
        """This instance with the ``stored_empty`` promise set: only for a step that starts on an empty
        layer (every sequence's ``lengths == 0``); a long step then skips the stored-token pass."""
        return self._with_view(self.view, stored_empty=bool(stored_empty))

    def _stable_hash_for_caching(self) -> str:
        # Inductor/AOT cache keys see this string, not the dispatch code below: the sources' hash makes a
        # compiled artifact go stale when this module or the ops change
        attrs = {n: getattr(self, n) for n in self.tensor_attribute_names}
        return f"{type(self).__qualname__}{sorted(attrs.items())!r}{_SOURCES_HASH}"

    def nbytes_quantized(self) -> int:
        """Exact bytes held by this half's inner tensors."""
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in self.tensor_data_names)

    def _stored_slots(self) -> torch.Tensor:
        """Every storage slot dequantized, fp32 ``[B, Hkv, M, D]`` (slots >= Q hold garbage)."""
        raise NotImplementedError

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The logical tensor this view stands for, as a plain tensor (exact; no host sync).

        Stored tokens are dequantized at their logical positions (``offsets[b] + slot``), tokens written
        this step and not yet attended (pending) are placed at full precision; other positions are 0.
        """
        if self.view.squeeze:  # k[:, :, i]: the one-token slice without its token dim
            return self._with_view(self.view._replace(squeeze=False)).dequantize(dtype).squeeze(-2)
        if self.view.transposed:  # a [B, S, Hkv, D] buffer's stand-in
            return self._with_view(self.view._replace(transposed=False)).dequantize(dtype).transpose(1, 2).contiguous()
        dtype = dtype or self.dtype
        m, cap, r = self.seq_len, self._max_len(), self.residual_length
        residual = getattr(self, self._residual_name)
        b, hkv, _, d = residual.shape
        lengths = self.lengths.to(torch.int64)[:, None]
        n_quant = lengths // r * r
        slot = torch.arange(m, device=residual.device)[None, :] - self.offsets.to(torch.int64)[:, None]  # [B, M]
        in_quant = (slot >= 0) & (slot < n_quant)
        in_res = (slot >= n_quant) & (slot < lengths)
        idx_q = slot.clamp(0, cap - 1)[:, None, :, None].expand(b, hkv, m, d)
        idx_r = (slot - n_quant).clamp(0, r - 1)[:, None, :, None].expand(b, hkv, m, d)
        quant = self._stored_slots().gather(2, idx_q)
        res = residual.to(torch.float32).gather(2, idx_r)
        full = torch.where(in_quant[:, None, :, None], quant, torch.where(in_res[:, None, :, None], res, 0.0))
        pending = _peek(self)
        if pending is not None:
            new, positions = pending
            full = full.index_copy(2, positions, new.to(torch.float32))
        full = full.to(dtype)
        v = self.view
        full = full[:, :, v.start : v.stop]
        if v.five_d:
            return full[:, :, None].expand(b, hkv, v.n_rep, v.stop - v.start, d)
        if v.n_rep > 1:
            return full[:, :, None].expand(b, hkv, v.n_rep, v.stop - v.start, d).reshape(b, hkv * v.n_rep, -1, d)
        return full

    @classmethod
    def __torch_dispatch__(cls, func, types, args, kwargs=None):
        kwargs = kwargs or {}
        table = cls._ATEN_OP_TABLE.get(cls, {})
        if any(isinstance(a, _OScaRHalf) and a.view.transposed for a in args) and not _keeps_transposed(func, args):
            return _transposed_op(func, args, kwargs)
        if func in table:
            return table[func](func, types, args, kwargs)
        return _fallback(func, args, kwargs)


class OScaRKeyCache(_OScaRHalf):
    """Key half of one layer's OScaR cache; logical ``[B, Hkv, max_len, D]`` in the model dtype."""

    role = "keys"
    _residual_name = "residual_keys"
    tensor_data_names = [
        "key_codes",
        "key_mn",
        "key_scale",
        "key_norms",
        "residual_keys",
        "key_rotated",
        "key_scaled",
        "lengths",
        "offsets",
    ]
    tensor_attribute_names = _ATTRS

    def _max_len(self) -> int:
        return self.key_norms.shape[1]

    def _stored_slots(self) -> torch.Tensor:
        q = QuantizedKeys(
            self.key_codes, self.key_mn, self.key_scale, self.key_norms, self.key_rotated, self.key_scaled,
            self.bits, self.group_size,
        )  # fmt: skip
        return dequantize_keys(q, torch.float32)


class OScaRValueCache(_OScaRHalf):
    """Value half of one layer's OScaR cache; logical ``[B, Hkv, max_len, D]`` in the model dtype."""

    role = "values"
    _residual_name = "residual_values"
    tensor_data_names = ["value_codes", "value_mn", "value_scale", "residual_values", "lengths", "offsets"]
    tensor_attribute_names = _ATTRS

    def _max_len(self) -> int:
        return self.value_codes.shape[2]

    def _stored_slots(self) -> torch.Tensor:
        q = QuantizedValues(self.value_codes, self.value_mn, self.value_scale, self.rotate_values, self.bits, self.group_size)
        return dequantize_values(q, torch.float32)


_HALVES = (OScaRKeyCache, OScaRValueCache)


def is_oscar_cache(t) -> bool:
    return isinstance(t, _HALVES)


def cache_tensors(keys: OScaRKeyCache, values: OScaRValueCache) -> CacheTensors:
    """The :class:`CacheTensors` of a layer from its two halves (the key half's ``lengths``)."""
    return CacheTensors(
        keys.key_codes, keys.key_mn, keys.key_scale, keys.key_norms,
        values.value_codes, values.value_mn, values.value_scale,
        keys.residual_keys, values.residual_values, keys.lengths, keys.key_rotated, keys.key_scaled,
    )  # fmt: skip


def new_kv_cache(
    batch: int,
    kv_heads: int,
    max_len: int,
    head_dim: int,
    config: OScaRConfig,
    dtype: torch.dtype,
    device=None,
    window: Optional[int] = None,
    *,
    exact_len: bool = False,
    transposed: bool = False,
) -> tuple[OScaRKeyCache, OScaRValueCache]:
    """Allocate one layer's empty cache as ``(keys, values)`` halves.

    The state holds ``max_len`` rounded up to a multiple of ``config.residual_length`` token slots; the
    halves' logical length (``shape[2]``) is that rounded length, or ``max_len`` itself with
    ``exact_len=True`` (a stand-in for a ``[B, Hkv, max_len, D]`` buffer the model indexes by position).
    ``transposed=True``: the halves stand in for a ``[B, max_len, Hkv, D]`` buffer (``KVView.transposed``).
    ``window``: sliding-window size of the layer (None for full attention). Key flags start at
    ``config.initial_key_flags``; with "auto" the halves decide them at their first attended step (module
    docstring).
    """
    r = config.residual_length
    m = config.capacity(max_len)
    length = max_len if exact_len else m
    fmt = config.cache_format
    rotate0, scale0 = config.initial_key_flags  # "auto": what choose_key_flags gives before it sees a group
    c = allocate_cache(batch, kv_heads, m, head_dim, fmt, dtype, device, rotate0, scale0)
    offsets = torch.zeros(batch, dtype=torch.int32, device=device)
    decision = (config.rotate_keys, config.token_scaling) if config.adaptive_keys else None
    view = KVView(1, False, 0, length, False, bool(transposed))
    attrs = [fmt.bits, fmt.group_size, r, fmt.rotate_values, window, decision, False, length, view]
    keys = OScaRKeyCache(
        c.key_codes, c.key_mn, c.key_scale, c.key_norms, c.residual_keys, c.key_rotated, c.key_scaled,
        c.lengths, offsets, *attrs,
    )  # fmt: skip
    values = OScaRValueCache(
        c.value_codes, c.value_mn, c.value_scale, c.residual_values, c.lengths.clone(), offsets.clone(), *attrs
    )
    return keys, values


def kv_cache_from_hp(
    keys: torch.Tensor,
    values: torch.Tensor,
    config: OScaRConfig,
    max_len: int,
    window: Optional[int] = None,
) -> tuple[OScaRKeyCache, OScaRValueCache]:
    """A layer's cache holding the history ``keys``/``values`` ``[B, Hkv, T, D]`` (quantized as OScaR
    would have written it: whole residual blocks quantized, the tail full precision). Logical shape
    ``[B, Hkv, max_len, D]``; dtype of ``keys``. With "auto" the key flags are decided from ``keys`` (no
    queries), as ``fake_quantize(keys, values, config, prompt_length=T)`` does for batch 1."""
    b, h, t, d = keys.shape
    k_cache, v_cache = new_kv_cache(b, h, max(max_len, t), d, config, keys.dtype, keys.device, window)
    if k_cache.key_decision is not None:
        flags = ops.choose_key_flags(keys, None, None, config.bits, config.group_size, *k_cache.key_decision)
        ops.refresh_key_flags(k_cache.key_rotated, k_cache.key_scaled, k_cache.lengths, *flags)
        k_cache, v_cache = k_cache.with_key_decision(None), v_cache.with_key_decision(None)
    ops.append_kv(cache_tensors(k_cache, v_cache), k_cache.fmt, keys, values)
    v_cache.lengths.copy_(k_cache.lengths)
    return k_cache, v_cache


def layer_nbytes(keys: OScaRKeyCache, values: OScaRValueCache) -> int:
    """Exact bytes of one layer's OScaR state (both halves)."""
    return keys.nbytes_quantized() + values.nbytes_quantized()


def layer_slots(keys: OScaRKeyCache) -> int:
    """Key and value element slots one layer's OScaR state allocates, ``2 * B * Hkv * capacity * D``:
    ``8 * layer_nbytes / layer_slots`` is the exact bits per element it holds."""
    b, hkv, _, d = keys.residual_keys.shape
    return 2 * b * hkv * keys.capacity * d


# ops that keep a transposed view (``KVView.transposed``) a cache; every other op on one goes to
# _transposed_op
_TRANSPOSED_OPS = {aten.alias.default, aten.detach.default, aten.clone.default, aten._to_copy.default}


def _keeps_transposed(func, args) -> bool:
    # copy_ between two caches (AOTAutograd's write-back of a mutated cache input) copies the state
    return func in _TRANSPOSED_OPS or (func is aten.copy_.default and isinstance(args[1], _HALVES))


def _transposed_op(func, args, kwargs):
    """An op on a transposed view: a read of the dequantized ``[B, S, Hkv, D]`` contents. An in-place op only
    during Dynamo's shape propagation (the graph pass replaces the model's writes), where it returns its
    target; anywhere else it raises like every unsupported in-place op."""
    halves = [x for x in args if isinstance(x, _HALVES)]
    shapes_only = any(type(getattr(x, x._residual_name)) is torch._subclasses.FakeTensor for x in halves)
    if func._schema.is_mutable and shapes_only and isinstance(args[0], _HALVES):
        return args[0]
    return _fallback(func, args, kwargs)


# ----------------------------------------------------------------------------------------------------
# op table


def _implements(ops_):
    def deco(fn):
        for cls in _HALVES:
            cls.implements(ops_)(fn)
        return fn

    return deco


def _implements_torch_function(fns):
    def deco(fn):
        for cls in _HALVES:
            cls.implements_torch_function(fns)(fn)
        return fn

    return deco


_warned: set[str] = set()


def _fallback(func, args, kwargs):
    name = str(func)
    if func._schema.is_mutable:
        raise NotImplementedError(
            f"OScaR cache: in-place op {name} is not supported on the quantized cache "
            f"(writes are index_copy_, index_put_ and slice assignment; arg types {[type(a).__name__ for a in args]})"
        )
    halves = [x for x in list(args) + list(kwargs.values()) if isinstance(x, _HALVES)]
    # Dynamo's shape propagation (plain fake inner tensors, no functionalization): the graph pass replaces
    # these reads (or refuses the graph), so they only need shapes here; eager calls and AOT traces check
    shapes_only = any(type(getattr(x, x._residual_name)) is torch._subclasses.FakeTensor for x in halves)
    pending = [x for x in halves if _peek(x) is not None]
    if pending and not shapes_only:
        # the model reads the cache some other way than attention (e.g. eager matmul attention): the step's
        # tokens would never be attended+appended, so later steps would silently miss them
        raise NotImplementedError(
            f"OScaR cache: {name} reads the cache while this step's {pending[0].role} are pending (written, not "
            "yet attended). Attention over an OScaR cache must go through F.scaled_dot_product_attention or "
            "attn_implementation='oscar' (oscar_compile.hf_cache.use_oscar_attention)."
        )
    if name not in _warned and not shapes_only:
        _warned.add(name)
        warnings.warn(
            f"OScaR cache: {name} is not an OScaR op; falling back to an exact dequantize of the cache "
            "(slow: materializes the full-precision cache)",
            stacklevel=2,
        )

    def plain(x):
        return x.dequantize() if isinstance(x, _HALVES) else x

    args = torch.utils._pytree.tree_map(plain, args)
    kwargs = torch.utils._pytree.tree_map(plain, kwargs)
    return func(*args, **kwargs)


def _positions(index: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    if index.dim() != 1 or index.shape[0] != source.shape[2]:
        raise ValueError(f"cache write: positions {tuple(index.shape)} do not match the new tokens {tuple(source.shape)}")
    return index


def _check_write_target(half: _OScaRHalf, source: torch.Tensor, what: str) -> None:
    v = half.view
    if v.n_rep != 1 or v.five_d:
        raise NotImplementedError(f"OScaR cache: {what} into a GQA-expanded view of the cache")
    b, h, _, d = getattr(half, half._residual_name).shape
    if source.dim() != 4 or (source.shape[0], source.shape[1], source.shape[3]) != (b, h, d):
        raise ValueError(f"OScaR cache: {what} of {tuple(source.shape)} into a cache of [B={b}, Hkv={h}, *, D={d}]")


@_implements([aten.index_copy_.default])
def _(func, types, args, kwargs):
    self, dim, index, source = args
    if dim not in (2, -2) or not self.is_root:
        raise NotImplementedError(f"OScaR cache: index_copy_ along dim {dim} (tokens are dim 2) of view {self.view}")
    _check_write_target(self, source, "index_copy_")
    _record(self, source, _positions(index, source))
    return self


@_implements([aten.index_put_.default])
def _(func, types, args, kwargs):
    self, indices, values = args[:3]
    accumulate = args[3] if len(args) > 3 else kwargs.get("accumulate", False)
    indices = list(indices) + [None] * (4 - len(indices))
    ok = (
        not accumulate
        and self.is_root
        and indices[0] is None
        and indices[1] is None
        and indices[3] is None
        and indices[2] is not None
        and indices[2].dim() == 1
        and not indices[2].dtype == torch.bool
    )
    if not ok:
        raise NotImplementedError(
            "OScaR cache: index_put_ is supported only as cache[:, :, positions] = new (positions a 1-D int tensor)"
        )
    if 0 < values.dim() < 4:  # Python's setitem strips the value's leading size-1 dims (batch 1)
        values = values.reshape((1,) * (4 - values.dim()) + tuple(values.shape))
    _check_write_target(self, values, "index_put_")
    _record(self, values, _positions(indices[2], values))
    return self


@_implements([aten.copy_.default])
def _(func, types, args, kwargs):
    self, src = args[0], args[1]
    if isinstance(src, _HALVES):  # whole-cache copy between two caches of the same layout
        if type(src) is not type(self) or not (self.is_root and src.is_root):
            raise NotImplementedError(f"OScaR cache: copy_ between {self.view} and {getattr(src, 'view', None)}")
        for name in self.tensor_data_names:
            getattr(self, name).copy_(getattr(src, name))
        return self
    v = self.view
    if v.n_rep != 1 or v.five_d:
        raise NotImplementedError("OScaR cache: copy_ into a GQA-expanded view of the cache")
    if v.squeeze and src.dim() <= 3:  # k[:, :, i] = x, x [B, Hkv, D] (setitem strips leading size-1 dims)
        src = src.reshape((1,) * (3 - src.dim()) + tuple(src.shape)).unsqueeze(2)
    _check_write_target(self, src, "slice assignment")
    if src.shape[2] != v.stop - v.start:
        raise ValueError(f"OScaR cache: slice assignment of {src.shape[2]} tokens into [{v.start}, {v.stop})")
    root = self._with_view(KVView(1, False, 0, self.seq_len))
    _record(root, src, torch.arange(v.start, v.stop, device=src.device))
    return self


@_implements([aten.slice.Tensor])
def _(func, types, args, kwargs):
    self, dim = args[0], args[1] if len(args) > 1 else kwargs.get("dim", 0)
    start = args[2] if len(args) > 2 else kwargs.get("start", None)
    end = args[3] if len(args) > 3 else kwargs.get("end", None)
    step = args[4] if len(args) > 4 else kwargs.get("step", 1)
    v = self.view
    if v.squeeze:  # k[:, :, i][...]: a plain read
        return _fallback(func, args, kwargs)
    ndim = 5 if v.five_d else 4
    dim = dim % ndim
    size = self.shape[dim]
    start = 0 if start is None else (start + size if start < 0 else min(start, size))
    end = size if end is None else (end + size if end < 0 else min(end, size))
    if step == 1 and start == 0 and end == size:
        return self._with_view(v)
    if step == 1 and dim == ndim - 2:
        return self._with_view(KVView(v.n_rep, v.five_d, v.start + start, v.start + end))
    return _fallback(func, args, kwargs)


@_implements([aten.unsqueeze.default])
def _(func, types, args, kwargs):
    self, dim = args
    v = self.view
    if v.squeeze:  # k[:, :, i].unsqueeze(2) is k[:, :, i:i + 1]; other dims: a plain read
        if dim % (self.dim() + 1) == self.dim() - 1:
            return self._with_view(v._replace(squeeze=False))
        return _fallback(func, args, kwargs)
    if not v.five_d and v.n_rep == 1 and dim == 2:
        return self._with_view(KVView(1, True, v.start, v.stop))
    return _fallback(func, args, kwargs)


@_implements([aten.expand.default])
def _(func, types, args, kwargs):
    self, size = args[0], list(args[1])
    v = self.view
    if v.five_d and len(size) == 5 and not v.squeeze:
        want = list(self.shape)
        n = size[2]
        if all(s in (-1, w) for i, (s, w) in enumerate(zip(size, want)) if i != 2) and (v.n_rep == 1 or n == v.n_rep):
            return self._with_view(KVView(n, True, v.start, v.stop))
    if len(size) == self.dim() and all(s == -1 or s == w for s, w in zip(size, self.shape)):
        return self._with_view(v)
    return _fallback(func, args, kwargs)


@_implements([aten.view.default, aten._unsafe_view.default, aten.reshape.default])
def _(func, types, args, kwargs):
    self, size = args[0], list(args[1])
    v = self.view
    b, h = self.shape[0], self.shape[1]
    t, d = v.stop - v.start, self.shape[-1]
    if v.five_d and not v.squeeze and size in ([b, h * v.n_rep, t, d], [b, -1, t, d], [b, h * v.n_rep, -1, d]):
        return self._with_view(KVView(v.n_rep, False, v.start, v.stop))
    if size == list(self.shape):
        return self._with_view(v)
    return _fallback(func, args, kwargs)


@_implements([aten.select.int])
def _(func, types, args, kwargs):
    # k[:, :, i]: a view of one token without the token dim (writable like k[:, :, i:i + 1]); other dims: a read
    self, dim, index = args
    v = self.view
    if v.squeeze or dim % self.dim() != self.dim() - 2:
        return _fallback(func, args, kwargs)
    size = v.stop - v.start
    if not -size <= index < size:
        raise IndexError(f"index {index} is out of bounds for dimension {dim} with size {size}")
    i = v.start + index % size
    return self._with_view(v._replace(start=i, stop=i + 1, squeeze=True))


_device_moves = {cls: cls._ATEN_OP_TABLE[cls][aten._to_copy.default] for cls in _HALVES}  # torchao's: state moves


@_implements([aten._to_copy.default])
def _(func, types, args, kwargs):
    # k.to(dtype) / k.half() / k.float(): a plain tensor of that dtype holding the dequantized logical contents
    # (through _fallback: refused while tokens are pending). A device move alone keeps the cache (state moved).
    self = args[0]
    dtype = kwargs.get("dtype")
    if dtype is not None and dtype != self.dtype:
        return _fallback(func, args, kwargs)
    return _device_moves[type(self)](func, types, args, kwargs)


@_implements([aten.alias.default, aten.detach.default])
def _(func, types, args, kwargs):
    return args[0]._with_view(args[0].view)


@_implements([aten.clone.default])
def _(func, types, args, kwargs):
    self = args[0]
    if not self.is_root:
        # a view (e.g. from repeat_kv) is never written: its logical content is the state, no copy needed
        return self._with_view(self.view)
    return self._apply_fn_to_data(lambda x: x.clone())


def decide_key_flags(keys: OScaRKeyCache, new_keys: Optional[torch.Tensor], query, skip=None) -> None:
    """The one place a layer's "auto" key flags are decided (module docstring, "Adaptive key flags").

    keys: the layer's key half; new_keys ``[B, Hkv, T, D]`` and query ``[B, Hq, T, D]`` of the step, skip
    ``[B]`` left pads or None. Written into ``keys.key_rotated``/``key_scaled`` only while the layer stores
    no token (device-side check). A step of fewer than ``group_size`` keys offers the initial flags (what
    the choice gives for so few keys) without running it. A no-op for halves that do not decide.
    """
    if keys.key_decision is None or new_keys is None:
        return
    t = new_keys.shape[2]
    if isinstance(t, int) and t < keys.group_size:
        rotated, scaled = initial_key_flags(*keys.key_decision)
    else:  # a symbolic T (dynamic prompt lengths) may be either
        rotated, scaled = ops.choose_key_flags(new_keys, query, skip, keys.bits, keys.group_size, *keys.key_decision)
    ops.refresh_key_flags(keys.key_rotated, keys.key_scaled, keys.lengths, rotated, scaled)


def mark_static_state(*halves: "_OScaRHalf") -> None:
    """Static addresses and shapes for cache halves and their inner tensors: CUDA graphs capture the state in
    place (AOTAutograd takes a subclass input's static-ness for all its inner tensors), and a second cache
    length never becomes a symbolic dim, which the subclass's wrapper shape cannot hold. Call outside tracing."""
    for half in halves:
        for t in (half, *(getattr(half, name) for name in half.tensor_data_names)):
            torch._dynamo.mark_static_address(t)
            torch._dynamo.mark_static(t)


def attend_halves(query, keys, values, new_keys=None, new_values=None, skip=None, *, scale=None, softcap=None,
                  window=None, append=True, stored_empty=False):  # fmt: skip
    """A step over a layer's halves: ``query`` ``[B, Hq, T, D]`` attends to the stored tokens plus ``new_*``
    ``[B, Hkv, T, D]``; with ``append`` the same op then appends them (``oscar::attend_append``, one op, so
    Inductor re-inplaces the append) and the value half's lengths/offsets follow the key half's."""
    cache = cache_tensors(keys, values)
    if new_keys is None or not append:
        return ops.attention(query, cache, keys.fmt, new_keys, new_values, skip, scale=scale, softcap=softcap, window=window)
    out = ops.attend_append(
        query, cache, keys.fmt, new_keys, new_values, skip, scale=scale, softcap=softcap, window=window,
        stored_empty=stored_empty,
    )  # fmt: skip
    if skip is not None:
        keys.offsets.add_(skip)
    values.lengths.copy_(keys.lengths)
    values.offsets.copy_(keys.offsets)
    return out


def cache_sdpa(query, keys, values, attn_mask=None, scale=None, softcap=None):
    """``oscar::sdpa`` over a layer's cache halves: attend to stored + pending tokens, then append them."""
    if not (isinstance(keys, OScaRKeyCache) and isinstance(values, OScaRValueCache)):
        raise TypeError(f"cache_sdpa needs (OScaRKeyCache, OScaRValueCache), got {type(keys).__name__}, {type(values).__name__}")
    pk, pv = _take(keys), _take(values)
    if (pk is None) != (pv is None):
        raise RuntimeError("OScaR cache: keys were written this step but not values (or the reverse)")
    new_k, positions = pk if pk is not None else (None, None)
    new_v = pv[0] if pv is not None else None
    b, hkv = keys.residual_keys.shape[:2]
    q = query
    packed = new_k is not None and new_k.shape[2] == 1 and q.shape[2] > 1 and q.shape[1] == hkv
    if packed:  # transformers' pack_gqa: [B, Hq, 1, D] reshaped to [B, Hkv, n_rep, D]
        q = q.reshape(b, hkv * q.shape[2], 1, q.shape[-1])
    skip = None
    if attn_mask is not None and new_k is not None:
        skip = ops.left_pads(attn_mask, positions, b)
    decide_key_flags(keys, new_k, q, skip)  # before the step attends and appends
    out = attend_halves(q, keys, values, new_k, new_v, skip, scale=scale, softcap=softcap, window=keys.window,
                        stored_empty=keys.stored_empty)  # fmt: skip
    return out.reshape(query.shape) if packed else out


@_implements([torch.ops.oscar.sdpa.default])
def _(func, types, args, kwargs):
    query, key, value, attn_mask, scale, softcap, is_causal = args
    if isinstance(key, OScaRKeyCache) and isinstance(value, OScaRValueCache) and not is_oscar_cache(query):
        return cache_sdpa(query, key, value, attn_mask, scale, softcap)
    return _fallback(func, args, kwargs)


@_implements_torch_function([F.scaled_dot_product_attention])
def _(func, types, args, kwargs):
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
    bound = dict(zip(names, args), **kwargs)
    key, value = bound["key"], bound["value"]
    if (isinstance(key, OScaRKeyCache) and isinstance(value, OScaRValueCache) and not bound.get("dropout_p")
            and not (key.view.transposed or value.view.transposed)):  # fmt: skip
        return ops.sdpa(bound["query"], key, value, bound.get("attn_mask"), scale=bound.get("scale"), is_causal=True)
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **kwargs)


for _cls in _HALVES:
    _cls.__module__ = __name__
torch.serialization.add_safe_globals([OScaRKeyCache, OScaRValueCache, KVView])
