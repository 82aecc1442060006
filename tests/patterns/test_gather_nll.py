"""Per-token NLL written as log_softmax + gather, masked and averaged by hand.

The pattern rewrites only `log_softmax(x, -1).gather(-1, t[..., None])[..., 0]` (the sign and the
user's mask arithmetic stay in the graph), so eager's NaN on an ignored row with a -inf logit is
kept; with an lm head above it the fused linear op computes it without [N, V] logits.
"""

import pytest
import torch
import torch.nn.functional as F

import ligerfx
from tests.compare import rel_err

LOSSES = ["cross_entropy", "fused_linear_cross_entropy"]
OPTS = {"inner": "aot_eager", "patterns": LOSSES}


def nll_clamp_mul(x, t):
    mask = t != -100
    lp = F.log_softmax(x.float(), -1)
    nll = -lp.gather(-1, t.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (nll * mask).sum() / mask.sum()


def nll_where_masked_fill(x, t):
    mask = t != -100
    lp = F.log_softmax(x, dim=-1)
    nll = -torch.gather(lp, -1, torch.where(mask, t, 0)[..., None])[..., 0]
    return nll.masked_fill(~mask, 0).sum() / mask.sum()


def nll_masked_fill_where(x, t):
    mask = t != -100
    lp = torch.log_softmax(x.float(), 2)
    nll = -lp.gather(2, t.masked_fill(~mask, 0).unsqueeze(2)).squeeze(2)
    return torch.where(mask, nll, 0).sum() / mask.sum().clamp(min=1)


def nll_index_mean(x, t):
    mask = t != -100
    lp = F.log_softmax(x, -1)
    nll = -lp.gather(-1, t.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return nll[mask].mean()


def nll_dtype_kwarg(x, t):
    mask = t != -100
    lp = F.log_softmax(x, dim=-1, dtype=torch.float32)
    nll = -lp.gather(-1, t.clamp(min=0)[..., None]).squeeze(-1)
    return (nll * mask).sum() / mask.sum()


SPELLINGS = [nll_clamp_mul, nll_where_masked_fill, nll_masked_fill_where, nll_index_mean,
             nll_dtype_kwarg]
B, T, H, V = 2, 5, 8, 13


def _labels(gen):
    t = torch.randint(0, V, (B, T), generator=gen)
    t[0, 1] = t[1, 3] = -100  # ignored tokens present
    return t


def _model(fn, lm_head):
    def model(*a):
        if lm_head:
            h, w, t = a
            return fn(F.linear(h, w), t)
        return fn(*a)
    return model


def _run(fn, args, lm_head):
    model = _model(fn, lm_head)
    torch._dynamo.reset()
    got = torch.compile(model, backend="liger", options=OPTS)(*args)
    return model, got


def _case(gen, dtype, lm_head):
    t = _labels(gen)
    if lm_head:
        return [torch.randn(B, T, H, generator=gen).to(dtype).requires_grad_(),
                (torch.randn(V, H, generator=gen) / H ** .5).to(dtype).requires_grad_(), t]
    return [torch.randn(B, T, V, generator=gen).to(dtype).requires_grad_(), t]


def _ref64(args, lm_head):
    """Float64 reference of every spelling (the mean NLL of the non-ignored tokens) and its args
    (the spellings' own `.float()` would round a float64 run back to float32)."""
    a64 = [a.detach().double().requires_grad_() if a.is_floating_point() else a for a in args]
    x = F.linear(a64[0], a64[1]) if lm_head else a64[0]
    t = a64[-1]
    mask = t != -100
    nll = -torch.log_softmax(x, -1).gather(-1, t.clamp(min=0)[..., None])[..., 0]
    return nll[mask].mean(), a64


def _grads(out, args):
    return torch.autograd.grad(out, [a for a in args if a.requires_grad])


@pytest.mark.parametrize("lm_head", [False, True], ids=["logits", "lm_head"])
@pytest.mark.parametrize("fn", SPELLINGS, ids=lambda f: f.__name__)
def test_fp32_exact(fn, lm_head, kernel_path):
    gen = torch.Generator().manual_seed(hash(fn.__name__) % 1000)
    args = _case(gen, torch.float32, lm_head)
    report = ligerfx.explain(_model(fn, lm_head), *args, options=OPTS)
    want = "fused_linear_cross_entropy" if lm_head else "cross_entropy"
    if lm_head and fn is nll_index_mean:
        # `nll[mask]` has a data-dependent shape: Dynamo breaks the graph and the lm head lands in
        # a graph of its own, so only the loss part can be fused
        want = "cross_entropy"
    assert report.counts.get(want) == 1, str(report)
    model, got = _run(fn, args, lm_head)
    exp64, ref64 = _ref64(args, lm_head)
    exp = model(*args)
    assert rel_err(exp, exp64) < 1e-6  # the float64 reference agrees with eager
    assert rel_err(got, exp) < 1e-5
    for g, e, e64 in zip(_grads(got, args), _grads(exp, args), _grads(exp64, ref64)):
        assert rel_err(e, e64) < 1e-5
        assert rel_err(g, e) < 1e-5


@pytest.mark.parametrize("lm_head", [False, True], ids=["logits", "lm_head"])
@pytest.mark.parametrize("fn", [nll_clamp_mul, nll_dtype_kwarg], ids=lambda f: f.__name__)
def test_bf16_no_further_from_fp64_than_eager(fn, lm_head, kernel_path):
    gen = torch.Generator().manual_seed(7)
    args = _case(gen, torch.bfloat16, lm_head)
    # `.float()` / `dtype=torch.float32`: the log-softmax computes in fp32 in eager too
    report = ligerfx.explain(_model(fn, lm_head), *args, options=OPTS)
    want = "fused_linear_cross_entropy" if lm_head else "cross_entropy"
    assert report.counts.get(want) == 1, str(report)
    model, got = _run(fn, args, lm_head)
    exp = model(*args)
    exp64, ref64 = _ref64(args, lm_head)
    assert rel_err(got, exp64) <= 2 * rel_err(exp, exp64) + 1e-6
    for g, e, e64 in zip(_grads(got, args), _grads(exp, args), _grads(exp64, ref64)):
        assert rel_err(g, e64) <= 2 * rel_err(e, e64) + 1e-6


def test_bf16_log_softmax_refused_without_upcast():
    x = torch.randn(B, T, V, dtype=torch.bfloat16)
    t = _labels(torch.Generator().manual_seed(1))
    report = ligerfx.explain(nll_where_masked_fill, x, t, options=OPTS)  # log_softmax in bf16
    assert not report.counts.get("cross_entropy"), str(report)
    assert any("upcast_statistics" in n.reason for n in report.near_misses), str(report)


def test_narrowing_dtype_kwarg_refused():
    x = torch.randn(B, T, V, dtype=torch.float64)  # dtype=float32 rounds the fp64 logits
    t = _labels(torch.Generator().manual_seed(1))
    report = ligerfx.explain(nll_dtype_kwarg, x, t, options=OPTS)
    assert not report.counts.get("cross_entropy"), str(report)
    assert report.near_misses, str(report)


@pytest.mark.parametrize("lm_head", [False, True], ids=["logits", "lm_head"])
def test_neg_inf_logit_on_ignored_row_gives_nan_as_eager(lm_head, kernel_path):
    # Class 0 has logit -inf; no kept token has label 0, but the ignored ones gather label 0
    # (clamped), so eager's nll is inf there and `nll * mask` is nan.  A rewrite into a loss with
    # ignore_index would give a finite value.
    gen = torch.Generator().manual_seed(3)
    t = torch.randint(1, V, (B, T), generator=gen)
    t[0, 1] = t[1, 3] = -100
    if lm_head:
        h = torch.randn(B, T, H, generator=gen, requires_grad=True)
        w = (torch.randn(V, H, generator=gen) / H ** .5).requires_grad_()
        b = torch.randn(V, generator=gen)
        b[0] = -float("inf")
        args = [h, w, b.requires_grad_(), t]

        def model(h, w, b, t):
            return nll_clamp_mul(F.linear(h, w, b), t)
    else:
        x = torch.randn(B, T, V, generator=gen)
        x[..., 0] = -float("inf")
        args = [x.requires_grad_(), t]
        model = nll_clamp_mul
    report = ligerfx.explain(model, *args, options=OPTS)
    assert sum(report.counts.get(p, 0) for p in LOSSES) == 1, str(report)
    torch._dynamo.reset()
    got = torch.compile(model, backend="liger", options=OPTS)(*args)
    exp = model(*args)
    assert torch.isnan(exp) and torch.isnan(got)
    diff = [a for a in args if a.requires_grad]
    for g, e in zip(torch.autograd.grad(got, diff), torch.autograd.grad(exp, diff)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_per_token_nll_and_logprob_none_reduction(kernel_path):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(B, T, V, generator=gen, requires_grad=True)
    t = torch.randint(0, V, (B, T), generator=gen)

    def f(x, t):
        lp = F.log_softmax(x.float(), -1)
        return lp.gather(-1, t.unsqueeze(-1)).squeeze(-1)  # positive sign: the log-prob

    got = torch.compile(f, backend="liger", options=OPTS)(x, t)
    exp = f(x, t)
    assert got.shape == exp.shape and rel_err(got, exp) < 1e-5
    g = torch.randn(B, T, generator=gen)  # any upstream gradient per token
    (gx,), (ex,) = torch.autograd.grad(got, x, g), torch.autograd.grad(exp, x, g)
    assert rel_err(gx, ex) < 1e-5


def test_out_of_range_label_raises_as_eager():
    x = torch.randn(B, T, V)
    t = _labels(torch.Generator().manual_seed(2))
    t[1, 1] = V  # clamp(min=0) does not bound it above

    with pytest.raises(RuntimeError):
        nll_clamp_mul(x, t)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="out of range|out of bounds"):
        torch.compile(nll_clamp_mul, backend="liger", options=OPTS)(x, t)


def _gather_other_dim(x, t):
    return -F.log_softmax(x, -1).gather(0, t.unsqueeze(-1)).squeeze(-1).mean()


def _log_softmax_other_dim(x, t):
    return -F.log_softmax(x, 1).gather(-1, t.unsqueeze(-1)).squeeze(-1).mean()


def _log_softmax_escapes(x, t):
    lp = F.log_softmax(x, -1)
    return -lp.gather(-1, t.unsqueeze(-1)).squeeze(-1).mean(), lp


def _labels_cover_part(x, t):
    lp = F.log_softmax(x, -1)
    return -lp.gather(-1, t[:, :3].unsqueeze(-1)).squeeze(-1).mean()


@pytest.mark.parametrize("fn", [_gather_other_dim, _log_softmax_other_dim, _log_softmax_escapes,
                                _labels_cover_part], ids=lambda f: f.__name__)
def test_look_alikes_not_rewritten(fn):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(B, T, V, generator=gen)
    t = torch.randint(0, min(B, V), (B, T), generator=gen)
    report = ligerfx.explain(fn, x, t, options=OPTS)
    assert not any(report.counts.get(p) for p in LOSSES), str(report)
    out = torch.compile(fn, backend="liger", options=OPTS)(x, t)
    exp = fn(x, t)
    for o, e in zip(out if isinstance(out, tuple) else [out], exp if isinstance(exp, tuple) else [exp]):
        assert rel_err(o, e) < 1e-6
