"""An independent symbolic check of what patterns/distillation.py derived from a loss.

The algebra there reads the matched nodes into the kernel's seven coefficients.  This module
reads the same nodes a second, separate way: each node becomes a sympy expression of one
class's log-probabilities `ls`, `lt` (real symbols; ps = exp(ls), pt = exp(lt)), with every
constant taken exactly (`Rational(float)`), reductions folded in as the factor each element gets
(a mean over n elements is 1/n, n a shape symbol's expression under dynamic shapes; sums, a
row mask and a count denominator are structural and checked by the algebra).  The kernel's per-element formula with the derived coefficients
(kernels/distillation.py) is built too; the rewrite is made only when their difference expands
to zero up to the rounding of the coefficients' float arithmetic (1e-9 relative).  Shapes,
dtypes and IEEE conventions are not this module's business (the algebra checks them exactly).
"""

from __future__ import annotations

import operator

import sympy
import torch
import torch.fx as fx
import torch.nn.functional as F

from ligerfx.graph.nodes import CAST_METHODS, node_value
from ligerfx.graph.symbolic import expr as size_expr

LS, LT = sympy.symbols("ls lt", real=True)
CE = sympy.Symbol("CE")


class Unproved(Exception):
    """The check could not read a node or found the two expressions different."""


def _q(x) -> sympy.Expr:
    return sympy.Rational(float(x.item() if isinstance(x, torch.Tensor) else x))


def kernel_expr(coefs, mix, ce_coef) -> sympy.Expr:
    """One element of the kernel's divergence (and the CE part as the symbol CE)."""
    ps, pt = sympy.exp(LS), sympy.exp(LT)
    mx = sympy.log(sympy.exp(LS + _q(mix[0])) + sympy.exp(LT + _q(mix[1])))
    basis = [ps * LS, ps * LT, ps * mx, pt * LS, pt * LT, pt * mx, sympy.Abs(ps - pt)]
    return sum((_q(c) * b for c, b in zip(coefs, basis) if c), sympy.Integer(0)) + \
        _q(ce_coef) * CE


def _prod(xs):
    out = sympy.Integer(1)
    for x in xs:
        out *= x
    return out


def _size(v) -> sympy.Expr:
    """A size as a sympy expression (a shape symbol's own under dynamic shapes)."""
    e = size_expr(v)
    if e is None:
        raise Unproved(f"size {v!r}")
    return sympy.sympify(e)


def _is(n, *targets):
    return n.op in ("call_function", "call_method") and n.target in targets


def _arg(n, i, name, default=None):
    return n.args[i] if len(n.args) > i else n.kwargs.get(name, default)


class _Reader:
    def __init__(self, leaves: dict, const, ce_nodes):
        self.leaves, self.const, self.ce_nodes = leaves, const, ce_nodes
        self.memo: dict = {}

    def val(self, a):
        if not isinstance(a, fx.Node):
            if isinstance(a, (int, float)) and not isinstance(a, bool):
                return _q(a)
            raise Unproved(f"argument {a!r}")
        if a not in self.memo:
            self.memo[a] = self.read(a)
        return self.memo[a]

    def read(self, n: fx.Node):  # noqa: C901 - one case per op
        if n in self.leaves:
            kind, side = self.leaves[n]
            sym = LS if side == "s" else LT
            return sympy.exp(sym) if kind == "p" else sym
        if n in self.ce_nodes:
            return CE
        c = self.const(n)
        if c is not None:
            return _q(c)
        a = n.args
        if _is(n, operator.mul, torch.mul, "mul"):
            return self.val(a[0]) * self.val(a[1])
        if _is(n, operator.truediv, torch.div, torch.true_divide, "div", "true_divide"):
            d = a[1]
            if self.mask is not None and isinstance(d, fx.Node) and _is(d, torch.sum, "sum") \
                    and d.args[0] is self.mask:
                return self.val(a[0])  # / mask.sum(): the kernel's count denominator
            return self.val(a[0]) / self.val(a[1])
        if _is(n, operator.add, torch.add, "add"):
            return self.val(a[0]) + self.val(a[1])
        if _is(n, operator.sub, torch.sub, "sub"):
            return self.val(a[0]) - self.val(a[1])
        if _is(n, operator.neg, torch.neg, "neg"):
            return -self.val(a[0])
        if _is(n, torch.exp, "exp"):
            return sympy.exp(self.val(a[0]))
        if _is(n, torch.log, "log"):
            return sympy.log(self.val(a[0]))
        if _is(n, torch.abs, "abs"):
            return sympy.Abs(self.val(a[0]))
        if _is(n, F.kl_div):
            x, y = self.val(_arg(n, 0, "input")), self.val(_arg(n, 1, "target"))
            log_target = _arg(n, 5, "log_target", False)
            e = sympy.exp(y) * (y - x) if log_target else y * sympy.log(y) - y * x
            red = _arg(n, 4, "reduction", "mean")
            v = node_value(n.args[0] if n.args else n.kwargs["input"])
            if red == "mean":
                return e / _size(v.numel())
            if red == "batchmean":
                return e / (_size(v.shape[0]) if v.dim() else 1)
            return e
        if _is(n, torch.stack):
            return [self.val(x) for x in (_arg(n, 0, "tensors"))]
        if _is(n, torch.logsumexp, "logsumexp"):
            items = self.val(a[0])
            if not isinstance(items, list):
                raise Unproved("logsumexp of a non-stack")
            return sympy.log(sum(sympy.exp(x) for x in items))
        if _is(n, torch.sum, "sum", torch.mean, "mean"):
            e = self.val(a[0])
            if _is(n, torch.mean, "mean"):
                vin = node_value(a[0])
                dim = _arg(n, 1, "dim")
                dims = range(vin.dim()) if dim is None else \
                    [dim] if isinstance(dim, int) else list(dim)
                count = _prod(_size(vin.shape[d]) for d in dims)
                if count == 0:
                    raise Unproved(f"a mean over no elements at `{n.name}`")
                e = e / count
            return e
        if _is(n, "view", "reshape", "flatten", torch.reshape, torch.flatten, "float", "to") or \
                _is(n, *CAST_METHODS):
            return self.val(a[0])
        raise Unproved(f"`{n.name}` ({n.target})")


def _abs_factored(e):
    # |c x - c y| = |c| |x - y|: sympy distributes c over the sum, so take it out again
    return e.replace(sympy.Abs, lambda x: sympy.Abs(sympy.factor_terms(x)))


def check(root, leaves, coefs, mix, ce_coef, const, ce_node, mask, den=1) -> str | None:
    """None when the code below the leaves equals the kernel's formula (its divergence divided by
    `den`, the symbolic part of the denominator, a product of shape symbols), else why not."""
    r = _Reader(leaves, const, {ce_node} if ce_node is not None else set())
    r.mask = mask
    if mask is not None:
        r.memo[mask] = sympy.Integer(1)  # the row weight: applied by the kernel per row
    try:
        code = r.val(root)
        if isinstance(code, list):
            raise Unproved("a stack")
        kern = kernel_expr(coefs, mix, 0.0) / sympy.sympify(den) + _q(ce_coef) * CE
        diff = sympy.expand(_abs_factored(code) - _abs_factored(kern))
    except Unproved as e:
        return f"the symbolic check cannot read {e.args[0]}"
    except Exception as e:  # noqa: BLE001 - a node this reading does not know: refuse, not crash
        return f"the symbolic check failed ({type(e).__name__}: {str(e)[:100]})"
    if diff == 0:
        return None
    scale = max([abs(float(c)) for c in list(coefs) + [ce_coef] if c] or [1.0])
    groups: dict = {}
    for term in sympy.Add.make_args(diff):
        c, rest = term.as_coeff_Mul()
        groups[rest] = groups.get(rest, 0) + float(c)
    bad = [rest for rest, c in groups.items() if abs(c) > 1e-9 * scale]
    if bad:
        return (f"the symbolic check finds the code and the kernel's formula differ by "
                f"{sympy.sstr(diff)[:200]}")
    return None
