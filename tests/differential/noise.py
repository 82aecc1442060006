"""The rounding noise of a scalar output: how far eager's own rounding can move a reduced loss.

A reduced loss (a mean of per-row divergences or cross-entropies) is a sum of rows whose errors
have random signs; most of each row's error is the rounding of its (log-)softmax, eager's and a
rewrite's alike, so the ratio of two such sums' errors is noise, and "1.25x eager's error" fails
a correct rewrite by chance (issue 22, finding 2).  `scalar_noise` gives the standard deviation
of that sum under the first-order model of floating-point rounding (each value carries an
independent relative error of the unit roundoff u of the dtype eager computes it in):

- every element v of a `log_softmax` / `softmax` / `logsumexp` output moves the loss by g * u * |v|
  (g = d loss / d v, by autograd in float64), independently;
- each row of a log-softmax also shares the rounding of its log(sum exp) (u * log S, with
  log S = -max_k ls_k), which moves the loss by u * log S * sum_k g_k; each row of a softmax its
  1 / sum (a relative u), which moves it by u * sum_k g_k p_k.

The oracle allows a scalar 3 of these standard deviations on top of 1.25x eager's error: the
magnitudes of the terms the rows sum and u, no blanket factor, so an error several times eager's
whose size the model does not explain (a cancelled difference, a dropped term) still fails.
"""

from __future__ import annotations

import math

import torch
from torch.overrides import TorchFunctionMode

_OPS = ("log_softmax", "softmax", "logsumexp")


class _Probe(TorchFunctionMode):
    """Records each (log-)softmax / logsumexp output; with `probe`, adds a zero leaf to each
    (exactly the same values) whose gradient is d output / d that value."""

    def __init__(self, probe: bool):
        super().__init__()
        self.probe = probe
        self.seen: list = []  # (op name, value, probe leaf or None, dim)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if name in _OPS and isinstance(out, torch.Tensor) and out.is_floating_point():
            leaf = None
            if self.probe:
                leaf = torch.zeros_like(out, requires_grad=True)
                out = out + leaf
            dim = kwargs.get("dim") if kwargs and "dim" in kwargs else \
                args[1] if len(args) > 1 else -1
            self.seen.append((name, out.detach(), leaf, dim if isinstance(dim, int) else -1))
        return out


def _leaf_dtypes(model, inputs) -> list | None:
    """The dtypes eager computes each recorded op in (the model run in its own dtypes)."""
    mode = _Probe(False)
    try:
        with torch.no_grad(), mode:
            model(*inputs)
    except Exception:
        return None
    return [v.dtype for _, v, _, _ in mode.seen]


def scalar_noise(ref_model, ref_inputs, low_model, low_inputs) -> list | None:
    """Per output of ref_model: the standard deviation (absolute) of eager's rounding noise of a
    one-element floating output under the model above; None for other outputs.  None overall
    when the model cannot be run again (it is then judged by the plain rule)."""
    dtypes = _leaf_dtypes(low_model, low_inputs)
    mode = _Probe(True)
    try:
        with torch.enable_grad(), mode:
            outs = list(ref_model(*ref_inputs))
    except Exception:
        return None
    if dtypes is None or len(dtypes) != len(mode.seen):
        return None
    leaves = [leaf for _, _, leaf, _ in mode.seen]
    result = []
    for o in outs:
        if not (isinstance(o, torch.Tensor) and o.is_floating_point() and o.numel() == 1
                and o.requires_grad and leaves):
            result.append(None)
            continue
        try:
            grads = torch.autograd.grad(o.reshape(()), leaves, retain_graph=True,
                                        allow_unused=True)
        except RuntimeError:  # e.g. eager's own "modified by an inplace operation"
            return None
        var = 0.0
        for (name, v, _, dim), g, dt in zip(mode.seen, grads, dtypes):
            if g is None or v.numel() == 0:
                continue
            u = torch.finfo(dt).eps / 2
            ok = torch.isfinite(v) & torch.isfinite(g)
            g, v = torch.where(ok, g, 0.0), torch.where(ok, v, 0.0)
            var += float(((g * v) ** 2).sum()) * u * u
            if name == "log_softmax" and v.dim():
                log_s = -v.masked_fill(~ok, -math.inf).amax(dim).clamp_max(0.0)
                log_s = torch.where(torch.isfinite(log_s), log_s, 0.0)
                var += float(((g.sum(dim) * log_s) ** 2).sum()) * u * u
            elif name == "softmax" and v.dim():
                var += float(((g * v).sum(dim) ** 2).sum()) * u * u
        result.append(math.sqrt(var))
    return result
