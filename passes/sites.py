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
from dataclasses import dataclass, field

import torch
from torch import fx

from .cache_trace import CacheWrite, Trace, between, find_cache_writes, root, trace_cache
from .graph import (
    LAYOUT_OPS,
    MATMUL_NAMES,
    NEG_INF,
    SDPA_NAMES,
    SOFTMAX_NAMES,
    arg,
    graph_input,
    is_const,
    meta_val,
    op_name,
    shape_of,
)

__all__ = ["Site", "CacheWrite", "op_name", "find_attention_nodes", "match_attention", "find_cache_writes"]


# ---------------------------------------------------------------------------------------------------
# records


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
    softcap: float | None  # tanh logit softcap (decomposed attention), None when absent
    mask_kind: str  # "causal" (is_causal), "causal-position" (tril buffer at the write positions)
    cache_attrs: tuple = (None, None)  # module attribute paths of key/value cache, when known
    key_index: int | None = None  # layer of a stacked [L, B, H, S, D] key buffer (key_cache[i]), else None
    value_index: int | None = None
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
        if name in SDPA_NAMES:
            found.append(node)
        elif name in MATMUL_NAMES and _probs_source(node.args[0]) is not None:
            found.append(node)
    return found


def _probs_source(node):
    """softmax node feeding ``node`` through casts / dropout(p=0), else None."""
    while isinstance(node, fx.Node):
        name = op_name(node)
        if name in SOFTMAX_NAMES:
            return node
        if name in LAYOUT_OPS:
            node = node.args[0]
        elif name in ("dropout", "native_dropout", "dropout_"):
            p = arg(node, 1, "p", 0.5)
            train = arg(node, 2, "training" if name != "native_dropout" else "train", True)
            if not (is_const(p, 0.0) or train is False):
                return None
            node = node.args[0]
        elif name == "getitem" and node.args[1] == 0 and op_name(node.args[0]) == "native_dropout":
            node = node.args[0]
        else:
            return None
    return None


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
    removable = set(between(out.args[0], probs)) | {probs}
    x = probs.args[0]
    dim = arg(probs, 1, "dim")
    if dim not in (-1, 3):
        return f"softmax over dim {dim}, not the key dim"
    scale, mask, mask_op, softcap = 1.0, None, None, None
    while True:
        name = op_name(x)
        removable.add(x)
        if name in LAYOUT_OPS:
            x = x.args[0]
        elif (softcap is None and name == "mul" and any(isinstance(a, (int, float)) for a in x.args[:2])
              and any(op_name(a) == "tanh" for a in x.args[:2])):  # fmt: skip
            # logit softcapping (Gemma2 eager_attention_forward): tanh(s / c) * c
            c = next(a for a in x.args[:2] if isinstance(a, (int, float)))
            th = next(a for a in x.args[:2] if op_name(a) == "tanh")
            inner = th.args[0]
            if scale != 1.0:
                return f"scaling after the logit softcap at {x.name}"
            iname = op_name(inner)
            consts = [a for a in getattr(inner, "args", ())[:2] if isinstance(a, (int, float))]
            if not (consts and ((iname == "div" and consts[0] == c) or (iname == "mul" and math.isclose(consts[0] * c, 1.0)))):
                return f"tanh softcap at {th.name} is not tanh(s / {c}) * {c}"
            softcap = float(c)
            removable |= {th, inner}
            x = next(a for a in inner.args[:2] if isinstance(a, fx.Node))
        elif name in ("mul", "div") and any(isinstance(a, (int, float)) for a in x.args[:2]):
            c = next(a for a in x.args[:2] if isinstance(a, (int, float)))
            t = next(a for a in x.args[:2] if isinstance(a, fx.Node))
            scale = scale * c if name == "mul" else scale / c
            x = t
        elif name in ("masked_fill", "masked_fill_") and mask is None:
            if not is_const(x.args[2], NEG_INF) and not (isinstance(x.args[2], (int, float)) and x.args[2] < -1e4):
                return f"masked_fill at {x.name} with {x.args[2]!r}, not -inf"
            mask, mask_op = x.args[1], "masked_fill"
            x = x.args[0]
        elif name == "add" and mask is None and all(isinstance(a, fx.Node) for a in x.args[:2]):
            a, b = x.args[:2]
            x, mask = (a, b) if _reaches_matmul(a) else (b, a)
            mask_op = "add"
        elif name == "where" and mask is None and is_const(x.args[2], NEG_INF):
            mask, mask_op = x.args[0], "where"
            x = x.args[1]
        elif name in MATMUL_NAMES:
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
    return dict(
        query=q, key=k, value=out.args[1], mask=mask, mask_op=mask_op, scale=scale, softcap=softcap, removable=removable
    )


def _reaches_matmul(node) -> bool:
    while isinstance(node, fx.Node):
        name = op_name(node)
        if name in MATMUL_NAMES:
            return True
        if name in LAYOUT_OPS or name in ("mul", "div", "tanh"):
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
        if name in LAYOUT_OPS:
            m = m.args[0]
        elif name in ("logical_not", "bitwise_not") and mask_op in ("masked_fill",):
            ops.append("not")
            m = m.args[0]
        elif name == "eq" and is_const(m.args[1], 0) and mask_op == "masked_fill":
            ops.append("not")
            m = m.args[0]
        elif name == "where" and mask_op == "add" and is_const(m.args[1], 0.0) and is_const(m.args[2], NEG_INF):
            m = m.args[0]
            mask_op = "bool"
        elif name == "masked_fill" and mask_op == "add" and is_const(m.args[2], NEG_INF):
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
        if not graph_input(buf) or len(tensors) != 1 or idx[tensors[0]] is not position:
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
    if name in SDPA_NAMES:
        a = _sdpa_args(node)
        kind, removable = "sdpa", set()
        if not is_const(a["dropout"], 0.0):
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
    kt, vt = trace_cache(k), trace_cache(v)
    for which, t in (("key", kt), ("value", vt)):
        if t.error and graph_input(root(k if which == "key" else v)):
            return f"{which}: {t.error}"
        if t.error:  # not a cache read at all: say where the tensor comes from
            t = Trace(root(k if which == "key" else v), [])
        if op_name(t.source) == "cat" and any(graph_input(i) for i in t.source.args[0]):
            return (
                f"{which} cache grown with torch.cat at {t.source.name}: its shape changes every step, so it cannot be "
                "replaced by a preallocated OScaR cache (use a static buffer written with index_copy_/index_put_)"
            )
        if not graph_input(t.source):
            return f"{which} is computed in this graph ({op_name(t.source)} at {t.source.name}), not read from a cache input"
    if kt.source is vt.source and kt.index == vt.index:
        return "key and value read the same tensor"
    qs, ks, vs = shape_of(q), shape_of(kt.source), shape_of(vt.source)
    if kt.index is not None and ks is not None:
        ks = ks[1:]  # one layer of a stacked [L, B, H, S, D] buffer
    if vt.index is not None and vs is not None:
        vs = vs[1:]
    if qs is None or ks is None or len(qs) != 4 or len(ks) != 4:
        return f"query {qs} / cache {ks} are not 4-d [B, H, T, D]"
    if vs != ks:
        return f"key cache {ks} and value cache {vs} differ in shape"
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
    kw, kprob = find_cache_writes(kt.source, kt.index)
    vw, vprob = find_cache_writes(vt.source, vt.index)
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
        key_index=kt.index,
        value_index=vt.index,
        key_write=kw,
        value_write=vw,
        heads=hq,
        kv_heads=hkv,
        head_dim=d,
        scale=float(scale),
        softcap=a.get("softcap"),
        mask_kind=mask_kind,
        removable=removable,
        out_dtype=getattr(meta_val(node), "dtype", None),
    )
