"""The `@triton.jit` pieces several kernel families use, each beside its torch twin.

One home for math that two kernel files would otherwise write twice, so a rounding or a formula
cannot drift between them:

* the lm-head logits transform z_eff = softcap * tanh(z * logit_scale / softcap) (cross_entropy,
  fused_linear_logprob): the masked load, and the chain rule back through it;
* silu and its derivative (gated_act, gated_rms_norm);
* -0.0 (fused_linear_logprob's ignored rows), which a literal does not give under triton 3.6.

Each torch twin computes what its Triton helper computes, with the same operations in the same
order, for the torch paths of the same ops.  Importable without triton (the torch twins only).
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - torch path only
    triton = None


if triton is not None:

    @triton.jit
    def tanh(x):
        # exp-based tanh: libdevice.tanh is not available in the interpreter.  Absolute error is
        # ~1 ulp of 1, which is what matters once multiplied by softcap.
        e = tl.exp(-2.0 * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(x < 0, -t, t)

    @triton.jit
    def neg_zero():
        """-0.0 in fp32, made from its bits: triton 3.6 folds the literal -0.0 into +0.0."""
        return tl.full((), -2147483648, tl.int32).to(tl.float32, bitcast=True)

    @triton.jit
    def load_logits(ptr, cols, mask, softcap, logit_scale, HAS_SOFTCAP: tl.constexpr):
        """(z_eff, dz) of the logits at ptr + cols (masked lanes load 0): z_eff in fp32, dz the
        softcap's derivative 1 - tanh^2 that logits_grad needs (z_eff itself when HAS_SOFTCAP is
        off; then unused)."""
        z = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32) * logit_scale
        dz = z
        if HAS_SOFTCAP:
            x = z / softcap
            z = softcap * tanh(x)
            # 1 - tanh^2 as 4e / (1 + e)^2, e = exp(-2|x|): no cancellation.  1 - t * t from
            # this exp-based t (about 1.5 ulp of 1 off, twice libm's) carried 11x eager's error
            # into the gradient where the cap saturates (issue 22 long run, |x| of a few)
            e = tl.exp(-2.0 * tl.abs(x))
            dz = 4.0 * e / ((1.0 + e) * (1.0 + e))
        return z, dz

    @triton.jit
    def logits_grad(g, dz, logit_scale, HAS_SOFTCAP: tl.constexpr):
        """d(loss)/d(z) from d(loss)/d(z_eff): through the softcap's tanh (dz from load_logits),
        then the scale."""
        if HAS_SOFTCAP:
            g = g * dz
        return g * logit_scale

    @triton.jit
    def silu(g):
        # eager's formula (x / (1 + exp(-x)), CPU and CUDA): the forward value and the one the
        # backward multiplies by must be the same number
        return g / (1.0 + tl.exp(-g))

    @triton.jit
    def silu_grad(g):
        """silu'(g) = s (1 + g (1 - s)), s = sigmoid(g)."""
        s = 1.0 / (1.0 + tl.exp(-g))
        return s * (1.0 + g * (1.0 - s))


def effective_logits(z: Tensor, ct: torch.dtype, softcap: float, logit_scale: float):
    """Torch twin of load_logits on a [rows, V] block: (z_eff in `ct`, th or None).

    No copy and no multiply by 1 when z already has the compute dtype (exact), so z_eff may be
    z itself: callers that write into z_eff check `z_eff is z` first."""
    ze = z if z.dtype == ct and logit_scale == 1.0 else z.to(ct) * logit_scale
    th = None
    if softcap > 0:
        th = torch.tanh(ze / softcap)
        ze = th * softcap
    return ze, th


def logits_grad_(g: Tensor, th: Tensor | None, logit_scale: float) -> Tensor:
    """Torch twin of logits_grad, in place on g (th from effective_logits).  1 - th * th, as
    eager's tanh backward: th is torch.tanh's, as close as eager's (the Triton side forms the
    derivative from exp instead, its tanh being exp-based)."""
    if th is not None:
        g.mul_(1.0 - th * th)
    if logit_scale != 1.0:
        g.mul_(logit_scale)
    return g
