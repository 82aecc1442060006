"""W8A16 linear: int8 weights (symmetric, per output channel) times bf16/fp16/fp32 activations.

Format (`pack_int8`): for a weight W [N, K], scale[n] = max_k |W[n, k]| / 127 (stored in the
activation dtype, then used as stored), q = clamp(round(W / scale), -127, 127) as int8 [N, K].
Dequantized weight: W' = q * scale.

`liger::int8_linear(x, qweight, scale, bias)` computes y = x @ W'^T + bias: the kernel loads int8
tiles, converts them in registers (int8 values are exact in bf16/fp16), accumulates x @ q^T in
fp32 and applies the per-channel scale and the bias once in the epilogue; y is rounded once to
x.dtype.  Few rows (M <= 16) split K over programs and reduce the fp32 partials in a second small
kernel; many rows use large tiles.  The autograd formula gives the input (and bias) gradient;
the weight is frozen.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import lowbit_cpu
from .lowbit import (check_per_channel, dot_precision, frozen_linear_backward, grouped_tile,
                     operands, pick_config, register_frozen_autograd, rows_2d, splitk_reduce, store_tile,
                     tile_grid, upcast_dot)
from .runtime import cpu_decomposition, use_triton

QMAX = 127


# ----------------------------------------------------------------------------- packing


def pack_int8(weight: torch.Tensor, scale_dtype: Optional[torch.dtype] = None):
    """Quantize W [N, K] -> (qweight int8 [N, K], scale [N] in scale_dtype, default W's dtype)."""
    scale_dtype = scale_dtype or weight.dtype
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / QMAX).to(scale_dtype)
    s = scale.float()
    q = torch.where(s[:, None] > 0, w / torch.where(s > 0, s, 1.0)[:, None], 0.0)
    q = q.round().clamp(-QMAX, QMAX).to(torch.int8)
    return q, scale


def unpack_int8(qweight: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (qweight.to(dtype) * scale.to(dtype)[:, None])


# ----------------------------------------------------------------------------- kernel


@triton.jit
def _int8_mm_kernel(X, Q, S, B, Y, P, M, N, K, stride_xm, stride_qn, stride_ym, k_per_split,
                    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile(M, N, BM, BN, GROUP_M)
    pid_k = tl.program_id(1)

    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    mmask = rm < M
    nmask = rn < N
    x_rows = X + rm[:, None].to(tl.int64) * stride_xm
    q_cols = Q + rn[None, :].to(tl.int64) * stride_qn
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BK):
        rk = k0 + tl.arange(0, BK)
        kmask = rk < k_hi
        x = tl.load(x_rows + rk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        q = tl.load(q_cols + rk[:, None], mask=kmask[:, None] & nmask[None, :], other=0)  # [BK, BN]
        if UPCAST:
            acc = tl.dot(x.to(tl.float32), q.to(tl.float32), acc, input_precision=PREC)
        else:  # int8 values are exact in bf16/fp16: the tensor cores see x's dtype
            acc = tl.dot(x, q.to(x.dtype), acc, input_precision=PREC)
    store_tile(acc, S, B, Y, P, rm, rn, M, N, stride_ym, pid_k, HAS_SCALE=True, HAS_BIAS=HAS_BIAS,
               SPLIT_K=SPLIT_K)


def int8_matmul_triton(x2: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                       bias: Optional[torch.Tensor], y: Optional[torch.Tensor] = None,
                       split: Optional[int] = None) -> torch.Tensor:
    """y[M, N] = x2[M, K] @ (qweight * scale)^T + bias, through the Triton kernel."""
    M, K = x2.shape
    N = qweight.shape[0]
    if y is None:
        y = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    if M == 0:
        return y
    cfg = pick_config(M, N, K, x2.device, operands(x2.dtype, 1), split=split)
    grid, partial = tile_grid(cfg, M, N, x2.device)
    _int8_mm_kernel[grid](x2, qweight, scale, bias if bias is not None else scale, y,
                          partial if partial is not None else y, M, N, K, x2.stride(0),
                          qweight.stride(0), y.stride(0), cfg.k_per_split,
                          HAS_BIAS=bias is not None, SPLIT_K=cfg.split > 1, PREC=dot_precision(x2.dtype),
                          UPCAST=upcast_dot(x2.device),
                          BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=8,
                          num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if partial is not None:
        splitk_reduce(partial, scale, bias, y)
    return y


def int8_matmul_reference(x2, qweight, scale, bias):
    acc = torch.float64 if x2.dtype == torch.float64 else torch.float32
    y = (x2.to(acc) @ qweight.to(acc).t()) * scale.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x2.dtype)


# ----------------------------------------------------------------------------- CPU path


def _cpu_rows(x2, qweight, scale, bias, eager: bool):
    """y[M, N] on the CPU: the fused dequantize-GEMV loop for decode rows (kernels/lowbit_cpu.py;
    `eager`: the op's own call, which runs the loop compiled once per shape; else a decomposition
    traced by inductor, which inlines it), dequantize + matmul otherwise."""
    K = x2.shape[1]
    if lowbit_cpu.decode_rows(x2) and lowbit_cpu.fast_reason("int8", x2, qweight, K) is None:
        if not eager:
            return lowbit_cpu.int8_rows(x2, qweight, scale, bias)
        args = (x2, qweight, scale) + ((bias,) if bias is not None else ())
        y = lowbit_cpu.call_eager(lambda x, q, s, *b: lowbit_cpu.int8_rows(x, q, s, b[0] if b else None),
                                  args, lowbit_cpu.kernel_key("int8", *args))
        if y is not None:
            return y
    return int8_matmul_reference(x2, qweight, scale, bias)


def _int8_linear_decomposed(x, qweight, scale, bias):
    y = _cpu_rows(x.reshape(-1, x.shape[-1]), qweight, scale, bias, eager=False)
    return y.reshape(*x.shape[:-1], qweight.shape[0])


def _int8_backward(grad, qweight, scale, x_dtype):
    w = unpack_int8(qweight, scale, torch.float64 if grad.dtype == torch.float64 else torch.float32)
    return frozen_linear_backward(grad, w, x_dtype)


# ----------------------------------------------------------------------------- ops


def _check(x, qweight, scale, bias):
    check_per_channel("int8_linear", x, qweight, torch.int8, scale, bias)


@torch.library.custom_op("liger::int8_linear", mutates_args=())
def int8_linear_op(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                   bias: Optional[torch.Tensor]) -> torch.Tensor:
    _check(x, qweight, scale, bias)
    x2 = rows_2d(x)
    if use_triton(x2, scale, bias) and qweight.stride(-1) == 1:
        y = int8_matmul_triton(x2, qweight, scale, bias)
    elif x2.device.type == "cpu":
        y = _cpu_rows(x2, qweight, scale, bias, eager=True)
    else:
        y = int8_matmul_reference(x2, qweight, scale, bias)
    return y.reshape(*x.shape[:-1], qweight.shape[0])


@int8_linear_op.register_fake
def _(x, qweight, scale, bias):
    _check(x, qweight, scale, bias)
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.custom_op("liger::int8_linear_backward", mutates_args=())
def int8_linear_backward_op(grad: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                            x_dtype: torch.dtype) -> torch.Tensor:
    return _int8_backward(grad, qweight, scale, x_dtype)


@int8_linear_backward_op.register_fake
def _(grad, qweight, scale, x_dtype):
    return grad.new_empty((*grad.shape[:-1], qweight.shape[1]), dtype=x_dtype)


register_frozen_autograd(int8_linear_op, torch.ops.liger.int8_linear_backward)
# A model compiled on CPU inlines both (the decode loop and the dequantizing backward product).
cpu_decomposition(torch.ops.liger.int8_linear)(_int8_linear_decomposed)
cpu_decomposition(torch.ops.liger.int8_linear_backward)(_int8_backward)


def int8_linear(x, qweight, scale, bias=None):
    """y = x @ (qweight * scale[:, None])^T + bias (see the module docstring)."""
    return torch.ops.liger.int8_linear(x, qweight, scale, bias)
