"""The oracle's allowance for a reduced loss's rounding noise (noise.py; issue 22, finding 2).

- the model is calibrated: over many inputs, eager fp32's error of a close-rows KL divided by the
  modelled standard deviation has a spread of about 1 (so 3 of them is a bound, not a blanket
  factor);
- the two survey cases (a correct rewrite 2.3x / 4x eager's error on the Triton path, eager's
  own error by chance far below its noise) pass;
- a kernel whose rows carry 10x its own rounding error (12 of 20 inputs; 20x: 16 of 20), or whose
  divergence drops a term, still fails the oracle (translation validation off, so the oracle's
  rule is what is tested); the kernel as it is fails none.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ligerfx.kernels import distillation as dk
from tests.differential.noise import scalar_noise
from tests.differential.oracle import Crash, WrongAnswer, check
from tests.differential.source import SPELLING, Case, Input, Written

KL = """
class M(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, s, t):
        ls = F.log_softmax(s, dim=-1)
        lt = F.log_softmax(t, dim=-1)
        pt = lt.exp()
        loss = F.kl_div(ls, pt, reduction='batchmean')
        return (loss,)
"""


def _case(validate=True):
    ins = [Input("s", (2, 3, 24), scale=2.0),
           Input("t", (2, 3, 24), grad=False, scale=1e-3, near="s")]
    return Case(Written(KL, ins), ("distillation_loss",), SPELLING, torch.float32, "noise",
                options={} if validate else {"validate": False})


class _KL(nn.Module):
    def forward(self, s, t):
        return (F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1).exp(),
                         reduction="batchmean"),)


def test_model_is_calibrated():
    ratios = []
    for seed in range(60):
        g = torch.Generator().manual_seed(seed)
        s = torch.randn(2, 3, 24, generator=g, dtype=torch.float64) * 2
        t = s + 1e-3 * torch.randn(2, 3, 24, generator=g, dtype=torch.float64)
        m = _KL()
        ref, low = m(s, t)[0].item(), m(s.float(), t.float())[0].item()
        sigma = scalar_noise(m, (s.requires_grad_(), t), m, (s.float(), t.float()))[0]
        ratios.append((low - ref) / sigma)
    spread = torch.tensor(ratios).std().item()
    assert 0.5 < spread < 2.0, spread


def _amplified(factor):
    """dk._rows with each row's error against float64 multiplied by `factor`."""
    inner = dk._rows_torch

    def rows(zs, zt, y, kd_w, ce_w, kd_rows, ce_rows, g, P):
        inner(zs, zt, y, kd_w, ce_w, kd_rows, ce_rows, g, P)
        exact = torch.empty_like(kd_rows, dtype=torch.float64)
        dk._rows_torch(zs.double(), zt.double(), y, None, None, exact,
                       torch.empty_like(exact), None, P)
        kd_rows.copy_(exact + factor * (kd_rows.double() - exact))
    return rows


def _failures(seeds):
    out = 0
    for seed in seeds:
        try:
            check(_case(False), seed, paths=("torch",))
        except WrongAnswer:
            out += 1
    return out


def test_correct_rewrite_passes_and_many_times_its_error_fails(monkeypatch):
    # measured (seeds 0-19, torch path, whose rows are eager's to the bit): the kernel as it is
    # and 3x its row errors: 0 failures; 6x: 5; 10x: 12; 20x: 16.  The amplified error is k
    # times eager's own draw, which is sometimes far below its standard deviation; no rule that
    # passes the correct kernel can tell those from noise in one number (the gradients, compared
    # element by element, are where a real bug also shows).
    seeds = range(20)
    assert _failures(seeds) == 0
    for factor, at_least in ((10.0, 10), (20.0, 14)):
        monkeypatch.setattr(dk, "_rows", _amplified(factor))
        assert _failures(seeds) >= at_least, factor
        monkeypatch.undo()


def test_dropped_term_fails(monkeypatch):
    inner = dk._params

    def params(coefs, *a):
        P = inner(coefs, *a)
        P["coefs"][3] = 0.0  # forward KL without its -pt*ls term
        P["group"] = (0, 0)
        return P

    monkeypatch.setattr(dk, "_params", params)
    with pytest.raises((WrongAnswer, Crash)):
        check(_case(False), 0, paths=("torch",))
