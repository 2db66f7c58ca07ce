"""Rewrite matched sites of a Dynamo graph to OScaR cache steps on the cache's own tensor subclass.

One owner for a layer's OScaR state: the pair of tensor subclasses of :mod:`oscar_compile.kv_tensor`
(:class:`~oscar_compile.kv_tensor.OScaRKeyCache` / :class:`~oscar_compile.kv_tensor.OScaRValueCache`), the
same objects transformers' ``OScaRCache`` holds. The pass puts them where the full-precision cache was (the
module's buffer or attribute), so the module owns its state: reading ``module.k_cache`` dequantizes,
``deepcopy`` copies the state, ``state_dict`` saves the dequantized contents, ``.to(device)`` moves it.

Per cache (a key/value pair of graph inputs) the sites reading it form a group; a group is rewritten whole
or not at all. For a group:

* **first graph** (the cache is still a plain tensor): new halves are allocated (``[B, Hkv, S, D]``
  logical, the buffer's own length ``S``; state rounded up to whole residual blocks) and read with
  ``get_attr`` from the GraphModule; after that graph's first run they replace the plain tensor in its
  owner module (:class:`CacheSwap`). Dynamo's guards on the attribute then fail and it traces again:
* **later graphs** see the halves as graph inputs and read them directly.

Either way each reader's attention becomes :func:`cache_step` (GQA expansion dropped, the scale and softcap
carried, the causal mask is the op's own): the first reader of a step syncs the stored length with the
write positions (a write at position 0 starts a new sequence; any other position must be the stored length,
checked on device) and, for "auto" key flags, decides them while the layer holds no token; every reader
attends to the stored tokens plus the step's own; the last one appends them (``oscar::attend_append``, one op,
so Inductor keeps the append in place). The model's own writes into the cache are erased.

A cache the pass cannot rewrite stays the plain tensor it was (and is reported); one already held as
OScaR halves that a later graph cannot rewrite raises (its full-precision copy is gone).
"""

from __future__ import annotations

import re
import weakref
from collections import Counter
from dataclasses import dataclass

import torch
from torch import fx
from torch._dynamo.source import ConstantSource
from torch._dynamo.utils import counters

from ..kv_tensor import (
    OScaRKeyCache, OScaRValueCache, attend_halves, decide_key_flags, is_oscar_cache, layer_nbytes, layer_slots,
    mark_static_state, new_kv_cache,
)  # fmt: skip
from .cache_trace import layer_index, root
from .graph import clean_path, meta_val, mutations, op_name, shape_of, source_name
from .report import OScaRReport, SiteRecord
from .sites import Prober, Site, find_attention_nodes, match_attention

__all__ = ["CacheRegistry", "CacheSwap", "cache_step", "rewrite_graph", "site_name", "sync_positions"]


# ---------------------------------------------------------------------------------------------------
# the step every rewritten attention runs


def sync_positions(keys: OScaRKeyCache, values: OScaRValueCache, position, from_zero: bool, aligned=()) -> None:
    """Start a new sequence on a write at position 0, then check the write appends at the stored length.

    position: int positions ``[T]`` or ``[B, T]``, or the start (int) of a slice write. ``aligned``: position
    inputs the mask was checked with (tensors of ``n`` positions, which must be ``start + arange(n)``, or
    ints / 0-d tensors equal to ``start``). Device-side only (no host sync): a write elsewhere than the stored
    length, past the cache's ``max_len``, or a mask position input out of step with the write, fails an assert.
    """
    lengths = keys.lengths  # [B] int32
    if isinstance(position, torch.Tensor):
        pos = position.to(torch.int64)
        pos = pos.reshape(1, -1) if pos.dim() <= 1 else pos.reshape(pos.shape[0], -1)
        start, last = pos[:, 0], pos[:, -1]
        steps = torch.arange(pos.shape[1], device=pos.device, dtype=torch.int64)
        ok = torch.all(pos == start[:, None] + steps)
    else:
        start = torch.full((1,), position, dtype=torch.int64, device=lengths.device)
        last = start
        ok = torch.ones((), dtype=torch.bool, device=lengths.device)
    synced = torch.where(start == 0, torch.zeros_like(lengths, dtype=torch.int64), lengths.to(torch.int64))
    ok = ok & torch.all(synced == start)
    if from_zero:
        ok = ok & torch.all(start == 0)
    torch._assert_async(
        ok,
        "oscar_compile: KV cache written out of order (OScaR caches append at the stored length; a new sequence "
        "starts at position 0, as must the first call after model.to(dtype), which starts fresh OScaR state)",
    )
    torch._assert_async(torch.all(last < keys.max_len), "oscar_compile: KV cache overflow (write past max_len)")
    if aligned:
        same = torch.ones((), dtype=torch.bool, device=lengths.device)
        for a in aligned:
            if isinstance(a, torch.Tensor) and a.dim() > 0:
                a = a.to(device=start.device, dtype=torch.int64)
                n = torch.arange(a.shape[-1], device=start.device, dtype=torch.int64)
                same = same & torch.all(a == start[:, None] + n)
            else:
                same = same & torch.all(start == a)
        torch._assert_async(same, "oscar_compile: the positions the attention mask was built from differ from the "
                                  "positions the KV cache is written at")  # fmt: skip
    lengths.copy_(synced.to(lengths.dtype))
    values.lengths.copy_(lengths)


def cache_step(
    query: torch.Tensor,
    keys: OScaRKeyCache,
    values: OScaRValueCache,
    new_keys: torch.Tensor,
    new_values: torch.Tensor,
    position,
    *,
    scale: float,
    softcap: float | None,
    first: bool,
    last: bool,
    from_zero: bool,
    window: int | None = None,
    aligned: tuple = (),
) -> torch.Tensor:
    """One rewritten attention: ``query`` ``[B, Hq, T, D]`` over the stored cache plus ``new_*`` ``[B, Hkv, T, D]``.

    ``first``: the step's first reader of this cache (syncs positions, decides "auto" key flags, checks
    ``aligned``: see :func:`sync_positions`); ``last``: its last reader (appends the new tokens after
    attending). ``window``: a sliding window (a query at position ``p`` sees keys ``> p - window``), None for
    causal attention. Returns ``[B, Hq, T, D]`` in the query's dtype.
    """
    if first:
        sync_positions(keys, values, position, from_zero, aligned)
        decide_key_flags(keys, new_keys, query)  # "auto": kept only while the layer holds no token
    return attend_halves(query, keys, values, new_keys, new_values, scale=scale, softcap=softcap, window=window,
                         append=last)  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# which caches were replaced, which stay in full precision


@dataclass
class CacheSwap:
    """Halves to put in place of a full-precision cache tensor: ``owner[key] = half`` (a module's
    ``_buffers``; ``module`` is that module) or ``setattr(owner, key, half)`` (a plain attribute)."""

    owner: object
    key: str
    half: torch.Tensor | None
    module: torch.nn.Module | None = None

    def apply(self) -> None:
        if isinstance(self.owner, dict):
            self.owner[self.key] = self.half
        else:
            setattr(self.owner, self.key, self.half)
        if self.module is not None and not getattr(self.module, "_oscar_state_hooks", False):
            self.module.register_state_dict_post_hook(_save_dequantized)
            self.module.register_load_state_dict_pre_hook(_keep_cache_state)
            self.module._oscar_state_hooks = True


def _save_dequantized(module, state_dict, prefix, local_metadata) -> None:
    """``state_dict`` hook: a buffer held as an OScaR half is saved as its dequantized contents, a plain tensor
    of the buffer's shape and dtype, so the checkpoint loads anywhere (oscar_compile not needed)."""
    for name, buf in module._buffers.items():
        if is_oscar_cache(buf) and prefix + name in state_dict:
            state_dict[prefix + name] = buf.dequantize()


def _keep_cache_state(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """``load_state_dict`` hook: a cache held as OScaR state keeps its state (the checkpoint's cache entry,
    runtime state rather than a weight, is not loaded into it)."""
    for name, buf in module._buffers.items():
        if is_oscar_cache(buf) and prefix + name in state_dict:
            state_dict[prefix + name] = buf


@dataclass
class ReplacedCache:
    """A key/value cache pair held as OScaR halves (``name``: the module attributes, for the report)."""

    name: str
    keys: OScaRKeyCache
    values: OScaRValueCache
    bf16_bytes: int


class CacheRegistry:
    """Full-precision cache tensors replaced by OScaR halves, and those kept in full precision for good.

    Keyed by tensor identity (weak references: a replaced tensor is not kept alive). The layer index is
    None for a plain ``[B, H, S, D]`` cache and ``i`` for ``buffer[i]`` of a stacked one (never replaced).
    """

    def __init__(self, config):
        self.config = config
        self._replaced: dict[int, tuple[weakref.ref, ReplacedCache]] = {}
        self._pinned: dict[tuple, tuple[weakref.ref, str]] = {}
        self.count = 0

    def replaced(self, tensor) -> ReplacedCache | None:
        entry = self._replaced.get(id(tensor))
        return entry[1] if entry is not None and entry[0]() is tensor else None

    def untouched_reason(self, tensor, index=None) -> str | None:
        entry = self._pinned.get((id(tensor), index))
        return entry[1] if entry is not None and entry[0]() is tensor else None

    def mark_untouched(self, tensor, reason: str, index=None) -> None:
        """Keep ``tensor`` (layer ``index``) in full precision for good; a no-op once it is replaced."""
        if isinstance(tensor, torch.Tensor) and not is_oscar_cache(tensor) and self.replaced(tensor) is None:
            if self.untouched_reason(tensor, index) is None:
                self._pinned[(id(tensor), index)] = (weakref.ref(tensor), reason)

    def replace(self, key: torch.Tensor, value: torch.Tensor, name: str, layout: str = "bhsd") -> ReplacedCache:
        """Allocate the OScaR halves standing in for ``key``/``value`` (same shape: ``[B, Hkv, S, D]``, or
        ``[B, S, Hkv, D]`` for ``layout="bshd"``, a transposed view of the halves)."""
        state = self.replaced(key)
        if state is not None:
            return state
        if layout == "bshd":
            b, length, hkv, d = key.shape
        else:
            b, hkv, length, d = key.shape
        extra = {"transposed": True} if layout == "bshd" else {}
        # a bits budget: the n-th cache this pass replaces is quantized layer n (``OScaRConfig.layer``: its own
        # bits, so its own CacheFormat and Triton specialisation); an undecided budget raises here, naming the fix
        layer_config = self.config.layer(self.count)
        halves = new_kv_cache(b, hkv, length, d, layer_config, key.dtype, key.device, exact_len=True, **extra)
        mark_static_state(*halves)
        bf16 = key.numel() * key.element_size() + value.numel() * value.element_size()
        state = ReplacedCache(name, *halves, bf16)
        for t in (key, value):
            self._replaced[id(t)] = (weakref.ref(t), state)
        self.count += 1
        return state


# ---------------------------------------------------------------------------------------------------
# names


def site_name(node: fx.Node) -> str:
    """Stable, readable name of an attention node: its module path (Dynamo's nn_module_stack) and op."""
    stack = node.meta.get("nn_module_stack") or {}
    path = ""
    if stack:
        path = clean_path(list(stack.values())[-1][0])
    return f"{path or '<top>'}:{op_name(node)}"


def _input_name(node: fx.Node, values) -> str:
    src = getattr(node.meta.get("grapharg"), "source", None)
    if src is not None:
        return clean_path(source_name(src))
    return node.name


def _owner_swap(node: fx.Node) -> CacheSwap | str:
    """Where the graph input ``node`` lives (its owner module's ``_buffers`` or the attribute's object); the
    swap's ``half`` is filled in once the halves exist."""
    from torch._dynamo.symbolic_convert import InstructionTranslator

    src = getattr(node.meta.get("grapharg"), "source", None)
    base = getattr(src, "base", None)
    key = getattr(src, "index", None) if hasattr(src, "index") else getattr(src, "member", None)
    if base is None or not isinstance(key, str):
        return f"cache {node.name} is not a module attribute the pass can replace (source {src and source_name(src)})"
    tx = InstructionTranslator.current_tx()
    scope = {"L": tx.f_locals, "G": tx.f_globals}
    base_name = source_name(base)
    try:
        owner = eval(base_name, scope)  # noqa: S307 (Dynamo's own source text)
        module = eval(base_name[: -len("._buffers")], scope) if base_name.endswith("._buffers") else None  # noqa: S307
    except Exception as e:  # a source Dynamo can read but a plain eval cannot (e.g. closures)
        return f"cache {node.name} is not a module attribute the pass can replace ({type(e).__name__}: {e})"
    if isinstance(owner, dict) and hasattr(src, "index"):
        return CacheSwap(owner, key, None, module if isinstance(module, torch.nn.Module) else None)
    if hasattr(src, "member") and not isinstance(owner, dict):
        return CacheSwap(owner, key, None)
    return f"cache {node.name} is not a module attribute the pass can replace (source {source_name(src)})"


# ---------------------------------------------------------------------------------------------------
# the rewrite


def rewrite_graph(gm: fx.GraphModule, example_inputs, registry: CacheRegistry, report: OScaRReport) -> list[CacheSwap]:
    """Match and rewrite every site of ``gm`` in place; returns the swaps to apply after its first run.

    Raises RuntimeError only when a cache already held as OScaR halves is used by something this graph
    cannot rewrite: its full-precision copy is gone, so leaving it would be wrong.
    """
    graph = gm.graph
    cfg = registry.config
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    values = {n: v for n, v in zip(placeholders, example_inputs)}
    report.graphs += 1

    groups: dict[tuple, list[Site]] = {}
    seen: Counter = Counter()
    prober = Prober(graph, values)  # one graph's mask/position probes, shared by its sites
    for node in find_attention_nodes(graph):
        name = site_name(node)
        seen[name] += 1
        if seen[name] > 1:  # several attentions in one module (e.g. a loop): number them in graph order
            name = f"{name}#{seen[name] - 1}"
        site = match_attention(node, values, cfg.group_size, prober=prober)
        if isinstance(site, str):
            counters["oscar"]["sites_skipped"] += 1
            _add_skipped(report, name, site)
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

    swaps: list[CacheSwap] = []
    grad = torch.is_grad_enabled() and any(getattr(v, "requires_grad", False) for v in example_inputs)
    for (kc, ki, vc, vi), sites in groups.items():
        held = is_oscar_cache(values.get(kc)) or is_oscar_cache(values.get(vc)) or registry.replaced(values.get(kc))
        why = _check_group(sites, registry, values)
        if grad:  # the oscar ops have no backward; leave the graph as it is (not pinned: may differ next time)
            why = "autograd is enabled: OScaR ops are inference-only (use torch.no_grad())"
        if why and held:
            raise RuntimeError(
                f"oscar_compile: cache {'/'.join(sites[0].cache_attrs)} is held as OScaR state, but this graph "
                f"cannot rewrite it: {why}"
            )
        if why:
            for s in sites:
                _add_skipped(report, s.name, why)
            counters["oscar"]["sites_skipped"] += len(sites)
            if not grad:
                registry.mark_untouched(values.get(kc), why, ki)
                registry.mark_untouched(values.get(vc), why, vi)
            continue
        name = "/".join(sites[0].cache_attrs)
        if is_oscar_cache(values[kc]):  # a later graph: the halves are the module's own attributes
            k_half, v_half = values[kc], values[vc]
            if not (isinstance(k_half, OScaRKeyCache) and isinstance(v_half, OScaRValueCache)):
                raise RuntimeError(f"oscar_compile: cache {name} pairs {type(k_half).__name__} with {type(v_half).__name__}")
            k_node, v_node = kc, vc
            bf16 = 2 * k_half.numel() * k_half.element_size()
        else:  # the first graph: allocate the halves, read them from the GraphModule, swap them in after the run
            state = registry.replaced(values[kc])
            if state is None:
                k_swap, v_swap = _owner_swap(kc), _owner_swap(vc)
                reason = next((s for s in (k_swap, v_swap) if isinstance(s, str)), None)
                if reason is None and (ki is not None or vi is not None):
                    reason = "a layer of a stacked [L, B, H, S, D] cache buffer (OScaR state replaces whole per-layer caches)"
                if reason is not None:
                    for s in sites:
                        _add_skipped(report, s.name, reason)
                    registry.mark_untouched(values[kc], reason, ki)
                    registry.mark_untouched(values[vc], reason, vi)
                    continue
                state = registry.replace(values[kc], values[vc], name, sites[0].layout)
                k_swap.half, v_swap.half = state.keys, state.values
                swaps += [k_swap, v_swap]
            k_half, v_half, bf16 = state.keys, state.values, state.bf16_bytes
            k_node, v_node = _get_attrs(gm, sites, registry, state)
        _rewrite_group(graph, sites, k_node, v_node)
        report.add_cache(name, bf16, layer_nbytes(k_half, v_half), layer_slots(k_half), k_half.bits)
        for s in sites:
            report.add_rewritten(
                SiteRecord(s.name, s.kind, name, s.heads, s.kv_heads, s.head_dim, s.mask_kind, s.write_op)
            )
        counters["oscar"]["sites_rewritten"] += len(sites)

    _check_leftover_uses(placeholders, values, registry, report)
    graph.lint()
    gm.recompile()
    for n in graph.nodes:
        if _is_oscar(n):
            report.op_counts[op_name(n)] += 1
        elif n.op == "call_function" and n.target is cache_step:
            report.op_counts["cache_step"] += 1
    return swaps


def _get_attrs(gm: fx.GraphModule, sites: list[Site], registry: CacheRegistry, state: ReplacedCache):
    """``get_attr`` nodes reading the halves registered on ``gm`` (AOT lifts them as graph inputs)."""
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    first = min(sites, key=lambda s: order[s.out])
    nodes = []
    for role, half in (("keys", state.keys), ("values", state.values)):
        attr = next((n for n, b in gm.named_buffers() if b is half), None)
        if attr is None:
            attr = f"_oscar_cache{registry.count}_{role}_{len(list(gm.buffers()))}"
            gm.register_buffer(attr, half)
            sources = getattr(gm, "_param_name_to_source", None)  # AOT wants a Dynamo source for each input
            if sources is not None:
                sources[attr] = ConstantSource(attr)
        with graph.inserting_before(first.out):
            nodes.append(graph.get_attr(attr))
    return nodes


def _rewrite_group(graph: fx.Graph, sites: list[Site], k_node: fx.Node, v_node: fx.Node) -> None:
    order = {n: i for i, n in enumerate(graph.nodes)}
    sites = sorted(sites, key=lambda s: order[s.out])
    kw, vw = sites[0].key_write, sites[0].value_write
    from_zero = any(s.from_zero for s in sites)
    aligned = tuple(dict.fromkeys(g for s in sites for g in s.guards))
    position = kw.position
    written = mutations(graph)
    with graph.inserting_before(kw.node):
        if isinstance(position, fx.Node) and isinstance(meta_val(position), torch.Tensor) and root(position) in written:
            # positions read from a buffer the graph modifies later (a position counter): keep the values the
            # write used, not what a view of the buffer holds when the attention runs
            position = graph.call_method("clone", (position,))
    new = []
    for w in (kw, vw):
        x = w.new
        if w.new_perm is not None:  # a [B, T, H, D] write: the step's tokens as [B, Hkv, T, D]
            with graph.inserting_before(sites[0].out):
                x = graph.call_method("permute", (x, *w.new_perm))
        new.append(x)
    for i, s in enumerate(sites):
        with graph.inserting_before(s.out):
            att = graph.call_function(
                cache_step,
                (s.query, k_node, v_node, new[0], new[1], position),
                dict(scale=s.scale, softcap=s.softcap, first=i == 0, last=i == len(sites) - 1, from_zero=from_zero,
                     window=s.window, aligned=aligned if i == 0 else ()),
            )  # fmt: skip
            query_dtype = getattr(s.query.meta.get("example_value", s.query.meta.get("val")), "dtype", s.out_dtype)
            if s.out_dtype is not None and s.out_dtype != query_dtype:
                att = graph.call_method("to", (att, s.out_dtype))
        s.out.replace_all_uses_with(att)

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


def _check_leftover_uses(placeholders, values, registry: CacheRegistry, report: OScaRReport) -> None:
    """What is left of a replaced cache must not read it: its full-precision copy is stale or gone.

    Halves that reach ``oscar::sdpa`` (transformers' ``OScaRCache`` route) are handled by their own dispatch.
    """
    from .cache_trace import trace_cache

    through_sdpa = set()
    for n in placeholders[0].graph.nodes if placeholders else ():
        if _is_oscar(n) and op_name(n) == "sdpa":
            through_sdpa |= {trace_cache(a).source for a in n.args[1:3]}
    for ph in placeholders:
        if ph in through_sdpa:
            continue
        tensor = values.get(ph)
        users = [u for u in ph.users if u.target is not cache_step]
        if not isinstance(tensor, torch.Tensor) or not users:
            continue
        if not is_oscar_cache(tensor) and registry.replaced(tensor) is None:
            continue
        user = users[0]
        reasons = "; ".join(r for _, r in report.skipped) or "no matching attention"
        raise RuntimeError(
            f"oscar_compile: cache {_input_name(ph, values)} is held as OScaR state, but this graph also uses it "
            f"in a way the pass cannot rewrite ({user.name}: {op_name(user)}): {reasons}"
        )


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

    try:
        from ..hf_cache import layer_accounting
    except ImportError:  # no transformers: the halves cannot come from an OScaRCache

        def layer_accounting(half):
            return None

    for node in nodes:
        k, v = node.args[1], node.args[2]
        kt, vt = values.get(k), values.get(v)
        if not (is_oscar_cache(kt) and is_oscar_cache(vt)):
            continue
        b, hkv, max_len, d = kt.shape
        qs = shape_of(node.args[0])
        name = site_name(node)
        # bytes of what transformers would hold instead (window-sized sliding layers, the length asked for),
        # counted once per cache layer (its first-step and later halves are distinct graph inputs)
        accounting = layer_accounting(kt)
        if accounting is None:  # halves not from an OScaRCache: a static cache of their length (or window)
            length = max_len if kt.window is None else min(kt.window, max_len)
            accounting = f"{_input_name(k, values)}/{_input_name(v, values)}", 2 * b * hkv * length * d * kt.element_size()
        writes = sorted({op_name(u) for u in k.users if u is not node})
        report.add_rewritten(
            SiteRecord(name, "sdpa (OScaRCache)", accounting[0], qs[1] if qs else -1, hkv, d,
                       "attention_mask (left padding)", ",".join(writes) or "none")  # fmt: skip
        )
        report.add_cache(accounting[0], accounting[1], layer_nbytes(kt, vt), layer_slots(kt), kt.bits)


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
            tensor = values[t.source]
            if is_oscar_cache(tensor) or registry.replaced(tensor) is not None:
                raise RuntimeError(
                    f"oscar_compile: attention {node.name} reads cache {_input_name(t.source, values)}, which is "
                    f"held as OScaR state, but cannot be rewritten here: {reason}"
                )
            registry.mark_untouched(tensor, reason, t.index)


def _add_skipped(report: OScaRReport, name: str, reason: str) -> None:
    """One report line per site and cause: reasons that differ only in numbers (the probe that disagreed, in
    another graph of the same model) are the same cause."""
    stem = re.sub(r"\d+", "#", reason)
    if not any(n == name and re.sub(r"\d+", "#", r) == stem for n, r in report.skipped):
        report.add_skipped(name, reason)


def _check_group(sites: list[Site], registry: CacheRegistry, values) -> str | None:
    """Whole-group preconditions: consistent writes, nothing else reads the cache, not pinned to bf16."""
    first = sites[0]
    for s in sites[1:]:
        if s.key_write.node is not first.key_write.node or s.value_write.node is not first.value_write.node:
            return "sites sharing a cache see different writes"
    for cache, index in ((first.key_cache, first.key_index), (first.value_cache, first.value_index)):
        pinned = registry.untouched_reason(values.get(cache), index)
        if pinned:
            return pinned  # the reason an earlier graph kept it in full precision (one report line per site)
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
