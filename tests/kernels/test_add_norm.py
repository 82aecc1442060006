"""Tests for kernels/add_norm.py: liger::add_rms_norm / add_layer_norm against float64 references.

h must be eager's `x + residual` bit for bit (the add rounds in the inputs' dtype); y and the
gradients are checked against the float64 references of test_rms_norm / test_layer_norm applied
to that h, with h's own gradient dh added: dx = dresidual = dh + dnorm.  On the Triton path the
op must also be bit-equal to eager's composition of the plain norm op with the add: y equal to
the norm of h, dx equal to (the norm's dx rounded to h's dtype) + dh summed in h's dtype.
"""

import pytest
import torch
import torch.nn.functional as F

from ligerfx.kernels import add_norm as an
from ligerfx.kernels import layer_norm as ln
from ligerfx.kernels import rms_norm as rn
from tests.kernels import test_layer_norm as tln
from tests.kernels import test_rms_norm as trn

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
# one row, an odd width, a 3-D input
SHAPES = [(1, 64), (3, 5, 83)]
RMS_CASES = ["no_weight", "llama", "fp32_offset"]
LN_CASES = ["affine", "plain"]


def _pair(shape, dtype):
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    r = (torch.randn(shape) * 3).to(dtype).requires_grad_()
    return x, r


def _grads(outs, inputs, seeds, use_h):
    if not use_h:  # h used only by the norm: no gradient of its own
        outs, seeds = outs[:1], seeds[:1]
    return torch.autograd.grad(outs, inputs, seeds)


def check_add_rms(x, r, w, offset, mode, tol, use_h=True):
    out_dtype = rn.default_out_dtype(x, w, mode)
    y, h, rstd = torch.ops.liger.add_rms_norm(x, r, w, trn.EPS, offset, mode, out_dtype)
    assert h.dtype == x.dtype and y.dtype == out_dtype and h.shape == y.shape == x.shape
    assert torch.equal(h, x.detach() + r.detach()), "h is not eager's x + residual"
    dy, dh = torch.randn_like(y), torch.randn_like(h)
    inputs = [x, r] + ([w] if w is not None else [])
    grads = _grads((y, h), inputs, (dy, dh), use_h)

    hd = h.detach().double().requires_grad_()
    wd = w.detach().double().requires_grad_() if w is not None else None
    y_ref, rstd_ref = trn.reference(hd, wd, x.dtype, w.dtype if w is not None else None, offset,
                                    mode, out_dtype)
    ref = torch.autograd.grad(y_ref, [hd] + ([wd] if wd is not None else []), dy.double())
    dx_ref = ref[0] + (dh.double() if use_h else 0)
    trn.assert_close(y, y_ref.detach(), tol, "y")
    trn.assert_close(rstd, rstd_ref.detach(), 1e-5, "rstd")
    trn.assert_close(grads[0], dx_ref, tol, "dx")
    assert torch.equal(grads[0], grads[1]), "dx and dresidual differ"
    assert grads[0].dtype == x.dtype
    if w is not None:
        assert grads[2].dtype == w.dtype
        trn.assert_close(grads[2], ref[1], tol, "dweight")


def check_add_ln(x, r, w, b, tol, use_h=True):
    y, h, mean, rstd = torch.ops.liger.add_layer_norm(x, r, w, b, tln.EPS, x.dtype)
    assert h.dtype == y.dtype == x.dtype and h.shape == x.shape
    assert torch.equal(h, x.detach() + r.detach()), "h is not eager's x + residual"
    dy, dh = torch.randn_like(y), torch.randn_like(h)
    params = [t for t in (w, b) if t is not None]
    grads = _grads((y, h), [x, r] + params, (dy, dh), use_h)

    hd = h.detach().double().requires_grad_()
    pd = [t.detach().double().requires_grad_() for t in params]
    wd = pd[0] if w is not None else None
    bd = pd[-1] if b is not None else None
    y_ref = F.layer_norm(hd, x.shape[-1:], wd, bd, tln.EPS)
    ref = torch.autograd.grad(y_ref, [hd] + pd, dy.double())
    tln.assert_close(y, y_ref.detach(), tol, "y")
    tln.assert_close(rstd, torch.rsqrt(hd.detach().var(-1, unbiased=False) + tln.EPS), 1e-5, "rstd")
    tln.assert_close(grads[0], ref[0] + (dh.double() if use_h else 0), tol, "dx")
    assert torch.equal(grads[0], grads[1]), "dx and dresidual differ"
    for name, g, gr, t in zip(("dweight", "dbias"), grads[2:], ref[1:], params):
        assert g.dtype == t.dtype
        tln.assert_close(g, gr, tol, name)


@pytest.mark.parametrize("case", RMS_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_add_rms_norm_matches_reference(shape, dtype, case, kernel_path):
    _, w, offset, mode = trn.make_inputs(shape, dtype, case)
    check_add_rms(*_pair(shape, dtype), w, offset, mode, TOL[dtype])


@pytest.mark.parametrize("case", LN_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_add_layer_norm_matches_reference(shape, dtype, case, kernel_path):
    _, w, b = tln.make_inputs(shape, dtype, case)
    check_add_ln(*_pair(shape, dtype), w, b, TOL[dtype])


def test_h_used_only_by_the_norm(kernel_path):
    """No gradient reaches h itself (the final norm's add): dx is the norm's gradient alone."""
    x, r = _pair((4, 48), torch.bfloat16)
    w = torch.randn(48, dtype=torch.bfloat16, requires_grad=True)
    check_add_rms(x, r, w, 0.0, "llama", TOL[torch.bfloat16], use_h=False)
    check_add_ln(x, r, w, None, TOL[torch.bfloat16], use_h=False)


def test_only_h_used(kernel_path):
    """Only h's gradient flows (y's is None): dx = dh exactly, no weight gradient."""
    x, r = _pair((3, 40), torch.bfloat16)
    w = torch.randn(40, requires_grad=True)
    y, h, _ = torch.ops.liger.add_rms_norm(x, r, w, 1e-6, 0.0, "llama", torch.float32)
    dh = torch.randn_like(h)
    dx, dr, dw = torch.autograd.grad(h, [x, r, w], dh, allow_unused=True)
    assert torch.equal(dx, dh) and torch.equal(dr, dh)
    assert dw is None or not dw.any()


def test_x_and_residual_alias(kernel_path):
    """h = x + x: the two gradients of x are summed by autograd (2 * dh_total)."""
    x = torch.randn(5, 32, requires_grad=True)
    w = torch.randn(32)
    y, h = an.add_rms_norm(x, x, w)
    assert torch.equal(h, x.detach() * 2)
    dy, dh = torch.randn_like(y), torch.randn_like(h)
    (dx,) = torch.autograd.grad((y, h), [x], (dy, dh))
    hd = h.detach().requires_grad_()
    (dn,) = torch.autograd.grad(rn.rms_norm(hd, w), [hd], dy)
    torch.testing.assert_close(dx, 2 * (dn + dh))


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_bit_equal_to_eager_composition(dtype, wide, triton_path, monkeypatch):
    """Against the plain op on h (same kernels): y bit-equal; dx = round(dnorm) + dh rounded, as
    eager's autograd sums h's two gradients in h's dtype (an fp32 sum would differ in ~1/3)."""
    if wide:
        for mod in (rn, ln):
            monkeypatch.setattr(mod, "MAX_FUSED_D", 32)
            monkeypatch.setattr(mod, "LOOP_BLOCK_D", 16)
            monkeypatch.setattr(mod, "TILE_BLOCK_D", 16)
    D = 40 if wide else 72
    x, r = _pair((5 if wide else 9, D), dtype)
    w = (torch.randn(D) * 0.5 + 1).to(dtype).requires_grad_()
    y, h = an.add_rms_norm(x, r, w, offset=1.0)
    dy, dh = torch.randn_like(y), torch.randn_like(h)
    dx, dw = torch.autograd.grad((y, h), [x, w], (dy, dh))
    hd = (x.detach() + r.detach()).requires_grad_()
    y_plain = rn.rms_norm(hd, w, offset=1.0)
    dn, dw_plain = torch.autograd.grad(y_plain, [hd, w], dy)
    assert torch.equal(y, y_plain)
    assert torch.equal(dx, dn + dh)
    torch.testing.assert_close(dw, dw_plain)

    b = torch.randn(D, dtype=dtype, requires_grad=True)
    y, h = an.add_layer_norm(x, r, w, b)
    dx, db = torch.autograd.grad((y, h), [x, b], (dy.to(dtype), dh))
    y_plain = ln.layer_norm(hd, w, b)
    dn, db_plain = torch.autograd.grad(y_plain, [hd, b], dy.to(dtype))
    assert torch.equal(y, y_plain)
    assert torch.equal(dx, dn + dh)
    torch.testing.assert_close(db, db_plain)


@pytest.mark.parametrize("wide", [False, True])
def test_poisoned_buffers(wide, triton_path, monkeypatch):
    """Every element of h, y, the statistics, dx and the partial sums is written (35 rows do not
    split evenly over the programs; wide: the looped kernels over several column blocks)."""
    shape = (35, 300)
    if wide:  # 3 column blocks of 16, 4-row tiles: 13 rows leave a partial tile
        shape = (13, 40)
        for mod in (rn, ln):
            monkeypatch.setattr(mod, "MAX_FUSED_D", 32)
            monkeypatch.setattr(mod, "LOOP_BLOCK_D", 16)
            monkeypatch.setattr(mod, "TILE_BLOCK_D", 16)
            monkeypatch.setattr(mod, "TILE_ELEMS", 64)
    monkeypatch.setattr(rn, "_alloc", trn.nan_alloc)
    _, w, offset, mode = trn.make_inputs(shape, torch.bfloat16, "llama_offset")
    check_add_rms(*_pair(shape, torch.bfloat16), w, offset, mode, TOL[torch.bfloat16])
    _, w, b = tln.make_inputs(shape, torch.bfloat16, "affine")
    check_add_ln(*_pair(shape, torch.float32), w.float(), b.float(), TOL[torch.float32])


def test_strided_inputs(kernel_path):
    """x a column slice, residual transposed: h is still the contiguous eager sum."""
    x = torch.randn(7, 100)[:, 10:90].requires_grad_()
    r = torch.randn(80, 7).t().requires_grad_()
    w = torch.randn(80, requires_grad=True)
    check_add_rms(x, r, w, 0.0, "llama", TOL[torch.float32])
    check_add_ln(x, r, w, None, TOL[torch.float32])


def test_bad_arguments():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="broadcast or promote"):
        an.add_rms_norm(x, torch.randn(8))
    with pytest.raises(ValueError, match="broadcast or promote"):
        an.add_layer_norm(x, x.bfloat16())
    with pytest.raises(ValueError, match="weight shape"):
        an.add_rms_norm(x, x, torch.randn(7))
