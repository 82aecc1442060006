"""Shared pieces of the low-bit linear kernels (int8, int4, fp8 weight matmuls).

- `pick_config`: block sizes and split-K for a [M, K] x [N, K]^T product, per chip and dtype.
  Few rows (decode, M <= 16) are memory-bound on the weight: 16-row tiles, narrow N tiles and K
  split over several programs so every SM streams weight bytes.  Many rows (prefill, training)
  use large square-ish tiles without split-K, grouped along M so neighbouring programs share
  weight tiles in L2.  fp32 activations (FMA dots) get small K blocks; the pipeline depth fits
  the device's shared memory (`shared_memory_budget`).  tests/gpu_compile compiles every choice
  for sm_80/sm_89/sm_90 and checks shared memory, registers and spills.
- `_splitk_reduce_kernel`: sums the fp32 split-K partials and applies the per-channel scale,
  bias and the cast to the output dtype.
- `grouped_tile`, `store_tile`, `tile_grid`: the tile schedule and epilogue every low-bit
  matmul kernel shares (grouped program ids; scale, bias and store, or the fp32 split-K partial).
- `rows_2d`: flatten any leading shape to rows.
- `check_per_channel`: argument checks of the per-output-channel schemes (int8, fp8).
- `frozen_linear_backward`, `register_frozen_autograd`: the input gradient through a frozen
  low-bit weight, and the autograd registration every low-bit linear op uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .rounding import cast_rne
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


@dataclass(frozen=True)
class Operands:
    """What a kernel feeds tl.dot, for sizing tiles: bytes per element of the activation tile as
    loaded and as multiplied, bytes per weight element as loaded (0.5 for packed int4), and
    whether the weight tile is converted to the activation dtype in registers (which stages it
    through shared memory once more)."""
    x_bytes: int
    w_bytes: float
    convert_w: bool = True
    fma: bool = False  # fp32 "ieee" dots run on FMA units, not tensor cores


def operands(x_dtype: torch.dtype, w_bytes: float, convert_w: bool = True) -> Operands:
    size = torch.empty((), dtype=x_dtype).element_size()
    return Operands(size, w_bytes, convert_w, fma=x_dtype == torch.float32)


def shared_memory_budget(device: torch.device) -> int:
    """Bytes of shared memory one block may use: the device's opt-in limit (227 KB on sm_90,
    163 KB on sm_80, 99 KB on sm_86/sm_89), less 1 KB Triton keeps for itself."""
    if device.type != "cuda":
        return 99 << 10  # the interpreter has no limit; size CPU tiles like the smallest GPU's
    props = torch.cuda.get_device_properties(device)
    limit = getattr(props, "shared_memory_per_block_optin", 0) or (48 << 10)
    return limit - (1 << 10)


def shared_memory_estimate(BM: int, BN: int, BK: int, stages: int, ops: Operands) -> int:
    """Triton's software pipeline keeps stages-1 copies of the x and weight tiles in shared memory,
    plus the converted weight tile (measured by the offline compile: exact for these kernels)."""
    tiles = BM * BK * ops.x_bytes + int(BK * BN * ops.w_bytes)
    return (stages - 1) * tiles + (BK * BN * ops.x_bytes if ops.convert_w else 0)


def pick_config(M: int, N: int, K: int, device: torch.device, ops: Operands, bk: int = 64,
                bk_decode: int = 128, split: Optional[int] = None, min_bk: int = 16) -> Config:
    """Blocks for this product.  `bk`/`bk_decode` may be fixed by the caller (int4 ties BK to the
    quantisation group); `split` forces a split-K factor (tests reach the split path with it).

    fp32 activations multiply on FMA units, whose dot keeps each thread's slice of both operand
    tiles in registers for the whole K block: BK stays at 16 there (wider blocks spill, measured
    by the offline compile).  The pipeline depth is then cut until the tiles fit the device's
    shared memory."""
    if M <= DECODE_MAX_M:
        BM, BN, BK = 16, 64, bk_decode
        # fp32 at M = 1 with 4 warps spills a 16 B stack frame under triton 3.6: 8 warps halve
        # each thread's share of the operand tiles.
        warps, stages = (8 if ops.fma else 4), 4
    else:
        BM = 64 if M <= 64 or ops.fma else 128
        BN = 128 if N >= 128 and not ops.fma else 64
        BK = bk
        warps, stages = (8 if BM * BN >= 128 * 128 or ops.fma else 4), 3
    if ops.fma:
        BK = min(BK, 16)
    BK = max(min_bk, min(BK, next_pow2(K)))
    budget = shared_memory_budget(device)
    while stages > 2 and shared_memory_estimate(BM, BN, BK, stages, ops) > budget:
        stages -= 1
    k_blocks = triton.cdiv(K, BK)
    if M <= DECODE_MAX_M and split is None:
        # Enough programs to keep every SM streaming weights (about 4 waves).
        split = max(1, min(k_blocks, triton.cdiv(4 * num_programs_hint(device), triton.cdiv(N, BN))))
    split = max(1, min(split or 1, k_blocks))
    k_per_split = triton.cdiv(k_blocks, split) * BK
    split = triton.cdiv(K, k_per_split)
    return Config(BM, BN, BK, split, k_per_split, warps, stages)


@triton.jit
def _splitk_reduce_kernel(P, S, B, Y, M, N, stride_ym, n_split, HAS_SCALE: tl.constexpr,
                          HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # n_split is a runtime value: every split factor shares one binary.
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    offs = rm[:, None].to(tl.int64) * N + rn[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for s in range(n_split):
        acc += tl.load(P + s * M * N + offs, mask=mask, other=0.0)
    if HAS_SCALE:
        acc = acc * tl.load(S + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(B + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rm[:, None].to(tl.int64) * stride_ym + rn[None, :], cast_rne(acc, Y.dtype.element_ty),
             mask=mask)


@triton.jit
def grouped_tile(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program.  Ids are grouped along M so programs running together
    reuse the same weight tiles (from L2)."""
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BM)
    n_n = tl.cdiv(N, BN)
    width = GROUP_M * n_n
    first_m = (pid // width) * GROUP_M
    group_m = tl.minimum(n_m - first_m, GROUP_M)
    return first_m + (pid % width) % group_m, (pid % width) // group_m


@triton.jit
def store_tile(acc, S, B, Y, P, rm, rn, M, N, stride_ym, pid_k, HAS_SCALE: tl.constexpr,
               HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """Epilogue of a [BM, BN] fp32 tile: without split-K, y = cast(acc (* S[n]) (+ B[n])); with
    it, the raw fp32 partial goes to P[pid_k] (`splitk_reduce` applies scale and bias)."""
    mmask = rm < M
    nmask = rn < N
    omask = mmask[:, None] & nmask[None, :]
    if not SPLIT_K:
        if HAS_SCALE:
            acc = acc * tl.load(S + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            acc = acc + tl.load(B + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        # cast_rne: round to nearest even into bf16 (Triton's interpreter truncates on `.to`)
        tl.store(Y + rm[:, None].to(tl.int64) * stride_ym + rn[None, :],
                 cast_rne(acc, Y.dtype.element_ty), mask=omask)
    else:
        tl.store(P + pid_k * M * N + rm[:, None].to(tl.int64) * N + rn[None, :], acc, mask=omask)


def tile_grid(cfg: Config, M: int, N: int, device: torch.device):
    """(grid, partial) for a kernel using `grouped_tile`: partial is the fp32 [split, M, N]
    split-K buffer, or None without split-K."""
    partial = None
    if cfg.split > 1:
        partial = torch.empty((cfg.split, M, N), dtype=torch.float32, device=device)
    return (triton.cdiv(M, cfg.BM) * triton.cdiv(N, cfg.BN), cfg.split), partial


def splitk_reduce(partial: torch.Tensor, scale: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                  y: torch.Tensor) -> None:
    """y[M, N] = cast(sum_s partial[s] (* scale[n]) (+ bias[n]))."""
    split, M, N = partial.shape
    BLOCK_M, BLOCK_N = min(16, next_pow2(M)), min(256, next_pow2(N))
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    _splitk_reduce_kernel[grid](partial, scale if scale is not None else partial,
                                bias if bias is not None else partial, y, M, N, y.stride(0), split,
                                HAS_SCALE=scale is not None, HAS_BIAS=bias is not None,
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


def check_per_channel(name: str, x, qweight, qdtype: torch.dtype, scale, bias) -> None:
    """Shapes and dtype of a per-output-channel scheme: qweight [N, K] of qdtype, scale/bias [N]."""
    if qweight.dtype != qdtype or qweight.dim() != 2:
        raise ValueError(f"{name}: qweight must be a 2-D {str(qdtype).removeprefix('torch.')} tensor, "
                         f"got {qweight.dtype} {tuple(qweight.shape)}")
    if x.shape[-1] != qweight.shape[1]:
        raise ValueError(f"{name}: x has {x.shape[-1]} features, weight expects {qweight.shape[1]}")
    if scale.shape != (qweight.shape[0],) or (bias is not None and bias.shape != (qweight.shape[0],)):
        raise ValueError(f"{name}: scale and bias must be [out_features] vectors")


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


def register_frozen_autograd(op, backward_op) -> None:
    """Autograd of a low-bit linear op `op(x, *weight_tensors, bias)` with a frozen weight:
    dx = `backward_op(grad, *weight_tensors, x.dtype)` (a custom op, so AOTAutograd can trace
    the backward graph), dbias = grad summed over rows, no gradient for the weight tensors."""

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[1:-1])
        ctx.x_dtype = inputs[0].dtype

    def backward(ctx, grad):
        saved = ctx.saved_tensors
        dx = dbias = None
        if ctx.needs_input_grad[0]:
            dx = backward_op(grad, *saved, ctx.x_dtype)
        if ctx.needs_input_grad[-1]:
            dbias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return (dx, *(None,) * len(saved), dbias)

    op.register_autograd(backward, setup_context=setup_context)
