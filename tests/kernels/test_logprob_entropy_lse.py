"""liger::fused_linear_logprob with entropy_lse=True: the entropy formed as the spelling
`logsumexp(z) - (softmax(z) * z).sum(-1)` forms it (issue 22, logprob seed 3311).

At logits of +-1000 in fp32 that spelling cancels: a near one-hot row's entropy (1e-13) is below
one ulp of the logsumexp, so eager gives exactly 0 there, and ulp-sized noise in rows of middling
entropy.  The op must give eager's exact zeros, stay within eager's rounding elsewhere (value and
gradient, against the float64 spelling), and keep the -(p * logp) form when the flag is off.
"""

import pytest
import torch
import torch.nn.functional as F

from ligerfx.compiler.validate import within_eager_rounding
from ligerfx.kernels import cross_entropy as ce
from ligerfx.kernels import fused_linear_cross_entropy as flce

H, V = 16, 300


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    monkeypatch.setattr(ce, "CE_BLOCK_V", 128)  # three vocabulary blocks, the last partial
    monkeypatch.setattr(flce, "FLCE_CHUNK_ROWS", 4)  # several chunks


def _spelled(h, w, T):
    z = F.linear(h, w) / T
    return torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)


def _inputs(seed, scale):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(13, H, generator=g, dtype=torch.float64) * scale
    w = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5
    return h, w, torch.randint(0, V, (13,), generator=g)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lse_spelling_cancels_as_eager(kernel_path, seed):
    h64, w64, ids = _inputs(seed, 300.0)  # logits of some thousands
    T = 0.7
    h, w = (x.float().requires_grad_() for x in (h64, w64))
    _, ent, _ = torch.ops.liger.fused_linear_logprob(h, w, None, ids, T, 0.0, True, -100, 0,
                                                     True, True)
    low_h, low_w = (x.float().requires_grad_() for x in (h64, w64))
    low = _spelled(low_h, low_w, T)
    ref_h, ref_w = (x.clone().requires_grad_() for x in (h64, w64))
    ref = _spelled(ref_h, ref_w, T)
    zeros = low == 0
    assert zeros.any(), "the case must have rows where eager's spelling cancels to 0"
    assert (ent[zeros] == 0).all(), f"eager's exact zeros: {ent[zeros].tolist()}"
    assert within_eager_rounding("entropy", ent.detach(), low.detach(), ref.detach(),
                                 torch.float32) is None
    cot = torch.randn(13, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    got = torch.autograd.grad(ent, (h, w), cot.float())
    lows = torch.autograd.grad(low, (low_h, low_w), cot.float())
    refs = torch.autograd.grad(ref, (ref_h, ref_w), cot)
    for name, a, b, c in zip("hw", got, lows, refs):
        problem = within_eager_rounding(f"grad {name}", a, b, c, torch.float32)
        assert problem is None, problem


def test_flag_off_keeps_the_plogp_form(kernel_path):
    # without the flag the op gives -(p * logp).sum(): the true tiny entropy, not 0
    h64, w64, ids = _inputs(0, 300.0)
    h, w = h64.float(), w64.float()
    _, ent, _ = torch.ops.liger.fused_linear_logprob(h, w, None, ids, 0.7, 0.0, True, -100, 0,
                                                     True, False)
    _, ent_lse, _ = torch.ops.liger.fused_linear_logprob(h, w, None, ids, 0.7, 0.0, True, -100,
                                                         0, True, True)
    lp = F.log_softmax(F.linear(h64, w64) / 0.7, -1)
    true = -(lp.exp() * lp).sum(-1)
    tiny = (ent_lse == 0) & (true > 1e-30)  # cancelled by the spelling, not by the true value
    assert tiny.any()
    # the fp32 logits' own rounding (an ulp of some thousands) moves a tiny entropy by percents
    torch.testing.assert_close(ent[tiny].double(), true[tiny], rtol=0.1, atol=0)
