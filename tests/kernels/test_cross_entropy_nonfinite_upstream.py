"""liger::cross_entropy's backward under an inf / nan upstream gradient follows eager's
convention: an ignored row stays 0 whatever its upstream gradient (nll_loss's backward writes 0
there), the label gets NaN (eager's p * inf - inf), and with label smoothing the whole row is NaN;
elsewhere the product of the stored gradient and the upstream one (issue 22, logprob seed 95)."""

import pytest
import torch
import torch.nn.functional as F

from ligerfx.compiler.validate import within_eager_rounding

INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("up", [INF, -INF, NAN])
def test_upstream_nonfinite(kernel_path, smoothing, reduction, up):
    g = torch.Generator().manual_seed(7)
    z = (torch.randn(6, 37, generator=g) * 3).requires_grad_()
    t = torch.randint(0, 37, (6,), generator=g)
    t[1] = -100
    with torch.no_grad():
        z[2, t[2]] = -1e4  # the label's probability underflows to 0
    cot = torch.randn(6, generator=g) if reduction == "none" else torch.tensor(up)
    if reduction == "none":
        cot[[0, 1, 2]] = up  # a labelled row, an ignored one, an underflowed label
    eager = torch.autograd.grad(F.cross_entropy(z, t, reduction=reduction,
                                                label_smoothing=smoothing), z, cot)[0]
    z64 = z.detach().double().requires_grad_()
    ref = torch.autograd.grad(F.cross_entropy(z64, t, reduction=reduction,
                                              label_smoothing=smoothing), z64, cot.double())[0]
    loss = torch.ops.liger.cross_entropy(z, t, None, -100, reduction, smoothing, 0.0, 0.0, 1.0,
                                         True)[0]
    ours = torch.autograd.grad(loss, z, cot)[0]
    assert (~torch.isfinite(eager)).any()  # the case reaches the convention
    problem = within_eager_rounding("grad", ours, eager, ref, torch.float32)  # non-finite first
    assert problem is None, problem
    fin = torch.isfinite(eager)
    torch.testing.assert_close(ours[fin], eager[fin], rtol=1e-5, atol=1e-6)
