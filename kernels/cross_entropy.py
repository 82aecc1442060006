"""Cross-entropy over a large vocabulary: loss and logits gradient in one forward kernel.

Semantics (2-D case; leading dims of `logits` are flattened, the class dim is the LAST one)::

    z    = logits.float() * logit_scale
    z    = softcap * tanh(z / softcap)            # only when softcap > 0
    loss = F.cross_entropy(z, target, weight=weight, ignore_index=ignore_index,
                           reduction=reduction, label_smoothing=label_smoothing)
         + z_loss
    z_loss = lse_square_scale * logsumexp(z, -1) ** 2   per non-ignored row, then reduced:
             "mean" divides by the NUMBER of non-ignored rows (unweighted, as Liger/PaLM do),
             "sum" sums, "none" keeps rows (ignored rows are 0).

Weighted mean and label smoothing follow torch exactly (mean divides the whole loss, smoothing term
included, by the sum of weight[target] over non-ignored rows; with every row ignored "mean" gives
nan, as torch does, and the gradient is 0).

Ops
---
``liger::cross_entropy(Tensor logits, Tensor target, Tensor? weight=None, int ignore_index=-100,
str reduction="mean", float label_smoothing=0., float lse_square_scale=0., float softcap=0.,
float logit_scale=1., bool compute_grad=True) -> (Tensor loss, Tensor z_loss, Tensor grad_logits)``

* ``loss``: fp32 (fp64 for fp64 logits); shape ``()`` for mean/sum, ``target.shape`` for "none".
  Includes the z-loss term.
* ``z_loss``: same shape/dtype; the z-loss part alone, for logging. Not differentiable.
* ``grad_logits``: d(loss)/d(logits) in the compute dtype (fp32; fp64 for fp64 logits) and the
  logits' shape, computed in the forward pass (for "none": d(loss[i])/d(logits[i]) per row).
  Empty (numel 0) when ``compute_grad`` is False. Not differentiable. Kept unrounded because
  eager rounds the logits' gradient to their dtype once, after the upstream gradient scales it:
  a bf16 copy scaled later would be rounded twice (bf16 logits' gradients up to 1.5x eager's
  error under a per-token upstream gradient).

``liger::cross_entropy_backward(Tensor grad_loss, Tensor grad_logits, str reduction) -> Tensor``
scales the stored gradient by grad_output (a scalar, or one value per row for "none"); the
autograd formula then rounds it once to the logits' dtype.

The gradient is a freshly allocated tensor, not written over the logits: torch.library does not
allow an autograd formula on an op that mutates its inputs ("register_autograd ... non-functional
operator"), and a functionalized mutation of a graph intermediate is turned back into a copy by
AOTAutograd unless a later reinplacing pass removes it, so an in-place op would not save memory
reliably. The logits themselves are not saved for backward, so once nothing else reads them they
are freed after the forward and the peak holds logits + grad once, not logits + softmax + grad.
The launcher does support ``grad_out=logits`` (in-place); fused_linear_cross_entropy uses that
on its private chunk buffers.

Kernel: one program per row; pass 1 streams the row in BLOCK_V chunks keeping an online
max/sum-exp (plus sum of weight*z for smoothing), pass 2 re-reads the row and writes the gradient.
An ignored row is read once, without exp, and written 0, or NaN where eager's log_softmax is NaN
(a +inf or NaN logit, or all -inf: eager's backward gives even an ignored row NaN there).
Reduction denominators are computed with tensor ops on the host (no device sync) and read by the
kernel from a small stats tensor.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .runtime import cpu_decomposition, next_pow2, use_triton
from .triton_math import effective_logits, logits_grad_

try:
    import triton
    import triton.language as tl

    from .rounding import cast_rne
    from .triton_math import load_logits, logits_grad
except ImportError:  # pragma: no cover - torch path only
    triton = None

_REDUCTIONS = ("mean", "sum", "none")
# Rows per step of the torch implementation, chosen so its few [rows, V] fp32 temporaries stay
# around this many bytes each (the memory saving of the chunked loss must hold on CPU too).
_TORCH_CHUNK_BYTES = 32 << 20
# BLOCK_V override (tests force several vocabulary blocks per row); None = automatic.
CE_BLOCK_V: Optional[int] = None


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _ce_fwd_kernel(
        X, stride_x, G, stride_g, T, W, LOSS, ZLOSS, STATS, ROWSCALE,
        V, ignore_index, eps, z_coef, softcap, logit_scale,
        HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        HAS_ZLOSS: tl.constexpr, COMPUTE_GRAD: tl.constexpr, HAS_ROWSCALE: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        # int64 row offsets: N * V exceeds 2**31 at 16k tokens x 256k vocab.
        row = tl.program_id(0).to(tl.int64)
        x_row = X + row * stride_x
        g_row = G + row * stride_g
        tgt = tl.load(T + row).to(tl.int64)
        cols0 = tl.arange(0, BLOCK_V)

        if tgt == ignore_index:
            tl.store(LOSS + row, 0.0)
            tl.store(ZLOSS + row, 0.0)
            if COMPUTE_GRAD:
                # Eager's log_softmax is NaN throughout a row that holds a NaN or a +inf (inf -
                # inf) or is all -inf, and its backward carries that into an ignored row too
                # (0 - exp(nan) * 0): one read of the row, without exp, says which it is.
                n_bad = 0
                m_ig = -float("inf")
                for off in range(0, V, BLOCK_V):
                    cols = off + cols0
                    mask = cols < V
                    z, _ = load_logits(x_row, cols, mask, softcap, logit_scale, HAS_SOFTCAP)
                    n_bad += tl.sum(tl.where(mask & ((z != z) | (z == float("inf"))), 1, 0), 0)
                    m_ig = tl.maximum(m_ig, tl.max(tl.where(mask, z, -float("inf")), 0))
                fill = 0.0
                if n_bad > 0 or m_ig == -float("inf"):
                    fill = float("nan")
                for off in range(0, V, BLOCK_V):
                    cols = off + cols0
                    tl.store(g_row + cols, tl.full([BLOCK_V], fill, tl.float32).to(
                        G.dtype.element_ty), mask=cols < V)
            return

        # Pass 1: online logsumexp (and sum of w*z for label smoothing).
        m = -float("inf")
        d = 0.0
        sum_wz = 0.0
        for off in range(0, V, BLOCK_V):
            cols = off + cols0
            mask = cols < V
            z, _ = load_logits(x_row, cols, mask, softcap, logit_scale, HAS_SOFTCAP)
            if HAS_SMOOTHING:  # before masked lanes become -inf (0 * -inf would be nan)
                if HAS_WEIGHT:
                    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                    sum_wz += tl.sum(tl.where(mask, w * z, 0.0), 0)
                else:
                    sum_wz += tl.sum(tl.where(mask, z, 0.0), 0)
            z = tl.where(mask, z, -float("inf"))
            m_new = tl.maximum(m, tl.max(z, 0))
            # shifted by 0 while every logit so far is -inf, as logsumexp: by -inf, the sum of a
            # leading all -inf block was exp(-inf + inf) = NaN and the row's loss NaN, eager's not
            m_s = tl.where(m_new == -float("inf"), 0.0, m_new)
            d = d * tl.exp(m - m_s) + tl.sum(tl.exp(z - m_s), 0)
            m = m_new
        # log-probabilities as eager's log_softmax forms them, (z - max) - log(sum): with
        # z - lse instead, lse = max + log(sum) rounds log(sum) away when max is large (a row
        # spread over hundreds), and the target's gradient p_t - 1 becomes 0 where eager's is not
        logd = tl.log(d)
        lse = m + logd

        # A target outside [0, V) is an error in eager; masked, it reads 0 instead of memory.
        z_t, th_t = load_logits(x_row, tgt, (tgt >= 0) & (tgt < V), softcap, logit_scale,
                             HAS_SOFTCAP)
        if HAS_WEIGHT:
            w_t = tl.load(W + tgt).to(tl.float32)
        else:
            w_t = 1.0
        w_tot = tl.load(STATS + 2)  # sum of class weights (V when unweighted)
        ce = (1.0 - eps) * w_t * -((z_t - m) - logd)
        if HAS_SMOOTHING:
            ce += eps / V * (lse * w_tot - sum_wz)
        tl.store(LOSS + row, ce)
        if HAS_ZLOSS:
            tl.store(ZLOSS + row, z_coef * lse * lse)
        else:
            tl.store(ZLOSS + row, 0.0)

        if COMPUTE_GRAD:
            # Pass 2: d loss / d z_j = a*[(1-eps) w_t (p_j - [j==t]) + eps/V (w_tot p_j - w_j)]
            #                         + b * 2 z_coef lse p_j,   a, b = reduction scales.
            a = tl.load(STATS + 0)
            b = tl.load(STATS + 1)
            if HAS_ROWSCALE:
                r = tl.load(ROWSCALE + row).to(tl.float32)
                a = a * r
                b = b * r
            p_coef = a * ((1.0 - eps) * w_t + eps * w_tot / V)
            if HAS_ZLOSS:
                p_coef += b * 2.0 * z_coef * lse
            t_coef = a * (1.0 - eps) * w_t
            s_coef = a * eps / V
            for off in range(0, V, BLOCK_V):
                cols = off + cols0
                mask = cols < V
                z, th = load_logits(x_row, cols, mask, softcap, logit_scale, HAS_SOFTCAP)
                g = tl.exp((z - m) - logd) * p_coef
                if HAS_SMOOTHING:
                    if HAS_WEIGHT:
                        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                        g -= s_coef * w
                    else:
                        g -= s_coef
                g = logits_grad(tl.where(cols == tgt, g - t_coef, g), th, logit_scale, HAS_SOFTCAP)
                # Safe in place (G == X): this block was read above, before it is written.
                tl.store(g_row + cols, cast_rne(g, G.dtype.element_ty), mask=mask)

    @triton.jit
    def _scale_rows_kernel(G, stride_g, S, stride_s, OUT, stride_o, V, BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        s = tl.load(S + row * stride_s).to(tl.float32)
        cols0 = tl.arange(0, BLOCK_V)
        for off in range(0, V, BLOCK_V):
            cols = off + cols0
            mask = cols < V
            g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(OUT + row * stride_o + cols, cast_rne(g * s, OUT.dtype.element_ty),
                     mask=mask)


def _block_and_warps(V: int, device: torch.device, block_v: int | None):
    if block_v is None:
        block_v = CE_BLOCK_V
    if block_v is None:
        # Big enough to stream a 128k-256k row in few iterations, small enough to stay in registers.
        block_v = min(next_pow2(V), 8192 if device.type == "cuda" else 1024)
    num_warps = 16 if block_v >= 8192 else 8 if block_v >= 2048 else 4
    return block_v, num_warps


def launch_ce_forward(
    logits: Tensor, target: Tensor, weight: Optional[Tensor], stats: Tensor,
    loss_rows: Tensor, z_rows: Tensor, grad_out: Optional[Tensor], *,
    ignore_index: int, label_smoothing: float, lse_square_scale: float, softcap: float,
    logit_scale: float, row_scale: Optional[Tensor] = None, block_v: int | None = None,
) -> None:
    """Run the row kernel on 2-D `logits` (unit column stride).

    Writes per-row CE loss (unreduced, unscaled) into `loss_rows`, per-row z-loss into `z_rows`
    and, when `grad_out` is given (it may be `logits` itself), the gradient scaled by
    stats[0] (CE part) / stats[1] (z part) and by `row_scale[row]` if given.
    `stats` = fp32 [ce_scale, z_scale, sum_of_class_weights].
    """
    N, V = logits.shape
    if N == 0:
        return
    assert logits.stride(1) == 1 and (grad_out is None or grad_out.stride(1) == 1)
    block, warps = _block_and_warps(V, logits.device, block_v)
    g = grad_out if grad_out is not None else logits  # dummy pointer when not computing the grad
    _ce_fwd_kernel[(N,)](
        logits, logits.stride(0), g, g.stride(0), target,
        weight if weight is not None else stats, loss_rows, z_rows, stats,
        row_scale if row_scale is not None else stats,
        V, ignore_index, float(label_smoothing), float(lse_square_scale),
        float(softcap) if softcap > 0 else 1.0, float(logit_scale),
        HAS_WEIGHT=weight is not None, HAS_SMOOTHING=label_smoothing > 0,
        HAS_SOFTCAP=softcap > 0, HAS_ZLOSS=lse_square_scale != 0,
        COMPUTE_GRAD=grad_out is not None, HAS_ROWSCALE=row_scale is not None,
        BLOCK_V=block, num_warps=warps,
    )


def launch_scale_rows(grad: Tensor, scale: Tensor, out: Tensor, block_v: int | None = None) -> None:
    """out[i, :] = grad[i, :] * scale[i] (scale may be a 0-d tensor: same value for every row)."""
    N, V = grad.shape
    if N == 0:
        return
    block, warps = _block_and_warps(V, grad.device, block_v)
    stride_s = 0 if scale.dim() == 0 else scale.stride(0)
    _scale_rows_kernel[(N,)](grad, grad.stride(0), scale, stride_s, out, out.stride(0), V,
                             BLOCK_V=block, num_warps=warps)


# --------------------------------------------------------------------------------------------
# Torch implementation (CPU, other dtypes) - same formulas as the kernel, processed in row chunks
# --------------------------------------------------------------------------------------------
def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduction_stats(target: Tensor, weight: Optional[Tensor], ignore_index: int, reduction: str,
                    V: int, dtype: torch.dtype):
    """(stats, denom_ce, denom_z) from tensor ops only (no host sync).

    stats = [1/denom_ce, 1/denom_z, sum(weight)] for mean, [1, 1, sum(weight)] otherwise.
    """
    valid = target != ignore_index
    if weight is not None:
        w = weight.to(dtype)
        w_t = torch.where(valid, w[torch.where(valid, target, 0)], 0)
        w_tot = w.sum()
    else:
        w_t = valid.to(dtype)
        w_tot = torch.tensor(float(V), dtype=dtype, device=target.device)
    if reduction == "mean":
        denom_ce = w_t.sum()
        denom_z = valid.sum().to(dtype)
    else:
        denom_ce = denom_z = torch.ones((), dtype=dtype, device=target.device)
    stats = torch.stack([1.0 / denom_ce, 1.0 / denom_z, w_tot]).to(dtype)
    return stats, denom_ce, denom_z


def ce_rows_torch(
    logits: Tensor, target: Tensor, weight: Optional[Tensor], stats: Tensor,
    loss_rows: Tensor, z_rows: Tensor, grad_out: Optional[Tensor], *,
    ignore_index: int, label_smoothing: float, lse_square_scale: float, softcap: float,
    logit_scale: float, row_scale: Optional[Tensor] = None, chunk_rows: int | None = None,
) -> None:
    """Torch twin of launch_ce_forward (same arguments and outputs)."""
    N, V = logits.shape
    ct = stats.dtype
    eps = float(label_smoothing)
    w = weight.to(ct) if weight is not None else None
    if chunk_rows is None:
        # [rows, V] temporaries exist only for an upcast / scaled copy of the logits, softcap's
        # tanh, smoothing's z * w, or a gradient buffer of another dtype (or none); without them
        # the rows are done in one step: fewer passes and parallel regions, no extra memory.
        temps = logits.dtype != ct or logit_scale != 1.0 or softcap > 0 or \
            (eps > 0 and w is not None) or grad_out is None or grad_out.dtype != ct
        chunk_rows = max(1, _TORCH_CHUNK_BYTES // max(1, V * 4)) if temps else max(1, N)
    if is_plain(eps, lse_square_scale, softcap, V):
        _plain_ce_rows(logits, target, w, stats, loss_rows, z_rows, grad_out, chunk_rows,
                       ignore_index=ignore_index, logit_scale=logit_scale, row_scale=row_scale)
        return
    a_all, b_all, w_tot = stats[0], stats[1], stats[2]
    for s in range(0, N, chunk_rows):
        e = min(N, s + chunk_rows)
        x = logits[s:e]
        z, th = effective_logits(x, ct, softcap, logit_scale)
        tgt = target[s:e]
        valid = tgt != ignore_index
        t_safe = torch.where(valid, tgt, 0).unsqueeze(1)
        # Every read of z happens before exp(z - max) is written, because that buffer is the
        # gradient's, which may be the logits themselves (the fused lm head's chunk buffer).
        m = z.amax(-1) if V > 0 else z.new_zeros(e - s)
        # eager's log_softmax (so its loss and gradient, an ignored row's too) is NaN throughout
        # a row whose max is +inf; the shifted sum below gives lse = +inf there instead
        inf_max = m == float("inf")
        m = torch.where(torch.isfinite(m), m, 0)  # as logsumexp: an all -inf row stays -inf
        z_t = z.gather(1, t_safe).squeeze(1)
        if eps > 0:
            sum_wz = (z * w).sum(-1) if w is not None else z.sum(-1)
        g = grad_out[s:e] if grad_out is not None and grad_out.dtype == ct else torch.empty_like(z)
        torch.sub(z, m.unsqueeze(1), out=g)
        g.exp_()
        sum_exp = g.sum(-1)
        lse = m + torch.log(sum_exp)
        w_t = w[t_safe.squeeze(1)] if w is not None else torch.ones_like(lse)
        ce = (1.0 - eps) * w_t * (lse - z_t)
        if eps > 0:
            ce = ce + eps / V * (lse * w_tot - sum_wz)
        loss_rows[s:e] = torch.where(valid, torch.where(inf_max, float("nan"), ce), 0)
        z_rows[s:e] = torch.where(valid, lse_square_scale * lse * lse, 0)
        if grad_out is None:
            continue
        a, b = a_all, b_all
        if row_scale is not None:
            r = row_scale[s:e].to(ct)
            a, b = a * r, b * r
        # where, not multiply, after the scale: a_all is inf under "mean" when every row is
        # ignored, and an ignored row stays 0 under an inf / nan upstream gradient
        a, b = torch.where(valid, a, 0), torch.where(valid, b, 0)
        p_coef = a * ((1.0 - eps) * w_t + eps * w_tot / V) + b * 2.0 * lse_square_scale * lse
        p_coef = torch.where(inf_max, float("nan"), p_coef)  # the whole row NaN, as eager's
        g.mul_((p_coef / sum_exp).unsqueeze(1))  # softmax * coefficient, in one pass
        if eps > 0:
            g -= (a * eps / V).unsqueeze(1) * (w if w is not None else 1.0)
        g.scatter_add_(1, t_safe, (-(a * (1.0 - eps) * w_t)).unsqueeze(1))
        logits_grad_(g, th, logit_scale)
        if g.dtype != grad_out.dtype:
            grad_out[s:e] = g


def _plain_ce_rows(logits, target, w, stats, loss_rows, z_rows, grad_out, chunk_rows, *,
                   ignore_index, logit_scale, row_scale):
    """ce_rows_torch without smoothing, z-loss or softcap (the common case), as eager computes it:
    the loss is -w_t * log_softmax(z)[t] and the gradient exp(log_softmax(z)) * coef - coef at t
    (nll_loss and _log_softmax_backward_data's formulas), so three passes over each [rows, V]
    block (log_softmax, exp, scale) where the general path needs five (max, sub, exp, sum,
    scale). The z-loss rows are 0 (its scale is 0)."""
    N, V = logits.shape
    ct = stats.dtype
    a_all = stats[0]
    z_rows.zero_()
    for s in range(0, N, chunk_rows):
        e = min(N, s + chunk_rows)
        x = logits[s:e]
        z, _ = effective_logits(x, ct, 0.0, logit_scale)
        tgt = target[s:e]
        valid = tgt != ignore_index
        t_safe = torch.where(valid, tgt, 0).unsqueeze(1)
        # log_softmax reads a row completely before writing it, so g may be z itself (the fused
        # lm head's chunk buffer holds the logits and then their gradient).
        g = grad_out[s:e] if grad_out is not None and grad_out.dtype == ct else torch.empty_like(z)
        torch.log_softmax(z, -1, out=g)
        w_t = w[t_safe.squeeze(1)] if w is not None else None
        ls_t = g.gather(1, t_safe).squeeze(1)
        ce = -ls_t if w_t is None else w_t * -ls_t
        loss_rows[s:e] = torch.where(valid, ce, 0)
        if grad_out is None:
            continue
        a = a_all * row_scale[s:e].to(ct) if row_scale is not None else a_all
        # where, not multiply, after the scale: a_all is inf when all are ignored, and an ignored
        # row stays 0 under an inf / nan upstream gradient
        a = torch.where(valid, a, 0)
        coef = a if w_t is None else a * w_t
        g.exp_()
        g.mul_(coef.unsqueeze(1))
        g.scatter_add_(1, t_safe, (-coef).unsqueeze(1))
        logits_grad_(g, None, logit_scale)
        if g.dtype != grad_out.dtype:
            grad_out[s:e] = g


def plain_ce_functional(z: Tensor, target: Tensor, weight: Optional[Tensor], a_all: Tensor, *,
                        ignore_index: int, logit_scale: float, want_grad: bool):
    """_plain_ce_rows on fresh tensors instead of buffers: (loss_rows, grad or None) in a_all's
    dtype, grad for grad_output = 1 scaled by a_all (1/denominator under "mean").

    This is what the CPU decompositions hand inductor: it fuses the row reductions and the
    gradient into one loop over each row, where the torch path makes three passes over [rows, V]
    (log_softmax, exp, scale). Same formulas as _plain_ce_rows, so the same values up to the
    rounding of a fused exp/log."""
    ct = a_all.dtype
    x, _ = effective_logits(z, ct, 0.0, logit_scale)
    valid = target != ignore_index
    t_safe = torch.where(valid, target, 0).unsqueeze(1)
    ls = torch.log_softmax(x, -1)
    w_t = weight.to(ct)[t_safe.squeeze(1)] if weight is not None else None
    ls_t = ls.gather(1, t_safe).squeeze(1)
    loss_rows = torch.where(valid, -ls_t if w_t is None else w_t * -ls_t, 0)
    if not want_grad:
        return loss_rows, None
    a = torch.where(valid, a_all, 0)  # where, not multiply: a_all is inf when all are ignored
    coef = a if w_t is None else a * w_t
    g = (ls.exp() * coef.unsqueeze(1)).scatter_add(1, t_safe, (-coef).unsqueeze(1))
    return loss_rows, (g * logit_scale if logit_scale != 1.0 else g)


def is_plain(label_smoothing: float, lse_square_scale: float, softcap: float, V: int) -> bool:
    """No smoothing, z-loss or softcap: the log_softmax formulation applies."""
    return label_smoothing == 0 and lse_square_scale == 0 and softcap <= 0 and V > 0


def plain_ce_loss(x: Tensor, t: Tensor, weight: Optional[Tensor], ignore_index: int,
                  reduction: str, logit_scale: float, want_grad: bool, target_shape):
    """(loss, z_loss, grad or None) of a plain loss on [N, V] logits x, from fresh tensors: the
    CPU decompositions' body (liger::cross_entropy's, the fused lm head's logits mode)."""
    ct = compute_dtype(x.dtype)
    stats, denom_ce, denom_z = reduction_stats(t, weight, ignore_index, reduction, x.shape[1], ct)
    loss_rows, g = plain_ce_functional(x, t, weight, stats[0], ignore_index=ignore_index,
                                       logit_scale=logit_scale, want_grad=want_grad)
    loss, z = reduce_rows(loss_rows, torch.zeros_like(loss_rows), denom_ce, denom_z, reduction,
                          target_shape, False)
    return loss, z, g


def _rows_2d(logits: Tensor, target: Tensor):
    V = logits.shape[-1]
    x = logits.reshape(-1, V)
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x, target.reshape(-1).contiguous()


def reduce_rows(loss_rows, z_rows, denom_ce, denom_z, reduction, target_shape, has_z):
    if reduction == "none":
        return (loss_rows + z_rows).view(target_shape), z_rows.view(target_shape)
    ce = loss_rows.sum()
    z = z_rows.sum()
    if reduction == "mean":
        ce = ce / denom_ce  # 0/0 = nan when every row is ignored, as torch
        z = z / denom_z
    return (ce + z if has_z else ce), z


# --------------------------------------------------------------------------------------------
# Ops
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("liger::cross_entropy", mutates_args=())
def cross_entropy_op(
    logits: Tensor, target: Tensor, weight: Optional[Tensor] = None, ignore_index: int = -100,
    reduction: str = "mean", label_smoothing: float = 0.0, lse_square_scale: float = 0.0,
    softcap: float = 0.0, logit_scale: float = 1.0, compute_grad: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    assert reduction in _REDUCTIONS, reduction
    x, t = _rows_2d(logits, target)
    N, V = x.shape
    ct = compute_dtype(logits.dtype)
    stats, denom_ce, denom_z = reduction_stats(t, weight, ignore_index, reduction, V, ct)
    loss_rows = torch.empty(N, dtype=ct, device=x.device)
    z_rows = torch.empty(N, dtype=ct, device=x.device)
    grad = torch.empty(x.shape, dtype=ct, device=x.device) if compute_grad else None
    kw = dict(ignore_index=ignore_index, label_smoothing=label_smoothing,
              lse_square_scale=lse_square_scale, softcap=softcap, logit_scale=logit_scale)
    if use_triton(x):
        launch_ce_forward(x, t, weight, stats, loss_rows, z_rows, grad, **kw)
    else:
        ce_rows_torch(x, t, weight, stats, loss_rows, z_rows, grad, **kw)
    loss, z = reduce_rows(loss_rows, z_rows, denom_ce, denom_z, reduction, target.shape,
                      lse_square_scale != 0)
    grad = grad.view(logits.shape) if compute_grad else logits.new_empty(0)
    return loss, z, grad


@cross_entropy_op.register_fake
def _(logits, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
      lse_square_scale=0.0, softcap=0.0, logit_scale=1.0, compute_grad=True):
    ct = compute_dtype(logits.dtype)
    shape = target.shape if reduction == "none" else ()
    loss = logits.new_empty(shape, dtype=ct)
    z = logits.new_empty(shape, dtype=ct)
    grad = logits.new_empty(logits.shape, dtype=ct) if compute_grad else logits.new_empty(0)
    return loss, z, grad


def _cross_entropy_cpu(logits, target, weight=None, ignore_index=-100, reduction="mean",
                       label_smoothing=0.0, lse_square_scale=0.0, softcap=0.0, logit_scale=1.0,
                       compute_grad=True):
    """CPU decomposition of liger::cross_entropy (plain losses, _ce_cpu_applies; the others keep
    the op): the forward's loss and gradient as one fused inductor loop per row, the partitioner
    free to recompute the gradient in the backward as inductor does for F.cross_entropy."""
    x, t = _rows_2d(logits, target)
    loss, z, g = plain_ce_loss(x, t, weight, ignore_index, reduction, logit_scale, compute_grad,
                               target.shape)
    grad = g.view(logits.shape) if compute_grad else logits.new_empty(0)
    return loss, z, grad


def _ce_cpu_applies(logits, target, weight=None, ignore_index=-100, reduction="mean",
                    label_smoothing=0.0, lse_square_scale=0.0, softcap=0.0, *_, **__):
    return is_plain(label_smoothing, lse_square_scale, softcap, logits.shape[-1])


def _scale_rows_torch(grad_loss: Tensor, grad_logits: Tensor, reduction: str) -> Tensor:
    g = grad_logits.reshape(-1, grad_logits.shape[-1])
    s = grad_loss.reshape(-1, 1) if reduction == "none" else grad_loss.reshape(())
    return (g.to(compute_dtype(g.dtype)) * s).to(g.dtype).view(grad_logits.shape)


@torch.library.custom_op("liger::cross_entropy_backward", mutates_args=())
def cross_entropy_backward_op(grad_loss: Tensor, grad_logits: Tensor, reduction: str) -> Tensor:
    V = grad_logits.shape[-1]
    g = grad_logits.reshape(-1, V)
    if not use_triton(g, grad_loss):
        return _scale_rows_torch(grad_loss, grad_logits, reduction)
    s = grad_loss.reshape(-1) if reduction == "none" else grad_loss.reshape(())
    out = torch.empty_like(g)
    launch_scale_rows(g, s.contiguous(), out)
    return out.view(grad_logits.shape)


@cross_entropy_backward_op.register_fake
def _(grad_loss, grad_logits, reduction):
    return torch.empty_like(grad_logits)


def _ce_setup_context(ctx, inputs, output):
    _, _, grad = output
    ctx.reduction = inputs[4]
    ctx.compute_grad = inputs[9]
    ctx.logits_dtype = inputs[0].dtype
    ctx.ignore_index = inputs[3]
    ctx.smoothing = inputs[5] > 0
    ctx.mark_non_differentiable(output[1], grad)
    # a copy: the caller may write the labels in place after the loss (a version-checked saved
    # input would then fail the backward), and the backward reads them only for its non-finite
    # rows (O(rows))
    ctx.save_for_backward(grad, inputs[1].clone())


def _eager_nonfinite_rows(grad_loss, target, reduction, ignore_index, smoothing):
    """(per-row upstream gradient, label positions to set to NaN): eager's convention where the
    upstream gradient is inf or nan, at O(rows) cost.  The stored gradient G (for grad_output 1)
    times s is eager's p*c - [j == t]*c (c = a*s) except there: eager's nll_loss backward leaves
    an ignored row 0 whatever s is (G*s: 0*inf = nan), and at the label p*inf - inf is NaN (G*s:
    (p - 1)*inf = inf); with label smoothing every class has such a difference (the whole row
    NaN).  (Issue 22, logprob survey seed 95: `exp(logprob - old)` overflowing to inf.)"""
    t = target.reshape(-1)
    s = grad_loss.reshape(-1) if reduction == "none" else grad_loss.reshape(()).expand(t.shape)
    valid = t != ignore_index
    inf = valid & torch.isinf(s)
    s = torch.where(valid, s, 0)
    if smoothing:  # every class: NaN, as s * nan
        s = torch.where(inf, float("nan"), s)
    return s, (None if smoothing else inf)


def _ce_backward(ctx, grad_loss, grad_z, grad_grad):
    grad, target = ctx.saved_tensors
    if grad_loss is None or not ctx.needs_input_grad[0]:
        return (None,) * 10
    if not ctx.compute_grad:
        raise RuntimeError("liger::cross_entropy was called with compute_grad=False; "
                           "it cannot be differentiated")
    s, label_nan = _eager_nonfinite_rows(grad_loss, target, ctx.reduction, ctx.ignore_index,
                                         ctx.smoothing)
    # per row: the same products as the scalar's, with eager's non-finite rows (above)
    g = torch.ops.liger.cross_entropy_backward(s.contiguous(), grad, "none")
    if label_nan is not None:
        V = g.shape[-1]
        rows = g.view(-1, V)
        t = torch.where(label_nan, target.reshape(-1), 0).long().unsqueeze(1)
        at = rows.gather(1, t)
        rows.scatter_(1, t, torch.where(label_nan.unsqueeze(1), float("nan"), at))
    return (g.to(ctx.logits_dtype),) + (None,) * 9  # the one rounding, as eager's


cross_entropy_op.register_autograd(_ce_backward, setup_context=_ce_setup_context)
cpu_decomposition(torch.ops.liger.cross_entropy, applies=_ce_cpu_applies)(_cross_entropy_cpu)
cpu_decomposition(torch.ops.liger.cross_entropy_backward)(_scale_rows_torch)


def cross_entropy(
    logits: Tensor, target: Tensor, weight: Optional[Tensor] = None, ignore_index: int = -100,
    reduction: str = "mean", label_smoothing: float = 0.0, lse_square_scale: float = 0.0,
    softcap: float = 0.0, logit_scale: float = 1.0, return_z_loss: bool = False,
):
    """Cross-entropy loss (see module docstring); returns loss, or (loss, z_loss)."""
    need_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, z, _ = torch.ops.liger.cross_entropy(
        logits, target, weight, ignore_index, reduction, label_smoothing, lse_square_scale,
        softcap, logit_scale, need_grad)
    return (loss, z) if return_z_loss else loss
