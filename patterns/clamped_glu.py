"""`clamped_glu`: the clamped GLU of GPT-OSS's experts -> `liger::clamped_glu`.

The math, as transformers' `GptOssExperts._apply_gate` writes it:

    gate = gate.clamp(max=limit);  up = up.clamp(-limit, limit)
    y = (up + c) * (gate * sigmoid(gate * alpha))

a gated activation act(gate) * (up + c) with act(g) = g * sigmoid(alpha * g) (Swish with a
slope; SiLU when alpha = 1), the gate clamped above or on both sides or not at all, up clamped on
both sides or not at all, and the constant c added to up or not (another one-sided clamp stays in
the graph, computed by eager, and the rest is rewritten).  alpha, every bound and c
are values bound from the graph (Python numbers; a tensor or symbolic one is a near miss), so
other limits, slopes and constants are the same rewrite; `clamp` / `clip` / `clamp_min` /
`clamp_max` are one op in the canonical view.  No cast may sit inside (the pattern does not look
through casts: a cast between the steps leaves the match to the gated detector's near miss).

Exactness: the kernel rounds after every op as eager does in bf16/fp16 and replays autograd's
backward op by op (kernels/gated_act.py).  A bound that is not a value of the inputs' dtype is
refused: eager compares against the rounded bound in clamp's backward on one device and may
not on another, so the gradient mask at the bound is not one thing to reproduce.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

import ligerfx.kernels.gated_act  # noqa: F401 - defines torch.ops.liger.clamped_glu
from ligerfx.compiler.passes import Skip
from ligerfx.compiler.pattern import register
from ligerfx.graph.nodes import node_value
from ligerfx.graph.symbolic import known_equal

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_SIDES = {"none": (), "max": ("max",), "min": ("min",), "both": ("min", "max")}


def _variant(gate_side: str, up_side: str, add: bool):
    """One form: which clamp sides gate and up have, and whether c is added to up."""
    g_names = [f"gate_{s}" for s in _SIDES[gate_side]]
    u_names = [f"up_{s}" for s in _SIDES[up_side]]
    params = ["gate", "up", "alpha"] + g_names + u_names + (["c"] if add else [])

    def clamp(x, sides, vals):
        kw = dict(zip(sides, vals))
        return x.clamp(**kw) if kw else x

    def fn(*args):
        a = dict(zip(params, args))
        gate = clamp(a["gate"], _SIDES[gate_side], [a[n] for n in g_names])
        up = clamp(a["up"], _SIDES[up_side], [a[n] for n in u_names])
        glu = gate * torch.sigmoid(gate * a["alpha"])
        return ((up + a["c"]) if add else up) * glu

    # symbolic_trace reads the parameter names from the signature
    src = f"def clamped_glu_{gate_side}_{up_side}_{int(add)}({', '.join(params)}):\n" \
          f"    return fn({', '.join(params)})\n"
    scope = {"fn": fn}
    exec(src, scope)  # noqa: S102 - a signature built from the fixed names above
    out = scope[f"clamped_glu_{gate_side}_{up_side}_{int(add)}"]
    out.__doc__ = "Clamped GLU: (clamp(up) + c) * g * sigmoid(alpha * g), g = clamp(gate)."
    out.form = (gate_side, up_side, add)
    return out


# GPT-OSS's form first, then the others, more steps before fewer: when a form is refused (a bound
# that is a tensor, not a value of the dtype), a shorter one takes the rest, the refused clamp
# left in the graph as eager computes it (and the near miss says why it was not fused)
# (one-sided clamps other than the gate's max are left to the shorter forms, the clamp in the
# graph: each variant is tried at every product of every graph, so the list stays short)
_FORMS = sorted(((g, u, a) for g in ("max", "both", "none") for u in ("both", "none")
                 for a in (True, False)),
                key=lambda f: (f != ("max", "both", True), -len(_SIDES[f[0]]) - len(_SIDES[f[1]])
                               - f[2]))
_VARIANTS = [_variant(*f) for f in _FORMS]


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _dt(dt) -> str:
    return str(dt).replace("torch.", "")


def check(match):
    gate, up = match.value("gate"), match.value("up")
    names = [n for n in ("alpha", "gate_min", "gate_max", "up_min", "up_max", "c")
             if n in match.bindings]
    for n in names:
        if match[n] is None:  # `clamp(min=None, ...)` bound to a side: a shorter form's match
            raise Skip
        if not _is_number(match[n]):
            what = (f"the tensor `{match[n].name}`" if isinstance(match[n], fx.Node)
                    else type(match[n]).__name__)
            return (f"{n} is {what}, not a Python number (the clamped GLU kernel takes its "
                    "slope, bounds and constant as numbers)")
    if gate.dim() != up.dim() or not all(known_equal(a, b) for a, b in zip(gate.shape, up.shape)):
        return (f"gate {tuple(gate.shape)} and up {tuple(up.shape)} do not have the same shape "
                "(the product broadcasts)")
    dt = gate.dtype
    out = getattr(node_value(match.tops[0]), "dtype", None)
    if dt not in _FLOATS or up.dtype != dt or out != dt:
        return (f"gate {_dt(dt)}, up {_dt(up.dtype)}, product {_dt(out)}: the kernel computes "
                "in one floating dtype")
    bounds = {}
    for side in ("gate", "up"):
        lo, hi = match.bindings.get(f"{side}_min"), match.bindings.get(f"{side}_max")
        for b in (lo, hi):
            if b is not None and (math.isnan(b) or float(torch.tensor(b, dtype=dt)) != b):
                return (f"the {side} clamp's bound {b} is not a {_dt(dt)} value (eager may compare "
                        "against it rounded or not; the kernel does not model that)")
        if lo is not None and hi is not None and lo > hi:
            return f"the {side} clamp's min {lo} exceeds its max {hi}"
        bounds[side] = (lo, hi)
    alpha = float(match["alpha"])
    c = match.bindings.get("c")
    match.params.update(alpha=alpha, c=None if c is None else float(c),
                        gate_min=bounds["gate"][0], gate_max=bounds["gate"][1],
                        up_min=bounds["up"][0], up_max=bounds["up"][1])

    def rng(lo, hi):
        return "none" if lo is None and hi is None else f"[{lo}, {hi}]"

    match.detail = (f"alpha {alpha:g}, gate clamp {rng(*bounds['gate'])}, up clamp "
                    f"{rng(*bounds['up'])}{'' if c is None else f', up + {c:g}'}, {_dt(dt)}")
    return None


def replace(gate, up, alpha=1.0, gate_min=None, gate_max=None, up_min=None, up_max=None, c=None,
            *, match=None):
    if match is not None:
        p = match.params
        alpha, c = p["alpha"], p["c"]
        gate_min, gate_max, up_min, up_max = p["gate_min"], p["gate_max"], p["up_min"], p["up_max"]
    as_float = [None if v is None else float(v) for v in (gate_min, gate_max, up_min, up_max, c)]
    return torch.ops.liger.clamped_glu(gate, up, float(alpha), *as_float)


_EXAMPLES = {"gate": torch.randn(2, 3, 8), "up": torch.randn(2, 3, 8), "alpha": 1.702,
             "gate_min": -7.0, "gate_max": 7.0, "up_min": -7.0, "up_max": 7.0, "c": 1.0}

register(
    "clamped_glu", _VARIANTS, replace, _EXAMPLES, constraints=check, priority=6, builtin=True,
    description="clamped GLU (clamp(up) + c) * g * sigmoid(alpha g), g = clamp(gate) (GPT-OSS) "
                "-> liger::clamped_glu",
)
