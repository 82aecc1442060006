"""Benchmark per-token log-probs from an lm head inside a DPO step (liger::fused_linear_logprob).

Case: hidden [2B, T, H] (chosen rows first, then rejected), lm-head weight [V, H], token ids,
reference log-probs; the step computes per-token log-probs (temperature 0.9), masks and sums them
per sequence and takes TRL's sigmoid DPO loss.  Variants (benchmarks/harness.py): eager (HF/TRL
style: logits.float(), log_softmax, gather), inductor (torch.compile of eager), ours (the
same loss on `fused_linear_logprob`) and Liger-Kernel's chunked `LigerFusedLinearDPOLoss` when
installed (its own DPO: the same sigmoid loss on summed log-probs, computed chunk by chunk).

Matmul FLOPs are counted as eager does them: 2NVH forward, 4NVH backward (d_hidden, d_weight);
ours spends 2NVH more in backward (the chunk logits are recomputed, 8NVH total = 1.33x eager),
so TFLOP/s here reads against what the step needs, not what ours does.

    python benchmarks/run.py --ops fused_linear_logprob_v32k fused_linear_logprob_v128k
    python benchmarks/run.py --smoke     # every op at tiny sizes on the CPU
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harness import Case, OpBench
from ligerfx.kernels.fused_linear_logprob import fused_linear_logprob

HIDDEN = 4096
TOKENS = (4096, 8192, 16384)
TEMPERATURE, BETA = 0.9, 0.1
SEQ = 512  # tokens per sequence (the smoke run uses 16)


def _dpo(per_token, mask, ref_chosen, ref_rejected):
    logps = (per_token * mask).sum(-1)
    n = logps.shape[0] // 2
    z = (logps[:n] - logps[n:]) - (ref_chosen - ref_rejected)
    return -F.logsigmoid(BETA * z).mean()


def eager_dpo(h, w, ids, mask, ref_chosen, ref_rejected):
    logits = (h @ w.t()).float() / TEMPERATURE
    per_token = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return _dpo(per_token, mask, ref_chosen, ref_rejected)


def ours_dpo(h, w, ids, mask, ref_chosen, ref_rejected):
    per_token = fused_linear_logprob(h, w, ids, temperature=TEMPERATURE)
    return _dpo(per_token, mask, ref_chosen, ref_rejected)


def liger_kernel_dpo():
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    except Exception:
        return None
    loss_fn = LigerFusedLinearDPOLoss(beta=BETA, compute_nll_loss=False, use_ref_model=False)

    def run(h, w, ids, mask, ref_chosen, ref_rejected):
        # Liger's temperature-free DPO on its own [2B, T] targets (-100 = masked): same matmuls
        target = torch.where(mask.bool(), ids, -100)
        out = loss_fn(w, h, target)
        return out[0] if isinstance(out, tuple) else out
    return run


def _dims(device):
    return (1000, 64, 16) if device.type == "cpu" else (None, HIDDEN, SEQ)


def _case(vocab):
    def make(n, device, dtype):
        v_smoke, hidden, seq = _dims(device)
        V = v_smoke or vocab
        rows = max(2, n // seq)
        rows += rows % 2
        h = torch.randn(rows, seq, hidden, device=device, dtype=dtype, requires_grad=True)
        w = (torch.randn(V, hidden, device=device, dtype=dtype) * hidden**-0.5).requires_grad_()
        ids = torch.randint(0, V, (rows, seq), device=device)
        mask = (torch.rand(rows, seq, device=device) > 0.1).float()
        ref = -seq * 8 - torch.rand(rows, device=device)
        N = rows * seq
        mm = 2 * N * V * hidden
        return Case(f"n{N}_v{V}_h{hidden}", N, (h, w, ids, mask, ref[: rows // 2],
                                                 ref[rows // 2:]), None,
                    fwd_flops=mm, bwd_flops=2 * mm)
    return make


OPS = [
    OpBench(f"fused_linear_logprob_v{v // 1024}k", "fused_linear_logprob", _case(v), TOKENS, (32,),
            "tokens", eager=eager_dpo, liger=ours_dpo, liger_kernel=liger_kernel_dpo,
            bound="compute")
    for v in (32768, 131072)
]
