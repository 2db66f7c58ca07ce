"""FX vocabulary shared by the passes: one op name for torch IR (Dynamo) and ATen graphs, argument access."""

from __future__ import annotations

import operator
import re
from typing import Any

import torch
from torch import fx

__all__ = ["op_name", "arg", "meta_val", "shape_of", "is_const", "graph_input", "LAYOUT_OPS", "VIEWISH"]

NEG_INF = float("-inf")

PYTHON_OPS = {
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
LAYOUT_OPS = {
    "contiguous", "to", "type", "float", "half", "bfloat16", "clone", "_to_copy", "detach", "alias",
    "type_as", "lift_fresh_copy",
}  # fmt: skip
SDPA_NAMES = {
    "scaled_dot_product_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_attention_math",
    "_scaled_dot_product_fused_attention_overrideable",
}
SOFTMAX_NAMES = {"softmax", "_softmax", "_safe_softmax"}
MATMUL_NAMES = {"matmul", "bmm"}
WRITE_NAMES = {"setitem", "index_copy_", "index_copy", "index_put_", "index_put", "copy_", "slice_scatter"}
VIEWISH = LAYOUT_OPS | {"view", "reshape", "_unsafe_view", "expand", "unsqueeze", "repeat_interleave", "getitem",
                        "slice", "transpose", "permute", "flatten", "narrow", "index_copy_", "index_put_",
                        "index_copy", "index_put", "slice_scatter", "repeat", "squeeze", "select"}  # fmt: skip

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
    if t in PYTHON_OPS:
        return PYTHON_OPS[t]
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


def is_const(x, value) -> bool:
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



def graph_input(node) -> bool:
    return isinstance(node, fx.Node) and node.op in ("placeholder", "get_attr")


def source_name(source) -> str:
    name = source.name
    return name() if callable(name) else name


def clean_path(path: str) -> str:
    """``L['self']._modules['layers']._modules['0'].k_cache`` -> ``layers.0.k_cache``."""
    path = re.sub(r"^L\['args'\]\[0\]|^L\['[^']*'\]", "", path)  # the module is `self` or `args[0]`
    path = re.sub(r"\.(_modules|_buffers|_parameters)\b", "", path)
    path = re.sub(r"\[['\"]?([^\]'\"]*)['\"]?\]", r".\1", path)
    return path.strip(".")


def input_label(node) -> str:
    """Readable name of a graph input: its module attribute path (``layers.0.k_cache``) or argument name."""
    src = getattr(node.meta.get("grapharg"), "source", None)
    if src is None:
        return node.name
    if type(src).__name__ == "LocalSource":
        return src.local_name
    return clean_path(source_name(src)) or node.name


# ---------------------------------------------------------------------------------------------------
# evaluating a subgraph on concrete values (the semantic checks of sites.py)

# ops whose tensor argument at this index contributes only its shape/dtype/device, never its values
TEMPLATE_ARGS = {
    "new_zeros": 0, "new_ones": 0, "new_full": 0, "new_empty": 0, "new_tensor": 0, "zeros_like": 0,
    "ones_like": 0, "full_like": 0, "empty_like": 0, "type_as": 1,
}  # fmt: skip
SCALAR_META = (int, float, bool, torch.dtype, torch.device, torch.layout, torch.memory_format, str, type(None))


class NotEvaluable(Exception):
    """A subgraph cannot be evaluated on probe values; the message says why (it becomes a skip reason)."""


def is_inplace(node) -> bool:
    """``node`` mutates its first argument (``x.add_(1)``, ``x[i] = y``, ``index_copy_``, ...)."""
    name = op_name(node)
    return isinstance(name, str) and (name == "setitem" or (name.endswith("_") and not name.endswith("__")))


def is_argument(node) -> bool:
    """A placeholder that is an argument of the compiled call (``x``, ``pos``, ``args[1]``), not an attribute
    of a module or a global; graphs without Dynamo sources (ATen graphs) count every placeholder."""
    src = getattr(node.meta.get("grapharg"), "source", None)
    if src is None:
        return node.op == "placeholder"
    while src is not None:
        kind = type(src).__name__
        if kind == "LocalSource":
            return src.local_name != "self"
        if kind not in ("GetItemSource", "DictGetItemSource", "ListGetItemSource", "TupleIteratorGetItemSource"):
            return False
        src = getattr(src, "base", None)
    return False


def size_symbol(node) -> bool:
    """A SymInt placeholder that stands for a tensor size (not a position or other int argument)."""
    src = getattr(node.meta.get("grapharg"), "source", None)
    return type(src).__name__ == "TensorPropertySource"


def sym_hint(x):
    """The example value of an int / SymInt / SymBool / SymFloat (``x`` itself when it is concrete)."""
    if isinstance(x, (torch.SymInt, torch.SymBool, torch.SymFloat)):
        hint = x.node.hint
        if hint is None:
            raise NotEvaluable(f"symbolic value {x} has no example value")
        return hint
    return x


def mutations(graph: fx.Graph) -> dict:
    """Graph input -> the first in-place op that writes it (directly or through views of it)."""
    first = {}
    order = {n: i for i, n in enumerate(graph.nodes)}
    for ph in graph.nodes:
        if not graph_input(ph):
            continue
        stack, seen = [ph], {ph}
        while stack:
            n = stack.pop()
            for u in n.users:
                if not u.args or u.args[0] is not n:
                    continue
                if is_inplace(u):
                    if ph not in first or order[u] < order[first[ph]]:
                        first[ph] = u
                elif op_name(u) in VIEWISH and u not in seen:
                    seen.add(u)
                    stack.append(u)
    return first


class Evaluator:
    """Evaluates nodes of one FX graph on concrete values, for probes of what a subgraph computes.

    ``leaf(node)`` gives the value of a graph input (or raises :class:`NotEvaluable`); nodes whose example
    value is a constant (a specialized int, a dtype, a device) evaluate to it; symbolic ints evaluate by
    substituting the example values of their symbols, except those of the placeholders in ``env`` (probe
    values). A tensor argument an op uses only for its shape/dtype/device (``new_zeros``, ``zeros_like``,
    ``type_as``) is replaced by zeros of its example shape, so its own inputs are never needed.
    """

    def __init__(self, graph: fx.Graph, leaf):
        self.graph = graph
        self.leaf = leaf
        self.symbols = {}
        for n in graph.nodes:
            v = meta_val(n)
            if n.op == "placeholder" and isinstance(v, torch.SymInt) and v.node.expr.is_Symbol:
                self.symbols[v.node.expr] = n

    def ancestors(self, outputs, stop=lambda n: False) -> list:
        """Nodes ``outputs`` depend on (graph inputs included, and the placeholders of the symbols of symbolic
        ints), not walking above nodes where ``stop`` holds nor into the shape-only arguments of
        :data:`TEMPLATE_ARGS` ops."""
        seen, stack = set(), [o for o in _nodes_in(outputs)]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if stop(n) or n.op in ("placeholder", "get_attr"):
                continue
            v = meta_val(n)
            if isinstance(v, (torch.SymInt, torch.SymBool, torch.SymFloat)):
                stack.extend(self.symbols[s] for s in v.node.expr.free_symbols if s in self.symbols)
                continue
            if ("example_value" in n.meta or "val" in n.meta) and isinstance(v, SCALAR_META):
                continue  # a constant of this graph
            t = TEMPLATE_ARGS.get(op_name(n))
            skip = n.args[t] if t is not None and len(n.args) > t else None
            stack.extend(i for i in _nodes_in((n.args, n.kwargs)) if i is not skip)
        return list(seen)

    def run(self, outputs: list, env: dict) -> list:
        """Values of ``outputs`` (nodes or constants) with ``env`` (node -> value) fixed."""
        env = dict(env)
        return [self._value(o, env) for o in outputs]

    def _sym(self, v, env):
        expr = v.node.expr
        subs = {}
        for sym in expr.free_symbols:
            ph = self.symbols.get(sym)
            if ph is not None and ph in env:
                subs[sym] = env[ph]
            else:
                env_ = v.node.shape_env
                known = getattr(env_, "backed_var_to_val", None)
                hint = (known if known is not None else env_.var_to_val).get(sym)
                if hint is None:
                    raise NotEvaluable(f"symbol {sym} has no example value")
                subs[sym] = hint
        out = expr.xreplace(subs)
        if isinstance(v, torch.SymBool):
            return bool(out)
        return int(out) if isinstance(v, torch.SymInt) else float(out)

    def _value(self, x, env):
        if isinstance(x, (list, tuple)):
            return type(x)(self._value(a, env) for a in x)
        if isinstance(x, slice):
            return slice(self._value(x.start, env), self._value(x.stop, env), self._value(x.step, env))
        if isinstance(x, dict):
            return {k: self._value(v, env) for k, v in x.items()}
        if not isinstance(x, fx.Node):
            return x
        if x in env:
            return env[x]
        v = meta_val(x)
        if isinstance(v, (torch.SymInt, torch.SymBool, torch.SymFloat)):
            out = self._sym(v, env)
        elif ("example_value" in x.meta or "val" in x.meta) and isinstance(v, SCALAR_META):
            out = v
        elif isinstance(v, torch.Size) or (isinstance(v, (tuple, list)) and v and all(
                isinstance(e, (int, torch.SymInt)) for e in v)):  # fmt: skip
            out = tuple(self._sym(e, env) if isinstance(e, torch.SymInt) else e for e in v)
        elif x.op in ("placeholder", "get_attr"):
            out = self.leaf(x)
        elif x.op in ("call_function", "call_method"):
            out = self._call(x, env)
        else:
            raise NotEvaluable(f"cannot evaluate {x.op} node {x.name}")
        env[x] = out
        return out

    def _template(self, node, env):
        v = meta_val(node)
        if not isinstance(v, torch.Tensor):
            return self._value(node, env)
        shape = [self._sym(s, env) if isinstance(s, torch.SymInt) else s for s in v.shape]
        return torch.zeros(shape, dtype=v.dtype, device=v.device)

    def _call(self, node, env):
        name = op_name(node)
        t = TEMPLATE_ARGS.get(name)
        args = [self._template(a, env) if i == t and isinstance(a, fx.Node) else self._value(a, env)
                for i, a in enumerate(node.args)]  # fmt: skip
        kwargs = {k: self._value(a, env) for k, a in node.kwargs.items()}
        try:
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            return node.target(*args, **kwargs)
        except NotEvaluable:
            raise
        except Exception as e:  # the subgraph does something that fails on these values (out of range, ...)
            raise NotEvaluable(f"{name} at {node.name} fails on the probe values ({type(e).__name__}: {e})") from e




def _nodes_in(x) -> list:
    out = []
    fx.node.map_arg(x, out.append)
    return out
