"""liger::cross_entropy against F.cross_entropy in float64 (torch path and interpreted Triton)."""

import pytest
import torch
import torch.nn.functional as F

from ligerfx.kernels import cross_entropy as ce

# (name, options): every option of the op, alone and combined.
CASES = [
    ("plain", dict()),
    ("ignore_-1", dict(ignore_index=-1)),
    ("smoothing", dict(label_smoothing=0.1)),
    ("weight", dict(weight=True)),
    ("weight_smoothing", dict(weight=True, label_smoothing=0.2)),
    ("zloss", dict(lse_square_scale=1e-2)),
    ("softcap", dict(softcap=2.0)),
    ("scale", dict(logit_scale=0.7)),
    ("all", dict(weight=True, label_smoothing=0.1, lse_square_scale=1e-2, softcap=3.0,
                 logit_scale=1.3, ignore_index=-1)),
]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-4, atol=1e-4)}


def reference(x, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
              lse_square_scale=0.0, softcap=0.0, logit_scale=1.0):
    """float64 eager: F.cross_entropy on the transformed logits + z-loss (mean over valid rows)."""
    z = x.double() * logit_scale
    if softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    w = weight.double() if weight is not None else None
    loss = F.cross_entropy(z, target, weight=w, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    valid = target != ignore_index
    zl = torch.where(valid, lse_square_scale * torch.logsumexp(z, -1) ** 2, 0)
    if reduction == "mean":
        zl = zl.sum() / valid.sum()
    elif reduction == "sum":
        zl = zl.sum()
    return loss + zl, zl


def make(N, V, dtype, opts, ignore_every=4):
    x = (torch.randn(N, V) * 3).to(dtype).requires_grad_()
    ii = opts.get("ignore_index", -100)
    target = torch.randint(0, V, (N,))
    target[1::ignore_every] = ii  # row 0 stays valid (N=1 case)
    kw = dict(opts)
    kw["weight"] = torch.rand(V) + 0.1 if opts.get("weight") else None
    return x, target, kw


def check(x, target, kw, reduction, dtype):
    loss = ce.cross_entropy(x, target, reduction=reduction, **kw)
    xr = x.detach().double().requires_grad_()
    ref, _ = reference(xr, target, reduction=reduction, **kw)
    assert loss.dtype == torch.float32 and loss.shape == ref.shape
    torch.testing.assert_close(loss.double(), ref, **TOL[dtype])
    go = torch.randn_like(ref)  # non-uniform grad_output, per row for "none"
    (g,) = torch.autograd.grad(loss, x, go.float())
    (gr,) = torch.autograd.grad(ref, xr, go)
    assert g.dtype == dtype and g.shape == x.shape
    if dtype == torch.float32:
        torch.testing.assert_close(g.double(), gr, rtol=1e-4, atol=1e-6)
    else:  # gradient stored in bf16: compare relative to its scale
        torch.testing.assert_close(g.double(), gr, rtol=2e-2, atol=1e-2 * gr.abs().max().item())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name,opts", CASES, ids=[c[0] for c in CASES])
def test_options(kernel_path, monkeypatch, name, opts, reduction):
    # V=1000 with BLOCK_V=256: four blocks, the last one partial.
    monkeypatch.setattr(ce, "CE_BLOCK_V", 256)
    x, target, kw = make(23, 1000, torch.float32, opts)
    check(x, target, kw, reduction, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,V", [(1, 300), (40, 1000), (16, 257)])
def test_shapes_dtypes(kernel_path, monkeypatch, N, V, dtype):
    monkeypatch.setattr(ce, "CE_BLOCK_V", 256)
    opts = dict(label_smoothing=0.1, lse_square_scale=1e-3, weight=True)
    x, target, kw = make(N, V, dtype, opts, ignore_every=3)
    check(x, target, kw, "mean", dtype)
    check(x, target, kw, "none", dtype)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_index", [-100, -1])
def test_every_row_ignored(kernel_path, reduction, ignore_index):
    x = torch.randn(8, 300, requires_grad=True)
    target = torch.full((8,), ignore_index)
    for opts in (dict(), dict(label_smoothing=0.1, weight=torch.rand(300))):
        loss = ce.cross_entropy(x, target, ignore_index=ignore_index, reduction=reduction, **opts)
        ref = F.cross_entropy(x.detach(), target, ignore_index=ignore_index,
                              reduction=reduction, **opts)
        torch.testing.assert_close(loss, ref, equal_nan=True)  # nan for mean, as torch
        if reduction == "mean":
            assert loss.isnan()
        (g,) = torch.autograd.grad(loss.sum(), x)
        assert torch.equal(g, torch.zeros_like(g))


def test_leading_dims_and_z_loss_output(kernel_path):
    x = torch.randn(2, 5, 300, requires_grad=True)
    target = torch.randint(0, 300, (2, 5))
    target[0, 1] = -100
    loss, z = ce.cross_entropy(x, target, reduction="none", lse_square_scale=0.1,
                               return_z_loss=True)
    assert loss.shape == z.shape == (2, 5)
    ref, zref = reference(x.detach().reshape(10, 300), target.reshape(10), reduction="none",
                          lse_square_scale=0.1)
    torch.testing.assert_close(loss.double(), ref.view(2, 5), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z.double(), zref.view(2, 5), rtol=1e-5, atol=1e-5)
    assert z[0, 1] == 0 and (z.flatten()[target.flatten() != -100] > 0).all()


def test_sum_divided_by_token_count(kernel_path):
    """HF num_items_in_batch: reduction "sum" then a division in the graph."""
    x = torch.randn(12, 300, requires_grad=True)
    target = torch.randint(0, 300, (12,))
    target[:3] = -100
    loss = ce.cross_entropy(x, target, reduction="sum") / 7.0
    (g,) = torch.autograd.grad(loss, x)
    xr = x.detach().double().requires_grad_()
    ref = F.cross_entropy(xr, target, reduction="sum") / 7.0
    (gr,) = torch.autograd.grad(ref, xr)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.double(), gr, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("inplace", [False, True])
def test_launcher_writes_everything(triton_path, inplace):
    """Outputs pre-filled with NaN must be fully overwritten (also when grad_out is the input)."""
    N, V = 9, 700
    x = torch.randn(N, V)
    target = torch.randint(0, V, (N,))
    target[2] = -100
    weight = torch.rand(V)
    stats, _, _ = ce.reduction_stats(target, weight, -100, "sum", V, torch.float32)
    loss_rows = torch.full((N,), float("nan"))
    z_rows = torch.full((N,), float("nan"))
    xin = x.clone()
    grad = xin if inplace else torch.full_like(x, float("nan"))
    kw = dict(ignore_index=-100, label_smoothing=0.1, lse_square_scale=1e-3, softcap=0.0,
              logit_scale=1.0)
    ce.launch_ce_forward(xin, target, weight, stats, loss_rows, z_rows, grad, block_v=128, **kw)
    exp_rows, exp_z, exp_grad = (torch.empty(N), torch.empty(N), torch.empty_like(x))
    ce.ce_rows_torch(x, target, weight, stats, exp_rows, exp_z, exp_grad, **kw)
    torch.testing.assert_close(loss_rows, exp_rows, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z_rows, exp_z, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, exp_grad, rtol=1e-4, atol=1e-6)
    assert torch.equal(grad[2], torch.zeros(V))
    # Scale kernel: one value per row, and a 0-d scale.
    out = torch.full_like(x, float("nan"))
    s = torch.randn(N)
    ce.launch_scale_rows(exp_grad, s, out, block_v=128)
    torch.testing.assert_close(out, exp_grad * s[:, None])
    ce.launch_scale_rows(exp_grad, torch.tensor(0.5), out, block_v=128)
    torch.testing.assert_close(out, exp_grad * 0.5)


def test_no_grad_skips_gradient(kernel_path):
    x = torch.randn(6, 300)
    target = torch.randint(0, 300, (6,))
    loss, z, grad = torch.ops.liger.cross_entropy(x, target, compute_grad=False)
    assert grad.numel() == 0
    torch.testing.assert_close(loss, F.cross_entropy(x, target))


def test_aot_eager_dynamic(kernel_path):
    def fn(x, target, w):
        return ce.cross_entropy(x * 1.5, target, w, label_smoothing=0.1, lse_square_scale=1e-3)

    cfn = torch.compile(fn, backend="aot_eager", dynamic=True, fullgraph=True)
    for N in (5, 9):
        x = torch.randn(N, 300, requires_grad=True)
        target = torch.randint(0, 300, (N,))
        target[0] = -100
        w = torch.rand(300)
        out = cfn(x, target, w)
        (g,) = torch.autograd.grad(out, x)
        x2 = x.detach().requires_grad_()
        ref = fn(x2, target, w)
        (gr,) = torch.autograd.grad(ref, x2)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(g, gr)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck(kernel_path, reduction):
    x = torch.randn(6, 300, requires_grad=True)
    target = torch.randint(0, 300, (6,))
    target[1] = -100
    args = (x, target, torch.rand(300), -100, reduction, 0.1, 1e-3, 2.0, 0.9, True)
    torch.library.opcheck(torch.ops.liger.cross_entropy.default, args)
    grad_loss = torch.randn(6) if reduction == "none" else torch.tensor(0.3)
    torch.library.opcheck(torch.ops.liger.cross_entropy_backward.default,
                          (grad_loss, torch.randn(6, 300), reduction))
