"""Tests for kernels/layer_norm.py: liger::layer_norm forward/backward against float64 F.layer_norm."""

import pytest
import torch
import torch.nn.functional as F

from ligerfx.kernels import layer_norm as ln
from tests.kernels.test_rms_norm import assert_rounds_like_eager, nan_alloc

SHAPES = [(1, 64), (7, 96), (3, 5, 80), (64, 257), (2, 9000)]
# name -> (has weight, has bias, parameter dtype: "x" = x's dtype)
CASES = {
    "affine": (True, True, "x"),
    "weight_only": (True, False, "x"),
    "bias_only": (False, True, "x"),
    "plain": (False, False, "x"),
    "fp32_params": (True, True, torch.float32),
}
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
EPS = 1e-5

# fp32 x with fp32 parameters is just the "affine" case.
DTYPE_CASES = [(d, c) for d in (torch.float32, torch.bfloat16) for c in CASES
               if not (d == torch.float32 and c == "fp32_params")]


def make_inputs(shape, dtype, case, shift=0.0):
    has_w, has_b, p_dtype = CASES[case]
    p_dtype = dtype if p_dtype == "x" else p_dtype
    x = (torch.randn(shape) * 2.0 + shift).to(dtype).requires_grad_()
    w = (torch.randn(shape[-1]) * 0.5 + 1.0).to(p_dtype).requires_grad_() if has_w else None
    b = torch.randn(shape[-1]).to(p_dtype).requires_grad_() if has_b else None
    return x, w, b


def assert_close(actual, expected, tol, what):
    atol = tol * max(expected.abs().max().item(), 1e-3)
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=atol, msg=lambda m: f"{what}: {m}")


def check_against_reference(x, w, b, tol):
    y, mean, rstd = torch.ops.liger.layer_norm(x, w, b, EPS, x.dtype)
    assert y.dtype == x.dtype and y.shape == x.shape
    for stat in (mean, rstd):
        assert stat.dtype == torch.float32 and stat.shape == x.shape[:-1]
    dy = torch.randn_like(y)
    inputs = [t for t in (x, w, b) if t is not None]
    grads = torch.autograd.grad(y, inputs, dy)

    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    xd = ref_inputs[0]
    wd = ref_inputs[1] if w is not None else None
    bd = ref_inputs[-1] if b is not None else None
    y_ref = F.layer_norm(xd, x.shape[-1:], wd, bd, EPS)
    ref_grads = torch.autograd.grad(y_ref, ref_inputs, dy.double())
    xd = xd.detach()
    mean_ref = xd.mean(-1)
    rstd_ref = torch.rsqrt(xd.var(-1, unbiased=False) + EPS)

    assert_close(y, y_ref.detach(), tol, "y")
    assert_close(mean, mean_ref, 1e-5, "mean")
    assert_close(rstd, rstd_ref, 1e-5, "rstd")
    names = ["dx"] + (["dweight"] if w is not None else []) + (["dbias"] if b is not None else [])
    for name, g, gr, t in zip(names, grads, ref_grads, inputs):
        assert g.dtype == t.dtype and g.shape == t.shape
        assert_close(g, gr, tol, name)


@pytest.mark.parametrize("dtype,case", DTYPE_CASES, ids=lambda p: str(p).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, dtype, case, kernel_path):
    check_against_reference(*make_inputs(shape, dtype, case), TOL[dtype])


def shrink_blocks(monkeypatch, tile_elems=None):
    """Shrink the tunables so small shapes take the looped (wide-row) kernels over several blocks."""
    monkeypatch.setattr(ln, "MAX_FUSED_D", 32)
    monkeypatch.setattr(ln, "LOOP_BLOCK_D", 16)
    monkeypatch.setattr(ln, "TILE_BLOCK_D", 16)
    if tile_elems:
        monkeypatch.setattr(ln, "TILE_ELEMS", tile_elems)


@pytest.mark.parametrize("case", ["affine", "bias_only", "plain", "fp32_params"])
@pytest.mark.parametrize("shape", [(1, 40), (7, 96), (3, 5, 83)], ids=str)
def test_looped_path(shape, case, triton_path, monkeypatch):
    shrink_blocks(monkeypatch)
    check_against_reference(*make_inputs(shape, torch.bfloat16, case), TOL[torch.bfloat16])
    check_against_reference(*make_inputs(shape, torch.float32, "weight_only"), TOL[torch.float32])


@pytest.mark.parametrize("wide", [False, True])
def test_variance_is_accurate_with_a_large_mean(wide, kernel_path, monkeypatch):
    """A mean 1000x the spread: E[x^2] - mean^2 would lose every digit; the kernels must not."""
    if wide:
        shrink_blocks(monkeypatch)
    x = torch.randn(4, 83) + 1000.0
    _, mean, rstd = torch.ops.liger.layer_norm(x, None, None, EPS, x.dtype)
    xd = x.double()
    torch.testing.assert_close(mean.double(), xd.mean(-1), rtol=1e-6, atol=0)
    torch.testing.assert_close(rstd.double(), torch.rsqrt(xd.var(-1, unbiased=False) + EPS), rtol=1e-4, atol=0)


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_rounding_matches_eager(dtype, wide, monkeypatch):
    """The low-precision output is rounded to nearest even like eager's: nearly all bit-identical
    (statistics' summation order may move a rare element by one ulp)."""
    if wide:
        shrink_blocks(monkeypatch)
    x, w, b = (t.detach() for t in make_inputs((32, 200), dtype, "affine"))
    y_eager = ln.layer_norm_reference(x, w, b, EPS, dtype)[0]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    y = ln.layer_norm(x, w, b, EPS)
    assert_rounds_like_eager(y, y_eager, dtype)


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("case", ["affine", "weight_only", "bias_only", "plain"])
def test_poisoned_buffers(case, wide, triton_path, monkeypatch):
    """Every element of every buffer the launchers allocate (outputs, stats, partials) gets written;
    35 rows in blocks of 4 do not split evenly over the programs."""
    shape = (35, 300)
    if wide:
        shape = (35, 56)
        shrink_blocks(monkeypatch, tile_elems=64)
    monkeypatch.setattr(ln, "_alloc", nan_alloc)
    check_against_reference(*make_inputs(shape, torch.bfloat16, case), TOL[torch.bfloat16])


def test_launchers_fill_given_nan_outputs(triton_path):
    x, w, b = (t.detach() for t in make_inputs((5, 3, 50), torch.float32, "affine"))
    y, mean, rstd = (torch.full(s, float("nan")) for s in (x.shape, x.shape[:-1], x.shape[:-1]))
    ln.layer_norm_forward_triton(x, w, b, EPS, torch.float32, y=y, mean=mean, rstd=rstd)
    for got, want in zip((y, mean, rstd), ln.layer_norm_reference(x, w, b, EPS, torch.float32)):
        torch.testing.assert_close(got, want)
    dy = torch.randn_like(x)
    dx = torch.full_like(x, float("nan"))
    _, dw, db = ln.layer_norm_backward_triton(dy, x, w, b, mean, rstd, True, True, dx=dx)
    dx_ref, dw_ref, db_ref = ln.layer_norm_backward_reference(dy, x, w, b, mean, rstd, True, True)
    torch.testing.assert_close(dx, dx_ref)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db, db_ref, rtol=1e-5, atol=1e-5)


def test_strided_input(kernel_path):
    base = torch.randn(7, 100)
    x = base[:, 10:90].requires_grad_()
    assert x.stride(0) == 100
    w = torch.randn(80, requires_grad=True)
    b = torch.randn(80, requires_grad=True)
    check_against_reference(x, w, b, TOL[torch.float32])
    check_against_reference(torch.randn(80, 6).t().requires_grad_(), w, None, TOL[torch.float32])


def test_grads_only_for_inputs_that_need_them(kernel_path, monkeypatch):
    seen = []
    real_bwd = torch.ops.liger.layer_norm_backward

    class Spy:
        def __call__(self, *args):
            seen.append(args[-2:])
            return real_bwd(*args)

    monkeypatch.setattr(torch.ops.liger, "layer_norm_backward", Spy())
    x = torch.randn(4, 32, requires_grad=True)
    w, b = torch.randn(32), torch.randn(32, requires_grad=True)  # frozen weight, trained bias
    ln.layer_norm(x, w, b).sum().backward()
    assert seen == [(False, True)] and w.grad is None
    torch.testing.assert_close(b.grad, torch.full((32,), 4.0))

    x = torch.randn(4, 32)  # only the weight trains
    w = torch.randn(32, requires_grad=True)
    (dw,) = torch.autograd.grad(ln.layer_norm(x, w, b.detach()).sum(), [w])
    assert seen[-1] == (True, False)
    torch.testing.assert_close(dw, F.layer_norm(x, (32,), eps=EPS).sum(0), rtol=1e-5, atol=1e-5)


def test_default_out_dtype_and_bad_arguments():
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    assert ln.layer_norm(x, torch.ones(8), torch.zeros(8)).dtype == torch.bfloat16
    assert ln.layer_norm(x, out_dtype=torch.float32).dtype == torch.float32
    with pytest.raises(ValueError, match="bias shape"):
        ln.layer_norm(x, None, torch.zeros(7))


def test_aot_eager_dynamic_compile(triton_path):
    w = torch.randn(48, requires_grad=True)
    b = torch.randn(48, requires_grad=True)

    def f(x, w, b):
        return ln.layer_norm(x, w, b) * 2.0

    cf = torch.compile(f, backend="aot_eager", dynamic=True, fullgraph=True)
    for shape in [(3, 48), (2, 5, 48)]:
        x = torch.randn(shape, requires_grad=True)
        y = cf(x, w, b)
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, [x, w, b], dy)
        ref_in = [t.detach().double().requires_grad_() for t in (x, w, b)]
        y_ref = F.layer_norm(ref_in[0], (48,), ref_in[1], ref_in[2], EPS) * 2.0
        ref_grads = torch.autograd.grad(y_ref, ref_in, dy.double())
        assert_close(y, y_ref.detach(), 1e-5, "y")
        for name, g, gr in zip(("dx", "dweight", "dbias"), grads, ref_grads):
            assert_close(g, gr, 1e-5, name)


@pytest.mark.parametrize("affine", [True, False])
def test_opcheck(affine, kernel_path):
    x = torch.randn(3, 4, 40, requires_grad=True)
    w = torch.randn(40, requires_grad=True) if affine else None
    b = torch.randn(40, requires_grad=True) if affine else None
    torch.library.opcheck(torch.ops.liger.layer_norm.default, (x, w, b, EPS, torch.float32))
    torch.library.opcheck(torch.ops.liger.layer_norm.default, (x, w, None, EPS, torch.bfloat16))
    mean, rstd = torch.randn(3, 4), torch.rand(3, 4) + 0.5
    dy = torch.randn(3, 4, 40)
    wd = w.detach() if w is not None else None
    bd = b.detach() if b is not None else None
    torch.library.opcheck(
        torch.ops.liger.layer_norm_backward.default, (dy, x.detach(), wd, bd, mean, rstd, affine, affine)
    )
