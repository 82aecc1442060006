"""liger::cross_entropy's backward under an inf / nan upstream gradient follows eager's
convention: an ignored row stays 0 whatever its upstream gradient (nll_loss's backward writes 0
there), the label gets NaN (eager's p * inf - inf), and with label smoothing the whole row is NaN;
elsewhere the product of the stored gradient and the upstream one (issue 22, logprob seed 95)."""

import pytest
import torch
import torch.nn.functional as F

INF, NAN = float("inf"), float("nan")


def _nonfinite_equal(a, b):
    for f in (torch.isnan, torch.isposinf, torch.isneginf):
        if not torch.equal(f(a), f(b)):
            return False
    fin = torch.isfinite(b)
    return torch.allclose(a[fin], b[fin], rtol=1e-5, atol=1e-6)


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
    loss = torch.ops.liger.cross_entropy(z, t, None, -100, reduction, smoothing, 0.0, 0.0, 1.0,
                                         True)[0]
    ours = torch.autograd.grad(loss, z, cot)[0]
    assert (~torch.isfinite(eager)).any()  # the case reaches the convention
    assert _nonfinite_equal(ours, eager), (ours, eager)
