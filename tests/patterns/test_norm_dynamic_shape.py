"""Issue 22: under `dynamic=True`, `F.rms_norm(x, (x.shape[-1],))` and `F.layer_norm` name their
normalized shape by a symbolic size.  It is the last dim alone, so they are rewritten (exact,
forward and backward, on two shapes of one compiled graph), and a normalized shape that is not
(the last two dims) is refused with a reason that shows sizes, not graph internals."""

import pytest
import torch
import torch.nn.functional as F

import ligerfx


class Norm(torch.nn.Module):
    def __init__(self, kind, dims=1):
        super().__init__()
        self.kind, self.dims = kind, dims
        self.w = torch.nn.Parameter(torch.randn(16) * 0.2 + 1)
        self.b = torch.nn.Parameter(torch.randn(16) * 0.1)

    def forward(self, x):
        shape = tuple(x.shape[-self.dims:])
        if self.kind == "rms":
            w = self.w if self.dims == 1 else None
            return F.rms_norm(x, shape, w, 1e-6) * 1.5
        if self.dims == 1:
            return F.layer_norm(x, shape, self.w, self.b, 1e-5) * 1.5
        return F.layer_norm(x, shape, None, None, 1e-5) * 1.5


def _run(model, shapes, validate=False):
    options = {"inner": "aot_eager", "validate": "raise"} if validate else {"inner": "aot_eager"}
    compiled = torch.compile(model, backend="liger", dynamic=True, options=options)
    for shape in shapes:
        x = torch.randn(*shape, dtype=torch.float64).float().requires_grad_()
        x64 = x.detach().double().requires_grad_()
        got = compiled(x)
        want = torch.func.functional_call(
            model, {k: v.double() for k, v in model.named_parameters()}, (x64,))
        g = torch.randn_like(got)
        got.backward(g)
        want.backward(g.double())
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)
        assert torch.allclose(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
    return ligerfx.backend.last_report


@pytest.mark.parametrize("kind,pattern", [("rms", "rms_norm"), ("ln", "layer_norm")])
def test_symbolic_last_dim_is_rewritten_and_exact(kind, pattern, kernel_path):
    report = _run(Norm(kind), [(2, 5, 16), (3, 7, 16)], validate=kernel_path == "torch")
    assert report.counts.get(pattern) == 1, (report.counts, [str(m) for m in report.near_misses])


@pytest.mark.parametrize("kind,pattern", [("rms", "rms_norm"), ("ln", "layer_norm")])
def test_two_trailing_dims_are_refused_with_sizes_in_the_reason(kind, pattern):
    model = Norm(kind, dims=2)
    report = _run(model, [(2, 4, 16), (3, 5, 16)])
    assert not report.counts.get(pattern), report.counts
    reasons = [m.reason for m in report.near_misses if m.pattern == pattern]
    assert reasons and all("CNode" not in r for r in reasons), reasons
    assert any("not the last dim alone" in r for r in reasons), reasons
