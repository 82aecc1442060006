"""W4A16 linear: int4 weights, group-wise along K, two values per byte.

Format (`pack_int4`), asymmetric (scale and offset per group, which uses all 16 levels and is
more accurate than symmetric int4 on weights whose groups are not centred): for W [N, K] and
groups of G consecutive input features (G in 32/64/128; K even, the last group holds the
K - G * (n - 1) features left when G does not divide K: n = ceil(K / G) groups),

    lo, hi    = min, max of the group;  scale = (hi - lo) / 15;  offset = lo
    (scale and offset stored in the activation dtype, then used as stored)
    q         = clamp(round((W - offset) / scale), 0, 15)
    packed    = uint8 [N, K/2]: packed[n, j] = q[n, 2j] | q[n, 2j+1] << 4
    W'        = q * scale + offset      (scale, offset: [N, ceil(K/G)])

`liger::int4_linear(x, packed, scale, offset, bias)` = x @ W'^T + bias.  The kernel loads packed
bytes, splits the nibbles, dequantizes them with their group's scale and offset in registers
(computed in fp32, rounded to x.dtype for the tensor cores) and accumulates in fp32.  A K block
never straddles two groups (BK divides G); the blocks past K are masked.  Decode shapes (M <= 16) split K over programs.
The autograd formula gives the input (and bias) gradient; the weight is frozen.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import lowbit_cpu
from .lowbit import (dot_precision, frozen_linear_backward, grouped_tile, operands, pick_config,
                     register_frozen_autograd, rows_2d, splitk_reduce, store_tile, tile_grid,
                     upcast_dot)
from .runtime import cpu_decomposition, use_triton

GROUP_SIZES = (32, 64, 128)


# ----------------------------------------------------------------------------- packing


def n_groups(K: int, group_size: int) -> int:
    return -(-K // group_size)


def group_size_of(K: int, groups: int) -> int:
    """The group size of a packed [N, K/2] weight with `groups` scales per row.  Unique: two sizes
    of GROUP_SIZES (each twice the last) give the same count only when one group covers the row."""
    for g in GROUP_SIZES:
        if n_groups(K, g) == groups:
            return g
    raise ValueError(f"int4: {groups} groups per row fit no group size {GROUP_SIZES} for K={K}")


def int4_unsupported(K: int, group_size: int) -> Optional[str]:
    if group_size not in GROUP_SIZES:
        return f"int4: group_size must be one of {GROUP_SIZES} (got {group_size})"
    if K % 2:
        return f"int4: in_features={K} is odd (two int4 values share a byte)"
    return None


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """w [N, K] as [N, n, G]: a partial last group is filled with copies of its own last value,
    which changes neither its min nor its max."""
    N, K = w.shape
    pad = n_groups(K, group_size) * group_size - K
    if pad:
        w = torch.cat([w, w[:, -1:].expand(N, pad)], dim=1)
    return w.reshape(N, -1, group_size)


def grid_int4(weight: torch.Tensor, group_size: int = 128, scale_dtype: Optional[torch.dtype] = None):
    """The quantisation grid of W [N, K]: (scale, offset) [N, ceil(K/G)] in `scale_dtype`,
    from each group's min and max."""
    problem = int4_unsupported(weight.shape[1], group_size)
    if problem:
        raise ValueError(problem)
    w = _grouped(weight.detach().float(), group_size)
    lo, hi = w.amin(-1), w.amax(-1)
    return ((hi - lo) / 15).to(scale_dtype or weight.dtype), lo.to(scale_dtype or weight.dtype)


def quantize_int4(weight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """The int4 levels (uint8 in 0..15, [N, K]) of W on the grid (scale, offset) as stored."""
    N, K = weight.shape
    G = group_size_of(K, scale.shape[1])
    s = torch.repeat_interleave(scale.float(), G, dim=1)[:, :K]
    z = torch.repeat_interleave(offset.float(), G, dim=1)[:, :K]
    q = (weight.detach().float() - z) / torch.where(s > 0, s, 1.0)
    return q.round().clamp(0, 15).to(torch.uint8)


def pack_levels(q: torch.Tensor) -> torch.Tensor:
    """uint8 levels [N, K] -> packed bytes [N, K/2], low nibble first."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def pack_int4(weight: torch.Tensor, group_size: int = 128, scale_dtype: Optional[torch.dtype] = None):
    """Quantize W [N, K] by rounding to nearest -> (packed uint8 [N, K/2], scale, offset
    [N, ceil(K/G)])."""
    scale, offset = grid_int4(weight, group_size, scale_dtype)
    return pack_levels(quantize_int4(weight, scale, offset)), scale, offset


def unpack_int4(packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                dtype=torch.float32) -> torch.Tensor:
    K = 2 * packed.shape[1]
    return lowbit_cpu.dequant_int4(packed, scale, offset, group_size_of(K, scale.shape[1]), dtype)


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
    for k0 in range(k_lo, k_hi, BK):  # BK divides G: a block lies in one group
        rk = k0 + tl.arange(0, BK)
        kmask = rk < K  # the last group may be partial
        x = tl.load(x_rows + rk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        rp = k0 // 2 + tl.arange(0, HALF)
        p = tl.load(p_rows + rp[None, :], mask=nmask[:, None] & (rp < K // 2)[None, :], other=0)
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
    G = group_size_of(K, scale.shape[1])
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


# ----------------------------------------------------------------------------- CPU path


def _cpu_rows(x2, packed, scale, offset, bias, eager: bool):
    """y[M, N] on the CPU: the fused dequantize-GEMV loop for decode rows (kernels/lowbit_cpu.py;
    `eager`: the op's own call, which runs the loop compiled once per shape; else a decomposition
    traced by inductor, which inlines it), the reference (dequantize + matmul) otherwise."""
    K = x2.shape[1]
    G = group_size_of(K, scale.shape[1])
    if lowbit_cpu.decode_rows(x2) and lowbit_cpu.fast_reason("int4", x2, packed, K, G) is None:
        if not eager:
            return lowbit_cpu.int4_rows(x2, packed, scale, offset, bias, G)
        args = (x2, packed, scale, offset) + ((bias,) if bias is not None else ())
        y = lowbit_cpu.call_eager(
            lambda x, p, s, z, *b: lowbit_cpu.int4_rows(x, p, s, z, b[0] if b else None, G),
            args, lowbit_cpu.kernel_key("int4", G, *args))
        if y is not None:
            return y
    return int4_matmul_reference(x2, packed, scale, offset, bias)


def _int4_linear_decomposed(x, packed, scale, offset, bias):
    y = _cpu_rows(x.reshape(-1, x.shape[-1]), packed, scale, offset, bias, eager=False)
    return y.reshape(*x.shape[:-1], packed.shape[0])


def _int4_backward(grad, packed, scale, offset, x_dtype):
    w = unpack_int4(packed, scale, offset, torch.float64 if grad.dtype == torch.float64 else torch.float32)
    return frozen_linear_backward(grad, w, x_dtype)


# ----------------------------------------------------------------------------- ops


def _check(x, packed, scale, offset, bias):
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"int4_linear: packed weight must be a 2-D uint8 tensor, got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    N, K = packed.shape[0], 2 * packed.shape[1]
    if x.shape[-1] != K:
        raise ValueError(f"int4_linear: x has {x.shape[-1]} features, weight expects {K}")
    if scale.dim() != 2 or scale.shape != offset.shape or scale.shape[0] != N \
            or not any(n_groups(K, g) == scale.shape[1] for g in GROUP_SIZES):
        raise ValueError(f"int4_linear: scale and offset must be [out_features, ceil(in_features / "
                         f"group)] with group in {GROUP_SIZES}; got {tuple(scale.shape)} for "
                         f"in_features={K}")
    if bias is not None and bias.shape != (N,):
        raise ValueError("int4_linear: bias must be an [out_features] vector")


@torch.library.custom_op("liger::int4_linear", mutates_args=())
def int4_linear_op(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                   bias: Optional[torch.Tensor]) -> torch.Tensor:
    _check(x, packed, scale, offset, bias)
    x2 = rows_2d(x)
    if use_triton(x2, scale, offset, bias) and packed.stride(-1) == 1:
        y = int4_matmul_triton(x2, packed, scale, offset, bias)
    elif x2.device.type == "cpu":
        y = _cpu_rows(x2, packed, scale, offset, bias, eager=True)
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
    return _int4_backward(grad, packed, scale, offset, x_dtype)


@int4_linear_backward_op.register_fake
def _(grad, packed, scale, offset, x_dtype):
    return grad.new_empty((*grad.shape[:-1], 2 * packed.shape[1]), dtype=x_dtype)


register_frozen_autograd(int4_linear_op, torch.ops.liger.int4_linear_backward)
# A model compiled on CPU inlines both (the decode loop and the dequantizing backward product).
cpu_decomposition(torch.ops.liger.int4_linear)(_int4_linear_decomposed)
cpu_decomposition(torch.ops.liger.int4_linear_backward)(_int4_backward)


def int4_linear(x, packed, scale, offset, bias=None):
    """y = x @ W'^T + bias with W' the dequantized int4 weight (see the module docstring)."""
    return torch.ops.liger.int4_linear(x, packed, scale, offset, bias)
