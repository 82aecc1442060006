"""Tests for kernels/rms_norm.py: liger::rms_norm forward/backward against a float64 reference.

The reference applies the same intermediate roundings as eager (n to x.dtype, the product to the
promoted dtype) but with a straight-through gradient, so its autograd gives the exact derivative
the backward op promises.
"""

import pytest
import torch

from ligerfx.kernels import rms_norm as rn

SHAPES = [(1, 64), (7, 96), (3, 5, 80), (64, 257), (2, 9000)]
# name -> (weight dtype: None = no weight, "x" = x's dtype; offset; casting mode)
CASES = {
    "no_weight": (None, 0.0, "llama"),
    "llama": ("x", 0.0, "llama"),
    "llama_offset": ("x", 1.0, "llama"),
    "fp32_offset": ("x", 1.0, "fp32"),
    "llama_fp32_weight": (torch.float32, 0.0, "llama"),
}
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
EPS = 1e-6


def _round(t, dtype):
    """t's value rounded to dtype, gradient passed straight through (t is float64)."""
    return t + (t.to(dtype).double() - t).detach()


def reference(xd, wd, x_dtype, w_dtype, offset, mode, out_dtype):
    rstd = torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + EPS)
    n = xd * rstd
    if wd is None:
        y = n
    elif mode == "llama":
        w = wd if offset == 0 else _round(wd + offset, w_dtype)
        y = _round(_round(n, x_dtype) * w, torch.promote_types(x_dtype, w_dtype))
    else:
        y = n * (wd + offset)
    return _round(y, out_dtype), rstd.squeeze(-1)


def make_inputs(shape, dtype, case):
    w_dtype, offset, mode = CASES[case]
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    w = None
    if w_dtype is not None:
        w_dtype = dtype if w_dtype == "x" else w_dtype
        w = (torch.randn(shape[-1]) * 0.5 + 1.0).to(w_dtype).requires_grad_()
    return x, w, offset, mode


def assert_close(actual, expected, tol, what):
    # atol scaled by the tensor's magnitude: the backward's cancellations make near-zero elements
    # lose relative accuracy; rtol keeps the rest tight.
    atol = tol * max(expected.abs().max().item(), 1e-3)
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=atol, msg=lambda m: f"{what}: {m}")


def check_against_reference(x, w, offset, mode, tol):
    out_dtype = rn.default_out_dtype(x, w, mode)
    y, rstd = torch.ops.liger.rms_norm(x, w, EPS, offset, mode, out_dtype)
    assert y.dtype == out_dtype and y.shape == x.shape
    assert rstd.dtype == torch.float32 and rstd.shape == x.shape[:-1]
    dy = torch.randn_like(y)
    inputs = [x] + ([w] if w is not None else [])
    grads = torch.autograd.grad(y, inputs, dy)

    xd = x.detach().double().requires_grad_()
    wd = w.detach().double().requires_grad_() if w is not None else None
    y_ref, rstd_ref = reference(xd, wd, x.dtype, w.dtype if w is not None else None, offset, mode, out_dtype)
    ref_inputs = [xd] + ([wd] if wd is not None else [])
    ref_grads = torch.autograd.grad(y_ref, ref_inputs, dy.double())

    assert_close(y, y_ref.detach(), tol, "y")
    assert_close(rstd, rstd_ref.detach(), 1e-5, "rstd")
    for name, g, gr, t in zip(("dx", "dweight"), grads, ref_grads, inputs):
        assert g.dtype == t.dtype and g.shape == t.shape
        assert_close(g, gr, tol, name)


# fp32 x with an fp32 weight is just the "llama" case.
DTYPE_CASES = [(d, c) for d in (torch.float32, torch.bfloat16) for c in CASES
               if not (d == torch.float32 and c == "llama_fp32_weight")]


@pytest.mark.parametrize("dtype,case", DTYPE_CASES, ids=lambda p: str(p).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, dtype, case, kernel_path):
    x, w, offset, mode = make_inputs(shape, dtype, case)
    check_against_reference(x, w, offset, mode, TOL[dtype])


@pytest.fixture
def small_blocks(monkeypatch):
    """Shrink the tunables so small shapes take the looped (wide-row) kernels over several blocks."""
    monkeypatch.setattr(rn, "MAX_FUSED_D", 32)
    monkeypatch.setattr(rn, "LOOP_BLOCK_D", 16)
    monkeypatch.setattr(rn, "TILE_BLOCK_D", 16)


@pytest.mark.parametrize("case", ["no_weight", "llama_offset", "fp32_offset", "llama_fp32_weight"])
@pytest.mark.parametrize("shape", [(1, 40), (7, 96), (3, 5, 83)], ids=str)
def test_looped_path(shape, case, triton_path, small_blocks):
    x, w, offset, mode = make_inputs(shape, torch.bfloat16, case)
    check_against_reference(x, w, offset, mode, TOL[torch.bfloat16])
    x, w, offset, mode = make_inputs(shape, torch.float32, "fp32_offset")
    check_against_reference(x, w, offset, mode, TOL[torch.float32])


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("dtype,w_dtype,mode,out_dtype", [
    (torch.bfloat16, torch.bfloat16, "llama", None),
    (torch.bfloat16, torch.bfloat16, "llama", torch.float32),  # the bf16 product must still be rounded
    (torch.bfloat16, torch.float32, "llama", None),
    (torch.float16, torch.float16, "llama", torch.float32),
    (torch.bfloat16, torch.bfloat16, "fp32", None),
], ids=str)
def test_kernel_roundings_match_eager(dtype, w_dtype, mode, out_dtype, wide, monkeypatch):
    """The kernel reproduces eager's intermediate roundings: nearly every element is bit-identical.

    Only rstd's summation order differs, which can move an element across a rounding boundary
    (one ulp).  Without the emulated roundings (or with truncating casts) about half would differ.
    """
    if wide:
        monkeypatch.setattr(rn, "MAX_FUSED_D", 64)
        monkeypatch.setattr(rn, "LOOP_BLOCK_D", 64)
    x = torch.randn(32, 200, dtype=dtype)
    w = (torch.randn(200) * 0.5 + 1).to(w_dtype)
    out_dtype = out_dtype or rn.default_out_dtype(x, w, mode)
    y_eager, rstd_eager = rn.rms_norm_reference(x, w, EPS, 1.0, mode, out_dtype)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    y, rstd = torch.ops.liger.rms_norm(x, w, EPS, 1.0, mode, out_dtype)
    assert y.dtype == y_eager.dtype
    torch.testing.assert_close(rstd, rstd_eager, rtol=1e-6, atol=0)
    assert_rounds_like_eager(y, y_eager, dtype)


def assert_rounds_like_eager(y, y_eager, dtype):
    """Nearly all elements bit-identical to eager's, none more than one ulp of `dtype` away (the
    statistics' summation order may move a rare element by one ulp).  Shared with
    test_layer_norm.py."""
    assert (y != y_eager).float().mean().item() < 0.01
    ulp = torch.finfo(dtype).eps * y_eager.float().abs().clamp_min(1e-3)
    assert ((y.float() - y_eager.float()).abs() <= ulp).all()


def nan_alloc(shape, dtype, device):
    """A launcher buffer filled with NaN (monkeypatched over the kernel files' _alloc)."""
    shape = (shape,) if isinstance(shape, int) else shape
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("mode", ["llama", "fp32"])
def test_dweight_uses_the_multiplied_n(mode, wide, kernel_path, monkeypatch):
    """dweight = sum(dy * n) with n exactly as the forward multiplied it: rounded to x.dtype in llama
    mode, fp32 in fp32 mode.  n is rebuilt from the op's own rstd the way the kernels do (one fp32
    product), so the only slack left is the summation order."""
    if wide:
        monkeypatch.setattr(rn, "MAX_FUSED_D", 32)
        monkeypatch.setattr(rn, "LOOP_BLOCK_D", 16)
        monkeypatch.setattr(rn, "TILE_BLOCK_D", 16)
    x = torch.randn(5, 200, dtype=torch.bfloat16)
    w = torch.randn(200, requires_grad=True)
    y, rstd = torch.ops.liger.rms_norm(x, w, EPS, 0.0, mode, torch.float32)
    dy = torch.randn_like(y)
    (dw,) = torch.autograd.grad(y, [w], dy)
    n = x.float() * rstd[:, None]
    if mode == "llama":
        n = n.bfloat16()
    expected = (dy.double() * n.double()).sum(0)
    torch.testing.assert_close(dw.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("case", ["no_weight", "llama", "fp32_offset"])
def test_poisoned_buffers(case, wide, triton_path, monkeypatch):
    """Every element of every buffer the launchers allocate (outputs, stats, partials) gets written.

    35 rows in blocks of 4 do not split evenly over the programs, so a grid that drops the last
    row block shows up here too.
    """
    shape = (35, 300)
    if wide:  # 4 column blocks of 16; with 8 programs' worth of target that makes 2 row chunks
        shape = (35, 56)
        monkeypatch.setattr(rn, "MAX_FUSED_D", 32)
        monkeypatch.setattr(rn, "LOOP_BLOCK_D", 16)
        monkeypatch.setattr(rn, "TILE_BLOCK_D", 16)
        monkeypatch.setattr(rn, "TILE_ELEMS", 64)
    monkeypatch.setattr(rn, "_alloc", nan_alloc)
    x, w, offset, mode = make_inputs(shape, torch.bfloat16, case)
    check_against_reference(x, w, offset, mode, TOL[torch.bfloat16])


def test_launchers_fill_given_nan_outputs(triton_path):
    x = torch.randn(5, 3, 50)
    w = torch.randn(50)
    y = torch.full_like(x, float("nan"))
    rstd = torch.full(x.shape[:-1], float("nan"))
    rn.rms_norm_forward_triton(x, w, EPS, 0.0, "llama", torch.float32, y=y, rstd=rstd)
    y_ref, rstd_ref = rn.rms_norm_reference(x, w, EPS, 0.0, "llama", torch.float32)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(rstd, rstd_ref)
    dy = torch.randn_like(x)
    dx = torch.full_like(x, float("nan"))
    _, dw = rn.rms_norm_backward_triton(dy, x, w, rstd, 0.0, "llama", True, dx=dx)
    dx_ref, dw_ref = rn.rms_norm_backward_reference(dy, x, w, rstd, 0.0, "llama", True)
    torch.testing.assert_close(dx, dx_ref)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-5, atol=1e-5)


def test_strided_input(kernel_path):
    """Rows with a stride other than the width (a column slice) and a transposed input."""
    base = torch.randn(7, 100)
    x = base[:, 10:90].requires_grad_()
    assert x.stride(0) == 100
    w = torch.randn(80, requires_grad=True)
    check_against_reference(x, w, 0.0, "llama", TOL[torch.float32])
    xt = torch.randn(80, 6).t().requires_grad_()
    check_against_reference(xt, w, 1.0, "fp32", TOL[torch.float32])


def test_grads_only_for_inputs_that_need_them(kernel_path, monkeypatch):
    seen = []
    real_bwd = torch.ops.liger.rms_norm_backward

    class Spy:
        def __call__(self, *args):
            seen.append(args[-1])
            return real_bwd(*args)

    monkeypatch.setattr(torch.ops.liger, "rms_norm_backward", Spy())
    x = torch.randn(4, 32, requires_grad=True)
    w = torch.randn(32)  # frozen weight
    rn.rms_norm(x, w).sum().backward()
    assert seen == [False] and x.grad is not None and w.grad is None

    x = torch.randn(4, 32)  # only the weight trains
    w = torch.randn(32, requires_grad=True)
    (dw,) = torch.autograd.grad(rn.rms_norm(x, w, casting_mode="fp32").sum(), [w])
    assert seen == [False, True]
    expected = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)).sum(0)
    torch.testing.assert_close(dw, expected, rtol=1e-5, atol=1e-5)


def test_default_out_dtype():
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    assert rn.rms_norm(x).dtype == torch.bfloat16
    assert rn.rms_norm(x, torch.ones(8)).dtype == torch.float32  # Llama: promoted with the weight
    assert rn.rms_norm(x, torch.ones(8), casting_mode="fp32").dtype == torch.bfloat16  # Gemma: type_as(x)
    assert rn.rms_norm(x, torch.ones(8), out_dtype=torch.float16).dtype == torch.float16


def test_bad_arguments():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="casting_mode"):
        torch.ops.liger.rms_norm(x, torch.ones(8), EPS, 0.0, "gemma", torch.float32)
    with pytest.raises(ValueError, match="weight shape"):
        rn.rms_norm(x, torch.ones(7))


def test_aot_eager_dynamic_compile(triton_path):
    w = torch.randn(48, requires_grad=True)

    def f(x, w):
        return rn.rms_norm(x, w, offset=1.0, casting_mode="fp32") * 2.0

    cf = torch.compile(f, backend="aot_eager", dynamic=True, fullgraph=True)
    for shape in [(3, 48), (2, 5, 48)]:
        x = torch.randn(shape, requires_grad=True)
        y = cf(x, w)
        dy = torch.randn_like(y)
        gx, gw = torch.autograd.grad(y, [x, w], dy)
        xd = x.detach().double().requires_grad_()
        wd = w.detach().double().requires_grad_()
        y_ref = reference(xd, wd, x.dtype, w.dtype, 1.0, "fp32", torch.float32)[0] * 2.0
        gx_ref, gw_ref = torch.autograd.grad(y_ref, [xd, wd], dy.double())
        assert_close(y, y_ref.detach(), 1e-5, "y")
        assert_close(gx, gx_ref, 1e-5, "dx")
        assert_close(gw, gw_ref, 1e-5, "dweight")


@pytest.mark.parametrize("with_weight", [True, False])
def test_opcheck(with_weight, kernel_path):
    x = torch.randn(3, 4, 40, requires_grad=True)
    w = torch.randn(40, requires_grad=True) if with_weight else None
    for mode, offset in (("llama", 0.0), ("fp32", 1.0)):
        torch.library.opcheck(torch.ops.liger.rms_norm.default, (x, w, EPS, offset, mode, torch.float32))
    rstd = torch.rand(3, 4) + 0.5
    dy = torch.randn(3, 4, 40)
    wd = w.detach() if w is not None else None
    torch.library.opcheck(
        torch.ops.liger.rms_norm_backward.default, (dy, x.detach(), wd, rstd, 0.0, "llama", with_weight)
    )
