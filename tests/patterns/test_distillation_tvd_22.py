"""Issue 22, TVD: the two probabilities inside `abs(ps - pt)` are formed as the code spells them.

Where ps equals pt (a student equal to its teacher, rows saturated to the same softmax), eager's
ps - pt is exactly 0 when both are computed the same way and its gradient sign(ps - pt) is 0.
Two spellings (`F.softmax` and exp of `F.log_softmax`) round differently, so eager's difference
there is rounding and its sign +-1 by chance: that TVD is refused with the reason (the kernel
cannot reproduce another implementation's roundings); both sides spelled alike are rewritten,
the softmax pair with the kernel's flag (coefs[10]).  Each case runs through the oracle rule
(tests/differential/oracle.compare) on both kernel paths.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.differential.oracle import collect_reports
from tests.patterns.test_distillation_soundness import oracle


def _p(z, how):
    return F.softmax(z, -1) if how == "softmax" else F.log_softmax(z, -1).exp()


def _tvd(hs, ht):
    def fn(s, t, y):
        return (0.5 * (_p(s, hs) - _p(t, ht)).abs()).sum(-1).mean()
    return fn


def test_eager_mixed_spellings_differ_where_equal():
    # why mixed spellings are refused: equal logits, and eager's ps - pt is not 0
    z = torch.randn(64, 40) * 3
    assert (_p(z, "softmax") - _p(z, "exp")).ne(0).any()
    assert (_p(z, "softmax") - _p(z.clone(), "softmax")).eq(0).all()


@pytest.mark.parametrize("hs,ht", [("softmax", "exp"), ("exp", "softmax")])
def test_tvd_spelled_two_ways_refused_with_the_reason(kernel_path, hs, ht):
    _, misses = oracle(_tvd(hs, ht), expect="spelled differently")
    assert any("F.softmax(z, -1)" in r and "exp of F.log_softmax" in r for r in misses), misses


@pytest.mark.parametrize("how", ["softmax", "exp"])
def test_tvd_spelled_alike_rewritten(kernel_path, how):
    oracle(_tvd(how, how), expect="loss")
    # the softmax pair is computed as softmaxes (the kernel's flag), the other as exp(ls)
    reports: list = []
    torch._dynamo.reset()
    fn = torch.compile(_tvd(how, how), backend="liger",
                       options={"inner": "aot_eager", "log_report": False})
    with collect_reports(reports):
        fn(torch.randn(4, 24, requires_grad=True), torch.randn(4, 24), None)
    details = [m.detail for r in reports for m in r.matches if m.pattern == "distillation_loss"]
    assert details and all(("of softmaxes" in d) == (how == "softmax") for d in details), details
