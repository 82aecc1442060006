"""Benchmark the distillation loss: student lm head + generalised JSD (beta 0.5) against a teacher
lm head in the same step (no gradient for the teacher), and the same loss on given logits.

Variants (run by benchmarks/run.py through harness.py): eager (the GKD formulation on
materialised [N, V] logits), inductor (torch.compile of that), ours (liger::fused_linear_distillation /
liger::distillation_loss), and Liger-Kernel's LigerFusedLinearJSD where it is installed.  Sizes:
tokens 4k-16k at vocab 32k and 128k, hidden 4096 (CPU smoke: vocab 1000, hidden 64, 16 tokens).
Matmul FLOPs are counted (student and teacher logits, grad wrt hidden and weight: 4 x 2NVH), so
the time reads against the compute ceiling; our op recomputes nothing (the gradients are formed
chunk by chunk in the forward), so its FLOPs are eager's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from harness import Case, OpBench
from ligerfx.kernels.distillation import distillation_loss, fused_linear_distillation

HIDDEN = 4096
TOKENS = (4096, 8192, 16384)
BETA = 0.5


def _jsd(s, t):
    ls, lt = F.log_softmax(s.float(), -1), F.log_softmax(t.float(), -1)
    m = torch.logsumexp(torch.stack([ls + math.log(1 - BETA), lt + math.log(BETA)]), 0)
    jsd = BETA * F.kl_div(m, lt, reduction="none", log_target=True) + \
        (1 - BETA) * F.kl_div(m, ls, reduction="none", log_target=True)
    return jsd.sum() / s.shape[0]


def eager_linear(h, w, ht, wt):
    with torch.no_grad():
        t = ht @ wt.t()
    return _jsd(h @ w.t(), t)


def ours_linear(h, w, ht, wt):
    return fused_linear_distillation(h, w, (ht, wt), divergence="jsd", beta=BETA,
                                     kd_denom=h.shape[0])


def eager_logits(s, t):
    return _jsd(s, t)


def ours_logits(s, t):
    return distillation_loss(s, t, divergence="jsd", beta=BETA, kd_denom=s.shape[0])


def _liger_jsd():
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except Exception:
        return None
    mod = LigerFusedLinearJSD(jsd_beta=BETA)
    return lambda h, w, ht, wt: mod(h, w, ht, wt)


def _dims(device, vocab):
    return (1000, 64) if device.type == "cpu" else (vocab, HIDDEN)


def _linear_case(vocab):
    def make(n, device, dtype):
        V, H = _dims(device, vocab)
        h = torch.randn(n, H, device=device, dtype=dtype, requires_grad=True)
        w = (torch.randn(V, H, device=device, dtype=dtype) * H**-0.5).requires_grad_()
        ht = torch.randn(n, H, device=device, dtype=dtype)
        wt = torch.randn(V, H, device=device, dtype=dtype) * H**-0.5
        mm = 2 * n * V * H
        return Case(f"n{n}_v{V}_h{H}", n, (h, w, ht, wt), None, fwd_flops=2 * mm,
                    bwd_flops=2 * mm)
    return make


def _logits_case(n, device, dtype):
    V, _ = _dims(device, 128256)
    s = torch.randn(n, V, device=device, dtype=dtype, requires_grad=True)
    t = torch.randn(n, V, device=device, dtype=dtype)
    elt = s.element_size()
    return Case(f"n{n}_v{V}", n, (s, t), None, 2 * n * V * elt, 3 * n * V * elt)


OPS = [
    OpBench(f"fused_linear_distillation_v{v // 1000}k", "distillation", _linear_case(v), TOKENS,
            (16,), "tokens", eager=eager_linear, liger=ours_linear, liger_kernel=_liger_jsd,
            bound="compute")
    for v in (32000, 128256)
] + [
    OpBench("distillation_loss", "distillation", _logits_case, TOKENS, (16,), "tokens",
            eager=eager_logits, liger=ours_logits),
]
