"""`torch.no_grad()` blocks inside a match (ligerfx/graph/grad_mode.py): the part that ran with autograd
off reads detached inputs in the fused op, or the rewrite is refused with the reason."""

import torch
import torch.nn.functional as F

import ligerfx
import ligerfx.backend
from tests.compare import rel_err

T = 2.0


def kd_teacher_under_no_grad(h, ws, ht, wt):
    s = F.linear(h, ws)
    with torch.no_grad():  # the teacher's head: a constant to the student's loss
        t = F.linear(ht, wt)
    return F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T**2


def test_teacher_head_under_no_grad_is_fused_and_gets_no_gradient():
    torch.manual_seed(0)
    h, ws = torch.randn(24, 16, requires_grad=True), torch.randn(40, 16, requires_grad=True)
    # the teacher's weight requires grad (an unfrozen teacher): eager gives it none
    ht, wt = torch.randn(24, 16), torch.randn(40, 16, requires_grad=True)
    f = torch.compile(kd_teacher_under_no_grad, backend="liger", options={"log_report": False})
    got = f(h, ws, ht, wt)
    assert ligerfx.backend.last_report.counts.get("fused_linear_distillation") == 1, \
        ligerfx.backend.last_report
    got.backward()
    g = (h.grad.clone(), ws.grad.clone())
    assert wt.grad is None
    h.grad = ws.grad = None
    d = [x.double().detach().requires_grad_(x.requires_grad) for x in (h, ws, ht, wt)]
    exp = kd_teacher_under_no_grad(*d)
    exp.backward()
    assert torch.allclose(got.double(), exp, rtol=1e-5)
    assert torch.allclose(g[0].double(), d[0].grad, rtol=1e-4, atol=1e-7)
    assert torch.allclose(g[1].double(), d[1].grad, rtol=1e-4, atol=1e-7)
    assert d[3].grad is None


def student_read_in_and_out_of_no_grad(h, ws, ht, wt):
    s = F.linear(h, ws)
    with torch.no_grad():
        t = F.linear(ht, wt) + s  # the student's logits leak into the "teacher" as a constant
    return F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean")


def test_value_with_grad_read_inside_no_grad_is_not_fused_through():
    torch.manual_seed(0)
    args = (torch.randn(8, 16, requires_grad=True), torch.randn(40, 16, requires_grad=True),
            torch.randn(8, 16), torch.randn(40, 16))
    report = ligerfx.explain(student_read_in_and_out_of_no_grad, *args)
    assert not report.counts.get("fused_linear_distillation"), report
    f = torch.compile(student_read_in_and_out_of_no_grad, backend="liger", options={"log_report": False})
    got = f(*args)
    got.backward()
    g = args[0].grad.clone()
    args[0].grad = None
    exp = student_read_in_and_out_of_no_grad(*args)
    exp.backward()
    assert torch.allclose(got, exp, rtol=1e-5) and torch.allclose(g, args[0].grad, rtol=1e-4, atol=1e-7)


def norm_under_no_grad_then_device_cast(x, w_in, w_out):
    h = F.linear(x, w_in)
    with torch.no_grad():  # HRM's early inner cycles: the stack (and its final norm) without grad
        f = h.float()
        n = (f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + 1e-6)).type_as(h)
    # autograd is on again for the device `.to`, which the norm absorbs as a trailing cast: it
    # reads only a value that requires no grad, so either mode computes it the same
    return F.linear(n.to(h.device) + h, w_out)


def test_trailing_cast_after_no_grad_ends_is_not_a_mode_change():
    torch.manual_seed(0)
    args = (torch.randn(6, 16, requires_grad=True), torch.randn(32, 16, requires_grad=True),
            torch.randn(8, 32, requires_grad=True))
    f = torch.compile(norm_under_no_grad_then_device_cast, backend="liger",
                      options={"log_report": False})
    got = f(*args)
    report = ligerfx.backend.last_report
    assert report.counts.get("rms_norm") == 1 and not report.near_misses, report
    got.square().sum().backward()
    grads = [a.grad.clone() for a in args]
    d = [a.detach().double().requires_grad_() for a in args]
    exp = norm_under_no_grad_then_device_cast(*d)
    exp.square().sum().backward()
    assert torch.allclose(got.double(), exp, rtol=1e-5, atol=1e-6)
    # against float64, no further than eager's own float32 (an elementwise rtol of 1e-4 is tighter
    # than eager's rounding on some CPUs' GEMMs: it failed on a near-zero element of w_in's grad)
    e = [a.detach().clone().requires_grad_() for a in args]
    norm_under_no_grad_then_device_cast(*e).square().sum().backward()
    for g, a, ref in zip(grads, d, e):
        assert rel_err(g.double(), a.grad) <= max(2 * rel_err(ref.grad.double(), a.grad), 1e-6)
