"""Issue 22, distillation: look-alike losses that were rewritten yet differed from eager.

Each case is a plain-PyTorch loss compiled with the liger backend (aot_eager inside) and judged
by the float64 oracle (tests/differential/oracle.compare): the compiled loss and every gradient
must have eager's non-finite positions and elsewhere be no further from the float64 result than
eager in the same dtype is.  Each case also says what the backend must do with it: rewrite it
("fused" / "loss": liger::fused_linear_distillation / liger::distillation_loss) or refuse it with
a near miss whose reason contains the given words.  Both kernel paths (kernel_path fixture).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.differential.oracle import collect_reports, compare

N, H, V = 6, 16, 40
PATTERNS = ("fused_linear_distillation", "distillation_loss")


class _M(nn.Module):
    """Student logits from a linear head (x is hidden) or given directly (x is logits)."""

    def __init__(self, fn, head: bool, extra=()):
        super().__init__()
        self.fn, self.extra = fn, extra
        self.head = nn.Linear(H, V, bias=False) if head else None

    def forward(self, x, t, y, *extra):
        s = self.head(x) if self.head is not None else x
        return self.fn(s, t, y, *extra)


def _inputs(seed, *, t_shape=None, s_rows=N, t_scale=2.0, s_scale=2.0, mask_t=None, mask_s=None,
            head=False, labels="some"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((s_rows, H) if head else (s_rows, V), generator=g, dtype=torch.float64)
    x = x if head else x * s_scale
    t = torch.randn(t_shape or (s_rows, V), generator=g, dtype=torch.float64) * t_scale
    if mask_t is not None:
        t[..., mask_t] = -math.inf
    if mask_s is not None:
        x[..., mask_s] = -math.inf
    y = torch.randint(0, V, (s_rows,), generator=g)
    if labels == "some":
        y[::3] = -100
    elif labels == "none":
        y[:] = -100
    return x, t, y


def oracle(fn, *, expect, head=False, dtype=torch.float32, dynamic=None, extra=(), seed=0,
           **inp):
    """Run fn eager in float64, eager in dtype and compiled in dtype; compare; check `expect`:
    "fused" / "loss" (that op must be used) or a string the near miss's reason contains."""
    torch.manual_seed(seed)
    model = _M(fn, head)
    x, t, y = _inputs(seed, head=head, **inp)
    outs = {}
    for name, dt in (("ref", torch.float64), ("low", dtype), ("got", dtype)):
        m = copy.deepcopy(model).to(dt)
        xi = x.to(dt).requires_grad_(not head)
        args = (xi, t.to(dt), y, *extra)
        reports: list = []
        if name == "got":
            torch._dynamo.reset()
            m = torch.compile(m, backend="liger", dynamic=dynamic,
                              options={"inner": "aot_eager", "log_report": False})
        with collect_reports(reports):
            loss = m(*args)
        leaves = [xi] if not head else list(m.parameters())
        grads = torch.autograd.grad(loss, leaves, allow_unused=True) if loss.requires_grad \
            else [None] * len(leaves)
        outs[name] = [loss.detach()] + list(grads), reports
    problems = []
    for i, (a, b, c) in enumerate(zip(outs["got"][0], outs["low"][0], outs["ref"][0])):
        p = compare("loss" if i == 0 else f"grad {i}", a, b, c, dtype)
        if p:
            problems.append(p)
    reports = outs["got"][1]
    matches = [m.pattern for r in reports for m in r.matches if m.pattern in PATTERNS]
    misses = [n.reason for r in reports for n in r.near_misses if n.pattern in PATTERNS]
    assert not problems, (problems, matches, misses)
    if expect is None:  # rewritten and equal, or refused with a reason
        assert matches or misses, "neither rewritten nor a near miss"
    elif expect in ("fused", "loss"):
        want = "fused_linear_distillation" if expect == "fused" else "distillation_loss"
        assert want in matches, (matches, misses)
    else:
        assert not matches, (matches, misses)
        assert any(expect in r for r in misses), misses
    return matches, misses


def _ls(z):
    return F.log_softmax(z, -1)


def _p(z):
    return F.softmax(z, -1)


# -- 1. exp / log of a scaled log-probability ----------------------------------------------------

@pytest.mark.parametrize("c", [2.0, -1.0, 0.5])
def test_exp_of_scaled_log_prob(kernel_path, c):
    def fn(s, t, y):
        ls, lt = _ls(s), _ls(t)
        return (torch.exp(c * ls) * (ls - lt)).sum(-1).mean()

    oracle(fn, expect="exp")


def test_exp_of_negated_log_prob(kernel_path):
    def fn(s, t, y):
        ls, lt = _ls(s), _ls(t)
        return (torch.exp(-lt) * 0.01 * (lt - ls)).sum(-1).mean()

    oracle(fn, expect="exp", t_scale=0.5)


def test_log_of_a_powered_prob(kernel_path):
    def fn(s, t, y):
        ls, pt = _ls(s), _p(t)
        return (pt * (torch.log(torch.exp(2.0 * torch.log(pt))) - ls)).sum(-1).mean()

    oracle(fn, expect="exp")


def test_exp_of_log_prob_still_rewritten(kernel_path):
    def fn(s, t, y):
        ls, lt = _ls(s), _ls(t)
        return (torch.exp(1.0 * lt) * (lt - ls)).sum(-1).mean()

    oracle(fn, expect="loss")


# -- 2. a constant factor inside abs --------------------------------------------------------------

@pytest.mark.parametrize("form", ["inner_half", "outer_div3", "inner_neg"])
def test_tvd_factor_inside_abs(kernel_path, form):
    def fn(s, t, y):
        ps, pt = _p(s), _p(t)
        if form == "inner_half":
            d = torch.abs((ps - pt) * 0.5)
        elif form == "outer_div3":
            d = torch.abs(ps - pt) / 3
        else:
            d = torch.abs(-(pt - ps) * 0.25)
        return d.sum(-1).mean()

    oracle(fn, expect="loss")


def test_tvd_factor_inside_abs_fused(kernel_path):
    def fn(s, t, y):
        return torch.abs((_p(s) - _p(t)) * 0.5).sum(-1).sum() / 7

    oracle(fn, expect="fused", head=True)


# -- 3. broadcasting operands ----------------------------------------------------------------------

def test_teacher_broadcast_over_rows_is_refused(kernel_path):
    def fn(s, t, y):
        ls, lt = _ls(s), _ls(t)  # [N, V] and [N, 1, V]: the product is [N, N, V]
        return (lt.exp() * (lt - ls)).sum(-1).mean()

    oracle(fn, expect="broadcast", t_shape=(N, 1, V))


def test_kl_div_broadcast_is_refused(kernel_path):
    def fn(s, t, y):
        # rows viewed as [N, 1, V] and [1, N, V]: kl_div broadcasts them to [N, N, V]
        return F.kl_div(_ls(s).view(N, 1, V), _p(t).view(1, N, V), reduction="sum")

    oracle(fn, expect="broadcast")


# -- 4. kl_div's xlogy convention, teacher vocabulary masked with -inf ---------------------------

MASK = [1, 5, 17, 30]


@pytest.mark.parametrize("reduction", ["batchmean", "sum"])
def test_kl_div_masked_teacher_vocab(kernel_path, reduction):
    def fn(s, t, y):
        return F.kl_div(_ls(s), _p(t), reduction=reduction) * 4.0

    oracle(fn, expect="loss", mask_t=MASK)


def test_kl_div_masked_teacher_vocab_fused(kernel_path):
    def fn(s, t, y):
        return F.kl_div(_ls(s / 2), _p(t / 2), reduction="batchmean")

    oracle(fn, expect="fused", head=True, mask_t=MASK)


def test_hand_written_kl_masked_teacher_is_nan_like_eager(kernel_path):
    def fn(s, t, y):
        lt = _ls(t)
        return (lt.exp() * (lt - _ls(s))).sum(-1).mean()

    oracle(fn, expect="loss", mask_t=MASK)


def test_kl_div_student_target_is_exact(kernel_path):
    # reverse KL through kl_div: xlogy(ps, ps), whose gradient eager makes nan over a row where
    # ps underflows to 0 (the kernel's xlogy flag for the student, coefs[9]; issue 22)
    def fn(s, t, y):
        return F.kl_div(_ls(t), _p(s), reduction="batchmean")

    oracle(fn, expect="loss", s_scale=60.0)


# -- 5. log(softmax(z)) written as two ops ---------------------------------------------------------

def test_log_of_teacher_softmax_underflow(kernel_path):
    def fn(s, t, y):
        pt = _p(t)
        return (pt * (pt.log() - _ls(s))).sum(-1).mean()

    oracle(fn, expect="loss", t_scale=60.0)


def test_log_of_student_softmax_is_refused(kernel_path):
    def fn(s, t, y):
        return F.kl_div(torch.log(_p(s)), _p(t), reduction="batchmean")

    oracle(fn, expect="log(softmax", s_scale=60.0)


# -- 6. non-finite patterns -------------------------------------------------------------------------

def test_all_labels_ignored(kernel_path):
    def fn(s, t, y):
        kd = F.kl_div(_ls(s), _p(t), reduction="batchmean")
        return 0.5 * kd + 0.5 * F.cross_entropy(s, y)

    oracle(fn, expect="loss", labels="none")


def test_all_labels_ignored_fused(kernel_path):
    def fn(s, t, y):
        kd = F.kl_div(_ls(s), _p(t), reduction="batchmean")
        return 0.5 * kd + 0.5 * F.cross_entropy(s, y)

    oracle(fn, expect="fused", head=True, labels="none")


@pytest.mark.parametrize("div", ["forward", "reverse", "jsd", "tvd"])
def test_masked_vocab_both_sides(kernel_path, div):
    def fn(s, t, y):
        ls, lt = _ls(s), _ls(t)
        if div == "forward":
            return F.kl_div(ls, lt, reduction="batchmean", log_target=True)
        if div == "reverse":
            return (ls.exp() * (ls - lt)).sum(-1).mean()
        if div == "tvd":
            return 0.5 * (ls.exp() - lt.exp()).abs().sum(-1).mean()
        m = torch.logsumexp(torch.stack([ls + math.log(0.5), lt + math.log(0.5)]), 0)
        return (0.5 * F.kl_div(m, lt, reduction="none", log_target=True)
                + 0.5 * F.kl_div(m, ls, reduction="none", log_target=True)).sum(-1).mean()

    oracle(fn, expect=None, mask_t=MASK, mask_s=MASK)


# -- 7. bf16 student logits cast to fp32 -------------------------------------------------------------

def test_bf16_student_cast_fused(kernel_path):
    def fn(s, t, y):
        return F.kl_div(_ls(s.float() / 2), _p(t.float() / 2), reduction="batchmean") * 4

    oracle(fn, expect=None, head=True, dtype=torch.bfloat16)


def test_bf16_student_cast_logits(kernel_path):
    def fn(s, t, y):
        return F.kl_div(_ls(s.float()), _p(t.float()), reduction="batchmean")

    oracle(fn, expect=None, dtype=torch.bfloat16)


# -- 8. crashes ---------------------------------------------------------------------------------------

def test_symbolic_temperature(kernel_path):
    def fn(s, t, y, T):
        return F.kl_div(_ls(s / T), _p(t / T), reduction="batchmean") * T ** 2

    oracle(fn, expect=None, dynamic=True, extra=(2.0,))


def test_zero_rows_batchmean(kernel_path):
    def fn(s, t, y):
        return F.kl_div(_ls(s), _p(t), reduction="batchmean")

    oracle(fn, expect=None, s_rows=0)


# -- 9. equal spellings ---------------------------------------------------------------------------

def test_mixture_stacked_along_negative_dim(kernel_path):
    def fn(s, t, y):
        ls, lt = _ls(s), _ls(t)
        m = torch.logsumexp(torch.stack([ls + math.log(0.7), lt + math.log(0.3)], dim=-3), dim=-3)
        return (0.3 * F.kl_div(m, lt, reduction="none", log_target=True)
                + 0.7 * F.kl_div(m, ls, reduction="none", log_target=True)).sum(-1).mean()

    oracle(fn, expect="loss")


def test_scale_written_two_ways(kernel_path):
    def fn(s, t, y):
        ls = _ls(s / 2)
        ps = _p(s * 0.5)
        lt = _ls(t / 2)
        return (ps * (ls - lt)).sum(-1).mean()

    oracle(fn, expect="loss")


@pytest.mark.parametrize("form", ["sum_T3", "cast_after_scale_view"])
def test_bf16_student_cast_more(kernel_path, form):
    def fn(s, t, y):
        if form == "sum_T3":
            return F.kl_div(_ls(s.float() / 3), _p(t.float() / 3), reduction="sum") * 9 / 5
        sf = s.view(2, N // 2, V).float()
        return (0.3 * F.kl_div(_ls(sf), _p(t.view(2, N // 2, V).float()), reduction="none")
                .sum(-1)).mean()

    oracle(fn, expect=None, head=True, dtype=torch.bfloat16)


def test_student_logits_also_returned(kernel_path):
    def fn(s, t, y):
        loss = F.kl_div(_ls(s), _p(t), reduction="batchmean")
        return loss + 0 * s.sum()

    oracle(fn, expect=None, head=True)


def test_batchmean_over_a_symbolic_batch(kernel_path):
    # the op reads the batch size at run time (kd_n), not 1 / N baked in for the first batch
    # size (tests/patterns/test_distillation_exact_22.py runs two sizes through one graph)
    def fn(s, t, y):
        return F.kl_div(_ls(s), _p(t), reduction="batchmean")

    oracle(fn, expect="loss", dynamic=True)


# -- the independent symbolic check ----------------------------------------------------------------

def _traced(fn, *args):
    gm = torch.fx.symbolic_trace(fn)
    env = dict(zip([n for n in gm.graph.nodes if n.op == "placeholder"], args))

    class Record(torch.fx.Interpreter):
        def run_node(self, n):
            out = env[n] if n in env else super().run_node(n)
            n.meta["example_value"] = out
            return out

    Record(gm).run(*args)
    return gm.graph


@pytest.mark.parametrize("c6,ok", [(0.5 / N, True), (1.0 / N, False), (0.5, False)])
def test_symbolic_check_catches_a_dropped_factor(c6, ok):
    from ligerfx.patterns import _distill_proof as proof
    from ligerfx.patterns.distillation import _const

    def fn(s, t):
        return torch.abs((F.softmax(s, -1) - F.softmax(t, -1)) * 0.5).sum(-1).mean()

    g = _traced(fn, torch.randn(N, V), torch.randn(N, V))
    sm = [n for n in g.nodes if n.target is F.softmax]
    leaves = {sm[0]: ("p", "s"), sm[1]: ("p", "t")}
    root = [n for n in g.nodes if n.op == "output"][0].args[0]
    why = proof.check(root, leaves, [0.0] * 6 + [c6], (0.0, 0.0), 0.0, _const, None, None)
    assert (why is None) == ok, why


def test_symbolic_check_mixture_and_kl_div():
    from ligerfx.patterns import _distill_proof as proof
    from ligerfx.patterns.distillation import _const

    def fn(s, t):
        ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
        m = torch.logsumexp(torch.stack([ls + math.log(0.7), lt + math.log(0.3)]), 0)
        return (0.3 * F.kl_div(m, lt, reduction="none", log_target=True)
                + 0.7 * F.kl_div(m, F.softmax(s, -1), reduction="none")).sum(-1).sum()

    g = _traced(fn, torch.randn(N, V), torch.randn(N, V))
    leaves = {n: ("l" if n.target is F.log_softmax else "p", "s" if i != 1 else "t")
              for i, n in enumerate(n for n in g.nodes if n.target in (F.log_softmax, F.softmax))}
    root = [n for n in g.nodes if n.op == "output"][0].args[0]
    mix = (math.log(0.7), math.log(0.3))
    good = [0.7, 0.0, -0.7, 0.0, 0.3, -0.3, 0.0]
    assert proof.check(root, leaves, good, mix, 0.0, _const, None, None) is None
    bad = [0.7, 0.0, -0.7, 0.0, 0.3, -0.2, 0.0]
    assert "differ" in proof.check(root, leaves, bad, mix, 0.0, _const, None, None)


@pytest.mark.parametrize("form", ["kl_div", "log_softmax_of_teacher"])
def test_conventions_over_several_blocks_and_chunks(kernel_path, monkeypatch, form):
    from ligerfx.kernels import distillation as dk

    monkeypatch.setattr(dk, "DISTILL_BLOCK_V", 16)
    monkeypatch.setattr(dk, "DISTILL_CHUNK_ROWS", 4)

    def fn(s, t, y):
        if form == "kl_div":
            return F.kl_div(_ls(s), _p(t), reduction="batchmean")
        pt = _p(t)
        return (pt * (torch.log(pt) - _ls(s))).sum(-1).sum()

    oracle(fn, expect="loss", mask_t=MASK if form == "kl_div" else None,
           t_scale=2.0 if form == "kl_div" else 60.0)


def test_per_class_mean_under_dynamic_shapes(kernel_path):
    def fn(s, t, y):
        ls, lt = _ls(s), _ls(t)
        return (lt.exp() * (lt - ls)).mean(-1).sum()

    oracle(fn, expect=None, dynamic=True)


# ==================================================================================================
# Round three (the differential generator's later findings): no-gradient graphs (inference,
# torch.no_grad(), or the oracle's forward-only run where eager's backward raises) and divisions
# by zero.  Before: with no logits needing a gradient no anchor stood for the student, so a loss
# with a write between its uses was neither rewritten nor reported; `d.sum() / s.shape[0]` over
# an empty batch raised ZeroDivisionError inside the backend.
# ==================================================================================================

def _no_grad_run(fn, *, head=False, dtype=torch.float32, seed=0, **inp):
    """fn in float64, in dtype and compiled in dtype, all under torch.no_grad(); returns the
    problems (oracle rule), the matched patterns and the near-miss reasons."""
    torch.manual_seed(seed)
    model = _M(fn, head)
    x, t, y = _inputs(seed, head=head, **inp)
    outs, reports = {}, []
    for name, dt in (("ref", torch.float64), ("low", dtype), ("got", dtype)):
        m = copy.deepcopy(model).to(dt)
        if name == "got":
            torch._dynamo.reset()
            m = torch.compile(m, backend="liger", options={"inner": "aot_eager", "log_report": False})
        with torch.no_grad(), collect_reports(reports if name == "got" else []):
            outs[name] = m(x.to(dt), t.to(dt), y)
    problem = compare("loss", outs["got"], outs["low"], outs["ref"], dtype)
    matches = [m.pattern for r in reports for m in r.matches if m.pattern in PATTERNS]
    misses = [n.reason for r in reports for n in r.near_misses if n.pattern in PATTERNS]
    return problem, matches, misses


def _jsd_write_through_transpose(s, t, y):
    ls, lt = _ls(s), _ls(t)
    m = torch.logsumexp(torch.stack([ls + math.log(0.5), lt + math.log(0.5)]), 0)
    ls.transpose(0, -1).sub_(0.125)  # eager's backward raises; its forward reads the new ls
    return (0.5 * F.kl_div(m, lt, reduction="none", log_target=True)
            + 0.5 * F.kl_div(m, ls, reduction="none", log_target=True)).sum(-1).mean()


def _softmax_then_log_write(s, t, y):
    ls = _ls(s)
    pt = F.softmax(t, -1)
    lt = pt.log()
    pt.mul_(2.0)
    return (pt * (lt - ls)).sum(-1).mean()


@pytest.mark.parametrize("fn,written", [(_jsd_write_through_transpose, "sub_"),
                                        (_softmax_then_log_write, "mul_")])
def test_write_between_uses_without_grad_is_reported(kernel_path, fn, written):
    problem, matches, misses = _no_grad_run(fn)
    assert not problem, problem
    assert not matches, (matches, misses)
    assert any(f"`{written}`" in r and "writes" in r for r in misses), misses


@pytest.mark.parametrize("div", ["forward", "jsd", "tvd"])
@pytest.mark.parametrize("head", [False, True])
def test_no_grad_loss_is_rewritten_and_equal(kernel_path, div, head):
    def fn(s, t, y):
        ls, lt = _ls(s / 2.0), _ls(t / 2.0)
        if div == "forward":
            return F.kl_div(ls, lt, reduction="batchmean", log_target=True) * 4.0
        if div == "tvd":
            return 0.5 * (ls.exp() - lt.exp()).abs().sum(-1).mean()
        m = torch.logsumexp(torch.stack([ls + math.log(0.9), lt + math.log(0.1)]), 0)
        return (0.1 * F.kl_div(m, lt, reduction="none", log_target=True)
                + 0.9 * F.kl_div(m, ls, reduction="none", log_target=True)).sum(-1).mean()

    problem, matches, misses = _no_grad_run(fn, head=head, mask_t=MASK)
    assert not problem, problem
    want = "fused_linear_distillation" if head else "distillation_loss"
    assert want in matches, (matches, misses)


def test_divide_by_an_empty_batch_size(kernel_path):
    # `d.sum() / s.shape[0]` with zero rows: eager's 0 / 0 = nan; the backend must not raise
    def fn(s, t, y):
        d = F.kl_div(_ls(s.float() / 2.0), _ls(t.float() / 2.0), reduction="none",
                     log_target=True)
        return d.sum() / s.shape[0] * 4.0 + s.float().mean()

    oracle(fn, expect=None, head=True, dtype=torch.float16, s_rows=0)


def test_no_grad_masked_rows_and_cross_entropy(kernel_path):
    # the teacher's softmax (first in the graph) may stand for the student: either way eager's value
    def fn(s, t, y):
        d = F.kl_div(_ls(s / 2.0), _p(t / 2.0), reduction="none")
        keep = (y != -100).float()
        kd = (d.sum(-1) * keep).sum() / keep.sum()
        return 0.7 * kd * 4.0 + 0.3 * F.cross_entropy(s, y)

    problem, matches, misses = _no_grad_run(fn, mask_t=MASK)
    assert not problem, problem
    assert matches or misses, "neither rewritten nor a near miss"


# Guards for holes the generator reported earlier (-inf columns under F.kl_div, overflow with
# inputs x1000) that the previous round's fixes already close; kept so they stay closed.

def _jsd1(s, t, y):
    return F.kl_div(_ls(t.float() / 2.0), _ls(s.float() / 2.0), reduction="batchmean",
                    log_target=True)


def _fkl_rows(s, t, y):
    d = F.kl_div(_ls(s.float()), _p(t.float()), reduction="none")
    keep = (y != -100).float()
    return (d.sum(-1) * keep).sum() / keep.sum()


def _jsd_half(s, t, y):
    ls, lt = _ls(s.float() / 0.5), _ls(t.float() / 0.5)
    m = torch.logsumexp(torch.stack([ls + math.log(0.5), lt + math.log(0.5)]), 0)
    return (0.5 * F.kl_div(m, lt, reduction="none", log_target=True)
            + 0.5 * F.kl_div(m, ls, reduction="none", log_target=True)).sum(-1).mean()


@pytest.mark.parametrize("fn,kw", [
    (_jsd1, dict(mask_t=MASK, dtype=torch.bfloat16)),
    (_fkl_rows, dict(mask_s=MASK)),
    (_jsd_half, dict(s_scale=1000.0, t_scale=1000.0, dtype=torch.float16)),
], ids=["jsd1_teacher_inf_bf16", "kl_div_student_inf", "jsd_x1000_fp16"])
def test_earlier_nonfinite_findings_stay_closed(kernel_path, fn, kw):
    oracle(fn, expect="loss", **kw)


def test_empty_batch_sum_divided_by_rows_fused(kernel_path):
    # the division by s.shape[0] = 0 stays in the graph (refused), so the fused op's upstream
    # gradient is inf: eager's weight / bias gradients over no rows are 0, not 0 * inf = nan
    def fn(h, t, head):
        s = head(h)
        d = F.kl_div(_ls(s.float()), _ls(t.float()), reduction="none", log_target=True)
        return d.sum() / s.shape[0]

    torch.manual_seed(0)
    head = nn.Linear(H, V, bias=True)
    h0 = torch.randn(0, 3, H, dtype=torch.float64)
    t0 = torch.randn(0, 3, V, dtype=torch.float64)
    outs, reports = {}, []
    for name, dt in (("ref", torch.float64), ("low", torch.float16), ("got", torch.float16)):
        m = copy.deepcopy(head).to(dt)
        f = fn
        if name == "got":
            torch._dynamo.reset()
            f = torch.compile(fn, backend="liger", options={"inner": "aot_eager", "log_report": False})
        with collect_reports(reports if name == "got" else []):
            loss = f(h0.to(dt), t0.to(dt), m)
        outs[name] = [loss.detach(), *torch.autograd.grad(loss, list(m.parameters()))]
    for i, (a, b, c) in enumerate(zip(outs["got"], outs["low"], outs["ref"])):
        assert not compare(f"value {i}", a, b, c, torch.float16)
    assert any(m.pattern in PATTERNS for r in reports for m in r.matches) or any(
        n.pattern in PATTERNS for r in reports for n in r.near_misses)
