"""`fused_linear_distillation` and `distillation_loss`: a divergence between two softmaxes.

Both anchor on the student's `log_softmax(x, -1)` or `softmax(x, -1)` (the one whose logits need
a gradient) and read the code below it as algebra, so every spelling of the same math matches:

- the leaves are the log-probabilities `ls`, `lt` and probabilities `ps`, `pt` of the student and
  of one teacher (`log_softmax` / `softmax` over the last dim, `p.log()`, `l.exp()`), each after a
  chain of casts, row reshapes and a scale by a Python number (`/ T`) above it;
- `F.kl_div(input, target, reduction, log_target)` is `target * (log target - input)`; products
  `p * (l1 - l2)`, sums and differences of such terms, `abs(ps - pt)` (TVD) and the GKD mixture
  `logsumexp(stack([ls + c1, lt + c2]), 0)` build an elementwise divergence, which is tracked as
  the coefficients of the seven terms the kernel computes (kernels/distillation.py): so forward
  KL, reverse KL, the generalised JSD with any beta (beta = 0 / 1 are plain KLs) and TVD, in any
  combination, are one proof;
- `.sum(-1)`, `.mean(-1)`, a row mask `* mask` (any row-shaped weight tensor that needs no
  gradient), `.sum()`, `.mean()`, kl_div's reductions (batchmean divides by the first dim of the
  input *as written*), `* / by` Python numbers or constant tensors (`torch.tensor(beta)`),
  `/ mask.sum()` and an added `alpha * F.cross_entropy(student logits, labels)` reduce it to the
  scalar the op returns.  A mean over a symbolic size (dynamic shapes) keeps that size symbolic:
  the op's `kd_n` is computed by the graph from the sizes of the tensors it is given, so one
  compiled graph is exact for every shape.  Scalar steps the algebra does not know stay in the
  graph (they read the op's loss, e.g. `/ s.shape[0]`).

Each node is modelled exactly or refused with a reason: every tensor operand of an elementwise
op has exactly the result's shape (symbol by symbol: no broadcasting), `exp` reads only a log-
probability with coefficient 1 as a probability, a factor inside `abs` is kept, and the IEEE
conventions are tracked per term (kl_div's xlogy for either side's probabilities as target,
the student's tested as the code spelled them, `softmax` or `exp(log_softmax)`; the teacher's
`log(softmax(z))`, -inf where the softmax underflows; the TVD's two probabilities, both
`softmax` or both exp of the log-softmax, a mix refused: `_tv_spelling`) and passed to the kernel
as flags.  The student's `log(softmax(z))` is refused: eager's gradient through that log is g / p,
inf / NaN where p is 0 or where the upstream gradient is large enough to overflow g / p, which
depends on that gradient's magnitude, and the op forms its gradients in the forward for
grad_output = 1.
Means over zero elements are refused (eager's nan).

When the student logits come from a linear that nothing else reads, the lm head is fused too
(`liger::fused_linear_distillation`: chunked, no [N, V] tensor kept); a teacher that is a linear
in the same graph (under no_grad) is fused into the same pass.  Otherwise the loss on the logits
becomes `liger::distillation_loss`.  Where no logits need a gradient (inference, no_grad) the
anchor stands for the student (the forward is the same whichever side is which); a write to a
value the loss computes, between its uses, is named in the near miss.  A per-token divergence (`.sum(-1)` /
`.mean(-1)` of it, times a row mask) that something the algebra does not model reads (a graph
output, `[mask]` indexing, per-sequence weights or sums) is replaced by the per-token op's output
(`liger::fused_linear_distillation_per_token` / `liger::distillation_per_token`, in the compute
dtype, which must be the per-token value's dtype in the code); the code after it stays in the
graph.  A temperature held in a tensor, a teacher with gradients, a softmax over another dim, the
per-element divergence used by anything but a reduction, fp16/bf16 statistics: near misses.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field, replace

import sympy
import torch
import torch.fx as fx
import torch.nn.functional as F

import ligerfx.kernels.distillation  # noqa: F401 - defines the liger:: ops
from ligerfx.graph import mutation
from ligerfx.graph.nodes import CAST_METHODS, node_value
from ligerfx.kernels.cross_entropy import compute_dtype
from ligerfx.kernels.fused_linear_cross_entropy import grads_in_forward
from ligerfx.compiler.passes import Skip
from ligerfx.compiler.pattern import register
from ligerfx.graph.precision import short
from ligerfx.graph.symbolic import expr as size_expr, known_equal
from . import _distill_proof as proof
from .cross_entropy import _cast_problem, _linear, _parse_scale, _step

# Basis of the kernel's elementwise terms, in its coefficient order (kernels/distillation.py).
_BASIS = [("s", "s"), ("s", "t"), ("s", "m"), ("t", "s"), ("t", "t"), ("t", "m"), "tv"]


class _No(Exception):
    """The algebra cannot read a node (with a reason when it is worth a near miss)."""


def _val(n):
    return node_value(n) if isinstance(n, fx.Node) else n


def _num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


_CONST_FNS = {torch.tensor: torch.tensor, torch.log: torch.log, torch.exp: torch.exp,
              torch.log1p: torch.log1p,
              operator.sub: operator.sub, operator.add: operator.add,
              operator.mul: operator.mul, operator.truediv: operator.truediv,
              operator.neg: operator.neg, torch.sub: torch.sub, torch.add: torch.add,
              torch.mul: torch.mul, torch.div: torch.div}


def _const(a, depth=0):
    """A Python number, or the value of a graph node computed from literals only (the 0-d
    `torch.tensor(beta)` and `torch.log(1 - beta)` / `torch.log1p(-beta)` GKD writes), evaluated
    as eager does; else None."""
    if _num(a):
        return a
    if not isinstance(a, fx.Node) or depth > 8:
        return None
    if a.op == "call_function" and a.target in _CONST_FNS:
        fn = _CONST_FNS[a.target]
    elif a.op == "call_method" and a.target in ("log", "log1p", "exp") and len(a.args) == 1:
        fn = getattr(torch, a.target)
    else:
        return None
    args = []
    for x in a.args:
        if isinstance(x, fx.Node):
            x = _const(x, depth + 1)
            if x is None:
                return None
        args.append(x)
    if any(isinstance(v, fx.Node) for v in a.kwargs.values()):
        return None
    try:
        v = fn(*args, **dict(a.kwargs))
    except Exception:  # noqa: BLE001 - not a constant we can evaluate
        return None
    if isinstance(v, torch.Tensor):
        return v if v.dim() == 0 and v.dtype.is_floating_point else None
    return v if _num(v) else None


def _float(c) -> float:
    return float(c.item()) if isinstance(c, torch.Tensor) else float(c)


def _monomial(e) -> dict | None:
    """{symbol: power} of a product of positive integer powers of shape symbols, else None."""
    c, rest = sympy.sympify(e).as_coeff_Mul()
    if c != 1:
        return None
    out: dict = {}
    for f in sympy.Mul.make_args(rest):
        base, k = f.as_base_exp()
        if not base.is_Symbol or not k.is_Integer or k <= 0:
            return None
        out[base] = out.get(base, 0) + int(k)
    return out


def _size_recipe(e, tensors) -> list | None:
    """(binding name, dim) pairs whose sizes multiply to the symbolic denominator e, read from
    the tensors the op is given (so the graph computes it at run time, for every shape), or
    None when e is not such a product."""
    want = _monomial(e)
    if want is None:
        return None
    recipe = []
    for name, node in tensors:
        v = _val(node)
        if not isinstance(v, torch.Tensor):
            continue
        for d, size in enumerate(v.shape):
            se = size_expr(size)
            m = _monomial(se) if se is not None and not se.is_Integer else None
            if m and all(want.get(k, 0) >= p for k, p in m.items()):
                for k, p in m.items():
                    want[k] -= p
                recipe.append((name, d))
            if not any(want.values()):
                return recipe
    return None


@dataclass
class _T:
    """A value the algebra understands.

    level: "p" (probabilities of `side`), "l" (a log-linear value: sum of coef * log-prob over
    "s", "t", "m", plus `offset`), "pd" (ps - pt times `sign`), "stack" (the two mixture
    operands), "elem" / "row" / "scalar" (a divergence: `coefs` over _BASIS, summed over V for
    "row", over the kept rows for "scalar", divided by `denom`; `ce` the CE part of a scalar).
    """
    level: str
    coefs: dict = field(default_factory=dict)
    offset: float = 0.0
    mix: tuple | None = None  # (c_s, c_t) of the mixture "m"
    mask: fx.Node | None = None
    denom: object = None  # None, "count" (of mask), checked at the op
    ce: tuple | None = None  # (coef, cross_entropy node)
    nodes: list = field(default_factory=list)  # fx nodes this value covers
    # IEEE conventions: the sides whose log-probability is written log(softmax(z)) ("logp", -inf
    # where the softmax underflows) or log_softmax(z) ("lsm"); the basis terms computed as
    # xlogy (0 where p == 0, kl_div's target * log target) rather than a plain product.
    logp: frozenset = frozenset()
    lsm: frozenset = frozenset()
    xlogy: frozenset = frozenset()
    # how the student's probabilities a kl_div target reads were computed ("softmax" or "exp" of
    # its log_softmax): eager's xlogy(ps, ps) is 0 / has a NaN gradient exactly where they are 0
    xsrc: frozenset = frozenset()
    # a "p" leaf's spelling: "softmax", "exp" (of a log_softmax) or "exp log" (of log(softmax))
    psrc: str = ""
    # the spellings (side, psrc) of the probabilities inside `abs(ps - pt)` (TVD): eager's sign
    # of ps - pt where the two are equal to rounding is that of the two spellings' roundings
    tvsrc: frozenset = frozenset()
    # the symbolic part of the divergence's denominator (a product of shape symbols: a
    # batchmean / mean under dynamic shapes), read by the op at run time (kd_n)
    sym: object = sympy.Integer(1)


def _merge_mix(a, b):
    if a.mix is not None and b.mix is not None and a.mix != b.mix:
        raise _No("two different mixtures")
    return a.mix or b.mix


def _scale(t: _T, c: float) -> _T:
    if t.level in ("p", "stack"):
        raise _No()
    ce = (t.ce[0] * c, t.ce[1]) if t.ce else None
    if t.level == "pd":  # the sign of ps - pt carries the factor (|c (ps - pt)| = |c| tv)
        return replace(t, coefs={"sign": t.coefs["sign"] * c})
    return replace(t, coefs={k: v * c for k, v in t.coefs.items()}, offset=t.offset * c, ce=ce)


def _conv(a: _T, b: _T) -> dict:
    """The IEEE conventions of a combination of a and b (the union of both)."""
    both = set(a.coefs) & set(b.coefs)
    if (a.xlogy ^ b.xlogy) & both:
        raise _No("a term is computed both as kl_div's xlogy and as a plain product")
    return dict(logp=a.logp | b.logp, lsm=a.lsm | b.lsm, xlogy=a.xlogy | b.xlogy,
                xsrc=a.xsrc | b.xsrc, tvsrc=a.tvsrc | b.tvsrc)


def _add(a: _T, b: _T, sign: float) -> _T:
    if a.level != b.level:
        raise _No()
    if a.level == "p":
        if sign > 0 or a.coefs["side"] == b.coefs["side"]:
            raise _No()
        return _T("pd", {"sign": 1.0 if a.coefs["side"] == "s" else -1.0},
                  tvsrc=frozenset([(a.coefs["side"], a.psrc), (b.coefs["side"], b.psrc)]))
    if a.level in ("pd", "stack"):
        raise _No()
    conv = _conv(a, b)
    coefs = dict(a.coefs)
    for k, v in b.coefs.items():
        coefs[k] = coefs.get(k, 0.0) + sign * v
    if a.level == "scalar":
        if a.coefs and b.coefs and (a.mask is not b.mask or a.denom != b.denom or
                                    a.sym != b.sym):
            raise _No("the divergences are reduced differently")
        if a.ce and b.ce:
            raise _No("two cross-entropies")
        ce = a.ce or ((sign * b.ce[0], b.ce[1]) if b.ce else None)
        kd = a if a.coefs else b
        return _T("scalar", coefs, mix=_merge_mix(a, b), mask=kd.mask, denom=kd.denom, ce=ce,
                  sym=kd.sym, **conv)
    if a.level == "row" and (a.mask is not b.mask or a.sym != b.sym):
        raise _No("the divergences are reduced differently")
    return _T(a.level, coefs, a.offset + sign * b.offset, _merge_mix(a, b), a.mask, sym=a.sym,
              **conv)


def _product(p: _T, lg: _T) -> _T:
    if lg.offset:
        raise _No()
    side = p.coefs["side"]
    return _T("elem", {(side, k): v for k, v in lg.coefs.items()}, mix=lg.mix, logp=lg.logp,
              lsm=lg.lsm)


_DIV = (operator.truediv, torch.div, torch.true_divide, "div", "true_divide")
_MUL = (operator.mul, torch.mul, "mul")
_ADD = (operator.add, torch.add, "add")
_SUB = (operator.sub, torch.sub, "sub")


def _is(n, targets):
    return n.target in targets and n.op in ("call_function", "call_method")


def _bind(n: fx.Node, names):
    """n's arguments by name (positional then keyword; names with '=' give defaults)."""
    out, args = {}, list(n.args)
    for spec in names:
        name, _, default = spec.partition("=")
        if args:
            out[name] = args.pop(0)
        elif name in n.kwargs:
            out[name] = n.kwargs[name]
        elif default:
            out[name] = eval(default)  # noqa: S307 - literals written below
        else:
            raise _No()
    return out


_KL = ("input", "target", "size_average=None", "reduce=None", "reduction='mean'",
       "log_target=False")
_CE = ("input", "target", "weight=None", "size_average=None", "ignore_index=-100",
       "reduce=None", "reduction='mean'", "label_smoothing=0.0")


class _Algebra:
    """Reads the graph below the leaves as _T values (see the module docstring)."""

    def __init__(self, match, leaves: dict, student_top):
        self.match = match
        self.leaves = leaves  # fx node -> ("p" | "l", side)
        self.student_top = student_top
        self.terms: dict = {}
        self.miss: str | None = None

    def run(self):
        for n in self.match.graph.nodes:
            if n in self.leaves:
                kind, side = self.leaves[n]
                self.terms[n] = _T(kind, {"side": side} if kind == "p" else {side: 1.0},
                                   nodes=[n], lsm=frozenset(side) if kind == "l" else frozenset(),
                                   psrc="softmax" if kind == "p" else "")
                continue
            if n.op not in ("call_function", "call_method") or not any(
                    isinstance(a, fx.Node) and a in self.terms for a in _flat(n.args)) and not (
                    _is(n, (F.cross_entropy,))):
                continue
            try:
                t = self.eval(n)
            except _No as e:
                if e.args and self.miss is None and self._both_sides(n):
                    self.miss = f"{e.args[0]} at `{n.name}`"
                continue
            if t is not None:
                t.nodes = [n]
                self.terms[n] = t

    def _both_sides(self, n):
        return any(isinstance(a, fx.Node) and a in self.terms for a in _flat(n.args))

    def term(self, a):
        return self.terms.get(a) if isinstance(a, fx.Node) else None

    def eval(self, n: fx.Node):  # noqa: C901 - one case per op, each short
        a = n.args
        if _is(n, (F.kl_div,)):
            b = _bind(n, _KL)
            x, y = self.term(b["input"]), self.term(b["target"])
            if x is None or y is None or x.level != "l" or x.offset:
                raise _No("kl_div's input is not a log-probability of the two distributions")
            if b["log_target"] is True:
                if y.level != "l" or y.offset or len(y.coefs) != 1 or "m" in y.coefs:
                    raise _No("kl_div's log-target is not a log-softmax")
                side = next(iter(y.coefs))
            elif b["log_target"] is False and y.level == "p":
                side = y.coefs["side"]
            else:
                raise _No("kl_div's target is not a softmax")
            _same_shapes(n, [b["input"], b["target"]], out=False)
            xsrc = frozenset()
            if side == "s" and not b["log_target"]:
                # xlogy(ps, ps): 0 where eager's ps is 0, and there its backward is 0 / 0 (a NaN
                # logits row): the kernel tests ps as the code computed it
                if y.psrc not in ("softmax", "exp"):
                    raise _No("kl_div with the student's exp(log(softmax(z))) as its target")
                xsrc = frozenset([y.psrc])
            coefs = {(side, side): 1.0}
            for k, v in x.coefs.items():
                coefs[(side, k)] = coefs.get((side, k), 0.0) - v
            # log_target=False: target * log(target) is xlogy (0 where the target is 0; where
            # it is not, log(softmax) and log_softmax agree to rounding); log_target=True is
            # exp(target) * (target - input), a plain product
            conv = dict(logp=x.logp | y.logp, lsm=x.lsm | y.lsm, xsrc=xsrc,
                        xlogy=frozenset() if b["log_target"] else frozenset([(side, side)]))
            if not b["log_target"]:
                if (side, side) in x.coefs:
                    raise _No("kl_div's input reads the target's own log-probability")
            t = _T("elem", coefs, mix=x.mix, **conv)
            red = b["reduction"]
            if b["size_average"] is not None or b["reduce"] is not None:
                raise _No("kl_div with the legacy size_average/reduce arguments")
            if red == "none":
                return t
            v = _val(b["input"])
            if red == "sum":
                return self._reduce_all(t, 1)
            if red == "mean":
                return self._reduce_all(t, v.numel())
            if red == "batchmean":
                return self._reduce_all(t, v.shape[0] if v.dim() else 1)

            raise _No(f"kl_div reduction {red!r}")
        if _is(n, (F.cross_entropy,)):
            return self._ce(n)
        if _is(n, _MUL):
            x, y = a[0], a[1]
            tx, ty = self.term(x), self.term(y)
            if tx is not None and ty is not None:
                _same_shapes(n, [x, y])
                if tx.level == "p" and ty.level == "l":
                    return _product(tx, ty)
                if ty.level == "p" and tx.level == "l":
                    return _product(ty, tx)
                raise _No("a product of divergence terms that is not p * log q")
            t, other = (tx, y) if tx is not None else (ty, x)
            c = _const(other)
            if c is not None:
                self._check_const(c, n)
                return _scale(t, _float(c))
            if t.level == "row":
                return self._masked(t, other, n)
            ov = _val(other)
            if isinstance(other, fx.Node) and t.level != "l" and (
                    not isinstance(ov, torch.Tensor) or ov.dim() == 0):
                raise _No(f"the divergence is scaled by `{other.name}` (a tensor or a symbolic "
                          "number, not a constant)")
            raise _No()
        if _is(n, _DIV):
            t = self.term(a[0])
            if t is None or self.term(a[1]) is not None:
                raise _No()
            c = _const(a[1])
            if c is not None:
                self._check_const(c, n)
                if _float(c) == 0:
                    raise _No(f"`{n.name}` divides by zero (eager gives inf/nan)")
                return _scale(t, 1.0 / _float(c))
            if t.level == "scalar" and self._is_count(a[1], t):
                return replace(t, denom="count")
            if t.level in ("l", "p") and isinstance(a[1], fx.Node):
                raise _No("the temperature is a tensor")
            raise _No()
        if _is(n, _ADD) or _is(n, _SUB):
            sign = -1.0 if _is(n, _SUB) else 1.0
            if n.kwargs or len(a) != 2:
                raise _No()
            tx, ty = self.term(a[0]), self.term(a[1])
            if tx is not None and ty is not None:
                _same_shapes(n, [a[0], a[1]])
                return _add(tx, ty, sign)
            t, other = (tx, a[1]) if tx is not None else (ty, a[0])
            c = _const(other)
            if c is None or t.level != "l":
                raise _No()
            c = _float(c)
            if tx is None and sign < 0:
                t = _scale(t, -1.0)
                return replace(t, offset=t.offset + c)
            return replace(t, offset=t.offset + sign * c)
        if _is(n, (operator.neg, torch.neg, "neg")):
            return _scale(self.term(a[0]), -1.0)
        if _is(n, (torch.abs, "abs")):
            t = self.term(a[0])
            if t.level != "pd":
                raise _No()
            # |c (ps - pt)| = |c| |ps - pt|: the factor inside is kept
            return _T("elem", {"tv": abs(t.coefs["sign"])}, tvsrc=t.tvsrc)
        if _is(n, (torch.log, "log")):
            t = self.term(a[0])
            if t.level == "p":
                # log(softmax(z)): -inf where the softmax underflows, unlike log_softmax(z)
                side = t.coefs["side"]
                return _T("l", {side: 1.0}, logp=frozenset(side))
            raise _No()
        if _is(n, (torch.exp, "exp")):
            t = self.term(a[0])
            if t.level == "l" and not t.offset and len(t.coefs) == 1 and "m" not in t.coefs:
                (side, c), = t.coefs.items()
                if c != 1.0:
                    raise _No(f"exp of {c:g} times a log-probability is not a probability")
                return _T("p", {"side": side}, psrc="exp log" if side in t.logp else "exp")
            if t.level == "l":
                raise _No("exp of a log-linear value that is not one log-probability")
            raise _No()
        if _is(n, (torch.stack,)):
            items = a[0] if a else n.kwargs.get("tensors")
            dim = a[1] if len(a) > 1 else n.kwargs.get("dim", 0)
            ts = [self.term(x) for x in items]
            nd = _val(n).dim()
            if not isinstance(dim, int) or not -nd <= dim < nd:
                raise _No()
            dim %= nd
            _same_shapes(n, list(items), out=False)
            if dim != 0 or len(ts) != 2 or any(t is None or t.level != "l" or len(t.coefs) != 1
                                               or "m" in t.coefs for t in ts):
                raise _No()
            by = {next(iter(t.coefs)): t for t in ts}
            if set(by) != {"s", "t"} or any(t.coefs[k] != 1.0 for k, t in by.items()):
                raise _No()
            return _T("stack", mix=(by["s"].offset, by["t"].offset),
                      **_conv(by["s"], by["t"]))
        if _is(n, (torch.logsumexp, "logsumexp")):
            t = self.term(a[0])
            dim = a[1] if len(a) > 1 else n.kwargs.get("dim")
            keep = a[2] if len(a) > 2 else n.kwargs.get("keepdim", False)
            if isinstance(dim, (tuple, list)) and len(dim) == 1:
                dim = dim[0]
            nd = _val(a[0]).dim()
            if t.level != "stack" or not isinstance(dim, int) or not -nd <= dim < nd or \
                    dim % nd != 0 or keep:
                raise _No()
            return _T("l", {"m": 1.0}, mix=t.mix, logp=t.logp, lsm=t.lsm)
        if _is(n, (torch.sum, "sum", torch.mean, "mean")):
            return self._sum(n)
        if _is(n, ("view", "reshape", "flatten", torch.reshape, torch.flatten)):
            t = self.term(a[0])
            vin, vout = _val(a[0]), _val(n)
            if t.level == "row" and t.mask is None and vout.numel() == vin.numel():
                return t
            if t.level in ("p", "l", "elem") and vout.dim() >= 1 and known_equal(
                    vout.shape[-1], vin.shape[-1]) and vout.numel() == vin.numel():
                return t  # rows flattened or split: the classes stay the last dim
            if t.level == "scalar" and vout.dim() == 0:
                return t
            raise _No()
        if _is(n, CAST_METHODS) or _is(n, ("float", "to")):
            t = self.term(a[0])
            if _val(n).dtype != _val(a[0]).dtype:
                raise _No("a cast inside the divergence")
            return t
        raise _No()

    def _check_const(self, c, n):
        if isinstance(c, torch.Tensor) and c.dtype != _val(n).dtype:
            raise _No("a constant of another dtype")

    def _reduce_all(self, t: _T, div):
        if t.level == "elem":
            t = replace(t, level="row")
        if t.level != "row":
            raise _No()
        out = _T("scalar", t.coefs, mix=t.mix, mask=t.mask, logp=t.logp, lsm=t.lsm,
                 xlogy=t.xlogy, xsrc=t.xsrc, tvsrc=t.tvsrc, sym=t.sym)
        return self._divide(out, div)

    def _divide(self, t: _T, div):
        """t divided by a size: its number part scales the coefficients, its symbolic part (a
        SymInt under dynamic shapes) joins the denominator the op reads at run time."""
        e = size_expr(div)
        if e is None:
            raise _No(f"the mean divides by {div!r}")
        c, rest = sympy.sympify(e).as_coeff_Mul()
        if rest == 1:
            if c == 0:
                raise _No("the mean is over zero elements (eager gives nan)")
            return _scale(t, 1.0 / float(c)) if c != 1 else t
        if _monomial(rest) is None or not c.is_Integer or c <= 0:
            raise _No(f"the mean divides by {e}, which is not a product of sizes")
        t = replace(t, sym=t.sym * rest)
        return _scale(t, 1.0 / float(c)) if c != 1 else t

    def _sum(self, n):
        t = self.term(n.args[0])
        mean = _is(n, (torch.mean, "mean"))
        b = _bind(n, ("input", "dim=None", "keepdim=False", "dtype=None"))
        if b["dtype"] is not None:
            raise _No()
        vin = _val(n.args[0])
        dim = b["dim"]
        if isinstance(dim, (tuple, list)) and len(dim) == 1:
            dim = dim[0]
        if dim is None or (isinstance(dim, (tuple, list)) and sorted(
                d % vin.dim() for d in dim) == list(range(vin.dim()))):
            if t.level not in ("elem", "row"):
                raise _No()
            return self._reduce_all(t, vin.numel() if mean else 1)
        if not isinstance(dim, int) or t.level != "elem" or dim % vin.dim() != vin.dim() - 1:
            raise _No("the divergence is summed over a dim other than the classes")
        row = _T("row", t.coefs, mix=t.mix, logp=t.logp, lsm=t.lsm, xlogy=t.xlogy, xsrc=t.xsrc,
                 tvsrc=t.tvsrc)
        if b["keepdim"]:
            raise _No()
        if mean:
            if size_expr(vin.shape[-1]) == 0:
                raise _No("the mean is over zero classes (eager gives nan)")
            return self._divide(row, vin.shape[-1])
        return row

    def _masked(self, t: _T, mask, n):
        if t.mask is not None or not isinstance(mask, fx.Node):
            raise _No()
        mv, rv = _val(mask), _val(n.args[0] if self.term(n.args[0]) is t else n.args[1])
        if tuple(mv.shape) != tuple(rv.shape) or not all(
                known_equal(a, b) for a, b in zip(mv.shape, rv.shape)):
            raise _No(f"the mask `{mask.name}` has shape {tuple(mv.shape)}, not the per-token "
                      f"divergence's {tuple(rv.shape)}")
        if mv.requires_grad:
            raise _No(f"the mask `{mask.name}` requires grad")
        if not (mv.dtype == torch.bool or mv.dtype.is_floating_point):
            raise _No(f"the mask `{mask.name}` is {mv.dtype}")
        return replace(t, mask=mask)

    def _is_count(self, d, t):
        """d is `mask.sum()` of the scalar's own mask."""
        if t.mask is None or t.denom is not None or t.ce or not isinstance(d, fx.Node):
            return False
        if not (_is(d, (torch.sum, "sum")) and len(d.args) == 1 and not d.kwargs):
            return False
        return d.args[0] is t.mask

    def _ce(self, n):
        b = _bind(n, _CE)
        chain = _chain(b["input"])
        if chain is None or chain[0] is not self.student_top:
            raise _No()
        top, steps = chain
        if any(k not in ("cast", "scale", "rows") for _, k, _ in steps):
            raise _No()
        sc = _parse_scale(steps)
        if sc is None or sc[1]:
            raise _No("the cross-entropy's logits are softcapped")
        if b["weight"] is not None or b["size_average"] is not None or b["reduce"] is not None:
            raise _No("cross_entropy with a class weight")
        if not (_num(b["label_smoothing"]) and b["label_smoothing"] == 0):
            raise _No("cross_entropy with label smoothing")
        if b["reduction"] not in ("mean", "sum") or not isinstance(b["ignore_index"], int):
            raise _No()
        if _val(b["input"]).dim() != 2:
            raise _No()
        problem = _cast_problem(steps, _val(top).dtype, self.match)
        if problem:
            raise _No(problem)
        return _T("scalar", ce=(1.0, dict(node=n, labels=b["target"], scale=sc[0],
                                          ignore_index=b["ignore_index"],
                                          mean=b["reduction"] == "mean", steps=steps)))


def _same_shapes(n, operands, out=True):
    """Refuse a node whose tensor operands broadcast: the kernel pairs the two distributions row
    by row, element by element, so every operand must have exactly the shape of the result (of
    each other for `out=False`), symbol by symbol."""
    shapes = [tuple(_val(x).shape) for x in operands if isinstance(x, fx.Node) and
              isinstance(_val(x), torch.Tensor)]
    if out:
        shapes.append(tuple(_val(n).shape))
    first = shapes[0] if shapes else ()
    for sh in shapes[1:]:
        if len(sh) != len(first) or not all(known_equal(a, b) for a, b in zip(sh, first)):
            raise _No(f"`{n.name}` broadcasts its operands ({', '.join(map(str, shapes))}); "
                      "the kernel pairs the two distributions element by element")


def _flat(args):
    for a in args:
        if isinstance(a, (list, tuple)):
            yield from _flat(a)
        else:
            yield a


_SOFTMAX = {F.softmax: "p", torch.softmax: "p", "softmax": "p", F.log_softmax: "l",
            torch.log_softmax: "l", "log_softmax": "l"}


def _leaf(n):
    """("p" | "l", input) for a (log_)softmax over the last dim without dtype=, else None."""
    if n.op not in ("call_function", "call_method") or n.target not in _SOFTMAX:
        return None
    a = list(n.args)
    x = a[0] if a else n.kwargs.get("input")
    dim = a[1] if len(a) > 1 else n.kwargs.get("dim")
    if not isinstance(x, fx.Node) or n.kwargs.get("dtype") is not None or len(a) > 2:
        return None
    v = _val(x)
    if not isinstance(dim, int) or not isinstance(v, torch.Tensor) or v.dim() < 1:
        return None
    if dim % v.dim() != v.dim() - 1:
        return "dim"
    return _SOFTMAX[n.target], x


def _chain(x):
    """(top, steps top-down) of the casts / row reshapes / scales above x; None if x's chain
    holds something else row-wise (slices: the top is then the sliced value)."""
    steps, cur = [], x
    while True:
        s = _step(cur)
        if s is None or s[0] in ("slice", "tanh"):
            break
        steps.append((cur, s[0], s[1]))
        cur = s[2]
    return cur, steps[::-1]


def _tensor_scale(x):
    """The node dividing/multiplying the logits by a tensor right above x (a temperature held
    in a tensor), or None."""
    if isinstance(x, fx.Node) and (_is(x, _DIV) or _is(x, _MUL)) and len(x.args) == 2:
        other = x.args[1]
        if isinstance(other, fx.Node) and _const(other) is None:
            v = _val(other)
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                return other
    return None


def _grad_leaf(graph) -> bool:
    """Whether some (log_)softmax over the classes reads logits that need a gradient."""
    for n in graph.nodes:
        lf = _leaf(n)
        if lf is not None and lf != "dim" and getattr(_val(_chain(lf[1])[0]), "requires_grad",
                                                      False):
            return True
    return False


def _analyse(match):
    """The divergence rooted at the anchor: (algebra, root, student info, teacher info)."""
    anchor = match.tops[0]
    lf = _leaf(anchor)
    if lf is None:
        raise Skip
    if lf == "dim":
        raise Skip
    top_s, steps_s = _chain(lf[1])
    sv = _val(top_s)
    if not getattr(sv, "requires_grad", False) and _grad_leaf(match.graph):
        raise Skip  # a teacher's softmax: the student's anchor handles it
    # Nothing needs a gradient (inference, torch.no_grad(), or eager's own backward would fail):
    # the anchor stands for the student, so the loss is still rewritten (no gradient computed)
    # or refused with a reason (a write between its uses, ...), never left alone silently.
    key_s = top_s, _parse_scale(steps_s)
    leaves, sides, other_dim = {}, {}, []
    for n in match.graph.nodes:
        lf2 = _leaf(n)
        if lf2 is None:
            continue
        if lf2 == "dim":
            other_dim.append(n)
            continue
        top, steps = _chain(lf2[1])
        key = top, _parse_scale(steps)
        if key == key_s:
            leaves[n] = (lf2[0], "s")
        else:
            sides.setdefault(key, []).append((n, lf2[0], top, steps))
    # The teacher: the other distribution the student's leaves are combined with. Try each
    # candidate (nearest first) and keep the one that completes to a scalar.
    best, first_miss = None, None
    for key, items in sides.items():
        lv = dict(leaves)
        for n, kind, _, _ in items:
            lv[n] = (kind, "t")
        alg = _Algebra(match, lv, top_s)
        alg.run()
        roots = [n for n, t in alg.terms.items() if t.level == "scalar" and t.coefs and
                 not any(u in alg.terms for u in n.users)]
        # a per-token divergence read by something the algebra does not model (a graph output,
        # boolean indexing, a reduction over tokens it cannot fuse): the op returns it per token
        # and everything after it stays in the graph, reading the op's output
        per_token = [n for n, t in alg.terms.items() if t.level == "row" and t.coefs and
                     any(u not in alg.terms for u in n.users)]
        if per_token:
            best = (alg, per_token[0], key, items)
            break
        if roots:
            best = (alg, roots[-1], key, items)
            break
        first_miss = first_miss or alg.miss or _unfinished(alg) or _written_term(alg, anchor,
                                                                                 items)
    if best is None:
        if first_miss:
            raise _MissReason(first_miss)
        if other_dim and any(_meet(anchor, o) for o in other_dim):
            raise _MissReason("the teacher's softmax is over another dim than the classes")
        raise Skip
    return best, (top_s, steps_s)


class _MissReason(Exception):
    pass


def _unfinished(alg):
    """Why a divergence of the two distributions never became a scalar (its values are read by
    something the algebra does not know), or None."""
    for n, t in alg.terms.items():
        if t.level in ("elem", "row", "scalar") and t.coefs:
            for u in n.users:
                if u not in alg.terms:
                    what = "a graph output" if u.op == "output" else f"`{u.name}`"
                    return (f"the {'per-token ' if t.level != 'scalar' else ''}divergence "
                            f"`{n.name}` is used by {what}, which the pattern cannot prove to be "
                            "a reduction it can fuse")
    return None


def _written_term(alg, anchor, items):
    """Why the two distributions, combined a few ops below, never became a divergence because
    a value the algebra read is written in place between its uses (`ps += 1.0`: later code
    reads the written value, a node the algebra does not know), or None."""
    if not any(_meet(anchor, n) for n, _, _, _ in items):
        return None
    # the logits the leaves read count too: `s1 += 1.0` between log_softmax(s1) and softmax(s1)
    # makes the two leaves read two values (two "distributions" where the code meant one)
    tops = [alg.student_top] + [top for _, _, top, _ in items]
    leaves = [anchor] + [n for n, _, _, _ in items]
    inputs = [n.args[0] for n in leaves if n.args and isinstance(n.args[0], torch.fx.Node)]
    return _written(alg.match.graph, [n for n in alg.terms if n.users] + tops + leaves + inputs)


def _below(a, limit=6):
    seen, frontier = set(), [a]
    for _ in range(limit):
        frontier = [u for n in frontier for u in n.users if u not in seen]
        seen.update(frontier)
    return seen


def _meet(a, b) -> bool:
    """Whether the values of a and b are combined within a few ops below them."""
    return bool(_below(a) & _below(b))


def _ancestors(root, terms):
    out, stack = [], [root]
    seen = {root}
    while stack:
        n = stack.pop()
        out.append(n)
        for a in _flat(n.args):
            if isinstance(a, fx.Node) and a in terms and a not in seen:
                seen.add(a)
                stack.append(a)
        for a in n.kwargs.values():
            if isinstance(a, fx.Node) and a in terms and a not in seen:
                seen.add(a)
                stack.append(a)
    return out


def _check(match, fused: bool):
    try:
        (alg, root, key_t, items), (top_s, steps_s) = _analyse(match)
    except _MissReason as e:
        return str(e)
    t = alg.terms[root]
    ct = compute_dtype(_val(top_s).dtype)
    # -- the student side
    scale_s = _parse_scale(steps_s)
    if scale_s is None or scale_s[1]:
        return "the student logits pass through steps other than casts and a scale"
    problem = _cast_problem(steps_s, _val(top_s).dtype, match)
    if problem:
        return problem
    # -- the teacher side
    top_t, steps_t = items[0][2], items[0][3]
    tv = _val(top_t)
    if getattr(tv, "requires_grad", False):
        return (f"the teacher's logits `{top_t.name}` require grad (a teacher with gradients); "
                "compute them under torch.no_grad() or .detach() them")
    scale_t = _parse_scale(steps_t)
    if scale_t is None or scale_t[1]:
        return "the teacher logits pass through steps other than casts and a scale"
    problem = _cast_problem(steps_t, tv.dtype, match)
    if problem:
        return problem
    if not known_equal(tv.shape[-1], _val(top_s).shape[-1]) or \
            not known_equal(tv.numel(), _val(top_s).numel()):
        return "the teacher's logits do not have the student's shape"
    # every leaf of a side reads that side's logits through its own chain: each must give the
    # value the kernel computes from them (free casts, the scale in the compute dtype), or a
    # lossy cast on one leaf's way (`softmax(s.bfloat16().float())` next to `log_softmax(s)`)
    # would be computed from the unrounded logits (a wrong answer before this check)
    leaf_chain_nodes = []
    for n in alg.leaves:
        top, steps = _chain(_leaf(n)[1])
        sc = _parse_scale(steps)
        if sc is None or sc[1]:
            return f"the logits of `{n.name}` pass through steps other than casts and a scale"
        problem = _cast_problem(steps, _val(top).dtype, match)
        if problem:
            return f"{problem} (on the way to `{n.name}`)"
        leaf_chain_nodes += [m for m, _, _ in steps]
    covered = _ancestors(root, alg.terms)
    for n in covered:
        v = _val(n)
        if isinstance(v, torch.Tensor) and v.dtype.is_floating_point and v.dtype != ct and \
                n not in alg.leaves:
            return (f"the divergence computes in {short(v.dtype)} at `{n.name}`; the kernel "
                    f"computes in {short(ct)}")
    # chain nodes between the tops and the leaves
    chain_nodes = [n for n, _, _ in steps_s] + [n for n, _, _ in steps_t] + leaf_chain_nodes
    ce = t.ce[1] if t.ce else None
    if ce:
        chain_nodes += [n for n, _, _ in ce["steps"]]
    covered_set = set(covered) | set(chain_nodes)
    lin_s = _linear(top_s) if fused else None
    if fused and lin_s is None and _tensor_scale(top_s) is not None:
        return (f"the temperature is a tensor (`{_tensor_scale(top_s).name}`): the lm head cannot "
                "be fused with the loss; make it a Python float")
    if fused and (lin_s is None or any(u not in covered_set for u in top_s.users)):
        raise Skip  # not a linear nothing else reads: distillation_loss takes the logits
    if not fused and _linear(top_s) is not None and all(u in covered_set for u in top_s.users):
        raise Skip  # the fused pattern's (it ran first and refused with its reason)
    lin_t = _linear(top_t)
    fuse_t = fused and lin_t is not None and all(u in covered_set for u in top_t.users)
    nodes = list(dict.fromkeys(chain_nodes + covered))
    if lin_s is not None:
        nodes.append(top_s)
    if fuse_t:
        nodes.append(top_t)
    # only the chain nodes whose every user is inside stay covered (others are shared)
    match.covered = list(dict.fromkeys(match.covered + nodes))
    why = _written(match.graph, nodes)
    if why:
        return why
    match.outputs = [root]
    match.tops = [root]
    if "s" in t.logp:
        # eager's backward of log(p) is g / p through the softmax's: inf / NaN over the row
        # where p is 0, and also where p is tiny but not 0 if |g| / p overflows, which depends
        # on the upstream gradient's magnitude; the op forms its gradients in the forward for
        # grad_output = 1, so it cannot give those (issue 22)
        return ("the student's log-probability is written log(softmax(z)): -inf where the "
                "softmax underflows, and eager's gradient g / p is inf / NaN where p is 0 or "
                "tiny enough for the upstream gradient to overflow it (it depends on that "
                "gradient's magnitude, which the op's forward-formed gradient cannot see); "
                "write F.log_softmax(z, -1)")
    if "t" in t.logp and "t" in t.lsm:
        return ("the teacher's log-probability is written both as log(softmax(z)) and as "
                "log_softmax(z) (they differ where the softmax underflows)")
    bad = t.xlogy - {("t", "t"), ("s", "s")}
    if bad:
        return f"an xlogy term {sorted(bad)} the kernel does not compute as xlogy"
    if len(t.xsrc) > 1:
        return ("kl_div's targets are the student's probabilities spelled two ways (softmax and "
                "exp of log_softmax, which differ where they underflow)")
    tv_sm = _tv_spelling(t.tvsrc)
    if isinstance(tv_sm, str):
        return tv_sm
    zero = [k for k, v in t.coefs.items() if v == 0]
    if zero:
        # eager keeps 0 * term, NaN where the term is infinite (a -inf logit: 0 * log 0); the
        # kernel leaves a zero-coefficient term out (a term absent from the code must not be NaN)
        return (f"the divergence's term(s) {sorted(map(str, zero))} are multiplied by 0 (or cancel): "
                "eager's 0 * term is NaN where a logit is -inf, which the kernel does not keep; "
                "leave the term out of the code")
    coefs = [float(t.coefs.get(k, 0.0)) for k in _BASIS]
    # the conventions (kernels/distillation.py): pt * lt as xlogy; lt as log(softmax(zt)); ps * ls
    # as xlogy, ps tested as softmax (1) or as exp(log_softmax) (2)
    coefs += [1.0 if ("t", "t") in t.xlogy else 0.0, 1.0 if "t" in t.logp else 0.0,
              (1.0 if "softmax" in t.xsrc else 2.0) if ("s", "s") in t.xlogy else 0.0,
              tv_sm]
    kd_n = []
    per_token = t.level == "row"
    if per_token:
        problem = _per_token_problem(root, top_s, ct)
        if problem:
            return problem
    if t.sym != 1 and per_token:
        return (f"the per-token divergence is divided by {t.sym}, a symbolic number of classes "
                "(the per-token op reads no size at run time)")
    if t.sym != 1:
        # a batchmean / mean over a symbolic size: the op reads the size from its inputs' shapes
        tensors = [("student", top_s) if lin_s is None else ("s_hidden", lin_s[0]),
                   ("t_hidden", lin_t[0]) if fuse_t else ("teacher", top_t)]
        if t.mask is not None:
            tensors.append(("kd_mask", t.mask))
        if ce is not None:
            tensors.append(("labels", ce["labels"]))
        kd_n = _size_recipe(t.sym, tensors)
        if kd_n is None:
            return (f"the divergence is divided by {t.sym}, a size that is not read from the "
                    "logits', mask's or labels' shapes")
    mix = t.mix or (0.0, 0.0)
    if not all(math.isfinite(c) for c in coefs + list(mix)):
        return "a divergence coefficient is not finite"
    # the independent check: the matched code, read symbolically, equals the kernel's formula
    why = proof.check(root, alg.leaves, coefs[:7], mix, t.ce[0] if ce else 0.0, _const,
                      ce["node"] if ce else None, t.mask, t.sym)
    if why:
        return why
    match.params.update(
        coefs=coefs, scales=[scale_s[0], scale_t[0], ce["scale"] if ce else 1.0, *mix],
        kd_denom=0.0 if t.denom == "count" else 1.0, ce_coef=t.ce[0] if ce else 0.0,
        ignore_index=ce["ignore_index"] if ce else -100, ce_mean=ce["mean"] if ce else True,
        fused_teacher=fuse_t, has_mask=t.mask is not None, kd_n=kd_n, per_token=per_token,
        flat=per_token and _val(root).dim() != _val(top_s).dim() - 1)
    match.bindings.update(student=top_s if lin_s is None else None, teacher=top_t)
    if lin_s is not None:
        h, w, b = lin_s
        match.bindings.update(s_hidden=h, s_weight=w, s_bias=b)
    if fuse_t:
        h, w, b = lin_t
        match.bindings.update(t_hidden=h, t_weight=w, t_bias=b)
    if t.mask is not None:
        match.bindings["kd_mask"] = t.mask
    if ce is not None:
        match.bindings["labels"] = ce["labels"]
    parts = [k for k, c in zip(["ps*ls", "ps*lt", "ps*m", "pt*ls", "pt*lt", "pt*m", "|ps-pt|",
                                "xlogy(pt, pt)", "lt = log(softmax)", "xlogy(ps, ps)",
                                "|ps-pt| of softmaxes"], coefs) if c]
    match.detail = ("per-token divergence, " if per_token else "") + \
        ("teacher head fused, " if fuse_t else "") + "terms " + ", ".join(parts) + \
        (f", + {t.ce[0]:g} * CE" if ce else "") + (f", / {t.sym} at run time" if kd_n else "")
    return None


def _tv_spelling(tvsrc):
    """The kernel's TVD flag (1.0: both probabilities are softmaxes, 0.0: both exp of a
    log-softmax, or no TVD), or why the TVD's spellings cannot be followed.

    Where ps and pt are equal (a student equal to its teacher, rows saturated to the same one-hot
    softmax), eager's ps - pt is 0 exactly when both sides are computed the same way, and its
    gradient's sign(ps - pt) is then 0; two spellings (softmax and exp of a log-softmax) round
    differently, so eager's difference is their roundings' and its sign is +-1 by rounding
    alone, which the kernel cannot reproduce (issue 22)."""
    if not tvsrc:
        return 0.0
    spell = {p for _, p in tvsrc}
    if len(tvsrc) == 2 and len(spell) == 1 and spell <= {"softmax", "exp"}:
        return 1.0 if spell == {"softmax"} else 0.0
    names = {"softmax": "F.softmax(z, -1)", "exp": "exp of F.log_softmax(z, -1)",
             "exp log": "exp of log(softmax(z))"}
    how = "; ".join(f"{'student' if s == 's' else 'teacher'}: {names.get(p, p)}"
                    for s, p in sorted(tvsrc))
    return (f"the TVD's probabilities are spelled differently ({how}): where they are equal, "
            "eager's ps - pt is the two spellings' rounding, so the sign its gradient takes "
            "there is rounding noise the kernel cannot reproduce; compute both as "
            "F.softmax(z, -1) or both as F.log_softmax(z, -1).exp()")


def _per_token_problem(root, top_s, ct):
    """Why the per-token op's output (kd_row, in the compute dtype, shaped as the student
    logits' rows) cannot stand for the per-token divergence `root`, or None."""
    rv, sv = _val(root), _val(top_s)
    if rv.dtype != ct:
        return (f"the per-token divergence `{root.name}` is {short(rv.dtype)}; the op returns it "
                f"in {short(ct)}")
    rows = tuple(sv.shape[:-1])
    if tuple(rv.shape) == rows and all(known_equal(a, b) for a, b in zip(rv.shape, rows)):
        return None
    if rv.dim() == 1 and known_equal(rv.numel(), sv.numel() // sv.shape[-1]):
        return None  # the rows flattened: the op's output is reshaped to one dim
    return (f"the per-token divergence `{root.name}` has shape {tuple(rv.shape)}, not the "
            f"student logits' rows {rows} or their flattening")


def _written(graph, nodes):
    """A write (in place, through any view) to memory of a value the fused loss computes, after
    that value is computed and before the loss is: the code then reads the written value at its
    later uses, which the fused op never sees.  Named here, before the generic check that would only call the view or
    the write an outside use."""
    if not mutation.has_writes(graph):
        return None
    mem = mutation.Memory(graph)
    last = max((mem.pos[n] for n in nodes if n in mem.pos), default=-1)
    for n in nodes:
        if n not in mem.pos or not isinstance(_val(n), torch.Tensor):
            continue
        keys = mem.keys(n)
        for w in mem.writes:
            if mem.pos[n] < mem.pos.get(w.node, -1) < last and keys & w.keys:
                return (f"{mutation.describe(w, n)}, between the uses of `{n.name}` that the "
                        "pattern would fuse")
    return None


def _rg(x):
    return bool(getattr(_val(x), "requires_grad", False))


def _replace(x=None, p=None, s_hidden=None, s_weight=None, s_bias=None, student=None, teacher=None,
             t_hidden=None, t_weight=None, t_bias=None, kd_mask=None, labels=None, *,
             match=None):
    if match is None:
        # check_pattern / registration probe: the anchor itself (the variants name their input
        # differently, so the probe knows which one it stands for); a real match replaces the
        # whole loss below the anchor, found by the constraint
        return F.log_softmax(x, -1) if x is not None else F.softmax(p, -1)
    p = match.params
    kd = (p["coefs"], p["scales"], 1.0, p["kd_denom"], p["ce_coef"], p["ignore_index"],
          p["ce_mean"])
    # a symbolic denominator: the product of the sizes, computed by the graph on each call
    given = dict(student=student, teacher=teacher, s_hidden=s_hidden, t_hidden=t_hidden,
                 kd_mask=kd_mask, labels=labels)
    kd_n = None
    for name, d in p.get("kd_n", ()):
        x = given[name]
        size = x.tracer.create_proxy("call_function", torch.ops.aten.sym_size.int, (x, d), {})
        kd_n = size if kd_n is None else kd_n * size
    kd_n = 1 if kd_n is None else kd_n
    if p.get("per_token"):
        if s_hidden is not None:
            fused_t = p["fused_teacher"]
            rows = torch.ops.liger.fused_linear_distillation_per_token(
                s_hidden, s_weight, s_bias, None if fused_t else teacher,
                t_hidden if fused_t else None, t_weight if fused_t else None,
                t_bias if fused_t else None, kd_mask, p["coefs"], p["scales"], 0)
        else:
            rows = torch.ops.liger.distillation_per_token(student, teacher, kd_mask, p["coefs"],
                                                          p["scales"], 0)
        return (rows.reshape(-1) if p["flat"] else rows).to(match.out_dtype)
    if s_hidden is not None:
        fused_t = p["fused_teacher"]
        # An fp16 / bf16 head: eager rounds the logits gradient (times the upstream gradient)
        # to the head's dtype before the linear's backward, which only the backward can do (it
        # knows the upstream gradient): the forward computes no gradients, the backward
        # recomputes them (kernels/distillation.py)
        fwd = grads_in_forward(_val(match["s_hidden"]).dtype)
        out = torch.ops.liger.fused_linear_distillation(
            s_hidden, s_weight, s_bias, None if fused_t else teacher,
            t_hidden if fused_t else None, t_weight if fused_t else None,
            t_bias if fused_t else None, kd_mask, labels, *kd,
            fwd and _rg(match["s_hidden"]), fwd and _rg(match["s_weight"]),
            fwd and s_bias is not None and _rg(match["s_bias"]), 0, kd_n)
    else:
        out = torch.ops.liger.distillation_loss(student, teacher, kd_mask, labels, *kd,
                                                _rg(match["student"]), 0, kd_n)
    return out[0].to(match.out_dtype)


def _anchor_log_softmax(x):
    return F.log_softmax(x, -1)


def _anchor_softmax(p):
    return F.softmax(p, -1)


_VARIANTS = [_anchor_log_softmax, _anchor_softmax]
_EXAMPLES = {"x": torch.randn(4, 10), "p": torch.randn(4, 10)}


register(
    "fused_linear_distillation", _VARIANTS, _replace, example_inputs=_EXAMPLES,
    constraints=lambda m: _check(m, True), priority=40,
    description="student lm head + KL / JSD / TVD against a teacher (+ mixed CE) -> chunked "
                "liger::fused_linear_distillation (no [N, V] tensor kept)",
    builtin=True,
)
register(
    "distillation_loss", _VARIANTS, _replace, example_inputs=_EXAMPLES,
    constraints=lambda m: _check(m, False), priority=39,
    description="KL / JSD / TVD between student and teacher logits -> liger::distillation_loss",
    builtin=True,
)
