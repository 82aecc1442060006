"""`gated_rms_norm`: an RMSNorm whose output is multiplied by `silu(gate)` (Qwen3-Next's
`Qwen3NextRMSNormGated`, gate applied after the norm) -> one `liger::gated_rms_norm`.

The norm is whatever the `rms_norm` pattern accepts: each of its variants, times `F.silu(gate)`
or silu written out as `gate * torch.sigmoid(gate)` (accepted in fp32, where it is F.silu up to
fp32's rounding; in bf16/fp16 eager rounds sigmoid and the product each: a near miss), is a variant here (built from that pattern's list, so a spelling added there is found here too).
The norm part is then judged by the `rms_norm` pattern's own constraints, on the sub-match of
that variant at the norm's output, so its casting rules (Llama / fp32 modes, statistics in fp32,
lossy casts refused) are one code path for both patterns.  What is left to check here is the
gate: silu reads it through free casts (applied outside the op, so silu computes in the dtype it
reads and rounds there), its value reaches the product without a rounding cast, and the product
computes in the dtype eager's promotion gives it.

Mamba-2's `MambaRMSNormGated` multiplies by the gate before a grouped norm: a different op, not
matched here (its grouped norm is found by `rms_norm`, the gate multiply stays in the graph).
"""

from __future__ import annotations

import inspect

import torch
import torch.fx as fx
import torch.nn.functional as F

import ligerfx.kernels.gated_rms_norm  # noqa: F401 - defines torch.ops.liger.gated_rms_norm
from ligerfx.compiler.canonical import View
from ligerfx.graph.nodes import node_value
from ligerfx.compiler.matcher import match_at
from ligerfx.compiler.pattern import REGISTRY, register
from ligerfx.graph.precision import is_free_cast, short, through_casts
from ligerfx.graph.symbolic import known_equal

from . import rms_norm as base
from .gated_act import apply_chain, cast_chain, dtype_of, trailing_chain, use_chain

_BASE = REGISTRY.get("rms_norm")


def _gated(fn, silu: str = "F.silu(gate)", tag: str = "gated"):
    """`fn(...) * silu` with fn's parameters plus `gate`.  symbolic_trace reads the parameter
    names from the function's code, so the wrapper is compiled with them spelled out."""
    params = list(inspect.signature(fn).parameters)
    args = ", ".join(params)
    src = f"def {fn.__name__}_{tag}({args}, gate):\n    return fn({args}) * ({silu})\n"
    scope = {"fn": fn, "F": F, "torch": torch}
    exec(compile(src, f"<gated {fn.__name__}>", "exec"), scope)  # noqa: S102 - our own source text
    out = scope[f"{fn.__name__}_{tag}"]
    out.__doc__ = f"{fn.__name__} times {silu}"
    return out


# gated fn -> rms_norm's traced variant (not its look-alikes, matched only to be refused); silu
# also written out as `gate * sigmoid(gate)` (SiLU's definition, as Mamba-2 / FLA code spells it)
_VARIANTS = {_gated(v.fn): v for v in _BASE.rewritable}
_WRITTEN = {_gated(v.fn, "gate * torch.sigmoid(gate)", "gated_sigmoid"): v for v in _BASE.rewritable}
_VARIANTS.update(_WRITTEN)


def _act_node(match):
    """The node computing silu(gate): `F.silu`, or the product `gate * sigmoid(gate)`."""
    if match.variant.fn not in _WRITTEN:
        return match.nodes_of("silu")[0]
    sig = match.nodes_of("sigmoid")[0]
    inside = set(match.covered)
    return next(u for u in match.nodes_of("mul")
                if u in inside and any(through_casts(a)[0] is sig for a in u.args))


def _written_silu_problem(match, act) -> str | None:
    """`gate * sigmoid(gate)` rounds sigmoid and the product where eager computes them; the
    kernel computes silu in fp32 and rounds once.  The two agree (to fp32's rounding, as the
    `swiglu` pattern's written-out form does) only when both ops compute in fp32 with no cast
    between them."""
    sig = match.nodes_of("sigmoid")[0]
    dts = {dtype_of(sig), dtype_of(act)}
    if dts != {torch.float32}:
        return (f"silu is written out as gate * sigmoid(gate) in {'/'.join(sorted(map(short, dts)))}: "
                "eager rounds sigmoid and the product each, the kernel computes silu in fp32 and "
                "rounds once (not reproduced; write F.silu or upcast the gate)")
    a = next(a for a in act.args if isinstance(a, fx.Node) and through_casts(a)[0] is sig)
    if any(dtype_of(c) != torch.float32 for c in through_casts(a)[1]):
        return "sigmoid(gate) is cast before it multiplies the gate; the kernel keeps it in fp32"
    return None


def _norm_match(match):
    """The `rms_norm` pattern's match at the norm's output inside this match, or a reason."""
    top = match.tops[0]
    silu = _act_node(match)
    sides = [a for a in top.args if isinstance(a, fx.Node)]
    norm_side = next((a for a in sides if cast_chain(a, silu) is None), None)
    if norm_side is None:
        return "the gate product has no norm operand"
    norm_top = through_casts(norm_side)[0]  # the node the rms_norm variant computes last
    view = View(match.graph)
    variant = _VARIANTS[match.variant.fn]
    for sub in match_at(_BASE, variant, view, [view[norm_top]]):
        # (identity only: comparing symbolic eps values would install guards)
        if all(sub.bindings.get(k) is match.bindings.get(k) for k in ("x", "weight")):
            sub.options = match.options
            return sub, norm_side
    return "the norm part is not the rms_norm pattern's match"


def check(match):
    x, gate = match.value("x"), match.value("gate")
    if gate.dim() != x.dim() or not all(known_equal(a, b) for a, b in zip(gate.shape, x.shape)):
        return (f"gate {tuple(gate.shape)} and x {tuple(x.shape)} do not have the same shape "
                "(the gate broadcasts)")
    got = _norm_match(match)
    if isinstance(got, str):
        return got
    sub, norm_side = got
    problem = base.check(sub)
    if problem:
        return f"the norm: {problem}"
    norm_dtype = dtype_of(sub.outputs[0])
    if cast_chain(norm_side, sub.outputs[0]) != []:
        return "the norm's value is cast on its way to the gate product"
    g_chain = use_chain(match, "gate")
    if isinstance(g_chain, str):
        return g_chain
    silu = _act_node(match)
    if match.variant.fn in _WRITTEN:
        problem = _written_silu_problem(match, silu)
        if problem:
            return problem
    a_dtype = dtype_of(silu)
    prod = dtype_of(match.tops[0])
    a_side = next(a for a in match.tops[0].args if isinstance(a, fx.Node) and a is not norm_side)
    a_chain = cast_chain(a_side, silu) or []
    for src, dst in zip([a_dtype] + a_chain, a_chain):
        if not is_free_cast(src, dst):
            return (f"silu(gate) is cast {short(src)} -> {short(dst)} before the product; the "
                    "kernel multiplies silu's value as computed")
    if prod not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        return f"the gate product computes in {prod}, not a floating dtype the kernel handles"
    for what, dt in (("the norm", norm_dtype), ("silu(gate)", a_dtype)):
        if not is_free_cast(dt, prod):
            return f"{what} enters the product as {short(dt)}, which the product ({short(prod)}) rounds"
    out_chain = trailing_chain(match)
    match.params.update(casting_mode=sub.params["casting_mode"], norm_dtype=norm_dtype, prod=prod,
                        gate_chain=g_chain, out_dtype=out_chain[0] if out_chain else prod,
                        rest_chain=out_chain[1:])
    written = " (silu written out)" if match.variant.fn in _WRITTEN else ""
    match.detail = f"{sub.detail}, gate {short(a_dtype)}{written}, product {short(prod)}"
    return None


def replace(x, gate, weight=None, eps=None, offset=0.0, *, match=None):
    if eps is None:
        eps = base.default_eps(x, eps)
    if match is None:  # the registration check runs the replacement on plain tensors
        norm_dtype = torch.promote_types(x.dtype, weight.dtype) if weight is not None else x.dtype
        return torch.ops.liger.gated_rms_norm(
            x, weight, gate, base.scalar(eps), float(offset), "llama", norm_dtype,
            torch.promote_types(norm_dtype, gate.dtype), torch.promote_types(norm_dtype, gate.dtype))[0]
    p = match.params
    g = apply_chain(gate, p["gate_chain"])
    y = torch.ops.liger.gated_rms_norm(x, weight, g, base.scalar(eps), float(offset), p["casting_mode"],
                                       p["norm_dtype"], p["prod"], p["out_dtype"])[0]
    return apply_chain(y, p["rest_chain"], node_value(match.outputs[0]))


register(
    "gated_rms_norm",
    list(_VARIANTS),
    replace,
    example_inputs={**_BASE.example_inputs, "gate": torch.randn(2, 3, 8)},
    constraints=check,
    priority=_BASE.priority + 1,  # before rms_norm, which would take the norm alone
    allow_casts=True,
    description="gated RMSNorm rms_norm(x) * silu(gate) (Qwen3-Next) -> liger::gated_rms_norm",
    builtin=True,
)
