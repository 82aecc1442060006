"""liger::fused_linear_logprob against F.linear + log_softmax + gather (+ entropy) in float64.

Chunking is forced small (4 rows over N=13, last chunk one row) and the vocabulary is streamed in
three blocks (the last partial), so the multi-chunk, multi-block paths are what is tested; every
output buffer the op allocates is poisoned with NaN first.
"""

import pytest
import torch
import torch.nn.functional as F

from ligerfx.kernels import cross_entropy as ce
from ligerfx.kernels import fused_linear_cross_entropy as flce
from ligerfx.kernels import fused_linear_logprob as flp

N, H, V = 13, 16, 300

CASES = [
    ("plain", dict()),
    ("bias_temperature", dict(bias=True, logit_scale=1 / 0.7)),
    ("entropy", dict(with_entropy=True)),
    ("all", dict(bias=True, logit_scale=0.6, softcap=3.0, with_entropy=True)),
    # the logits divided by a temperature (eager's `z / T`), forward and gradient
    ("divide", dict(bias=True, logit_scale=0.7, divide=True, with_entropy=True)),
]


@pytest.fixture(autouse=True)
def _small_blocks_and_poison(monkeypatch):
    monkeypatch.setattr(ce, "CE_BLOCK_V", 128)
    monkeypatch.setattr(flce, "FLCE_CHUNK_ROWS", 4)
    real = torch.Tensor.new_empty

    def poisoned(self, *a, **k):  # every buffer the op allocates starts as NaN
        t = real(self, *a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch.Tensor, "new_empty", poisoned)


def reference(h, w, b, ids, logit_scale=1.0, softcap=0.0, with_entropy=False, ignore_index=-100,
              logits_dtype=None, divide=False):
    """float64 eager: lm head (rounded like a low-precision head when logits_dtype), scale,
    softcap, log_softmax, gather (rows at ignore_index: -0.0), entropy."""
    z = F.linear(h.double(), w.double(), b.double() if b is not None else None)
    if logits_dtype is not None:
        z = z + (z.to(logits_dtype).double() - z).detach()  # value rounded, gradient exact
    z = z / logit_scale if divide else z * logit_scale
    if softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    logp = F.log_softmax(z, -1)
    ignored = ids == ignore_index
    lp = logp.gather(-1, torch.where(ignored, 0, ids).unsqueeze(-1)).squeeze(-1)
    lp = torch.where(ignored, -0.0, lp)
    ent = -(logp.exp() * logp).sum(-1)
    return lp, ent


def make(dtype, opts, lead=(N,), hidden=H, vocab=V):
    h = torch.randn(*lead, hidden).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden) / hidden**0.5 * 2).to(dtype).requires_grad_()
    b = (torch.randn(vocab) * 0.5).to(dtype).requires_grad_() if opts.get("bias") else None
    ids = torch.randint(0, vocab, lead)
    ids.view(-1)[1::5] = -100
    kw = {k: v for k, v in opts.items() if k != "bias"}
    return h, w, b, ids, kw


def close(a, ref, dtype, what):
    a, ref = a.double(), ref.double()
    if dtype == torch.float32:
        torch.testing.assert_close(a, ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what}: {m}")
    else:
        scale = ref.abs().max().item()
        torch.testing.assert_close(a, ref, rtol=3e-2, atol=2e-2 * scale,
                                   msg=lambda m: f"{what}: {m}")


def run_and_compare(h, w, b, ids, kw, dtype, grad_entropy_only=False):
    with_entropy = kw.get("with_entropy", False)
    params = [p for p in (h, w, b) if p is not None]
    leaves = [p.detach().double().requires_grad_() for p in params]
    lp, ent, lse = torch.ops.liger.fused_linear_logprob(
        h, w, b, ids, kw.get("logit_scale", 1.0), kw.get("softcap", 0.0), with_entropy, -100, 0,
        kw.get("divide", False))
    rlp, rent = reference(leaves[0], leaves[1], leaves[2] if b is not None else None, ids,
                          logits_dtype=dtype if dtype != torch.float32 else None, **kw)
    assert lp.dtype == torch.float32 and lp.shape == ids.shape and lse.shape == (ids.numel(),)
    close(lp, rlp, dtype, "logprob")
    assert torch.signbit(lp[ids == -100]).all(), "ignored rows give -0.0"
    outs, ref_outs = [lp], [rlp]
    if with_entropy:
        assert ent.shape == ids.shape
        close(ent, rent, dtype, "entropy")
        outs, ref_outs = ([ent], [rent]) if grad_entropy_only else ([lp, ent], [rlp, rent])
    else:
        assert ent.numel() == 0
    cots = [torch.randn_like(r) for r in ref_outs]  # any per-token upstream gradient
    grads = torch.autograd.grad(outs, params, [c.float() for c in cots])
    ref_grads = torch.autograd.grad(ref_outs, leaves, cots)
    for name, g, gr, p in zip("hwb", grads, ref_grads, params):
        assert g.dtype == p.dtype and g.shape == p.shape
        close(g, gr, dtype, f"grad {name}")


@pytest.mark.parametrize("name,opts", CASES, ids=[c[0] for c in CASES])
def test_options(kernel_path, name, opts):
    h, w, b, ids, kw = make(torch.float32, opts)
    run_and_compare(h, w, b, ids, kw, torch.float32)


def test_entropy_gradient_alone_and_leading_dims(kernel_path):
    h, w, b, ids, kw = make(torch.float32, dict(bias=True, with_entropy=True), lead=(3, 5))
    run_and_compare(h, w, b, ids, kw, torch.float32, grad_entropy_only=True)


def test_bf16(kernel_path):
    h, w, b, ids, kw = make(torch.bfloat16, dict(bias=True, logit_scale=1.25, with_entropy=True))
    run_and_compare(h, w, b, ids, kw, torch.bfloat16)


def test_frozen_weight_and_no_grad(torch_path):
    h, w, b, ids, _ = make(torch.float32, dict(bias=True))
    w.requires_grad_(False)
    lp = flp.fused_linear_logprob(h, w, ids, b)
    rlp, _ = reference(h, w, b, ids)
    cot = torch.randn_like(rlp)
    gh, gb = torch.autograd.grad(lp, (h, b), cot.float())
    rgh, rgb = torch.autograd.grad(rlp, (h, b), cot)
    close(gh, rgh, torch.float32, "grad h")
    close(gb, rgb, torch.float32, "grad b")
    with torch.no_grad():
        lp2 = flp.fused_linear_logprob(h, w, ids, b)
    assert not lp2.requires_grad
    torch.testing.assert_close(lp2, lp.detach())


def test_out_of_range_id(kernel_path):
    h, w, _, ids, _ = make(torch.float32, dict())
    ids[2] = V  # not ignore_index: eager's gather raises
    if kernel_path == "torch":
        with pytest.raises(RuntimeError):
            flp.fused_linear_logprob(h, w, ids)
    else:  # the kernel never reads out of bounds: NaN for that row (the pattern checks first)
        lp = flp.fused_linear_logprob(h, w, ids)
        assert torch.isnan(lp[2]) and torch.isfinite(lp[3])


def test_temperature_must_be_a_number():
    h, w, _, ids, _ = make(torch.float32, dict())
    with pytest.raises(ValueError, match="temperature"):
        flp.fused_linear_logprob(h, w, ids, temperature=torch.tensor(0.7))


# AOTAutograd with dynamic shapes is exercised by the pattern tests (tests/patterns/test_logprob*)
_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")


def test_opcheck(torch_path):
    # the registrations (fake, autograd) are path-independent; the kernels are tested above
    n = 6
    h = torch.randn(n, H, requires_grad=True)
    w = (torch.randn(V, H) * 0.2).requires_grad_()
    b = torch.randn(V, requires_grad=True)
    ids = torch.randint(0, V, (n,))
    ids[1] = -100
    args = (h, w, b, ids, 0.9, 2.0, True, -100, 4)
    torch.library.opcheck(torch.ops.liger.fused_linear_logprob.default, args, test_utils=_UTILS)
    lp, ent, lse = torch.ops.liger.fused_linear_logprob(*args)
    bargs = (torch.randn(n), torch.randn(n), h.detach(), w.detach(), b.detach(), ids,
             lse.detach(), ent.detach(), 0.9, 2.0, -100, True, True, True, 4)
    torch.library.opcheck(torch.ops.liger.fused_linear_logprob_backward.default, bargs,
                          test_utils=_UTILS)
