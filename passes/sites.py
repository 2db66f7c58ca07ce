"""Site discovery: attention that reads a KV cache the same FX graph writes (DESIGN.md §3).

Works on Dynamo graphs (torch IR: ``call_method``/torch functions/``operator.setitem``) and on ATen graphs
(``OpOverload`` targets, functional writes); :func:`op_name` normalizes both to one vocabulary.

An *attention node* is SDPA (``torch._C._nn.scaled_dot_product_attention`` or any aten
``_scaled_dot_product_*`` variant) or the final ``matmul`` of decomposed attention
(``matmul(q, k^T) -> mul/div -> mask -> softmax -> casts/dropout(p=0) -> matmul(., v)``). Its key and value
are traced back through layout ops to a graph input (the cache); the cache's writes in the same graph are
found among that input's users. :func:`match_attention` returns a :class:`Site` or a reason string; a
reason never raises.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

__all__ = ["Site", "CacheWrite", "op_name", "find_attention_nodes", "match_attention", "find_cache_writes"]

_NEG_INF = float("-inf")

_PYTHON_OPS = {
    operator.setitem: "setitem",
    operator.getitem: "getitem",
    operator.mul: "mul",
    operator.imul: "mul",
    operator.truediv: "div",
    operator.itruediv: "div",
    operator.add: "add",
    operator.iadd: "add",
    operator.matmul: "matmul",
    operator.invert: "logical_not",
    operator.eq: "eq",
    operator.neg: "neg",
}

# ops that only change layout or dtype of the cache on its way to attention
_LAYOUT_OPS = {
    "contiguous", "to", "type", "float", "half", "bfloat16", "clone", "_to_copy", "detach", "alias",
    "type_as", "lift_fresh_copy",
}  # fmt: skip
_SDPA_NAMES = {
    "scaled_dot_product_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_attention_math",
    "_scaled_dot_product_fused_attention_overrideable",
}
_SOFTMAX_NAMES = {"softmax", "_softmax", "_safe_softmax"}
_MATMUL_NAMES = {"matmul", "bmm"}
_WRITE_NAMES = {"setitem", "index_copy_", "index_copy", "index_put_", "index_put", "copy_", "slice_scatter"}


def op_name(node: Any) -> str | None:
    """Canonical op name of an FX node in either IR (``None`` for placeholders, get_attr, output, constants)."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_method":
        return node.target
    if node.op != "call_function":
        return None
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return t.overloadpacket.__name__
    if isinstance(t, torch._ops.OpOverloadPacket):
        return t.__name__
    if t in _PYTHON_OPS:
        return _PYTHON_OPS[t]
    return getattr(t, "__name__", str(t))


def arg(node: fx.Node, index: int, name: str, default=None):
    """Argument ``index`` (positional) or ``name`` (keyword) of ``node``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def meta_val(node: Any):
    """The fake tensor (or value) an FX node carries (Dynamo: example_value; AOT: val)."""
    if not isinstance(node, fx.Node):
        return node
    return node.meta.get("val", node.meta.get("example_value"))


def shape_of(node: Any) -> tuple | None:
    v = meta_val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _is_const(x, value) -> bool:
    """``x`` is the number ``value``: a Python constant, or (ATen graphs) a 0-d ``full``/``scalar_tensor``."""
    if isinstance(x, fx.Node):
        name = op_name(x)
        if name == "full" and list(x.args[0]) == []:
            x = x.args[1]
        elif name == "scalar_tensor":
            x = x.args[0]
        else:
            return False
    return isinstance(x, (int, float)) and not isinstance(x, bool) and float(x) == value


# ---------------------------------------------------------------------------------------------------
# records


@dataclass
class CacheWrite:
    """One in-place write of new tokens into a cache: ``cache[:, :, position] = new``."""

    node: fx.Node  # the write (setitem / index_copy_ / index_put_ / copy_ / functional aten op)
    op: str
    cache: fx.Node  # the graph input written
    new: fx.Node  # [B, Hkv, T, D] new keys or values
    position: Any  # positions tensor node ([T] or [B, T]) or the int start of a slice write
    extra: list = field(default_factory=list)  # helper nodes owned by the write (slice view of copy_)


@dataclass
class Site:
    """An attention-with-KV-cache site: what the rewrite needs and what the report prints."""

    name: str
    kind: str  # "sdpa" or "decomposed"
    out: fx.Node  # node whose value is the attention output [B, Hq, T, D]
    query: fx.Node
    key_cache: fx.Node
    value_cache: fx.Node
    key_write: CacheWrite | None
    value_write: CacheWrite | None
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    mask_kind: str  # "causal" (is_causal), "causal-position" (tril buffer at the write positions)
    cache_attrs: tuple = (None, None)  # module attribute paths of key/value cache, when known
    removable: set = field(default_factory=set)  # nodes of the attention/read chains (erased on rewrite)
    out_dtype: torch.dtype | None = None

    @property
    def write_op(self) -> str | None:
        return self.key_write.op if self.key_write else None

    @property
    def position(self):
        return self.key_write.position if self.key_write else None


# ---------------------------------------------------------------------------------------------------
# attention nodes


def find_attention_nodes(graph: fx.Graph) -> list[fx.Node]:
    """SDPA nodes and final matmuls of decomposed attention, in graph order."""
    found = []
    for node in graph.nodes:
        name = op_name(node)
        if name in _SDPA_NAMES:
            found.append(node)
        elif name in _MATMUL_NAMES and _probs_source(node.args[0]) is not None:
            found.append(node)
    return found


def _probs_source(node):
    """softmax node feeding ``node`` through casts / dropout(p=0), else None."""
    while isinstance(node, fx.Node):
        name = op_name(node)
        if name in _SOFTMAX_NAMES:
            return node
        if name in _LAYOUT_OPS:
            node = node.args[0]
        elif name in ("dropout", "native_dropout", "dropout_"):
            p = arg(node, 1, "p", 0.5)
            train = arg(node, 2, "training" if name != "native_dropout" else "train", True)
            if not (_is_const(p, 0.0) or train is False):
                return None
            node = node.args[0]
        elif name == "getitem" and node.args[1] == 0 and op_name(node.args[0]) == "native_dropout":
            node = node.args[0]
        else:
            return None
    return None


# ---------------------------------------------------------------------------------------------------
# tracing keys/values back to a cache


@dataclass
class _Trace:
    source: fx.Node  # graph input (cache) or the first node that is not a layout op
    nodes: list  # layout nodes between source and the attention (read chain)
    gqa: int = 1  # head repetition removed by the trace
    error: str | None = None
    ends: list = field(default_factory=list)  # stops of sequence-prefix slices on the way


def _trace_cache(node: fx.Node, kv_heads_hint: int | None = None) -> _Trace:
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
        if name in _LAYOUT_OPS:
            pass
        elif name in ("index_copy_", "index_put_", "index_copy", "index_put", "slice_scatter"):
            pass  # a write returns the (updated) cache itself
        elif name in ("view", "reshape", "_unsafe_view", "expand", "unsqueeze", "repeat_interleave", "getitem",
                      "slice", "transpose", "permute", "flatten", "narrow"):  # fmt: skip
            out_shape, in_shape = shape_of(cur), shape_of(src)
            if out_shape is None or in_shape is None:
                return _Trace(cur, chain, gqa, f"no shape information at {cur.name}")
            if name in ("view", "reshape", "_unsafe_view", "flatten"):
                if out_shape == in_shape:
                    pass
                elif (len(in_shape) == 5 and len(out_shape) == 4 and out_shape[1] == in_shape[1] * in_shape[2]
                      and out_shape[0] == in_shape[0] and out_shape[2:] == in_shape[3:]):  # fmt: skip
                    # repeat_kv: [B, Hkv, n, S, D] -> [B, Hkv*n, S, D]; consecutive iff the n axis came from an
                    # unsqueeze/None at dim 2 that was then expanded (checked below)
                    exp = src
                    while op_name(exp) in _LAYOUT_OPS:
                        exp = exp.args[0]
                    if op_name(exp) != "expand":
                        return _Trace(cur, chain, gqa, f"head reshape at {cur.name} is not a repeat_kv expansion")
                    ins = exp.args[0]
                    ishape = shape_of(ins)
                    if ishape is None or len(ishape) != 5 or ishape[2] != 1:
                        return _Trace(cur, chain, gqa, f"expand at {exp.name} does not repeat a new axis at dim 2")
                    gqa *= in_shape[2]
                    chain.extend([cur] + _between(src, exp) + [exp])
                    cur = _unsqueeze_source(ins, chain)
                    if isinstance(cur, str):
                        return _Trace(exp, chain, gqa, cur)
                    continue
                else:
                    return _Trace(cur, chain, gqa, f"{name} at {cur.name} changes the cache layout {in_shape} -> {out_shape}")
            elif name == "expand":
                if out_shape != in_shape:
                    return _Trace(cur, chain, gqa, f"expand at {cur.name} broadcasts the cache {in_shape} -> {out_shape}")
            elif name == "unsqueeze":
                return _Trace(cur, chain, gqa, f"unsqueeze at {cur.name} outside a repeat_kv expansion")
            elif name == "repeat_interleave":
                reps, dim = arg(cur, 1, "repeats"), arg(cur, 2, "dim")
                if not isinstance(reps, int) or dim not in (1, -3) or len(in_shape) != 4:
                    return _Trace(cur, chain, gqa, f"repeat_interleave at {cur.name} is not a head repetition (dim={dim})")
                if perm[1] != 1:
                    return _Trace(cur, chain, gqa, f"repeat_interleave at {cur.name} on a transposed cache")
                gqa *= reps
            elif name in ("transpose", "permute"):
                if len(in_shape) != 4:
                    return _Trace(cur, chain, gqa, f"{name} at {cur.name} on a {len(in_shape)}-d tensor")
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
                    return _Trace(cur, chain, gqa, why)
        else:
            break
        chain.append(cur)
        cur = src
    if perm != [0, 1, 2, 3]:
        return _Trace(cur, chain, gqa, f"cache read through transposes that do not cancel (dims {perm})")
    return _Trace(cur, chain, gqa, ends=ends)


_VIEWISH = _LAYOUT_OPS | {"view", "reshape", "_unsafe_view", "expand", "unsqueeze", "repeat_interleave", "getitem",
                          "slice", "transpose", "permute", "flatten", "narrow", "index_copy_", "index_put_",
                          "index_copy", "index_put", "slice_scatter", "repeat", "squeeze", "select"}  # fmt: skip


def _root(node):
    """First node above ``node`` that is not a view/layout op (ignores whether the views are supported)."""
    while op_name(node) in _VIEWISH and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _between(node, stop):
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
        if len(in_shape) == 5 and isinstance(idx[0], int) and all(i == slice(None) for i in idx[1:]):
            return (f"per-layer slice [{idx[0]}] of a stacked cache buffer {tuple(in_shape)} at {node.name}: "
                    "give each layer its own [B, H, S, D] buffer")  # fmt: skip
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


def _graph_input(node) -> bool:
    return isinstance(node, fx.Node) and node.op in ("placeholder", "get_attr")


def find_cache_writes(cache: fx.Node) -> tuple[list[CacheWrite], list[str]]:
    """In-place writes of new tokens into graph input ``cache`` along dim 2, and reasons for other writes."""
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
                writes.append(CacheWrite(user, "setitem", cache, user.args[2], pos))
        elif name in ("index_copy_", "index_copy"):
            dim = arg(user, 1, "dim")
            if dim not in (2, -2):
                problems.append(f"{user.name}: index_copy along dim {dim}, not the sequence dim")
            else:
                writes.append(CacheWrite(user, name, cache, arg(user, 3, "source"), arg(user, 2, "index")))
        elif name in ("index_put_", "index_put"):
            pos = _seq_index(tuple(arg(user, 1, "indices")))
            if isinstance(pos, str) or arg(user, 3, "accumulate", False):
                problems.append(f"{user.name}: {pos if isinstance(pos, str) else 'accumulating index_put'}")
            else:
                writes.append(CacheWrite(user, name, cache, arg(user, 2, "values"), pos))
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
                writes.append(CacheWrite(copies[0], "copy_", cache, copies[0].args[1], pos, extra=[user]))
        elif name == "slice_scatter" and arg(user, 2, "dim", 0) in (2, -2):
            writes.append(CacheWrite(user, name, cache, user.args[1], arg(user, 3, "start", 0)))
        elif name in _VIEWISH and any(
            u.args and u.args[0] is user and (op_name(u) == "setitem" or str(op_name(u)).endswith("_"))
            for u in user.users
        ):
            problems.append(f"{user.name}: cache written through a {name} view; only [B, H, S, D] caches written "
                            "along dim 2 are rewritten")  # fmt: skip
        elif name == "copy_" and _writes_of(user.args[1], cache):
            pass  # functionalized epilogue copy_(cache, index_copy(cache, ...)): part of that write
        elif name in _WRITE_NAMES or (isinstance(name, str) and name.endswith("_")):
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


# ---------------------------------------------------------------------------------------------------
# attention sites


def _sdpa_args(node: fx.Node) -> dict:
    """Normalized SDPA arguments across the torch-level op and the aten variants."""
    name = op_name(node)
    q, k, v = node.args[:3]
    out = dict(query=q, key=k, value=v, mask=None, dropout=0.0, is_causal=False, scale=None, enable_gqa=False)
    if name == "scaled_dot_product_attention":
        out.update(
            mask=arg(node, 3, "attn_mask"),
            dropout=arg(node, 4, "dropout_p", 0.0),
            is_causal=arg(node, 5, "is_causal", False),
            scale=arg(node, 6, "scale"),
            enable_gqa=node.kwargs.get("enable_gqa", False),
        )
    elif name in ("_scaled_dot_product_flash_attention_for_cpu",):
        out.update(dropout=arg(node, 3, "dropout_p", 0.0), is_causal=arg(node, 4, "is_causal", False),
                   mask=node.kwargs.get("attn_mask"), scale=node.kwargs.get("scale"))  # fmt: skip
    elif name == "_scaled_dot_product_flash_attention":
        out.update(dropout=arg(node, 3, "dropout_p", 0.0), is_causal=arg(node, 4, "is_causal", False),
                   scale=node.kwargs.get("scale"))  # fmt: skip
    elif name in ("_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"):
        out.update(mask=arg(node, 3, "attn_bias"), dropout=arg(node, 5, "dropout_p", 0.0),
                   is_causal=arg(node, 6, "is_causal", False), scale=node.kwargs.get("scale"))  # fmt: skip
    else:  # _math and overrideable variants: (q, k, v, attn_mask, dropout_p, is_causal, ...)
        out.update(mask=arg(node, 3, "attn_mask"), dropout=arg(node, 4, "dropout_p", 0.0),
                   is_causal=arg(node, 5, "is_causal", False), scale=node.kwargs.get("scale"))  # fmt: skip
    return out


def _decomposed_args(out: fx.Node) -> dict | str:
    """Walk ``matmul(softmax(mask(scale(matmul(q, k^T)))), v)`` back from the final matmul."""
    probs = _probs_source(out.args[0])
    removable = set(_between(out.args[0], probs)) | {probs}
    x = probs.args[0]
    dim = arg(probs, 1, "dim")
    if dim not in (-1, 3):
        return f"softmax over dim {dim}, not the key dim"
    scale, mask, mask_op = 1.0, None, None
    while True:
        name = op_name(x)
        removable.add(x)
        if name in _LAYOUT_OPS:
            x = x.args[0]
        elif name in ("mul", "div") and any(isinstance(a, (int, float)) for a in x.args[:2]):
            c = next(a for a in x.args[:2] if isinstance(a, (int, float)))
            t = next(a for a in x.args[:2] if isinstance(a, fx.Node))
            scale = scale * c if name == "mul" else scale / c
            x = t
        elif name in ("masked_fill", "masked_fill_") and mask is None:
            if not _is_const(x.args[2], _NEG_INF) and not (isinstance(x.args[2], (int, float)) and x.args[2] < -1e4):
                return f"masked_fill at {x.name} with {x.args[2]!r}, not -inf"
            mask, mask_op = x.args[1], "masked_fill"
            x = x.args[0]
        elif name == "add" and mask is None and all(isinstance(a, fx.Node) for a in x.args[:2]):
            a, b = x.args[:2]
            x, mask = (a, b) if _reaches_matmul(a) else (b, a)
            mask_op = "add"
        elif name == "where" and mask is None and _is_const(x.args[2], _NEG_INF):
            mask, mask_op = x.args[0], "where"
            x = x.args[1]
        elif name in _MATMUL_NAMES:
            break
        else:
            return f"unrecognized op {name} at {getattr(x, 'name', x)} between q@k^T and softmax"
    scores = x
    q, kt = scores.args[:2]
    k = kt
    kname = op_name(kt)
    if kname == "transpose" and {d % 4 for d in kt.args[1:3]} == {2, 3}:
        k = kt.args[0]
    elif kname == "permute" and [d % 4 for d in (kt.args[1] if isinstance(kt.args[1], (list, tuple)) else kt.args[1:])] == [0, 1, 3, 2]:
        k = kt.args[0]
    elif kname == "getattr" and kt.args[1] == "mT":
        k = kt.args[0]
    else:
        return f"second operand of {scores.name} is not k transposed (got {kname})"
    removable |= {scores, kt}
    return dict(query=q, key=k, value=out.args[1], mask=mask, mask_op=mask_op, scale=scale, removable=removable)


def _reaches_matmul(node) -> bool:
    while isinstance(node, fx.Node):
        name = op_name(node)
        if name in _MATMUL_NAMES:
            return True
        if name in _LAYOUT_OPS or name in ("mul", "div"):
            node = next((a for a in node.args[:2] if isinstance(a, fx.Node)), None)
        else:
            return False
    return False


def _classify_mask(mask, mask_op, is_causal, position, values: dict, check_values: bool = True) -> str:
    """``"causal"`` / ``"causal-position"`` or a reason string."""
    if mask is None:
        return "causal" if is_causal else "no attention mask over a static cache (unwritten slots would be attended)"
    if is_causal:
        return "both attn_mask and is_causal given"
    m, ops = mask, []
    while True:
        name = op_name(m)
        if name in _LAYOUT_OPS:
            m = m.args[0]
        elif name in ("logical_not", "bitwise_not") and mask_op in ("masked_fill",):
            ops.append("not")
            m = m.args[0]
        elif name == "eq" and _is_const(m.args[1], 0) and mask_op == "masked_fill":
            ops.append("not")
            m = m.args[0]
        elif name == "where" and mask_op == "add" and _is_const(m.args[1], 0.0) and _is_const(m.args[2], _NEG_INF):
            m = m.args[0]
            mask_op = "bool"
        elif name == "masked_fill" and mask_op == "add" and _is_const(m.args[2], _NEG_INF):
            zeros = m.args[0]
            if op_name(zeros) not in ("zeros", "zeros_like", "new_zeros", "full"):
                return f"additive attention bias at {m.name} (e.g. ALiBi or a relative position bias) is not supported"
            m, mask_op = m.args[1], "bool"
            ops.append("not")
        elif name == "add":
            return f"additive attention bias at {m.name} (e.g. ALiBi or a relative position bias) is not supported"
        else:
            break
    if mask_op == "masked_fill" and ops.count("not") % 2 == 0:
        return f"masked_fill mask {mask.name} is not the negation of a keep-mask"
    if mask_op == "add" and getattr(meta_val(m), "dtype", None) is not torch.bool:
        return f"additive float attention mask {mask.name} (possibly a position bias such as ALiBi) is not supported"
    # m should be causal_buffer[None, None, position] (Dynamo getitem; ATen: unsqueezes + index)
    if op_name(m) in ("getitem", "index"):
        buf, lead = m.args[0], 0
        while op_name(buf) == "unsqueeze" and arg(buf, 1, "dim") in range(0, lead + 2):
            buf, lead = buf.args[0], lead + 1
        idx = m.args[1] if isinstance(m.args[1], (tuple, list)) else (m.args[1],)
        tensors = [i for i, x in enumerate(idx) if isinstance(x, fx.Node)]
        if not _graph_input(buf) or len(tensors) != 1 or idx[tensors[0]] is not position:
            return f"mask {m.name} does not select rows of a mask buffer by the write positions"
        before = idx[: tensors[0]]
        if op_name(m) == "getitem":  # None adds an axis, a slice consumes a buffer dim
            row = sum(1 for x in before if x is not None)
        else:  # aten index: None keeps a dim
            row = len(before) - lead
        rest_ok = all(x is None or x == slice(None) for i, x in enumerate(idx) if i != tensors[0])
        if row != 0 or not rest_ok:
            return f"mask {m.name} indexes its buffer {idx} away from the query rows"
        value = values.get(buf)
        if value is None or isinstance(value, torch._subclasses.FakeTensor) or value.is_meta:
            return "causal-position-unchecked" if not check_values else f"mask buffer {buf.name} has no value to check"
        if value.dim() == 2 and value.shape[0] == value.shape[1]:
            keep = value != 0
            if torch.equal(keep, torch.tril(torch.ones_like(keep))):
                return "causal-position"
        return f"mask buffer {buf.name} is not a lower-triangular (causal) mask"
    return f"attention mask from {op_name(m) or getattr(m, 'name', m)} is not a recognized causal mask"


def match_attention(node: fx.Node, values: dict, group_size: int = 32, check_values: bool = True) -> Site | str:
    """Match one attention node; ``values`` maps graph-input nodes to example tensors (for mask checks).

    ``check_values=False`` (report-only passes without real inputs) accepts a position-indexed mask buffer
    whose contents cannot be read, as mask kind ``"causal-position-unchecked"``; the rewrite never does.
    """
    name = op_name(node)
    if name in _SDPA_NAMES:
        a = _sdpa_args(node)
        kind, removable = "sdpa", set()
        if not _is_const(a["dropout"], 0.0):
            return f"dropout_p={a['dropout']!r} in attention"
        mask, mask_op = a["mask"], ("add" if a["mask"] is not None else None)
        if mask is not None and getattr(meta_val(mask), "dtype", None) is torch.bool:
            mask_op = "bool"
    else:
        a = _decomposed_args(node)
        if isinstance(a, str):
            return a
        kind, removable, mask, mask_op = "decomposed", a["removable"], a["mask"], a["mask_op"]
        a.setdefault("is_causal", False)
    q, k, v = a["query"], a["key"], a["value"]
    kt, vt = _trace_cache(k), _trace_cache(v)
    for which, t in (("key", kt), ("value", vt)):
        if t.error and _graph_input(_root(k if which == "key" else v)):
            return f"{which}: {t.error}"
        if t.error:  # not a cache read at all: say where the tensor comes from
            t = _Trace(_root(k if which == "key" else v), [])
        if op_name(t.source) == "cat" and any(_graph_input(i) for i in t.source.args[0]):
            return (
                f"{which} cache grown with torch.cat at {t.source.name}: its shape changes every step, so it cannot be "
                "replaced by a preallocated OScaR cache (use a static buffer written with index_copy_/index_put_)"
            )
        if not _graph_input(t.source):
            return f"{which} is computed in this graph ({op_name(t.source)} at {t.source.name}), not read from a cache input"
    if kt.source is vt.source:
        return "key and value read the same tensor"
    qs, ks = shape_of(q), shape_of(kt.source)
    if qs is None or ks is None or len(qs) != 4 or len(ks) != 4:
        return f"query {qs} / cache {ks} are not 4-d [B, H, T, D]"
    if shape_of(vt.source) != ks:
        return f"key cache {ks} and value cache {shape_of(vt.source)} differ in shape"
    b, hq, t, d = qs
    _, hkv, max_len, dk = ks
    if dk != d:
        return f"query head_dim {d} != cache head_dim {dk}"
    if d % group_size:
        return f"head_dim {d} not a multiple of group_size {group_size} (cache {ks})"
    if hq % hkv or (not a.get("enable_gqa") and kt.gqa * hkv != hq) or kt.gqa != vt.gqa:
        return f"query heads {hq} do not match kv heads {hkv} x repetition {kt.gqa}"
    dtypes = {getattr(meta_val(x), "dtype", None) for x in (q, kt.source, vt.source)}
    if not dtypes <= {torch.float16, torch.bfloat16, torch.float32}:
        return f"dtypes {sorted(map(str, dtypes))} not float16/bfloat16/float32"
    kw, kprob = find_cache_writes(kt.source)
    vw, vprob = find_cache_writes(vt.source)
    if kprob or vprob:
        return f"unsupported cache write: {(kprob + vprob)[0]}"
    if not kw and not vw:
        return "cross-attention over a cache this graph never writes (e.g. a fixed encoder cache)"
    if len(kw) != 1 or len(vw) != 1:
        return f"cache written {len(kw)} (keys) / {len(vw)} (values) times in one step; exactly one write each is rewritten"
    kw, vw = kw[0], vw[0]
    if kw.position is not vw.position and not (
        not isinstance(kw.position, fx.Node) and kw.position == vw.position
    ):
        return "keys and values written at different positions"
    for which, w in (("key", kw), ("value", vw)):
        ns = shape_of(w.new)
        if ns is None or len(ns) != 4 or ns[0] != b or ns[1] != hkv or ns[3] != d or ns[2] != t:
            return f"new {which}s {ns} are not [B={b}, Hkv={hkv}, T={t}, D={d}] for query {qs}"
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    if order[kw.node] > order[node] or order[vw.node] > order[node]:
        return "cache read before this step's write"
    scale = a["scale"]
    if scale is None:
        scale = 1.0 / math.sqrt(d) if kind == "sdpa" else 1.0
    if isinstance(scale, fx.Node):
        return f"non-constant softmax scale {scale.name}"
    for end in kt.ends + vt.ends:
        # a prefix [:end] must not hide stored tokens the OScaR attention would see
        if end is None or (isinstance(end, int) and end >= max_len):
            continue
        if mask is None and a.get("is_causal") and not isinstance(end, fx.Node) and end == t:
            continue  # prefill: is_causal over the step's own T tokens, written from position 0 (asserted)
        return f"cache read through a prefix slice [:{getattr(end, 'name', end)}] that may hide stored tokens"
    mask_kind = _classify_mask(mask, mask_op, a.get("is_causal", False), kw.position, values, check_values)
    if mask_kind not in ("causal", "causal-position", "causal-position-unchecked"):
        return mask_kind
    removable |= set(kt.nodes) | set(vt.nodes)
    return Site(
        name=node.name,
        kind=kind,
        out=node,
        query=q,
        key_cache=kt.source,
        value_cache=vt.source,
        key_write=kw,
        value_write=vw,
        heads=hq,
        kv_heads=hkv,
        head_dim=d,
        scale=float(scale),
        mask_kind=mask_kind,
        removable=removable,
        out_dtype=getattr(meta_val(node), "dtype", None),
    )
