"""Shared pieces of the low-bit linear kernels (int8, int4, fp8 weight matmuls).

- `pick_config`: block sizes and split-K for a [M, K] x [N, K]^T product.  Few rows (decode,
  M <= 16) are memory-bound on the weight: 16-row tiles, narrow N tiles and K split over several
  programs so every SM streams weight bytes.  Many rows (prefill, training) use large square-ish
  tiles without split-K, grouped along M so neighbouring programs share weight tiles in L2.
- `_splitk_reduce_kernel`: sums the fp32 split-K partials and applies the per-channel scale,
  bias and the cast to the output dtype.
- `rows_2d`: flatten any leading shape to rows.
- `frozen_linear_backward`: the input gradient through a frozen low-bit weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .runtime import next_pow2, num_programs_hint

DECODE_MAX_M = 16  # up to this many rows the GEMV / split-K configuration is used


@dataclass(frozen=True)
class Config:
    BM: int
    BN: int
    BK: int
    split: int  # programs along K (1: no split)
    k_per_split: int  # K columns each split covers (a multiple of BK)
    num_warps: int
    num_stages: int


def pick_config(M: int, N: int, K: int, device: torch.device, bk: int = 64,
                bk_decode: int = 128, split: Optional[int] = None) -> Config:
    """Blocks for this product.  `bk`/`bk_decode` may be fixed by the caller (int4 ties BK to the
    quantisation group); `split` forces a split-K factor (tests reach the split path with it)."""
    if M <= DECODE_MAX_M:
        BM, BN, BK = 16, 64, bk_decode
        BK = min(BK, max(16, next_pow2(K)))
        n_tiles = triton.cdiv(N, BN)
        k_blocks = triton.cdiv(K, BK)
        if split is None:
            # Enough programs to keep every SM streaming weights (about 4 waves).
            split = max(1, min(k_blocks, triton.cdiv(4 * num_programs_hint(device), n_tiles)))
        warps, stages = 4, 4
    else:
        BM = 64 if M <= 64 else 128
        BN = 128 if N >= 128 else 64
        BK = min(bk, max(16, next_pow2(K)))
        k_blocks = triton.cdiv(K, BK)
        split = split or 1
        warps, stages = (8 if BM * BN >= 128 * 128 else 4), 3
    split = max(1, min(split, k_blocks))
    k_per_split = triton.cdiv(k_blocks, split) * BK
    split = triton.cdiv(K, k_per_split)
    return Config(BM, BN, BK, split, k_per_split, warps, stages)


@triton.jit
def _splitk_reduce_kernel(P, S, B, Y, M, N, stride_ym, SPLIT: tl.constexpr, HAS_SCALE: tl.constexpr,
                          HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    offs = rm[:, None].to(tl.int64) * N + rn[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for s in range(SPLIT):
        acc += tl.load(P + s * M * N + offs, mask=mask, other=0.0)
    if HAS_SCALE:
        acc = acc * tl.load(S + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(B + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rm[:, None].to(tl.int64) * stride_ym + rn[None, :], acc.to(Y.dtype.element_ty), mask=mask)


def splitk_reduce(partial: torch.Tensor, scale: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                  y: torch.Tensor) -> None:
    """y[M, N] = cast(sum_s partial[s] (* scale[n]) (+ bias[n]))."""
    split, M, N = partial.shape
    BLOCK_M, BLOCK_N = min(16, next_pow2(M)), min(256, next_pow2(N))
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    _splitk_reduce_kernel[grid](partial, scale if scale is not None else partial,
                                bias if bias is not None else partial, y, M, N, y.stride(0),
                                SPLIT=split, HAS_SCALE=scale is not None, HAS_BIAS=bias is not None,
                                BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 activations get full fp32 products (tf32 would cost ~1e-3 relative error).
    return "ieee" if dtype == torch.float32 else "tf32"


def upcast_dot(device: torch.device) -> bool:
    """Whether kernels must feed tl.dot fp32 operands: Triton's interpreter (3.9) mis-computes
    bf16/fp16 dots.  Products of bf16/fp16 values are exact in fp32, so results are unchanged."""
    return device.type == "cpu"


def rows_2d(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def frozen_linear_backward(grad: torch.Tensor, weight: torch.Tensor, x_dtype: torch.dtype) -> torch.Tensor:
    """dx = grad @ W for a dequantized [N, K] weight, accumulated in fp32, returned in x_dtype.

    The weight is dequantized transiently (freed after the call); the product runs on the
    platform's matmul (cuBLAS on CUDA)."""
    g2 = grad.reshape(-1, grad.shape[-1])
    if grad.dtype in (torch.bfloat16, torch.float16) and grad.device.type == "cuda":
        dx = g2 @ weight.to(grad.dtype)  # cuBLAS accumulates in fp32
    else:
        dx = g2.float() @ weight.float() if grad.dtype != torch.float64 else g2 @ weight.double()
    return dx.to(x_dtype).reshape(*grad.shape[:-1], weight.shape[1])
