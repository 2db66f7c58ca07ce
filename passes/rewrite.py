"""Rewrite matched sites of a Dynamo graph to ``oscar::attention`` + ``oscar::append_kv`` on OScaR state.

Per cache (a key/value pair of graph inputs) the sites reading it form a group; a group is rewritten whole
or not at all. For a group:

* the OScaR state (:class:`CacheState`, 12 tensors) is registered on the GraphModule as buffers and read
  with ``get_attr`` (AOT lifts them as mutable inputs; every graph shares the same tensors);
* ``sync_lengths`` resets the state when position 0 is written (a new sequence) and asserts on device that
  the step writes at consecutive positions starting at the stored length (the OScaR cache appends);
* each reader's attention becomes ``oscar::attention(query, state, new_keys, new_values)`` (GQA expansion
  dropped; the scale carried; the causal mask is the op's own), placed where the attention was;
* the two writes become one ``oscar::append_kv`` after the last reader (attend-then-append, DESIGN §2);
* "auto" key flags (``OScaRConfig()``'s default): after ``sync_lengths``, a graph whose step writes at least
  ``group_size`` tokens computes ``oscar::choose_key_flags`` from the step's new keys and the first reader's
  queries, and every graph of the group writes the step's flags with ``ops.refresh_key_flags``, which
  changes them only while the state holds no token (a sequence's first step, after ``sync_lengths`` reset
  it on a write at position 0); a step of fewer than ``group_size`` tokens offers the initial flags (what the
  choice gives for so few keys). So the flags are those of each sequence's first step (its prompt), as in
  the cache subclass; multi-token graphs compute a choice that later chunks discard (no host bookkeeping
  here), decode graphs (T < group_size) never run it.

Placeholders of the replaced full-precision caches are left without users; their storage is freed by the
caller once the graph is compiled.
"""

from __future__ import annotations

import math
import operator
import re
from collections import Counter
from dataclasses import dataclass

import torch
from torch import fx
from torch._dynamo.utils import counters
from torch._dynamo.source import ConstantSource

from ..kernels.cache_layout import CacheFormat, CacheTensors, allocate_cache, cache_nbytes
from .report import OScaRReport, SiteRecord
from .cache_trace import layer_index
from .graph import op_name, shape_of
from .sites import Site, find_attention_nodes, match_attention

__all__ = ["CacheState", "StateRegistry", "rewrite_graph", "sync_lengths", "site_name"]


def _ops():
    from .. import ops  # noqa: F401  (registers torch.ops.oscar.*)

    return torch.ops.oscar


@dataclass
class CacheState:
    """OScaR state replacing one full-precision key/value cache pair (or one layer of stacked buffers)."""

    index: int
    name: str
    tensors: CacheTensors
    fmt: CacheFormat
    key: torch.Tensor  # the replaced full-precision tensors (storage freed once fully replaced)
    value: torch.Tensor
    bf16_bytes: int
    key_index: int | None = None  # layer of a stacked [L, B, H, S, D] buffer, else None
    value_index: int | None = None

    @property
    def oscar_bytes(self) -> int:
        return cache_nbytes(self.tensors)


class StateRegistry:
    """(cache tensor, layer index) -> its OScaR state; caches (or layers) kept in full precision are pinned.

    The layer index is None for a plain ``[B, H, S, D]`` cache and ``i`` for ``buffer[i]`` of a stacked one.
    A tensor's storage may be freed only when every layer of it is replaced and none is pinned.
    """

    def __init__(self, config):
        self.config = config
        self.states: dict[tuple, CacheState] = {}
        self.pinned: dict[tuple, tuple[torch.Tensor, str]] = {}
        self._tensors: dict[int, torch.Tensor] = {}

    def lookup(self, tensor, index=None) -> CacheState | None:
        state = self.states.get((id(tensor), index))
        if state is None:
            return None
        if (state.key is tensor and state.key_index == index) or (state.value is tensor and state.value_index == index):
            return state
        return None

    def states_of(self, tensor) -> list[CacheState]:
        return [st for (i, _), st in self.states.items() if i == id(tensor) and (st.key is tensor or st.value is tensor)]

    def untouched_reason(self, tensor, index=None) -> str | None:
        entry = self.pinned.get((id(tensor), index))
        return entry[1] if entry is not None and entry[0] is tensor else None

    def mark_untouched(self, tensor, reason: str, index=None) -> None:
        """Keep ``tensor`` (layer ``index``) in full precision for good; a no-op once it has OScaR state."""
        if isinstance(tensor, torch.Tensor) and self.lookup(tensor, index) is None:
            self.pinned.setdefault((id(tensor), index), (tensor, reason))

    def freeable(self, tensor) -> bool:
        if any(key[0] == id(tensor) and entry[0] is tensor for key, entry in self.pinned.items()):
            return False
        if self.lookup(tensor) is not None:
            return True
        return tensor.dim() == 5 and all(self.lookup(tensor, i) is not None for i in range(tensor.shape[0]))

    def is_freed(self, tensor) -> bool:
        return bool(self.states_of(tensor)) and tensor.untyped_storage().nbytes() == 0

    def get_or_create(self, key, value, name: str, key_index=None, value_index=None) -> CacheState:
        state = self.lookup(key, key_index)
        if state is not None:
            if state.value is not value or state.value_index != value_index:
                raise RuntimeError(f"oscar_compile: cache {name} is paired with a different value cache than before")
            return state
        cfg = self.config
        k = key if key_index is None else key[key_index]
        v = value if value_index is None else value[value_index]
        b, hkv, length, d = k.shape
        r = cfg.residual_length
        fmt = CacheFormat(cfg.bits, cfg.group_size, r, cfg.rotate_values)
        max_len = math.ceil(length / r) * r
        rotate0, scale0 = cfg.initial_key_flags  # "auto": decided at each sequence's first step (module docstring)
        tensors = allocate_cache(b, hkv, max_len, d, fmt, k.dtype, k.device, rotate_keys=rotate0, token_scaling=scale0)
        bf16 = k.numel() * k.element_size() + v.numel() * v.element_size()
        state = CacheState(len(self.states) // 2, name, tensors, fmt, key, value, bf16, key_index, value_index)
        self.states[(id(key), key_index)] = state
        self.states[(id(value), value_index)] = state
        return state


def sync_lengths(lengths: torch.Tensor, position, from_zero: bool) -> None:
    """Reset on a write at position 0, then check the write appends at the stored length (no host sync).

    lengths: [B] int32 (mutated); position: int positions [T] or [B, T], or the int start of a slice write.
    """
    if isinstance(position, torch.Tensor):
        pos = position.to(torch.int64)
        pos = pos.reshape(1, -1) if pos.dim() <= 1 else pos.reshape(pos.shape[0], -1)
        start = pos[:, 0]
        steps = torch.arange(pos.shape[1], device=pos.device, dtype=torch.int64)
        ok = torch.all(pos == start[:, None] + steps)
    else:
        start = torch.full((1,), position, dtype=torch.int64, device=lengths.device)
        ok = torch.ones((), dtype=torch.bool, device=lengths.device)
    synced = torch.where(start == 0, torch.zeros_like(lengths, dtype=torch.int64), lengths.to(torch.int64))
    ok = ok & torch.all(synced == start)
    if from_zero:
        ok = ok & torch.all(start == 0)
    torch._assert_async(ok, "oscar_compile: KV cache written out of order (OScaR caches append at the stored length)")
    lengths.copy_(synced.to(lengths.dtype))


def _clean_path(path: str) -> str:
    """``L['self']._modules['layers']._modules['0'].k_cache`` -> ``layers.0.k_cache``."""
    path = re.sub(r"^L\['args'\]\[0\]|^L\['[^']*'\]", "", path)  # the module is `self` or `args[0]`
    path = re.sub(r"\.(_modules|_buffers|_parameters)\b", "", path)
    path = re.sub(r"\[['\"]?([^\]'\"]*)['\"]?\]", r".\1", path)
    return path.strip(".")


def site_name(node: fx.Node) -> str:
    """Stable, readable name of an attention node: its module path (Dynamo's nn_module_stack) and op."""
    stack = node.meta.get("nn_module_stack") or {}
    path = ""
    if stack:
        path = _clean_path(list(stack.values())[-1][0])
    return f"{path or '<top>'}:{op_name(node)}"


def _input_name(node: fx.Node, values) -> str:
    src = node.meta.get("grapharg")
    src = getattr(src, "source", None)
    if src is not None:
        return _clean_path(src.name if isinstance(src.name, str) else src.name())
    return node.name


def rewrite_graph(gm: fx.GraphModule, example_inputs, registry: StateRegistry, report: OScaRReport) -> int:
    """Match and rewrite every site of ``gm`` in place; returns the number of attention sites rewritten.

    Raises RuntimeError only when a cache (or layer) already held as OScaR state is used by something this
    graph cannot rewrite: its full-precision copy is stale or freed, so leaving it would be wrong.
    """
    graph = gm.graph
    cfg = registry.config
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    values = {n: v for n, v in zip(placeholders, example_inputs)}
    report.graphs += 1

    groups: dict[tuple, list[Site]] = {}
    seen: Counter = Counter()
    for node in find_attention_nodes(graph):
        name = site_name(node)
        seen[name] += 1
        if seen[name] > 1:  # several attentions in one module (e.g. a loop): number them in graph order
            name = f"{name}#{seen[name] - 1}"
        site = match_attention(node, values, cfg.group_size)
        if isinstance(site, str):
            counters["oscar"]["sites_skipped"] += 1
            report.add_skipped(name, site)
            _mark_reads(node, values, registry, site)
            continue
        site.name = name
        site.cache_attrs = tuple(
            _input_name(c, values) + ("" if i is None else f"[{i}]")
            for c, i in ((site.key_cache, site.key_index), (site.value_cache, site.value_index))
        )
        key = (site.key_cache, site.key_index, site.value_cache, site.value_index)
        groups.setdefault(key, []).append(site)

    _record_cache_subclass_sites(graph, values, report)

    rewritten = 0
    grad = torch.is_grad_enabled() and any(getattr(v, "requires_grad", False) for v in example_inputs)
    for (kc, ki, vc, vi), sites in groups.items():
        if grad:  # the oscar ops have no backward; leave the graph as it is (not pinned: may differ next time)
            for s in sites:
                report.add_skipped(s.name, "autograd is enabled: OScaR ops are inference-only (use torch.no_grad())")
            continue
        why = _check_group(sites, registry, values)
        if why and registry.lookup(values.get(kc), ki) is not None:
            # its OScaR state holds the tokens now: the full-precision cache is stale (or freed)
            raise RuntimeError(
                f"oscar_compile: cache {'/'.join(sites[0].cache_attrs)} was replaced by OScaR state in an earlier "
                f"graph, but this graph cannot rewrite it: {why}"
            )
        if why:
            for s in sites:
                report.add_skipped(s.name, why)
            counters["oscar"]["sites_skipped"] += len(sites)
            registry.mark_untouched(values.get(kc), why, ki)
            registry.mark_untouched(values.get(vc), why, vi)
            continue
        state = registry.get_or_create(values[kc], values[vc], "/".join(sites[0].cache_attrs), ki, vi)
        _rewrite_group(gm, sites, state, cfg)
        report.add_cache(state.name, state.bf16_bytes, state.oscar_bytes)
        for s in sites:
            report.add_rewritten(
                SiteRecord(s.name, s.kind, state.name, s.heads, s.kv_heads, s.head_dim, s.mask_kind, s.write_op)
            )
        rewritten += len(sites)
        counters["oscar"]["sites_rewritten"] += len(sites)

    # what is left of a replaced cache must not touch a replaced layer (its full-precision copy is stale or
    # freed); other layers of a stacked buffer left in place are pinned, so the buffer is never freed
    for ph in placeholders:
        tensor = values.get(ph)
        if not isinstance(tensor, torch.Tensor) or not ph.users or not registry.states_of(tensor):
            continue
        for user in ph.users:
            j = layer_index(user) if user.args and user.args[0] is ph else None
            if j is None and op_name(user) == "setitem":
                idx = user.args[1] if isinstance(user.args[1], tuple) else (user.args[1],)
                j = idx[0] % tensor.shape[0] if isinstance(idx[0], int) and not isinstance(idx[0], bool) else None
            if j is not None and registry.lookup(tensor, j) is None and not registry.is_freed(tensor):
                registry.mark_untouched(tensor, f"layer {j} is used by {user.name} outside a rewritten site", j)
                continue
            reasons = "; ".join(r for n, r in report.skipped) or "no matching attention"
            raise RuntimeError(
                f"oscar_compile: cache {registry.states_of(tensor)[0].name} is held as OScaR state, but this graph "
                f"also uses it in a way the pass cannot rewrite ({user.name}: {op_name(user)}): {reasons}"
            )
    graph.lint()
    gm.recompile()
    for op, n in Counter(op_name(n) for n in graph.nodes if _is_oscar(n)).items():
        report.op_counts[op] += n
    return rewritten


def _record_cache_subclass_sites(graph: fx.Graph, values, report: OScaRReport) -> None:
    """Sites already on OScaR state: ``oscar::sdpa`` over OScaR cache subclasses (transformers' OScaRCache).

    These come from the cache integration (``oscar_compile.hf_cache``), not from this rewrite: the model's
    ``index_copy_`` writes and attention reach the ops through the subclass. They are reported as rewritten
    (kind ``"sdpa (OScaRCache)"``) with the cache's exact bytes.
    """
    nodes = [n for n in graph.nodes if n.op == "call_function" and _is_oscar(n) and op_name(n) == "sdpa"]
    if not nodes:
        return
    from ..kv_tensor import is_oscar_cache, layer_nbytes

    for node in nodes:
        k, v = node.args[1], node.args[2]
        kt, vt = values.get(k), values.get(v)
        if not (is_oscar_cache(kt) and is_oscar_cache(vt)):
            continue
        b, hkv, max_len, d = kt.shape
        qs = shape_of(node.args[0])
        name = site_name(node)
        cache = f"{_input_name(k, values)}/{_input_name(v, values)}"
        writes = sorted({op_name(u) for u in k.users if u is not node})
        report.add_rewritten(
            SiteRecord(name, "sdpa (OScaRCache)", cache, qs[1] if qs else -1, hkv, d, "attention_mask (left padding)",
                       ",".join(writes) or "none")  # fmt: skip
        )
        bf16 = 2 * kt.numel() * kt.element_size()
        report.add_cache(cache, bf16, layer_nbytes(kt, vt))


def _is_oscar(node) -> bool:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return t.namespace == "oscar"
    return isinstance(t, torch._ops.OpOverloadPacket) and t._qualified_op_name.startswith("oscar::")


def _mark_reads(node, values, registry, reason):
    """A skipped attention that reads a graph input keeps that input in full precision for good."""
    from .cache_trace import trace_cache
    from .graph import SDPA_NAMES
    from .sites import _decomposed_args, _sdpa_args

    a = _sdpa_args(node) if op_name(node) in SDPA_NAMES else _decomposed_args(node)
    if isinstance(a, str):
        return
    for n in (a["key"], a["value"]):
        t = trace_cache(n)
        if isinstance(t.source, fx.Node) and t.source in values:
            state = registry.lookup(values[t.source], t.index)
            if state is not None:
                raise RuntimeError(
                    f"oscar_compile: attention {node.name} reads cache {state.name}, which an "
                    f"earlier graph replaced by OScaR state, but cannot be rewritten here: {reason}"
                )
            registry.mark_untouched(values[t.source], reason, t.index)


def _check_group(sites: list[Site], registry: StateRegistry, values) -> str | None:
    """Whole-group preconditions: consistent writes, nothing else reads the cache, not pinned to bf16."""
    first = sites[0]
    for s in sites[1:]:
        if s.key_write.node is not first.key_write.node or s.value_write.node is not first.value_write.node:
            return "sites sharing a cache see different writes"
    for cache, index in ((first.key_cache, first.key_index), (first.value_cache, first.value_index)):
        pinned = registry.untouched_reason(values.get(cache), index)
        if pinned:
            return f"cache {cache.name} is kept in full precision by an earlier graph ({pinned})"
    owned = set().union(*(s.removable for s in sites)) | {s.out for s in sites}
    for w in (first.key_write, first.value_write):
        owned |= {w.node, *w.extra}
    for n in owned:
        if n in {s.out for s in sites}:
            continue
        for u in n.users:
            if u not in owned:
                return f"{n.name} (part of the attention or its cache read) is also used by {u.name}"
    for cache, index in ((first.key_cache, first.key_index), (first.value_cache, first.value_index)):
        for u in cache.users:
            if u in owned or (index is not None and _other_layer(u, cache, index)):
                continue
            return f"cache {cache.name} is also used by {u.name} ({op_name(u)}) outside the attention"
    return None


def _other_layer(node, cache, index) -> bool:
    """``node`` touches only another layer of the stacked ``cache``: ``cache[j]`` or ``cache[j, ...] = x``."""
    j = layer_index(node)
    if j is not None:
        return node.args[0] is cache and j != index
    if op_name(node) == "setitem" and node.args[0] is cache:
        idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        return isinstance(idx[0], int) and not isinstance(idx[0], bool) and idx[0] % shape_of(cache)[0] != index
    return False


def _insert_key_decision(graph: fx.Graph, attrs, new_keys: fx.Node, query: fx.Node, fmt: CacheFormat, config):
    """The "auto" key flags of this step (module docstring), written while the state holds no token."""
    from ..ops import refresh_key_flags

    t = (shape_of(new_keys) or (None, None, None))[2]
    if not isinstance(t, int) or t >= fmt.group_size:  # a symbolic T (dynamic prompt lengths) may be either
        modes = tuple(None if m == "auto" else m for m in (config.rotate_keys, config.token_scaling))
        chosen = graph.call_function(
            _ops().choose_key_flags.default, (new_keys, query, None, fmt.bits, fmt.group_size, *modes)
        )
        rotated = graph.call_function(operator.getitem, (chosen, 0))
        scaled = graph.call_function(operator.getitem, (chosen, 1))
    else:  # fewer keys than a group: the choice is the initial flags, not worth an op
        rotated, scaled = config.initial_key_flags
    graph.call_function(refresh_key_flags, (attrs[10], attrs[11], attrs[9], rotated, scaled))


def _rewrite_group(gm: fx.GraphModule, sites: list[Site], state: CacheState, config) -> None:
    graph = gm.graph
    oscar = _ops()
    fields = CacheTensors._fields
    prefix = f"_oscar_cache{state.index}"
    for f in fields:
        if not hasattr(gm, f"{prefix}_{f}"):
            gm.register_buffer(f"{prefix}_{f}", getattr(state.tensors, f))
            # AOT lifts GraphModule buffers as (static) inputs and wants a Dynamo source for each
            sources = getattr(gm, "_param_name_to_source", None)
            if sources is not None:
                sources[f"{prefix}_{f}"] = ConstantSource(f"{prefix}_{f}")
    order = {n: i for i, n in enumerate(graph.nodes)}
    sites = sorted(sites, key=lambda s: order[s.out])
    kw, vw = sites[0].key_write, sites[0].value_write
    fmt = state.fmt
    fmt_args = (fmt.bits, fmt.group_size, fmt.residual_length, fmt.rotate_values)
    from_zero = any(s.mask_kind == "causal" for s in sites)

    with graph.inserting_before(sites[0].out):
        attrs = [graph.get_attr(f"{prefix}_{f}") for f in fields]
        graph.call_function(sync_lengths, (attrs[9], kw.position, from_zero))
        if config.adaptive_keys:
            _insert_key_decision(graph, attrs, kw.new, sites[0].query, fmt, config)
    last = None
    for s in sites:
        with graph.inserting_before(s.out):
            att = graph.call_function(
                oscar.attention.default,
                (s.query, *attrs, kw.new, vw.new, None, *fmt_args, s.scale, s.softcap, None),
            )
            if s.out_dtype is not None and s.out_dtype != getattr(s.query.meta.get("example_value", s.query.meta.get("val")), "dtype", s.out_dtype):
                att = graph.call_method("to", (att, s.out_dtype))
        s.out.replace_all_uses_with(att)
        last = att
    with graph.inserting_after(last):
        graph.call_function(oscar.append_kv.default, (*attrs, kw.new, vw.new, None, *fmt_args))

    # erase the old attention, its cache reads and the writes (in-place writes have no users left)
    doomed = set().union(*(s.removable for s in sites)) | {s.out for s in sites}
    for w in (kw, vw):
        doomed |= {w.node, *w.extra}
    for n in reversed(list(graph.nodes)):
        if n in doomed and not n.users:
            graph.erase_node(n)
    remaining = set(graph.nodes)
    leftover = [n.name for n in doomed if n in remaining]
    assert not leftover, f"nodes still used after rewrite: {leftover}"
