"""Tests for kernels/gated_rms_norm.py: liger::gated_rms_norm forward/backward against a float64
reference with eager's roundings (straight-through gradients, as tests/kernels/test_rms_norm.py's
reference, which this one extends), and bit for bit against eager's Qwen3-Next expression."""

import pytest
import torch
import torch.nn.functional as F

from ligerfx.kernels import gated_rms_norm as grn
from ligerfx.kernels import rms_norm as rn
from tests.kernels import test_rms_norm as trn

SHAPES = [(1, 64), (7, 96), (3, 5, 80), (64, 257)]
# gate dtype: "x" = silu in x's dtype (`* F.silu(gate)`), fp32 = `* F.silu(gate.float())`
GATES = {"gate_x": "x", "gate_fp32": torch.float32}
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
EPS = trn.EPS


def make_inputs(shape, dtype, case, gate):
    x, w, offset, mode = trn.make_inputs(shape, dtype, case)
    g_dtype = dtype if GATES[gate] == "x" else GATES[gate]
    g = (torch.randn(shape) * 2).to(g_dtype).requires_grad_()
    return x, w, g, offset, mode


def dtypes_of(x, w, g, mode):
    """Eager's dtypes for `rms_norm(x) * F.silu(g)` then `.to(x.dtype)` (Qwen3-Next)."""
    norm = rn.default_out_dtype(x, w, mode)
    return norm, torch.promote_types(norm, g.dtype), x.dtype


def reference(xd, wd, gd, x, w, g, offset, mode, norm_dtype, prod_dtype, out_dtype):
    h, _ = trn.reference(xd, wd, x.dtype, w.dtype if w is not None else None, offset, mode, norm_dtype)
    a = trn._round(F.silu(gd), g.dtype)
    return trn._round(trn._round(h * a, prod_dtype), out_dtype)


def check_against_reference(x, w, g, offset, mode, tol):
    norm_dtype, prod_dtype, out_dtype = dtypes_of(x, w, g, mode)
    y, rstd = torch.ops.liger.gated_rms_norm(x, w, g, EPS, offset, mode, norm_dtype, prod_dtype, out_dtype)
    assert y.dtype == out_dtype and y.shape == x.shape and rstd.shape == x.shape[:-1]
    dy = torch.randn_like(y)
    inputs = [x, g] + ([w] if w is not None else [])
    grads = torch.autograd.grad(y, inputs, dy)
    xd, gd = x.detach().double().requires_grad_(), g.detach().double().requires_grad_()
    wd = w.detach().double().requires_grad_() if w is not None else None
    y_ref = reference(xd, wd, gd, x, w, g, offset, mode, norm_dtype, prod_dtype, out_dtype)
    ref_inputs = [xd, gd] + ([wd] if wd is not None else [])
    ref_grads = torch.autograd.grad(y_ref, ref_inputs, dy.double())
    trn.assert_close(y, y_ref.detach(), tol, "y")
    for name, got, want, t in zip(("dx", "dgate", "dweight"), grads, ref_grads, inputs):
        assert got.dtype == t.dtype and got.shape == t.shape
        trn.assert_close(got, want, tol, name)


# every weight case with each gate dtype, the shapes (odd widths, one row, 3-D) spread over them
COMBOS = [(case, gate, SHAPES[i % len(SHAPES)])
          for i, (case, gate) in enumerate((c, g) for c in trn.CASES for g in GATES)]


@pytest.mark.parametrize("case,gate,shape", COMBOS, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_reference(dtype, shape, case, gate, kernel_path):
    check_against_reference(*make_inputs(shape, dtype, case, gate), TOL[dtype])


@pytest.mark.parametrize("case", ["llama", "no_weight"])
def test_fp16(case, kernel_path):
    check_against_reference(*make_inputs((5, 96), torch.float16, case, "gate_fp32"), TOL[torch.float16])


def qwen3_next(x, weight, gate, eps=EPS):
    """transformers' Qwen3NextRMSNormGated.forward, written out (no transformers import)."""
    dt = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    h = weight * h.to(dt)
    h = h * F.silu(gate.to(torch.float32))
    return h.to(dt)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_qwen3_next_bit_equal(dtype, kernel_path):
    # every forward rounding is eager's; the gate gradient too (the norm's backward is the
    # rms_norm kernel's, compared above against the float64 reference)
    x = torch.randn(6, 128, dtype=dtype, requires_grad=True)
    w = (1 + 0.2 * torch.randn(128)).to(dtype).requires_grad_()
    g = (2 * torch.randn(6, 128)).to(dtype).requires_grad_()
    y = torch.ops.liger.gated_rms_norm(x, w, g.float(), EPS, 0.0, "llama", dtype, torch.float32, dtype)[0]
    want = qwen3_next(x, w, g)
    assert torch.equal(y, want)
    dy = torch.randn_like(y)
    (dg,) = torch.autograd.grad(y, g, dy)
    (want_dg,) = torch.autograd.grad(want, g, dy)
    assert (dg == want_dg).float().mean() >= 0.99


def gated_with_offset(x, weight, gate, eps=EPS):
    """Qwen3-Next's gated norm with a (1 + weight) scale (Gemma-style offset), llama cast."""
    dt = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    h = (1.0 + weight) * h.to(dt)
    return (h * F.silu(gate.to(torch.float32))).to(dt)


@pytest.mark.parametrize("form", ["plain", "offset"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_product_gradients_round_as_eager(dtype, form, kernel_path):
    """Regression: in an fp16 / bf16 llama-cast product eager's mul backward rounds dh * w and
    each dh * n term (before the weight gradient's sum over rows) to the product's dtype, as
    liger::rms_norm's backward does (ROUND_GRAD); the gated backward used unrounded products
    (a third of dx and dw differed from eager's: 0.67 of them equal).  Now every gradient is
    eager's bit for bit up to fp32 summation order, and no further from float64 than eager's."""
    from ligerfx.compiler.validate import within_eager_rounding

    torch.manual_seed(1)
    x = torch.randn(64, 128, dtype=dtype, requires_grad=True)
    w = (0.2 * torch.randn(128) + (0.0 if form == "offset" else 1.0)).to(dtype).requires_grad_()
    g = (2 * torch.randn(64, 128)).to(dtype).requires_grad_()
    offset = 1.0 if form == "offset" else 0.0
    eager_fn = gated_with_offset if form == "offset" else qwen3_next
    y = torch.ops.liger.gated_rms_norm(x, w, g.float(), EPS, offset, "llama", dtype, torch.float32,
                                       dtype)[0]
    want = eager_fn(x, w, g)
    assert torch.equal(y, want)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w, g), dy)
    eager = torch.autograd.grad(want, (x, w, g), dy)
    leaves = [t.detach().double().requires_grad_() for t in (x, w, g)]
    ref = torch.autograd.grad(eager_fn(*leaves), leaves, dy.double())
    for name, a, b, r in zip(("dx", "dweight", "dgate"), got, eager, ref):
        assert (a == b).float().mean() >= 0.99, f"{name}: {(a != b).float().mean():.3f} differ"
        problem = within_eager_rounding(name, a, b, r, dtype)
        assert problem is None, problem


def test_launchers_fill_given_nan_outputs(triton_path):
    x, w, g, offset, mode = make_inputs((9, 100), torch.float32, "llama_offset", "gate_x")
    x, w, g = x.detach(), w.detach(), g.detach()
    dts = dtypes_of(x, w, g, mode)
    y, rstd = torch.full((9, 100), float("nan")), torch.full((9,), float("nan"))
    grn.gated_rms_norm_forward_triton(x, w, g, EPS, offset, mode, *dts, y=y, rstd=rstd)
    want_y, want_rstd = grn.gated_rms_norm_reference(x, w, g, EPS, offset, mode, *dts)
    torch.testing.assert_close(y, want_y)
    torch.testing.assert_close(rstd, want_rstd)
    dy = torch.randn(9, 100)
    dx, dg = torch.full_like(x, float("nan")), torch.full_like(g, float("nan"))
    _, _, dw = grn.gated_rms_norm_backward_triton(dy, x, w, g, rstd, offset, mode, dts[0], dts[1], True,
                                                  dx=dx, dgate=dg)
    want = grn.gated_rms_norm_backward_reference(dy, x, w, g, rstd, offset, mode, dts[0], dts[1], True)
    for got, exp in zip((dx, dg, dw), want):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)


def test_poisoned_partial_sums(triton_path, monkeypatch):
    # every buffer the launchers allocate (the dW partial sums included) starts as NaN
    made = []

    def poisoned(shape, dtype, device):
        made.append(shape)
        return torch.full(shape, float("nan"), dtype=dtype)

    monkeypatch.setattr(rn, "_alloc", poisoned)
    check_against_reference(*make_inputs((33, 96), torch.float32, "llama", "gate_x"), TOL[torch.float32])
    assert len(made) == 5  # y, rstd; dx, dgate, dW partials: the kernels ran


def test_wide_rows_take_the_torch_path(triton_path, monkeypatch):
    monkeypatch.setattr(rn, "MAX_FUSED_D", 64)
    launched = []
    monkeypatch.setattr(grn, "gated_rms_norm_forward_triton", lambda *a, **k: launched.append(1))
    check_against_reference(*make_inputs((3, 96), torch.float32, "llama", "gate_x"), TOL[torch.float32])
    assert not launched


@pytest.mark.parametrize("version, launches", [((3, 9), 1), ((3, 6), 0)])
def test_backward_width_limit_under_triton_36(triton_path, monkeypatch, version, launches):
    # triton 3.6 spills the widest fused backward (tests/gpu_compile): half MAX_FUSED_D there
    monkeypatch.setattr(rn, "MAX_FUSED_D", 128)
    monkeypatch.setattr(grn, "triton_version", lambda: version)
    launched = []
    real = grn.gated_rms_norm_backward_triton
    monkeypatch.setattr(grn, "gated_rms_norm_backward_triton",
                        lambda *a, **k: (launched.append(1), real(*a, **k))[1])
    check_against_reference(*make_inputs((3, 128), torch.float32, "llama", "gate_x"),
                            TOL[torch.float32])
    assert len(launched) == launches


def test_strided_gate(kernel_path):
    # gate as the second half of one projection (row stride 2 * D), as fused in/z projections give
    x = torch.randn(4, 64, requires_grad=True)
    proj = torch.randn(4, 128, requires_grad=True)
    g = proj[:, 64:]
    y = grn.gated_rms_norm(x, g)
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * F.silu(g)
    torch.testing.assert_close(y, want)
    dy = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, (x, proj), dy), torch.autograd.grad(want, (x, proj), dy)):
        torch.testing.assert_close(a, b)


def test_bad_arguments():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="gate .* and x .* differ"):
        grn.gated_rms_norm(x, torch.randn(3, 1))
    with pytest.raises(ValueError, match="weight shape"):
        grn.gated_rms_norm(x, torch.randn(3, 8), torch.randn(9))


@pytest.mark.parametrize("with_weight", [True, False])
def test_opcheck(with_weight):
    x, g = torch.randn(2, 3, 40, requires_grad=True), torch.randn(2, 3, 40, requires_grad=True)
    w = torch.randn(40, requires_grad=True) if with_weight else None
    args = (x, w, g, 1e-6, 0.0, "llama", torch.float32, torch.float32, torch.float32)
    torch.library.opcheck(torch.ops.liger.gated_rms_norm.default, args)
    y, rstd = torch.ops.liger.gated_rms_norm(*args)
    torch.library.opcheck(torch.ops.liger.gated_rms_norm_backward.default,
                          (torch.randn(2, 3, 40), x.detach(), None if w is None else w.detach(), g.detach(),
                           rstd, 0.0, "llama", torch.float32, torch.float32, with_weight))


def test_is_rms_norm_times_silu_bit_for_bit(kernel_path):
    # Regression: silu(gate) was g * sigmoid(g) in the backward kernel and on the torch path, where
    # eager (and the forward kernel) compute g / (1 + exp(-g)), so in fp32 y and dx differed from
    # rms_norm(x) * F.silu(gate) in the last bit.  Now one silu (kernels/triton_math.py); in fp32
    # the gated op is the rms_norm and act ops composed, forward and backward, bit for bit.
    x, w, g, dy = torch.randn(7, 96), torch.randn(96), torch.randn(7, 96) * 3, torch.randn(7, 96)
    f32 = torch.float32
    y, rstd = torch.ops.liger.gated_rms_norm(x, w, g, EPS, 0.0, "llama", f32, f32, f32)
    h, _ = torch.ops.liger.rms_norm(x, w, EPS, 0.0, "llama", f32)
    a = torch.ops.liger.act(g, "silu")
    assert torch.equal(y, h * a)
    dx, dg, dw = torch.ops.liger.gated_rms_norm_backward(dy, x, w, g, rstd, 0.0, "llama", f32, f32, True)
    want_dx, want_dw = torch.ops.liger.rms_norm_backward(dy * a, x, w, rstd, 0.0, "llama", True)
    assert torch.equal(dg, torch.ops.liger.act_backward(dy * h, g, "silu"))
    assert torch.equal(dx, want_dx)
    torch.testing.assert_close(dw, want_dw)  # partial sums over other row blocks
