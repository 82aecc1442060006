"""LM-head linear + cross-entropy, chunked over tokens so the [N, V] logits never exist at once.

Semantics (leading dims of `hidden` / `target` are flattened; the order of the logit transforms
is fixed: bias, then fp32, then scale, then softcap)::

    z      = F.linear(hidden, weight, bias)            # in hidden's dtype, as the lm head
    z_eff  = z.float() * logit_scale                   # logit_scale = 1/temperature; 1.0 = none
    z_eff  = softcap * tanh(z_eff / softcap)           # only when softcap > 0
    loss   = liger::cross_entropy(z_eff, target, ce_weight, ...)   (see cross_entropy.py:
             torch's F.cross_entropy semantics + optional z-loss, fp32 loss)

Op
--
``liger::fused_linear_cross_entropy(Tensor hidden, Tensor weight, Tensor? bias, Tensor target,
Tensor? ce_weight=None, int ignore_index=-100, str reduction="mean", float label_smoothing=0.,
float lse_square_scale=0., float softcap=0., float logit_scale=1., bool return_logits=False,
bool need_grad_hidden=True, bool need_grad_weight=True, bool need_grad_bias=True,
int chunk_size=0, int logits_mode=-1) -> (Tensor loss, Tensor z_loss, Tensor logits,
Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias, Tensor grad_logits)``

* ``loss`` / ``z_loss``: as liger::cross_entropy (fp32; ``()`` or ``target.shape`` for "none").
* ``logits``: when ``return_logits``, the raw lm-head output ``z`` (before scale/softcap) in the
  hidden dtype, shape ``[..., V]``, written chunk by chunk from the same matmul; else empty.
  Differentiable: a gradient arriving on it is added in backward.
* ``grad_hidden`` / ``grad_weight`` / ``grad_bias``: d(loss)/d(input) computed in the forward,
  each only when its ``need_grad_*`` flag is set (and, for bias, a bias is given), reduction
  is not "none" and the head is fp32 / fp64 (``grads_in_forward``); otherwise empty. In the
  head's dtype, for grad_output = 1: backward multiplies them by grad_output. Saved for
  backward; not differentiable. An fp16 / bf16 head forms none of them in the forward: eager
  rounds grad_output * (CE gradient) to the head's dtype before the linear's backward, and
  round(g) * s is not round(g * s) (forming them for grad_output = 1, unrounded, and rounding
  once after the scale was a different rounding from eager's, at times further from the exact
  value than eager's; rounding g in the forward and again after the scale, a second rounding).
  Its backward recomputes the chunks with grad_output folded in (below).
* ``grad_logits``: only in the CPU mode of ``grads_from_logits`` (logits returned, fp32): the
  CE gradient of the logits for grad_output = 1, ``[..., V]`` fp32, in place of the three
  gradients above (then empty); the backward forms those from it. Else empty.

``logits_mode`` says whether that mode is taken: 1 wherever the call allows it (CPU tensors,
fp32, logits returned, reduction not "none"), 0 never, -1 (the default) decided per call, as
``grads_from_logits`` does: off under Triton's interpreter.  Which outputs are empty depends on
the mode, so a graph must not leave it to the environment: the environment at compile time (the
fake implementation) and at run time could differ, e.g. a compiled graph loaded from inductor's
on-disk cache by a process in the other mode.  The rewriter therefore decides it when it builds
the graph and passes 0 or 1; the fake and real implementations then agree in every environment.

``liger::fused_linear_cross_entropy_backward(...) -> (grad_hidden, grad_weight, grad_bias)``
scales the saved (fp32 / fp64) gradients by grad_output and adds the contribution of a gradient
on ``logits`` (g @ W, g^T @ hidden, g.sum(0): single GEMMs, no N x V temporary beyond g
itself). With reduction "none" (per-row grad_output), an fp16 / bf16 head, or when a needed
gradient was not computed in the forward (need_grad_* False), backward recomputes the chunks
instead, rounding where eager does: the chunk's logits GEMM in the head's dtype, the CE gradient
in fp32 with grad_output folded in (per row), rounded once to the head's dtype (eager's cast of
the fp32 logits' gradient back to the head's), a gradient on ``logits`` added in the head's dtype
(eager's gradient accumulation), then the linear's backward (``linear_grads_``): grad_hidden one
GEMM in the head's dtype as eager's, grad_weight / grad_bias accumulated over the chunks in fp32
and rounded once, as eager's single GEMM / sum accumulates (one more logits GEMM than the
forward-gradient path). hidden / weight / bias are saved for that path (they are alive anyway in
training).
Given a saved ``grad_logits`` (the CPU mode) it writes (grad_output * g [+ gradient on logits])
@ W, its transpose @ hidden and its column sum straight into the returned gradients.

Chunking: C rows per step, C = chunk_size if > 0, else the module-level FLCE_CHUNK_ROWS if set,
else the largest multiple of 16 with C * V * element size <= 256 MiB on CUDA (V=256k, bf16:
C=512), C * V * 4 <= 64 MiB on CPU.
The chunk's logits buffer (hidden dtype) is overwritten in place by its gradient (the CE kernel
reads each block before writing it). On CUDA/interpreter the CE part is the Triton kernel of
cross_entropy.py, on the CPU torch path its torch twin; the matmuls are torch's (cuBLAS).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from .cross_entropy import (
    _REDUCTIONS, ce_rows_torch, compute_dtype, is_plain, launch_ce_forward, plain_ce_loss,
    reduce_rows, reduction_stats,
)
from .runtime import cpu_decomposition, use_triton

# Rows per chunk override (tests set it to force the multi-chunk path); None = automatic.
FLCE_CHUNK_ROWS: Optional[int] = None
# Chunk buffer budget. CUDA: the [C, V] logits/grad buffer in the hidden dtype (the Triton CE
# kernel works in place, no other [C, V] temporary). Larger chunks also mean fewer passes over the
# fp32 [V, H] grad_weight accumulator (read + written once per chunk), which dominates at 256k
# vocab when C is small. CPU torch path: the chunk buffer only for fp32 (no [C, V] temporaries;
# bf16/fp16 add fp32 copies of the chunk), and fewer, larger chunks keep the GEMMs efficient.
_CUDA_CHUNK_BYTES = 256 << 20
_CPU_CHUNK_BYTES = 64 << 20
# Bound on the fp32 copies _acc_mm_ makes of low-precision GEMM operands where no fp32-output
# GEMM exists (CPU).
_UPCAST_BYTES = 32 << 20


def grads_in_forward(dtype: torch.dtype) -> bool:
    """Whether a fused lm head + loss of this head dtype may form its gradients in the forward
    (for grad_output = 1, scaled in backward): only where the head computes in its own dtype
    (fp32, fp64), so the scale is the one rounding. Eager rounds grad_output * (logits gradient)
    to an fp16 / bf16 head's dtype before the linear's backward; round(g) * s is not round(g * s),
    and no forward can know s. Such a head's forward computes the loss alone and its backward
    recomputes the logits with s folded in, rounding where eager does (one more logits GEMM).
    The rule of fused_linear_cross_entropy and of the distillation ops / pattern."""
    return compute_dtype(dtype) == dtype


def chunk_rows(N: int, V: int, device: torch.device, elem_bytes: int, chunk_size: int = 0,
               logits_kept: bool = False) -> int:
    """Rows per chunk. `logits_kept`: the caller returns the whole [N, V] logits anyway; on the
    CPU one [N, V] gradient buffer beside them is then no more than eager (logits and their
    gradient) holds, and one chunk makes the grad-weight GEMM one K = N product instead of
    N / C accumulations into the [V, H] fp32 buffer (each a read and write of it)."""
    if chunk_size > 0:
        c = chunk_size
    elif FLCE_CHUNK_ROWS:
        c = FLCE_CHUNK_ROWS
    elif logits_kept and device.type == "cpu":
        c = N
    else:
        if device.type == "cuda":
            c = _CUDA_CHUNK_BYTES // max(1, V * elem_bytes)
        else:
            c = _CPU_CHUNK_BYTES // max(1, V * 4)
        c = max(16, c - c % 16)  # tensor-core friendly GEMM M dimension
    return max(1, min(c, N))


@functools.lru_cache(maxsize=None)
def _cuda_fp32_out_addmm_ok(device_index: int) -> bool:
    """Whether addmm(fp32 acc, bf16, bf16, out_dtype=fp32, out=acc) works in place here.

    Lets grad_weight accumulate across chunks in fp32 straight from bf16/fp16 GEMMs (cuBLAS
    with fp32 C); older torch builds reject an fp32 `self` for the dtype overload.
    """
    dev = torch.device("cuda", device_index)
    try:
        a = torch.randn(64, 32, device=dev, dtype=torch.bfloat16)
        b = torch.randn(32, 48, device=dev, dtype=torch.bfloat16)
        acc = torch.randn(64, 48, device=dev)
        ref = acc + a.float() @ b.float()
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        return bool(torch.allclose(acc, ref, atol=1e-2, rtol=1e-2))
    except Exception:
        return False


def _acc_mm_(acc: Tensor, a: Tensor, b: Tensor, first: bool = False) -> None:
    """acc += a @ b with acc possibly wider (fp32) than a and/or b; `first`: acc holds garbage.

    On the first chunk the product is written straight into acc (no zero fill, no read of a
    [V, H] buffer of zeros) wherever torch has a GEMM for the dtypes.
    """
    if a.dtype == b.dtype == acc.dtype:
        if first:
            torch.mm(a, b, out=acc)
        else:
            acc.addmm_(a, b)
        return
    if a.dtype == b.dtype and acc.is_cuda and _cuda_fp32_out_addmm_ok(acc.device.index or 0):
        if first:
            acc.zero_()
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
        return
    # Upcast slices of the inner dimension only, so the fp32 copies stay bounded even when b is
    # the whole [V, H] weight (grad_hidden = g @ W): exact fp32 accumulation, as eager's
    # low-precision GEMMs; the caller rounds the result once.
    K = a.shape[1]
    step = max(1, _UPCAST_BYTES // max(1, (a.shape[0] + b.shape[1]) * 4))
    for k in range(0, K, step):
        ak, bk = a[:, k:k + step].to(acc.dtype), b[k:k + step].to(acc.dtype)
        if first and k == 0:
            torch.mm(ak, bk, out=acc)
        else:
            acc.addmm_(ak, bk)
    if first and K == 0:
        acc.zero_()


def _linear_into(h: Tensor, weight: Tensor, bias: Optional[Tensor], out: Tensor) -> None:
    if bias is not None:
        torch.addmm(bias, h, weight.t(), out=out)
    else:
        torch.mm(h, weight.t(), out=out)


def linear_grads_(g: Tensor, hc: Tensor, weight: Tensor, gh: Optional[Tensor],
                  gw_acc: Optional[Tensor], gb_acc: Optional[Tensor], first: bool,
                  round_to: Optional[torch.dtype] = None) -> None:
    """The lm head's backward for one chunk of rows, given the chunk's logits gradient g: the
    chunk's rows of the hidden gradient gh = g @ weight (one GEMM, rounded to gh's dtype as
    eager's), gw_acc += g^T @ hc and gb_acc += g.sum(0) (accumulated over the chunks in gw_acc's /
    gb_acc's dtype, fp32 for a low-precision head, and rounded once by the caller: eager's one
    GEMM / sum over all rows accumulates in fp32 too). None = not wanted. `first`: gw_acc holds
    garbage (the first chunk). `round_to`: g is first rounded to that dtype, where eager's
    autograd rounds the gradient of an fp16 / bf16 linear's output. The chunked lm-head ops
    (cross-entropy, log-probs, distillation) all end their chunks here."""
    if round_to is not None and g.dtype != round_to:
        g = g.to(round_to)
    if gh is not None and gh.device.type == "cpu" and gh.dtype in (torch.float16, torch.bfloat16):
        # The same rounding as eager's fp16 / bf16 GEMM on the CPU (fp32 accumulation, one
        # rounding), through fp32 GEMMs: a CPU without native bf16 GEMMs emulates them, about 18x
        # slower than fp32 here (g @ W at 1024 x 8192 x 128: 5.4 s against 0.3 s)
        acc = torch.empty(gh.shape, dtype=torch.float32)
        _acc_mm_(acc, g, weight, first=True)
        gh.copy_(acc)
    elif gh is not None:
        _acc_mm_(gh, g, weight, first=True)
    if gw_acc is not None:
        _acc_mm_(gw_acc, g.t(), hc, first=first)
    if gb_acc is not None:
        gb_acc += torch.sum(g, 0, dtype=gb_acc.dtype)


def _chunk_loop(h2, weight, bias, t, ce_weight, stats, loss_rows, z_rows, *, logits_out,
                grad_logits, gh, gw_acc, gb_acc, row_scale, C, ce_kw):
    """One pass over the token chunks: logits, CE (+ its gradient), then the gradient GEMMs.

    gh / gw_acc / gb_acc: outputs to fill (None = not needed). grad_logits: an incoming gradient
    on the logits, added to the chunk's CE gradient. row_scale: per-row grad_output (or None).
    The CE gradient is written in the head's dtype, over the chunk's logits: rounded once after
    the scale by row_scale, as eager rounds it (an fp32 / fp64 head: no rounding).
    """
    N, V = h2.shape[0], weight.shape[0]
    compute_grad = gh is not None or gw_acc is not None or gb_acc is not None
    if N == 0 and gw_acc is not None:
        gw_acc.zero_()  # no chunk will write it
    buf = h2.new_empty(min(C, N), V)
    triton_ce = use_triton(h2, weight)
    for s in range(0, N, C):
        e = min(N, s + C)
        hc = h2[s:e]
        g = buf[: e - s]  # over the chunk's logits unless they are returned
        z = logits_out[s:e] if logits_out is not None else buf[: e - s]
        _linear_into(hc, weight, bias, z)
        rs = row_scale[s:e] if row_scale is not None else None
        args = (z, t[s:e], ce_weight, stats, loss_rows[s:e], z_rows[s:e],
                g if compute_grad else None)
        if triton_ce:
            launch_ce_forward(*args, row_scale=rs, **ce_kw)
        else:
            ce_rows_torch(*args, row_scale=rs, **ce_kw)
        if not compute_grad:
            continue
        if grad_logits is not None:
            g += grad_logits[s:e]  # in the head's dtype: eager's accumulation of the two
        linear_grads_(g, hc, weight, gh[s:e] if gh is not None else None, gw_acc, gb_acc,
                      first=s == 0)


def _all_zero(t: Tensor) -> bool:
    """Every element is 0 (NaN is not): aminmax is one read pass with no temporary, where
    `any()` first writes a bool copy (about three times the time on [N, V])."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(lo == 0) and bool(hi == 0)


def _flat(hidden: Tensor, target: Tensor):
    H = hidden.shape[-1]
    h2 = hidden.reshape(-1, H)
    if not h2.is_contiguous():
        h2 = h2.contiguous()
    return h2, target.reshape(-1).contiguous()


def _ce_kwargs(ignore_index, label_smoothing, lse_square_scale, softcap, logit_scale):
    return dict(ignore_index=ignore_index, label_smoothing=label_smoothing,
                lse_square_scale=lse_square_scale, softcap=softcap, logit_scale=logit_scale)


def grads_from_logits(hidden: Tensor, weight: Tensor, return_logits: bool, reduction: str,
                      logits_mode: int = -1) -> bool:
    """The CPU torch path's mode when the logits are returned (fp32, reduction not "none").

    `logits_mode` (the op's argument): 1 or 0 decides wherever the call allows the mode; -1
    leaves it to the path this call would take (the torch path: not under the interpreter).

    The [N, V] logits exist anyway there, so chunking saves nothing; what costs time on a CPU is
    passes over [N, V] / [V, H] and fresh buffers (each first touch of a page is a fault). The
    forward then keeps the logits' CE gradient (for grad_output = 1, fp32, one [N, V] buffer
    like eager's log_softmax output) instead of the three gradients, and the backward writes the
    two GEMMs with grad_output as their alpha straight into the gradients it returns: no fp32
    [V, H] buffer saved beside the one returned, no pass scaling it. The forward's part is also
    a CPU decomposition (plain losses), so under inductor the CE rows are one fused loop."""
    if logits_mode not in (-1, 0, 1):
        raise ValueError(f"liger::fused_linear_cross_entropy: logits_mode must be -1 (decided per "
                         f"call), 0 or 1, got {logits_mode!r}")
    if not (return_logits and reduction != "none" and hidden.device.type == "cpu"
            and hidden.dtype == weight.dtype == torch.float32):
        return False
    return bool(logits_mode) if logits_mode >= 0 else not use_triton(hidden, weight)


def _wants_grad(need_grad_hidden: bool, need_grad_weight: bool, need_grad_bias: bool,
                bias: Optional[Tensor]) -> bool:
    """Whether the forward is asked for any gradient (the logits mode's grad_logits output)."""
    return need_grad_hidden or need_grad_weight or (need_grad_bias and bias is not None)


@torch.library.custom_op("liger::fused_linear_cross_entropy", mutates_args=())
def fused_linear_cross_entropy_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
    ce_weight: Optional[Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
    label_smoothing: float = 0.0, lse_square_scale: float = 0.0, softcap: float = 0.0,
    logit_scale: float = 1.0, return_logits: bool = False, need_grad_hidden: bool = True,
    need_grad_weight: bool = True, need_grad_bias: bool = True, chunk_size: int = 0,
    logits_mode: int = -1,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    assert reduction in _REDUCTIONS, reduction
    h2, t = _flat(hidden, target)
    N, V = h2.shape[0], weight.shape[0]
    ct = compute_dtype(hidden.dtype)
    stats, denom_ce, denom_z = reduction_stats(t, ce_weight, ignore_index, reduction, V, ct)
    loss_rows = h2.new_empty(N, dtype=ct)
    z_rows = h2.new_empty(N, dtype=ct)
    empty = hidden.new_empty(0)
    if grads_from_logits(hidden, weight, return_logits, reduction, logits_mode):
        logits = h2.new_empty(N, V)
        _linear_into(h2, weight, bias, logits)
        want = _wants_grad(need_grad_hidden, need_grad_weight, need_grad_bias, bias)
        g = h2.new_empty(N, V, dtype=ct) if want else None
        ce_rows_torch(logits, t, ce_weight, stats, loss_rows, z_rows, g,
                      **_ce_kwargs(ignore_index, label_smoothing, lse_square_scale, softcap,
                                   logit_scale))
        loss, z = reduce_rows(loss_rows, z_rows, denom_ce, denom_z, reduction, target.shape,
                              lse_square_scale != 0)
        shape = (*hidden.shape[:-1], V)
        return (loss, z, logits.view(shape), empty.clone(), empty.clone(), empty.clone(),
                g.view(shape) if g is not None else empty.clone())
    # per-row grad_output, or an fp16 / bf16 head: backward recomputes instead
    fwd_grads = reduction != "none" and grads_in_forward(hidden.dtype)
    want_gb = fwd_grads and need_grad_bias and bias is not None
    gh = h2.new_empty(h2.shape, dtype=ct) if fwd_grads and need_grad_hidden else None
    gw_acc = torch.empty(weight.shape, dtype=ct, device=weight.device) \
        if fwd_grads and need_grad_weight else None  # the first chunk sets it
    gb_acc = torch.zeros(V, dtype=ct, device=weight.device) if want_gb else None
    logits = h2.new_empty(N, V) if return_logits else None
    _chunk_loop(h2, weight, bias, t, ce_weight, stats, loss_rows, z_rows, logits_out=logits,
                grad_logits=None, gh=gh, gw_acc=gw_acc, gb_acc=gb_acc, row_scale=None,
                C=chunk_rows(N, V, h2.device, h2.element_size(), chunk_size,
                             logits_kept=return_logits),
                ce_kw=_ce_kwargs(ignore_index, label_smoothing, lse_square_scale, softcap,
                                 logit_scale))
    loss, z = reduce_rows(loss_rows, z_rows, denom_ce, denom_z, reduction, target.shape,
                          lse_square_scale != 0)
    return (
        loss, z,
        logits.view(*hidden.shape[:-1], V) if logits is not None else empty.clone(),
        gh.view(hidden.shape) if gh is not None else empty.clone(),
        gw_acc if gw_acc is not None else empty.clone(),
        gb_acc if gb_acc is not None else empty.clone(),
        empty.clone(),
    )


@fused_linear_cross_entropy_op.register_fake
def _(hidden, weight, bias, target, ce_weight=None, ignore_index=-100, reduction="mean",
      label_smoothing=0.0, lse_square_scale=0.0, softcap=0.0, logit_scale=1.0,
      return_logits=False, need_grad_hidden=True, need_grad_weight=True, need_grad_bias=True,
      chunk_size=0, logits_mode=-1):
    ct = compute_dtype(hidden.dtype)
    shape = target.shape if reduction == "none" else ()
    V = weight.shape[0]
    from_logits = grads_from_logits(hidden, weight, return_logits, reduction, logits_mode)
    want = _wants_grad(need_grad_hidden, need_grad_weight, need_grad_bias, bias)
    fwd_grads = reduction != "none" and not from_logits and grads_in_forward(hidden.dtype)
    return (
        hidden.new_empty(shape, dtype=ct),
        hidden.new_empty(shape, dtype=ct),
        hidden.new_empty((*hidden.shape[:-1], V)) if return_logits else hidden.new_empty(0),
        hidden.new_empty(hidden.shape, dtype=ct) if fwd_grads and need_grad_hidden
        else hidden.new_empty(0),
        weight.new_empty(weight.shape, dtype=ct) if fwd_grads and need_grad_weight
        else hidden.new_empty(0),
        bias.new_empty(bias.shape, dtype=ct) if fwd_grads and need_grad_bias and bias is not None
        else hidden.new_empty(0),
        hidden.new_empty((*hidden.shape[:-1], V), dtype=ct) if from_logits and want
        else hidden.new_empty(0),
    )


def _flce_cpu_forward(hidden, weight, bias, target, ce_weight=None, ignore_index=-100,
                      reduction="mean", label_smoothing=0.0, lse_square_scale=0.0, softcap=0.0,
                      logit_scale=1.0, return_logits=False, need_grad_hidden=True,
                      need_grad_weight=True, need_grad_bias=True, chunk_size=0, logits_mode=-1):
    """CPU decomposition of the forward in the grads_from_logits mode, plain losses
    (_flce_cpu_path; other calls keep the op): the lm head's GEMM and the CE rows as inductor
    sees them, so loss and logits gradient are one fused loop."""
    V = weight.shape[0]
    h2, t = _flat(hidden, target)
    logits = torch.nn.functional.linear(h2, weight, bias)
    want = _wants_grad(need_grad_hidden, need_grad_weight, need_grad_bias, bias)
    loss, z, g = plain_ce_loss(logits, t, ce_weight, ignore_index, reduction, logit_scale, want,
                               target.shape)
    shape = (*hidden.shape[:-1], V)
    empty = hidden.new_empty(0)
    return (loss, z, logits.view(shape), empty.clone(), empty.clone(), empty.clone(),
            g.view(shape) if want else empty.clone())


def _flce_cpu_path(hidden, weight, bias, target, ce_weight=None, ignore_index=-100,
                   reduction="mean", label_smoothing=0.0, lse_square_scale=0.0, softcap=0.0,
                   logit_scale=1.0, return_logits=False, need_grad_hidden=True,
                   need_grad_weight=True, need_grad_bias=True, chunk_size=0, logits_mode=-1):
    # A smoothed / z-loss / softcapped loss in the logits mode runs the op's own torch CE math.
    if not (grads_from_logits(hidden, weight, return_logits, reduction, logits_mode)
            and is_plain(label_smoothing, lse_square_scale, softcap, weight.shape[0])):
        return False
    return ("logits returned: loss and logits gradient in the forward (decomposed for "
            "inductor), the gradient GEMMs in the backward "
            "(liger::fused_linear_cross_entropy_backward)")


cpu_decomposition(torch.ops.liger.fused_linear_cross_entropy,
                  applies=_flce_cpu_path)(_flce_cpu_forward)


def _grads_from_saved_logits(grad_loss, gl2, g, h2, weight, bias, need_gh, need_gw, need_gb):
    """Backward of the grads_from_logits mode: g is the logits' CE gradient for grad_output = 1
    (fp32). grad_output enters as the GEMMs' alpha (fp32, as eager's scaled gradient; the
    product is rounded once), so each gradient is written once, into the tensor returned; a
    nonzero gradient on the logits (rare: the logits used by another loss) is added to a scaled
    copy of g first, one GEMM each as eager."""
    alpha = float(grad_loss.reshape(())) if grad_loss is not None else None
    if gl2 is not None:  # the loss's part is absent when grad_loss is (eager: no CE backward)
        g = gl2.to(g.dtype) if alpha is None else torch.add(gl2.to(g.dtype), g, alpha=alpha)
        alpha = 1.0

    def product(a, b, like):
        out = torch.empty(like.shape, dtype=like.dtype, device=like.device)
        if alpha is None:  # no gradient arrived at all
            return out.zero_()
        if alpha == 0.0:  # eager's 0 * g keeps g's NaN; BLAS skips the product at alpha = 0
            return torch.mm(a, b, out=out).mul_(0.0)
        return out.addmm_(a, b, beta=0.0, alpha=alpha)  # beta = 0: out's garbage is not read

    gh = product(g, weight, h2) if need_gh else None
    gw = product(g.t(), h2, weight) if need_gw else None
    gb = (g.sum(0) * (alpha or 0.0)).to(bias.dtype) if need_gb else None
    return gh, gw, gb


@torch.library.custom_op("liger::fused_linear_cross_entropy_backward", mutates_args=())
def fused_linear_cross_entropy_backward_op(
    grad_loss: Optional[Tensor], grad_logits: Optional[Tensor], saved_grad_hidden: Tensor,
    saved_grad_weight: Tensor, saved_grad_bias: Tensor, saved_grad_logits: Tensor,
    hidden: Tensor, weight: Tensor,
    bias: Optional[Tensor], target: Tensor, ce_weight: Optional[Tensor], ignore_index: int,
    reduction: str, label_smoothing: float, lse_square_scale: float, softcap: float,
    logit_scale: float, recompute: bool, need_grad_hidden: bool, need_grad_weight: bool,
    need_grad_bias: bool, chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    h2, t = _flat(hidden, target)
    N, V = h2.shape[0], weight.shape[0]
    gl2 = grad_logits.reshape(N, V) if grad_logits is not None else None
    if gl2 is not None and gl2.device.type == "cpu" and _all_zero(gl2):
        # AOTAutograd hands an unused output (HF returns the logits next to the loss) a gradient
        # of materialized zeros: adding its products (two [N, V] GEMMs) changes nothing but the
        # sign of zeros, and eager, which has one GEMM over (CE grad + 0), never does them. One
        # read pass (no device sync on the CPU) instead.
        gl2 = None
    need_gb = need_grad_bias and bias is not None
    ct = compute_dtype(hidden.dtype)
    if not recompute and not saved_grad_logits.numel() and (
            (need_grad_hidden and saved_grad_hidden.numel() != h2.numel())
            or (need_grad_weight and saved_grad_weight.numel() != weight.numel())
            or (need_gb and saved_grad_bias.numel() != bias.numel())):
        # A needed gradient was not saved by the forward (an fp16 / bf16 head saves none, see
        # grads_in_forward): recomputing is always correct, scaling an empty tensor never is.
        recompute = True
    if saved_grad_logits.numel() and not recompute:
        gh, gw, gb = _grads_from_saved_logits(grad_loss, gl2, saved_grad_logits.reshape(N, V),
                                              h2, weight, bias, need_grad_hidden,
                                              need_grad_weight, need_gb)
    elif recompute:
        gh = h2.new_empty(h2.shape) if need_grad_hidden else None
        gw_acc = torch.empty(weight.shape, dtype=ct, device=weight.device) \
            if need_grad_weight else None  # the first chunk sets it
        gb_acc = torch.zeros(V, dtype=ct, device=weight.device) if need_gb else None
        if grad_loss is None:
            row_scale = torch.zeros(N, dtype=ct, device=h2.device)
        else:
            # clone, not contiguous(): the same dense copy, and it records under offline
            # compile's fake CUDA tensors (contiguous() of an expanded one enters a device guard)
            row_scale = grad_loss.to(ct).reshape(-1).expand(N).clone(
                memory_format=torch.contiguous_format)
        stats, _, _ = reduction_stats(t, ce_weight, ignore_index, reduction, V, ct)
        _chunk_loop(h2, weight, bias, t, ce_weight, stats,
                    h2.new_empty(N, dtype=ct), h2.new_empty(N, dtype=ct), logits_out=None,
                    grad_logits=gl2, gh=gh, gw_acc=gw_acc, gb_acc=gb_acc, row_scale=row_scale,
                    C=chunk_rows(N, V, h2.device, h2.element_size(), chunk_size),
                    ce_kw=_ce_kwargs(ignore_index, label_smoothing, lse_square_scale, softcap,
                                     logit_scale))
        gw = gw_acc.to(weight.dtype) if gw_acc is not None else None
        gb = gb_acc.to(bias.dtype) if gb_acc is not None else None
    else:
        # Saved gradients are d(loss)/d(input) for grad_output = 1 of an fp32 / fp64 head (in
        # its dtype); loss is a scalar here. Scale (and add a logits gradient's GEMM).
        s = grad_loss.reshape(()) if grad_loss is not None else None

        def scaled(saved, like, add):
            out = torch.empty(like.shape, dtype=like.dtype, device=like.device)
            if add is None:
                if s is None:
                    return out.zero_()
                return torch.mul(saved, s, out=out)  # fp32 product, rounded on the store
            acc = saved * s if s is not None else torch.zeros_like(saved)
            add(acc)
            return out.copy_(acc)

        def mm_into(a, b):
            return None if gl2 is None else (lambda acc: _acc_mm_(acc, a, b))

        # (N, H), not (N, -1): -1 is ambiguous for an empty batch
        gh = scaled(saved_grad_hidden.reshape(N, h2.shape[1]), h2, mm_into(gl2, weight)) \
            if need_grad_hidden else None
        gw = scaled(saved_grad_weight, weight, mm_into(gl2.t() if gl2 is not None else None,
                                                       h2)) if need_grad_weight else None
        gb = scaled(saved_grad_bias, bias, None if gl2 is None else
                    (lambda acc: acc.add_(gl2.sum(0, dtype=acc.dtype)))) if need_gb else None
    empty = hidden.new_empty(0)
    return (
        gh.view(hidden.shape) if gh is not None else empty.clone(),
        gw if gw is not None else empty.clone(),
        gb if gb is not None else empty.clone(),
    )


@fused_linear_cross_entropy_backward_op.register_fake
def _(grad_loss, grad_logits, saved_grad_hidden, saved_grad_weight, saved_grad_bias,
      saved_grad_logits, hidden, weight, bias, target, ce_weight, ignore_index, reduction, label_smoothing,
      lse_square_scale, softcap, logit_scale, recompute, need_grad_hidden, need_grad_weight,
      need_grad_bias, chunk_size):
    return (
        hidden.new_empty(hidden.shape) if need_grad_hidden else hidden.new_empty(0),
        weight.new_empty(weight.shape) if need_grad_weight else hidden.new_empty(0),
        bias.new_empty(bias.shape) if need_grad_bias and bias is not None
        else hidden.new_empty(0),
    )


def _flce_setup_context(ctx, inputs, output):
    (hidden, weight, bias, target, ce_weight, ignore_index, reduction, label_smoothing,
     lse_square_scale, softcap, logit_scale, return_logits, need_gh, need_gw, need_gb,
     chunk_size, logits_mode) = inputs
    _, z, logits, gh, gw, gb, gz = output
    ctx.mark_non_differentiable(z, gh, gw, gb, gz)
    if not return_logits:
        ctx.mark_non_differentiable(logits)
    needs = ctx.needs_input_grad
    has_bias = bias is not None
    # Recompute in backward when the forward could not produce a needed gradient (the logits'
    # gradient of the CPU mode gives all three).
    if grads_from_logits(hidden, weight, return_logits, reduction, logits_mode):
        ctx.recompute = gz.numel() == 0  # no gradient asked for in the forward, or no rows
    else:
        ctx.recompute = reduction == "none" or not grads_in_forward(hidden.dtype) or \
            (needs[0] and not need_gh) or (needs[1] and not need_gw) or \
            (has_bias and needs[2] and not need_gb)
    ctx.return_logits = return_logits
    ctx.has_bias = has_bias
    ctx.params = (ignore_index, reduction, label_smoothing, lse_square_scale, softcap,
                  logit_scale)
    ctx.chunk_size = chunk_size
    ctx.save_for_backward(gh, gw, gb, gz, hidden, weight, bias, target, ce_weight)


def _flce_backward(ctx, grad_loss, grad_z, grad_logits, *unused):
    gh, gw, gb, gz, hidden, weight, bias, target, ce_weight = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if not ctx.return_logits:
        grad_logits = None
    if (grad_loss is None and grad_logits is None) or not any(needs[:3]):
        return (None,) * 17
    dh, dw, db = torch.ops.liger.fused_linear_cross_entropy_backward(
        grad_loss, grad_logits, gh, gw, gb, gz, hidden, weight, bias, target, ce_weight,
        *ctx.params, ctx.recompute, needs[0], needs[1], ctx.has_bias and needs[2],
        ctx.chunk_size)
    return (dh if needs[0] else None, dw if needs[1] else None,
            db if ctx.has_bias and needs[2] else None) + (None,) * 14


fused_linear_cross_entropy_op.register_autograd(_flce_backward, setup_context=_flce_setup_context)


def fused_linear_cross_entropy(
    hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None,
    ce_weight: Optional[Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
    label_smoothing: float = 0.0, lse_square_scale: float = 0.0, softcap: float = 0.0,
    logit_scale: float = 1.0, return_logits: bool = False, return_z_loss: bool = False,
    chunk_size: int = 0,
):
    """Loss of cross_entropy(linear(hidden, weight, bias)) without materialising the logits.

    Returns loss, plus logits (raw lm-head output) when return_logits, plus z_loss when
    return_z_loss, in that order.
    """
    g = torch.is_grad_enabled()
    loss, z, logits, *_ = torch.ops.liger.fused_linear_cross_entropy(
        hidden, weight, bias, target, ce_weight, ignore_index, reduction, label_smoothing,
        lse_square_scale, softcap, logit_scale, return_logits,
        g and hidden.requires_grad, g and weight.requires_grad,
        g and bias is not None and bias.requires_grad, chunk_size)
    out = (loss,) + ((logits,) if return_logits else ()) + ((z,) if return_z_loss else ())
    return out if len(out) > 1 else loss
