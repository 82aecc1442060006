"""Knowledge-distillation losses, chunked over tokens: the student's lm head fused with the loss.

Semantics (leading dims flattened to N rows; V classes in the last dim; all math in fp32, fp64 for
fp64 inputs)::

    zs  = F.linear(hidden, weight, bias)             # student logits, in hidden's dtype
    zt  = t_logits  or  F.linear(t_hidden, t_weight, t_bias)     # teacher (never differentiated)
    ls  = log_softmax(zs * s_scale);  ps = exp(ls)   # s_scale / t_scale = 1 / temperature
    lt  = log_softmax(zt * t_scale);  pt = exp(lt)
    mx  = logaddexp(ls + mix_s, lt + mix_t)          # the JSD mixture (GKD: log(1-beta), log(beta))
    kd_row = sum_j  c0 ps*ls + c1 ps*lt + c2 ps*mx + c3 pt*ls + c4 pt*lt + c5 pt*mx + c6 |ps - pt|
    kd  = sum_i kd_mask[i] * kd_row[i] / (kd_denom * kd_n)   # kd_denom <= 0: the number of kept
                                                     # rows; kd_n a size known at run time
    ce_row = logsumexp(zs * ce_scale) - (zs * ce_scale)[label]      (rows with label != ignore)
    ce  = sum_i ce_row[i] / (number of kept rows if ce_mean else 1)
    loss = kd * kd_coef + ce * ce_coef

``coefs`` may carry two convention flags after the seven coefficients (1.0 = on; absent = off),
so the kernel computes a term the way the user's code does where logits are -inf or a softmax
underflows: ``coefs[7]``: the pt*lt term is xlogy (0 where pt == 0: F.kl_div's ``target *
log(target)`` with log_target=False) instead of the plain product (0 * -inf = nan);
``coefs[8]``: lt is ``log(softmax(zt * t_scale))`` (-inf where the softmax underflows, and pt is
that softmax) instead of ``log_softmax``; ``coefs[9]``: the ps*ls term is xlogy(ps, ps) (F.kl_div
with the student's probabilities as its target, log_target=False): 0 where ps == 0, and, as
eager's xlogy backward gives (grad * ps / ps = 0 / 0), a NaN logits gradient over every row
where some ps == 0; 1.0: ps is ``softmax(zs * s_scale)`` (tested as exp(z - max) / sum, as
eager's softmax computes it), 2.0: ps is ``exp(log_softmax(zs * s_scale))`` (the kernel's own
ps); ``coefs[10]``: the TVD's ps and pt are both ``softmax`` (exp(z - max) / sum; the torch path
calls torch.softmax itself) instead of both exp of the log-softmax: where the two distributions
are equal (a student equal to its teacher, rows saturated to the same one-hot), eager's
``ps - pt`` is exactly 0, and so its gradient's sign(ps - pt), only when both sides are formed
the same way (the pattern refuses a TVD whose two sides are spelled differently).  A term whose
coefficient is 0 is not computed at all (never 0 * nan).

The seven coefficients `coefs` span every divergence of the two distributions that the pattern
(patterns/distillation.py) proves: forward KL KL(pt||ps) = pt*lt - pt*ls, reverse KL
ps*ls - ps*lt, the generalised JSD beta*KL(pt||m) + (1-beta)*KL(ps||m) = beta*(pt*lt - pt*mx) +
(1-beta)*(ps*ls - ps*mx), TVD (c6 = 0.5) and any sum of them with any weights.

Differences, not products: when the student is close to the teacher, ls and lt are each ~ -5
while ls - lt is ~1e-3, and ps*ls - ps*lt cancels away the digits eager keeps (its kl_div is
`target * (log target - input)`).  So a probability factor whose coefficients of (ls, lt, mx) sum
to 0 (each divergence above: KL (1, -1, 0), the JSD's ps part (1-beta, 0, -(1-beta)), its pt
part (0, beta, -beta)) is formed from differences: c*(ls - lt) without the mixture, else
c_ls*(ls - mx) + c_lt*(lt - mx); the same for its part of H (ps*(c*(ls - lt) + c0 [+ c2 r])).
The choice is per call, from `coefs` as given (_group_mode: any other weighted sum stays term by
term), and per element: only where the differences are finite (and not an xlogy zero), so the
-inf / 0 conventions below are the per-term ones.  The row is summed per element, once.

Gradient: with H_j = d kd_row / d ls_j (ls taken as free, ps = exp(ls))::

    H = c0 ps (ls + 1) + c1 ps lt + c2 ps (mx + r) + c3 pt + c5 pt r + c6 sign(ps - pt) ps,
    r = exp(ls + mix_s - mx),   d kd_row / d zs = s_scale * (H - ps * sum_j H_j)

(the log-softmax backward), plus ce_scale * (softmax - onehot) for the CE part, each times its
row weight.  The forward computes d(loss)/d(hidden, weight, bias) chunk by chunk (grad_output = 1,
in the compute dtype) and saves only those ([N, H], [V, H], [V]); backward scales them by
grad_output and rounds once.  Nothing of size N x V is kept.

Ops
---
``liger::fused_linear_distillation(hidden, weight, bias?, t_logits?, t_hidden?, t_weight?, t_bias?,
kd_mask?, labels?, float[] coefs, float[] scales, float kd_coef, float kd_denom, float ce_coef,
int ignore_index, bool ce_mean, bool need_grad_hidden, bool need_grad_weight, bool need_grad_bias,
int chunk_size, SymInt kd_n=1, bool round_grad=False, Tensor? grad_scale=None) -> (loss, kd, ce,
grad_hidden, grad_weight, grad_bias)`` (``grad_scale``: the upstream gradient, folded into the rows'
weights; ``round_grad``: the logits gradient is then rounded to the logits' dtype before the
linear's backward, as eager's autograd does. The backward's recompute sets both, and so does the
per-token op's backward, whose row weights are the upstream gradient. An fp16 / bf16 head is
rewritten with the forward computing no gradients, so its backward always recomputes: eager's
rounding exactly, at one more logits GEMM than computing the gradients in the forward);
``scales = [s_scale, t_scale, ce_scale, mix_s, mix_t]``; ``kd_n`` (an int, a SymInt under
dynamic shapes: the graph computes it from its tensors' sizes) multiplies the kd denominator at
run time, so a `batchmean` / `mean` over a symbolic size is exact for every shape a compiled
graph serves. ``kd`` / ``ce`` are the two parts (for
logging, not differentiable); ``ce`` is 0 when ``ce_coef`` is 0 and no labels are given.

``liger::distillation_loss(logits, t_logits, kd_mask?, labels?, coefs, scales, kd_coef, kd_denom,
ce_coef, ignore_index, ce_mean, need_grad, chunk_size=0, kd_n=1) -> (loss, kd, ce, grad_logits)``:
the same loss on
logits that are not produced by a linear in the graph (the chunked core with the linear replaced
by the identity); the [N, V] logits gradient (compute dtype) is computed in the forward, as
liger::cross_entropy does, and rounded to the logits' dtype in backward after the scale.

``liger::fused_linear_distillation_per_token(hidden, weight, bias?, t_logits?, t_hidden?,
t_weight?, t_bias?, kd_mask?, coefs, scales, chunk_size) -> rows`` and
``liger::distillation_per_token(logits, t_logits, kd_mask?, coefs, scales, chunk_size) -> rows``:
the per-token divergence kd_row (times kd_mask) shaped as the rows (input.shape[:-1]), in the
compute dtype, chunked the same way; no gradient is formed in the forward: the backward takes a
per-row upstream gradient and recomputes the chunks through the reduced ops above with it as the
row weights (kd_mask = upstream * mask, kd_coef = kd_denom = 1), as fused_linear_cross_entropy's
reduction="none" does.

Chunking and the CPU path reuse fused_linear_cross_entropy's machinery (chunk_rows, _linear_into,
the chunk's linear backward linear_grads_, and grads_in_forward: which heads form their gradients
in the forward). On CUDA / under the interpreter the row math is the
Triton kernel below (one program per row, three passes over its V blocks: online log-sum-exps,
the row sums, the gradient); on CPU tensors its torch twin, on chunks small enough that its
[C, V] fp32 temporaries stay at a few tens of MiB each (the op's point is memory, so it keeps
this CPU path rather than a decomposition for inductor).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .cross_entropy import _block_and_warps, compute_dtype
from .fused_linear_cross_entropy import _linear_into, chunk_rows, linear_grads_
from .runtime import next_pow2, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - torch path only
    triton = None

# Rows per chunk override (tests force the multi-chunk path); None = automatic.
DISTILL_CHUNK_ROWS: Optional[int] = None
# CPU torch path: about ten [C, V] fp32 temporaries live at once per chunk.
_CPU_CHUNK_BYTES = 32 << 20
# BLOCK_V override (tests force several vocabulary blocks per row); None = automatic.
DISTILL_BLOCK_V: Optional[int] = None

N_COEFS = 7
N_FLAGS = 4  # the convention flags after the coefficients (the module docstring)
# float64's relative resolution (2^-52): where the saturated-row correction is below it
EPS64 = 2.0 ** -52


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _lse_step(m, s, x):
        new_m = tl.maximum(m, tl.max(x, 0))
        safe = tl.where(new_m == float("-inf"), 0.0, new_m)
        s = s * tl.exp(m - safe) + tl.sum(tl.exp(x - safe), 0)
        return new_m, s

    @triton.jit
    def _cm(c, x):
        return tl.where(c == 0.0, 0.0, c * x)

    @triton.jit
    def _finite(x):
        return (x == x) & (tl.abs(x) != float("inf"))

    @triton.jit
    def _distill_terms(a, b, m_a, log_s_a, s_a, m_b, s_b, mix_s, mix_t, c0, c1, c2, c3, c4, c5,
                       c6, HAS_MIX: tl.constexpr, HAS_TV: tl.constexpr, XLOGY_T: tl.constexpr,
                       LOGP_T: tl.constexpr, XLOGY_S: tl.constexpr, GROUP_S: tl.constexpr,
                       GROUP_T: tl.constexpr, TV_SM: tl.constexpr):
        # (a - max) - log(sum), as eager's log_softmax rounds it: a - (max + log(sum)) would round
        # the log-sum-exp at the logits' magnitude (an ulp of 1000 is 6e-5) and so every ls
        ls = (a - m_a) - log_s_a
        ps = tl.exp(ls)
        if LOGP_T:
            # the code's log(softmax(zt)): -inf where the softmax underflows
            pt = tl.exp(b - m_b) / s_b
            lt = tl.log(pt)
        else:
            lt = (b - m_b) - tl.log(s_b)
            pt = tl.exp(lt)
        ptlt = pt * lt
        if XLOGY_T:
            ptlt = tl.where(pt == 0.0, 0.0, ptlt)
        psls = ps * ls
        # kl_div with the student's probabilities as target: xlogy(ps, ps), 0 where eager's ps is
        # 0 (its softmax exp(z - max) / sum, or exp of the log-softmax)
        pz = ps == 0.0
        if XLOGY_S == 1:
            pz = tl.exp(a - m_a) / s_a == 0.0
        if XLOGY_S != 0:
            psls = tl.where(pz, 0.0, psls)
        # term by term (any coefficients; the conventions above): a term whose coefficient is 0
        # is absent (as in the code and the torch twin), not 0 * (a product that is nan where a
        # logit is -inf)
        e_s = _cm(c0, psls) + _cm(c1, ps * lt)
        h_s = _cm(c0, ps * (ls + 1.0)) + _cm(c1, ps * lt)
        e_t = _cm(c3, pt * ls) + _cm(c4, ptlt)
        h_t = _cm(c3, pt)
        mx = ls  # defined on every path; read only with the mixture
        r = ps
        if HAS_MIX:
            u = ls + mix_s
            v = lt + mix_t
            mm = tl.maximum(u, v)
            mm = tl.where(mm == float("-inf"), 0.0, mm)  # logaddexp(-inf, -inf) = -inf
            mx = mm + tl.log(tl.exp(u - mm) + tl.exp(v - mm))
            r = tl.exp(u - mx)
            e_s += _cm(c2, ps * mx)
            h_s += _cm(c2, ps * (mx + r))
            e_t += _cm(c5, pt * mx)
            h_t += _cm(c5, pt * r)
        # a factor whose log coefficients sum to 0, from differences of log-probabilities (see
        # the module docstring), where they are finite (elsewhere the terms keep eager's inf/nan)
        if GROUP_S != 0:
            if GROUP_S == 1:
                g_s = c0 * (ls - lt)
            else:
                g_s = _cm(c0, ls - mx) + _cm(c1, lt - mx)
            ok = _finite(g_s)
            if XLOGY_S != 0:
                ok = ok & (pz == 0)
            e_s = tl.where(ok, ps * g_s, e_s)
            h_s = tl.where(ok, ps * (g_s + (c0 + _cm(c2, r))), h_s)
        if GROUP_T != 0:
            if GROUP_T == 1:
                g_t = c4 * (lt - ls)
            else:
                g_t = _cm(c3, ls - mx) + _cm(c4, lt - mx)
            e_t = tl.where(_finite(g_t), pt * g_t, e_t)
        e = e_s + e_t
        h = h_s + h_t
        if HAS_TV:
            if TV_SM:
                # the code's softmaxes (coefs[10]): where ps == pt to rounding, the sign of the
                # difference is that of how each side rounds, so each is formed as eager's is
                d = tl.exp(a - m_a) / s_a - tl.exp(b - m_b) / s_b
            else:
                d = ps - pt
            e += _cm(c6, tl.abs(d))
            sgn = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
            h += _cm(c6, sgn * ps)
        return e, h, ps, pz

    @triton.jit
    def _distill_fwd_kernel(
        zs_ptr, stride_zs, zt_ptr, stride_zt, g_ptr, stride_g, y_ptr, kdw_ptr, cew_ptr,
        kd_rows_ptr, ce_rows_ptr, V, ignore_index,
        s_scale, t_scale, ce_scale, mix_s, mix_t, c0, c1, c2, c3, c4, c5, c6,
        HAS_MIX: tl.constexpr, HAS_TV: tl.constexpr, XLOGY_T: tl.constexpr, LOGP_T: tl.constexpr,
        XLOGY_S: tl.constexpr, GROUP_S: tl.constexpr, GROUP_T: tl.constexpr, TV_SM: tl.constexpr,
        HAS_CE: tl.constexpr,
        COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        zs_row = zs_ptr + row * stride_zs
        zt_row = zt_ptr + row * stride_zt
        cols0 = tl.arange(0, BLOCK_V)
        ninf = float("-inf")
        # pass 1: online log-sum-exp of the student, the teacher and (CE) the student at ce_scale
        m_a = ninf
        s_a = 0.0
        m_b = ninf
        s_b = 0.0
        m_c = ninf
        s_c = 0.0
        j_a = 0  # the first column of the student's largest probability
        for off in range(0, V, BLOCK_V):
            cols = off + cols0
            msk = cols < V
            z = tl.load(zs_row + cols, mask=msk, other=0.0).to(tl.float32)
            zt = tl.load(zt_row + cols, mask=msk, other=0.0).to(tl.float32)
            xa = tl.where(msk, z * s_scale, ninf)
            blk_max = tl.max(xa, 0)
            j_a = tl.where(blk_max > m_a, tl.min(tl.where(xa == blk_max, cols, V), 0), j_a)
            m_a, s_a = _lse_step(m_a, s_a, xa)
            m_b, s_b = _lse_step(m_b, s_b, tl.where(msk, zt * t_scale, ninf))
            if HAS_CE:
                m_c, s_c = _lse_step(m_c, s_c, tl.where(msk, z * ce_scale, ninf))
        log_s_a = tl.log(s_a)
        # pass 2: the row's divergence and sum_j H_j
        acc_e = tl.zeros([BLOCK_V], dtype=tl.float32)
        acc_h = tl.zeros([BLOCK_V], dtype=tl.float32)
        acc_z = tl.zeros([BLOCK_V], dtype=tl.int32)
        acc_rh = tl.zeros([BLOCK_V], dtype=tl.float32)
        acc_rp = tl.zeros([BLOCK_V], dtype=tl.float32)
        for off in range(0, V, BLOCK_V):
            cols = off + cols0
            msk = cols < V
            a = tl.load(zs_row + cols, mask=msk, other=0.0).to(tl.float32) * s_scale
            b = tl.load(zt_row + cols, mask=msk, other=0.0).to(tl.float32) * t_scale
            e, h, ps, pz = _distill_terms(a, b, m_a, log_s_a, s_a, m_b, s_b, mix_s, mix_t, c0, c1,
                                          c2, c3, c4, c5, c6, HAS_MIX, HAS_TV, XLOGY_T, LOGP_T,
                                          XLOGY_S, GROUP_S, GROUP_T, TV_SM)
            acc_e += tl.where(msk, e, 0.0)
            acc_h += tl.where(msk, h, 0.0)
            rest = msk & (cols != j_a)
            acc_rh += tl.where(rest, h, 0.0)
            acc_rp += tl.where(rest, ps, 0.0)
            if XLOGY_S != 0:
                acc_z += tl.where(msk & pz, 1, 0)
        tl.store(kd_rows_ptr + row, tl.sum(acc_e, 0))
        sum_h = tl.sum(acc_h, 0)
        rest_h = tl.sum(acc_rh, 0)
        rest_p = tl.sum(acc_rp, 0)
        # eager's xlogy(ps, ps) backward is 0 / 0 where ps == 0: a NaN row after the softmax's
        nan_row = tl.sum(acc_z, 0) > 0
        log_s_c = 0.0
        y = 0
        valid = False
        if HAS_CE:
            log_s_c = tl.log(s_c)
            y = tl.load(y_ptr + row).to(tl.int64)
            valid = y != ignore_index
            ysafe = tl.where(valid, y, 0)
            zy = tl.load(zs_row + ysafe).to(tl.float32) * ce_scale
            # -((zy - max) - log(sum)): eager's cross-entropy, rounded as its log_softmax is
            tl.store(ce_rows_ptr + row, tl.where(valid, log_s_c - (zy - m_c), 0.0))
        if COMPUTE_GRAD:
            kdw = tl.load(kdw_ptr + row)
            cew = 0.0
            if HAS_CE:
                cew = tl.load(cew_ptr + row)
            g_row = g_ptr + row * stride_g
            # pass 3: the logits gradient for grad_output = 1
            for off in range(0, V, BLOCK_V):
                cols = off + cols0
                msk = cols < V
                z = tl.load(zs_row + cols, mask=msk, other=0.0).to(tl.float32)
                b = tl.load(zt_row + cols, mask=msk, other=0.0).to(tl.float32) * t_scale
                e, h, ps, pz = _distill_terms(z * s_scale, b, m_a, log_s_a, s_a, m_b, s_b, mix_s,
                                              mix_t, c0, c1, c2, c3, c4, c5, c6, HAS_MIX, HAS_TV,
                                              XLOGY_T, LOGP_T, XLOGY_S, GROUP_S, GROUP_T, TV_SM)
                g = h - ps * sum_h
                # at the largest probability h - ps * sum(h) cancels as ps -> 1 (a saturated
                # row): the same value as h (1 - ps) - ps * sum_{k != j} h_k, 1 - ps the other
                # probabilities' sum, which does not (where the plain form is finite: the
                # non-finite values stay eager's)
                # Below float64's resolution of h (2^-52 |h|) the plain form is exactly 0, as
                # eager's is in any dtype (and so is the float64 reference): kept there.
                fin = (g == g) & (tl.abs(g) != float("inf"))
                g_j = h * rest_p - ps * rest_h
                g = tl.where((cols == j_a) & fin & (tl.abs(g_j) >= 2.220446049250313e-16 * tl.abs(h)), g_j, g)
                g = (s_scale * kdw) * g
                if HAS_CE:
                    sm = tl.exp((z * ce_scale - m_c) - log_s_c)
                    onehot = tl.where((cols == y) & valid, 1.0, 0.0)
                    g += (ce_scale * cew) * (sm - onehot)
                if XLOGY_S != 0:
                    g = tl.where(nan_row, float("nan"), g)
                tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty), mask=msk)


def _launch_rows(zs, zt, y, kd_w, ce_w, kd_rows, ce_rows, g, P):
    N, V = zs.shape
    if N == 0:
        return
    # Smaller blocks than the CE kernel's (which holds fewer live [BLOCK_V] values): 8192 with
    # 16 warps spills on sm_80/sm_90 once the mixture or the CE term is on.
    cuda = zs.device.type == "cuda"
    block = DISTILL_BLOCK_V or min(next_pow2(V), 4096 if cuda else 1024)
    warps = 16 if cuda and block >= 4096 else _block_and_warps(V, zs.device, block)[1]
    c = P["coefs"]
    dummy = kd_rows
    _distill_fwd_kernel[(N,)](
        zs, zs.stride(0), zt, zt.stride(0), g if g is not None else zs,
        g.stride(0) if g is not None else 0, y if y is not None else dummy, kd_w,
        ce_w if ce_w is not None else dummy, kd_rows, ce_rows, V, P["ignore_index"],
        *(float(x) for x in P["scales"]), *(float(x) for x in c[:N_COEFS]),
        HAS_MIX=bool(c[2] or c[5]), HAS_TV=bool(c[6]), XLOGY_T=bool(c[7]), LOGP_T=bool(c[8]),
        XLOGY_S=int(c[9]) if c[0] else 0, GROUP_S=P["group"][0], GROUP_T=P["group"][1],
        TV_SM=bool(c[6] and c[10]),
        HAS_CE=P["has_ce"],
        COMPUTE_GRAD=g is not None, BLOCK_V=block, num_warps=warps,
    )


# --------------------------------------------------------------------------------------------
# Torch twin of the row kernel (CPU path, other dtypes)
# --------------------------------------------------------------------------------------------
def _group_mode(c_ls: float, c_lt: float, c_mx: float) -> int:
    """How a probability factor p * (c_ls ls + c_lt lt + c_mx mx) is formed: 0 term by term
    (coefficients not summing to 0, or no term); 1 c * (ls - lt) (no mixture term); 2
    c_ls (ls - mx) + c_lt (lt - mx).  Decided per call, from the coefficients as given."""
    if not (c_ls or c_lt or c_mx) or c_ls + c_lt + c_mx != 0.0:
        return 0
    return 1 if c_mx == 0.0 else 2


def _grouped(mode, c_ls, c_lt, ls, lt, mx, teacher=False):
    """The torch twin of the kernel's grouped factor (see _group_mode): the teacher's mode 1 is
    c_lt (lt - ls), the student's c_ls (ls - lt), as the divergences are written."""
    if mode == 1:
        return (lt - ls).mul_(c_lt) if teacher else (ls - lt).mul_(c_ls)
    out = (ls - mx).mul_(c_ls) if c_ls else torch.zeros_like(ls)
    if c_lt:
        out.add_((lt - mx).mul_(c_lt))
    return out


def _rows_torch(zs, zt, y, kd_w, ce_w, kd_rows, ce_rows, g, P):
    ct = kd_rows.dtype
    s_scale, t_scale, ce_scale, mix_s, mix_t = P["scales"]
    c = P["coefs"]
    zf = zs.to(ct)
    ls = torch.log_softmax(zf * s_scale, -1)
    ps = ls.exp()
    if c[8]:  # the code's log(softmax(zt)): -inf where the softmax underflows
        pt = torch.softmax(zt.to(ct) * t_scale, -1)
        lt = pt.log()
    else:
        lt = torch.log_softmax(zt.to(ct) * t_scale, -1)
        pt = lt.exp()
    want = g is not None
    gs, gt = P["group"]
    mx = r = None
    if c[2] or c[5]:
        mx = torch.logaddexp(ls + mix_s, lt + mix_t)
        r = (ls + mix_s - mx).exp_() if want else None
    # the student's factor ps * (c0 ls + c1 lt + c2 mx) and its H, term by term (the
    # conventions of the module docstring; a term whose coefficient is 0 is absent), summed
    # per element as the Triton kernel does
    e = torch.zeros_like(ls)
    h = torch.zeros_like(ls) if want else None
    nan_rows = pz = None
    if c[0]:
        psls = ps * ls
        if c[9]:
            # kl_div with the student's probabilities as its target: xlogy(ps, ps), 0 where
            # eager's ps is 0; eager's backward there is 0 / 0, a NaN over the row after the
            # softmax's
            pz = (torch.softmax(zf * s_scale, -1) if c[9] == 1 else ps) == 0
            psls = torch.where(pz, 0.0, psls)
            nan_rows = pz.any(-1) if want else None
        e.add_(psls, alpha=c[0])
        del psls
        if want:
            h.add_(ps * (ls + 1.0), alpha=c[0])
    if c[1]:
        x = ps * lt
        e.add_(x, alpha=c[1])
        if want:
            h.add_(x, alpha=c[1])
        del x
    if c[2]:
        e.add_(ps * mx, alpha=c[2])
        if want:
            h.add_(ps * (mx + r), alpha=c[2])
    if gs:
        # log coefficients summing to 0: from differences, where they are finite
        g_s = _grouped(gs, c[0], c[1], ls, lt, mx)
        ok = g_s.isfinite()
        if pz is not None:
            ok &= ~pz
        e = torch.where(ok, ps * g_s, e)
        if want:
            k = r * c[2] + c[0] if c[2] else c[0]
            h = torch.where(ok, ps * (g_s + k), h)
        del g_s, ok
    # the teacher's factor pt * (c3 ls + c4 lt + c5 mx) (its H has no log-probability)
    et = torch.zeros_like(ls)
    if c[3]:
        et.add_(pt * ls, alpha=c[3])
        if want:
            h.add_(pt, alpha=c[3])
    if c[4]:  # xlogy (kl_div's convention): 0 where pt is 0
        ptlt = pt * lt
        et.add_(torch.where(pt == 0, 0.0, ptlt) if c[7] else ptlt, alpha=c[4])
        del ptlt
    if c[5]:
        et.add_(pt * mx, alpha=c[5])
        if want:
            h.add_(pt * r, alpha=c[5])
    if gt:
        g_t = _grouped(gt, c[3], c[4], ls, lt, mx, teacher=True)
        et = torch.where(g_t.isfinite(), pt * g_t, et)
        del g_t
    e.add_(et)
    del et, mx, r
    if c[6]:
        if c[10]:
            # the code's softmaxes (the module docstring): eager's own op, so ps - pt is 0 exactly
            # where eager's is
            d = torch.softmax(zf * s_scale, -1).sub_(
                pt if c[8] else torch.softmax(zt.to(ct) * t_scale, -1))
        else:
            d = ps - pt
        e.add_(d.abs(), alpha=c[6])
        if want:
            h.add_(torch.sign(d).mul_(ps), alpha=c[6])
        del d
    e = e.sum(-1)
    kd_rows.copy_(e)
    if want:
        gz = h - ps * h.sum(-1, keepdim=True)
        # at the row's largest probability h_j - ps_j * sum(h) cancels as ps_j -> 1 (a saturated
        # row); it equals h_j * (1 - ps_j) - ps_j * sum_{k != j} h_k with 1 - ps_j the sum of the
        # other probabilities, which does not (taken only where the plain form is finite, so the
        # non-finite values are eager's)
        j = ls.argmax(-1, keepdim=True)
        hj, pj = h.gather(-1, j), ps.gather(-1, j)
        # the sums without column j, in place (h and ps are not read again: no [C, V] copies)
        rest_h = h.scatter_(-1, j, 0.0).sum(-1, keepdim=True)
        rest_p = ps.scatter_(-1, j, 0.0).sum(-1, keepdim=True)
        del h, ps
        gj = gz.gather(-1, j)
        # below float64's resolution of h_j the plain form is exactly 0, as eager's is (and the
        # float64 reference's): kept there
        exact = hj * rest_p - pj * rest_h
        gz.scatter_(-1, j, torch.where(gj.isfinite() & (exact.abs() >= EPS64 * hj.abs()),
                                       exact, gj))
        gz.mul_((s_scale * kd_w)[:, None])
    if P["has_ce"]:
        # eager's cross-entropy is -log_softmax[label]: (z - max) - log(sum), not lse - z (which
        # rounds at the logits' magnitude)
        lsm = torch.log_softmax(zf * ce_scale, -1)
        valid = y != P["ignore_index"]
        ysafe = torch.where(valid, y, 0).long()
        ce_rows.copy_(torch.where(valid, -lsm.gather(-1, ysafe[:, None])[:, 0], 0.0))
        if want:
            sm = lsm.exp_()
            sm.scatter_add_(-1, ysafe[:, None], -valid.to(ct)[:, None])
            gz.add_(sm.mul_((ce_scale * ce_w)[:, None]))
    if want:
        if nan_rows is not None:
            gz[nan_rows] = float("nan")
        g.copy_(gz)


def _rows(*args):
    zs = args[0]
    if use_triton(zs, args[1]):
        _launch_rows(*args)
    else:
        _rows_torch(*args)


# --------------------------------------------------------------------------------------------
# The chunked core
# --------------------------------------------------------------------------------------------
def _chunk(N: int, V: int, device, elem: int, chunk_size: int) -> int:
    if chunk_size <= 0 and DISTILL_CHUNK_ROWS:
        chunk_size = DISTILL_CHUNK_ROWS
    if chunk_size <= 0 and device.type != "cuda":
        c = _CPU_CHUNK_BYTES // max(1, V * 4)
        chunk_size = max(16, c - c % 16)
    return chunk_rows(N, V, device, elem, chunk_size)


def _params(coefs, scales, ignore_index, has_ce):
    coefs = [float(x) for x in coefs]
    scales = [float(x) for x in scales]
    assert N_COEFS <= len(coefs) <= N_COEFS + N_FLAGS and len(scales) == 5, (coefs, scales)
    coefs += [0.0] * (N_COEFS + N_FLAGS - len(coefs))  # the convention flags default off
    group = (_group_mode(*coefs[0:3]), _group_mode(*coefs[3:6]))
    return dict(coefs=coefs, scales=scales, ignore_index=int(ignore_index), has_ce=has_ce,
                group=group)


def _row_weights(N, kd_mask, labels, kd_coef, kd_denom, ce_coef, ignore_index, ce_mean, ct,
                 device, kd_n=1):
    """Per-row weights of the kd and ce parts and the reduced-loss denominators (tensor ops
    only, no host sync)."""
    one = torch.ones((), dtype=ct, device=device)
    m = kd_mask.reshape(-1).to(ct) if kd_mask is not None else torch.ones(N, dtype=ct,
                                                                          device=device)
    kd_den = m.sum() if kd_denom <= 0 else one * kd_denom
    if kd_n != 1:  # a size the graph read at run time (batchmean / mean under dynamic shapes)
        kd_den = kd_den * kd_n
    kd_w = m * (kd_coef / kd_den)
    kd_part = m, kd_den
    ce_w, ce_den = None, one
    if labels is not None:
        valid = labels.reshape(-1) != ignore_index
        ce_den = valid.to(ct).sum() if ce_mean else one
        # every label ignored: eager's mean is 0 / 0 = nan, its gradient 0 (not 0 * inf)
        ce_w = torch.where(valid, ce_coef / ce_den, 0.0)
    return kd_w, ce_w, kd_part, ce_den


def _core(N, V, student_chunk, teacher_chunk, labels, kd_w, ce_w, P, grad_sink, ct, device,
          grad_out=None):
    """One pass over token chunks; returns (kd_rows, ce_rows); grad_sink(s, e, g) takes each
    chunk's logits gradient (fp32 [C, V]) when given; `grad_out` ([N, V]) receives it in place
    instead."""
    kd_rows = torch.empty(N, dtype=ct, device=device)
    ce_rows = torch.zeros(N, dtype=ct, device=device)
    y = labels.reshape(-1).contiguous() if labels is not None else None
    C = P["chunk"]
    gbuf = torch.empty(min(C, N), V, dtype=ct, device=device) if grad_sink is not None else None
    for s in range(0, N, C):
        e = min(N, s + C)
        zs, zt = student_chunk(s, e), teacher_chunk(s, e)
        g = gbuf[: e - s] if gbuf is not None else grad_out[s:e] if grad_out is not None else None
        _rows(zs, zt, y[s:e] if y is not None else None, kd_w[s:e],
              ce_w[s:e] if ce_w is not None else None, kd_rows[s:e], ce_rows[s:e], g, P)
        if grad_sink is not None:
            grad_sink(s, e, g)
    return kd_rows, ce_rows


def _rows2d(x: Tensor) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _teacher(t_logits, t_hidden, t_weight, t_bias, N, V, C):
    if t_logits is not None:
        t2 = _rows2d(t_logits)
        return lambda s, e: t2[s:e]
    th = _rows2d(t_hidden)
    buf = th.new_empty(min(C, N), V)

    def chunk(s, e):
        out = buf[: e - s]
        _linear_into(th[s:e], t_weight, t_bias, out)
        return out

    return chunk


def _reduce(kd_rows, ce_rows, kd_part, ce_den, kd_coef, ce_coef):
    m, kd_den = kd_part
    kd = (kd_rows * m).sum() / kd_den
    ce = ce_rows.sum() / ce_den
    return kd * kd_coef + ce * ce_coef, kd, ce


def _linear_forward(hidden, weight, bias, t_logits, t_hidden, t_weight, t_bias, kd_mask, labels,
                    coefs, scales, kd_coef, kd_denom, ce_coef, ignore_index, ce_mean,
                    need_gh, need_gw, need_gb, chunk_size, kd_n=1, round_grad=False,
                    grad_scale=None):
    h2 = _rows2d(hidden)
    N, V = h2.shape[0], weight.shape[0]
    ct = compute_dtype(hidden.dtype)
    P = _params(coefs, scales, ignore_index, labels is not None and ce_coef != 0)
    P["chunk"] = C = _chunk(N, V, h2.device, h2.element_size(), chunk_size)
    kd_w, ce_w, kd_part, ce_den = _row_weights(N, kd_mask, labels, kd_coef, kd_denom, ce_coef,
                                               ignore_index, ce_mean, ct, h2.device, kd_n)
    if grad_scale is not None:  # the upstream gradient, folded into the rows' weights
        gs = grad_scale.reshape(()).to(ct)
        kd_w = kd_w * gs
        ce_w = ce_w * gs if ce_w is not None else None
    buf = h2.new_empty(min(C, N), V)

    def student(s, e):
        out = buf[: e - s]
        _linear_into(h2[s:e], weight, bias, out)
        return out

    gh = h2.new_empty(h2.shape, dtype=ct) if need_gh else None
    gw = torch.zeros(weight.shape, dtype=ct, device=weight.device) if need_gw else None
    gb = torch.zeros(V, dtype=ct, device=weight.device) if need_gb and bias is not None else None

    def sink(s, e, g):
        # round_grad: the logits gradient rounded to the logits' dtype, where eager's autograd
        # rounds it before the linear's backward: exact only when g already holds the upstream
        # gradient (grad_scale)
        linear_grads_(g, h2[s:e], weight, gh[s:e] if gh is not None else None, gw, gb,
                      first=False, round_to=buf.dtype if round_grad else None)

    want = gh is not None or gw is not None or gb is not None
    kd_rows, ce_rows = _core(N, V, student, _teacher(t_logits, t_hidden, t_weight, t_bias, N, V,
                                                     C),
                             labels, kd_w, ce_w, P, sink if want else None, ct, h2.device)
    loss, kd, ce = _reduce(kd_rows, ce_rows, kd_part, ce_den, kd_coef, ce_coef)
    return loss, kd, ce, gh, gw, gb


@torch.library.custom_op("liger::fused_linear_distillation", mutates_args=())
def fused_linear_distillation_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], t_logits: Optional[Tensor],
    t_hidden: Optional[Tensor], t_weight: Optional[Tensor], t_bias: Optional[Tensor],
    kd_mask: Optional[Tensor], labels: Optional[Tensor], coefs: list[float], scales: list[float],
    kd_coef: float, kd_denom: float, ce_coef: float, ignore_index: int, ce_mean: bool,
    need_grad_hidden: bool, need_grad_weight: bool, need_grad_bias: bool, chunk_size: int,
    kd_n: int = 1, round_grad: bool = False, grad_scale: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    loss, kd, ce, gh, gw, gb = _linear_forward(
        hidden, weight, bias, t_logits, t_hidden, t_weight, t_bias, kd_mask, labels, coefs,
        scales, kd_coef, kd_denom, ce_coef, ignore_index, ce_mean, need_grad_hidden,
        need_grad_weight, need_grad_bias, chunk_size, kd_n, round_grad, grad_scale)
    empty = hidden.new_empty(0)
    return (loss, kd, ce, gh.view(hidden.shape) if gh is not None else empty.clone(),
            gw if gw is not None else empty.clone(), gb if gb is not None else empty.clone())


@fused_linear_distillation_op.register_fake
def _(hidden, weight, bias, t_logits, t_hidden, t_weight, t_bias, kd_mask, labels, coefs, scales,
      kd_coef, kd_denom, ce_coef, ignore_index, ce_mean, need_grad_hidden, need_grad_weight,
      need_grad_bias, chunk_size, kd_n=1, round_grad=False, grad_scale=None):
    ct = compute_dtype(hidden.dtype)
    s = hidden.new_empty((), dtype=ct)
    e = hidden.new_empty(0)
    return (s, s.clone(), s.clone(),
            hidden.new_empty(hidden.shape, dtype=ct) if need_grad_hidden else e.clone(),
            weight.new_empty(weight.shape, dtype=ct) if need_grad_weight else e.clone(),
            bias.new_empty(bias.shape, dtype=ct) if need_grad_bias and bias is not None
            else e.clone())


@torch.library.custom_op("liger::fused_linear_distillation_backward", mutates_args=())
def fused_linear_distillation_backward_op(
    grad_loss: Tensor, saved_gh: Tensor, saved_gw: Tensor, saved_gb: Tensor, hidden: Tensor,
    weight: Tensor, bias: Optional[Tensor], need_grad_hidden: bool, need_grad_weight: bool,
    need_grad_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    # The saved gradients are for grad_output = 1 in the compute dtype: scale, then round once.
    s = grad_loss.reshape(())
    if hidden.numel() == 0 and hidden.shape[-1] != 0:
        # no token rows: eager's weight / bias gradients are sums over no rows, 0 whatever the
        # upstream gradient (an inf from `/ s.shape[0]` over an empty batch), never 0 * inf
        s = torch.zeros_like(s)
    e = hidden.new_empty(0)
    gh = torch.mul(saved_gh, s).to(hidden.dtype) if need_grad_hidden else e.clone()
    gw = torch.mul(saved_gw, s).to(weight.dtype) if need_grad_weight else e.clone()
    gb = torch.mul(saved_gb, s).to(bias.dtype) if need_grad_bias and bias is not None \
        else e.clone()
    return gh, gw, gb


@fused_linear_distillation_backward_op.register_fake
def _(grad_loss, saved_gh, saved_gw, saved_gb, hidden, weight, bias, need_grad_hidden,
      need_grad_weight, need_grad_bias):
    e = hidden.new_empty(0)
    return (hidden.new_empty(hidden.shape) if need_grad_hidden else e.clone(),
            weight.new_empty(weight.shape) if need_grad_weight else e.clone(),
            bias.new_empty(bias.shape) if need_grad_bias and bias is not None else e.clone())


def _fld_setup_context(ctx, inputs, output):
    hidden, weight, bias = inputs[:3]
    rest = inputs[3:16]
    need = inputs[16:19]
    _, kd, ce, gh, gw, gb = output
    ctx.mark_non_differentiable(kd, ce, gh, gw, gb)
    needs = ctx.needs_input_grad
    has_bias = bias is not None
    # A gradient autograd wants that the forward was told not to compute: recompute it.
    ctx.recompute = (needs[0] and not need[0]) or (needs[1] and not need[1]) or \
        (has_bias and needs[2] and not need[2])
    ctx.has_bias = has_bias
    ctx.rest = rest if ctx.recompute else None
    ctx.chunk_size, ctx.kd_n = inputs[19], inputs[20]
    ctx.save_for_backward(gh, gw, gb, hidden, weight, bias)


def _fld_backward(ctx, grad_loss, *unused):
    gh, gw, gb, hidden, weight, bias = ctx.saved_tensors
    needs = ctx.needs_input_grad
    nb = ctx.has_bias and needs[2]
    if grad_loss is None or not any(needs[:3]):
        return (None,) * 21
    if ctx.recompute:
        # The recompute knows the upstream gradient: folded into the rows' weights, the logits
        # gradient is eager's and is rounded where eager rounds it (round_grad); the result is
        # then only cast (scaled by 1).
        _, _, _, gh, gw, gb = torch.ops.liger.fused_linear_distillation(
            hidden, weight, bias, *ctx.rest, needs[0], needs[1], nb, ctx.chunk_size, ctx.kd_n,
            True, grad_loss)
        grad_loss = torch.ones_like(grad_loss)
    dh, dw, db = torch.ops.liger.fused_linear_distillation_backward(
        grad_loss, gh, gw, gb, hidden, weight, bias, needs[0], needs[1], nb)
    return (dh if needs[0] else None, dw if needs[1] else None, db if nb else None) + \
        (None,) * 18


fused_linear_distillation_op.register_autograd(_fld_backward, setup_context=_fld_setup_context)


# ------------------------------------------------------------------ logits not from a linear
@torch.library.custom_op("liger::distillation_loss", mutates_args=())
def distillation_loss_op(
    logits: Tensor, t_logits: Tensor, kd_mask: Optional[Tensor], labels: Optional[Tensor],
    coefs: list[float], scales: list[float], kd_coef: float, kd_denom: float, ce_coef: float,
    ignore_index: int, ce_mean: bool, need_grad: bool, chunk_size: int = 0, kd_n: int = 1,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    z2 = _rows2d(logits)
    N, V = z2.shape
    ct = compute_dtype(logits.dtype)
    P = _params(coefs, scales, ignore_index, labels is not None and ce_coef != 0)
    P["chunk"] = _chunk(N, V, z2.device, z2.element_size(), chunk_size)
    kd_w, ce_w, kd_part, ce_den = _row_weights(N, kd_mask, labels, kd_coef, kd_denom, ce_coef,
                                               ignore_index, ce_mean, ct, z2.device, kd_n)
    grad = torch.empty(N, V, dtype=ct, device=z2.device) if need_grad else None

    kd_rows, ce_rows = _core(N, V, lambda s, e: z2[s:e],
                             _teacher(t_logits, None, None, None, N, V, P["chunk"]),
                             labels, kd_w, ce_w, P, None, ct, z2.device, grad_out=grad)
    loss, kd, ce = _reduce(kd_rows, ce_rows, kd_part, ce_den, kd_coef, ce_coef)
    return loss, kd, ce, grad.view(logits.shape) if grad is not None else logits.new_empty(0)


@distillation_loss_op.register_fake
def _(logits, t_logits, kd_mask, labels, coefs, scales, kd_coef, kd_denom, ce_coef,
      ignore_index, ce_mean, need_grad, chunk_size=0, kd_n=1):
    ct = compute_dtype(logits.dtype)
    s = logits.new_empty((), dtype=ct)
    return (s, s.clone(), s.clone(),
            logits.new_empty(logits.shape, dtype=ct) if need_grad else logits.new_empty(0))


def _dl_setup_context(ctx, inputs, output):
    _, kd, ce, grad = output
    ctx.mark_non_differentiable(kd, ce, grad)
    ctx.recompute = ctx.needs_input_grad[0] and not inputs[11]
    ctx.inputs = inputs if ctx.recompute else None
    ctx.dtype = inputs[0].dtype
    ctx.save_for_backward(grad)


def _dl_backward(ctx, grad_loss, *unused):
    (grad,) = ctx.saved_tensors
    if grad_loss is None or not ctx.needs_input_grad[0]:
        return (None,) * 14
    if ctx.recompute:
        i = list(ctx.inputs)
        i[11] = True
        grad = torch.ops.liger.distillation_loss(*i)[3]
    return (torch.mul(grad, grad_loss.reshape(())).to(ctx.dtype),) + (None,) * 13


distillation_loss_op.register_autograd(_dl_backward, setup_context=_dl_setup_context)


# ------------------------------------------------------------------ per-token divergence
def _per_token_rows(student_chunk, teacher_chunk, N, V, kd_mask, coefs, scales, ct, device, C):
    """kd_row (times the row mask, as eager's `rows * mask`) of every row, chunked over tokens;
    no gradient is formed (the backward recomputes the chunks with the upstream rows)."""
    P = _params(coefs, scales, -100, False)
    P["chunk"] = C
    kd_w = torch.ones(N, dtype=ct, device=device)  # read only when a gradient is formed
    kd_rows, _ = _core(N, V, student_chunk, teacher_chunk, None, kd_w, None, P, None, ct, device)
    if kd_mask is not None:
        kd_rows = kd_rows * kd_mask.reshape(-1).to(ct)
    return kd_rows


def _upstream_weights(grad_rows, kd_mask, ct):
    """Row weights of the recompute: the per-token upstream gradient (times the row mask, the
    gradient eager's `rows * mask` passes to the rows), as the kernel's kd_w."""
    w = grad_rows.reshape(-1).to(ct)
    if kd_mask is not None:
        w = w * kd_mask.reshape(-1).to(ct)
    return w.contiguous()


@torch.library.custom_op("liger::fused_linear_distillation_per_token", mutates_args=())
def fused_linear_distillation_per_token_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], t_logits: Optional[Tensor],
    t_hidden: Optional[Tensor], t_weight: Optional[Tensor], t_bias: Optional[Tensor],
    kd_mask: Optional[Tensor], coefs: list[float], scales: list[float], chunk_size: int,
) -> Tensor:
    """The per-token divergence kd_row[i] (* kd_mask[i]) shaped hidden.shape[:-1], in the
    compute dtype (eager's per-token value is that dtype: the pattern checks it)."""
    h2 = _rows2d(hidden)
    N, V = h2.shape[0], weight.shape[0]
    ct = compute_dtype(hidden.dtype)
    C = _chunk(N, V, h2.device, h2.element_size(), chunk_size)
    buf = h2.new_empty(min(C, N), V)

    def student(s, e):
        out = buf[: e - s]
        _linear_into(h2[s:e], weight, bias, out)
        return out

    rows = _per_token_rows(student, _teacher(t_logits, t_hidden, t_weight, t_bias, N, V, C), N,
                           V, kd_mask, coefs, scales, ct, h2.device, C)
    return rows.view(hidden.shape[:-1])


@fused_linear_distillation_per_token_op.register_fake
def _(hidden, weight, bias, t_logits, t_hidden, t_weight, t_bias, kd_mask, coefs, scales,
      chunk_size):
    return hidden.new_empty(hidden.shape[:-1], dtype=compute_dtype(hidden.dtype))


def _fldp_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:8])
    ctx.coefs, ctx.scales, ctx.chunk_size = inputs[8], inputs[9], inputs[10]


def _fldp_backward(ctx, grad_rows):
    hidden, weight, bias, t_logits, t_hidden, t_weight, t_bias, kd_mask = ctx.saved_tensors
    needs = ctx.needs_input_grad
    nb = bias is not None and needs[2]
    if grad_rows is None or not (needs[0] or needs[1] or nb):
        return (None,) * 11
    # Recompute the chunks with the upstream gradient of each row as its weight (kd_coef 1 over
    # a denominator of 1: kd_w = w exactly), as fused_linear_cross_entropy's reduction="none"
    # backward does; the op's gradients come back in the compute dtype and are rounded once.
    w = _upstream_weights(grad_rows, kd_mask, compute_dtype(hidden.dtype))
    # The rows' weights are the upstream gradient itself, so the logits gradient is eager's
    # and is rounded where eager rounds it (round_grad).
    _, _, _, gh, gw, gb = torch.ops.liger.fused_linear_distillation(
        hidden, weight, bias, t_logits, t_hidden, t_weight, t_bias, w, None, ctx.coefs,
        ctx.scales, 1.0, 1.0, 0.0, -100, True, needs[0], needs[1], nb, ctx.chunk_size, 1, True)
    dh, dw, db = torch.ops.liger.fused_linear_distillation_backward(
        grad_rows.new_ones(()), gh, gw, gb, hidden, weight, bias, needs[0], needs[1], nb)
    return (dh if needs[0] else None, dw if needs[1] else None, db if nb else None) + \
        (None,) * 8


fused_linear_distillation_per_token_op.register_autograd(_fldp_backward,
                                                         setup_context=_fldp_setup_context)


@torch.library.custom_op("liger::distillation_per_token", mutates_args=())
def distillation_per_token_op(
    logits: Tensor, t_logits: Tensor, kd_mask: Optional[Tensor], coefs: list[float],
    scales: list[float], chunk_size: int,
) -> Tensor:
    """distillation_loss's per-token divergence (* kd_mask) shaped logits.shape[:-1]."""
    z2 = _rows2d(logits)
    N, V = z2.shape
    ct = compute_dtype(logits.dtype)
    C = _chunk(N, V, z2.device, z2.element_size(), chunk_size)
    rows = _per_token_rows(lambda s, e: z2[s:e], _teacher(t_logits, None, None, None, N, V, C),
                           N, V, kd_mask, coefs, scales, ct, z2.device, C)
    return rows.view(logits.shape[:-1])


@distillation_per_token_op.register_fake
def _(logits, t_logits, kd_mask, coefs, scales, chunk_size):
    return logits.new_empty(logits.shape[:-1], dtype=compute_dtype(logits.dtype))


def _dlp_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:3])
    ctx.coefs, ctx.scales, ctx.chunk_size = inputs[3], inputs[4], inputs[5]


def _dlp_backward(ctx, grad_rows):
    logits, t_logits, kd_mask = ctx.saved_tensors
    if grad_rows is None or not ctx.needs_input_grad[0]:
        return (None,) * 6
    w = _upstream_weights(grad_rows, kd_mask, compute_dtype(logits.dtype))
    grad = torch.ops.liger.distillation_loss(logits, t_logits, w, None, ctx.coefs, ctx.scales,
                                             1.0, 1.0, 0.0, -100, True, True, ctx.chunk_size,
                                             1)[3]
    return (grad.to(logits.dtype),) + (None,) * 5


distillation_per_token_op.register_autograd(_dlp_backward, setup_context=_dlp_setup_context)


# ------------------------------------------------------------------ Python entry points
def _coefs_for(divergence: str, beta: float = 0.5):
    """(coefs, mix_s, mix_t) of a named divergence (tests, benchmarks, the docs' example)."""
    import math

    c = [0.0] * N_COEFS
    mix = (0.0, 0.0)
    if divergence == "forward_kl":
        c[4], c[3] = 1.0, -1.0
    elif divergence == "reverse_kl":
        c[0], c[1] = 1.0, -1.0
    elif divergence == "tvd":
        c[6] = 0.5
    elif divergence == "jsd":
        if beta == 0:
            return _coefs_for("forward_kl")
        if beta == 1:
            return _coefs_for("reverse_kl")
        c[4], c[5] = beta, -beta
        c[0], c[2] = 1 - beta, -(1 - beta)
        mix = (math.log(1 - beta), math.log(beta))
    else:
        raise ValueError(f"unknown divergence {divergence!r}: use forward_kl, reverse_kl, jsd "
                         "or tvd")
    return c, mix


def fused_linear_distillation(hidden, weight, teacher, bias=None, *, divergence="forward_kl",
                              beta=0.5, temperature=1.0, kd_mask=None, kd_denom=0.0,
                              labels=None, alpha=0.0, ignore_index=-100, chunk_size=0):
    """`alpha * CE(labels) + (1 - alpha) * divergence` of the student head `linear(hidden, weight,
    bias)` against `teacher`: a logits tensor or a (t_hidden, t_weight[, t_bias]) tuple.
    kd_denom <= 0 divides the divergence by the number of rows `kd_mask` keeps (all rows when
    None); otherwise by kd_denom (e.g. the batch size for "batchmean")."""
    coefs, mix = _coefs_for(divergence, beta)
    if isinstance(teacher, tuple):
        t_logits, (th, tw, *tb) = None, teacher
        tb = tb[0] if tb else None
    else:
        t_logits, th, tw, tb = teacher, None, None, None
    g = torch.is_grad_enabled()
    out = torch.ops.liger.fused_linear_distillation(
        hidden, weight, bias, t_logits, th, tw, tb, kd_mask, labels, coefs,
        [1.0 / temperature, 1.0 / temperature, 1.0, *mix], 1.0 - alpha, float(kd_denom),
        float(alpha), ignore_index, True, g and hidden.requires_grad, g and weight.requires_grad,
        g and bias is not None and bias.requires_grad, chunk_size)
    return out[0]


def distillation_loss(logits, t_logits, *, divergence="forward_kl", beta=0.5, temperature=1.0,
                      kd_mask=None, kd_denom=0.0, labels=None, alpha=0.0, ignore_index=-100):
    """The same loss on student logits that are not produced by a linear."""
    coefs, mix = _coefs_for(divergence, beta)
    return torch.ops.liger.distillation_loss(
        logits, t_logits, kd_mask, labels, coefs, [1.0 / temperature, 1.0 / temperature, 1.0,
                                                   *mix],
        1.0 - alpha, float(kd_denom), float(alpha), ignore_index, True,
        torch.is_grad_enabled() and logits.requires_grad)[0]
