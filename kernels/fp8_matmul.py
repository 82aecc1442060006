"""W8A8 fp8 linear: e4m3 weights (per output channel) times e4m3 activations (per token, dynamic).

Formats (e4m3 = torch.float8_e4m3fn, largest finite value 448, round to nearest even):

    weights (`pack_fp8`, once):   ws[n] = max_k |W[n, k]| / 448 (fp32);  wq = e4m3(W / ws)   [N, K]
    activations (every call):     xs[m] = max(max_k |x[m, k]|, 1e-12) / 448 (fp32)
                                  xq = e4m3(clamp(x * (448 / xs'), -448, 448))  with xs' the amax
    y = (xq @ wq^T) * xs[:, None] * ws[None, :] + bias        (fp32 accumulation, one cast to x.dtype)

`liger::fp8_linear(x, qweight, scale, bias)` runs two kernels: `_quant_rows_kernel` (one program
per token: row amax, then the scaled e4m3 cast; x is read twice, the second time mostly from L2)
and `_fp8_mm_kernel`, an fp8 x fp8 tensor-core matmul with fp32 accumulation that applies both
scales and the bias in the epilogue (decode shapes split K and reduce with lowbit's reduce kernel;
the token scale is applied to each fp32 partial).  fp8 tensor cores need compute capability 8.9+
(Ada, Hopper, Blackwell): on older GPUs the op raises.  On CPU the plain torch path emulates the
same arithmetic with torch.float8_e4m3fn casts (bit-identical quantized operands, the sum order
differs), and under Triton's interpreter the kernels run on CPU tensors.

Triton 3.9's interpreter rounds fp32 -> e4m3 casts wrongly (ties away from zero, and a mantissa
carry is not propagated to the exponent, e.g. 7.81 -> 4), so under the interpreter the kernel
rounds to e4m3 itself in fp32 (`_round_e4m3`, bit-exact with torch) before the then exact cast;
on a GPU the hardware cast (cvt.rn.satfinite) does it.  The interpreter's fp8 loads and fp8 dots
are exact.

The autograd formula gives the input (and bias) gradient through the dequantized weight
(straight-through for the activation quantization); the weight is frozen.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .lowbit import (Operands, check_per_channel, frozen_linear_backward, grouped_tile, pick_config,
                     register_frozen_autograd, rows_2d, splitk_reduce, store_tile, tile_grid,
                     upcast_dot)
from .runtime import interpreting, next_pow2, use_triton

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
MIN_AMAX = 1e-12  # an all-zero row gets this amax: finite scales, zero codes
MIN_CAPABILITY = (8, 9)


def check_device(device: torch.device) -> None:
    """Raise on CUDA devices without fp8 tensor cores (compute capability < 8.9)."""
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < MIN_CAPABILITY:
            raise RuntimeError(
                f"fp8 linear (quantize='fp8') needs a GPU with fp8 tensor cores (compute capability "
                f"8.9+: Ada, Hopper, Blackwell); {torch.cuda.get_device_name(device)} has "
                f"{cap[0]}.{cap[1]}. Use quantize='int8' instead.")


# ----------------------------------------------------------------------------- packing


def pack_fp8(weight: torch.Tensor, scale_dtype: Optional[torch.dtype] = None):
    """Quantize W [N, K] -> (qweight float8_e4m3fn [N, K], scale fp32 [N]).  `scale_dtype` is
    accepted for symmetry with the other schemes and ignored: fp8 scales stay fp32."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / FP8_MAX
    q = torch.where(scale[:, None] > 0, w / torch.where(scale > 0, scale, 1.0)[:, None], 0.0)
    return q.clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def unpack_fp8(qweight: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return qweight.to(dtype) * scale.to(dtype)[:, None]


def quantize_rows_reference(x2: torch.Tensor):
    """Per-token e4m3 quantization in torch: (xq [M, K] e4m3, xs [M] fp32), same bits as the kernel."""
    acc = torch.float64 if x2.dtype == torch.float64 else torch.float32
    xf = x2.to(acc)
    amax = xf.abs().amax(dim=1).clamp_min(MIN_AMAX)
    # A true division (python float / tensor is reciprocal-then-multiply in torch, 1 ulp off).
    inv = torch.full_like(amax, FP8_MAX) / amax
    xq = (xf * inv[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return xq, (amax / FP8_MAX).to(acc)


def fp8_matmul_reference(x2, qweight, scale, bias):
    acc = torch.float64 if x2.dtype == torch.float64 else torch.float32
    xq, xs = quantize_rows_reference(x2)
    y = (xq.to(acc) @ qweight.to(acc).t()) * xs[:, None] * scale.to(acc)[None, :]
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x2.dtype)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _round_e4m3(v):
    """v (fp32, |v| <= 448) rounded to the nearest e4m3 value, ties to even, as fp32."""
    bits = v.to(tl.int32, bitcast=True)
    # Normal range (|v| >= 2^-6): keep 3 mantissa bits; the carry may bump the exponent.
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
    # Subnormal range: multiples of 2^-9; adding 1.5 * 2^14 puts the unit in the last place at
    # 2^-9 so the fp32 add itself rounds to nearest even.  The sign is copied back (-0 stays -0).
    sub = ((tl.abs(v) + 24576.0) - 24576.0).to(tl.int32, bitcast=True) | (bits & -2147483648)
    return tl.where(tl.abs(v) < 0.015625, sub.to(tl.float32, bitcast=True), normal)


@triton.jit
def _quant_rows_kernel(X, XQ, XS, K, stride_xm, stride_qm, BLOCK_K: tl.constexpr,
                       EMULATE_CAST: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_xm
    q_row = XQ + row * stride_qm
    cols = tl.arange(0, BLOCK_K)
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_row + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    a = tl.maximum(tl.max(amax, axis=0), 1e-12)
    # IEEE divisions (Triton's plain fp32 "/" is approximate on GPUs): the same bits as torch.
    inv = tl.div_rn(448.0, a)
    tl.store(XS + row, tl.div_rn(a, 448.0))
    for k0 in range(0, K, BLOCK_K):
        mask = k0 + cols < K
        v = tl.load(x_row + k0 + cols, mask=mask, other=0.0).to(tl.float32) * inv
        v = tl.minimum(tl.maximum(v, -448.0), 448.0)
        if EMULATE_CAST:
            v = _round_e4m3(v)
        tl.store(q_row + k0 + cols, v.to(tl.float8e4nv), mask=mask)


@triton.jit
def _fp8_mm_kernel(XQ, XS, WQ, WS, B, Y, P, M, N, K, stride_xm, stride_wn, stride_ym, k_per_split,
                   HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, UPCAST: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile(M, N, BM, BN, GROUP_M)
    pid_k = tl.program_id(1)

    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    mmask = rm < M
    nmask = rn < N
    x_rows = XQ + rm[:, None].to(tl.int64) * stride_xm
    # [BK, BN] tiles of the [N, K] weight: K is the contiguous dim (the K-major B operand fp8
    # tensor cores want).
    w_cols = WQ + rn[None, :].to(tl.int64) * stride_wn
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BK):
        rk = k0 + tl.arange(0, BK)
        kmask = rk < k_hi
        x = tl.load(x_rows + rk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_cols + rk[:, None], mask=kmask[:, None] & nmask[None, :], other=0.0)
        if UPCAST:  # interpreter: fp8 values are exact in fp32
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
    # The token scale goes on every tile (split-K partials included); the channel scale and the
    # bias in the epilogue (or the reduce kernel).
    acc = acc * tl.load(XS + rm, mask=mmask, other=0.0)[:, None]
    store_tile(acc, WS, B, Y, P, rm, rn, M, N, stride_ym, pid_k, HAS_SCALE=True, HAS_BIAS=HAS_BIAS,
               SPLIT_K=SPLIT_K)


def quantize_rows_triton(x2: torch.Tensor, xq: Optional[torch.Tensor] = None,
                         xs: Optional[torch.Tensor] = None):
    """(xq [M, K] e4m3, xs [M] fp32) through `_quant_rows_kernel`."""
    M, K = x2.shape
    if xq is None:
        xq = torch.empty((M, K), dtype=FP8, device=x2.device)
    if xs is None:
        xs = torch.empty((M,), dtype=torch.float32, device=x2.device)
    if M == 0:
        return xq, xs
    BLOCK_K = min(next_pow2(K), 4096)
    _quant_rows_kernel[(M,)](x2, xq, xs, K, x2.stride(0), xq.stride(0), BLOCK_K=BLOCK_K,
                             EMULATE_CAST=interpreting() and x2.device.type == "cpu",
                             num_warps=max(1, min(8, BLOCK_K // 256)))
    return xq, xs


def fp8_matmul_triton(xq: torch.Tensor, xs: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                      bias: Optional[torch.Tensor], out_dtype: torch.dtype,
                      y: Optional[torch.Tensor] = None, split: Optional[int] = None) -> torch.Tensor:
    """y[M, N] = (xq @ qweight^T) * xs * scale + bias, through the Triton kernel."""
    M, K = xq.shape
    N = qweight.shape[0]
    if y is None:
        y = torch.empty((M, N), dtype=out_dtype, device=xq.device)
    if M == 0:
        return y
    # fp8 tiles: twice the K of a bf16 tile for the same bytes; at least 32 (the fp8 MMA's K).
    # fp8 x fp8 straight into the tensor cores (no fp32 FMA path, no conversion); K blocks of at
    # least 32, the fp8 MMA's K.
    cfg = pick_config(M, N, K, xq.device, Operands(1, 1, convert_w=False), bk=128, bk_decode=256,
                      split=split, min_bk=32)
    grid, partial = tile_grid(cfg, M, N, xq.device)
    _fp8_mm_kernel[grid](xq, xs, qweight, scale, bias if bias is not None else scale, y,
                         partial if partial is not None else y, M, N, K, xq.stride(0),
                         qweight.stride(0), y.stride(0), cfg.k_per_split,
                         HAS_BIAS=bias is not None, SPLIT_K=cfg.split > 1, UPCAST=upcast_dot(xq.device),
                         BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=8,
                         num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if partial is not None:
        splitk_reduce(partial, scale, bias, y)
    return y


# ----------------------------------------------------------------------------- ops


def _check(x, qweight, scale, bias):
    check_per_channel("fp8_linear", x, qweight, FP8, scale, bias)


@torch.library.custom_op("liger::fp8_linear", mutates_args=())
def fp8_linear_op(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                  bias: Optional[torch.Tensor]) -> torch.Tensor:
    _check(x, qweight, scale, bias)
    check_device(x.device)
    x2 = rows_2d(x)
    if use_triton(x2, bias) and scale.dtype == torch.float32 and qweight.stride(-1) == 1:
        xq, xs = quantize_rows_triton(x2)
        y = fp8_matmul_triton(xq, xs, qweight, scale, bias, x2.dtype)
    else:
        y = fp8_matmul_reference(x2, qweight, scale, bias)
    return y.reshape(*x.shape[:-1], qweight.shape[0])


@fp8_linear_op.register_fake
def _(x, qweight, scale, bias):
    _check(x, qweight, scale, bias)
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.custom_op("liger::fp8_linear_backward", mutates_args=())
def fp8_linear_backward_op(grad: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                           x_dtype: torch.dtype) -> torch.Tensor:
    w = unpack_fp8(qweight, scale, torch.float64 if grad.dtype == torch.float64 else torch.float32)
    return frozen_linear_backward(grad, w, x_dtype)


@fp8_linear_backward_op.register_fake
def _(grad, qweight, scale, x_dtype):
    return grad.new_empty((*grad.shape[:-1], qweight.shape[1]), dtype=x_dtype)


register_frozen_autograd(fp8_linear_op, torch.ops.liger.fp8_linear_backward)


def fp8_linear(x, qweight, scale, bias=None):
    """y = fp8(x per token) @ (qweight * scale[:, None])^T + bias (see the module docstring)."""
    return torch.ops.liger.fp8_linear(x, qweight, scale, bias)
