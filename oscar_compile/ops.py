"""``torch.library`` ops over one layer's OScaR cache: the only module that registers ops.

Two ops, named as the graph passes and the cache subclass call them:

* ``torch.ops.oscar.append_kv(<10 mutable cache tensors>, key_rotated, key_scaled, new_keys, new_values,
  skip, bits, group_size, residual_length, rotate_values) -> ()``: quantize-on-write
  (``kernels.append_kv``). Mutates ``key_codes .. lengths`` (the first 10 tensors) in place.
* ``torch.ops.oscar.attention(query, <12 cache tensors>, new_keys, new_values, skip, bits, group_size,
  residual_length, rotate_values, scale, softcap, window) -> Tensor``: the step's queries over the
  stored cache plus the step's own keys/values at full precision (``kernels.cache_attention``). Returns
  a new contiguous tensor with the query's shape and dtype.

* ``torch.ops.oscar.attend_append(<attention's arguments, new keys/values required>) -> Tensor``: both
  of the above as one opaque op (mutates like ``append_kv``), which is what the cache subclass uses: with
  two ops Inductor cannot re-inplace the append (see the op's comment) and copies the cache every step.
* ``torch.ops.oscar.choose_key_flags(new_keys, query, skip, bits, group_size, rotate, scale) -> (Tensor, Tensor)``:
  the per-kv-head key flags ``(rotated, scaled)`` bool ``[Hkv]`` that
  ``kernels.key_transform.choose_key_flags`` picks from a step's keys and queries (left pads moved out of the
  way), for ``OScaRConfig`` "auto". Pure (no mutation); the callers write the flags into the cache only
  while it holds no token (:func:`refresh_key_flags`), i.e. at a sequence's first step.
* ``torch.ops.oscar.left_pads(mask, positions, batch) -> Tensor``: the ``skip`` of a chunk read from
  the attention mask (new tokens no query may see are left padding).
* ``torch.ops.oscar.sdpa(query, key, value, attn_mask, scale, softcap, is_causal) -> Tensor``: the entry
  point through which a model's attention reaches the cache. With plain ``key``/``value`` it is ordinary
  scaled-dot-product attention (GQA, bool or additive mask, logit softcap); when ``key``/``value`` are the
  OScaR cache tensor subclass (``oscar_compile.kv_tensor``), its ``__torch_dispatch__`` intercepts the op
  and runs ``attention`` + ``append_kv`` on the quantized state. A custom op (rather than
  ``F.scaled_dot_product_attention``) because it reaches ``__torch_dispatch__`` undecomposed on every
  device, carries ``softcap`` and is traced by torch.compile as one node.

The 12 cache tensors are passed in :class:`~oscar_compile.kernels.CacheTensors` field order, the format as
:class:`~oscar_compile.kernels.CacheFormat`'s fields (one owner: ``_cache_op_signature``). Step order is
attention first, then append (DESIGN.md §2, "attend-then-append").

Backends:

* fake impls: shapes only (no data access), so ``torch.compile`` traces both ops with static shapes;
* CPU: the pure-torch references ``append_kv_ref`` / ``cache_attention_ref`` (host-synchronizing); the step op
  ``attend_append`` attends with ``kernels.cpu_attention.cache_attention_cpu`` (the reference's semantics, without
  unpacking and dequantizing the whole cache in separate passes);
* CUDA: the Triton launchers ``kernels.append_kv.append_kv`` / ``kernels.cache_attention.cache_attention``
  through ``torch.library.triton_op``: under torch.compile on CUDA the op is decomposed into its
  ``wrap_triton`` kernel calls, so Inductor sees (and CUDA graphs capture) the kernels. For that the
  launchers must call their kernels as ``wrap_triton(_kernel)[grid](...)`` and do no host syncs.
  On any other device the op stays opaque during tracing: the
  DESIGN §4 pitfall is that ``triton_op`` cannot be traced when Triton runs in the CPU interpreter.
* eager on CUDA: the Python wrappers (``append_kv``, ``attention``, ``attend_append``) skip the op dispatch
  and launch the kernels directly when nothing is tracing (``_launch_directly``): host time per call is
  the launchers' own, not the dispatcher's custom-op layers.

Overflow: the CPU reference raises ``ValueError``; the CUDA append marks the sequence instead (no host
sync) and :func:`check_overflow` raises at the next eager check.
"""

from __future__ import annotations

import contextlib
import inspect
import typing
from typing import Optional

import torch
from torch._subclasses.functional_tensor import FunctionalTensorMode

from .kernels.append_kv import append_kv as _append_kv_launcher
from .kernels.append_kv import append_kv_ref
from .kernels.append_kv import check_overflow as _check_overflow
from .kernels.attention_ref import masked_softmax
from .kernels.cache_attention import cache_attention as _cache_attention_launcher
from .kernels.cache_attention import cache_attention_ref
from .kernels.cache_layout import CacheFormat, CacheTensors
from .kernels.cpu_attention import cache_attention_cpu
from .kernels.key_transform import choose_key_flags as _choose_key_flags
from .kernels.new_token_attention import DENSE_MIN_QUERIES, causal_attention

__all__ = [
    "append_kv", "attend_append", "attention", "check_overflow", "choose_key_flags", "left_pads",
    "refresh_key_flags", "sdpa",
]  # fmt: skip

Tensor = torch.Tensor

# The first 10 CacheTensors fields: everything append_kv writes. key_rotated/key_scaled are read only.
APPEND_MUTATES = (
    "key_codes",
    "key_mn",
    "key_scale",
    "key_norms",
    "value_codes",
    "value_mn",
    "value_scale",
    "residual_keys",
    "residual_values",
    "lengths",
)
assert APPEND_MUTATES == CacheTensors._fields[:10]


# ---------------------------------------------------------------------------------------------------
# The cache ops' arguments, in one place. torch.library ops take tensors one by one, so the cache and append
# ops take a layer's cache as the 12 CacheTensors fields and its format as CacheFormat's 4 fields, in field
# order, each op spelled (query?, <cache>, new_keys, new_values, skip, <format>, <op's own>). The op bodies
# get the flat arguments and regroup them with _split_cache_args; the wrappers flatten with
# _cache_args; the schemas are inferred from the signature _cache_op_signature builds from the field lists.


def _param(name: str, annotation, default=inspect.Parameter.empty) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=annotation, default=default)


_CACHE_PARAMS = [_param(name, Tensor) for name in CacheTensors._fields]
_FORMAT_PARAMS = [_param(name, typing.get_type_hints(CacheFormat)[name]) for name in CacheFormat._fields]
_ATTEND_PARAMS = [_param("scale", float), _param("softcap", Optional[float]), _param("window", Optional[int])]


def _cache_op_signature(query: bool, new_optional: bool, extra=(), returns=None):
    """Decorator: give an op body ``fn(*args)`` the flat signature its schema is inferred from:
    ``(query?, <12 cache tensors>, new_keys, new_values, skip, <4 format fields>, *extra)``."""
    new = Optional[Tensor] if new_optional else Tensor
    params = [
        *([_param("query", Tensor)] if query else []), *_CACHE_PARAMS,
        _param("new_keys", new), _param("new_values", new), _param("skip", Optional[Tensor]),
        *_FORMAT_PARAMS, *extra,
    ]  # fmt: skip

    def decorate(fn):
        fn.__signature__ = inspect.Signature(params, return_annotation=returns)
        return fn

    return decorate


def _cache_args(cache: CacheTensors, fmt: CacheFormat, new_keys, new_values, skip) -> tuple:
    """The op arguments ``(<12 cache tensors>, new_keys, new_values, skip, <4 format fields>)``."""
    return (*cache, new_keys, new_values, skip, *fmt)


def _split_cache_args(args) -> tuple:
    """Inverse of :func:`_cache_args`: ``(cache, fmt, new_keys, new_values, skip, the op's remaining args)``."""
    n, f = len(CacheTensors._fields), len(CacheFormat._fields)
    new_keys, new_values, skip = args[n : n + 3]
    return CacheTensors(*args[:n]), CacheFormat(*args[n + 3 : n + 3 + f]), new_keys, new_values, skip, args[n + 3 + f :]


def _like_query(query, *args, **kwargs) -> Tensor:
    # fake impl of the attention ops. query: [B, Hq, T, D] -> same shape/dtype, contiguous
    return torch.empty(query.shape, dtype=query.dtype, device=query.device)


def _decompose_on_cuda(fn):
    """FunctionalTensorMode handler replacing triton_op's: decompose only on CUDA.

    Elsewhere keep the op opaque (functionalized as a custom op), as triton_op itself does for export.
    """

    def handler(mode, op, types, args, kwargs):
        try:
            from torch.export._trace import custom_triton_ops_decomposition_disabled
        except ImportError:  # older torch: export never asks to keep triton ops whole

            def custom_triton_ops_decomposition_disabled():
                return False

        if any(
            not issubclass(t, torch._subclasses.FakeTensor)
            and t not in (torch.Tensor, torch._subclasses.functional_tensor.FunctionalTensor)
            for t in types
        ):
            return NotImplemented
        if args[0].device.type == "cuda" and not custom_triton_ops_decomposition_disabled():
            with mode:
                return fn(*args, **kwargs)
        return mode.__torch_dispatch__(op, types, args, kwargs)

    return handler


# ---------------------------------------------------------------------------------------------------
# append_kv


@_cache_op_signature(query=False, new_optional=False)
def _append_kv_triton(*args) -> None:
    cache, fmt, new_keys, new_values, skip, _ = _split_cache_args(args)
    _append_kv_launcher(cache, fmt, new_keys, new_values, skip)


_append_kv_op = torch.library.triton_op("oscar::append_kv", _append_kv_triton, mutates_args=APPEND_MUTATES)


@_append_kv_op.register_kernel("cpu")
def _(*args):
    cache, fmt, new_keys, new_values, skip, _ = _split_cache_args(args)
    append_kv_ref(cache, fmt, new_keys, new_values, skip)


@_append_kv_op.register_fake
def _(*args, **kwargs):
    return None


_append_kv_op.register_torch_dispatch(FunctionalTensorMode, _decompose_on_cuda(_append_kv_triton))


# ---------------------------------------------------------------------------------------------------
# attention


def _attention_body(attend, query, args) -> Tensor:
    cache, fmt, new_keys, new_values, skip, (scale, softcap, window) = _split_cache_args(args)
    out = attend(query, cache, fmt, new_keys, new_values, skip, scale=scale, softcap=softcap, window=window)
    return out.contiguous()  # the fake impl promises a contiguous output


@_cache_op_signature(query=True, new_optional=True, extra=_ATTEND_PARAMS, returns=Tensor)
def _attention_triton(query, *args) -> Tensor:
    return _attention_body(_cache_attention_launcher, query, args)


_attention_op = torch.library.triton_op("oscar::attention", _attention_triton, mutates_args=())


@_attention_op.register_kernel("cpu")
def _(query, *args):
    return _attention_body(cache_attention_ref, query, args)


_attention_op.register_fake(_like_query)
_attention_op.register_torch_dispatch(FunctionalTensorMode, _decompose_on_cuda(_attention_triton))


# ---------------------------------------------------------------------------------------------------
# attend_append: one decode/prefill step of a layer (attention, then append), as one opaque op


@torch.library.custom_op("oscar::attend_append", mutates_args=APPEND_MUTATES)
@_cache_op_signature(query=True, new_optional=False, extra=[*_ATTEND_PARAMS, _param("stored_empty", bool, False)],
                     returns=Tensor)  # fmt: skip
def _attend_append_op(query, *args) -> Tensor:
    # Why a fused op: as two ops, attention (a pure read of the cache) and append (a mutation) have no
    # data dependency once functionalized, and Inductor's reorder_for_locality sinks the attention below
    # the append; the re-inplacing pass must then clone every cache buffer (and copy it back) each step.
    # One op keeps the order inside it, so the append is re-inplaced. Opaque (custom_op, not triton_op)
    # on CUDA too: a triton_op would be decomposed into the same two independent kernel calls.
    cache, fmt, new_keys, new_values, skip, (scale, softcap, window, *stored_empty) = _split_cache_args(args)
    # the dispatcher leaves out a trailing argument equal to its default (stored_empty=False)
    stored_empty = bool(stored_empty and stored_empty[0])
    return _attend_append_impl(query, cache, fmt, new_keys, new_values, skip, scale, softcap, window, stored_empty)


def _attend_append_impl(query, cache, fmt, new_keys, new_values, skip, scale, softcap, window, stored_empty) -> Tensor:
    """The body of ``oscar::attend_append`` (also called directly by :func:`attend_append` when eager on CUDA)."""
    attend, append = cache_attention_cpu, append_kv_ref  # the reference's semantics, fast enough to decode on CPU
    kw = dict(scale=scale, softcap=softcap, window=window)
    if query.device.type == "cuda":
        attend, append = _cache_attention_launcher, _append_kv_launcher
        kw["stored_empty"] = stored_empty  # a hint the reference does not need
    elif stored_empty and _dense_prompt_on_cpu(query, new_keys, softcap, window):
        # a long first step (prefill) on CPU: nothing stored, so its attention is causal self-attention, which
        # PyTorch's SDPA does without the reference's full T x T score matrix in fp32
        attend = _own_tokens_attention
    with _direct_triton_launches():
        out = attend(query, cache, fmt, new_keys, new_values, skip, **kw)
        append(cache, fmt, new_keys, new_values, skip)
    return out.contiguous()


def _own_tokens_attention(query, cache, fmt, new_keys, new_values, skip, scale, softcap, window) -> Tensor:
    """``cache_attention_ref`` for a step on an empty cache: causal attention of its own tokens (pads excluded)."""
    return causal_attention(query, new_keys, new_values, skip, scale)


def _dense_prompt_on_cpu(query: Tensor, new_keys: Optional[Tensor], softcap, window) -> bool:
    # query [B, Hq, T, D]: a prefill-length CPU step without softcap / sliding window (the reference keeps those)
    return (
        query.device.type == "cpu" and new_keys is not None and softcap is None and window is None
        and query.shape[2] >= DENSE_MIN_QUERIES
    )  # fmt: skip


def _direct_triton_launches():
    """Launch ``wrap_triton`` kernels directly (as triton_op's own backend does), skipping the HOP dispatch."""
    try:
        from torch._library.triton import set_wrap_triton_enabled
    except ImportError:
        return contextlib.nullcontext()
    return set_wrap_triton_enabled(False)


# Eager fast path. Through torch.ops an op call pays the dispatcher's Python custom-op layers (autograd and
# ADInplaceOrView kernels for the 10 mutated tensors, schema handling) before the launcher runs: hundreds
# of microseconds of host time per call, more than a decode step's kernels take on the GPU. The Python
# wrappers below call the Triton launchers themselves (wrap_triton disabled, as triton_op's own CUDA
# backend does) when nothing could need the op: not tracing, no dispatch / torch-function mode or functorch
# transform active, every tensor a plain torch.Tensor on CUDA that needs no grad. Anything else (Dynamo,
# AOT tracing with fake or functional tensors, the cache subclass, make_fx, export, CPU) goes through
# torch.ops as before. Compiled graphs call the ops themselves and never take this path.


_DIRECT_DEVICE = "cuda"  # the device type whose eager calls launch directly (tests point it at the CPU interpreter)


def _launch_directly(device_tensor: Tensor, tensors) -> bool:
    """Whether a wrapper call may launch the CUDA Triton kernels directly (see the comment above)."""
    if torch.compiler.is_compiling():  # first: Dynamo folds it to True and traces nothing else here
        return False
    if (
        torch._C._len_torch_dispatch_stack()
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._are_functorch_transforms_active()
    ):
        return False
    if type(device_tensor) is not Tensor or device_tensor.device.type != _DIRECT_DEVICE:
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) is not Tensor or (grad and t.requires_grad)):
            return False
    return True


def _mark_mutated(cache: CacheTensors) -> None:
    """Bump the version counters of the tensors an append mutates, as the op's ADInplaceOrView kernel does."""
    torch.autograd.graph.increment_version(cache[: len(APPEND_MUTATES)])


_attend_append_op.register_fake(_like_query)


# ---------------------------------------------------------------------------------------------------
# sdpa: the model-facing entry point (plain tensors here; the cache subclass intercepts it)


@torch.library.custom_op("oscar::sdpa", mutates_args=())
def _sdpa_op(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor],
    scale: float,
    softcap: Optional[float],
    is_causal: bool,
) -> Tensor:
    # query [B, Hq, Tq, D], key/value [B, Hkv, Tk, D], mask broadcastable to [B, Hq, Tq, Tk]
    b, hq, tq, _ = query.shape
    hkv, tk = key.shape[1], key.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads {hq} not a multiple of kv heads {hkv} (query {tuple(query.shape)}, key {tuple(key.shape)})")
    group = hq // hkv
    qf = query.to(torch.float32).reshape(b, hkv, group, tq, -1)
    scores = torch.einsum("bhgqd,bhkd->bhgqk", qf, key.to(torch.float32)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.reshape(b, hq, tq, tk)
    if is_causal:  # top-left aligned, as F.scaled_dot_product_attention
        allowed = torch.ones(tq, tk, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = masked_softmax(scores, attn_mask).reshape(b, hkv, group, tq, tk)
    out = torch.einsum("bhgqk,bhkd->bhgqd", probs, value.to(torch.float32))
    return out.reshape(b, hq, tq, value.shape[-1]).to(query.dtype).contiguous()


@_sdpa_op.register_fake
def _(query, key, value, attn_mask, scale, softcap, is_causal):
    b, hq, tq, _ = query.shape
    return torch.empty((b, hq, tq, value.shape[-1]), dtype=query.dtype, device=query.device)


# ---------------------------------------------------------------------------------------------------
# choose_key_flags: the "auto" key transform of a layer, decided from a step's keys and queries


# choose_key_flags builds a small device table from a Python list (a host-to-device copy, not capturable):
# Inductor keeps CUDA graphs away from graphs that hold it (only a deciding prefill does)
_CUDAGRAPH_UNSAFE = tuple(t for t in (getattr(torch.Tag, "cudagraph_unsafe", None),) if t is not None)


@torch.library.custom_op("oscar::choose_key_flags", mutates_args=(), tags=_CUDAGRAPH_UNSAFE)
def _choose_key_flags_op(
    new_keys: Tensor,
    query: Optional[Tensor],
    skip: Optional[Tensor],
    bits: int,
    group_size: int,
    rotate: Optional[bool],
    scale: Optional[bool],
) -> tuple[Tensor, Tensor]:
    # new_keys: [B, Hkv, T, D]; query: [B, Hq, T, D] or None; skip: [B] int left pads or None -> 2 x [Hkv] bool
    # rotate/scale: None = "auto" (chosen), a bool = fixed. Pure torch, no host sync: the same on every device.
    # Opaque, so compiled graphs keep it as one call (its candidate loop is not worth fusing).
    keys = new_keys
    if skip is not None:
        # left pads first go out of the way: each sequence's real keys move to slot 0 (the groups the cache
        # will quantize), the slots its pads free at the end repeat its last real key; pad queries are zeroed
        # (a zero query adds nothing to the logit error). Exact for batch 1; a batch decides jointly anyway.
        t = keys.shape[2]
        steps = torch.arange(t, device=keys.device)
        idx = (steps[None, :] + skip.to(torch.int64)[:, None]).clamp(max=t - 1)  # [B, T]
        keys = keys.gather(2, idx[:, None, :, None].expand(keys.shape))
        if query is not None and query.shape[2] == t:
            real = steps[None, :] >= skip.to(torch.int64)[:, None]  # [B, T]
            query = torch.where(real[:, None, :, None], query, torch.zeros((), dtype=query.dtype, device=query.device))
    rotated, scaled = _choose_key_flags(
        keys, bits, group_size, queries=query,
        rotate="auto" if rotate is None else rotate, scale="auto" if scale is None else scale,
    )  # fmt: skip
    return rotated.contiguous(), scaled.contiguous()


@_choose_key_flags_op.register_fake
def _(new_keys, query, skip, bits, group_size, rotate, scale):
    h = new_keys.shape[1]
    return (torch.empty((h,), dtype=torch.bool, device=new_keys.device),
            torch.empty((h,), dtype=torch.bool, device=new_keys.device))  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# left_pads: which of a chunk's new tokens are left padding, read from the attention mask


@torch.library.custom_op("oscar::left_pads", mutates_args=())
def _left_pads_op(mask: Tensor, positions: Tensor, batch: int) -> Tensor:
    # mask: [B or 1, H or 1, T, K] bool (True = attend) or additive float; positions: [T] -> [B] int32
    # A real new token at position p is visible at least to its own query (causal diagonal, inside any
    # window); a pad is visible to no query. An opaque op on purpose: fused into transformers' mask
    # construction, the same few aten ops hit an Inductor CPU vectorization bug (int64 padding mask).
    # positions past the mask (an overflowing write, refused by append_kv) are clamped, not read out of bounds
    cols = mask[:, 0].index_select(-1, positions.clamp(max=mask.shape[-1] - 1))  # [Bm, T queries, T new keys]
    if cols.dtype != torch.bool:
        cols = cols > torch.finfo(cols.dtype).min / 2
    seen = cols.any(1).sum(-1)  # [Bm]
    return (positions.shape[0] - seen).to(torch.int32).expand(batch).contiguous()


@_left_pads_op.register_fake
def _(mask, positions, batch):
    return torch.empty((batch,), dtype=torch.int32, device=mask.device)


# ---------------------------------------------------------------------------------------------------
# Python wrappers


def append_kv(
    cache: CacheTensors,
    fmt: CacheFormat,
    new_keys: Tensor,
    new_values: Tensor,
    skip: Optional[Tensor] = None,
) -> None:
    """Append ``new_keys``/``new_values`` ``[B, Hkv, T_new, D]`` to ``cache`` in place.

    skip: int ``[B]``, leading tokens of this chunk that are left padding (never stored); None means 0.
    Eager calls on CUDA launch the Triton kernels directly (no op dispatch); see ``_launch_directly``.
    On CUDA an overflow (a sequence passing ``max_len``) is marked, not raised: :func:`check_overflow`.
    """
    if _launch_directly(new_keys, (new_keys, new_values, skip, *cache)):
        with _direct_triton_launches():
            _append_kv_launcher(cache, fmt, new_keys, new_values, skip)
        _mark_mutated(cache)
        return
    torch.ops.oscar.append_kv(*_cache_args(cache, fmt, new_keys, new_values, skip))


def check_overflow(cache, max_len: Optional[int] = None) -> None:
    """Raise ``ValueError`` if an append overflowed a sequence of ``cache`` (eager; one host sync).

    ``cache``: a :class:`~oscar_compile.kernels.CacheTensors` (``max_len`` from it), or a cache's
    ``lengths`` ``[B]`` tensor with its ``max_len``. The CPU reference raises at the overflowing append;
    the CUDA kernel cannot without a host sync, so it writes nothing of the sequence and marks
    ``lengths[b]`` past ``max_len`` (``kernels.append_kv.append_kv``): call this at a point that may sync
    (after a compiled or CUDA-graph decode loop, at the next eager step). Not for compiled code (it reads
    the flags on the host); ``kernels.append_kv.overflowed`` gives them as a device tensor.
    """
    if isinstance(cache, CacheTensors):
        lengths, max_len = cache.lengths, cache.max_len if max_len is None else max_len
    else:
        lengths = cache
        if max_len is None:
            raise TypeError("check_overflow(lengths, max_len): max_len is required with a lengths tensor")
    _check_overflow(lengths, int(max_len))


def _attend_options(query, scale, softcap, window) -> tuple:
    """``(scale, softcap, window)`` as ``oscar::attention`` and ``oscar::attend_append`` take them."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    return float(scale), None if softcap is None else float(softcap), None if window is None else int(window)


def attention(
    query: Tensor,
    cache: CacheTensors,
    fmt: CacheFormat,
    new_keys: Optional[Tensor] = None,
    new_values: Optional[Tensor] = None,
    skip: Optional[Tensor] = None,
    *,
    scale: Optional[float] = None,
    softcap: Optional[float] = None,
    window: Optional[int] = None,
) -> Tensor:
    """query ``[B, Hq, T, D]`` over the stored cache plus ``new_*`` ``[B, Hkv, T, D]`` -> ``[B, Hq, T, D]``.

    scale defaults to ``D ** -0.5``; ``softcap``/``window`` as in ``kernels.cache_attention``.
    Eager calls on CUDA launch the Triton kernels directly (no op dispatch); see ``_launch_directly``.
    """
    scale, softcap, window = _attend_options(query, scale, softcap, window)
    if _launch_directly(query, (query, new_keys, new_values, skip, *cache)):
        with _direct_triton_launches():
            out = _cache_attention_launcher(query, cache, fmt, new_keys, new_values, skip, scale=scale, softcap=softcap, window=window)
        return out.contiguous()
    return torch.ops.oscar.attention(query, *_cache_args(cache, fmt, new_keys, new_values, skip), scale, softcap, window)


def attend_append(
    query: Tensor,
    cache: CacheTensors,
    fmt: CacheFormat,
    new_keys: Tensor,
    new_values: Tensor,
    skip: Optional[Tensor] = None,
    *,
    scale: Optional[float] = None,
    softcap: Optional[float] = None,
    window: Optional[int] = None,
    stored_empty: bool = False,
) -> Tensor:
    """``attention(...)`` then ``append_kv(...)`` of the same new keys/values, as one op (see its comment).

    ``stored_empty``: the caller promises that no sequence stores a token yet (``cache.lengths == 0``,
    e.g. a layer's first step); a long step (prefill) then attends with flash attention alone. A wrong
    promise gives a wrong answer: only :class:`~oscar_compile.hf_cache.OScaRLayer` sets it, on the first
    step after allocation or ``reset``. Eager calls on CUDA run the op's body directly (no op dispatch).
    """
    options = _attend_options(query, scale, softcap, window)
    if _launch_directly(query, (query, new_keys, new_values, skip, *cache)):
        out = _attend_append_impl(query, cache, fmt, new_keys, new_values, skip, *options, bool(stored_empty))
        _mark_mutated(cache)
        return out
    return torch.ops.oscar.attend_append(
        query, *_cache_args(cache, fmt, new_keys, new_values, skip), *options, bool(stored_empty)
    )


def sdpa(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    *,
    scale: Optional[float] = None,
    softcap: Optional[float] = None,
    is_causal: bool = False,
) -> Tensor:
    """``oscar::sdpa``: attention of ``query`` ``[B, Hq, Tq, D]`` over ``key``/``value`` ``[B, Hkv, Tk, D]``.

    ``key``/``value`` may be plain tensors or a layer's OScaR cache (:mod:`oscar_compile.kv_tensor`);
    for the cache, ``attn_mask`` is only read for left padding and ``is_causal`` is implied.
    """
    if scale is None:
        scale = query.shape[-1] ** -0.5
    return torch.ops.oscar.sdpa(
        query, key, value, attn_mask, float(scale), None if softcap is None else float(softcap), bool(is_causal)
    )


def choose_key_flags(
    new_keys: Tensor,
    query: Optional[Tensor],
    skip: Optional[Tensor],
    bits: int,
    group_size: int,
    rotate="auto",
    scale="auto",
) -> tuple[Tensor, Tensor]:
    """``oscar::choose_key_flags``: ``(rotated, scaled)`` bool ``[Hkv]`` for a step's ``new_keys`` ``[B, Hkv, T, D]``
    and ``query`` ``[B, Hq, T, D]`` (or None), ``skip`` ``[B]`` left pads (or None). ``rotate``/``scale``: "auto"
    or a fixed bool, as in ``OScaRConfig``."""
    return torch.ops.oscar.choose_key_flags(
        new_keys, query, skip, bits, group_size, None if rotate == "auto" else bool(rotate),
        None if scale == "auto" else bool(scale),
    )  # fmt: skip


@torch.library.custom_op("oscar::refresh_key_flags", mutates_args=("key_rotated", "key_scaled"))
def _refresh_key_flags_op(key_rotated: Tensor, key_scaled: Tensor, lengths: Tensor, rotated: Tensor, scaled: Tensor) -> None:
    # key_rotated/key_scaled, rotated/scaled: [Hkv] bool; lengths: [B] int. Opaque on purpose: as plain ops,
    # Inductor recomputed the where() of the copy-back after attend_append had advanced ``lengths`` in place,
    # so the decided flags were never stored (the quantized blocks used them; later steps read the old ones)
    fresh = (lengths == 0).all()
    key_rotated.copy_(torch.where(fresh, rotated, key_rotated))
    key_scaled.copy_(torch.where(fresh, scaled, key_scaled))


@_refresh_key_flags_op.register_fake
def _(key_rotated, key_scaled, lengths, rotated, scaled):
    return None


def refresh_key_flags(
    key_rotated: Tensor, key_scaled: Tensor, lengths: Tensor, rotated, scaled
) -> None:
    """Write ``rotated``/``scaled`` (bool ``[Hkv]`` tensors or bools) into the cache's per-head key flags, in place,
    only while the layer stores no token (every ``lengths`` 0): the flags of stored blocks never change.
    Device-side (no host sync), ``oscar::refresh_key_flags``."""
    rotated, scaled = (
        torch.full_like(flags, new) if isinstance(new, bool) else new.to(torch.bool)
        for flags, new in ((key_rotated, rotated), (key_scaled, scaled))
    )
    torch.ops.oscar.refresh_key_flags(key_rotated, key_scaled, lengths, rotated, scaled)


def left_pads(mask: Tensor, positions: Tensor, batch: int) -> Tensor:
    """``oscar::left_pads``: ``[B]`` int32 count of a chunk's new tokens (at ``positions`` ``[T]``) that the
    attention ``mask`` ``[B|1, H|1, T, K]`` hides from every query, i.e. left padding (the ``skip`` of the ops)."""
    return torch.ops.oscar.left_pads(mask, positions, batch)
