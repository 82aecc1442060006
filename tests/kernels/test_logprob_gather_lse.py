"""liger::fused_linear_logprob with gather_lse=True: the log-prob spelled
`z.gather(-1, ids) - z.logsumexp(-1)` keeps torch.logsumexp's convention in a row whose max is
+inf (issue 22, logprob seed 1515).

torch.logsumexp shifts an infinite max by 0, so such a row's logsumexp is +inf: the log-prob is
-inf at a finite or -inf logit and NaN only at a +inf one, and the backward's exp(z - lse) is 0
everywhere but at the +inf logits.  log_softmax's form (what the op computes for every other
spelling, and for rows with a finite max) gives NaN for the whole row.  The op must give eager's
values and its non-finite pattern in every gradient, and keep log_softmax's convention with the
flag off.
"""

import pytest
import torch
import torch.nn.functional as F

from ligerfx.compiler.validate import within_eager_rounding
from ligerfx.kernels import cross_entropy as ce
from ligerfx.kernels import fused_linear_cross_entropy as flce

N, H, V = 11, 16, 300


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    monkeypatch.setattr(ce, "CE_BLOCK_V", 128)  # three vocabulary blocks, the last partial
    monkeypatch.setattr(flce, "FLCE_CHUNK_ROWS", 4)  # several chunks


def _spelled(h, w, b, ids):
    z = F.linear(h, w, b)
    return z.gather(-1, ids[:, None]).squeeze(-1) - z.logsumexp(-1)


def _inputs(seed):
    """A head whose bias holds +inf in two classes (one of them some rows' target) and -inf in
    one: every row has max +inf; plus rows of hidden states scaled to the thousands."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64)
    h[:3] *= 300.0
    w = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5
    b = torch.randn(V, generator=g, dtype=torch.float64)
    b[[7, 150]] = float("inf")
    b[200] = float("-inf")
    ids = torch.randint(0, V, (N,), generator=g)
    ids[:2] = 7  # the +inf class: NaN in eager
    ids[2] = 200  # a -inf class: -inf in eager
    return h, w, b, ids


@pytest.mark.parametrize("seed", [0, 1])
def test_inf_rows_follow_logsumexp(kernel_path, seed):
    h64, w64, b64, ids = _inputs(seed)
    h, w, b = (x.float().requires_grad_() for x in (h64, w64, b64))
    lp, _, _ = torch.ops.liger.fused_linear_logprob(h, w, b, ids, 1.0, 0.0, False, -1, 0, False,
                                                    False, True)
    low_in = [x.float().requires_grad_() for x in (h64, w64, b64)]
    low = _spelled(*low_in, ids)
    ref_in = [x.clone().requires_grad_() for x in (h64, w64, b64)]
    ref = _spelled(*ref_in, ids)
    assert torch.isneginf(low).sum() >= N - 2 and torch.isnan(low[:2]).all()  # the convention
    # within_eager_rounding compares the non-finite positions and values first
    assert within_eager_rounding("logprob", lp.detach(), low.detach(), ref.detach(),
                                 torch.float32) is None
    cot = torch.randn(N, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    cot[:2] = 0.0  # the NaN rows' cotangent zero, so the others' gradients stay readable
    got = torch.autograd.grad(lp, (h, w, b), cot.float())
    lows = torch.autograd.grad(low, low_in, cot.float())
    refs = torch.autograd.grad(ref, ref_in, cot)
    for name, a, lo, r in zip(("hidden", "weight", "bias"), got, lows, refs):
        # the hidden gradient is NaN throughout: W's +inf rows meet it
        assert torch.isfinite(lo).any() or name == "hidden"
        problem = within_eager_rounding(name, a, lo, r, torch.float32)
        assert problem is None, problem


def test_flag_off_is_log_softmax_convention(kernel_path):
    # without the flag a row with max +inf is NaN throughout, as log_softmax(z).gather gives
    h64, w64, b64, ids = _inputs(0)
    h, w, b = h64.float(), w64.float(), b64.float()
    lp, _, _ = torch.ops.liger.fused_linear_logprob(h, w, b, ids, 1.0, 0.0, False, -1, 0)
    eager = F.log_softmax(F.linear(h, w, b), -1).gather(-1, ids[:, None]).squeeze(-1)
    assert torch.isnan(eager).all() and torch.isnan(lp).all()


def test_finite_rows_unchanged_by_the_flag(kernel_path):
    g = torch.Generator().manual_seed(3)
    h, w = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) / H**0.5
    ids = torch.randint(0, V, (N,), generator=g)
    on = torch.ops.liger.fused_linear_logprob(h, w, None, ids, 1.0, 0.0, False, -1, 0, False,
                                              False, True)[0]
    off = torch.ops.liger.fused_linear_logprob(h, w, None, ids, 1.0, 0.0, False, -1, 0)[0]
    assert torch.equal(on, off)


def test_row_with_nan_has_nan_logsumexp(kernel_path):
    # a hidden row with two -inf entries: its logits hold +inf, -inf and NaN (inf - inf), so
    # eager's logsumexp is NaN there (the Triton max skips NaN and saw a +inf max)
    g = torch.Generator().manual_seed(5)
    h64 = torch.randn(N, H, generator=g, dtype=torch.float64)
    h64[4, :2] = float("-inf")
    w64 = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5
    ids = torch.randint(0, V, (N,), generator=g)
    h, w = (x.float().requires_grad_() for x in (h64, w64))
    lp = torch.ops.liger.fused_linear_logprob(h, w, None, ids, 1.0, 0.0, False, -1, 0, False,
                                              False, True)[0]
    low_h, low_w = (x.float().requires_grad_() for x in (h64, w64))
    low = _spelled(low_h, low_w, None, ids)
    ref_h, ref_w = (x.clone().requires_grad_() for x in (h64, w64))
    ref = _spelled(ref_h, ref_w, None, ids)
    assert torch.isnan(F.linear(h64, w64)[4]).any() and torch.isnan(low[4])
    assert within_eager_rounding("logprob", lp.detach(), low.detach(), ref.detach(),
                                 torch.float32) is None
    cot = torch.randn(N, generator=g)
    for name, a, b, r in zip("hw", torch.autograd.grad(lp, (h, w), cot),
                             torch.autograd.grad(low, (low_h, low_w), cot),
                             torch.autograd.grad(ref, (ref_h, ref_w), cot.double())):
        problem = within_eager_rounding(name, a, b, r, torch.float32)
        assert problem is None, problem


@pytest.mark.parametrize("with_entropy", [False, True])
def test_leading_all_minus_inf_block(kernel_path, with_entropy):
    """A bias of -inf over the first vocabulary block (128 of 300 columns): the online sum was
    shifted by the -inf max, exp(-inf + inf) = NaN, and the whole row's log-prob, entropy and
    gradient NaN on the Triton path, where eager's are finite (found beside issue 22's cross
    entropy +inf fix, which had the same shift)."""
    g = torch.Generator().manual_seed(3)
    h64 = torch.randn(N, H, generator=g, dtype=torch.float64)
    w64 = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5
    b64 = torch.randn(V, generator=g, dtype=torch.float64)
    b64[:128] = float("-inf")
    ids = torch.randint(128, V, (N,), generator=g)
    h, w = h64.float().requires_grad_(), w64.float().requires_grad_()
    lp, ent, _ = torch.ops.liger.fused_linear_logprob(h, w, b64.float(), ids, 1.0, 0.0,
                                                      with_entropy, -100, 0, False, False)
    assert torch.isfinite(lp).all()
    z = F.linear(h64, w64, b64)
    logp = F.log_softmax(z, -1)
    ref = logp.gather(-1, ids[:, None]).squeeze(-1)
    torch.testing.assert_close(lp.double(), ref, rtol=1e-5, atol=1e-5)
    if with_entropy:  # the spelling's -(p * logp).sum() is 0 * -inf = NaN there, as eager's
        assert ent.isnan().all() and (-(logp.exp() * logp).sum(-1)).isnan().all()
    gh, gw = torch.autograd.grad(lp.sum(), (h, w))
    ref_h, ref_w = (x.clone().requires_grad_() for x in (h64, w64))
    refs = torch.autograd.grad(F.log_softmax(F.linear(ref_h, ref_w, b64), -1)
                               .gather(-1, ids[:, None]).sum(), (ref_h, ref_w))
    for a, b in zip((gh, gw), refs):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)
