"""FX vocabulary shared by the passes: one op name for torch IR (Dynamo) and ATen graphs, argument access."""

from __future__ import annotations

import operator
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
