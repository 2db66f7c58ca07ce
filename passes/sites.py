"""Site discovery: attention that reads a KV cache the same FX graph writes (DESIGN.md §3).

Works on Dynamo graphs (torch IR: ``call_method``/torch functions/``operator.setitem``) and on ATen graphs
(``OpOverload`` targets, functional writes); :func:`op_name` normalizes both to one vocabulary.

An *attention node* is SDPA (``torch._C._nn.scaled_dot_product_attention`` or any aten
``_scaled_dot_product_*`` variant) or the final ``matmul`` of decomposed attention
(``matmul(q, k^T) -> mul/div -> mask -> softmax -> casts/dropout(p=0) -> matmul(., v)``). Its key and value
are traced back through layout ops to a graph input (the cache); the cache's writes in the same graph are
found among that input's users (writes may go through transposes and slices of the cache; ``[B, S, H, D]``
caches are recognized by the transposes that read them). :func:`match_attention` returns a :class:`Site`
or a reason string; a reason never raises.

Masks are judged by what they compute. The exact structural forms (``is_causal``; a lower-triangular buffer
indexed by the write positions, its value checked) are accepted as they are; anything else (other
spellings, additive masks, sliding windows, prefix reads whose length follows the position, writes at a
position counter) goes to :class:`Prober`, which evaluates the mask, the prefix ends and the write positions
on probe positions and accepts causal or sliding-window attention, or says which probe disagreed.
Preconditions include the limits of the device's kernels (:func:`device_precondition`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import fx

from ..kernels.cache_layout import CacheFormat, check_triton_format
from .cache_trace import PHYSICAL, CacheWrite, Trace, between, find_cache_writes, root, trace_cache
from .graph import (
    LAYOUT_OPS,
    MATMUL_NAMES,
    NEG_INF,
    SDPA_NAMES,
    SOFTMAX_NAMES,
    Evaluator,
    NotEvaluable,
    arg,
    graph_input,
    input_label,
    is_argument,
    is_const,
    is_inplace,
    meta_val,
    mutations,
    op_name,
    shape_of,
    size_symbol,
    sym_hint,
)

__all__ = [
    "Site", "CacheWrite", "MaskCheck", "Prober", "op_name", "find_attention_nodes", "match_attention",
    "find_cache_writes", "device_precondition",
]  # fmt: skip


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
    mask_kind: str  # "causal" (is_causal), "causal-position" (tril buffer at the write positions), or what the
    # probes found: "causal (evaluated)", "sliding window W (evaluated)", "... from position 0"
    cache_attrs: tuple = (None, None)  # module attribute paths of key/value cache, when known
    key_index: int | None = None  # layer of a stacked [L, B, H, S, D] key buffer (key_cache[i]), else None
    value_index: int | None = None
    removable: set = field(default_factory=set)  # nodes of the attention/read chains (erased on rewrite)
    out_dtype: torch.dtype | None = None
    window: int | None = None  # sliding window: a query at position p sees keys > p - window; None: causal
    from_zero: bool = False  # exact only for steps written from position 0 (prefill): asserted at run time
    guards: tuple = ()  # position inputs the mask reads that the write does not: asserted equal at run time
    layout: str = "bhsd"  # the cache buffers' layout: "bhsd" [B, H, S, D] or "bshd" [B, S, H, D]

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


# ---------------------------------------------------------------------------------------------------
# semantic checks: what the mask, the read extent and the write positions compute, by evaluation

# an additive mask entry at or below this is a masked key (exp underflows to 0 against any real score)
MASKED_BELOW = -1e4


_VIEW_OPS = LAYOUT_OPS | {"getitem", "slice", "view", "reshape", "narrow", "select", "transpose", "permute",
                          "unsqueeze", "expand", "squeeze", "flatten", "unflatten"}  # fmt: skip


class _Missing(str):
    """A probe's disagreement that is only keys missing (hidden by a prefix read, or the query's own key
    masked): what a prefill-only form shows at starts > 0."""


@dataclass
class MaskCheck:
    """What the probes found: the attention is causal (``window`` None) or a sliding window over the cache."""

    window: int | None
    from_zero: bool  # agreed only at start 0: a prefill-only form (the rewrite asserts the start)
    guards: tuple  # position inputs read by the mask / read extent but not by the write (asserted equal)
    starts: tuple  # probe starts that agreed

    @property
    def kind(self) -> str:
        what = "causal" if self.window is None else f"sliding window {self.window}"
        return f"{what} (evaluated{', from position 0' if self.from_zero else ''})"


class Prober:
    """Decides what one graph's masks, read extents and write positions compute, by evaluating them.

    The subgraph computing a mask (and the ends of prefix reads of the cache) from graph inputs is run on
    concrete probes: every *position input* (an integer tensor argument of the call or integer buffer the
    graph modifies, such as a position counter, of at most 2 dims; or an int argument that Dynamo made
    symbolic) is set from one probe start ``s`` (``arange(s, s + n)`` for a tensor of ``n`` positions, ``s``
    for a scalar), constant inputs (buffers the graph never writes, parameters, constants) keep their values.
    For each probe the write positions ``p`` are evaluated too, and the keys each query may attend (mask,
    ``is_causal``, prefix read) must be exactly ``(p - window, p]`` (``window`` None: ``[0, p]``).

    Probes: starts 0, 1, 2, the middle and the last two that fit the step's ``T`` tokens, plus starts
    around a window once one is seen. When only start 0 agrees the form is prefill-only (``from_zero``).
    A position input the mask reads but the write does not (e.g. the model's ``pos`` argument when the write
    uses its own counter buffer) is a *guard*: the rewrite asserts at run time that it equals the probe form
    at the write's start.
    """

    def __init__(self, graph: fx.Graph, values: dict):
        self.graph = graph
        self.values = values
        self.order = {n: i for i, n in enumerate(graph.nodes)}
        self.first_write = mutations(graph)
        self.evaluator = Evaluator(graph, self._leaf)
        self.memo = {}
        self._clone = False

    # -- inputs ---------------------------------------------------------------------------------------
    def kind(self, leaf) -> str:
        """``"position"``, ``"size"`` (a SymInt standing for a tensor size), ``"static"`` or ``"opaque"``."""
        v = meta_val(leaf)
        if isinstance(v, torch.SymInt):
            return "size" if size_symbol(leaf) else "position"
        if leaf.op == "get_attr":
            return "static"
        if not isinstance(v, torch.Tensor):
            return "opaque"
        if leaf not in self.first_write and not is_argument(leaf):
            return "static"
        if not v.is_floating_point() and not v.is_complex() and v.dtype is not torch.bool and v.dim() <= 2:
            return "position"
        return "opaque"

    def _leaf(self, node):
        kind = self.kind(node)
        if kind != "static":
            raise NotEvaluable(f"it depends on the values of {input_label(node)}")
        if node.op == "get_attr":
            value = node.graph.owning_module
            for part in node.target.split("."):
                value = getattr(value, part, None)
        else:
            value = self.values.get(node)
        if (not isinstance(value, torch.Tensor) or isinstance(value, torch._subclasses.FakeTensor) or value.is_meta
                or type(value) not in (torch.Tensor, torch.nn.Parameter)):  # fmt: skip
            raise NotEvaluable(f"{input_label(node)} has no value to evaluate")
        return value.clone() if self._clone else value

    def _param(self, leaf, start: int):
        """The probe value of position input ``leaf`` for a step starting at ``start``."""
        v = meta_val(leaf)
        if isinstance(v, torch.SymInt):
            return start
        if v.dim() == 0:
            return torch.tensor(start, dtype=v.dtype, device=v.device)
        n = sym_hint(v.shape[-1])
        r = torch.arange(start, start + n, dtype=v.dtype, device=v.device)
        return r if v.dim() == 1 else r.expand(sym_hint(v.shape[0]), n).contiguous()

    def _check_order(self, nodes, consumer) -> None:
        """Inputs the graph modifies in place must be read before their first modification."""
        for leaf in [n for n in nodes if n in self.first_write]:
            limit = self.order[self.first_write[leaf]]
            aliases, stack = {leaf}, [leaf]
            while stack:  # views of it
                for u in stack.pop().users:
                    if u.args and u.args[0] in aliases and op_name(u) in _VIEW_OPS and u not in aliases:
                        aliases.add(u)
                        stack.append(u)
            readers = [n for n in list(nodes) + ([consumer] if consumer is not None else []) if n not in (None, leaf)]
            for n in readers:
                if any(i in aliases for i in n.all_input_nodes) and self.order[n] > limit:
                    raise NotEvaluable(
                        f"{n.name} reads {input_label(leaf)} after {self.first_write[leaf].name} modifies it in place"
                    )

    # -- the check ------------------------------------------------------------------------------------
    def check(self, *, mask, mask_op, is_causal, ends, writes, t, length) -> MaskCheck | str:
        """Probe one site: ``mask`` (node or None) applied as ``mask_op`` (``"bool"``: True attends; ``"add"``:
        additive; ``"masked_fill"``: True is masked; ``"where"``: True attends), ``ends`` the stops of prefix
        reads of the cache, ``writes`` the key and value :class:`CacheWrite`, ``t`` the step's tokens,
        ``length`` the cache's sequence length. Returns a :class:`MaskCheck` or a reason."""
        key = (mask, mask_op, bool(is_causal), tuple(ends), tuple(w.node for w in writes), t, length)
        if key not in self.memo:
            self.memo[key] = self._check(mask, mask_op, is_causal, list(ends), writes, t, length)
        return self.memo[key]

    def _check(self, mask, mask_op, is_causal, ends, writes, t, length):
        what = f"the mask ({mask.name})" if isinstance(mask, fx.Node) else (
            "is_causal attention" if is_causal else "attention without a mask")  # fmt: skip
        pos_out = [x for w in writes for x in (w.position, w.stop, w.length)]
        dep_out = [mask, *ends]
        try:
            pos_nodes = self.evaluator.ancestors(pos_out)
            dep_nodes = self.evaluator.ancestors(dep_out)
            for w in writes:
                self._check_order(self.evaluator.ancestors([w.position, w.stop, w.length]), w.node)
            self._check_order(dep_nodes, None)
            inputs = [n for n in pos_nodes + dep_nodes if graph_input(n)]
            for n in inputs:
                if self.kind(n) == "opaque":
                    raise NotEvaluable(f"it depends on the values of {input_label(n)}")
            pos_leaves = [n for n in pos_nodes if graph_input(n) and self.kind(n) == "position"]
            guards = [n for n in dep_nodes if graph_input(n) and self.kind(n) == "position" and n not in pos_leaves]
            for g in guards:
                if g in self.first_write:
                    raise NotEvaluable(
                        f"it reads {input_label(g)}, which this graph modifies and the write does not read"
                    )
            two_d = [n for n in pos_leaves if isinstance(meta_val(n), torch.Tensor) and meta_val(n).dim() == 2]
            for g in guards + two_d:
                v = meta_val(g)
                if isinstance(v, torch.Tensor) and v.dim() and sym_hint(v.shape[-1]) != t:
                    # e.g. a padding mask [B, S]: not the positions of this step's tokens
                    raise NotEvaluable(f"it depends on the values of {input_label(g)} {tuple(v.shape)}, which are not "
                                       f"the positions of the step's {t} tokens")  # fmt: skip
            self._clone = any(is_inplace(n) for n in pos_nodes + dep_nodes)
        except NotEvaluable as e:
            return f"{what} cannot be checked by evaluation: {e}"

        def probe(start):
            return self._probe(start, what, mask, mask_op, is_causal, ends, writes, t, length, pos_leaves, guards)

        if pos_leaves:
            starts = sorted({0, 1, 2, length // 2 - t // 2, length - t - 1, length - t} & set(range(length - t + 1)))
        else:
            starts = [None]  # the write positions are constants of this graph: one probe at them
        first = probe(starts[0])
        if isinstance(first, str):
            return first
        rows, agreed, fails = [first], [first[2]], []
        for s in starts[1:]:
            r = probe(s)
            if isinstance(r, str):
                fails.append(r)
            elif r is not None:
                rows.append(r)
                agreed.append(r[2])
        # agreeing at start 0 alone, and elsewhere only missing the stored keys, is a prefill-only form (e.g.
        # is_causal over the step's own keys); one token at start 0 sees one key, which proves nothing
        from_zero = bool(fails) and len(rows) == 1 and starts[0] == 0 and t > 1
        from_zero = from_zero and all(isinstance(f, _Missing) for f in fails)
        if fails and not from_zero:
            return str(fails[0])
        window = self._window(rows, what, t)
        if isinstance(window, str):
            return window
        if window is not None and pos_leaves and not from_zero:  # look closely around the window's edge
            for s in sorted({window - t, window - 1, window, window + 1, window + t} & set(range(length - t + 1))):
                if s in starts:
                    continue
                r = probe(s)
                if isinstance(r, str):
                    return r
                if r is not None:
                    rows.append(r)
                    agreed.append(r[2])
            window = self._window(rows, what, t)
            if isinstance(window, str):
                return window
        return MaskCheck(window, from_zero, tuple(guards), tuple(agreed))

    def _probe(self, s, what, mask, mask_op, is_causal, ends, writes, t, length, pos_leaves, guards):
        """``(positions, first attended key, start)`` per query row of probe ``s``; None when the probe does
        not fit the cache; a reason when the site disagrees."""
        env = {leaf: self._param(leaf, s) for leaf in pos_leaves}
        where = f"probe start={s}, T={t}"
        try:
            positions = []
            for w in writes:
                p = self._positions(w, t, length, env)
                if isinstance(p, str):
                    return f"{w.op} write at {w.node.name}: {p} ({where})"
                positions.append(p)
            p = positions[0]
            if any(q.shape != p.shape or not torch.equal(q, p) for q in positions[1:]):
                return f"keys and values are written at different positions ({where})"
            if int(p.min()) < 0 or int(p.max()) >= length:
                if s is not None:
                    return None
                return f"write positions {p[0].tolist()} fall outside the cache of {length} ({where})"
            start = int(p[0, 0])
            where = f"probe start={start}, T={t}"
            env.update({g: self._param(g, start) for g in guards})
            mask_v, *end_vs = self.evaluator.run([mask, *ends], env)
        except NotEvaluable as e:
            return f"{what} cannot be evaluated at {where}: {e}"
        sk = min([length] + [int(e) for e in end_vs if e is not None])
        keep = self._keep(mask_v, mask_op, is_causal, t, sk)
        if isinstance(keep, str):
            return f"{what}: {keep} ({where})"
        rows = self._rows(keep, p, sk)
        if isinstance(rows, str):
            why = f"{what} disagrees with causal attention at {where}: {rows}"
            return _Missing(why) if isinstance(rows, _Missing) else why
        return rows[0], rows[1], start

    def _positions(self, w, t, length, env):
        """Positions ``[Bp, T]`` (int64) a write stores the step's tokens at, or a reason."""
        pos, stop, n = self.evaluator.run([w.position, w.stop, w.length], env)
        if isinstance(pos, torch.Tensor):
            p = pos.to(torch.int64)
            p = p.reshape(1, -1) if p.dim() <= 1 else p.reshape(p.shape[0], -1)
            if p.shape[1] != t:
                return f"{p.shape[1]} positions for the step's {t} tokens"
        else:
            start = int(pos)
            span = min(stop, length) - start if stop is not None else (n if n is not None else length - start)
            if span is not None and span != t:
                return f"the slice [{start}:{start + span}] does not hold the step's {t} tokens"
            p = torch.arange(start, start + t, dtype=torch.int64)[None]
        if not torch.equal(p, p[:, :1] + torch.arange(t, device=p.device)):
            return f"positions {p[0].tolist()} are not consecutive"
        return p.cpu()

    @staticmethod
    def _keep(m, mask_op, is_causal, t, sk):
        """Bool ``[Bm, Hm, t, sk]``: which keys each query attends, or a reason."""
        if m is None:
            keep = torch.ones(1, 1, t, sk, dtype=torch.bool)
        else:
            if not isinstance(m, torch.Tensor) or m.dim() > 4:
                return f"a mask of {type(m).__name__} {getattr(m, 'shape', '')} is not a [.., T, keys] tensor"
            m = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape)).cpu()
            if m.shape[-2] not in (1, t) or m.shape[-1] not in (1, sk):
                return f"a mask of shape {tuple(m.shape)} does not broadcast to [.., {t}, {sk}] (queries, keys read)"
            if mask_op in ("masked_fill", "where", "bool"):
                if m.dtype is not torch.bool:
                    return f"a {m.dtype} mask used as a boolean one"
                keep = ~m if mask_op == "masked_fill" else m
            else:  # additive
                if m.dtype is torch.bool:
                    return "a boolean mask added to the scores (a 0/1 bias)"
                mf = m.float()
                zero, masked = mf == 0, mf <= MASKED_BELOW
                bad = ~(zero | masked)
                if bool(bad.any()):
                    i = [int(x) for x in bad.nonzero()[0]]
                    return (f"additive attention bias: {mf[tuple(i)].item():g} for key {i[3]} of query {i[2]} is neither 0 "
                            "nor -inf (e.g. ALiBi or a relative position bias)")  # fmt: skip
                keep = zero
            keep = keep.expand(keep.shape[0], keep.shape[1], t, sk)
        if is_causal:  # SDPA's is_causal: top-left aligned, query i sees keys <= i
            keep = keep & torch.ones(t, sk, dtype=torch.bool).tril()
        return keep

    @staticmethod
    def _rows(keep, p, sk):
        """``(positions, first attended key)`` per query row, or how ``keep`` differs from a causal/window mask."""
        if not bool((keep == keep[:, :1]).all()):
            return "the mask differs between heads (a per-head bias or mask)"
        nb = max(keep.shape[0], p.shape[0])
        if keep.shape[0] not in (1, nb) or p.shape[0] not in (1, nb):
            return f"mask batch {keep.shape[0]} and write positions batch {p.shape[0]} differ"
        j = torch.arange(sk)
        out_p, out_lo = [], []
        for b in range(nb):
            kb = keep[b if keep.shape[0] > 1 else 0, 0]
            pb = p[b if p.shape[0] > 1 else 0]
            if int(pb.max()) >= sk:
                i = int((pb >= sk).nonzero()[0])
                return _Missing(f"the cache is read through a prefix slice [:{sk}] that hides key {int(pb[i])}, "
                                f"the position of query {i}")  # fmt: skip
            later = kb & (j[None] > pb[:, None])
            if bool(later.any()):
                i, jj = (int(x) for x in later.nonzero()[0])
                return (f"query {i} (position {int(pb[i])}) may attend key {jj}, a later position (unwritten or "
                        "future slots would be attended)")  # fmt: skip
            own = kb[torch.arange(len(pb)), pb]
            if not bool(own.all()):
                i = int((~own).nonzero()[0])
                return _Missing(f"query {i} (position {int(pb[i])}) cannot attend its own key")
            lo = kb.int().argmax(-1)
            expect = (j[None] >= lo[:, None]) & (j[None] <= pb[:, None])
            if not bool((kb == expect).all()):
                i, jj = (int(x) for x in (kb != expect).nonzero()[0])
                return (f"query {i} (position {int(pb[i])}) cannot attend key {jj} but attends key {int(lo[i])} before "
                        "it (not a causal or sliding-window mask)")  # fmt: skip
            out_p.append(pb)
            out_lo.append(lo)
        return torch.cat(out_p), torch.cat(out_lo)

    @staticmethod
    def _window(rows, what, t):
        """The sliding window all probes agree on (None: causal), or a reason."""
        p = torch.cat([r[0] for r in rows])
        lo = torch.cat([r[1] for r in rows])
        cut = lo > 0
        if not bool(cut.any()):
            return None
        sizes = sorted({int(x) for x in (p - lo + 1)[cut]})
        if len(sizes) > 1 or bool(((~cut) & (p + 1 > sizes[0])).any()):
            return f"{what} attends windows of different sizes {sizes[:4]}, not one sliding window or causal attention"
        return sizes[0]


def device_precondition(head_dim: int, group_size: int, device) -> str | None:
    """Why the OScaR kernels for ``device`` cannot hold a cache of ``head_dim`` (None when they can).

    CPU caches run the reference path (any multiple of the group size); CUDA caches run the Triton kernels,
    whose limits :func:`~oscar_compile.kernels.cache_layout.check_triton_format` owns.
    """
    if device is None or torch.device(device).type != "cuda":
        return None
    try:
        check_triton_format(CacheFormat(group_size=group_size), head_dim)
    except ValueError as e:
        return f"a cache on {device}: {e}"
    return None


def match_attention(
    node: fx.Node, values: dict, group_size: int = 32, check_values: bool = True, prober: Prober | None = None
) -> Site | str:
    """Match one attention node; ``values`` maps graph-input nodes to example tensors (for mask checks).

    The mask is accepted by form when it is one of the exact structural forms (``is_causal``; a
    lower-triangular buffer indexed by the write positions, checked on its value), else by evaluation
    (:class:`Prober`; ``prober`` shares one graph's probes between its sites). ``check_values=False``
    (report-only passes without real inputs) accepts a position-indexed mask buffer whose contents cannot be
    read, as mask kind ``"causal-position-unchecked"``, and evaluates nothing; the rewrite never does.
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
            derived = _derived_from_cache(t.source, which)
            if derived:
                return derived
            return f"{which} is computed in this graph ({op_name(t.source)} at {t.source.name}), not read from a cache input"
    if kt.source is vt.source and kt.index == vt.index:
        return "key and value read the same tensor"
    if kt.layout != vt.layout:
        return f"key cache laid out {kt.layout}, value cache {vt.layout}"
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
    _, hkv, max_len, dk = (ks[i] for i in PHYSICAL[kt.layout])  # logical [B, Hkv, S, D]
    if dk != d:
        return f"query head_dim {d} != cache head_dim {dk}"
    if d % group_size:
        return f"head_dim {d} not a multiple of group_size {group_size} (cache {ks})"
    if hq % hkv or (not a.get("enable_gqa") and kt.gqa * hkv != hq) or kt.gqa != vt.gqa:
        return f"query heads {hq} do not match kv heads {hkv} x repetition {kt.gqa}"
    dtypes = {getattr(meta_val(x), "dtype", None) for x in (q, kt.source, vt.source)}
    if not dtypes <= {torch.float16, torch.bfloat16, torch.float32}:
        return f"dtypes {sorted(map(str, dtypes))} not float16/bfloat16/float32"
    why = device_precondition(d, group_size, getattr(meta_val(kt.source), "device", None))
    if why:
        return why
    kw, kprob = find_cache_writes(kt.source, kt.index, kt.layout)
    vw, vprob = find_cache_writes(vt.source, vt.index, vt.layout)
    if kprob or vprob:
        return f"unsupported cache write: {(kprob + vprob)[0]}"
    if not kw and not vw:
        return "cross-attention over a cache this graph never writes (e.g. a fixed encoder cache)"
    if len(kw) != 1 or len(vw) != 1:
        return f"cache written {len(kw)} (keys) / {len(vw)} (values) times in one step; exactly one write each is rewritten"
    kw, vw = kw[0], vw[0]
    same_position = kw.position is vw.position or (
        not isinstance(kw.position, fx.Node) and not isinstance(vw.position, fx.Node) and kw.position == vw.position
    )
    if not same_position and not check_values:
        return "keys and values written at different positions"
    for which, w in (("key", kw), ("value", vw)):
        ns = shape_of(w.new)
        if ns is not None and w.new_perm is not None and len(ns) == 4:
            ns = tuple(ns[i] for i in w.new_perm)
        if ns is None or len(ns) != 4 or ns[0] != b or ns[1] != hkv or ns[3] != d or not _same_size(ns[2], t):
            return f"new {which}s {ns} are not [B={b}, Hkv={hkv}, T={t}, D={d}] for query {qs}"
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    if order[kw.node] > order[node] or order[vw.node] > order[node]:
        return "cache read before this step's write"
    scale = a["scale"]
    if scale is None:
        scale = 1.0 / math.sqrt(d) if kind == "sdpa" else 1.0
    if isinstance(scale, fx.Node):
        return f"non-constant softmax scale {scale.name}"

    is_causal = a.get("is_causal", False)
    ends = kt.ends + vt.ends
    mask_kind = _classify_mask(mask, mask_op, is_causal, kw.position, values, check_values)
    hidden = _hidden_prefix(ends, max_len, mask, is_causal, t)
    exact = same_position and all(_slice_span(w, t, max_len) is True for w in (kw, vw))
    window, from_zero, guards = None, mask_kind == "causal", ()
    if mask_kind in ("causal", "causal-position", "causal-position-unchecked") and hidden is None and exact:
        pass  # an exact structural form
    elif not check_values:
        spans = [_slice_span(w, t, max_len) for w in (kw, vw)]
        return hidden or next((r for r in spans if isinstance(r, str)), None) or mask_kind
    else:
        prober = prober if prober is not None and prober.graph is node.graph else Prober(node.graph, values)
        found = prober.check(mask=mask, mask_op=mask_op, is_causal=is_causal, ends=ends, writes=(kw, vw),
                             t=sym_hint(t), length=sym_hint(max_len))  # fmt: skip
        if isinstance(found, str):
            return found
        mask_kind, window, from_zero, guards = found.kind, found.window, found.from_zero, found.guards
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
        window=window,
        from_zero=from_zero,
        guards=guards,
        layout=kt.layout,
    )


def _same_size(a, b) -> bool:
    """Two sizes are the same without adding a shape guard (symbolic sizes compare by expression)."""
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        return isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt) and a.node.expr == b.node.expr
    return a == b


def _hidden_prefix(ends, max_len, mask, is_causal, t) -> str | None:
    """Why a prefix read ``[:end]`` may hide stored tokens, judged by form (None when it cannot)."""
    for end in ends:
        if end is None or (isinstance(end, int) and end >= max_len):
            continue
        if mask is None and is_causal and not isinstance(end, fx.Node) and end == t:
            continue  # prefill: is_causal over the step's own T tokens, written from position 0 (asserted)
        return f"cache read through a prefix slice [:{getattr(end, 'name', end)}] that may hide stored tokens"
    return None


def _slice_span(w: CacheWrite, t, length):
    """True when a write stores exactly the step's ``t`` tokens by form (index writes; slices of constant
    bounds), a reason when its constant bounds do not, None when only evaluation can tell."""
    if isinstance(meta_val(w.position), torch.Tensor):
        return True
    bounds = (w.position, w.stop, w.length, t)
    if any(isinstance(x, (fx.Node, torch.SymInt)) for x in bounds):
        return None
    if w.stop is not None:
        span = min(w.stop, length) - w.position
    else:
        span = w.length if w.length is not None else length - w.position
    return True if span == t else f"the slice write at {w.node.name} stores {span} positions for the step's {t} tokens"


def _derived_from_cache(node, which) -> str | None:
    """Why ``node`` (not a layout op of a cache) is computed *from* a cache input the graph writes, if it is."""
    writes = mutations(node.graph)
    above, stack = set(), [node]
    while stack and len(above) < 400:
        n = stack.pop()
        if n not in above:
            above.add(n)
            stack.extend(n.all_input_nodes)
    caches = [n for n in above if graph_input(n) and n in writes and isinstance(meta_val(n), torch.Tensor)
              and meta_val(n).dim() >= 3 and meta_val(n).is_floating_point()]  # fmt: skip
    if not caches:
        return None
    caches.sort(key=lambda n: n.name)
    between_, stack = set(), list(caches)  # what is computed from the caches on the way to ``node``
    while stack:
        n = stack.pop()
        for u in n.users:
            if u in above and u not in between_:
                between_.add(u)
                stack.append(u)
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    ops = [op_name(n) for n in sorted(between_, key=order.get)]
    kinds = set(ops)
    if kinds & {"linear", "matmul", "bmm", "mm", "einsum", "addmm"}:
        what = "projected from a latent cache (an MLA-style compressed KV cache)"
    elif kinds & {"rsqrt", "norm", "rms_norm", "layer_norm", "var", "mean"}:
        what = "normalized after the cache read (the cache holds pre-norm keys, e.g. QK-norm applied late)"
    else:
        what = "transformed after the cache read"
    chain = ", ".join(dict.fromkeys(o for o in ops if o not in LAYOUT_OPS))
    names = ", ".join(input_label(c) for c in caches)
    return (f"{which} is {what}: computed from cache {names} by {chain}; OScaR stores the "
            f"{which}s attention consumes, so this cache stays in full precision")  # fmt: skip
