"""Detector for gated activations no gated pattern took (issue 23: a silent miss is a bug).

What a gated activation is, by data flow: a nonlinear elementwise function of one projection
(silu, gelu, relu², sigmoid, mish, ... or a formula of them: `g * sigmoid(g)`, gelu's tanh form)
multiplied elementwise by another projection of the same input (two linears / matmuls of it, or
two pieces of one fused projection).  A product of an activation with anything else (attention's
output, an SSM's state), a bilinear product with no activation, and an activation alone are
never hits.
"""

from __future__ import annotations

import re

from ligerfx.compiler.canonical import CNode
from ligerfx.compiler.detect import fx_nodes, name, op, register_detector, strip

# Nonlinear elementwise ops of one tensor (the activation's pieces).
_NONLINEAR = {"silu", "gelu", "relu", "sigmoid", "tanh", "erf", "exp", "mish", "elu", "selu",
              "celu", "softplus", "leaky_relu", "hardswish", "hardsigmoid", "relu6", "square",
              "pow", "hardtanh", "logsigmoid", "softsign", "tanhshrink"}
# Steps that are no activation by themselves (bounds and affine maps of the same tensor).
_LINEAR_STEPS = {"cast", "neg", "add", "sub", "mul", "div", "clamp", "clamp_min", "clamp_max"}
# A projection: a linear layer or a matrix product of any kind (mm, bmm, addmm, a grouped mm of
# experts as a custom op, einsum).
_PROJECTION = re.compile(r"(^|[._])(linear|matmul|einsum|[a-z]*mm)([._]|$)")
_PIECES = {"slice", "getitem", "cast"}
# What the gated kernels compute (with the spellings the patterns take).
_MODELLED = ({"silu"}, {"sigmoid"}, {"gelu"}, {"relu", "square"}, {"tanh", "pow"},
             {"tanh", "square"})


def _number(a) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool)


def _holds_tensor(a) -> bool:
    if isinstance(a, CNode):
        return True
    return isinstance(a, tuple) and any(_holds_tensor(x) for x in a)


def _projection(c):
    """(projection node, its input) when `c` is a projection or a piece of one."""
    c = strip(c, tuple(_PIECES))
    if not isinstance(c, CNode) or not _PROJECTION.search(c.op):
        return None
    if op(c) in ("addmm", "baddbmm") and len(c.args) > 1:
        return c, strip(c.args[1])
    first = next((a for a in c.args if isinstance(a, CNode)), None)  # einsum: after its equation
    return c, strip(first) if first is not None else None


def _activation(c, memo: dict, depth: int = 0):
    """(root, ops) when `c` is an elementwise function of the single tensor root (not itself a
    step of the function), ops the ops on the way; None otherwise."""
    if id(c) in memo:
        return memo[id(c)]
    memo[id(c)] = None  # cycles cannot happen in a graph; depth bounds the walk anyway
    if depth > 12 or not isinstance(c, CNode):
        return None
    out = None
    if op(c) in _NONLINEAR or op(c) in _LINEAR_STEPS:
        tensors = [a for a in c.args if isinstance(a, CNode)]
        # every other argument a constant (a number, a bound, keyword constants)
        others_ok = all(isinstance(a, CNode) or not _holds_tensor(a) for a in c.args)
        if tensors and others_ok:
            subs = [_activation(t, memo, depth + 1) for t in tensors]
            roots = {id(s[0]) if s else id(t) for s, t in zip(subs, tensors)}
            if len(roots) == 1:
                root = subs[0][0] if subs[0] else tensors[0]
                ops = set().union(*(s[1] for s in subs if s)) | {op(c)}
                out = (root, ops)
    memo[id(c)] = out
    return out


def detect_gated(view):
    memo: dict = {}
    for c in view.cnodes():
        if op(c) != "mul" or len(c.args) != 2 or not c.nodes:
            continue
        a, b = c.args
        if not isinstance(a, CNode) or not isinstance(b, CNode):
            continue
        for act, up in ((a, b), (b, a)):
            got = _activation(act, memo)
            if got is None:
                continue
            root, steps = got
            ops = steps & _NONLINEAR
            # up may be bounded or shifted first (gpt-oss: `(up.clamp(-l, l) + 1)`), but not
            # activated: act(a) * act(b) is no gate
            up_fn = _activation(up, memo)
            if up_fn is not None and up_fn[1] & _NONLINEAR:
                continue
            up_root = up_fn[0] if up_fn is not None else up
            gate, upp = _projection(root), _projection(up_root)
            if not ops or gate is None or upp is None or gate[1] is None:
                continue
            if root is strip(up_root) or gate[1] is not upp[1]:
                continue
            if tuple(getattr(c.value, "shape", ())) != tuple(getattr(up_root.value, "shape",
                                                                 (None,))):
                continue  # a broadcast product is no gate
            yield c.nodes[0], fx_nodes(c, act), _why(ops, steps, root, up_root, up_fn,
                                                      gate[1])
            break


def _why(ops, steps, root, up, up_fn, x) -> str:
    seen = (f"{'/'.join(sorted(ops))} of {name(root)} times {name(up)}, two projections of "
            f"{name(x)}")
    if not any(ops == m for m in _MODELLED) or (ops == {"sigmoid"} and "mul" not in steps):
        # sigmoid alone is the original GLU; with `g * sigmoid(g)` it is silu spelled out
        return f"{seen}: the gated kernels compute silu, gelu and relu² only"
    if ops == {"sigmoid"} and "mul" in steps and "cast" in steps | (up_fn[1] if up_fn else set()):
        return (f"{seen}: g * sigmoid(alpha * g) with a cast between its steps (the gated "
                "patterns take none inside the activation)")
    extra = (steps - ops - {"cast"}) | ((up_fn[1] - {"cast"}) if up_fn else set())
    if ops in ({"sigmoid"}, {"tanh", "pow"}, {"tanh", "square"}):
        # a formula (silu, gelu's tanh form) is arithmetic: only bounds are extra steps
        extra = {e for e in extra if e.startswith("clamp")} | (
            (up_fn[1] - {"cast"}) if up_fn else set())
    extra = sorted(extra)
    if extra:
        return (f"{seen}: the activation is one the gated kernels compute, but the steps "
                f"around it ({', '.join(extra)}) are in no gated pattern")
    return f"{seen}: an activation the gated kernels compute, in a spelling no gated pattern takes"


register_detector("gated_act", detect_gated, patterns=("swiglu", "geglu", "relu_sq_glu", "clamped_glu"),
                  looks_like="a gated activation")
