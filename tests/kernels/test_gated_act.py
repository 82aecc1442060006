"""Tests for liger::gated_act / liger::gated_act_backward against float64 eager references."""

import pytest
import torch
import torch.nn.functional as F

from ligerfx.kernels import gated_act as ga
from ligerfx.kernels.gated_act import gated_act, geglu, swiglu

ACTS = ["silu", "gelu", "gelu_tanh"]

# numpy (the Triton interpreter) warns when exp overflows to inf in the saturated tails; the
# kernels rely on that inf (1 / (1 + inf) = 0), as they do on GPU.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def ref_act(g, activation):
    if activation == "silu":
        return F.silu(g)
    return F.gelu(g, approximate="tanh" if activation == "gelu_tanh" else "none")


def check(gate, up, activation, tol):
    gate = gate.detach().requires_grad_()
    up = up.detach().requires_grad_()
    y = gated_act(gate, up, activation)
    assert y.shape == gate.shape and y.dtype == gate.dtype
    dy = torch.randn_like(y)
    dg, du = torch.autograd.grad(y, (gate, up), dy)

    g64 = gate.detach().double().requires_grad_()
    u64 = up.detach().double().requires_grad_()
    want = ref_act(g64, activation) * u64
    wdg, wdu = torch.autograd.grad(want, (g64, u64), dy.double())
    for got, w in ((y, want), (dg, wdg), (du, wdu)):
        torch.testing.assert_close(got.double(), w.detach(), **tol)


FP32 = dict(atol=1e-5, rtol=1e-5)
BF16 = dict(atol=2e-2, rtol=2e-2)
SHAPES = [(1, 7), (3, 5, 96), (4, 1000), (2, 2500)]  # 2500 spans two column blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("activation", ACTS)
def test_gated_act(kernel_path, activation, shape, dtype):
    gate, up = torch.randn(shape, dtype=dtype) * 3, torch.randn(shape, dtype=dtype)
    check(gate, up, activation, FP32 if dtype == torch.float32 else BF16)


@pytest.mark.parametrize("activation", ACTS)
def test_fused_projection_view(kernel_path, activation):
    # gate/up as the halves of one fused projection: row stride 2 * width.
    b, t, n = 2, 5, 80
    proj = torch.randn(b, t, 2 * n, requires_grad=True)
    gate, up = proj.chunk(2, dim=-1)
    assert gate.stride() == (t * 2 * n, 2 * n, 1)
    y = gated_act(gate, up, activation)
    dy = torch.randn_like(y)
    (dproj,) = torch.autograd.grad(y, proj, dy)

    p64 = proj.detach().double().requires_grad_()
    g64, u64 = p64.chunk(2, dim=-1)
    want = ref_act(g64, activation) * u64
    (wdproj,) = torch.autograd.grad(want, p64, dy.double())
    torch.testing.assert_close(y.double(), want.detach(), **FP32)
    torch.testing.assert_close(dproj.double(), wdproj, **FP32)


def test_transposed_inputs(kernel_path):
    # Last dim not contiguous: the op must still be right (it copies these).
    gate, up = torch.randn(64, 3).t(), torch.randn(64, 3).t()
    check(gate, up, "silu", FP32)


@pytest.mark.parametrize("activation", ACTS)
def test_bf16_matches_eager_rounding(kernel_path, activation):
    # Eager bf16 rounds act(gate) to bf16, then rounds the product; we mirror both roundings.
    # A single rounding of act(g) * u matches only ~72% of these elements, so the test discriminates.
    # (Inputs stay in randn's range: far in the negative tail fp32 erf-gelu loses digits by
    # cancellation in eager and here alike, in different places.)
    gate = torch.randn(8, 300, dtype=torch.bfloat16, requires_grad=True)
    up = torch.randn(8, 300, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(8, 300, dtype=torch.bfloat16)
    got = gated_act(gate, up, activation)
    eager = ref_act(gate, activation) * up
    exact = (ref_act(gate.double(), activation).bfloat16().double() * up.double()).bfloat16()
    assert (got == exact).float().mean() >= 0.99
    assert (got == eager).float().mean() >= 0.99
    # d(up) = dy * act(gate) uses the same rounded act(gate) as eager's saved activation.
    (dup,) = torch.autograd.grad(got, up, dy)
    (eager_dup,) = torch.autograd.grad(eager, up, dy)
    assert (dup == eager_dup).float().mean() >= 0.99


@pytest.mark.parametrize("activation", ACTS)
def test_extreme_inputs_finite(kernel_path, activation):
    gate = torch.tensor([[-200.0, -30.0, -5.0, 0.0, 5.0, 30.0, 200.0]])
    up = torch.ones_like(gate)
    check(gate, up, activation, FP32)


def test_wrappers(kernel_path):
    gate, up = torch.randn(3, 40), torch.randn(3, 40)
    torch.testing.assert_close(swiglu(gate, up), F.silu(gate) * up)
    torch.testing.assert_close(geglu(gate, up), F.gelu(gate) * up)
    torch.testing.assert_close(geglu(gate, up, "tanh"), F.gelu(gate, approximate="tanh") * up)
    with pytest.raises(ValueError):
        geglu(gate, up, "erf")


def test_bad_inputs_raise():
    gate = torch.randn(3, 8)
    with pytest.raises(ValueError, match="activation"):
        gated_act(gate, gate, "relu")
    with pytest.raises(RuntimeError):
        gated_act(gate, torch.randn(3, 9), "silu")


def test_float64_uses_torch_path():
    gate, up = torch.randn(4, 33, dtype=torch.float64), torch.randn(4, 33, dtype=torch.float64)
    check(gate, up, "gelu", dict(atol=1e-12, rtol=1e-12))


@pytest.mark.parametrize("activation", ACTS)
def test_launchers_write_every_element(triton_path, activation):
    # NaN-filled outputs: any element the kernels skip stays NaN.  n=2100 leaves a ragged last block.
    proj = torch.randn(3, 2 * 2100)
    gate, up = proj.chunk(2, dim=-1)
    y = torch.full((3, 2100), float("nan"))
    ga.launch_forward(gate, up, y, activation)
    torch.testing.assert_close(y, ga.gated_act_reference(gate, up, activation), **FP32)
    dy = torch.randn(3, 2100)
    dg, du = torch.full_like(y, float("nan")), torch.full_like(y, float("nan"))
    ga.launch_backward(dy, gate, up, dg, du, activation)
    wdg, wdu = ga.gated_act_backward_reference(dy, gate, up, activation)
    torch.testing.assert_close(dg, wdg, **FP32)
    torch.testing.assert_close(du, wdu, **FP32)


def test_aot_eager_dynamic():
    def fn(proj):
        gate, up = proj.chunk(2, dim=-1)
        return (swiglu(gate, up) ** 2).sum()

    cfn = torch.compile(fn, backend="aot_eager", dynamic=True, fullgraph=True)
    for rows in (3, 5):
        proj = torch.randn(rows, 2 * 48, requires_grad=True)
        got = torch.autograd.grad(cfn(proj), proj)[0]
        want = torch.autograd.grad(fn(proj), proj)[0]
        torch.testing.assert_close(got, want, **FP32)


@pytest.mark.parametrize("activation", ACTS)
def test_opcheck(activation):
    gate = torch.randn(2, 3, 40, requires_grad=True)
    up = torch.randn(2, 3, 40, requires_grad=True)
    torch.library.opcheck(torch.ops.liger.gated_act.default, (gate, up, activation))
    torch.library.opcheck(torch.ops.liger.gated_act_backward.default,
                          (torch.randn(2, 3, 40), gate.detach(), up.detach(), activation))
