"""Gated RMSNorm, `rms_norm(x) * silu(gate)` (Qwen3-Next's `Qwen3NextRMSNormGated`, the gated
norm after linear attention / SSM blocks): one `liger::gated_rms_norm` op, forward and backward.

Semantics (each rounding is one eager makes; dtypes are what the matched code computes in):

    h = rms_norm(x, weight, eps, offset, casting_mode) rounded to norm_dtype  (kernels/rms_norm.py)
    a = silu(gate) computed in fp32, rounded to gate.dtype     (gate as silu reads it, e.g. fp32)
    y = (h * a) computed in fp32, rounded to prod_dtype (the product's dtype), then to out_dtype

so Qwen3-Next in bf16 (`w * n.to(bf16)` is bf16, `* silu(gate.float())` is fp32, `.to(bf16)`) is
norm_dtype=bf16, gate fp32, prod_dtype=fp32, out_dtype=bf16.  The gate is applied after the norm
here; Mamba-2's `MambaRMSNormGated` multiplies before the (grouped) norm, another op.

The backward recomputes h and silu(gate) from x, gate and the saved rstd, and rounds where eager's
autograd rounds: dy to prod_dtype, the product's gradients to h's and silu's dtypes, then the
RMSNorm backward of kernels/rms_norm.py (its Triton helpers are imported, not copied), with its
per-element roundings of an fp16 / bf16 llama-cast product (rms_norm's ROUND_GRAD: the gradient
reaching h cast to the product's dtype, and each dh * w and dh * n rounded to it, as eager's mul
backward computes them before the weight gradient's sum over rows).  Rows wider
than rms_norm.MAX_FUSED_D (backward under triton < 3.9: half that) take the torch path (gated norms are per head or per channel group:
128 - 8192 wide in the models that have them).
"""

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import rms_norm as rn
from .rms_norm import (_apply_weight, _bwd_row_block, _dw_term, _effective_weight, _rms_bwd_tile, _rms_dx,
                       _rms_tile_fwd, _store_tile, _weighted_grad, rms_norm_backward_reference,
                       rms_norm_reference)
from .triton_math import silu, silu_grad
from .rounding import round_to
from .runtime import KERNEL_DTYPES, cpu_decomposition, next_pow2, triton_version, use_triton

# Rounding targets as constexpr codes (0 = none: fp32)
_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def _round_code(v, CODE: tl.constexpr):
    if CODE == 1:
        out = round_to(v, tl.bfloat16)
    elif CODE == 2:
        out = round_to(v, tl.float16)
    else:
        out = v
    return out


@triton.jit
def _gated_rms_fwd_kernel(
    X, W, G, Y, RSTD, n_rows, D, stride_x, stride_g, stride_y, eps, offset,
    HAS_W: tl.constexpr, FP32_MODE: tl.constexpr, HAS_OFFSET: tl.constexpr, ROUND_PROD: tl.constexpr,
    NORM_DT: tl.constexpr, PROD_DT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < n_rows
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    h = _rms_tile_fwd(x, W, RSTD, rows, cols, rmask, cmask, D, eps, offset, X.dtype.element_ty,
                         HAS_W, FP32_MODE, HAS_OFFSET, ROUND_PROD)
    h = _round_code(h, NORM_DT)
    g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    a = round_to(silu(g), G.dtype.element_ty)
    y = _round_code(h * a, PROD_DT)
    _store_tile(Y, rows, stride_y, cols, y, mask)


@triton.jit
def _gated_rms_bwd_kernel(
    DY, X, W, G, RSTD, DX, DG, DW_PART, n_rows, D, stride_dy, stride_x, stride_g, stride_dx,
    stride_dg, blocks_per_prog, offset,
    HAS_W: tl.constexpr, FP32_MODE: tl.constexpr, HAS_OFFSET: tl.constexpr, ROUND_PROD: tl.constexpr,
    NORM_DT: tl.constexpr, PROD_DT: tl.constexpr, COMPUTE_DW: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Each program owns DW_PART[program_id(0)] (no atomics), as the RMSNorm backward does.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    if HAS_W:
        w = _effective_weight(W, cols, cmask, offset, HAS_OFFSET, FP32_MODE)[None, :]
    XDT = X.dtype.element_ty
    GDT = G.dtype.element_ty
    dw = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for i in range(0, blocks_per_prog):
        rows, rmask, mask = _bwd_row_block(pid, i, blocks_per_prog, n_rows, cmask, BLOCK_R)
        dy, rstd, n = _rms_bwd_tile(X, DY, RSTD, rows, cols, rmask, mask, stride_x, stride_dy)
        g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_W:
            h = _apply_weight(n, w, XDT, FP32_MODE, ROUND_PROD)
        else:
            h = n
        h = _round_code(h, NORM_DT)
        a = round_to(silu(g), GDT)  # the forward's value (eager's backward multiplies by it)
        dv = _round_code(dy, PROD_DT)  # the trailing cast's backward rounds dy to the product dtype
        dh = _round_code(dv * a, NORM_DT)
        dz = round_to(dv * h, GDT)
        dg = dz * silu_grad(g)
        _store_tile(DG, rows, stride_dg, cols, dg, mask)
        # From here the RMSNorm backward of dh (rms_norm._rms_bwd_kernel's fused path), rounding
        # where eager's mul backward does in an fp16 / bf16 llama-cast product (ROUND_PROD): dh
        # cast to the product's dtype, dh * w and each dh * n term rounded to it
        if HAS_W:
            gw = _weighted_grad(dh, w, XDT, ROUND_PROD)
            if ROUND_PROD:
                dh = round_to(dh, XDT)
        else:
            gw = dh
        _store_tile(DX, rows, stride_dx, cols, _rms_dx(gw, n, rstd, RSTD, rows, rmask, D, False), mask)
        if COMPUTE_DW:
            dw += _dw_term(dh, n, XDT, FP32_MODE, ROUND_PROD)
    if COMPUTE_DW:
        tl.store(DW_PART + pid * D + cols, tl.sum(dw, axis=0), mask=cmask)


# ----------------------------------------------------------------------------- launchers


def _tile(n_rows: int, D: int):
    block_d = next_pow2(D)
    return min(max(1, rn.TILE_ELEMS // block_d), next_pow2(n_rows)), block_d


def _codes(norm_dtype, prod_dtype):
    return dict(NORM_DT=_CODES[norm_dtype], PROD_DT=_CODES[prod_dtype])


def gated_rms_norm_forward_triton(x, weight, gate, eps, offset, casting_mode, norm_dtype, prod_dtype,
                                  out_dtype, y=None, rstd=None):
    """Launch the forward kernel; `y` / `rstd` may be given (tests pre-fill them with NaN)."""
    D = x.shape[-1]
    x2, g2 = rn._rows_view(x, D), rn._rows_view(gate, D)
    n_rows = x2.shape[0]
    y = rn._alloc(x.shape, out_dtype, x.device) if y is None else y
    rstd = rn._alloc(x.shape[:-1], torch.float32, x.device) if rstd is None else rstd
    y2 = y.view(-1, D)
    block_r, block_d = _tile(n_rows, D)
    _gated_rms_fwd_kernel[(triton.cdiv(n_rows, block_r),)](
        x2, weight if weight is not None else x2, g2, y2, rstd, n_rows, D, x2.stride(0), g2.stride(0),
        y2.stride(0), eps, offset, **rn._flags(weight, offset, casting_mode, x.dtype),
        **_codes(norm_dtype, prod_dtype), BLOCK_R=block_r, BLOCK_D=block_d,
        num_warps=rn._num_warps(block_r * block_d),
    )
    return y, rstd


def gated_rms_norm_backward_triton(dy, x, weight, gate, rstd, offset, casting_mode, norm_dtype,
                                   prod_dtype, weight_grad, dx=None, dgate=None):
    """Launch the backward kernel; returns dx, dgate and (partial sums summed) dweight or None."""
    D = x.shape[-1]
    x2, g2, dy2 = rn._rows_view(x, D), rn._rows_view(gate, D), rn._rows_view(dy, D)
    n_rows = x2.shape[0]
    dx = rn._alloc(x.shape, x.dtype, x.device) if dx is None else dx
    dgate = rn._alloc(gate.shape, gate.dtype, x.device) if dgate is None else dgate
    dx2, dg2 = dx.view(-1, D), dgate.view(-1, D)
    compute_dw = weight is not None and weight_grad
    block_r, block_d = _tile(n_rows, D)
    n_chunks, per_prog = rn._row_chunks(triton.cdiv(n_rows, block_r), 1, x.device)
    dw_part = rn._alloc((n_chunks, D) if compute_dw else (1,), torch.float32, x.device)
    _gated_rms_bwd_kernel[(n_chunks,)](
        dy2, x2, weight if weight is not None else x2, g2, rstd.reshape(-1).contiguous(), dx2, dg2,
        dw_part, n_rows, D, dy2.stride(0), x2.stride(0), g2.stride(0), dx2.stride(0), dg2.stride(0),
        per_prog, offset, **rn._flags(weight, offset, casting_mode, x.dtype),
        **_codes(norm_dtype, prod_dtype), COMPUTE_DW=compute_dw, BLOCK_R=block_r, BLOCK_D=block_d,
        num_warps=rn._num_warps(2 * block_r * block_d),
    )
    return dx, dgate, (dw_part.sum(0).to(weight.dtype) if compute_dw else None)


# ----------------------------------------------------------------------------- torch reference


def _silu_and_grad(gate):
    """silu(gate) rounded to gate's dtype, and silu'(gate), computed in fp32 (fp64 for fp64)."""
    gf = gate.to(torch.promote_types(gate.dtype, torch.float32))
    s = torch.sigmoid(gf)
    # F.silu, not gf * s: eager's value (the kernels' triton_math.silu is its formula)
    return F.silu(gf).to(gate.dtype), s * (1 + gf * (1 - s))


def gated_rms_norm_reference(x, weight, gate, eps, offset, casting_mode, norm_dtype, prod_dtype, out_dtype):
    h, rstd = rms_norm_reference(x, weight, eps, offset, casting_mode, norm_dtype)
    a, _ = _silu_and_grad(gate)
    cdt = torch.promote_types(prod_dtype, torch.float32)
    y = (h.to(cdt) * a.to(cdt)).to(prod_dtype).to(out_dtype)
    return y.contiguous(), rstd


def gated_rms_norm_backward_reference(dy, x, weight, gate, rstd, offset, casting_mode, norm_dtype,
                                      prod_dtype, weight_grad):
    cdt = torch.promote_types(prod_dtype, torch.float32)
    n = x.float() * rstd[..., None]  # h recomputed from the saved rstd
    if weight is None:
        h = n
    elif casting_mode == "llama":
        w = rn._effective_weight_torch(weight, offset, "llama")
        h = n.to(x.dtype) * w
    else:
        h = n * rn._effective_weight_torch(weight, offset, "fp32")
    h = h.to(norm_dtype).to(cdt)
    a, da = _silu_and_grad(gate)
    dv = dy.to(prod_dtype).to(cdt)
    dh = (dv * a.to(cdt)).to(norm_dtype)
    dz = (dv * h).to(gate.dtype).to(da.dtype)
    dgate = (dz * da).to(gate.dtype).contiguous()
    dx, dw = rms_norm_backward_reference(dh, x, weight, rstd, offset, casting_mode, weight_grad)
    return dx, dgate, dw


# ----------------------------------------------------------------------------- ops


def _check(x, weight, gate, casting_mode, norm_dtype, prod_dtype):
    rn._check(x, weight, casting_mode)
    if gate.shape != x.shape:
        raise ValueError(f"gated_rms_norm: gate {tuple(gate.shape)} and x {tuple(x.shape)} differ "
                         "(the gate must have x's shape)")
    for name, dt in (("norm_dtype", norm_dtype), ("prod_dtype", prod_dtype)):
        if not dt.is_floating_point:
            raise ValueError(f"gated_rms_norm: {name} must be a floating dtype, got {dt}")


def _kernel_ok(x, weight, gate, *dtypes):
    return (use_triton(x, weight, gate) and x.numel() > 0 and x.shape[-1] <= rn.MAX_FUSED_D
            and all(dt in KERNEL_DTYPES for dt in dtypes))


def _bwd_max_d() -> int:
    # Triton 3.6 (the GPU machine's) spills the one-row D = 8192 backward at 16 warps on sm_90
    # (56 B stack frame; tests/gpu_compile); 3.9 compiles it clean.  Under 3.6 such rows take the
    # torch path, as rows wider than MAX_FUSED_D do anyway.
    return rn.MAX_FUSED_D if triton_version() >= (3, 9) else rn.MAX_FUSED_D // 2


def _forward_torch(x, weight, gate, eps, offset, casting_mode, norm_dtype, prod_dtype, out_dtype):
    _check(x, weight, gate, casting_mode, norm_dtype, prod_dtype)
    return gated_rms_norm_reference(x, weight, gate, eps, offset, casting_mode, norm_dtype, prod_dtype,
                                    out_dtype)


def _backward_torch(dy, x, weight, gate, rstd, offset, casting_mode, norm_dtype, prod_dtype, weight_grad):
    _check(x, weight, gate, casting_mode, norm_dtype, prod_dtype)
    dx, dgate, dw = gated_rms_norm_backward_reference(dy, x, weight, gate, rstd, offset, casting_mode,
                                                      norm_dtype, prod_dtype, weight_grad)
    return dx, dgate, _dw_or_empty(dw, x, weight)


def _dw_or_empty(dw, x, weight):
    if dw is not None:
        return dw
    return x.new_empty((0,), dtype=weight.dtype if weight is not None else x.dtype)


@torch.library.custom_op("liger::gated_rms_norm", mutates_args=())
def gated_rms_norm_op(
    x: torch.Tensor, weight: Optional[torch.Tensor], gate: torch.Tensor, eps: float, offset: float,
    casting_mode: str, norm_dtype: torch.dtype, prod_dtype: torch.dtype, out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (y, rstd); see the module docstring."""
    _check(x, weight, gate, casting_mode, norm_dtype, prod_dtype)
    if _kernel_ok(x, weight, gate, norm_dtype, prod_dtype, out_dtype):
        return gated_rms_norm_forward_triton(x, weight, gate, eps, offset, casting_mode, norm_dtype,
                                             prod_dtype, out_dtype)
    return _forward_torch(x, weight, gate, eps, offset, casting_mode, norm_dtype, prod_dtype, out_dtype)


@gated_rms_norm_op.register_fake
def _(x, weight, gate, eps, offset, casting_mode, norm_dtype, prod_dtype, out_dtype):
    _check(x, weight, gate, casting_mode, norm_dtype, prod_dtype)
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("liger::gated_rms_norm_backward", mutates_args=())
def gated_rms_norm_backward_op(
    dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], gate: torch.Tensor,
    rstd: torch.Tensor, offset: float, casting_mode: str, norm_dtype: torch.dtype,
    prod_dtype: torch.dtype, weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dx, dgate, dweight); dweight is empty when weight is None or weight_grad is False."""
    _check(x, weight, gate, casting_mode, norm_dtype, prod_dtype)
    if (_kernel_ok(x, weight, gate, norm_dtype, prod_dtype) and use_triton(dy)
            and x.shape[-1] <= _bwd_max_d()):
        dx, dgate, dw = gated_rms_norm_backward_triton(dy, x, weight, gate, rstd, offset, casting_mode,
                                                       norm_dtype, prod_dtype, weight_grad)
        return dx, dgate, _dw_or_empty(dw, x, weight)
    return _backward_torch(dy, x, weight, gate, rstd, offset, casting_mode, norm_dtype, prod_dtype,
                           weight_grad)


@gated_rms_norm_backward_op.register_fake
def _(dy, x, weight, gate, rstd, offset, casting_mode, norm_dtype, prod_dtype, weight_grad):
    dw = (weight.new_empty(weight.shape) if weight is not None and weight_grad
          else x.new_empty((0,), dtype=weight.dtype if weight is not None else x.dtype))
    return x.new_empty(x.shape), gate.new_empty(gate.shape), dw


def _setup_context(ctx, inputs, output):
    x, weight, gate, eps, offset, casting_mode, norm_dtype, prod_dtype, out_dtype = inputs
    ctx.save_for_backward(x, weight, gate, output[1])
    ctx.args = (offset, casting_mode, norm_dtype, prod_dtype)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dy, _drstd):
    x, weight, gate, rstd = ctx.saved_tensors
    need_x, need_w, need_g = ctx.needs_input_grad[:3]
    none = (None,) * 6
    if not (need_x or need_w or need_g):
        return (None, None, None) + none
    need_w = need_w and weight is not None
    offset, mode, norm_dtype, prod_dtype = ctx.args
    dx, dgate, dw = torch.ops.liger.gated_rms_norm_backward(dy, x, weight, gate, rstd, offset, mode,
                                                            norm_dtype, prod_dtype, need_w)
    return (dx if need_x else None, dw if need_w else None, dgate if need_g else None) + none


gated_rms_norm_op.register_autograd(_backward, setup_context=_setup_context)
# On CPU, inductor fuses the torch path better than it runs as separate aten calls (runtime.py).
cpu_decomposition(torch.ops.liger.gated_rms_norm)(_forward_torch)
cpu_decomposition(torch.ops.liger.gated_rms_norm_backward)(_backward_torch)


def gated_rms_norm(x, gate, weight=None, eps=1e-6, offset=0.0, casting_mode="llama", norm_dtype=None,
                   prod_dtype=None, out_dtype=None):
    """rms_norm(x, weight) * silu(gate); the dtypes default to eager's for the plain expression
    `rms_norm(x) * F.silu(gate)` (see the module docstring)."""
    if norm_dtype is None:
        norm_dtype = rn.default_out_dtype(x, weight, casting_mode)
    if prod_dtype is None:
        prod_dtype = torch.promote_types(norm_dtype, gate.dtype)
    out_dtype = prod_dtype if out_dtype is None else out_dtype
    return torch.ops.liger.gated_rms_norm(x, weight, gate, float(eps), float(offset), casting_mode,
                                          norm_dtype, prod_dtype, out_dtype)[0]
