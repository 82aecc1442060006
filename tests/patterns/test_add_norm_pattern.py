"""add_rms_norm / add_layer_norm on model code: what is fused, what is refused and why, numerics.

Counts on the Hugging Face and hand-written zoo are in test_norm_patterns.py (its NORMS include the
add forms); here: each norm spelling after an add, h read elsewhere or only by the norm, the bf16
add's rounding, aliasing, views and writes, and the adds the op must not take.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ligerfx
from tests.compare import compare_training_step

D = 48
EPS = 1e-6
ADD_NORMS = ("add_rms_norm", "add_layer_norm")
OPTS = {"patterns": ["rms_norm", "layer_norm", *ADD_NORMS]}


def _hf_rms(h, w):  # Hugging Face Llama's spelling
    hf = h.to(torch.float32)
    hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + EPS)
    return w * hf.to(h.dtype)


NORMS = {
    "llama": lambda m, h: _hf_rms(h, m.w),
    "gemma_offset": lambda m, h: (h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + EPS)
                                  * (1.0 + m.w.float())).type_as(h),
    "no_weight": lambda m, h: h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS),
    "f_rms_norm": lambda m, h: F.rms_norm(h, (D,), m.w, EPS),
    "nn_layer_norm": lambda m, h: m.ln(h),
    "handwritten_ln": lambda m, h: ((h - h.mean(-1, keepdim=True))
                                    * torch.rsqrt(h.var(-1, keepdim=True, unbiased=False) + 1e-5)
                                    * m.w + m.b),
}


class Block(nn.Module):
    """Two pre-norm sublayers: h = x + f(norm(x)), the second norm after a residual add."""

    def __init__(self, norm, dtype=torch.float32, reuse_h=True):
        super().__init__()
        self.norm, self.reuse_h = NORMS[norm], reuse_h
        self.w = nn.Parameter(torch.randn(D) * 0.5 + 1)
        self.b = nn.Parameter(torch.randn(D))
        self.ln = nn.LayerNorm(D)
        self.f = nn.Linear(D, D)
        self.to(dtype)

    def forward(self, x, r):
        h = x + r
        y = self.norm(self, h)
        out = self.f(y)
        return out + h if self.reuse_h else out


def _inputs(dtype=torch.float32, shape=(2, 5, D)):
    return (torch.randn(shape, dtype=dtype, requires_grad=True),
            (torch.randn(shape) * 2).to(dtype).requires_grad_())


def _explain(model, *args, **options):
    return ligerfx.explain(model, *args, options={**OPTS, **options})


def _adds(report):
    return sum(report.counts.get(k, 0) for k in ADD_NORMS)


def _step(model, args, **options):
    """Eager-equal training step, including the inputs' gradients (x and residual)."""
    report = compare_training_step(model, args, options={**OPTS, **options})
    return report


def _input_grads_match(model, args, rtol=1e-4):
    eager = [a.detach().clone().requires_grad_() for a in args]
    mine = [a.detach().clone().requires_grad_() for a in args]
    model(*eager).float().square().mean().backward()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="liger", options={"inner": "aot_eager", **OPTS})
    compiled(*mine).float().square().mean().backward()
    for a, b in zip(eager, mine):
        if a.grad is None:  # an input the model does not read
            assert b.grad is None
            continue
        err = ((a.grad.double() - b.grad.double()).norm() / a.grad.double().norm()).item()
        assert err < rtol, err


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("reuse_h", [True, False], ids=["h_reused", "h_only_normed"])
def test_every_norm_spelling_after_an_add(norm, reuse_h, kernel_path):
    model, args = Block(norm, reuse_h=reuse_h), _inputs()
    report = _step(model, args)
    name = "add_layer_norm" if norm.endswith(("_ln", "layer_norm")) else "add_rms_norm"
    assert report.counts.get(name) == 1, (report.counts, [str(m) for m in report.near_misses])
    (rec,) = [m for m in report.matches if m.pattern == name]
    assert ("h also returned" if reuse_h else "h read only by the norm") in rec.detail
    _input_grads_match(model, args)


def test_bf16_add_rounds_before_the_norm(kernel_path):
    """The bf16 add rounds h to bf16 before the norm upcasts it (an fp32 sum would differ):
    h and y are eager's bit for bit, the gradients of x and residual (equal) close."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter((torch.randn(D) * 0.5 + 1).bfloat16())

        def forward(self, x, r):
            h = x + r
            return _hf_rms(h, self.w), h

    m = M()
    x, r = _inputs(torch.bfloat16)
    torch._dynamo.reset()
    c = torch.compile(m, backend="liger", options={"inner": "aot_eager", **OPTS})
    y, h = c(x, r)
    assert ligerfx.backend.last_report.counts.get("add_rms_norm") == 1
    y_ref, h_ref = m(x, r)
    assert torch.equal(h, h_ref) and torch.equal(y, y_ref)
    assert not torch.equal(h_ref.float(), x.float() + r.float())  # the rounding is really there
    dy, dh = torch.randn_like(y), torch.randn_like(h)
    gx, gr = torch.autograd.grad((y, h), (x, r), (dy, dh))
    ex, er = torch.autograd.grad((y_ref, h_ref), (x, r), (dy, dh))
    assert torch.equal(gx, gr)
    # within two ulps of the summands (the norm's gradient and dh; where they cancel, the one-ulp
    # differences of the norm's backward, as with the plain rms_norm op, stay that size)
    scale = dh.float().abs() + (ex.float() - dh.float()).abs()
    ulp = torch.finfo(torch.bfloat16).eps * scale.clamp_min(1e-3)
    assert ((gx.float() - ex.float()).abs() <= 2 * ulp).all()


def test_residual_aliasing_and_views(kernel_path):
    """x + x, a slice of a wider tensor, a transposed pair (h keeps eager's strides)."""

    class M(nn.Module):
        def __init__(self, form):
            super().__init__()
            self.form, self.w = form, nn.Parameter(torch.randn(D))

        def forward(self, x, r):
            if self.form == "same":
                h = x + x
            elif self.form == "slice":
                h = x[..., :D] + r[..., 1:D + 1]
            else:
                h = x.transpose(0, 1) + r.transpose(0, 1)
            y = _hf_rms(h, self.w)
            if self.form == "t":  # a view only eager's (transposed) strides of h allow
                return y.sum() + h.transpose(0, 1).view(-1, D).square().sum()
            return y + h * 2

    for form, shape in (("same", (3, 4, D)), ("slice", (3, 4, D + 2)), ("t", (3, 4, D))):
        model = M(form)
        report = _step(model, _inputs(shape=shape))
        assert report.counts.get("add_rms_norm") == 1, (form, report.counts)
        _input_grads_match(model, _inputs(shape=shape))


def test_writes_around_the_add(kernel_path):
    """A write to the residual after the add: eager-equal whatever is decided (the op reads the
    inputs before the write, or the match is refused naming the writer)."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(D))

        def forward(self, x, r):
            r = r * 1.5
            h = x + r
            r.mul_(2)
            return _hf_rms(h, self.w) + h + r

    report = _step(M(), _inputs())
    if not report.counts.get("add_rms_norm"):
        assert any("mul_" in m.reason for m in report.near_misses if m.pattern == "add_rms_norm")


class Lookalike(nn.Module):
    def __init__(self, form):
        super().__init__()
        self.form = form
        self.w = nn.Parameter(torch.randn(D))
        self.bias = nn.Parameter(torch.randn(D))

    def forward(self, x, r):
        if self.form == "broadcast":
            h = x + self.bias
        elif self.form == "promote":
            h = x + r.float()
        elif self.form == "alpha":
            h = torch.add(x, r, alpha=0.5)
        elif self.form == "inplace":
            h = x * 1.5
            h.add_(r)
        return _hf_rms(h, self.w) * h.sum()


LOOKALIKES = {"broadcast": "broadcasts", "promote": "promotes", "alpha": "alpha=0.5",
              "inplace": "in place"}


@pytest.mark.parametrize("form", list(LOOKALIKES))
def test_adds_the_op_does_not_take_are_near_misses(form):
    """Broadcasting, type promotion, alpha=, in place: a near miss naming it; the norm alone is
    still rewritten, and the step stays eager-equal."""
    dt = torch.bfloat16 if form == "promote" else torch.float32
    model = Lookalike(form).to(torch.float32)
    args = _inputs(dt)
    report = _explain(model, *args)
    assert _adds(report) == 0
    reasons = [m.reason for m in report.near_misses if m.pattern == "add_rms_norm"]
    assert any(LOOKALIKES[form] in r for r in reasons), [str(m) for m in report.near_misses]
    if form != "inplace":  # (in place: the write to h inside the norm's reads refuses it too)
        assert report.counts.get("rms_norm") == 1
    compare_training_step(model, args, options=OPTS)


def test_not_a_residual_add_is_not_reported():
    """`h + eps` or a norm of a placeholder: nothing to fuse, no near miss from the add forms;
    a norm the plain pattern refuses is reported once, by it."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(D))

        def forward(self, x, r):
            a = _hf_rms(x + 1.0, self.w)
            b = _hf_rms(x, self.w)
            h = (x + r).half()  # lossy: the plain pattern reads the rounded value, no add
            c = _hf_rms(h.float(), self.w)
            return a + b + c

    report = _explain(M(), *_inputs())
    assert report.counts.get("rms_norm") == 3 and _adds(report) == 0
    assert not [m for m in report.near_misses if m.pattern in ADD_NORMS]


def test_exclude_add_forms_gives_the_plain_norms():
    model, args = Block("llama"), _inputs()
    report = ligerfx.explain(model, *args, options={"exclude": list(ADD_NORMS)})
    assert report.counts.get("rms_norm") == 1 and _adds(report) == 0
