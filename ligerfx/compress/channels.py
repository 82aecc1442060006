"""Find a model's channel-prunable MLPs by data flow: modules whose forward is linear(s) ->
elementwise ops -> one linear, so that hidden channel j of the last linear's input depends only
on channel j of the first linears' outputs (what structured pruning of the hidden width needs).

Each module with two or more direct `nn.Linear` children is traced with `torch.fx` (linears kept
as leaves) and its graph walked from the linears' outputs: every op that touches a hidden-channel
tensor must be elementwise over the channel dimension (activations, products and sums of hidden
tensors, arithmetic with Python scalars) until exactly one linear consumes them.  Anything else
(a reshape, slice, reduction, a tensor mixed in from elsewhere, hidden values returned, a linear
used twice or shared with another module) refuses the module with the reason.  Nothing is keyed
on module or model names.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ChannelMLP:
    """Names (relative to the MLP module) of the linears producing the hidden channels, and of the
    one linear consuming them; `width` hidden channels."""
    producers: list
    consumer: str
    width: int


# Ops that act on each element on its own (channel j in, channel j out).
_UNARY_FUNCS = {F.silu, F.gelu, F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.mish,
                F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh, F.softplus, F.dropout, F.hardtanh,
                torch.sigmoid, torch.tanh, torch.relu, torch.exp, torch.erf, torch.neg, torch.abs,
                torch.square, torch.sqrt, torch.rsqrt, torch.clamp, torch.pow, operator.neg}
_BINARY_FUNCS = {operator.mul, operator.add, operator.sub, operator.truediv, operator.pow,
                 torch.mul, torch.add, torch.sub, torch.div, torch.pow, torch.maximum, torch.minimum}
_METHODS = {"mul", "add", "sub", "div", "pow", "sigmoid", "tanh", "relu", "exp", "neg", "abs",
            "square", "sqrt", "rsqrt", "clamp", "clamp_min", "clamp_max", "erf", "mul_", "add_",
            "type_as", "to", "float", "half", "bfloat16", "contiguous", "clone"}
_ACT_MODULES = (nn.SiLU, nn.GELU, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU,
                nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Softplus,
                nn.Identity, nn.Dropout, nn.Hardtanh)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, (nn.Linear, *_ACT_MODULES)) or super().is_leaf_module(m, qualname)


def _describe(n: fx.Node) -> str:
    t = n.target
    name = t if isinstance(t, str) else getattr(t, "__name__", str(t))
    return f"{n.op} {name}"


def analyse(module: nn.Module) -> tuple:
    """(ChannelMLP, "") if `module` is an elementwise MLP, else (None, why not)."""
    try:
        gm = _Tracer().trace(module)
    except Exception as e:  # noqa: BLE001 - any tracing failure is a reason to leave it alone
        return None, f"torch.fx could not trace it ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    subs = dict(module.named_modules())
    linear_calls = [n for n in gm.nodes if n.op == "call_module" and isinstance(subs.get(n.target), nn.Linear)]
    targets = [n.target for n in linear_calls]
    if len(set(targets)) != len(targets):
        return None, "a linear is called more than once"
    for n in gm.nodes:
        if n.op == "get_attr" and any(n.target.startswith(f"{t}.") for t in targets):
            return None, f"{n.target} is read directly, not only through its linear"
    hidden: set = set()  # nodes carrying the hidden channels
    producers, consumer = [], None
    for n in gm.nodes:
        ins = [a for a in n.all_input_nodes]
        touches = [a for a in ins if a in hidden]
        if n.op == "call_module" and n in linear_calls:
            if touches:
                if consumer is not None:
                    return None, (f"both {consumer.target} and {n.target} read the hidden channels; "
                                  "only one linear may consume them")
                consumer = n
            else:
                producers.append(n)
                hidden.add(n)
            continue
        if not touches:
            continue
        if n.op == "output":
            return None, "the hidden channels are returned, not only consumed by one linear"
        why = _not_elementwise(n, hidden, subs)
        if why:
            return None, why
        hidden.add(n)
    if consumer is None:
        return None, "no linear consumes the outputs of the others"
    used = {p for p in producers if _reaches(p, consumer)}
    if not used:
        return None, "no linear's output reaches the consuming linear"
    if len(used) != len(producers):
        extra = [p.target for p in producers if p not in used]
        return None, f"linear(s) {', '.join(extra)} do not feed the consuming linear"
    # Hidden values that never reach the consumer would be other outputs of the channel dim.
    dead = [n for n in hidden if not _reaches(n, consumer) and n.users]
    if dead:
        return None, f"{_describe(dead[0])} uses the hidden channels but does not feed {consumer.target}"
    width = subs[consumer.target].in_features
    for p in producers:
        if subs[p.target].out_features != width:
            return None, (f"{p.target} has {subs[p.target].out_features} outputs but {consumer.target} "
                          f"reads {width}")
    return ChannelMLP([p.target for p in producers], consumer.target, width), ""


def _reaches(a: fx.Node, b: fx.Node) -> bool:
    todo, seen = [a], set()
    while todo:
        n = todo.pop()
        if n is b:
            return True
        if n in seen:
            continue
        seen.add(n)
        todo.extend(n.users)
    return False


def _not_elementwise(n: fx.Node, hidden: set, subs: dict) -> str:
    """Why node `n` (which reads hidden channels) is not channel-wise, or ""."""
    others = [a for a in n.all_input_nodes if a not in hidden]
    if n.op == "call_module":
        if isinstance(subs.get(n.target), _ACT_MODULES) and not others:
            return ""
        return f"{_describe(n)} ({type(subs.get(n.target)).__name__}) is not an elementwise activation"
    if n.op == "call_function":
        ok = n.target in _UNARY_FUNCS or n.target in _BINARY_FUNCS
    elif n.op == "call_method":
        ok = n.target in _METHODS
    else:
        ok = False
    if not ok:
        return f"{_describe(n)} on the hidden channels is not elementwise"
    if others:
        return (f"{_describe(n)} mixes the hidden channels with {others[0].name}, a tensor not "
                "computed channel by channel from them")
    return ""


def find(model: nn.Module) -> tuple:
    """({module name: ChannelMLP}, {module name: reason refused}) over every module with two or
    more direct nn.Linear children."""
    counts: dict = {}
    for _, m in model.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    found, refused = {}, {}
    for name, mod in model.named_modules():
        kids = [c for c in mod.children() if type(c) is nn.Linear]
        if len(kids) < 2:
            continue
        spec, why = analyse(mod)
        if spec is not None:
            lins = [mod.get_submodule(t) for t in spec.producers + [spec.consumer]]
            if any(type(m) is not nn.Linear for m in lins):
                spec, why = None, "its linears are subclasses of nn.Linear (already compressed?)"
            elif any(counts[id(m)] > 1 for m in lins + [mod]) or any(
                    counts[id(p)] > 1 for m in lins for p in m.parameters()):
                spec, why = None, "it or one of its linears is shared with another part of the model"
            elif len({id(m.weight) for m in lins}) != len(lins):
                spec, why = None, "two of its linears share a weight"
        if spec is None:
            refused[name or "<model>"] = why
        else:
            found[name] = spec
    return found, refused
