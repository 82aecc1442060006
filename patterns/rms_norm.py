"""`rms_norm`: RMSNorm in any spelling, rewritten to the fused `liger::rms_norm` kernel.

The pattern is the math, `x * rsqrt(mean(x^2) + eps)`, optionally times a weight or `(weight +
offset)` (Gemma's `1 + weight`), plus the `F.rms_norm` / `nn.RMSNorm` call.  The canonical view
already folds `x*x` / `pow(x, 2)` / `square`, `1/sqrt` / `/ sqrt`, dims and method forms, and a
keepdim=False statistic unsqueezed back (`mean(x^2, -1)[..., None]`) into the keepdim=True one;
casts are looked through here and judged by `_casting`, which decides whether the code is
Llama-style (normalised value cast back before the weight), fp32-style (Gemma: weight applied in
fp32), or a mix the kernel cannot reproduce (then: near miss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import ligerfx.kernels.rms_norm  # noqa: F401 - defines torch.ops.liger.rms_norm
from ligerfx.graph.nodes import node_value
from ligerfx.compiler.pattern import register
from ligerfx.graph.precision import (ancestors_within, compute_problem, functional_norm_problem,
                               input_chain_problems, kernel_compute_dtype, short, through_casts)
from ligerfx.graph.symbolic import is_vector_over_last_dim, known_equal


def _normed(x, eps, dim):
    return x * torch.rsqrt(x.pow(2).mean(dim, keepdim=True) + eps)


def rms_norm_offset_weight(x, weight, eps, offset, dim):
    """RMSNorm with a (weight + offset) scale, e.g. Gemma's (1 + weight)."""
    return _normed(x, eps, dim) * (weight + offset)


def rms_norm_weight(x, weight, eps, dim):
    """RMSNorm: x * rsqrt(mean(x^2, -1) + eps) * weight, in any spelling."""
    return _normed(x, eps, dim) * weight


def rms_norm_weight_first(x, weight, eps, dim):
    """The weight multiplied in before the rsqrt scale (T5-style `weight * x * rstd`)."""
    return (weight * x) * torch.rsqrt(x.pow(2).mean(dim, keepdim=True) + eps)


def _normed_unsqueezed(x, eps, dim, udim):
    # keepdim=False, then the reduced dim put back with unsqueeze
    return x * torch.rsqrt(x.pow(2).mean(dim) + eps).unsqueeze(udim)


def rms_norm_weight_unsqueeze(x, weight, eps, dim, udim):
    return _normed_unsqueezed(x, eps, dim, udim) * weight


def rms_norm_plain_unsqueeze(x, eps, dim, udim):
    return _normed_unsqueezed(x, eps, dim, udim)


def rms_norm_plain(x, eps, dim):
    return _normed(x, eps, dim)


def _normed_sum(x, eps, dim, n):
    # the mean written as a sum divided by the width (n proven equal to it by `check`)
    return x * torch.rsqrt(x.pow(2).sum(dim, keepdim=True) / n + eps)


def rms_norm_sum_weight(x, weight, eps, dim, n):
    return _normed_sum(x, eps, dim, n) * weight


def rms_norm_sum_plain(x, eps, dim, n):
    return _normed_sum(x, eps, dim, n)


def l2_norm_plain(x, eps, dim):  # with or without a weight after it: one near miss
    # the sum of squares not divided by the width: unit L2 norm (nGPT-style), not RMS 1; a
    # look-alike, matched only to say why it is left alone, since the kernel computes the mean
    return x * torch.rsqrt(x.pow(2).sum(dim, keepdim=True) + eps)


_L2_REASON = ("the sum of squares is not divided by the width: an L2 normalisation (unit norm), "
              "not RMSNorm, which the kernel computes with the mean")


def rms_norm_functional(x, normalized_shape, weight, eps):
    return F.rms_norm(x, normalized_shape, weight, eps)


def rms_norm_functional_no_weight(x, normalized_shape, eps):
    return F.rms_norm(x, normalized_shape, None, eps)


def _dtype(n):
    return getattr(node_value(n), "dtype", None)


def _reaches(arg, target):
    """`arg` is `target`, possibly behind casts (or no-op arithmetic)."""
    return arg is target or through_casts(arg)[0] is target


def _offset_add(match):
    """The `weight + offset` node of an offset match."""
    w = match["weight"]
    return next(n for n in match.nodes_of("add") if any(_reaches(a, w) for a in n.args))


def _side_dtypes(match):
    """Dtypes of the normalised value and of the scale as they enter the weight multiply."""
    top = match.tops[0]
    a, b = top.args[0], top.args[1]
    scale = _offset_add(match) if "offset" in match.bindings else match["weight"]
    if _reaches(b, scale):
        return _dtype(a), _dtype(b)
    return _dtype(b), _dtype(a)


def _casting(match):
    """Choose the kernel's casting mode, or reject the match with the reason."""
    x = match.value("x")
    w = match.value("weight") if "weight" in match.bindings else None
    if match.variant.fn is rms_norm_functional:
        # F.rms_norm computes in fp32 and multiplies by the weight before rounding once
        return "fp32"
    if w is None:
        return "llama"
    if match.variant.fn is rms_norm_weight_first:
        top_dt = _dtype(match.tops[0])
        if top_dt == torch.float32:
            return "fp32"
        return "llama" if x.dtype == w.dtype == top_dt else None
    n_dt, s_dt = _side_dtypes(match)
    prod_dt = _dtype(match.tops[0])
    f32 = torch.float32
    offset_add = _offset_add(match) if "offset" in match.bindings else None
    w_dt = _dtype(offset_add) if offset_add is not None else w.dtype
    if n_dt == x.dtype and prod_dt == torch.promote_types(x.dtype, w_dt) and s_dt == w_dt:
        if offset_add is not None and _dtype(offset_add) != w.dtype:
            return None
        return "llama"
    if n_dt == f32 and prod_dt == f32:
        if offset_add is not None and _dtype(offset_add) != f32:
            return None
        return "fp32"
    return None


_FUNCTIONAL = (rms_norm_functional, rms_norm_functional_no_weight)


def _precision(match):
    """The kernel computes rstd = rsqrt(mean(xf^2) + eps) and n = xf * rstd in fp32 from the exact
    x: the code must do the same (or, with upcast_statistics, compute them in fp16/bf16)."""
    x = match.value("x")
    cdt = kernel_compute_dtype(x.dtype)
    if cdt is None:
        return f"x is {short(x.dtype)}; the kernel computes in fp32, which would round it"
    if match.variant.fn in _FUNCTIONAL:
        return functional_norm_problem(match, "F.rms_norm", ["x", "weight"])
    inside = set(match.covered)
    rstd = match.nodes_of("rsqrt")[0]
    stat = ancestors_within(rstd, inside)
    # the normalising product: the multiply reading x (`x * rstd`; `weight * x` for weight-first)
    products = [u for u in match.nodes_of("mul") if any(_reaches(a, match["x"]) for a in u.args)]
    for u in products:  # rstd enters it as computed (no rounding cast on the way)
        a = next((a for a in u.args if _reaches(a, rstd)), None)
        _, steps = through_casts(a)
        for s in steps:
            if s in inside and getattr(node_value(s), "dtype", None) != node_value(rstd).dtype:
                return (f"rstd is cast to {short(node_value(s).dtype)} at `{s.name}` before the "
                        "product; the kernel keeps it in fp32")
    problem = (input_chain_problems(match, stat + products, ["x", "weight"])
               or compute_problem(match, stat, cdt, "the RMS statistic", statistic=True)
               or compute_problem(match, products, cdt, "the normalised value x * rstd",
                                  statistic=True))
    if not problem and match.variant.fn is rms_norm_weight_first:
        # (weight * x) is rounded where eager computes it; the kernel multiplies in fp32
        problem = compute_problem(match, match.nodes_of("mul"), cdt, "weight * x",
                                  statistic=False)
    return problem


def check(match):
    x = match.value("x")
    if "n" in match.bindings:
        n = match.value("n")
        if isinstance(n, float) and n.is_integer():
            n = int(n)
        if not known_equal(n, x.shape[-1]):
            return f"the sum of squares is divided by {n}, not by the width {x.shape[-1]}"
    if "dim" in match.bindings and match["dim"] != (-1,):
        return f"normalises over dim {match['dim']}, not the last dim"
    if "udim" in match.bindings and match["udim"] != -1:
        return f"the statistic is unsqueezed at dim {match['udim']}, not the last dim"
    if "normalized_shape" in match.bindings:
        ns = match.resolved("normalized_shape")
        if not isinstance(ns, (tuple, list)) or len(ns) != 1 or not known_equal(ns[0], x.shape[-1]):
            return f"normalized_shape {ns} is not the last dim alone"
    if "weight" in match.bindings and not is_vector_over_last_dim(match.value("weight"), x):
        w = match.value("weight")
        return (f"weight of shape {tuple(w.shape)} is not a 1-D vector over the last dim "
                f"({x.shape[-1]})")
    if "offset" in match.bindings and not isinstance(match["offset"], (int, float)):
        return "the weight offset is not a constant"
    for c in match.casts:
        dt = _dtype(c)
        if dt not in (torch.float32, x.dtype, match.out_dtype):
            return f"casts to {dt} inside the norm, which the kernel does not reproduce"
    problem = _precision(match)
    if problem:
        return problem
    mode = _casting(match)
    if mode is None:
        return ("mixes dtypes in a way the kernel does not reproduce (normalised value and "
                "weight multiply are neither Llama-style nor all-fp32)")
    match.params["casting_mode"] = mode
    match.detail = f"{mode} casting" if "weight" in match.bindings else "no weight"
    return None


def default_eps(x, eps):
    """eps, or F.rms_norm's default when None: machine epsilon of the computation type."""
    if eps is None:
        eps = torch.finfo(torch.float64 if x.dtype == torch.float64 else torch.float32).eps
    return eps


def scalar(v):
    """A scalar input for an op's `float` argument: a Python number as a float; a symbolic one
    (a SymFloat eps under dynamic=True, traced as a graph value) passed on as it is, so it stays
    symbolic (float() of it would fail on the proxy, or install a guard)."""
    return float(v) if isinstance(v, (int, float)) else v


def replace(x, weight=None, eps=None, offset=0.0, *, match=None):
    if match is not None:
        mode, out_dtype = match.params["casting_mode"], match.out_dtype
    else:
        mode = "llama"
        out_dtype = torch.promote_types(x.dtype, weight.dtype) if weight is not None else x.dtype
    eps = default_eps(x, eps)
    return torch.ops.liger.rms_norm(x, weight, eps, float(offset), mode, out_dtype)[0]


register(
    "rms_norm",
    [rms_norm_offset_weight, rms_norm_weight, rms_norm_weight_first, rms_norm_weight_unsqueeze,
     rms_norm_plain, rms_norm_plain_unsqueeze, rms_norm_sum_weight, rms_norm_sum_plain,
     rms_norm_functional, rms_norm_functional_no_weight],
    replace,
    example_inputs={"x": torch.randn(2, 3, 8), "weight": torch.randn(8), "eps": 1e-6,
                    "offset": 1.0, "dim": -1, "udim": -1, "n": 8, "normalized_shape": (8,)},
    constraints=check,
    priority=10,
    allow_casts=True,
    description="RMSNorm (manual, F.rms_norm, nn.RMSNorm; Llama, Gemma and fp32 casting) -> liger::rms_norm",
    builtin=True,
    look_alikes={l2_norm_plain: _L2_REASON},
)
