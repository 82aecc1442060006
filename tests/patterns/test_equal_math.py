"""Equal math in unusual spellings (issue 10 §4): each is rewritten and matches eager on both
kernel paths; the look-alike that differs (a wrong divisor, a promoting `* 1.0`, `+ 0`) is not."""

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import ligerfx
from ligerfx.compiler.canonical import CAST, View
from tests.compare import compare_training_step

D = 16


class CentredVarLN(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D))
        self.bias = nn.Parameter(torch.randn(D))

    def forward(self, x):
        xc = x - x.mean(-1, keepdim=True)
        return xc * torch.rsqrt(xc.var(-1, unbiased=False, keepdim=True) + 1e-5) * self.weight + self.bias


class BiasOnlyLN(nn.Module):
    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(D))

    def forward(self, x):
        return F.layer_norm(x, (D,), None, self.bias, 1e-5) * 2.0


class SumOverD(nn.Module):
    def __init__(self, divisor=None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D))
        self.divisor = divisor

    def forward(self, x):
        n = x.shape[-1] if self.divisor is None else self.divisor
        return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) / n + 1e-6) * self.weight


class NoOps(nn.Module):
    """RMSNorm with identity arithmetic on the way in and inside."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D))

    def forward(self, x):
        h = (x * 1.0) / 1
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) - 0
        return (1 * h) * rstd * self.weight


class NllLoss(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.head = nn.Linear(D, 11)
        self.kw = kw

    def forward(self, h, t):
        return F.nll_loss(F.log_softmax(self.head(h).float(), -1), t, **self.kw)


def _x():
    return torch.randn(3, 5, D, requires_grad=True)


@pytest.mark.parametrize("model, pattern", [(CentredVarLN, "layer_norm"), (BiasOnlyLN, "layer_norm"),
                                            (SumOverD, "rms_norm"), (NoOps, "rms_norm")])
def test_equal_spelling_is_rewritten_and_exact(model, pattern, kernel_path):
    report = compare_training_step(model(), (_x(),), options={"patterns": [pattern]})
    assert report.counts.get(pattern) == 1, report


def test_sum_over_symbolic_width_is_the_mean(kernel_path):
    report = compare_training_step(SumOverD(), (_x(),), options={"patterns": ["rms_norm"]},
                                   dynamic=True)
    assert report.counts.get("rms_norm") == 1, report


def test_sum_over_a_wrong_divisor_is_a_near_miss():
    r = ligerfx.explain(SumOverD(divisor=D + 1), _x())
    assert not r.counts.get("rms_norm")
    assert any("divided by 17" in m.reason for m in r.near_misses), r.near_misses


@pytest.mark.parametrize("kw", [{}, {"ignore_index": 3, "reduction": "sum"}, {"reduction": "none"}])
def test_nll_of_log_softmax_is_a_cross_entropy(kw, kernel_path):
    t = torch.randint(0, 11, (12,))
    t[::4] = kw.get("ignore_index", -100)  # some ignored tokens
    m = NllLoss(**kw)
    report = compare_training_step(m, (torch.randn(12, D), t))
    assert report.counts.get("fused_linear_cross_entropy") == 1, report


# -- the canonical view folds only true identities ---------------------------------------------

def _view_of(fn, *args):
    gm = fx.symbolic_trace(fn)
    from ligerfx.compiler.pattern import _run_with_meta

    _run_with_meta(gm, args)
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    return View(gm.graph), out


@pytest.mark.parametrize("fn", [lambda x: x * 1.0, lambda x: 1 * x, lambda x: x / 1,
                                lambda x: x - 0, lambda x: x + -0.0])
def test_identity_arithmetic_folds(fn):
    view, out = _view_of(fn, torch.randn(4))
    c = view[out]
    assert c.op == CAST and c.identity


@pytest.mark.parametrize("fn, x", [
    (lambda x: x + 0, torch.randn(4)),            # -0.0 + 0 is +0.0: not the identity
    (lambda x: x - -0.0, torch.randn(4)),         # the same
    (lambda x: x * 1.0, torch.arange(4)),         # an int tensor * 1.0 promotes to float
    (lambda x: x / 1, torch.arange(4)),           # true division promotes too
    (lambda x: x * torch.ones(3, 1), torch.randn(4)),  # a tensor operand broadcasts
    (lambda x: x * 2.0, torch.randn(4)),
    (lambda x: 1 / x, torch.randn(4)),
])
def test_non_identity_arithmetic_does_not_fold(fn, x):
    view, out = _view_of(fn, x)
    assert view[out].op != CAST


def test_plus_zero_really_changes_negative_zero():
    # why `x + 0` is not folded: it is not the identity on -0.0
    z = torch.tensor([-0.0])
    assert torch.signbit(z).item() and not torch.signbit(operator.add(z, 0)).item()


@pytest.mark.parametrize("fn", [lambda x: x.pow(2).mean(-1).unsqueeze(-1),
                                lambda x: torch.mean(x, dim=2)[..., None],
                                lambda x: x.sum(1).unsqueeze(1),
                                lambda x: x.var(-1, unbiased=False)[:, :, None]])
def test_reduction_unsqueezed_back_is_keepdim(fn):
    # mean(x, d).unsqueeze(d) is mean(x, d, keepdim=True) (the reduction node folded in)
    view, out = _view_of(fn, torch.randn(2, 3, 5))
    c = view[out]
    assert c.op in ("mean", "sum", "var") and c.args[-1] is True, c
    assert len(c.folded) == 1, c.folded


@pytest.mark.parametrize("fn", [lambda x: x.mean(-1).unsqueeze(0),      # another position
                                lambda x: x.mean(-1).unsqueeze(-2),
                                lambda x: x.mean((-1, -2)).unsqueeze(-1),  # two dims reduced
                                lambda x: x.mean(-1, keepdim=True).unsqueeze(-1)])
def test_reduction_unsqueezed_elsewhere_stays_unsqueeze(fn):
    view, out = _view_of(fn, torch.randn(2, 3, 5))
    assert view[out].op == "unsqueeze"
