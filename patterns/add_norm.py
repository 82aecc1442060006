"""`add_rms_norm` / `add_layer_norm`: a residual add `h = x + residual` and the norm of h, as one op.

Pre-norm decoders write `h = x + residual; y = norm(h)` and use h again later (the next residual
add).  These patterns are the `rms_norm` / `layer_norm` patterns themselves (the same variant
functions, example inputs and constraints, taken from the registry: every spelling those accept,
casts included, is accepted here), tried first; the constraint then looks at what the norm's
input is.  When it is an add of two tensors of one shape and dtype, the add joins the match and
h becomes the op's second output when anything else reads it.  Otherwise:

- not an add of two tensors (a placeholder, `x + eps`, another op): Skip, the plain norm pattern
  takes the norm;
- the norm alone would not be rewritten (its own constraints or safety): Skip, the plain pattern
  reports the same near miss (one near miss, not two);
- an add the op cannot reproduce (broadcasting, type promotion, `alpha=`, in place): a near miss
  naming it; the plain norm pattern still rewrites the norm.

The op adds in the inputs' dtype (fp32 sum, one rounding: eager's add), so h is eager's bit for bit.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

import ligerfx.kernels.add_norm  # noqa: F401 - defines torch.ops.liger.add_rms_norm / add_layer_norm
from ligerfx.compiler import rewriter
from ligerfx.graph.nodes import node_value
from ligerfx.compiler.passes import Skip
from ligerfx.compiler.pattern import REGISTRY, register
from ligerfx.graph.precision import short, through_casts
from ligerfx.graph.symbolic import known_equal

from . import layer_norm as _ln
from . import rms_norm as _rms

_ADDS = (operator.add, torch.add)
_INPLACE = (operator.iadd,)


def _is_add(n: fx.Node, inplace: bool = False) -> bool:
    if n.op == "call_function":
        return n.target in (_INPLACE if inplace else _ADDS)
    return n.op == "call_method" and n.target == ("add_" if inplace else "add")


def _operands(h: fx.Node):
    """(x, residual, alpha) of the add computing h."""
    args, kw = list(h.args), dict(h.kwargs)
    x = args[0] if args else kw.get("input", kw.get("self"))
    r = args[1] if len(args) > 1 else kw.get("other")
    alpha = args[2] if len(args) > 2 else kw.get("alpha", 1)
    return x, r, alpha


def _is_tensor(n) -> bool:
    return isinstance(n, fx.Node) and isinstance(node_value(n), torch.Tensor)


def _add_problem(h: fx.Node, x: fx.Node, r: fx.Node, alpha) -> str | None:
    """Why the fused op's `x + residual` (same shape and dtype, alpha 1) would not be eager's."""
    hv, xv, rv = node_value(h), node_value(x), node_value(r)
    if isinstance(alpha, bool) or not (isinstance(alpha, (int, float)) and alpha == 1):
        return (f"the residual add `{h.name}` scales its second operand (alpha={alpha}); the fused "
                "op computes x + residual")
    if not (xv.dtype == rv.dtype == hv.dtype):
        return (f"the residual add `{h.name}` promotes {short(xv.dtype)} + {short(rv.dtype)} to "
                f"{short(hv.dtype)}; the fused op adds two tensors of one dtype")
    if xv.device != rv.device:
        return f"the residual add `{h.name}` mixes devices {xv.device} and {rv.device}"
    shapes = [tuple(v.shape) for v in (xv, rv, hv)]
    if not (len(set(map(len, shapes))) == 1
            and all(known_equal(a, b) and known_equal(a, c) for a, b, c in zip(*shapes))):
        return (f"the residual add `{h.name}` broadcasts {shapes[0]} + {shapes[1]} to {shapes[2]}; "
                "the fused op adds two tensors of one shape")
    return None


def _absorb_add(match, h: fx.Node, x: fx.Node, r: fx.Node) -> None:
    """Widen the norm's match by the add: h joins the covered nodes, with the casts between h
    and the norm's reads of it (its upcast) that only the norm reads; h is a second output when
    something outside still reads it."""
    inside = set(match.covered)
    steps = []
    for n in match.covered:
        for a in n.all_input_nodes:
            if a not in inside:
                src, chain = through_casts(a)
                if src is h:
                    steps.extend(s for s in chain if s not in steps)
    grew = True
    while grew:  # a cast joins once every reader of it is inside (chains join top-down)
        grew = False
        for s in steps:
            if s not in inside and all(u in inside for u in s.users):
                inside.add(s)
                grew = True
    match.covered = list(dict.fromkeys([h] + [s for s in steps if s in inside] + match.covered))
    match.bindings.update(x=x, residual=r)
    uses = [u for u in h.users if u not in inside]
    if uses:
        match.outputs = [match.outputs[0], h]
        match.tops = [match.tops[0], h]
    match.params["returns_h"] = bool(uses)
    what = "h also returned" if uses else "h read only by the norm"
    match.detail = f"{match.detail}; {what}" if match.detail else what


def _fused_with_add(base_name: str):
    """The constraint of the add form of pattern `base_name` (see the module docstring)."""

    def check(match):
        h = match["x"]
        if not isinstance(h, fx.Node):
            raise Skip
        # `h.add_(r)` / `h += r` before the norm: the norm reads h itself (or the iadd's result)
        writer = h if _is_add(h, inplace=True) else next(
            (u for u in h.users if _is_add(u, inplace=True) and u.args and u.args[0] is h), None)
        if writer is None and not _is_add(h):
            raise Skip
        x, r, alpha = _operands(writer if writer is not None else h)
        written_sum = None
        if not (_is_tensor(x) and _is_tensor(r)):
            # `h = x + residual; h.add_(c)`: a residual sum written before the norm reads it
            hx, hr, _ = _operands(h) if writer is not h and _is_add(h) else (None, None, None)
            if writer is None or not (_is_tensor(hx) and _is_tensor(hr)):
                raise Skip  # `h + eps`, `h + 1`: not a residual add
            written_sum = writer
        base = REGISTRY.get(base_name)
        for c in base.constraints:  # the norm alone must be rewritable, or its pattern says why
            if isinstance(c(match), str):
                raise Skip
        if match.safety_problem(None, rewriter.insertion_point(match)):
            raise Skip
        if written_sum is not None:
            return (f"the residual sum `{h.name}` is written in place by `{written_sum.name}`: "
                    "the norm reads the written value, not the add's output, so the add is not "
                    "fused (the norm alone is rewritten)")
        if writer is not None:
            return (f"the residual add `{writer.name}` is in place (it writes `{x.name}`); the "
                    "fused op returns a new h (write `h = x + residual`)")
        problem = _add_problem(h, x, r, alpha)
        if problem:
            return problem
        _absorb_add(match, h, x, r)
        return None

    check.__name__ = f"{base_name}_after_add"
    return check


def replace_rms(x, residual=None, weight=None, eps=None, offset=0.0, *, match=None):
    if residual is None:  # (the registration check runs the norm variants on their own inputs)
        return _rms.replace(x, weight, eps, offset, match=match)
    eps = _rms.default_eps(x, eps)
    y, h, _ = torch.ops.liger.add_rms_norm(x, residual, weight, eps, float(offset),
                                           match.params["casting_mode"], match.out_dtype)
    return (y, h) if match.params["returns_h"] else y


def replace_ln(x, residual=None, weight=None, bias=None, eps=1e-5, *, match=None):
    if residual is None:
        return _ln.replace(x, weight, bias, eps, match=match)
    y, h, _, _ = torch.ops.liger.add_layer_norm(x, residual, weight, bias, eps, match.out_dtype)
    return (y, h) if match.params["returns_h"] else y


def _register(name: str, base_name: str, replace, description: str) -> None:
    base = REGISTRY.get(base_name)
    register(name, [v.fn for v in base.rewritable], replace, example_inputs=base.example_inputs,
             constraints=_fused_with_add(base_name), priority=base.priority + 1,
             allow_casts=base.allow_casts, description=description, builtin=True)


_register("add_rms_norm", "rms_norm", replace_rms,
          "residual add + RMSNorm (any rms_norm spelling after h = x + residual) -> liger::add_rms_norm")
_register("add_layer_norm", "layer_norm", replace_ln,
          "residual add + LayerNorm (any layer_norm spelling after h = x + residual) -> liger::add_layer_norm")
