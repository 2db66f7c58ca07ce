"""Following a key/value back to a cache input, and finding that cache's writes (torch IR and ATen).

:func:`trace_cache` walks layout ops (views, transposes, GQA expansion, casts, sequence prefixes) from the
tensor attention consumes to its source, checking that they compose to the identity on ``[B, H, S, D]``
apart from a consecutive head repetition; :func:`find_cache_writes` lists the in-place writes of new tokens
along the sequence dim (or the reasons other writes are not understood).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import fx

from .graph import LAYOUT_OPS, VIEWISH, WRITE_NAMES, arg, graph_input, op_name, shape_of

__all__ = ["CacheWrite", "Trace", "between", "trace_cache", "root", "find_cache_writes", "layer_index"]


@dataclass
class CacheWrite:
    """One in-place write of new tokens into a cache: ``cache[:, :, position] = new``."""

    node: fx.Node  # the write (setitem / index_copy_ / index_put_ / copy_ / functional aten op)
    op: str
    cache: fx.Node  # the graph input written
    new: fx.Node  # [B, Hkv, T, D] new keys or values
    position: Any  # positions tensor node ([T] or [B, T]) or the int start of a slice write
    extra: list = field(default_factory=list)  # helper nodes owned by the write (slice view of copy_)


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


def trace_cache(node: fx.Node) -> Trace:
    """Follow ``node`` back through layout ops (views, transposes, GQA expansion, casts, seq slicing).

    Checks that the layout ops compose to the identity on ``[B, H, S, D]`` apart from a consecutive
    (``repeat_kv``-style) head repetition and slices of S starting at 0.
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
                if out_shape == in_shape:
                    pass
                elif (len(in_shape) == 5 and len(out_shape) == 4 and out_shape[1] == in_shape[1] * in_shape[2]
                      and out_shape[0] == in_shape[0] and out_shape[2:] == in_shape[3:]):  # fmt: skip
                    # repeat_kv: [B, Hkv, n, S, D] -> [B, Hkv*n, S, D]; consecutive iff the n axis came from an
                    # unsqueeze/None at dim 2 that was then expanded (checked below)
                    exp = src
                    while op_name(exp) in LAYOUT_OPS:
                        exp = exp.args[0]
                    if op_name(exp) != "expand":
                        return Trace(cur, chain, gqa, f"head reshape at {cur.name} is not a repeat_kv expansion")
                    ins = exp.args[0]
                    ishape = shape_of(ins)
                    if ishape is None or len(ishape) != 5 or ishape[2] != 1:
                        return Trace(cur, chain, gqa, f"expand at {exp.name} does not repeat a new axis at dim 2")
                    gqa *= in_shape[2]
                    chain.extend([cur] + between(src, exp) + [exp])
                    cur = _unsqueeze_source(ins, chain)
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
                if not isinstance(reps, int) or dim not in (1, -3) or len(in_shape) != 4:
                    return Trace(cur, chain, gqa, f"repeat_interleave at {cur.name} is not a head repetition (dim={dim})")
                if perm[1] != 1:
                    return Trace(cur, chain, gqa, f"repeat_interleave at {cur.name} on a transposed cache")
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
            else:  # getitem / slice / narrow: only slices of S from 0
                why = _check_seq_slice(cur, name, in_shape, perm, ends)
                if why:
                    return Trace(cur, chain, gqa, why)
        else:
            break
        chain.append(cur)
        cur = src
    if perm != [0, 1, 2, 3]:
        return Trace(cur, chain, gqa, f"cache read through transposes that do not cancel (dims {perm})")
    return Trace(cur, chain, gqa, ends=ends)



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


def _unsqueeze_source(node, chain):
    """Input of the dim-2 unsqueeze (or ``x[:, :, None]``) under a repeat_kv expand, or a reason."""
    name = op_name(node)
    if name == "unsqueeze" and arg(node, 1, "dim") in (2, -3):
        chain.append(node)
        return node.args[0]
    if name == "getitem" and isinstance(node.args[1], tuple):
        idx = node.args[1]
        if len(idx) >= 3 and idx[2] is None and all(i == slice(None) for i in idx[:2]) and all(
            i == slice(None) or i is Ellipsis for i in idx[3:]
        ):
            chain.append(node)
            return node.args[0]
    return f"repeat_kv expansion at {getattr(node, 'name', node)} does not insert the repeat axis at dim 2"


def _check_seq_slice(node, name, in_shape, perm, ends: list) -> str | None:
    """Allow only slices of the sequence dim (logical 2) that start at 0 (their stops go to ``ends``)."""
    if name == "getitem":
        idx = node.args[1]
        idx = idx if isinstance(idx, tuple) else (idx,)
        if any(i is None or i is Ellipsis or not isinstance(i, slice) for i in idx):
            return f"cache indexed with {idx} at {node.name}"
        items = list(enumerate(idx))
    else:
        if name == "slice":
            dim, start, step = arg(node, 1, "dim", 0), arg(node, 2, "start", None), arg(node, 4, "step", 1)
        else:  # narrow(x, dim, start, length)
            dim, start, step = node.args[1], node.args[2], 1
        stop = arg(node, 3, "end", None) if name == "slice" else node.args[3]
        items = [(dim % len(in_shape), slice(start, stop, step))]
    for d, s in items:
        full = s.start in (None, 0) and s.step in (None, 1)
        if s == slice(None):
            continue
        if perm[d] != 2 or not full:
            return f"cache sliced on dim {d} ({s}) at {node.name}: only prefixes of the sequence dim are allowed"
        ends.append(s.stop)
    return None


# ---------------------------------------------------------------------------------------------------
# cache writes


def find_cache_writes(cache: fx.Node, index: int | None = None) -> tuple[list[CacheWrite], list[str]]:
    """In-place writes of new tokens into graph input ``cache`` along dim 2, and reasons for other writes.

    ``index``: the cache is layer ``index`` of a stacked ``[L, B, H, S, D]`` buffer: writes go through views
    ``cache[index]`` or index it directly (``cache[index, :, :, pos] = k``); other layers' writes are ignored.
    """
    if index is None:
        return _writes_into(cache, cache, [])
    writes, problems = [], []
    for user in cache.users:
        name = op_name(user)
        if layer_index(user) is not None and user.args[0] is cache:
            if layer_index(user) == index:
                w, p = _writes_into(user, cache, [user])
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


def _writes_into(cache: fx.Node, owner: fx.Node, extra: list) -> tuple[list[CacheWrite], list[str]]:
    """Writes among the users of ``cache`` (the graph input ``owner`` itself, or a layer view of it)."""
    writes, problems = [], []
    for user in cache.users:
        name = op_name(user)
        if not user.args or user.args[0] is not cache:
            continue
        if name in ("index_copy", "index_put", "slice_scatter") and not any(
            op_name(u) == "copy_" and u.args[0] is cache and u.args[1] is user for u in cache.users
        ):
            # functional: only a write when copied back (the ATen epilogue); a Dynamo-level torch.index_put
            # returns a new tensor and leaves the cache as it was
            problems.append(f"{user.name}: functional {name} whose result is not copied back into the cache")
            continue
        if name == "setitem":
            pos = _seq_index(user.args[1])
            if isinstance(pos, str):
                problems.append(f"{user.name}: {pos}")
            else:
                writes.append(CacheWrite(user, "setitem", owner, user.args[2], pos, extra=list(extra)))
        elif name in ("index_copy_", "index_copy"):
            dim = arg(user, 1, "dim")
            if dim not in (2, -2):
                problems.append(f"{user.name}: index_copy along dim {dim}, not the sequence dim")
            else:
                writes.append(CacheWrite(user, name, owner, arg(user, 3, "source"), arg(user, 2, "index"), list(extra)))
        elif name in ("index_put_", "index_put"):
            pos = _seq_index(tuple(arg(user, 1, "indices")))
            if isinstance(pos, str) or arg(user, 3, "accumulate", False):
                problems.append(f"{user.name}: {pos if isinstance(pos, str) else 'accumulating index_put'}")
            else:
                writes.append(CacheWrite(user, name, owner, arg(user, 2, "values"), pos, list(extra)))
        elif name in ("getitem", "narrow", "slice"):
            copies = [u for u in user.users if op_name(u) == "copy_" and u.args[0] is user]
            if not copies:
                continue
            if name == "getitem":
                pos = _seq_index(user.args[1])
                if not isinstance(pos, str) and isinstance(pos, fx.Node):
                    pos = "copy_ into an indexed (not sliced) view"
            else:
                dim = user.args[1] if name == "narrow" else arg(user, 1, "dim", 0)
                pos = user.args[2] if dim in (2, -2) else f"copy_ into a slice of dim {dim}"
            if isinstance(pos, str):
                problems.append(f"{copies[0].name}: {pos}")
            else:
                writes.append(CacheWrite(copies[0], "copy_", owner, copies[0].args[1], pos, extra=[user, *extra]))
        elif name == "slice_scatter" and arg(user, 2, "dim", 0) in (2, -2):
            writes.append(CacheWrite(user, name, owner, user.args[1], arg(user, 3, "start", 0), list(extra)))
        elif name in VIEWISH and any(
            u.args and u.args[0] is user and (op_name(u) == "setitem" or str(op_name(u)).endswith("_"))
            for u in user.users
        ):
            problems.append(f"{user.name}: cache written through a {name} view; only [B, H, S, D] caches written "
                            "along dim 2 are rewritten")  # fmt: skip
        elif name == "copy_" and _writes_of(user.args[1], cache):
            pass  # functionalized epilogue copy_(cache, index_copy(cache, ...)): part of that write
        elif name in WRITE_NAMES or (isinstance(name, str) and name.endswith("_")):
            problems.append(f"{user.name}: unsupported in-place op {name} on the cache")
    return writes, problems


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

