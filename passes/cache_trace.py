"""Following a key/value back to a cache input, and finding that cache's writes (torch IR and ATen).

:func:`trace_cache` walks layout ops (views, transposes, GQA expansion, casts, sequence prefixes) from the
tensor attention consumes to its source, checking that they compose to the identity on ``[B, H, S, D]``
(or to a transpose of a ``[B, S, H, D]`` buffer) apart from a consecutive head repetition, prefixes of the
sequence dim and slices that keep a dim whole; :func:`find_cache_writes` lists the in-place writes of new
tokens along the sequence dim, directly or through transposes and slices of the cache (or the reasons other
writes are not understood). Which positions a write and a prefix read cover is decided by evaluation in
:mod:`.sites` (the positions, slice bounds and prefix ends recorded here are graph values).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from .graph import (
    LAYOUT_OPS, VIEWISH, WRITE_NAMES, arg, graph_input, is_inplace, meta_val, op_name, shape_of,
)  # fmt: skip

__all__ = ["CacheWrite", "Trace", "between", "trace_cache", "root", "find_cache_writes", "layer_index"]


@dataclass
class CacheWrite:
    """One in-place write of new tokens into a cache: ``cache[:, :, position] = new``."""

    node: fx.Node  # the write (setitem / index_copy_ / index_put_ / copy_ / functional aten op)
    op: str
    cache: fx.Node  # the graph input written
    new: fx.Node  # [B, Hkv, T, D] new keys or values
    position: Any  # positions tensor node ([T] or [B, T]) or the start (int or SymInt node) of a slice write
    extra: list = field(default_factory=list)  # helper nodes owned by the write (the views it writes through)
    stop: Any = None  # end of a slice write (int, SymInt node, or None: the cache's end); None for index writes
    new_perm: tuple | None = None  # permutation taking ``new`` to [B, Hkv, T, D] (a [B, T, H, D] write), or None
    length: Any = None  # length of a ``narrow`` write (int or SymInt node), else None


# ---------------------------------------------------------------------------------------------------
# tracing keys/values back to a cache


@dataclass
class Trace:
    source: fx.Node  # graph input (cache) or the first node that is not a layout op
    nodes: list  # layout nodes between source and the attention (read chain)
    gqa: int = 1  # head repetition removed by the trace
    error: str | None = None
    ends: list = field(default_factory=list)  # stops of sequence-prefix slices on the way
    index: int | None = None  # layer i of a stacked [L, B, H, S, D] cache buffer (source[i]), else None
    layout: str = "bhsd"  # the cache buffer's layout: [B, H, S, D] or "bshd" ([B, S, H, D], Meta's reference Llama)


def trace_cache(node: fx.Node) -> Trace:
    """Follow ``node`` back through layout ops (views, transposes, GQA expansion, casts, seq slicing).

    Checks that the layout ops compose to the identity on ``[B, H, S, D]`` (or to ``transpose(1, 2)`` of a
    ``[B, S, H, D]`` buffer, ``layout="bshd"``) apart from a consecutive (``repeat_kv``-style) head
    repetition, slices of S starting at 0, and slices of other dims that keep their whole size.
    """
    chain, ends = [], []
    gqa = 1
    perm = [0, 1, 2, 3]  # logical dims at current positions (tracked back from the attention end)
    cur = node
    while isinstance(cur, fx.Node) and cur.op in ("call_function", "call_method"):
        name = op_name(cur)
        src = cur.args[0] if cur.args else None
        if name in LAYOUT_OPS:
            pass
        elif name in ("index_copy_", "index_put_", "index_copy", "index_put", "slice_scatter"):
            pass  # a write returns the (updated) cache itself
        elif layer_index(cur) is not None and graph_input(src):
            chain.append(cur)  # source[i] of a stacked per-layer buffer: the cache is that slice
            if perm != [0, 1, 2, 3]:
                return Trace(src, chain, gqa, f"cache read through transposes that do not cancel (dims {perm})")
            return Trace(src, chain, gqa, ends=ends, index=layer_index(cur))
        elif name in ("view", "reshape", "_unsafe_view", "expand", "unsqueeze", "repeat_interleave", "getitem",
                      "slice", "transpose", "permute", "flatten", "narrow"):  # fmt: skip
            out_shape, in_shape = shape_of(cur), shape_of(src)
            if out_shape is None or in_shape is None:
                return Trace(cur, chain, gqa, f"no shape information at {cur.name}")
            if name in ("view", "reshape", "_unsafe_view", "flatten"):
                k = _merged_dim(in_shape, out_shape)
                if out_shape == in_shape:
                    pass
                elif k is not None and perm[k] == 1:
                    # repeat_kv: [.., Hkv, n, ..] -> [.., Hkv*n, ..] (the heads at dim k); consecutive iff the n axis
                    # came from an unsqueeze/None at dim k + 1 that was then expanded (checked below)
                    exp = src
                    while op_name(exp) in LAYOUT_OPS:
                        exp = exp.args[0]
                    if op_name(exp) != "expand":
                        return Trace(cur, chain, gqa, f"head reshape at {cur.name} is not a repeat_kv expansion")
                    ins = exp.args[0]
                    ishape = shape_of(ins)
                    if ishape is None or len(ishape) != 5 or ishape[k + 1] != 1:
                        return Trace(cur, chain, gqa, f"expand at {exp.name} does not repeat a new axis after the heads")
                    gqa *= in_shape[k + 1]
                    chain.extend([cur] + between(src, exp) + [exp])
                    cur = _unsqueeze_source(ins, chain, k + 1)
                    if isinstance(cur, str):
                        return Trace(exp, chain, gqa, cur)
                    continue
                else:
                    return Trace(cur, chain, gqa, f"{name} at {cur.name} changes the cache layout {in_shape} -> {out_shape}")
            elif name == "expand":
                if out_shape != in_shape:
                    return Trace(cur, chain, gqa, f"expand at {cur.name} broadcasts the cache {in_shape} -> {out_shape}")
            elif name == "unsqueeze":
                return Trace(cur, chain, gqa, f"unsqueeze at {cur.name} outside a repeat_kv expansion")
            elif name == "repeat_interleave":
                reps, dim = arg(cur, 1, "repeats"), arg(cur, 2, "dim")
                if not isinstance(reps, int) or not isinstance(dim, int) or len(in_shape) != 4:
                    return Trace(cur, chain, gqa, f"repeat_interleave at {cur.name} is not a head repetition (dim={dim})")
                if perm[dim % 4] != 1:
                    return Trace(cur, chain, gqa, f"repeat_interleave at {cur.name} repeats dim {dim}, not the heads")
                gqa *= reps
            elif name in ("transpose", "permute"):
                if len(in_shape) != 4:
                    return Trace(cur, chain, gqa, f"{name} at {cur.name} on a {len(in_shape)}-d tensor")
                if name == "transpose":
                    a, b = (d % 4 for d in cur.args[1:3])
                    p = list(range(4))
                    p[a], p[b] = p[b], p[a]
                else:
                    p = [d % 4 for d in (cur.args[1] if isinstance(cur.args[1], (list, tuple)) else cur.args[1:])]
                # output dim i is input dim p[i]; going backwards: perm_in[p[i]] = perm_out[i]
                new = [0] * 4
                for i in range(4):
                    new[p[i]] = perm[i]
                perm = new
            else:  # getitem / slice / narrow: only slices of S from 0, and slices that keep a dim whole
                why = _check_seq_slice(cur, name, in_shape, out_shape, perm, ends)
                if why:
                    return Trace(cur, chain, gqa, why)
        else:
            break
        chain.append(cur)
        cur = src
    layout = LAYOUTS.get(tuple(perm))
    if layout is None:
        return Trace(cur, chain, gqa, f"cache read through transposes that do not cancel (dims {perm})")
    return Trace(cur, chain, gqa, ends=ends, layout=layout)


# physical dim order of each supported cache layout, in logical dims (B=0, H=1, S=2, D=3)
LAYOUTS = {(0, 1, 2, 3): "bhsd", (0, 2, 1, 3): "bshd"}
PHYSICAL = {"bhsd": (0, 1, 2, 3), "bshd": (0, 2, 1, 3)}  # logical dim -> physical dim of the buffer


def _merged_dim(in_shape, out_shape) -> int | None:
    """``k`` when a 5-d -> 4-d reshape merges dims ``k`` and ``k + 1`` and keeps the others, else None."""
    if len(in_shape) != 5 or len(out_shape) != 4:
        return None
    for k in range(4):
        if (tuple(out_shape[:k]) == tuple(in_shape[:k]) and out_shape[k] == in_shape[k] * in_shape[k + 1]
                and tuple(out_shape[k + 1:]) == tuple(in_shape[k + 2:])):  # fmt: skip
            return k
    return None


def layer_index(node) -> int | None:
    """``i`` when ``node`` is ``x[i]`` (or ``x.select(0, i)``) of a 5-d ``x`` (a stacked per-layer cache)."""
    name = op_name(node)
    if name not in ("getitem", "select") or not node.args:
        return None
    shape = shape_of(node.args[0])
    if shape is None or len(shape) != 5:
        return None
    if name == "select":
        dim, i = arg(node, 1, "dim"), arg(node, 2, "index")
        return i if dim == 0 and isinstance(i, int) else None
    idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    if isinstance(idx[0], int) and not isinstance(idx[0], bool) and all(i == slice(None) for i in idx[1:]):
        return idx[0] % shape[0]
    return None


def root(node):
    """First node above ``node`` that is not a view/layout op (ignores whether the views are supported)."""
    while op_name(node) in VIEWISH and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def between(node, stop):
    out = []
    while node is not stop and isinstance(node, fx.Node):
        out.append(node)
        node = node.args[0]
    return out


def _unsqueeze_source(node, chain, dim: int = 2):
    """Input of the unsqueeze at ``dim`` (or ``x[:, :, None]``-style indexing) under a repeat_kv expand, or a reason."""
    name = op_name(node)
    if name == "unsqueeze" and arg(node, 1, "dim") in (dim, dim - 5):
        chain.append(node)
        return node.args[0]
    if name == "getitem" and isinstance(node.args[1], tuple):
        idx = node.args[1]
        if (len(idx) > dim and idx[dim] is None and all(i == slice(None) for i in idx[:dim])
                and all(i == slice(None) or i is Ellipsis for i in idx[dim + 1:])):  # fmt: skip
            chain.append(node)
            return node.args[0]
    return f"repeat_kv expansion at {getattr(node, 'name', node)} does not insert the repeat axis after the heads"


def _expand_index(idx: tuple, ndim: int):
    """``idx`` with its Ellipsis replaced by whole slices (a reason when it has more than one)."""
    dots = [i for i, x in enumerate(idx) if x is Ellipsis]
    if len(dots) > 1:
        return f"index {idx} has more than one Ellipsis"
    if dots:
        e = dots[0]
        n = ndim - (len(idx) - 1 - sum(1 for x in idx if x is None))
        idx = idx[:e] + (slice(None),) * max(n, 0) + idx[e + 1 :]
    return tuple(idx)


def _check_seq_slice(node, name, in_shape, out_shape, perm, ends: list) -> str | None:
    """Allow slices of the sequence dim (logical 2) that start at 0 (their stops go to ``ends``) and slices of
    other dims that keep the whole dim (``cache[:bsz]`` with ``bsz`` the batch)."""
    if name == "getitem":
        idx = node.args[1]
        idx = _expand_index(idx if isinstance(idx, tuple) else (idx,), len(in_shape))
        if isinstance(idx, str) or any(i is None or not isinstance(i, slice) for i in idx):
            return f"cache indexed with {node.args[1]} at {node.name}"
        items = list(enumerate(idx))
    else:
        if name == "slice":
            dim, start, step = arg(node, 1, "dim", 0), arg(node, 2, "start", None), arg(node, 4, "step", 1)
        else:  # narrow(x, dim, start, length)
            dim, start, step = node.args[1], node.args[2], 1
        stop = arg(node, 3, "end", None) if name == "slice" else node.args[3]
        items = [(dim % len(in_shape), slice(start, stop, step))]
    for d, s in items:
        if s == slice(None):
            continue
        full = s.start in (None, 0) and s.step in (None, 1)
        if full and d < len(perm) and perm[d] == 2:
            ends.append(s.stop)
            continue
        if full and out_shape[d] == in_shape[d]:
            continue  # keeps the whole dim
        return f"cache sliced on dim {d} ({s}) at {node.name}: only prefixes of the sequence dim are allowed"
    return None


# ---------------------------------------------------------------------------------------------------
# cache writes


def find_cache_writes(
    cache: fx.Node, index: int | None = None, layout: str = "bhsd"
) -> tuple[list[CacheWrite], list[str]]:
    """In-place writes of new tokens into graph input ``cache`` along its sequence dim, and reasons for other
    writes. ``layout``: ``"bhsd"`` (sequence dim 2) or ``"bshd"`` (dim 1).

    A write may go through views of the cache that keep every other dim whole: transposes/permutes, slices
    of the sequence dim (``cache[:, :, a:b].copy_(k)``, ``narrow``), ``cache[:bsz]`` with ``bsz`` the batch.
    ``index``: the cache is layer ``index`` of a stacked ``[L, B, H, S, D]`` buffer: writes go through views
    ``cache[index]`` or index it directly (``cache[index, :, :, pos] = k``); other layers' writes are ignored.
    """
    if index is None:
        return _writes_into(cache, cache, [], layout)
    writes, problems = [], []
    for user in cache.users:
        name = op_name(user)
        if layer_index(user) is not None and user.args[0] is cache:
            if layer_index(user) == index:
                w, p = _writes_into(user, cache, [user], layout)
                writes += w
                problems += p
        elif name == "setitem" and user.args[0] is cache:
            idx = user.args[1] if isinstance(user.args[1], tuple) else (user.args[1],)
            if not isinstance(idx[0], int) or isinstance(idx[0], bool):
                problems.append(f"{user.name}: write of the stacked buffer with index {idx}")
            elif idx[0] % shape_of(cache)[0] == index:
                pos = _seq_index(idx[1:])
                if isinstance(pos, str):
                    problems.append(f"{user.name}: {pos}")
                else:
                    writes.append(CacheWrite(user, "setitem", cache, user.args[2], pos))
        elif user.args and user.args[0] is cache and (name in WRITE_NAMES or str(name).endswith("_")):
            problems.append(f"{user.name}: {name} writes the whole stacked cache buffer")
    return writes, problems


def _writes_into(cache: fx.Node, owner: fx.Node, extra: list, layout: str = "bhsd") -> tuple[list, list]:
    """Writes among the users of ``cache`` (the graph input ``owner`` itself, or a layer view of it)."""
    writes, problems = [], []
    for user in cache.users:
        name = op_name(user)
        if not user.args or user.args[0] is not cache or name not in ("index_copy", "index_put", "slice_scatter"):
            continue
        # functional (ATen graphs): only a write when copied back (the epilogue); a Dynamo-level torch.index_put
        # returns a new tensor and leaves the cache as it was
        if not any(op_name(u) == "copy_" and u.args[0] is cache and u.args[1] is user for u in cache.users):
            problems.append(f"{user.name}: functional {name} whose result is not copied back into the cache")
        elif layout != "bhsd":
            problems.append(f"{user.name}: functional {name} into a {layout} cache")
        elif name == "index_copy":
            dim = arg(user, 1, "dim")
            if dim not in (2, -2):
                problems.append(f"{user.name}: index_copy along dim {dim}, not the sequence dim")
            else:
                writes.append(CacheWrite(user, name, owner, arg(user, 3, "source"), arg(user, 2, "index"), list(extra)))
        elif name == "index_put":
            pos = _seq_index(tuple(arg(user, 1, "indices")))
            if isinstance(pos, str) or arg(user, 3, "accumulate", False):
                problems.append(f"{user.name}: {pos if isinstance(pos, str) else 'accumulating index_put'}")
            else:
                writes.append(CacheWrite(user, name, owner, arg(user, 2, "values"), pos, list(extra)))
        elif arg(user, 2, "dim", 0) in (2, -2):  # slice_scatter
            writes.append(CacheWrite(user, name, owner, user.args[1], arg(user, 3, "start", 0), list(extra),
                                     stop=arg(user, 4, "end", None)))  # fmt: skip
        else:
            problems.append(f"{user.name}: slice_scatter along dim {arg(user, 2, 'dim', 0)}, not the sequence dim")
    _walk_writes(cache, owner, tuple(range(len(shape_of(cache) or (0,) * 4))), None, list(extra), layout,
                 writes, problems, top=True)  # fmt: skip
    return writes, problems


def _walk_writes(node, owner, dims, window, chain, layout, writes, problems, top=False) -> None:
    """In-place writes among the users of ``node``, a view of the cache whose dim ``i`` is the cache's dim
    ``dims[i]``; ``window``: ``(start, stop, length)`` when the view is a slice of the sequence dim."""
    seq = PHYSICAL[layout][2]
    for user in node.users:
        name = op_name(user)
        if not user.args or user.args[0] is not node or name in ("index_copy", "index_put", "slice_scatter"):
            continue
        perm = _new_perm(dims, layout)
        if name in ("setitem", "index_put_"):
            if name == "setitem":
                idx = user.args[1]
            else:
                idx = tuple(slice(None) if i is None else i for i in arg(user, 1, "indices"))
            new = user.args[2] if name == "setitem" else arg(user, 2, "values")
            pos = _index_write(idx, node, dims, window, seq)
            if name == "index_put_" and arg(user, 3, "accumulate", False):
                pos = "accumulating index_put_"
            if isinstance(pos, str):
                problems.append(f"{user.name}: {pos}")
            else:
                writes.append(CacheWrite(user, name, owner, new, pos[0], list(chain), pos[1], perm, length=pos[2]))
        elif name == "index_copy_":
            dim = arg(user, 1, "dim")
            if window is not None or not isinstance(dim, int) or dims[dim % len(dims)] != seq:
                problems.append(f"{user.name}: index_copy along dim {dim}, not the sequence dim")
            else:
                writes.append(CacheWrite(user, name, owner, arg(user, 3, "source"), arg(user, 2, "index"), list(chain),
                                         new_perm=perm))  # fmt: skip
        elif name == "copy_":
            if top and _writes_of(user.args[1], node):
                continue  # functionalized epilogue copy_(cache, index_copy(cache, ...)): part of that write
            if window is None:
                problems.append(f"{user.name}: copy_ into the whole cache (not a slice of its sequence dim)")
            else:
                writes.append(CacheWrite(user, "copy_", owner, user.args[1], window[0], list(chain), window[1], perm,
                                         length=window[2]))  # fmt: skip
        elif name in ("transpose", "permute", "getitem", "slice", "narrow", "alias", "detach"):
            view = _view_of(user, name, node, dims, window, seq)
            if isinstance(view, str):
                if _written_below(user):
                    problems.append(f"{user.name}: cache written through a {name} view: {view}")
                continue
            _walk_writes(user, owner, view[0], view[1], chain + [user], layout, writes, problems)
        elif name in VIEWISH and _written_below(user):
            problems.append(f"{user.name}: cache written through a {name} view; only writes along the sequence dim "
                            "of the cache (or of transposes and slices of it) are rewritten")  # fmt: skip
        elif is_inplace(user):
            problems.append(f"{user.name}: unsupported in-place op {name} on the cache")


def _written_below(node) -> bool:
    """Some in-place op writes ``node`` or a view of it."""
    for u in node.users:
        if not u.args or u.args[0] is not node:
            continue
        if is_inplace(u) or (op_name(u) in VIEWISH and _written_below(u)):
            return True
    return False


def _new_perm(dims, layout) -> tuple | None:
    """Permutation taking a tensor laid out like the view (dims ``dims`` of the cache) to [B, Hkv, T, D]."""
    if len(dims) != 4 or sorted(dims) != [0, 1, 2, 3]:
        return None
    p = tuple(dims.index(PHYSICAL[layout][i]) for i in range(4))
    return None if p == (0, 1, 2, 3) else p


def _keeps_dim(s, size) -> bool:
    """Slice ``s`` keeps a dim of ``size`` whole (``[:]``, ``[0:]``, ``[:n]`` with ``n >= size``)."""
    if not isinstance(s, slice) or s.start not in (None, 0) or s.step not in (None, 1):
        return False
    stop = s.stop
    if stop is None:
        return True
    v = meta_val(stop) if isinstance(stop, fx.Node) else stop
    if isinstance(v, torch.SymInt) and isinstance(size, torch.SymInt):
        return v.node.expr == size.node.expr
    return isinstance(v, int) and isinstance(size, int) and v >= size


def _view_of(user, name, node, dims, window, seq):
    """``(dims, window)`` of view ``user`` of ``node``, or a reason it is not a view the writes understand."""
    shape, nd = shape_of(node), len(dims)
    if shape is None:
        return f"no shape information at {node.name}"
    if name in ("alias", "detach"):
        return dims, window
    if name in ("transpose", "permute"):
        if name == "transpose":
            p = list(range(nd))
            a, b = (d % nd for d in user.args[1:3])
            p[a], p[b] = p[b], p[a]
        else:
            p = [d % nd for d in (user.args[1] if isinstance(user.args[1], (list, tuple)) else user.args[1:])]
        return tuple(dims[i] for i in p), window
    if name == "getitem":
        idx = user.args[1] if isinstance(user.args[1], tuple) else (user.args[1],)
        idx = _expand_index(idx, nd)
        if isinstance(idx, str) or any(not isinstance(i, slice) for i in idx):
            return f"index {user.args[1]} (only slices make a view)"
        items = list(enumerate(idx))
    else:  # slice(x, dim, start, end, step) / narrow(x, dim, start, length)
        dim = (arg(user, 1, "dim", 0) if name == "slice" else user.args[1]) % nd
        if name == "slice":
            items = [(dim, slice(arg(user, 2, "start", None), arg(user, 3, "end", None), arg(user, 4, "step", 1)))]
        else:
            items = [(dim, ("narrow", user.args[2], user.args[3]))]
    for d, s in items:
        if dims[d] == seq and not (isinstance(s, slice) and s == slice(None)):
            if window is not None:
                return "the sequence dim is sliced twice"
            if isinstance(s, tuple):  # narrow
                window = (s[1], None, s[2])
            elif s.step not in (None, 1):
                return f"a strided slice {s} of the sequence dim"
            else:
                window = (0 if s.start is None else s.start, s.stop, None)
        elif not (isinstance(s, slice) and _keeps_dim(s, shape[d])):
            return f"slice {s} of dim {d}, which is not the sequence dim"
    return dims, window


def _index_write(idx, node, dims, window, seq):
    """``(position, stop, length)`` written by ``view[idx] = new`` (``view`` holds dims ``dims`` of the cache),
    or a reason."""
    nd = len(dims)
    idx = _expand_index(idx if isinstance(idx, tuple) else (idx,), nd)
    if isinstance(idx, str):
        return idx
    if any(i is None for i in idx) or len(idx) > nd:
        return f"write index {idx} does not address the cache's {nd} dims"
    idx = tuple(idx) + (slice(None),) * (nd - len(idx))
    shape = shape_of(node)
    pos = None
    for d, e in enumerate(idx):
        if dims[d] == seq:
            if isinstance(e, slice) and e == slice(None):
                continue
            if window is not None:
                return f"write index {e!r} into a slice of the sequence dim"
            if isinstance(e, fx.Node) and isinstance(meta_val(e), torch.Tensor):
                pos = (e, None, None)
            elif isinstance(e, slice) and e.step in (None, 1):
                pos = (0 if e.start is None else e.start, e.stop, None)
            else:
                return f"write index {e!r} at the sequence dim"
        elif not _keeps_dim(e, shape[d] if shape else None):
            return f"write index {idx} selects batch/heads/channels; only whole-sequence writes are rewritten"
    if pos is None:
        return window if window is not None else f"write index {idx} does not select positions of the sequence dim"
    return pos


def _writes_of(node, cache) -> bool:
    """``node`` is a functional write (aten index_put/index_copy/slice_scatter) of ``cache``."""
    return op_name(node) in ("index_put", "index_copy", "slice_scatter") and node.args[0] is cache


def _seq_index(idx):
    """Positions written by ``cache[idx] = new``: a tensor node indexing dim 2 or a slice start, else a reason."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    if len(idx) < 3:
        return f"write index {idx} does not reach the sequence dim"
    head, seq, rest = idx[:2], idx[2], idx[3:]
    if not all(i is None or i == slice(None) for i in head) or not all(i is None or i == slice(None) for i in rest):
        return f"write index {idx} selects batch/heads/channels; only whole-sequence writes are rewritten"
    if isinstance(seq, fx.Node):
        return seq
    if isinstance(seq, slice) and seq.step in (None, 1) and seq.start is not None:
        return seq.start
    return f"write index {seq!r} at the sequence dim"

