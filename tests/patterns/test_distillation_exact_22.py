"""Issue 22, distillation: equal spellings that used to be refused, now rewritten exactly.

1. A `batchmean` / `mean` over a symbolic size under `torch.compile(..., dynamic=True)`: the op
   reads the size at run time (`kd_n`, computed by the graph from its inputs' sizes), so one
   compiled graph is exact for every shape it serves (two shapes, no recompile, validated).
2. `F.kl_div` with the student's probabilities as its target (`xlogy(ps, ps)`): 0 where eager's
   ps is 0, and there eager's backward is 0 / 0, a NaN over the whole logits row; rows with an
   underflowing softmax (a spread > 104 in fp32) and -inf vocabulary columns.
3. The student's `log(softmax(z))` stays refused: eager's gradient there is `g / p` through the
   softmax's backward, which overflows to inf / NaN where p is tiny but not 0 depending on the
   upstream gradient's magnitude, which the op (gradients formed in the forward for
   grad_output = 1) cannot see; the near miss says so.

Each case is compared against float64 by the oracle rule (tests/differential/oracle.compare),
forward and backward, on both kernel paths.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.differential.oracle import collect_reports, compare
from tests.patterns.test_distillation_soundness import MASK, PATTERNS, oracle

H = 16


def _ls(z):
    return F.log_softmax(z, -1)


def _p(z):
    return F.softmax(z, -1)


# -- 1. symbolic denominators: two shapes through one compiled graph ------------------------------

class _Dyn(nn.Module):
    def __init__(self, fn, head: bool, V: int):
        super().__init__()
        self.fn = fn
        self.head = nn.Linear(H, V, bias=True) if head else None

    def forward(self, x, t, y):
        s = self.head(x) if self.head is not None else x
        return self.fn(s, t, y)


def _dyn_inputs(seed, shape, head):
    B, T, V = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((B, T, H) if head else (B, T, V), generator=g, dtype=torch.float64)
    x = x if head else 2.0 * x
    t = 2.0 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (B, T), generator=g)
    y[:, ::2] = -100
    return x, t, y


def _two_shapes(fn, shapes, *, head=False, expect="loss", validate=True):
    """fn compiled once with dynamic=True, run on each shape: compared with eager fp32 and
    float64, forward and gradients (random cotangent); the graph is compiled once."""
    V = shapes[0][2]
    torch.manual_seed(0)
    model = _Dyn(fn, head, V)
    options = {"inner": "aot_eager", "log_report": False}
    if validate:
        options["validate"] = "raise"
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(copy.deepcopy(model).float(), backend="liger", dynamic=True,
                             options=options)
    reports: list = []
    for i, shape in enumerate(shapes):
        x, t, y = _dyn_inputs(i, shape, head)
        go = torch.tensor(0.5 + i, dtype=torch.float64)
        outs = {}
        for name, dt in (("ref", torch.float64), ("low", torch.float32), ("got", torch.float32)):
            m = compiled if name == "got" else copy.deepcopy(model).to(dt)
            xi = x.to(dt).requires_grad_(not head)
            with collect_reports(reports if name == "got" else []):
                loss = m(xi, t.to(dt), y)
            leaves = list(m.parameters()) if head else [xi]
            grads = torch.autograd.grad(loss, leaves, go.to(dt))
            outs[name] = [loss.detach(), *grads]
        problems = [compare(f"shape {shape} value {k}", a, b, c, torch.float32)
                    for k, (a, b, c) in enumerate(zip(outs["got"], outs["low"], outs["ref"]))]
        problems = [p for p in problems if p]
        assert not problems, problems
    assert len(reports) == 1, f"{len(reports)} graphs compiled for {len(shapes)} shapes"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    matches = [m.pattern for r in reports for m in r.matches if m.pattern in PATTERNS]
    misses = [n.reason for r in reports for n in r.near_misses if n.pattern in PATTERNS]
    want = "fused_linear_distillation" if expect == "fused" else "distillation_loss"
    assert want in matches, (matches, misses)
    details = [m.detail for r in reports for m in r.matches if m.pattern in PATTERNS]
    return details


SHAPES = [(2, 3, 40), (4, 5, 24)]


def _fkl(s, t):
    return F.kl_div(_ls(s / 2.0), _p(t / 2.0), reduction="none")


DYN_FORMS = {
    # batchmean divides by the first dim of the input as written: B
    "kl_div_batchmean": lambda s, t, y: F.kl_div(_ls(s), _p(t), reduction="batchmean"),
    # ... of the flattened rows: B * T
    "kl_div_batchmean_rows": lambda s, t, y: F.kl_div(
        _ls(s.reshape(-1, s.shape[-1])), _p(t.reshape(-1, t.shape[-1])), reduction="batchmean"),
    # every element: B * T * V (V symbolic too)
    "kl_div_mean": lambda s, t, y: F.kl_div(_ls(s), _ls(t), reduction="mean", log_target=True),
    "elementwise_mean": lambda s, t, y: _fkl(s, t).mean() * 4.0,
    "rows_mean": lambda s, t, y: _fkl(s, t).sum(-1).mean(),
    "per_class_mean_sum": lambda s, t, y: _fkl(s, t).mean(-1).sum(),
    "per_class_mean_masked": lambda s, t, y: (
        _fkl(s, t).mean(-1) * (y != -100)).sum() / (y != -100).sum(),
    "batchmean_plus_ce": lambda s, t, y: 0.7 * F.kl_div(_ls(s), _p(t), reduction="batchmean")
    + 0.3 * F.cross_entropy(s.reshape(-1, s.shape[-1]), y.reshape(-1)),
}


@pytest.mark.parametrize("form", list(DYN_FORMS))
def test_symbolic_denominator_two_shapes_one_graph(kernel_path, form):
    details = _two_shapes(DYN_FORMS[form], SHAPES)
    assert any("at run time" in d for d in details), details


@pytest.mark.parametrize("form", ["kl_div_batchmean", "rows_mean", "batchmean_plus_ce"])
def test_symbolic_denominator_fused_head(kernel_path, form):
    # the lm head's V is a parameter's (static); B and T are symbolic and read from the hidden
    details = _two_shapes(DYN_FORMS[form], [(2, 3, 40), (4, 5, 40)], head=True, expect="fused")
    assert any("at run time" in d for d in details), details


def test_symbolic_batch_divided_by_a_size_stays_exact(kernel_path):
    # `d.sum() / s.shape[0]`: the division by the SymInt stays in the graph, reading the op
    _two_shapes(lambda s, t, y: _fkl(s, t).sum() / s.shape[0], SHAPES)


# -- 2. kl_div with the student's probabilities as its target ---------------------------------------

def _mixed_rows(x):
    # every other row spread > 104 (the softmax underflows to exactly 0 there in fp32)
    x = x.clone()
    x[::2] *= 40.0
    return x


@pytest.mark.parametrize("spelling", ["softmax", "exp_of_log_softmax"])
@pytest.mark.parametrize("scale,mask_s", [(2.0, None), (60.0, None), (2.0, MASK)],
                         ids=["mixed_rows", "all_rows_underflow", "inf_columns"])
def test_kl_div_student_as_target(kernel_path, spelling, scale, mask_s):
    def fn(s, t, y):
        ps = _p(_mixed_rows(s)) if spelling == "softmax" else _ls(_mixed_rows(s)).exp()
        return F.kl_div(_ls(t), ps, reduction="batchmean")

    oracle(fn, expect="loss", s_scale=scale, mask_s=mask_s)


def test_kl_div_student_as_target_masked_rows_and_ce(kernel_path):
    # a masked-out row whose softmax underflows is still NaN in eager's gradient (0 * 0 / 0)
    def fn(s, t, y):
        d = F.kl_div(_ls(t / 2.0), _p(_mixed_rows(s) / 2.0), reduction="none")
        keep = (y != -100).float()
        return 0.6 * (d.sum(-1) * keep).sum() / keep.sum() * 4.0 + 0.4 * F.cross_entropy(s, y)

    oracle(fn, expect="loss", s_scale=20.0)


def test_kl_div_student_as_target_mixture(kernel_path):
    # GKD with log_target=False on the student side: xlogy(ps, ps) - ps * m
    def fn(s, t, y):
        ls, lt = _ls(s), _ls(t)
        m = torch.logsumexp(torch.stack([ls + math.log(0.6), lt + math.log(0.4)]), 0)
        return (0.4 * F.kl_div(m, lt, reduction="none", log_target=True)
                + 0.6 * F.kl_div(m, _p(s), reduction="none")).sum(-1).mean()

    oracle(fn, expect="loss", s_scale=60.0)


def test_kl_div_student_as_target_fused(kernel_path):
    def fn(s, t, y):
        return F.kl_div(_ls(t / 2.0), _p(s * 300.0), reduction="batchmean")

    oracle(fn, expect="fused", head=True)


def test_kl_div_student_as_target_blocks_and_chunks(kernel_path, monkeypatch):
    # the row's zero found in one vocabulary block NaNs the gradient of the others
    from ligerfx.kernels import distillation as dk

    monkeypatch.setattr(dk, "DISTILL_BLOCK_V", 16)
    monkeypatch.setattr(dk, "DISTILL_CHUNK_ROWS", 4)

    def fn(s, t, y):
        return F.kl_div(_ls(t), _p(_mixed_rows(s)), reduction="sum")

    oracle(fn, expect="loss", s_scale=8.0)


def _boundary_logits():
    """Rows where exp(z - max) / sum (eager's softmax) is the smallest subnormal but
    exp(log_softmax) is 0: the two spellings of ps differ in which rows eager makes NaN."""
    d = math.log(0.6 * 2.0 ** -149)  # exp(d) rounds up to 2^-149; / 1.5 is still 2^-149
    row = [0.0, math.log(0.5), d, -8.0, -9.0, -10.0, -7.0, -6.0]
    z = torch.tensor([row, [0.5 * v for v in row]], dtype=torch.float32)
    return z


@pytest.mark.parametrize("spelling", ["softmax", "exp_of_log_softmax"])
def test_kl_div_student_target_zero_as_eager_spells_it(kernel_path, spelling):
    z = _boundary_logits()
    t = torch.randn(z.shape, generator=torch.Generator().manual_seed(3))

    def fn(s, tt):
        ps = _p(s) if spelling == "softmax" else _ls(s).exp()
        return F.kl_div(_ls(tt), ps, reduction="sum")

    outs = {}
    reports: list = []
    for name in ("low", "got"):
        s = z.clone().requires_grad_()
        f = fn
        if name == "got":
            torch._dynamo.reset()
            f = torch.compile(fn, backend="liger", options={"inner": "aot_eager",
                                                            "log_report": False})
        with collect_reports(reports if name == "got" else []):
            loss = f(s, t)
        loss.backward()
        outs[name] = (loss.detach(), s.grad)
    assert any(m.pattern == "distillation_loss" for r in reports for m in r.matches)
    eager_nan = outs["low"][1].isnan().all(-1)
    # the softmax spelling keeps the first row's tiny probability; exp(log_softmax) drops it
    assert eager_nan.tolist() == ([False, False] if spelling == "softmax" else [True, False])
    assert torch.equal(outs["got"][1].isnan(), outs["low"][1].isnan())
    fin = ~outs["low"][1].isnan()
    assert torch.allclose(outs["got"][1][fin], outs["low"][1][fin], rtol=1e-5, atol=1e-6)
    assert torch.allclose(outs["got"][0], outs["low"][0], rtol=1e-5)


# -- 3. the student's log(softmax(z)) stays refused --------------------------------------------------

def test_log_of_student_softmax_refused_with_the_reason(kernel_path):
    def fn(s, t, y):
        ls = torch.log(_p(s))
        return (_p(t) * (_ls(t) - ls)).sum(-1).mean()

    _, misses = oracle(fn, expect="log(softmax", s_scale=60.0)
    assert any("upstream gradient" in r for r in misses), misses


def test_eager_log_softmax_gradient_depends_on_the_upstream_scale():
    # why 3. is refused: the same loss, two upstream gradients, two non-finite patterns
    z = torch.tensor([[0.0, -95.0, -2.0]])
    pt = torch.tensor([[0.5, 0.3, 0.2]])
    grads = []
    for go in (1.0, 1e-3):
        s = z.clone().requires_grad_()
        loss = (pt * (pt.log() - torch.log(F.softmax(s, -1)))).sum()
        (loss * go).backward()
        grads.append(s.grad)
    assert not grads[0].isfinite().any() and grads[1].isfinite().all()


# A term multiplied by 0 (or cancelled by its negation) is still computed by eager: 0 * term is
# NaN where the term is infinite (a -inf teacher column: exp(lt) * (lt - ls) = 0 * -inf).  The
# kernel leaves zero-coefficient terms out, so the rewrite gave a finite loss where eager's is NaN.
@pytest.mark.parametrize("form", ["times_zero", "cancelled"])
def test_a_term_multiplied_by_zero_is_refused(kernel_path, form):
    def fn(s, t, y):
        kl = F.kl_div(_ls(s), _ls(t), reduction="sum", log_target=True)
        if form == "times_zero":
            return 0.0 * kl + F.cross_entropy(s, y)
        return kl - kl + F.cross_entropy(s, y)

    oracle(fn, expect="multiplied by 0", mask_t=[3])
