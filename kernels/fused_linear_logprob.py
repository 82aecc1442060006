"""LM-head linear + per-token log-probabilities of given ids (and entropy), chunked over tokens.

Semantics (leading dims of `hidden` / `ids` are flattened; the transform order is the one of
fused_linear_cross_entropy.py: bias, then the compute dtype, then scale, then softcap)::

    z       = F.linear(hidden, weight, bias)             # in hidden's dtype, as the lm head
    z_eff   = z.float() * logit_scale                    # logit_scale = 1/temperature
    z_eff   = softcap * tanh(z_eff / softcap)            # only when softcap > 0
    logp    = log_softmax(z_eff, -1)
    logprob = logp.gather(-1, ids[..., None])[..., 0]    # rows with ids == ignore_index: -0.0
    entropy = -(logp.exp() * logp).sum(-1)               # when with_entropy (every row)
    entropy = logsumexp(z_eff) - (softmax(z_eff) * z_eff).sum(-1)   # ... and entropy_lse

Ids: a row whose id equals ``ignore_index`` gets logprob -0.0 and no gradient from it, which is
``-F.cross_entropy(z, ids, ignore_index=ii, reduction="none")`` exactly (torch's +0.0 negated);
any other id outside [0, V) is an error in eager (gather and cross_entropy raise), so callers that
may see one check first (patterns/logprob.py adds eager's check to the graph); the op itself gives
NaN for such a row on the Triton path and raises on the torch path.  The entropy does not depend
on the ids and is computed for every row.

Ops
---
``liger::fused_linear_logprob(Tensor hidden, Tensor weight, Tensor? bias, Tensor ids,
float logit_scale=1., float softcap=0., bool with_entropy=False, int ignore_index=-100,
int chunk_size=0, bool divide=False, bool entropy_lse=False, bool gather_lse=False) -> (Tensor
logprob, Tensor entropy, Tensor lse)``

``gather_lse=True``: the log-prob is spelled ``z.gather(-1, ids) - z.logsumexp(-1)`` and follows
``torch.logsumexp``'s convention in a row whose max is +inf: logsumexp is +inf there (it shifts
by 0, not by the infinite max), so the log-prob is -inf at a finite (or -inf) logit and NaN only
at a +inf one, and its gradient exp(z - lse) is 0 at every logit but the +inf ones (NaN);
log_softmax's form gives NaN for the whole row.  A row that also holds a NaN has logsumexp NaN
(the kernel's max skips NaN, so such rows are read once more to find it).  Rows with a finite max are formed as
log_softmax forms them, as for every spelling (within eager's rounding, and more accurate).
(Issue 22, logprob survey seed 1515.)

``entropy_lse=True``: the entropy is formed as the spelling ``logsumexp(z) - (softmax(z) *
z).sum(-1)`` forms it (the difference of two values of the size of the logits), not as
``-(p * logp).sum(-1)``.  The two are the same function, but not the same numbers once the logits
are large: at logits of +-1000 in fp32 a near one-hot row's entropy (1e-13, say) is far below
one ulp of the logsumexp (6e-5), so eager's spelling cancels to exactly 0 (so does its float64
reference) where the -(p * logp) sum gives the true 1e-13; in rows of mid entropy the spelling's
value is eager's cancellation noise (ulp-sized).  Convention: the op forms what the spelling forms,
lse = max + log(sum), p = exp(z - max) / sum (softmax's rounding), E[z] = sum(p * z), lse - E[z]
(exact 0 where eager's is; the summation order within the row is the kernel's, as for every
other sum here).  The gradient is the one formula below for both; with ``entropy_lse`` the
backward does not read the saved (cancelled) entropy but forms -(p * logp).sum() again from the
row (one more pass over it): the saved value's ulp-of-the-logits noise times p would be 70x
eager's gradient error (measured: 2.0e-5 vs 2.9e-7 relative, fp32, logits ~1400), where eager's
autograd of the spelling does not carry that noise into the gradient.
(Issue 22, logprob survey seed 3311.)

``divide=True`` (no softcap): the logits are divided by ``logit_scale`` (a temperature) instead of
multiplied, and the gradient divided by it, as eager's ``z / T`` rounds them: multiplying by the
rounded reciprocal is an ulp off, which the entropy of near one-hot rows (logits in the
thousands) amplifies to 3x eager's error.

* ``logprob``: shape ``ids.shape``, compute dtype (fp32; fp64 for fp64 inputs).
* ``entropy``: same shape and dtype when ``with_entropy``, else empty.
* ``lse``: per-row logsumexp of z_eff, flat ``[N]``; saved for backward, not differentiable.

``liger::fused_linear_logprob_backward(...)`` takes any upstream gradient per token for logprob
and for entropy (either may be absent) and recomputes each chunk's logits rather than storing them:

    dz_eff = g_lp * (onehot(id) - p) - g_ent * p * (logp + entropy)      (per row, fp32)
    dz     = dz_eff * (1 - tanh^2) * logit_scale, rounded once to hidden's dtype (as eager's
             gradient arrives at the lm head's output)
    d_hidden = dz @ W,  d_weight += dz^T @ hidden_chunk (fp32 across chunks),  d_bias += sum(dz)

FLOPs: eager does three [N, H] x [H, V] matmuls (forward, d_hidden, d_weight); this op does four
(the forward's logits are recomputed in backward): 4/3 = 1.33x eager's matmul FLOPs, for no
[N, V] tensor kept between forward and backward.

Chunking (`chunk_rows`, `_linear_into`, `linear_grads_` are fused_linear_cross_entropy.py's): one
[C, V] logits buffer in hidden's dtype, overwritten in place by its gradient on the Triton path.
On CPU tensors without the interpreter the op keeps this chunked torch path (it saves memory; it
is not a cpu_decomposition).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .cross_entropy import _block_and_warps, compute_dtype
from .fused_linear_cross_entropy import _flat, _linear_into, chunk_rows, linear_grads_
from .runtime import use_triton
from .triton_math import effective_logits, logits_grad_

try:
    import triton
    import triton.language as tl

    from .rounding import cast_rne
    from .triton_math import load_logits, logits_grad, neg_zero
except ImportError:  # pragma: no cover - torch path only
    triton = None


# --------------------------------------------------------------------------------------------
# Triton kernels (one program per row, the row streamed in BLOCK_V pieces)
# --------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _row_max_logsum(x_row, V, softcap, logit_scale, HAS_SOFTCAP: tl.constexpr,
                        DIVIDE: tl.constexpr, BLOCK_V: tl.constexpr):
        """(max, sum of exp(z - max)) of one row: online, streamed in blocks."""
        cols0 = tl.arange(0, BLOCK_V)
        m = -float("inf")
        d = 0.0
        for off in range(0, V, BLOCK_V):
            cols = off + cols0
            mask = cols < V
            z, _ = _load(x_row, cols, mask, softcap, logit_scale, HAS_SOFTCAP, DIVIDE)
            z = tl.where(mask, z, -float("inf"))
            m_new = tl.maximum(m, tl.max(z, 0))
            # shifted by 0 while every logit so far is -inf, as logsumexp: by -inf, a leading
            # all -inf block's sum is exp(-inf + inf) = NaN for the whole row, eager's finite
            m_s = tl.where(m_new == -float("inf"), 0.0, m_new)
            d = d * tl.exp(m - m_s) + tl.sum(tl.exp(z - m_s), 0)
            m = m_new
        return m, d

    @triton.jit
    def _load(x_row, cols, mask, softcap, logit_scale, HAS_SOFTCAP: tl.constexpr,
              DIVIDE: tl.constexpr):
        """load_logits, or the logits divided by logit_scale (a temperature) when DIVIDE."""
        if DIVIDE:
            z, th = load_logits(x_row, cols, mask, softcap, 1.0, HAS_SOFTCAP)
            z = z / logit_scale
            th = z
        else:
            z, th = load_logits(x_row, cols, mask, softcap, logit_scale, HAS_SOFTCAP)
        return z, th

    @triton.jit
    def _lse_at_inf_max(x_row, V, m, softcap, logit_scale, HAS_SOFTCAP: tl.constexpr,
                        DIVIDE: tl.constexpr, BLOCK_V: tl.constexpr):
        """torch.logsumexp of a row whose max (NaN aside: tl.max skips NaN) is +inf: +inf, or
        NaN when the row holds a NaN.  Rows with a finite max never read the row again."""
        lse = float("inf")
        if m == float("inf"):
            cols0 = tl.arange(0, BLOCK_V)
            n = 0
            for off in range(0, V, BLOCK_V):
                cols = off + cols0
                mask = cols < V
                z, _ = _load(x_row, cols, mask, softcap, logit_scale, HAS_SOFTCAP, DIVIDE)
                n += tl.sum(tl.where(mask & (z != z), 1, 0), 0)
            if n > 0:
                lse = float("nan")
        return lse

    @triton.jit
    def _logprob_fwd_kernel(
        X, stride_x, IDS, LP, ENT, LSE, V, ignore_index, softcap, logit_scale,
        HAS_SOFTCAP: tl.constexpr, WITH_ENTROPY: tl.constexpr, DIVIDE: tl.constexpr,
        ENT_LSE: tl.constexpr, GATHER_LSE: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # N * V exceeds 2**31 at 16k tokens x 256k vocab
        x_row = X + row * stride_x
        cols0 = tl.arange(0, BLOCK_V)
        # Log-probabilities are formed as eager's log_softmax forms them, (z - max) - log(sum):
        # z - lse instead rounds log(sum) away once max is large (logits spread over hundreds,
        # or scaled up), and loses the entropy's small terms to cancellation.
        m, d = _row_max_logsum(x_row, V, softcap, logit_scale, HAS_SOFTCAP, DIVIDE, BLOCK_V)
        logd = tl.log(d)
        tl.store(LSE + row, m + logd)
        tgt = tl.load(IDS + row).to(tl.int64)
        ok = (tgt >= 0) & (tgt < V)
        z_t, th_t = _load(x_row, tgt, ok, softcap, logit_scale, HAS_SOFTCAP, DIVIDE)
        lp = (z_t - m) - logd
        if GATHER_LSE:  # torch.logsumexp is +inf (NaN) in a row whose max is +inf
            lse_e = _lse_at_inf_max(x_row, V, m, softcap, logit_scale, HAS_SOFTCAP, DIVIDE,
                                    BLOCK_V)
            lp = tl.where(m == float("inf"), z_t - lse_e, lp)
        lp = tl.where(ok, lp, float("nan"))
        lp = tl.where(tgt == ignore_index, neg_zero(), lp)
        tl.store(LP + row, lp)
        if WITH_ENTROPY:
            # Pass 2: the terms the spelling sums: -(p * logp).sum(), or (ENT_LSE) E[z] =
            # (softmax(z) * z).sum() for lse - E[z] (that spelling's cancellation is eager's)
            acc = 0.0
            for off in range(0, V, BLOCK_V):
                cols = off + cols0
                mask = cols < V
                z, _ = _load(x_row, cols, mask, softcap, logit_scale, HAS_SOFTCAP, DIVIDE)
                if ENT_LSE:
                    acc += tl.sum(tl.where(mask, (tl.exp(z - m) / d) * z, 0.0), 0)
                else:
                    lg = (z - m) - logd
                    acc += tl.sum(tl.where(mask, tl.exp(lg) * lg, 0.0), 0)
            if ENT_LSE:
                tl.store(ENT + row, (m + logd) - acc)
            else:
                tl.store(ENT + row, -acc)

    @triton.jit
    def _logprob_bwd_kernel(
        X, stride_x, G, stride_g, IDS, LSE, ENT, GLP, GENT, V, ignore_index, softcap,
        logit_scale, HAS_SOFTCAP: tl.constexpr, HAS_GLP: tl.constexpr, HAS_GENT: tl.constexpr,
        DIVIDE: tl.constexpr, ENT_LSE: tl.constexpr, GATHER_LSE: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        x_row = X + row * stride_x
        g_row = G + row * stride_g
        cols0 = tl.arange(0, BLOCK_V)
        # the forward's max and log-sum again (one more pass over the row in the chunk buffer),
        # for the log-probabilities exactly as the forward formed them
        m, d = _row_max_logsum(x_row, V, softcap, logit_scale, HAS_SOFTCAP, DIVIDE, BLOCK_V)
        logd = tl.log(d)
        tgt = tl.load(IDS + row).to(tl.int64)
        a = 0.0
        if HAS_GLP:
            a = tl.where(tgt == ignore_index, 0.0, tl.load(GLP + row).to(tl.float32))
        b = 0.0
        h = 0.0
        if HAS_GENT:
            b = tl.load(GENT + row).to(tl.float32)
            if ENT_LSE:  # the saved entropy is lse - E[z]'s cancelled value: form it again
                acc = 0.0
                for off in range(0, V, BLOCK_V):
                    cols = off + cols0
                    mask = cols < V
                    z, _ = _load(x_row, cols, mask, softcap, logit_scale, HAS_SOFTCAP, DIVIDE)
                    lg = (z - m) - logd
                    acc += tl.sum(tl.where(mask, tl.exp(lg) * lg, 0.0), 0)
                h = -acc
            else:
                h = tl.load(ENT + row)
        if GATHER_LSE:
            lse_e = _lse_at_inf_max(x_row, V, m, softcap, logit_scale, HAS_SOFTCAP, DIVIDE,
                                    BLOCK_V)
        for off in range(0, V, BLOCK_V):
            cols = off + cols0
            mask = cols < V
            z, th = _load(x_row, cols, mask, softcap, logit_scale, HAS_SOFTCAP, DIVIDE)
            lg = (z - m) - logd
            p = tl.exp(lg)
            if GATHER_LSE:  # logsumexp's backward exp(z - lse): 0 but at +inf logits (NaN rows)
                p = tl.where(m == float("inf"), tl.exp(z - lse_e), p)
            g = tl.where(cols == tgt, a, 0.0) - a * p
            if HAS_GENT:
                g -= b * p * (lg + h)
            if DIVIDE:  # eager's gradient of z / T: divided by T
                g = g / logit_scale
            else:
                g = logits_grad(g, th, logit_scale, HAS_SOFTCAP)
            # Safe in place (G == X): this block was read above, before it is written.
            tl.store(g_row + cols, cast_rne(g, G.dtype.element_ty), mask=mask)


def _launch_fwd(z, ids, lp, ent, lse, *, softcap, logit_scale, ignore_index, divide=False,
                entropy_lse=False, gather_lse=False):
    N, V = z.shape
    if N == 0:
        return
    block, warps = _block_and_warps(V, z.device, None)
    _logprob_fwd_kernel[(N,)](
        z, z.stride(0), ids, lp, ent if ent is not None else lp, lse, V, ignore_index,
        float(softcap) if softcap > 0 else 1.0, float(logit_scale),
        HAS_SOFTCAP=softcap > 0, WITH_ENTROPY=ent is not None, DIVIDE=bool(divide),
        ENT_LSE=bool(entropy_lse), GATHER_LSE=bool(gather_lse), BLOCK_V=block, num_warps=warps)


def _launch_bwd(z, g, ids, lse, ent, glp, gent, *, softcap, logit_scale, ignore_index,
                divide=False, entropy_lse=False, gather_lse=False):
    N, V = z.shape
    if N == 0:
        return
    block, warps = _block_and_warps(V, z.device, None)
    _logprob_bwd_kernel[(N,)](
        z, z.stride(0), g, g.stride(0), ids, lse, ent if ent is not None else lse,
        glp if glp is not None else lse, gent if gent is not None else lse, V, ignore_index,
        float(softcap) if softcap > 0 else 1.0, float(logit_scale),
        HAS_SOFTCAP=softcap > 0, HAS_GLP=glp is not None, HAS_GENT=gent is not None,
        DIVIDE=bool(divide), ENT_LSE=bool(entropy_lse), GATHER_LSE=bool(gather_lse),
        BLOCK_V=block, num_warps=warps)


# --------------------------------------------------------------------------------------------
# Torch twins of the row kernels (CPU, fp64): same formulas on one chunk
# --------------------------------------------------------------------------------------------
def _effective(z, ct, softcap, logit_scale, divide):
    """effective_logits, or the logits divided by logit_scale (a temperature) when `divide`."""
    if divide:
        return effective_logits(z, ct, 0.0, 1.0)[0] / logit_scale, None
    return effective_logits(z, ct, softcap, logit_scale)


def _rows_fwd_torch(z, ids, lp, ent, lse, *, softcap, logit_scale, ignore_index, divide=False,
                    entropy_lse=False, gather_lse=False):
    ct = lp.dtype
    ze, _ = _effective(z, ct, softcap, logit_scale, divide)
    lse.copy_(torch.logsumexp(ze, -1))
    # eager's log_softmax, (z - max) - log(sum): z - logsumexp(z) rounds the log-sum away when
    # the max is large and makes the entropy's terms cancel
    logp = torch.log_softmax(ze, -1)
    ignored = ids == ignore_index
    safe = torch.where(ignored, 0, ids).long().unsqueeze(1)  # others out of range: gather raises
    picked = logp.gather(1, safe).squeeze(1)
    if gather_lse:  # torch.logsumexp's +inf in a row whose max is +inf (module docstring)
        inf_row = ze.amax(-1) == float("inf")
        picked = torch.where(inf_row, ze.gather(1, safe).squeeze(1) - lse, picked)
    lp.copy_(torch.where(ignored, -0.0, picked))
    if ent is not None and entropy_lse:
        ent.copy_(torch.logsumexp(ze, -1) - (torch.softmax(ze, -1) * ze).sum(-1))  # eager's ops
    elif ent is not None:
        ent.copy_(-(logp.exp() * logp).sum(-1))


def _rows_bwd_torch(z, g, ids, lse, ent, glp, gent, *, softcap, logit_scale, ignore_index,
                    divide=False, entropy_lse=False, gather_lse=False):
    ct = lse.dtype
    ze, th = _effective(z, ct, softcap, logit_scale, divide)
    logp = torch.log_softmax(ze, -1)  # the forward's log-probabilities, as it formed them
    p = logp.exp()
    if gather_lse:  # logsumexp's backward exp(z - inf) in a row whose max is +inf
        inf_row = (ze.amax(-1) == float("inf")).unsqueeze(1)
        p = torch.where(inf_row, (ze - float("inf")).exp(), p)
    if glp is not None:
        ignored = ids == ignore_index
        a = torch.where(ignored, 0, glp.to(ct))
        d = p * (-a).unsqueeze(1)
        d.scatter_add_(1, torch.where(ignored, 0, ids).long().unsqueeze(1), a.unsqueeze(1))
    else:
        d = torch.zeros_like(p)
    if gent is not None:
        if entropy_lse:  # not the saved, cancelled lse - E[z] (see the module docstring)
            ent = -(p * logp).sum(-1)
        d -= gent.to(ct).unsqueeze(1) * p * (logp + ent.unsqueeze(1))
    if divide:
        d.div_(logit_scale)
    else:
        logits_grad_(d, th, logit_scale)
    g.copy_(d)  # the one rounding to hidden's dtype


# --------------------------------------------------------------------------------------------
# Ops
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("liger::fused_linear_logprob", mutates_args=())
def fused_linear_logprob_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ids: Tensor,
    logit_scale: float = 1.0, softcap: float = 0.0, with_entropy: bool = False,
    ignore_index: int = -100, chunk_size: int = 0, divide: bool = False,
    entropy_lse: bool = False, gather_lse: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    h2, t = _flat(hidden, ids)
    N, V = h2.shape[0], weight.shape[0]
    ct = compute_dtype(hidden.dtype)
    lp = h2.new_empty(N, dtype=ct)
    ent = h2.new_empty(N, dtype=ct) if with_entropy else None
    lse = h2.new_empty(N, dtype=ct)
    C = chunk_rows(N, V, h2.device, h2.element_size(), chunk_size)
    buf = h2.new_empty(min(C, N), V)
    triton_path = use_triton(h2, weight)
    rows = _launch_fwd if triton_path else _rows_fwd_torch
    if divide and softcap > 0:
        raise ValueError("fused_linear_logprob: divide=True takes no softcap")
    kw = dict(softcap=softcap, logit_scale=logit_scale, ignore_index=ignore_index, divide=divide,
              entropy_lse=entropy_lse, gather_lse=gather_lse)
    for s in range(0, N, C):
        e = min(N, s + C)
        z = buf[: e - s]
        _linear_into(h2[s:e], weight, bias, z)
        rows(z, t[s:e], lp[s:e], ent[s:e] if ent is not None else None, lse[s:e], **kw)
    return (lp.view(ids.shape), ent.view(ids.shape) if ent is not None else h2.new_empty(0),
            lse)


@fused_linear_logprob_op.register_fake
def _(hidden, weight, bias, ids, logit_scale=1.0, softcap=0.0, with_entropy=False,
      ignore_index=-100, chunk_size=0, divide=False, entropy_lse=False, gather_lse=False):
    ct = compute_dtype(hidden.dtype)
    n = ids.numel()
    return (hidden.new_empty(ids.shape, dtype=ct),
            hidden.new_empty(ids.shape, dtype=ct) if with_entropy else hidden.new_empty(0),
            hidden.new_empty(n, dtype=ct))


@torch.library.custom_op("liger::fused_linear_logprob_backward", mutates_args=())
def fused_linear_logprob_backward_op(
    grad_logprob: Optional[Tensor], grad_entropy: Optional[Tensor], hidden: Tensor,
    weight: Tensor, bias: Optional[Tensor], ids: Tensor, lse: Tensor, entropy: Tensor,
    logit_scale: float, softcap: float, ignore_index: int, need_grad_hidden: bool,
    need_grad_weight: bool, need_grad_bias: bool, chunk_size: int, divide: bool = False,
    entropy_lse: bool = False, gather_lse: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    h2, t = _flat(hidden, ids)
    N, V = h2.shape[0], weight.shape[0]
    ct = compute_dtype(hidden.dtype)
    glp = grad_logprob.reshape(-1).contiguous() if grad_logprob is not None else None
    gent = grad_entropy.reshape(-1).contiguous() if grad_entropy is not None else None
    ent = entropy.reshape(-1) if gent is not None else None
    gh = h2.new_empty(h2.shape) if need_grad_hidden else None
    gw_acc = torch.empty(weight.shape, dtype=ct, device=weight.device) \
        if need_grad_weight else None  # the first chunk sets it
    gb_acc = torch.zeros(V, dtype=ct, device=weight.device) \
        if need_grad_bias and bias is not None else None
    if N == 0 and gw_acc is not None:
        gw_acc.zero_()
    C = chunk_rows(N, V, h2.device, h2.element_size(), chunk_size)
    buf = h2.new_empty(min(C, N), V)
    triton_path = use_triton(h2, weight)
    rows = _launch_bwd if triton_path else _rows_bwd_torch
    if divide and softcap > 0:
        raise ValueError("fused_linear_logprob: divide=True takes no softcap")
    kw = dict(softcap=softcap, logit_scale=logit_scale, ignore_index=ignore_index, divide=divide,
              entropy_lse=entropy_lse, gather_lse=gather_lse)
    for s in range(0, N, C):
        e = min(N, s + C)
        hc = h2[s:e]
        z = buf[: e - s]
        _linear_into(hc, weight, bias, z)
        rows(z, z, t[s:e], lse[s:e], ent[s:e] if ent is not None else None,
             glp[s:e] if glp is not None else None, gent[s:e] if gent is not None else None,
             **kw)  # z now holds d(z), in hidden's dtype
        linear_grads_(z, hc, weight, gh[s:e] if gh is not None else None, gw_acc, gb_acc,
                      first=s == 0)
    empty = hidden.new_empty(0)
    return (gh.view(hidden.shape) if gh is not None else empty.clone(),
            gw_acc.to(weight.dtype) if gw_acc is not None else empty.clone(),
            gb_acc.to(bias.dtype) if gb_acc is not None else empty.clone())


@fused_linear_logprob_backward_op.register_fake
def _(grad_logprob, grad_entropy, hidden, weight, bias, ids, lse, entropy, logit_scale, softcap,
      ignore_index, need_grad_hidden, need_grad_weight, need_grad_bias, chunk_size,
      divide=False, entropy_lse=False, gather_lse=False):
    return (hidden.new_empty(hidden.shape) if need_grad_hidden else hidden.new_empty(0),
            weight.new_empty(weight.shape) if need_grad_weight else hidden.new_empty(0),
            bias.new_empty(bias.shape) if need_grad_bias and bias is not None
            else hidden.new_empty(0))


def _setup_context(ctx, inputs, output):
    (hidden, weight, bias, ids, logit_scale, softcap, with_entropy, ignore_index, chunk, divide,
     entropy_lse, gather_lse) = inputs
    lp, ent, lse = output
    ctx.mark_non_differentiable(lse)
    # an output the program does not differentiate gets None, not zeros: a zero gradient times
    # a NaN entropy (0 * -inf at a -inf-masked logit, eager's value) would make every gradient
    # NaN where eager's, which never reads the entropy's backward, is finite
    ctx.set_materialize_grads(False)
    if not with_entropy:
        ctx.mark_non_differentiable(ent)
    ctx.with_entropy = with_entropy
    ctx.has_bias = bias is not None
    ctx.params = (logit_scale, softcap, ignore_index)
    ctx.chunk_size = chunk
    ctx.divide = divide
    ctx.entropy_lse = entropy_lse
    ctx.gather_lse = gather_lse
    ctx.save_for_backward(hidden, weight, bias, ids, lse, ent)


def _backward(ctx, grad_lp, grad_ent, _grad_lse):
    hidden, weight, bias, ids, lse, ent = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if not ctx.with_entropy:
        grad_ent = None
    if (grad_lp is None and grad_ent is None) or not any(needs[:3]):
        return (None,) * 12
    dh, dw, db = torch.ops.liger.fused_linear_logprob_backward(
        grad_lp, grad_ent, hidden, weight, bias, ids, lse, ent, *ctx.params,
        needs[0], needs[1], ctx.has_bias and needs[2], ctx.chunk_size, ctx.divide,
        ctx.entropy_lse, ctx.gather_lse)
    return (dh if needs[0] else None, dw if needs[1] else None,
            db if ctx.has_bias and needs[2] else None) + (None,) * 9


fused_linear_logprob_op.register_autograd(_backward, setup_context=_setup_context)


def fused_linear_logprob(
    hidden: Tensor, weight: Tensor, ids: Tensor, bias: Optional[Tensor] = None,
    temperature: float = 1.0, softcap: float = 0.0, with_entropy: bool = False,
    ignore_index: int = -100, chunk_size: int = 0,
):
    """Per-token log-probabilities of `ids` under softmax(linear(hidden, weight, bias) / T).

    Returns logprob (fp32, shape ids.shape), and (logprob, entropy) when with_entropy.
    """
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) \
            or temperature <= 0:
        raise ValueError(f"temperature must be a positive Python number, got {temperature!r} "
                         "(pass a float; a tensor temperature cannot be fused)")
    lp, ent, _ = torch.ops.liger.fused_linear_logprob(
        hidden, weight, bias, ids, 1.0 / float(temperature), float(softcap), with_entropy,
        ignore_index, chunk_size)
    return (lp, ent) if with_entropy else lp
