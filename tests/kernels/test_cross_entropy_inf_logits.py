"""liger::cross_entropy on logits holding +inf / -inf / NaN follows eager's non-finite pattern.

Eager's log_softmax is NaN throughout a row whose max is +inf (inf - inf), that holds a NaN, or
that is all -inf; its loss is then NaN and its gradient NaN, an ignored row's too (log_softmax's
backward: 0 - exp(nan) * 0).  A -inf among finite logits, or a whole vocabulary block of them,
changes nothing.  Loss and logits gradient are compared with eager (the same fp32 upcast of the
logits) by `within_eager_rounding`: the same non-finite positions and values, elsewhere eager's
error against float64.  Three vocabulary blocks (the last partial), every buffer the op allocates
poisoned with a large finite value first (an unwritten element cannot pass as 0 or NaN).
Issue 22 long run, seeds 3403 and 2 (tests/differential/test_regressions.py).
"""

import pytest
import torch
import torch.nn.functional as F

from ligerfx.compiler.validate import within_eager_rounding
from ligerfx.kernels import cross_entropy as ce

INF, NAN = float("inf"), float("nan")
N, V, BLOCK = 13, 300, 128
OPTS = [
    ("plain", dict()),
    ("smoothing", dict(label_smoothing=0.1)),
    ("weight_zloss", dict(weight=True, lse_square_scale=1e-2)),
]


@pytest.fixture(autouse=True)
def _small_blocks_and_poison(monkeypatch):
    monkeypatch.setattr(ce, "CE_BLOCK_V", BLOCK)
    real = torch.empty

    def poisoned(*a, **k):
        t = real(*a, **k)
        return t.fill_(1e30) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)


def _logits_and_target(dtype):
    x = torch.randn(N, V) * 3
    t = torch.randint(0, V, (N,))
    x[0, t[0]] = INF                            # +inf at the label
    t[1] = 5
    x[1, 280] = INF                             # +inf elsewhere (last, partial block)
    x[2, [3, 150, 299]] = INF                   # several, and a -inf among them
    x[2, 7] = -INF
    x[3, 200] = INF                             # ignored row with a +inf
    x[4, :BLOCK] = -INF                         # a leading all -inf block, labelled after it
    t[4] = 200
    x[5, :BLOCK] = -INF                         # the same, ignored: gradient 0
    x[6] = -INF                                 # all -inf, ignored: NaN
    x[7, 9] = NAN                               # NaN, ignored
    x[8, 250] = -INF                            # a -inf, labelled and finite
    for r in (3, 5, 6, 7, 11):                  # 9, 10, 12: finite labelled rows
        t[r] = -100
    return x.to(dtype), t


def _eager(x, t, reduction, weight=None, label_smoothing=0.0, lse_square_scale=0.0):
    """The eager spelling the rewrite stands for: fp32 upcast, F.cross_entropy (+ z-loss)."""
    z = x.float() if x.dtype != torch.float64 else x
    w = weight.to(z.dtype) if weight is not None else None
    loss = F.cross_entropy(z, t, weight=w, reduction=reduction, label_smoothing=label_smoothing)
    if lse_square_scale:
        valid = t != -100
        zl = torch.where(valid, lse_square_scale * torch.logsumexp(z, -1) ** 2, 0)
        loss = loss + (zl if reduction == "none" else
                       zl.sum() / valid.sum() if reduction == "mean" else zl.sum())
    return loss


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name,opts", OPTS, ids=[o[0] for o in OPTS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inf_logits_follow_eager(kernel_path, dtype, name, opts, reduction):
    x, t = _logits_and_target(dtype)
    kw = dict(opts)
    kw["weight"] = torch.rand(V) + 0.5 if opts.get("weight") else None
    xe = x.clone().requires_grad_()
    eager = _eager(xe, t, reduction, **kw)
    cot = torch.randn(eager.shape)
    (ge,) = torch.autograd.grad(eager, xe, cot)
    x64 = x.double().requires_grad_()
    ref = _eager(x64, t, reduction, **kw)
    (gr,) = torch.autograd.grad(ref, x64, cot.double())
    xo = x.clone().requires_grad_()
    loss = ce.cross_entropy(xo, t, reduction=reduction, **kw)
    (go,) = torch.autograd.grad(loss, xo, cot)

    # the cases reach the convention: an ignored row NaN, a finite row beside it
    assert ge[3].isnan().all() and ge[6].isnan().all() and ge[7].isnan().all()
    assert torch.isfinite(ge[5]).all() and torch.isfinite(ge[4]).all()
    for what, got, low, hi in (("loss", loss, eager, ref), ("grad", go, ge, gr)):
        problem = within_eager_rounding(what, got, low, hi, low.dtype)
        assert problem is None, problem
    if reduction == "none":  # +inf rows NaN, a row with -inf logits finite (smoothing: +inf)
        assert loss[:3].isnan().all() and torch.isfinite(loss[9])
        assert torch.isfinite(loss[[4, 8]]).all() != bool(kw.get("label_smoothing"))


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("where", ["rows", "bias"])
def test_fused_linear_ce_inf_logits_follow_eager(kernel_path, monkeypatch, where, dtype,
                                                 reduction):
    """The fused lm head: +inf logits in two rows (one ignored) from a hidden value whose product
    overflows in one column, or in every row from a +inf bias.  Chunks of 4 rows; "none" and
    bf16 recompute the chunks in the backward.  A NaN row of the logits' gradient makes that row
    of grad_hidden and all of grad_weight NaN, in eager as here."""
    from ligerfx.kernels import fused_linear_cross_entropy as flce

    monkeypatch.setattr(flce, "FLCE_CHUNK_ROWS", 4)
    H = 16
    h = torch.randn(N, H)
    w = torch.randn(V, H) * 0.3
    b = torch.randn(V) * 0.1
    t = torch.randint(0, V, (N,))
    t[[3, 7]] = -100
    w[:, 0] = 0.0
    if where == "rows":
        w[250, 0] = 10.0
        h[[1, 3], 0] = 1e38  # 1e39 in column 250: +inf, the row's other logits finite
    else:
        b[17] = INF
    h, w, b = h.to(dtype), w.to(dtype), b.to(dtype)

    def grads(fn, *args):
        args = [a.clone().requires_grad_() for a in args]
        loss = fn(*args)
        return (loss,) + torch.autograd.grad(loss, args, cot.to(loss.dtype))

    def eager(h, w, b):
        z = F.linear(h, w, b).float() if h.dtype != torch.float64 else F.linear(h, w, b)
        return F.cross_entropy(z, t, reduction=reduction)

    def ours(h, w, b):
        return flce.fused_linear_cross_entropy(h, w, t, bias=b, reduction=reduction)

    cot = torch.randn(N) if reduction == "none" else torch.randn(())
    low = grads(eager, h, w, b)
    ref = grads(eager, h.double(), w.double(), b.double())
    got = grads(ours, h, w, b)
    assert low[1][3].isnan().all()  # the ignored row: the case reaches the convention
    assert torch.isfinite(low[1][0]).all() == (where == "rows")
    for what, g, lo, hi in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), got, low, ref):
        problem = within_eager_rounding(what, g, lo, hi, lo.dtype)
        assert problem is None, problem
