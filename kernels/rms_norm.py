"""RMSNorm: Triton kernels, a torch reference, and the `liger::rms_norm` ops with autograd.

Semantics (the compiler rewrites eager code into these ops, so they follow eager's roundings):

    xf = x.float(); rstd = rsqrt(mean(xf**2, -1) + eps); n = xf * rstd
    weight None : y = n.to(out_dtype)
    "llama"     : y = (n.to(x.dtype) * w).to(out_dtype), w = (weight.float() + offset).to(weight.dtype),
                  the product rounded to promote_types(x.dtype, weight.dtype)   (Llama / HF)
    "fp32"      : y = (n * (weight.float() + offset)).to(out_dtype)              (Gemma)

Kernels: rows of width <= MAX_FUSED_D sit whole in registers (one pass); wider rows loop over
column blocks.  The backward writes one fp32 partial dW row per program, summed afterwards.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from .rounding import round_to
from .runtime import KERNEL_DTYPES, cpu_decomposition, next_pow2, num_programs_hint, use_triton

CASTING_MODES = ("llama", "fp32")

# Tunables, read at call time (tests shrink them to reach the looped paths with small shapes).
MAX_FUSED_D = 8192  # widest row kept whole in registers
LOOP_BLOCK_D = 4096  # column block of the per-row looped kernels
TILE_BLOCK_D = 1024  # column block of the wide backward's (row chunk, column block) grid
TILE_ELEMS = 2048  # fused kernels stack rows until a tile holds about this many elements


# ----------------------------------------------------------------------------- Triton helpers


@triton.jit
def _effective_weight(W, cols, cmask, offset, HAS_OFFSET: tl.constexpr, FP32_MODE: tl.constexpr):
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_OFFSET:
        w = w + offset
        if not FP32_MODE:  # llama: (weight.float() + offset).to(weight.dtype)
            w = round_to(w, W.dtype.element_ty)
    return w


@triton.jit
def _apply_weight(n, w, XDT: tl.constexpr, FP32_MODE: tl.constexpr, ROUND_PROD: tl.constexpr):
    if FP32_MODE:
        y = n * w
    else:
        y = round_to(n, XDT) * w
        if ROUND_PROD:  # the product is computed in x.dtype when weight has the same dtype
            y = round_to(y, XDT)
    return y


@triton.jit
def _load_input(X, R, H, offs_x, offs_r, offs_h, mask, HAS_RESIDUAL: tl.constexpr, STORE_H: tl.constexpr):
    """The normalised input as fp32: x, or (HAS_RESIDUAL) h = x + residual rounded to h's dtype as
    eager's add rounds it (fp32 sum, one rounding), stored to H when STORE_H.  Shared by the
    RMSNorm and LayerNorm kernels (the add_norm ops)."""
    x = tl.load(X + offs_x, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        HDT = H.dtype.element_ty
        x = round_to(x + tl.load(R + offs_r, mask=mask, other=0.0).to(tl.float32), HDT)
        if STORE_H:
            tl.store(H + offs_h, x.to(HDT), mask=mask)
    return x


@triton.jit
def _add_grad(dx, DH, offs_dh, mask, DXDT: tl.constexpr, HAS_DH: tl.constexpr):
    """dx plus h's own gradient (HAS_DH): eager rounds the norm's gradient to h's dtype and sums the
    two gradients of h there, so the sum is formed from the rounded value."""
    if HAS_DH:
        dx = round_to(dx, DXDT) + tl.load(DH + offs_dh, mask=mask, other=0.0).to(tl.float32)
    return dx


@triton.jit
def _store_tile(P, rows, stride, cols, v, mask):
    """Store fp32 [BLOCK_R, BLOCK_D] values rounded (round to nearest even) to P's dtype."""
    PDT = P.dtype.element_ty
    tl.store(P + rows[:, None] * stride + cols[None, :], round_to(v, PDT).to(PDT), mask=mask)


@triton.jit
def _rms_tile_fwd(x, W, RSTD, rows, cols, rmask, cmask, D, eps, offset, XDT: tl.constexpr,
                  HAS_W: tl.constexpr, FP32_MODE: tl.constexpr, HAS_OFFSET: tl.constexpr,
                  ROUND_PROD: tl.constexpr):
    """The weighted norm of whole rows x (fp32 [BLOCK_R, BLOCK_D]), rstd stored to RSTD.  Shared
    by the RMSNorm and gated RMSNorm forward kernels."""
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
    tl.store(RSTD + rows, rstd, mask=rmask)
    n = x * rstd[:, None]
    if HAS_W:
        w = _effective_weight(W, cols, cmask, offset, HAS_OFFSET, FP32_MODE)
        y = _apply_weight(n, w[None, :], XDT, FP32_MODE, ROUND_PROD)
    else:
        y = n
    return y


@triton.jit
def _bwd_row_block(pid, i, blocks_per_prog, n_rows, cmask, BLOCK_R: tl.constexpr):
    """Rows of the backward's i-th row block of program pid, their mask and the tile mask."""
    rows = ((pid * blocks_per_prog + i) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    rmask = rows < n_rows
    return rows, rmask, rmask[:, None] & cmask[None, :]


@triton.jit
def _rms_bwd_tile(X, DY, RSTD, rows, cols, rmask, mask, stride_x, stride_dy):
    """(dy, rstd, n) of a row tile in fp32, n = x * rstd recomputed from the saved rstd."""
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
    return dy, rstd, x * rstd[:, None]


@triton.jit
def _rms_dx(g, n, rstd, C, rows, rmask, D, LOAD_C: tl.constexpr):
    """The norm's input gradient rstd * (g - n * c), g = dy * w, c = mean(g * n) per row (read
    from C when LOAD_C: the wide path's row-stats kernel computed it)."""
    if LOAD_C:
        c = tl.load(C + rows, mask=rmask, other=0.0)
    else:
        c = tl.sum(g * n, axis=1) / D
    return rstd[:, None] * (g - n * c[:, None])


@triton.jit
def _dw_term(dy, n, XDT: tl.constexpr, FP32_MODE: tl.constexpr, ROUND_GRAD: tl.constexpr):
    """One row tile's terms of dW = sum(dy * n)."""
    if FP32_MODE:
        t = dy * n
    else:  # llama multiplies the weight by n already rounded to x.dtype
        t = dy * round_to(n, XDT)
        if ROUND_GRAD:  # eager's mul backward computes each term in the product's dtype
            t = round_to(t, XDT)
    return t


# ----------------------------------------------------------------------------- forward kernels


@triton.jit
def _rms_fwd_fused_kernel(
    X, R, H, W, Y, RSTD, n_rows, D, stride_x, stride_r, stride_h, stride_y, eps, offset,
    HAS_W: tl.constexpr, FP32_MODE: tl.constexpr, HAS_OFFSET: tl.constexpr, ROUND_PROD: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # A [BLOCK_R, BLOCK_D] tile: BLOCK_R whole rows (several per program when rows are narrow).
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < n_rows
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    x = _load_input(X, R, H, rows[:, None] * stride_x + cols[None, :], rows[:, None] * stride_r + cols[None, :],
                    rows[:, None] * stride_h + cols[None, :], mask, HAS_RESIDUAL, True)
    y = _rms_tile_fwd(x, W, RSTD, rows, cols, rmask, cmask, D, eps, offset, X.dtype.element_ty,
                      HAS_W, FP32_MODE, HAS_OFFSET, ROUND_PROD)
    _store_tile(Y, rows, stride_y, cols, y, mask)


@triton.jit
def _rms_fwd_looped_kernel(
    X, R, H, W, Y, RSTD, D, stride_x, stride_r, stride_h, stride_y, eps, offset,
    HAS_W: tl.constexpr, FP32_MODE: tl.constexpr, HAS_OFFSET: tl.constexpr, ROUND_PROD: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One wide row per program: pass 1 sums squares, pass 2 re-reads (mostly from L2) and writes.
    # With a residual, pass 1 writes h and pass 2 recomputes it from x and residual (reading back
    # what other threads of the program stored would need a barrier).
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    r_row = R + row * stride_r
    h_row = H + row * stride_h
    y_row = Y + row * stride_y
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for off in range(0, D, BLOCK_D):
        cols = off + tl.arange(0, BLOCK_D)
        x = _load_input(x_row, r_row, h_row, cols, cols, cols, cols < D, HAS_RESIDUAL, True)
        acc += x * x
    rstd = tl.rsqrt(tl.sum(acc, axis=0) / D + eps)
    tl.store(RSTD + row, rstd)
    YDT = Y.dtype.element_ty
    for off in range(0, D, BLOCK_D):
        cols = off + tl.arange(0, BLOCK_D)
        cmask = cols < D
        n = _load_input(x_row, r_row, h_row, cols, cols, cols, cmask, HAS_RESIDUAL, False) * rstd
        if HAS_W:
            w = _effective_weight(W, cols, cmask, offset, HAS_OFFSET, FP32_MODE)
            y = _apply_weight(n, w, X.dtype.element_ty, FP32_MODE, ROUND_PROD)
        else:
            y = n
        tl.store(y_row + cols, round_to(y, YDT).to(YDT), mask=cmask)


# ----------------------------------------------------------------------------- backward kernels


@triton.jit
def _weighted_grad(dy, w, XDT: tl.constexpr, ROUND_GRAD: tl.constexpr):
    """The gradient reaching n from y = n * w.  ROUND_GRAD (llama casting, an fp16 / bf16
    product): eager's mul backward computes dy * w in the product's dtype (x's), from dy in it."""
    if ROUND_GRAD:
        g = round_to(round_to(dy, XDT) * w, XDT)
    else:
        g = dy * w
    return g


@triton.jit
def _rms_bwd_row_stats_kernel(
    DY, X, W, RSTD, C, D, stride_dy, stride_x, offset,
    HAS_W: tl.constexpr, FP32_MODE: tl.constexpr, HAS_OFFSET: tl.constexpr, ROUND_GRAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Wide rows only: c = mean(g * n) per row, so the tiled kernel can finish dx column-block-wise.
    row = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for off in range(0, D, BLOCK_D):
        cols = off + tl.arange(0, BLOCK_D)
        cmask = cols < D
        x = tl.load(X + row * stride_x + cols, mask=cmask, other=0.0).to(tl.float32)
        g = tl.load(DY + row * stride_dy + cols, mask=cmask, other=0.0).to(tl.float32)
        if HAS_W:
            g = _weighted_grad(g, _effective_weight(W, cols, cmask, offset, HAS_OFFSET, FP32_MODE),
                               X.dtype.element_ty, ROUND_GRAD)
        acc += g * x
    rstd = tl.load(RSTD + row)
    tl.store(C + row, tl.sum(acc, axis=0) * rstd / D)


@triton.jit
def _rms_bwd_kernel(
    DY, X, W, RSTD, C, DX, DW_PART, DH, n_rows, D, stride_dy, stride_x, stride_dx, stride_dh,
    blocks_per_prog, offset,
    HAS_W: tl.constexpr, FP32_MODE: tl.constexpr, HAS_OFFSET: tl.constexpr, COMPUTE_DW: tl.constexpr,
    LOAD_C: tl.constexpr, HAS_DH: tl.constexpr, ROUND_GRAD: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dx and a partial dW for one (row chunk, column block).

    Fused (LOAD_C=False): the column block is the whole row and c = mean(g*n) is computed here.
    Wide (LOAD_C=True): c comes from _rms_bwd_row_stats_kernel.  Either way each program owns
    row DW_PART[program_id(0)] over its columns, so partial sums need no atomics.
    HAS_DH (add_rms_norm): X is h = x + residual and DX receives dh + the norm's gradient.
    """
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    if HAS_W:
        w = _effective_weight(W, cols, cmask, offset, HAS_OFFSET, FP32_MODE)[None, :]
    dw = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for i in range(0, blocks_per_prog):
        rows, rmask, mask = _bwd_row_block(pid, i, blocks_per_prog, n_rows, cmask, BLOCK_R)
        dy, rstd, n = _rms_bwd_tile(X, DY, RSTD, rows, cols, rmask, mask, stride_x, stride_dy)
        if HAS_W:
            g = _weighted_grad(dy, w, X.dtype.element_ty, ROUND_GRAD)
            if ROUND_GRAD:
                dy = round_to(dy, X.dtype.element_ty)
        else:
            g = dy
        dx = _rms_dx(g, n, rstd, C, rows, rmask, D, LOAD_C)
        dx = _add_grad(dx, DH, rows[:, None] * stride_dh + cols[None, :], mask, DX.dtype.element_ty, HAS_DH)
        _store_tile(DX, rows, stride_dx, cols, dx, mask)
        if COMPUTE_DW:
            dw += _dw_term(dy, n, X.dtype.element_ty, FP32_MODE, ROUND_GRAD)
    if COMPUTE_DW:
        tl.store(DW_PART + pid * D + cols, tl.sum(dw, axis=0), mask=cmask)


# ----------------------------------------------------------------------------- launchers


def _alloc(shape, dtype, device) -> torch.Tensor:
    """Every launcher buffer comes from here, so poison tests can hand out NaN-filled memory."""
    return torch.empty(shape, dtype=dtype, device=device)


def _num_warps(tile_elems: int) -> int:
    # ~16 fp32 values per thread (backward kernels pass twice their tile: they hold twice the arrays)
    return max(4, min(16, tile_elems // 512))


def _rows_view(t: torch.Tensor, D: int) -> torch.Tensor:
    """t as [rows, D] with unit column stride (a view when possible)."""
    t2 = t.reshape(-1, D)
    if t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


def _flags(weight, offset, casting_mode, x_dtype):
    fp32_mode = casting_mode == "fp32"
    round_prod = (
        weight is not None and not fp32_mode and torch.promote_types(x_dtype, weight.dtype) != torch.float32
    )
    return dict(
        HAS_W=weight is not None, FP32_MODE=fp32_mode, HAS_OFFSET=weight is not None and offset != 0.0,
        ROUND_PROD=round_prod,
    )


def rms_norm_forward_triton(x, weight, eps, offset, casting_mode, out_dtype, y=None, rstd=None,
                            residual=None, h=None):
    """Launch the forward kernels; `y` / `rstd` may be given (tests pre-fill them with NaN).
    With `residual` (and the [.., D] output `h`, contiguous), the norm is of h = x + residual and
    h is written too (add_norm.py)."""
    D = x.shape[-1]
    x2 = _rows_view(x, D)
    r2, h2 = (_rows_view(residual, D), h.view(-1, D)) if residual is not None else (x2, x2)
    n_rows = x2.shape[0]
    if y is None:
        y = _alloc(x.shape, out_dtype, x.device)
    if rstd is None:
        rstd = _alloc(x.shape[:-1], torch.float32, x.device)
    y2 = y.view(-1, D)
    flags = _flags(weight, offset, casting_mode, x.dtype)
    w = weight if weight is not None else x2  # dummy pointer, never read
    if D <= MAX_FUSED_D:
        block_d = next_pow2(D)
        block_r = min(max(1, TILE_ELEMS // block_d), next_pow2(n_rows))
        grid = (triton.cdiv(n_rows, block_r),)
        _rms_fwd_fused_kernel[grid](
            x2, r2, h2, w, y2, rstd, n_rows, D, x2.stride(0), r2.stride(0), h2.stride(0), y2.stride(0),
            eps, offset, **flags, HAS_RESIDUAL=residual is not None, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=_num_warps(block_r * block_d),
        )
    else:
        block_d = min(LOOP_BLOCK_D, next_pow2(D))
        _rms_fwd_looped_kernel[(n_rows,)](
            x2, r2, h2, w, y2, rstd, D, x2.stride(0), r2.stride(0), h2.stride(0), y2.stride(0), eps,
            offset, **flags, HAS_RESIDUAL=residual is not None, BLOCK_D=block_d, num_warps=_num_warps(block_d),
        )
    return y, rstd


def _row_chunks(n_row_blocks: int, n_col_blocks: int, device) -> tuple[int, int]:
    """(programs along rows, row blocks per program): about two programs per SM in all."""
    target = max(1, triton.cdiv(2 * num_programs_hint(device), n_col_blocks))
    per_prog = triton.cdiv(n_row_blocks, min(n_row_blocks, target))
    return triton.cdiv(n_row_blocks, per_prog), per_prog


def rms_norm_backward_triton(dy, x, weight, rstd, offset, casting_mode, weight_grad, dx=None, dh=None):
    """Launch the backward kernels; returns dx and (fp32 partial sums summed) dweight or None.
    `dh` (add_norm.py): the gradient reaching x (there: h) from its other uses, added into dx."""
    D = x.shape[-1]
    x2 = _rows_view(x, D)
    dy2 = _rows_view(dy, D)
    dh2 = _rows_view(dh, D) if dh is not None else dy2
    n_rows = x2.shape[0]
    rstd1 = rstd.reshape(-1).contiguous()
    if dx is None:
        dx = _alloc(x.shape, x.dtype, x.device)
    dx2 = dx.view(-1, D)
    flags = _flags(weight, offset, casting_mode, x.dtype)
    # the backward differentiates through the roundings, and rounds where eager's mul backward
    # computes in the product's dtype
    flags["ROUND_GRAD"] = flags.pop("ROUND_PROD")
    compute_dw = weight is not None and weight_grad
    w = weight if weight is not None else x2
    if D <= MAX_FUSED_D:
        block_d = next_pow2(D)
        block_r = min(max(1, TILE_ELEMS // block_d), next_pow2(n_rows))
        n_col_blocks = 1
        c = rstd1  # unused
    else:
        block_d = min(TILE_BLOCK_D, next_pow2(D))
        block_r = min(max(1, TILE_ELEMS // block_d), next_pow2(n_rows))
        n_col_blocks = triton.cdiv(D, block_d)
        c = _alloc(n_rows, torch.float32, x.device)
        stats_block = min(LOOP_BLOCK_D, next_pow2(D))
        _rms_bwd_row_stats_kernel[(n_rows,)](
            dy2, x2, w, rstd1, c, D, dy2.stride(0), x2.stride(0), offset,
            HAS_W=flags["HAS_W"], FP32_MODE=flags["FP32_MODE"], HAS_OFFSET=flags["HAS_OFFSET"],
            ROUND_GRAD=flags["ROUND_GRAD"], BLOCK_D=stats_block, num_warps=_num_warps(stats_block),
        )
    n_chunks, per_prog = _row_chunks(triton.cdiv(n_rows, block_r), n_col_blocks, x.device)
    dw_part = _alloc((n_chunks, D) if compute_dw else (1,), torch.float32, x.device)
    _rms_bwd_kernel[(n_chunks, n_col_blocks)](
        dy2, x2, w, rstd1, c, dx2, dw_part, dh2, n_rows, D, dy2.stride(0), x2.stride(0), dx2.stride(0),
        dh2.stride(0), per_prog, offset, **flags, COMPUTE_DW=compute_dw, LOAD_C=D > MAX_FUSED_D,
        HAS_DH=dh is not None, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=_num_warps(2 * block_r * block_d),
    )
    dweight = dw_part.sum(0).to(weight.dtype) if compute_dw else None
    return dx, dweight


# ----------------------------------------------------------------------------- torch reference


def _effective_weight_torch(weight, offset, casting_mode):
    if casting_mode == "fp32":
        return weight.float() + offset
    if offset == 0.0:
        return weight
    return (weight.float() + offset).to(weight.dtype)


def rms_norm_reference(x, weight, eps, offset, casting_mode, out_dtype):
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    n = xf * rstd[..., None]
    if weight is None:
        y = n.to(out_dtype)
    elif casting_mode == "llama":
        y = (n.to(x.dtype) * _effective_weight_torch(weight, offset, "llama")).to(out_dtype)
    else:
        y = (n * _effective_weight_torch(weight, offset, "fp32")).to(out_dtype)
    return y.contiguous(), rstd.contiguous()


def rms_norm_backward_reference(dy, x, weight, rstd, offset, casting_mode, weight_grad):
    xf = x.float()
    dyf = dy.float()
    r = rstd[..., None]
    n = xf * r
    rnd = _flags(weight, offset, casting_mode, x.dtype)["ROUND_PROD"]
    if rnd:  # eager's mul backward: dy and dy * w in the product's dtype (x's)
        dyf = dy.to(x.dtype).float()
    g = dyf if weight is None else dyf * _effective_weight_torch(weight, offset, casting_mode).float()
    if rnd:
        g = g.to(x.dtype).float()
    dx = (r * (g - n * (g * n).mean(-1, keepdim=True))).to(x.dtype).contiguous()
    if weight is None or not weight_grad:
        return dx, None
    n_cast = n if casting_mode == "fp32" else n.to(x.dtype).float()
    terms = dyf * n_cast
    if rnd:
        terms = terms.to(x.dtype).float()
    dweight = terms.reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
    return dx, dweight


# ----------------------------------------------------------------------------- ops


def _check(x, weight, casting_mode):
    if casting_mode not in CASTING_MODES:
        raise ValueError(f"rms_norm: casting_mode must be one of {CASTING_MODES}, got {casting_mode!r}")
    if weight is not None and (weight.dim() != 1 or weight.shape[0] != x.shape[-1]):
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match width {x.shape[-1]}")


def _rms_norm_torch(x, weight, eps, offset, casting_mode, out_dtype):
    _check(x, weight, casting_mode)
    return rms_norm_reference(x, weight, eps, offset, casting_mode, out_dtype)


def _rms_norm_backward_torch(dy, x, weight, rstd, offset, casting_mode, weight_grad):
    _check(x, weight, casting_mode)
    dx, dw = rms_norm_backward_reference(dy, x, weight, rstd, offset, casting_mode, weight_grad)
    if dw is None:
        dw = x.new_empty((0,), dtype=weight.dtype if weight is not None else x.dtype)
    return dx, dw


def _kernel_ok(x, weight, out_dtype=None):
    return use_triton(x, weight) and x.numel() > 0 and (out_dtype is None or out_dtype in KERNEL_DTYPES)


@torch.library.custom_op("liger::rms_norm", mutates_args=())
def rms_norm_op(
    x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, offset: float, casting_mode: str,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check(x, weight, casting_mode)
    if _kernel_ok(x, weight, out_dtype):
        return rms_norm_forward_triton(x, weight, eps, offset, casting_mode, out_dtype)
    return _rms_norm_torch(x, weight, eps, offset, casting_mode, out_dtype)


@rms_norm_op.register_fake
def _(x, weight, eps, offset, casting_mode, out_dtype):
    _check(x, weight, casting_mode)
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("liger::rms_norm_backward", mutates_args=())
def rms_norm_backward_op(
    dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], rstd: torch.Tensor, offset: float,
    casting_mode: str, weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (dx, dweight); dweight is an empty tensor when weight is None or weight_grad is False."""
    _check(x, weight, casting_mode)
    if _kernel_ok(x, weight) and use_triton(dy):
        dx, dw = rms_norm_backward_triton(dy, x, weight, rstd, offset, casting_mode, weight_grad)
        if dw is None:
            dw = x.new_empty((0,), dtype=weight.dtype if weight is not None else x.dtype)
        return dx, dw
    return _rms_norm_backward_torch(dy, x, weight, rstd, offset, casting_mode, weight_grad)


@rms_norm_backward_op.register_fake
def _(dy, x, weight, rstd, offset, casting_mode, weight_grad):
    dx = x.new_empty(x.shape)
    if weight is not None and weight_grad:
        return dx, weight.new_empty(weight.shape)
    return dx, x.new_empty((0,), dtype=weight.dtype if weight is not None else x.dtype)


def _setup_context(ctx, inputs, output):
    x, weight, eps, offset, casting_mode, out_dtype = inputs
    _, rstd = output
    ctx.save_for_backward(x, weight, rstd)
    ctx.offset = offset
    ctx.casting_mode = casting_mode
    ctx.mark_non_differentiable(rstd)


def _backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_x or need_w):
        return None, None, None, None, None, None
    need_w = need_w and weight is not None
    dx, dw = torch.ops.liger.rms_norm_backward(dy, x, weight, rstd, ctx.offset, ctx.casting_mode, need_w)
    return dx if need_x else None, dw if need_w else None, None, None, None, None


rms_norm_op.register_autograd(_backward, setup_context=_setup_context)
# On CPU, inductor fuses the torch path better than it runs as separate aten calls (runtime.py).
cpu_decomposition(torch.ops.liger.rms_norm)(_rms_norm_torch)
cpu_decomposition(torch.ops.liger.rms_norm_backward)(_rms_norm_backward_torch)


def default_out_dtype(x: torch.Tensor, weight: Optional[torch.Tensor], casting_mode: str) -> torch.dtype:
    """What the eager module would return: Llama promotes with the weight, Gemma casts back to x."""
    if weight is not None and casting_mode == "llama":
        return torch.promote_types(x.dtype, weight.dtype)
    return x.dtype


def rms_norm(x, weight=None, eps=1e-6, offset=0.0, casting_mode="llama", out_dtype=None):
    """RMSNorm over the last dim of x; returns y only (see the module docstring for semantics)."""
    if out_dtype is None:
        out_dtype = default_out_dtype(x, weight, casting_mode)
    return torch.ops.liger.rms_norm(x, weight, float(eps), float(offset), casting_mode, out_dtype)[0]
