"""2:4 semi-structured sparse linears: compressed weights expanded in registers, dense `tl.dot`.

Format (`pack_24`): a weight W [N, K] (K a multiple of 8) is 2:4 sparse when every group of 4
consecutive entries along K holds at most 2 non-zero entries; zeros of either sign count as zero
(pruning written `w * mask`, as torch.nn.utils.prune does, leaves -0.0 where negative weights
were dropped).  Each group stores exactly 2 (position, value) pairs, positions ascending: its
non-zero entries, then its -0.0 entries while there is room, then +0.0 positions.  The expansion
is therefore bit-exact except that a -0.0 with no room comes back as +0.0; x * -0.0 and x * +0.0
are both zeros (or both nan for an inf/nan x), and adding a zero of either sign to a non-zero sum
leaves it unchanged, so that can only change the sign of an output that is exactly zero (whose
sign the dense product leaves to its accumulation: it depends on the summation order and on
whether the sum starts from +0.0, which differs between BLAS paths):

    values  [N, K/2]   values[n, 2g], values[n, 2g+1]: the group g's two entries (W's dtype)
    meta    uint8 [N, K/8]: one nibble per group, group 2j in the low nibble of byte j, 2j+1 in
            the high one; a nibble is i0 | i1 << 2 (i0, i1 in 0..3: the entries' positions)

With int8 (`pack_24_int8`, "2:4+int8") the values are quantized like the int8 scheme (symmetric
per output channel, kernels/int8_matmul.py) and a scale [N] is stored too.  That equals the int8
scheme applied to the 2:4 weight (the dropped zeros quantize to 0).

`liger::sparse24_linear(x, values, meta, bias)` and `liger::sparse24_int8_linear(x, values, meta,
scale, bias)` compute y = x @ W^T (* scale) + bias.  The kernel loads the compressed tile (values
and meta, ~0.56x the bytes of a dense bf16 tile), rebuilds the dense [BN, BK] tile in registers
(explicit zeros included, so inf/nan activations propagate as in the dense product) and feeds a
dense `tl.dot` accumulating in fp32; scale and bias in the shared epilogue.  Decode (M <= 16)
splits K over programs like the other low-bit kernels (kernels/lowbit.py).  The autograd formula
gives the input (and bias) gradient through the frozen weight.  A cuSPARSELt path
(`torch.sparse.to_sparse_semi_structured`) is not used: it could not be measured here, and it
skips the zero products (an inf activation would not turn into nan as in the dense product).
"""

from __future__ import annotations

from typing import Optional

import dataclasses

import torch
import triton
import triton.language as tl

from .int8_matmul import pack_int8
from .lowbit import (dot_precision, frozen_linear_backward, grouped_tile, operands, pick_config,
                     register_frozen_autograd, rows_2d, splitk_reduce, store_tile, tile_grid,
                     upcast_dot)
from .runtime import use_triton

K_MULTIPLE = 8  # two groups of 4 share a metadata byte


# ----------------------------------------------------------------------------- format


def kept_mask(weight: torch.Tensor) -> torch.Tensor:
    """Entries the format must keep: the non-zero ones (nan and inf included; -0.0 is a zero)."""
    return weight != 0


def broken_fraction(weight: torch.Tensor) -> float:
    """Fraction of the groups of 4 along K holding more than 2 kept entries (0.0: W is 2:4)."""
    N, K = weight.shape
    kept = kept_mask(weight.detach()).reshape(N, K // 4, 4).sum(-1)
    return (kept > 2).float().mean().item() if kept.numel() else 0.0


def unsupported_reason(out_features: int, in_features: int, min_features: int) -> Optional[str]:
    if min(out_features, in_features) < min_features:
        return (f"layer too small for 2:4 sparsity ({out_features}x{in_features}; both dims must be "
                f"at least {min_features})")
    if in_features % K_MULTIPLE:
        return (f"in_features={in_features} is not a multiple of {K_MULTIPLE} (2:4 metadata packs "
                "2 groups of 4 per byte)")
    return None


def not_24_message(weight: torch.Tensor) -> str:
    return (f"weight is not 2:4 sparse: {broken_fraction(weight):.1%} of its groups of 4 along "
            "in_features have more than 2 non-zeros (prune it first: ligerfx.sparsify_)")


def prune_24(weight: torch.Tensor) -> torch.Tensor:
    """Magnitude pruning (lossy): keep the 2 largest |w| of every group of 4 along K, zero the rest."""
    N, K = weight.shape
    w = weight.detach().reshape(N, K // 4, 4)
    idx = w.abs().float().topk(2, dim=-1).indices
    keep = torch.zeros_like(w, dtype=torch.bool).scatter_(-1, idx, True)
    return torch.where(keep, w, torch.zeros((), dtype=w.dtype, device=w.device)).reshape(N, K)


def pack_24(weight: torch.Tensor):
    """Compress a 2:4 sparse W [N, K] -> (values [N, K/2] in W's dtype, meta uint8 [N, K/8]).
    Lossless; raises ValueError (saying what fraction of groups break the pattern) otherwise."""
    N, K = weight.shape
    if K % K_MULTIPLE:
        raise ValueError(f"2:4 sparsity: in_features={K} must be a multiple of {K_MULTIPLE}")
    w = weight.detach().reshape(N, K // 4, 4)
    kept = kept_mask(w)
    if (kept.sum(-1) > 2).any():
        raise ValueError(not_24_message(weight))
    # Non-zero entries first, then -0.0 (kept bit for bit where there is room), then +0.0
    # fillers; lowest positions first among equals; stored in ascending position order.
    pos = torch.arange(4, device=w.device)
    rank = kept.to(torch.int64) * 16 + torch.signbit(w).to(torch.int64) * 8 + (3 - pos)
    idx = rank.topk(2, dim=-1).indices.sort(-1).values
    values = w.gather(-1, idx).reshape(N, K // 2).contiguous()
    nib = (idx[..., 0] | (idx[..., 1] << 2)).to(torch.uint8)  # [N, K/4]
    meta = (nib[:, 0::2] | (nib[:, 1::2] << 4)).contiguous()
    return values, meta


def pack_24_int8(weight: torch.Tensor, scale_dtype: Optional[torch.dtype] = None):
    """2:4 compression, then int8 per-channel values -> (values int8 [N, K/2], meta, scale [N])."""
    values, meta = pack_24(weight)
    q, scale = pack_int8(values, scale_dtype or weight.dtype)
    return q, meta, scale


def positions(meta: torch.Tensor) -> torch.Tensor:
    """meta uint8 [N, K/8] -> positions int64 [N, K/4, 2] (i0, i1 of every group)."""
    N, C = meta.shape
    nib = torch.stack((meta & 15, meta >> 4), dim=-1).reshape(N, 2 * C).to(torch.int64)
    return torch.stack((nib & 3, nib >> 2), dim=-1)


def unpack_24(values: torch.Tensor, meta: torch.Tensor, scale: Optional[torch.Tensor] = None,
              dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The dense [N, K] weight (times scale[n] if given), in `dtype` (default values' dtype).
    Entry i0 wins if a (hand-made) nibble repeats a position, as in the kernel."""
    N, half = values.shape
    dtype = dtype or values.dtype
    idx = positions(meta)
    v = values.to(dtype).reshape(N, half // 2, 2)
    dense = torch.zeros((N, half // 2, 4), dtype=dtype, device=values.device)
    dense.scatter_(-1, idx[..., 1:], v[..., 1:])
    dense.scatter_(-1, idx[..., :1], v[..., :1])
    dense = dense.reshape(N, 2 * half)
    return dense * scale.to(dtype)[:, None] if scale is not None else dense


# ----------------------------------------------------------------------------- kernel


@triton.jit
def _sparse24_mm_kernel(X, V, MT, S, B, Y, P, M, N, K, stride_xm, stride_vn, stride_mn, stride_ym,
                        k_per_split, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                        SPLIT_K: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile(M, N, BM, BN, GROUP_M)
    pid_k = tl.program_id(1)

    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    mmask = rm < M
    nmask = rn < N
    x_rows = X + rm[:, None].to(tl.int64) * stride_xm
    v_rows = V + rn[:, None].to(tl.int64) * stride_vn
    m_rows = MT + rn[:, None].to(tl.int64) * stride_mn
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)  # K and k_per_split are multiples of 8
    for k0 in range(k_lo, k_hi, BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(x_rows + rk[None, :], mask=mmask[:, None] & (rk[None, :] < k_hi), other=0.0)
        # The dense fp32 [BN, BK] weight tile, rebuilt in registers (explicit zeros included).
        # Inlined rather than a helper @triton.jit of this module: in the full benchmark smoke run
        # the interpreter failed on it with KeyError('_sparse24_mm_kernel') (not reproduced alone).
        rv = k0 // 2 + tl.arange(0, BK // 2)
        v = tl.load(v_rows + rv[None, :], mask=nmask[:, None] & (rv[None, :] < k_hi // 2), other=0)
        v0, v1 = tl.split(tl.reshape(v.to(tl.float32), (BN, BK // 4, 2)))  # [BN, groups] each
        rc = k0 // 8 + tl.arange(0, BK // 8)
        b = tl.load(m_rows + rc[None, :], mask=nmask[:, None] & (rc[None, :] < k_hi // 8), other=0)
        nib = tl.interleave(b & 15, b >> 4)  # [BN, groups] in group order
        i0 = nib & 3
        i1 = (nib >> 2) & 3
        d0 = tl.where(i0 == 0, v0, tl.where(i1 == 0, v1, 0.0))
        d1 = tl.where(i0 == 1, v0, tl.where(i1 == 1, v1, 0.0))
        d2 = tl.where(i0 == 2, v0, tl.where(i1 == 2, v1, 0.0))
        d3 = tl.where(i0 == 3, v0, tl.where(i1 == 3, v1, 0.0))
        # interleave(interleave(d0, d2), interleave(d1, d3)): d0, d1, d2, d3 of each group in K order
        w = tl.interleave(tl.interleave(d0, d2), tl.interleave(d1, d3))
        # values came from x's dtype (or int8): rounding them back to it is exact
        if UPCAST:
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(x.dtype).to(tl.float32)), acc,
                         input_precision=PREC)
        else:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=PREC)
    store_tile(acc, S, B, Y, P, rm, rn, M, N, stride_ym, pid_k, HAS_SCALE=HAS_SCALE,
               HAS_BIAS=HAS_BIAS, SPLIT_K=SPLIT_K)


def sparse24_matmul_triton(x2: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                           scale: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                           y: Optional[torch.Tensor] = None, split: Optional[int] = None) -> torch.Tensor:
    """y[M, N] = x2[M, K] @ unpack_24(values, meta, scale)^T + bias, through the Triton kernel."""
    M, K = x2.shape
    N = values.shape[0]
    if y is None:
        y = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    if M == 0:
        return y
    # per dense weight element: half a kept value plus an eighth of a byte of positions (BK >= 16, a
    # power of two: whole bytes of positions per tile)
    w_bytes = 0.5 * values.element_size() + 0.125
    cfg = pick_config(M, N, K, x2.device, operands(x2.dtype, w_bytes), split=split)
    if x2.dtype == torch.float32 and cfg.BM > 16:
        # the fp32 (FMA) tiles also hold the expanded weight tile: a third pipeline stage spills
        # on sm_90 (found by the offline compile, tests/gpu_compile)
        cfg = dataclasses.replace(cfg, num_stages=2)
    grid, partial = tile_grid(cfg, M, N, x2.device)
    dummy = values
    _sparse24_mm_kernel[grid](x2, values, meta, scale if scale is not None else dummy,
                              bias if bias is not None else dummy, y,
                              partial if partial is not None else y, M, N, K, x2.stride(0),
                              values.stride(0), meta.stride(0), y.stride(0), cfg.k_per_split,
                              HAS_SCALE=scale is not None, HAS_BIAS=bias is not None,
                              SPLIT_K=cfg.split > 1, PREC=dot_precision(x2.dtype),
                              UPCAST=upcast_dot(x2.device), BM=cfg.BM, BN=cfg.BN, BK=cfg.BK,
                              GROUP_M=8, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if partial is not None:
        splitk_reduce(partial, scale, bias, y)
    return y


def sparse24_matmul_reference(x2, values, meta, scale, bias):
    """The torch path: expand (rounded to x's dtype like the kernel), product in fp32 (fp64 for
    fp64 inputs), scale and bias, one rounding to x's dtype."""
    acc = torch.float64 if x2.dtype == torch.float64 else torch.float32
    w = unpack_24(values, meta).to(x2.dtype).to(acc)
    y = x2.to(acc) @ w.t()
    if scale is not None:
        y = y * scale.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x2.dtype)


# ----------------------------------------------------------------------------- ops


def _check(name, x, values, meta, scale, bias, int8: bool):
    if values.dim() != 2 or (values.dtype == torch.int8) != int8 or not (int8 or values.is_floating_point()):
        want = "int8" if int8 else "floating-point"
        raise ValueError(f"{name}: values must be a 2-D {want} tensor, got {values.dtype} "
                         f"{tuple(values.shape)}")
    N, K = values.shape[0], 2 * values.shape[1]
    if K % K_MULTIPLE or meta.dtype != torch.uint8 or meta.shape != (N, K // 8):
        raise ValueError(f"{name}: meta must be uint8 [out_features, in_features / 8] = [{N}, {K // 8}] "
                         f"with in_features a multiple of {K_MULTIPLE}, got {meta.dtype} {tuple(meta.shape)}")
    if x.shape[-1] != K:
        raise ValueError(f"{name}: x has {x.shape[-1]} features, weight expects {K}")
    if int8 and scale.shape != (N,):
        raise ValueError(f"{name}: scale must be an [out_features] vector")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"{name}: bias must be an [out_features] vector")


def _forward(x, values, meta, scale, bias):
    x2 = rows_2d(x)
    if use_triton(x2, scale, bias) and values.stride(-1) == 1 and meta.stride(-1) == 1:
        y = sparse24_matmul_triton(x2, values, meta, scale, bias)
    else:
        y = sparse24_matmul_reference(x2, values, meta, scale, bias)
    return y.reshape(*x.shape[:-1], values.shape[0])


def _backward(grad, values, meta, scale, x_dtype):
    w = unpack_24(values, meta, scale, torch.float64 if grad.dtype == torch.float64 else torch.float32)
    return frozen_linear_backward(grad, w, x_dtype)


@torch.library.custom_op("liger::sparse24_linear", mutates_args=())
def sparse24_linear_op(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                       bias: Optional[torch.Tensor]) -> torch.Tensor:
    _check("sparse24_linear", x, values, meta, None, bias, int8=False)
    return _forward(x, values, meta, None, bias)


@sparse24_linear_op.register_fake
def _(x, values, meta, bias):
    _check("sparse24_linear", x, values, meta, None, bias, int8=False)
    return x.new_empty((*x.shape[:-1], values.shape[0]))


@torch.library.custom_op("liger::sparse24_int8_linear", mutates_args=())
def sparse24_int8_linear_op(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                            scale: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    _check("sparse24_int8_linear", x, values, meta, scale, bias, int8=True)
    return _forward(x, values, meta, scale, bias)


@sparse24_int8_linear_op.register_fake
def _(x, values, meta, scale, bias):
    _check("sparse24_int8_linear", x, values, meta, scale, bias, int8=True)
    return x.new_empty((*x.shape[:-1], values.shape[0]))


@torch.library.custom_op("liger::sparse24_linear_backward", mutates_args=())
def sparse24_linear_backward_op(grad: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                                x_dtype: torch.dtype) -> torch.Tensor:
    return _backward(grad, values, meta, None, x_dtype)


@sparse24_linear_backward_op.register_fake
def _(grad, values, meta, x_dtype):
    return grad.new_empty((*grad.shape[:-1], 2 * values.shape[1]), dtype=x_dtype)


@torch.library.custom_op("liger::sparse24_int8_linear_backward", mutates_args=())
def sparse24_int8_linear_backward_op(grad: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                                     scale: torch.Tensor, x_dtype: torch.dtype) -> torch.Tensor:
    return _backward(grad, values, meta, scale, x_dtype)


@sparse24_int8_linear_backward_op.register_fake
def _(grad, values, meta, scale, x_dtype):
    return grad.new_empty((*grad.shape[:-1], 2 * values.shape[1]), dtype=x_dtype)


register_frozen_autograd(sparse24_linear_op, torch.ops.liger.sparse24_linear_backward)
register_frozen_autograd(sparse24_int8_linear_op, torch.ops.liger.sparse24_int8_linear_backward)


def sparse24_linear(x, values, meta, bias=None):
    """y = x @ W^T + bias with W the expanded 2:4 weight (see the module docstring)."""
    return torch.ops.liger.sparse24_linear(x, values, meta, bias)


def sparse24_int8_linear(x, values, meta, scale, bias=None):
    """y = x @ (W_int8 * scale[:, None])^T + bias with W_int8 the expanded 2:4 int8 weight."""
    return torch.ops.liger.sparse24_int8_linear(x, values, meta, scale, bias)
