"""LayerNorm: Triton kernels, a torch reference, and the `liger::layer_norm` ops with autograd.

Semantics (F.layer_norm's, computed in fp32 whatever the input dtype):

    xf = x.float(); mean = xf.mean(-1); rstd = rsqrt(mean((xf - mean)**2, -1) + eps)
    y = ((xf - mean) * rstd * weight.float() + bias.float()).to(out_dtype)   # weight, bias optional

Rows of width <= MAX_FUSED_D sit whole in registers; wider rows loop over column blocks (the
variance by merging per-block (mean, M2) pairs, so two reads of x suffice).  The backward writes
fp32 partial dW/dB rows per program, summed afterwards.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from . import rms_norm as _rms
from .rms_norm import _add_grad, _load_input, _num_warps, _row_chunks, _rows_view
from .rounding import round_to
from .runtime import KERNEL_DTYPES, cpu_decomposition, next_pow2, triton_version, use_triton

# Tunables, read at call time (tests shrink them to reach the looped paths with small shapes).
MAX_FUSED_D = 8192
LOOP_BLOCK_D = 4096
TILE_BLOCK_D = 1024
TILE_ELEMS = 2048


# ----------------------------------------------------------------------------- forward kernels


@triton.jit
def _ln_fwd_fused_kernel(
    X, R, H, W, B, Y, MEAN, RSTD, n_rows, D, stride_x, stride_r, stride_h, stride_y, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < n_rows
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    x = _load_input(X, R, H, rows[:, None] * stride_x + cols[None, :], rows[:, None] * stride_r + cols[None, :],
                    rows[:, None] * stride_h + cols[None, :], mask, HAS_RESIDUAL, True)
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / D + eps)
    tl.store(MEAN + rows, mean, mask=rmask)
    tl.store(RSTD + rows, rstd, mask=rmask)
    y = xc * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    YDT = Y.dtype.element_ty
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], round_to(y, YDT).to(YDT), mask=mask)


@triton.jit
def _ln_fwd_looped_kernel(
    X, R, H, W, B, Y, MEAN, RSTD, D, stride_x, stride_r, stride_h, stride_y, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # With a residual, pass 1 writes h and pass 2 recomputes it (as _rms_fwd_looped_kernel does).
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    r_row = R + row * stride_r
    h_row = H + row * stride_h
    y_row = Y + row * stride_y
    # Pass 1: merge each block's (count, mean, M2) into the running one (Chan et al.), which
    # keeps the variance accurate without a third pass over x.
    n_a = 0.0
    mean = 0.0
    m2 = 0.0
    for off in range(0, D, BLOCK_D):
        cols = off + tl.arange(0, BLOCK_D)
        cmask = cols < D
        x = _load_input(x_row, r_row, h_row, cols, cols, cols, cmask, HAS_RESIDUAL, True)
        n_b = tl.sum(cmask.to(tl.float32), axis=0)
        mean_b = tl.sum(x, axis=0) / n_b
        xc = tl.where(cmask, x - mean_b, 0.0)
        m2_b = tl.sum(xc * xc, axis=0)
        delta = mean_b - mean
        n_ab = n_a + n_b
        mean = mean + delta * (n_b / n_ab)
        m2 = m2 + m2_b + delta * delta * (n_a * n_b / n_ab)
        n_a = n_ab
    rstd = tl.rsqrt(m2 / D + eps)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)
    YDT = Y.dtype.element_ty
    for off in range(0, D, BLOCK_D):
        cols = off + tl.arange(0, BLOCK_D)
        cmask = cols < D
        x = _load_input(x_row, r_row, h_row, cols, cols, cols, cmask, HAS_RESIDUAL, False)
        y = (x - mean) * rstd
        if HAS_W:
            y = y * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
        tl.store(y_row + cols, round_to(y, YDT).to(YDT), mask=cmask)


# ----------------------------------------------------------------------------- backward kernels


@triton.jit
def _ln_bwd_row_stats_kernel(
    DY, X, W, MEAN, RSTD, C1, C2, D, stride_dy, stride_x, HAS_W: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Wide rows only: c1 = mean(g), c2 = mean(g * xhat) per row, for the tiled kernel.
    row = tl.program_id(0).to(tl.int64)
    mean = tl.load(MEAN + row)
    rstd = tl.load(RSTD + row)
    acc1 = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_D], dtype=tl.float32)
    for off in range(0, D, BLOCK_D):
        cols = off + tl.arange(0, BLOCK_D)
        cmask = cols < D
        x = tl.load(X + row * stride_x + cols, mask=cmask, other=0.0).to(tl.float32)
        g = tl.load(DY + row * stride_dy + cols, mask=cmask, other=0.0).to(tl.float32)
        if HAS_W:
            g = g * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        acc1 += g
        acc2 += g * (x - mean) * rstd  # g is 0 past the row's end
    tl.store(C1 + row, tl.sum(acc1, axis=0) / D)
    tl.store(C2 + row, tl.sum(acc2, axis=0) / D)


@triton.jit
def _ln_bwd_kernel(
    DY, X, W, MEAN, RSTD, C1, C2, DX, DW_PART, DB_PART, DH, n_rows, D, stride_dy, stride_x, stride_dx,
    stride_dh, blocks_per_prog,
    HAS_W: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr, LOAD_C: tl.constexpr,
    HAS_DH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dx and partial dW/dB for one (row chunk, column block); see _rms_bwd_kernel for the layout
    (and HAS_DH, the add_layer_norm backward)."""
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    DXDT = DX.dtype.element_ty
    dw = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    db = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for i in range(0, blocks_per_prog):
        rows = ((pid * blocks_per_prog + i) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        rmask = rows < n_rows
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        xhat = (x - mean[:, None]) * rstd[:, None]  # only ever multiplied by dy, 0 where masked
        if HAS_W:
            g = dy * w
        else:
            g = dy
        if LOAD_C:
            c1 = tl.load(C1 + rows, mask=rmask, other=0.0)
            c2 = tl.load(C2 + rows, mask=rmask, other=0.0)
        else:
            c1 = tl.sum(g, axis=1) / D
            c2 = tl.sum(g * xhat, axis=1) / D
        dx = rstd[:, None] * (g - c1[:, None] - xhat * c2[:, None])
        dx = _add_grad(dx, DH, rows[:, None] * stride_dh + cols[None, :], mask, DXDT, HAS_DH)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], round_to(dx, DXDT).to(DXDT), mask=mask)
        if COMPUTE_DW:
            dw += dy * xhat
        if COMPUTE_DB:
            db += dy
    if COMPUTE_DW:
        tl.store(DW_PART + pid * D + cols, tl.sum(dw, axis=0), mask=cmask)
    if COMPUTE_DB:
        tl.store(DB_PART + pid * D + cols, tl.sum(db, axis=0), mask=cmask)


# ----------------------------------------------------------------------------- launchers


def _bwd_max_warps() -> int:
    # Triton 3.6 (the GPU machine's) gives the one-row D=4096 bf16 backward at 16 warps an 8-byte
    # stack frame on sm_80 (tests/gpu_compile); 8 warps compile clean there, 3.9 is clean at 16.
    return 16 if triton_version() >= (3, 9) else 8


def _alloc(shape, dtype, device) -> torch.Tensor:
    return _rms._alloc(shape, dtype, device)  # one place for poison tests to patch


def layer_norm_forward_triton(x, weight, bias, eps, out_dtype, y=None, mean=None, rstd=None,
                              residual=None, h=None):
    """Launch the forward kernels; outputs may be given (tests pre-fill them with NaN).
    With `residual` (and the contiguous output `h`): the norm of h = x + residual, h written too."""
    D = x.shape[-1]
    x2 = _rows_view(x, D)
    r2, h2 = (_rows_view(residual, D), h.view(-1, D)) if residual is not None else (x2, x2)
    n_rows = x2.shape[0]
    if y is None:
        y = _alloc(x.shape, out_dtype, x.device)
    if mean is None:
        mean = _alloc(x.shape[:-1], torch.float32, x.device)
    if rstd is None:
        rstd = _alloc(x.shape[:-1], torch.float32, x.device)
    y2 = y.view(-1, D)
    w = weight if weight is not None else x2  # dummy pointers, never read
    b = bias if bias is not None else x2
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, HAS_RESIDUAL=residual is not None)
    if D <= MAX_FUSED_D:
        block_d = next_pow2(D)
        block_r = min(max(1, TILE_ELEMS // block_d), next_pow2(n_rows))
        _ln_fwd_fused_kernel[(triton.cdiv(n_rows, block_r),)](
            x2, r2, h2, w, b, y2, mean, rstd, n_rows, D, x2.stride(0), r2.stride(0), h2.stride(0),
            y2.stride(0), eps, **flags,
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=_num_warps(block_r * block_d),
        )
    else:
        block_d = min(LOOP_BLOCK_D, next_pow2(D))
        _ln_fwd_looped_kernel[(n_rows,)](
            x2, r2, h2, w, b, y2, mean, rstd, D, x2.stride(0), r2.stride(0), h2.stride(0), y2.stride(0),
            eps, **flags,
            BLOCK_D=block_d, num_warps=_num_warps(block_d),
        )
    return y, mean, rstd


def layer_norm_backward_triton(dy, x, weight, bias, mean, rstd, weight_grad, bias_grad, dx=None,
                               dh=None):
    """Launch the backward kernels; returns dx, dweight or None, dbias or None.  `dh`: the
    gradient of x (there: h) from its other uses, added into dx (add_norm.py)."""
    D = x.shape[-1]
    x2 = _rows_view(x, D)
    dy2 = _rows_view(dy, D)
    dh2 = _rows_view(dh, D) if dh is not None else dy2
    n_rows = x2.shape[0]
    mean1 = mean.reshape(-1).contiguous()
    rstd1 = rstd.reshape(-1).contiguous()
    if dx is None:
        dx = _alloc(x.shape, x.dtype, x.device)
    dx2 = dx.view(-1, D)
    compute_dw = weight is not None and weight_grad
    compute_db = bias is not None and bias_grad
    w = weight if weight is not None else x2
    wide = D > MAX_FUSED_D
    if not wide:
        block_d = next_pow2(D)
        n_col_blocks = 1
        c1 = c2 = rstd1  # unused
    else:
        block_d = min(TILE_BLOCK_D, next_pow2(D))
        n_col_blocks = triton.cdiv(D, block_d)
        c1 = _alloc(n_rows, torch.float32, x.device)
        c2 = _alloc(n_rows, torch.float32, x.device)
        stats_block = min(LOOP_BLOCK_D, next_pow2(D))
        _ln_bwd_row_stats_kernel[(n_rows,)](
            dy2, x2, w, mean1, rstd1, c1, c2, D, dy2.stride(0), x2.stride(0), HAS_W=weight is not None,
            BLOCK_D=stats_block, num_warps=_num_warps(stats_block),
        )
    block_r = min(max(1, TILE_ELEMS // block_d), next_pow2(n_rows))
    n_chunks, per_prog = _row_chunks(triton.cdiv(n_rows, block_r), n_col_blocks, x.device)
    part_shape = (n_chunks, D)
    dw_part = _alloc(part_shape if compute_dw else (1,), torch.float32, x.device)
    db_part = _alloc(part_shape if compute_db else (1,), torch.float32, x.device)
    _ln_bwd_kernel[(n_chunks, n_col_blocks)](
        dy2, x2, w, mean1, rstd1, c1, c2, dx2, dw_part, db_part, dh2, n_rows, D, dy2.stride(0),
        x2.stride(0), dx2.stride(0), dh2.stride(0), per_prog, HAS_W=weight is not None,
        COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db, LOAD_C=wide, HAS_DH=dh is not None,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=min(_bwd_max_warps(), _num_warps(2 * block_r * block_d)),
    )
    dweight = dw_part.sum(0).to(weight.dtype) if compute_dw else None
    dbias = db_part.sum(0).to(bias.dtype) if compute_db else None
    return dx, dweight, dbias


# ----------------------------------------------------------------------------- torch reference


def layer_norm_reference(x, weight, bias, eps, out_dtype):
    xf = x.float()
    mean = xf.mean(-1)
    xc = xf - mean[..., None]
    rstd = torch.rsqrt(xc.pow(2).mean(-1) + eps)
    y = xc * rstd[..., None]
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype).contiguous(), mean.contiguous(), rstd.contiguous()


def layer_norm_backward_reference(dy, x, weight, bias, mean, rstd, weight_grad, bias_grad):
    D = x.shape[-1]
    dyf = dy.float()
    r = rstd[..., None]
    xhat = (x.float() - mean[..., None]) * r
    g = dyf if weight is None else dyf * weight.float()
    dx = r * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    dx = dx.to(x.dtype).contiguous()
    dweight = (dyf * xhat).reshape(-1, D).sum(0).to(weight.dtype) if weight is not None and weight_grad else None
    dbias = dyf.reshape(-1, D).sum(0).to(bias.dtype) if bias is not None and bias_grad else None
    return dx, dweight, dbias


# ----------------------------------------------------------------------------- ops


def _check(x, weight, bias):
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and (p.dim() != 1 or p.shape[0] != x.shape[-1]):
            raise ValueError(f"layer_norm: {name} shape {tuple(p.shape)} does not match width {x.shape[-1]}")


def _kernel_ok(x, weight, bias, out_dtype=None):
    return use_triton(x, weight, bias) and x.numel() > 0 and (out_dtype is None or out_dtype in KERNEL_DTYPES)


@torch.library.custom_op("liger::layer_norm", mutates_args=())
def layer_norm_op(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(x, weight, bias)
    if _kernel_ok(x, weight, bias, out_dtype):
        return layer_norm_forward_triton(x, weight, bias, eps, out_dtype)
    return _layer_norm_torch(x, weight, bias, eps, out_dtype)


def _layer_norm_torch(x, weight, bias, eps, out_dtype):
    _check(x, weight, bias)
    return layer_norm_reference(x, weight, bias, eps, out_dtype)


@layer_norm_op.register_fake
def _(x, weight, bias, eps, out_dtype):
    _check(x, weight, bias)
    stat = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return x.new_empty(x.shape, dtype=out_dtype), stat, torch.empty_like(stat)


def _empty_grad(x, p):
    return x.new_empty((0,), dtype=p.dtype if p is not None else x.dtype)


@torch.library.custom_op("liger::layer_norm_backward", mutates_args=())
def layer_norm_backward_op(
    dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    mean: torch.Tensor, rstd: torch.Tensor, weight_grad: bool, bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dx, dweight, dbias); a parameter's grad is an empty tensor when it is None or not wanted."""
    _check(x, weight, bias)
    if _kernel_ok(x, weight, bias) and use_triton(dy):
        dx, dw, db = layer_norm_backward_triton(dy, x, weight, bias, mean, rstd, weight_grad, bias_grad)
        return dx, dw if dw is not None else _empty_grad(x, weight), db if db is not None else _empty_grad(x, bias)
    return _layer_norm_backward_torch(dy, x, weight, bias, mean, rstd, weight_grad, bias_grad)


def _layer_norm_backward_torch(dy, x, weight, bias, mean, rstd, weight_grad, bias_grad):
    _check(x, weight, bias)
    dx, dw, db = layer_norm_backward_reference(dy, x, weight, bias, mean, rstd, weight_grad, bias_grad)
    return dx, dw if dw is not None else _empty_grad(x, weight), db if db is not None else _empty_grad(x, bias)


@layer_norm_backward_op.register_fake
def _(dy, x, weight, bias, mean, rstd, weight_grad, bias_grad):
    dw = weight.new_empty(weight.shape) if weight is not None and weight_grad else _empty_grad(x, weight)
    db = bias.new_empty(bias.shape) if bias is not None and bias_grad else _empty_grad(x, bias)
    return x.new_empty(x.shape), dw, db


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps, out_dtype = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if not (need_x or need_w or need_b):
        return None, None, None, None, None
    need_w = need_w and weight is not None
    need_b = need_b and bias is not None
    dx, dw, db = torch.ops.liger.layer_norm_backward(dy, x, weight, bias, mean, rstd, need_w, need_b)
    return dx if need_x else None, dw if need_w else None, db if need_b else None, None, None


layer_norm_op.register_autograd(_backward, setup_context=_setup_context)
# On CPU, inductor fuses the torch path better than it runs as separate aten calls (runtime.py).
cpu_decomposition(torch.ops.liger.layer_norm)(_layer_norm_torch)
cpu_decomposition(torch.ops.liger.layer_norm_backward)(_layer_norm_backward_torch)


def layer_norm(x, weight=None, bias=None, eps=1e-5, out_dtype=None):
    """LayerNorm over the last dim of x (fp32 statistics); returns y only. out_dtype defaults to x's."""
    if out_dtype is None:
        out_dtype = x.dtype
    return torch.ops.liger.layer_norm(x, weight, bias, float(eps), out_dtype)[0]
