"""`layer_norm`: LayerNorm (nn.LayerNorm, F.layer_norm, hand-written) -> `liger::layer_norm`.

Hand-written forms: the centred value `x - mean(x)` scaled by `rsqrt(var + eps)` (or divided by
`sqrt(var + eps)`), with the biased variance written as `mean((x - mu)^2)` or
`var(x, unbiased=False)` (of x or of the centred value), then an optional weight and bias.  The kernel computes in fp32 and
writes the output dtype of the matched code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import ligerfx.kernels.layer_norm  # noqa: F401 - defines torch.ops.liger.layer_norm
from ligerfx.graph.nodes import node_value
from ligerfx.compiler.pattern import register
from ligerfx.graph.precision import (ancestors_within, compute_problem, functional_norm_problem,
                               input_chain_problems, kernel_compute_dtype, short)
from ligerfx.graph.symbolic import is_vector_over_last_dim, known_equal


def _centred_mean_sq(x, eps, dim):
    xc = x - x.mean(dim, keepdim=True)
    return xc * torch.rsqrt((xc * xc).mean(dim, keepdim=True) + eps)


def _centred_var(x, eps, dim):
    xc = x - x.mean(dim, keepdim=True)
    return xc * torch.rsqrt(x.var(dim, keepdim=True, unbiased=False) + eps)


def _centred_var_of_xc(x, eps, dim):
    # the variance of the centred value (equal to x's: shifting by the mean changes no deviation)
    xc = x - x.mean(dim, keepdim=True)
    return xc * torch.rsqrt(xc.var(dim, keepdim=True, unbiased=False) + eps)


def ln_var_xc_affine(x, weight, bias, eps, dim):
    return _centred_var_of_xc(x, eps, dim) * weight + bias


def ln_var_xc_weight(x, weight, eps, dim):
    return _centred_var_of_xc(x, eps, dim) * weight


def ln_var_xc(x, eps, dim):
    return _centred_var_of_xc(x, eps, dim)


def ln_mean_sq_affine(x, weight, bias, eps, dim):
    """LayerNorm: (x - mean) * rsqrt(var + eps) * weight + bias, in any spelling."""
    return _centred_mean_sq(x, eps, dim) * weight + bias


def ln_var_affine(x, weight, bias, eps, dim):
    return _centred_var(x, eps, dim) * weight + bias


def ln_mean_sq_weight(x, weight, eps, dim):
    return _centred_mean_sq(x, eps, dim) * weight


def ln_var_weight(x, weight, eps, dim):
    return _centred_var(x, eps, dim) * weight


def ln_mean_sq(x, eps, dim):
    return _centred_mean_sq(x, eps, dim)


def ln_var(x, eps, dim):
    return _centred_var(x, eps, dim)


def ln_functional(x, normalized_shape, weight, bias, eps):
    return F.layer_norm(x, normalized_shape, weight, bias, eps)


def ln_functional_weight(x, normalized_shape, weight, eps):
    return F.layer_norm(x, normalized_shape, weight, None, eps)


def ln_functional_bias(x, normalized_shape, bias, eps):
    return F.layer_norm(x, normalized_shape, None, bias, eps)


def ln_functional_plain(x, normalized_shape, eps):
    return F.layer_norm(x, normalized_shape, None, None, eps)


_FUNCTIONAL = (ln_functional, ln_functional_weight, ln_functional_bias, ln_functional_plain)


def _precision(match):
    """The kernel computes mean, variance, rstd, the normalised value, the weight product and the
    bias sum in fp32 from the exact inputs and rounds once to the output dtype: so must the code
    (upcast_statistics: the mean/variance/rstd may be computed in fp16/bf16)."""
    x = match.value("x")
    cdt = kernel_compute_dtype(x.dtype)
    if cdt is None:
        return f"x is {short(x.dtype)}; the kernel computes in fp32, which would round it"
    if match.variant.fn in _FUNCTIONAL:
        return functional_norm_problem(match, "F.layer_norm", ["x", "weight", "bias"])
    inside = set(match.covered)
    body = ancestors_within(match.tops[0], inside)  # the trailing casts are the kernel's output
    rstd = match.nodes_of("rsqrt")[0]
    stat = ancestors_within(rstd, inside)
    rest = [n for n in body if n not in stat]
    return (input_chain_problems(match, body, ["x", "weight", "bias"])
            or compute_problem(match, stat, cdt, "the mean/variance statistic", statistic=True)
            or compute_problem(match, rest, cdt, "the normalisation", statistic=False))


def check(match):
    x = match.value("x")
    if "dim" in match.bindings and match["dim"] != (-1,):
        return f"normalises over dim {match['dim']}, not the last dim"
    if "normalized_shape" in match.bindings:
        ns = match.resolved("normalized_shape")
        if not isinstance(ns, (tuple, list)) or len(ns) != 1 or not known_equal(ns[0], x.shape[-1]):
            return f"normalized_shape {ns} is not the last dim alone"
    for name in ("weight", "bias"):
        if name in match.bindings and not is_vector_over_last_dim(match.value(name), x):
            v = match.value(name)
            return (f"{name} of shape {tuple(v.shape)} is not a 1-D vector over the last dim "
                    f"({x.shape[-1]})")
    for c in match.casts:
        dt = getattr(node_value(c), "dtype", None)
        if dt not in (torch.float32, x.dtype, match.out_dtype):
            return f"casts to {dt} inside the norm, which the kernel does not reproduce"
    return _precision(match)


def replace(x, weight=None, bias=None, eps=1e-5, *, match=None):
    out_dtype = match.out_dtype if match is not None else x.dtype
    return torch.ops.liger.layer_norm(x, weight, bias, eps, out_dtype)[0]


register(
    "layer_norm",
    [ln_mean_sq_affine, ln_var_affine, ln_var_xc_affine, ln_mean_sq_weight, ln_var_weight,
     ln_var_xc_weight, ln_mean_sq, ln_var, ln_var_xc,
     ln_functional, ln_functional_weight, ln_functional_bias, ln_functional_plain],
    replace,
    example_inputs={"x": torch.randn(2, 3, 8), "weight": torch.randn(8), "bias": torch.randn(8),
                    "eps": 1e-5, "dim": -1, "normalized_shape": (8,)},
    constraints=check,
    priority=10,
    allow_casts=True,
    description="LayerNorm (nn.LayerNorm, F.layer_norm, hand-written mean/var) -> liger::layer_norm",
    builtin=True,
)
