"""W4A16 linear: int4 weights, group-wise along K, two values per byte.

Format (`pack_int4`), asymmetric (scale and offset per group, which uses all 16 levels and is
more accurate than symmetric int4 on weights whose groups are not centred): for W [N, K] and
groups of G consecutive input features (G in 32/64/128, K a multiple of G),

    lo, hi    = min, max of the group;  scale = (hi - lo) / 15;  offset = lo
    (scale and offset stored in the activation dtype, then used as stored)
    q         = clamp(round((W - offset) / scale), 0, 15)
    packed    = uint8 [N, K/2]: packed[n, j] = q[n, 2j] | q[n, 2j+1] << 4
    W'        = q * scale + offset      (scale, offset: [N, K/G])

`liger::int4_linear(x, packed, scale, offset, bias)` = x @ W'^T + bias.  The kernel loads packed
bytes, splits the nibbles, dequantizes them with their group's scale and offset in registers
(computed in fp32, rounded to x.dtype for the tensor cores) and accumulates in fp32.  A K block
never straddles two groups (BK divides G).  Decode shapes (M <= 16) split K over programs.
The autograd formula gives the input (and bias) gradient; the weight is frozen.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .lowbit import (dot_precision, frozen_linear_backward, grouped_tile, operands, pick_config,
                     register_frozen_autograd, rows_2d, splitk_reduce, store_tile, tile_grid,
                     upcast_dot)
from .runtime import use_triton

GROUP_SIZES = (32, 64, 128)


# ----------------------------------------------------------------------------- packing


def pack_int4(weight: torch.Tensor, group_size: int = 128, scale_dtype: Optional[torch.dtype] = None):
    """Quantize W [N, K] -> (packed uint8 [N, K/2], scale [N, K/G], offset [N, K/G])."""
    N, K = weight.shape
    if group_size not in GROUP_SIZES or K % group_size:
        raise ValueError(f"int4: K={K} must be a multiple of group_size, one of {GROUP_SIZES} "
                         f"(got {group_size})")
    scale_dtype = scale_dtype or weight.dtype
    w = weight.detach().float().reshape(N, K // group_size, group_size)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo) / 15).to(scale_dtype)
    offset = lo.to(scale_dtype)
    s = scale.float()[..., None]
    q = (w - offset.float()[..., None]) / torch.where(s > 0, s, 1.0)
    q = q.round().clamp(0, 15).to(torch.uint8).reshape(N, K)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return packed.contiguous(), scale, offset


def unpack_int4(packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                dtype=torch.float32) -> torch.Tensor:
    N, half = packed.shape
    q = torch.stack((packed & 15, packed >> 4), dim=-1).reshape(N, 2 * half)
    G = 2 * half // scale.shape[1]
    q = q.to(dtype).reshape(N, -1, G)
    return (q * scale.to(dtype)[..., None] + offset.to(dtype)[..., None]).reshape(N, 2 * half)


# ----------------------------------------------------------------------------- kernel


@triton.jit
def _int4_mm_kernel(X, P, S, Z, B, Y, PART, M, N, K, stride_xm, stride_pn, stride_sn, stride_ym,
                    k_per_split, G: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                    PREC: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    BK: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile(M, N, BM, BN, GROUP_M)
    pid_k = tl.program_id(1)

    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    mmask = rm < M
    nmask = rn < N
    x_rows = X + rm[:, None].to(tl.int64) * stride_xm
    p_rows = P + rn[:, None].to(tl.int64) * stride_pn
    s_rows = S + rn.to(tl.int64) * stride_sn
    z_rows = Z + rn.to(tl.int64) * stride_sn
    HALF: tl.constexpr = BK // 2
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BK):  # K is a multiple of G and BK divides G: blocks are whole
        rk = k0 + tl.arange(0, BK)
        x = tl.load(x_rows + rk[None, :], mask=mmask[:, None], other=0.0)
        p = tl.load(p_rows + (k0 // 2 + tl.arange(0, HALF))[None, :], mask=nmask[:, None], other=0)
        q = tl.interleave(p & 15, p >> 4)  # [BN, BK] in K order: low nibble first
        g = k0 // G
        s = tl.load(s_rows + g, mask=nmask, other=0.0).to(tl.float32)
        z = tl.load(z_rows + g, mask=nmask, other=0.0).to(tl.float32)
        w = q.to(tl.float32) * s[:, None] + z[:, None]
        if UPCAST:
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(x.dtype).to(tl.float32)), acc,
                         input_precision=PREC)
        else:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=PREC)
    # The group scales are already in w: no channel scale in the epilogue.
    store_tile(acc, B, B, Y, PART, rm, rn, M, N, stride_ym, pid_k, HAS_SCALE=False,
               HAS_BIAS=HAS_BIAS, SPLIT_K=SPLIT_K)


def int4_matmul_triton(x2, packed, scale, offset, bias, y=None, split=None):
    """y[M, N] = x2[M, K] @ W'^T + bias, through the Triton kernel."""
    M, K = x2.shape
    N = packed.shape[0]
    G = K // scale.shape[1]
    if y is None:
        y = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    if M == 0:
        return y
    scale, offset = scale.contiguous(), offset.contiguous()  # [N, K/G]: tiny
    bk = min(G, 64)
    cfg = pick_config(M, N, K, x2.device, operands(x2.dtype, 0.5), bk=bk, bk_decode=min(G, 128),
                      split=split)
    grid, part = tile_grid(cfg, M, N, x2.device)
    _int4_mm_kernel[grid](x2, packed, scale, offset, bias if bias is not None else scale, y,
                          part if part is not None else y, M, N, K, x2.stride(0), packed.stride(0),
                          scale.stride(0), y.stride(0), cfg.k_per_split, G=G,
                          HAS_BIAS=bias is not None, SPLIT_K=cfg.split > 1, PREC=dot_precision(x2.dtype),
                          UPCAST=upcast_dot(x2.device), BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=8,
                          num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if part is not None:
        splitk_reduce(part, None, bias, y)
    return y


def int4_matmul_reference(x2, packed, scale, offset, bias):
    acc = torch.float64 if x2.dtype == torch.float64 else torch.float32
    # The kernel rounds the dequantized weight to x.dtype before the product; so does this.
    w = unpack_int4(packed, scale, offset, torch.float32).to(x2.dtype).to(acc)
    y = x2.to(acc) @ w.t()
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x2.dtype)


# ----------------------------------------------------------------------------- ops


def _check(x, packed, scale, offset, bias):
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"int4_linear: packed weight must be a 2-D uint8 tensor, got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    N, K = packed.shape[0], 2 * packed.shape[1]
    if x.shape[-1] != K:
        raise ValueError(f"int4_linear: x has {x.shape[-1]} features, weight expects {K}")
    if scale.dim() != 2 or scale.shape != offset.shape or scale.shape[0] != N or K % scale.shape[1]:
        raise ValueError("int4_linear: scale and offset must be [out_features, in_features / group]")
    if K // scale.shape[1] not in GROUP_SIZES:
        raise ValueError(f"int4_linear: group size {K // scale.shape[1]} not one of {GROUP_SIZES}")
    if bias is not None and bias.shape != (N,):
        raise ValueError("int4_linear: bias must be an [out_features] vector")


@torch.library.custom_op("liger::int4_linear", mutates_args=())
def int4_linear_op(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                   bias: Optional[torch.Tensor]) -> torch.Tensor:
    _check(x, packed, scale, offset, bias)
    x2 = rows_2d(x)
    if use_triton(x2, scale, offset, bias) and packed.stride(-1) == 1:
        y = int4_matmul_triton(x2, packed, scale, offset, bias)
    else:
        y = int4_matmul_reference(x2, packed, scale, offset, bias)
    return y.reshape(*x.shape[:-1], packed.shape[0])


@int4_linear_op.register_fake
def _(x, packed, scale, offset, bias):
    _check(x, packed, scale, offset, bias)
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


@torch.library.custom_op("liger::int4_linear_backward", mutates_args=())
def int4_linear_backward_op(grad: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                            offset: torch.Tensor, x_dtype: torch.dtype) -> torch.Tensor:
    w = unpack_int4(packed, scale, offset, torch.float64 if grad.dtype == torch.float64 else torch.float32)
    return frozen_linear_backward(grad, w, x_dtype)


@int4_linear_backward_op.register_fake
def _(grad, packed, scale, offset, x_dtype):
    return grad.new_empty((*grad.shape[:-1], 2 * packed.shape[1]), dtype=x_dtype)


register_frozen_autograd(int4_linear_op, torch.ops.liger.int4_linear_backward)


def int4_linear(x, packed, scale, offset, bias=None):
    """y = x @ W'^T + bias with W' the dequantized int4 weight (see the module docstring)."""
    return torch.ops.liger.int4_linear(x, packed, scale, offset, bias)
