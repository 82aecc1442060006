"""Facts about one FX node, read without building a view: its example value, its op's name,
whether it is pure, and whether it is arithmetic that returns its input unchanged.

The canonical view (ligerfx/compiler/canonical.py) builds on these names; the analyses here in
graph/ (writes, grad mode, precision, scheduling) ask them directly.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from .symbolic import known_equal

# Canonical name for call_function targets.  Methods use their own name (see METHOD_ALIASES).
FUNCTIONS: dict[Any, str] = {
    operator.add: "add", torch.add: "add",
    operator.sub: "sub", torch.sub: "sub", torch.subtract: "sub",
    operator.mul: "mul", torch.mul: "mul", torch.multiply: "mul",
    operator.truediv: "div", torch.div: "div", torch.true_divide: "div", torch.divide: "div",
    operator.neg: "neg", torch.neg: "neg", torch.negative: "neg",
    operator.pow: "pow", torch.pow: "pow",
    operator.matmul: "matmul", torch.matmul: "matmul",
    operator.getitem: "getitem",
    torch.square: "square", torch.sqrt: "sqrt", torch.rsqrt: "rsqrt",
    torch.reciprocal: "reciprocal", torch.exp: "exp", torch.log: "log", torch.erf: "erf",
    torch.tanh: "tanh", F.tanh: "tanh", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
    torch.abs: "abs", torch.relu: "relu", F.relu: "relu",
    torch.mean: "mean", torch.sum: "sum", torch.var: "var",
    F.silu: "silu", F.gelu: "gelu",
    F.rms_norm: "rms_norm", torch.rms_norm: "rms_norm",
    F.layer_norm: "layer_norm", torch.layer_norm: "layer_norm",
    F.linear: "linear", torch._C._nn.linear: "linear",
    F.cross_entropy: "cross_entropy", F.nll_loss: "nll_loss",
    torch.cat: "cat", torch.concat: "cat", torch.concatenate: "cat",
    torch.stack: "stack", torch.chunk: "chunk", torch.split: "split",
    torch.reshape: "reshape", torch.transpose: "transpose", torch.unsqueeze: "unsqueeze",
    torch.squeeze: "squeeze", torch.flatten: "flatten",
    torch.view_as_complex: "view_as_complex", torch.view_as_real: "view_as_real",
    torch.softmax: "softmax", F.softmax: "softmax", torch.log_softmax: "log_softmax",
    F.log_softmax: "log_softmax", F.pad: "pad", torch.narrow: "narrow",
    torch.unflatten: "unflatten", torch.gather: "gather", torch.logsumexp: "logsumexp",
    torch.select: "select", torch.unbind: "unbind",
    torch.clamp: "clamp", torch.clip: "clamp", torch.clamp_min: "clamp_min",
    torch.clamp_max: "clamp_max",
}


METHOD_ALIASES = {"__getitem__": "getitem", "concat": "cat", "multiply": "mul",
                   "subtract": "sub", "divide": "div", "true_divide": "div", "negative": "neg",
                   "clip": "clamp"}


CONVERT_METHODS = {"to", "float", "half", "bfloat16", "double", "type", "type_as"}


IDENTITY_METHODS = {"contiguous"}


# Every method that converts a value without changing it beyond its dtype (patterns that walk
# chains of casts by hand use this one list).
CAST_METHODS = frozenset(CONVERT_METHODS | IDENTITY_METHODS)


def node_value(node: fx.Node) -> Any:
    """The example value (fake tensor or symbolic scalar) of a node, or None."""
    meta = node.meta
    for key in ("example_value", "val"):
        if key in meta:
            return meta[key]
    tm = meta.get("tensor_meta")
    return tm


NOOP_OPS = frozenset({"add", "sub", "mul", "div"})


_NOOP_TARGETS = {operator.add: "add", torch.add: "add", operator.sub: "sub", torch.sub: "sub",
                 operator.mul: "mul", torch.mul: "mul", operator.truediv: "div", torch.div: "div"}


def is_number(c: Any) -> bool:
    return isinstance(c, (int, float)) and not isinstance(c, bool)


def noop_source(node: fx.Node) -> fx.Node | None:
    """The input of `node` when `node` is arithmetic that returns its input unchanged for every
    value, else None: `x * 1`, `1 * x`, `x / 1`, `x - 0`, `x + -0.0`, `-0.0 + x` with a Python
    number (a tensor operand could broadcast or promote), no keywords (`alpha`), and the same
    dtype, shape and device in and out (an int tensor `* 1.0` promotes: not a no-op).

    `x + 0` (and `x - -0.0`) is NOT a no-op: it maps -0.0 to +0.0.  Every pattern here passes its
    input's sign of zero on to its output (RMSNorm/LayerNorm `x * rstd`, RoPE's products, the
    gated product), so folding it would change the sign of zero outputs; it stays opaque."""
    if node.op == "call_method":
        name = METHOD_ALIASES.get(node.target, node.target)
    elif node.op == "call_function":
        name = _NOOP_TARGETS.get(node.target)
    else:
        return None
    if name not in NOOP_OPS or node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    if isinstance(a, fx.Node) and is_number(b):
        x, c, first = a, b, True
    elif isinstance(b, fx.Node) and is_number(a) and name in ("add", "mul"):
        x, c, first = b, a, False
    else:
        return None
    neg_zero = isinstance(c, float) and c == 0 and math.copysign(1.0, c) < 0
    pos_zero = c == 0 and not neg_zero
    ok = ((name == "mul" and c == 1) or (name == "div" and first and c == 1)
          or (name == "sub" and first and pos_zero) or (name == "add" and neg_zero))
    if not ok:
        return None
    vin, vout = node_value(x), node_value(node)
    if not (isinstance(vin, torch.Tensor) and isinstance(vout, torch.Tensor)):
        return None
    if vin.dtype != vout.dtype or vin.device != vout.device or vin.dim() != vout.dim():
        return None
    if not all(known_equal(p, q) for p, q in zip(vin.shape, vout.shape)):
        return None
    return x


def schema_pure(name: str) -> bool:
    """Whether every overload of `aten::<name>` is free of effects: it writes no argument other
    than a keyword-only `out=` (absent from the node, see `node_pure`), draws no random numbers
    and does not alias-or-mutate by its tags.  `empty*` values are uninitialised memory, never
    equal to each other.  Unknown names are impure."""
    got = _PURE_CACHE.get(name)
    if got is not None:
        return got
    packet = getattr(torch.ops.aten, name, None) if name.isidentifier() else None
    pure = isinstance(packet, torch._ops.OpOverloadPacket) and "empty" not in name
    if pure:
        pure = all(overload_pure(getattr(packet, ov)) for ov in packet.overloads())
    _PURE_CACHE[name] = pure
    return pure


def overload_pure(op) -> bool:
    """One overload (an aten op or a custom op such as liger::rope): no write to an argument
    other than a keyword-only `out=`, no random numbers, not tagged as aliasing or mutating."""
    writes = [a for a in op._schema.arguments
              if a.alias_info is not None and a.alias_info.is_write and not a.kwarg_only]
    bad_tags = {torch.Tag.nondeterministic_seeded, torch.Tag.maybe_aliasing_or_mutating}
    return not writes and not bad_tags.intersection(op.tags)


_PURE_CACHE: dict[str, bool] = {}


def node_pure(node: fx.Node) -> bool:
    """Whether an fx node computes a pure function of its arguments (torch functions, Tensor
    methods and aten overloads judged by their schema; anything else, or an `out=`, is not)."""
    if "out" in node.kwargs:
        return False
    t = node.target
    if node.op == "call_method":
        return isinstance(t, str) and schema_pure(t)
    if node.op != "call_function":
        return False
    if isinstance(t, torch._ops.OpOverload):
        return overload_pure(t)
    mod = getattr(t, "__module__", None) or ""
    qual = getattr(t, "__qualname__", "") or ""
    if mod.startswith("torch") or qual.startswith(("TensorBase.", "Tensor.")):
        name = getattr(t, "__name__", "")
        return isinstance(name, str) and schema_pure(name)
    return False


def target_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    if isinstance(target, torch._ops.OpOverloadPacket):
        return str(target) + ".default"
    mod = getattr(target, "__module__", None) or ""
    return f"{mod}.{getattr(target, '__qualname__', getattr(target, '__name__', repr(target)))}"


def op_name(node: fx.Node) -> str:
    """The canonical op name of one fx node, read without building a view (for reports/dumps):
    `linear`, `mul`, `getitem`, a cast method's own name, or the full name of an unknown target."""
    if node.op == "call_method":
        return METHOD_ALIASES.get(node.target, node.target)
    if node.op == "call_function":
        return FUNCTIONS.get(node.target) or target_name(node.target)
    if node.op == "call_module":
        return str(node.target)
    return node.op
