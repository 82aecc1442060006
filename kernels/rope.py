"""Rotary position embeddings (RoPE) for q and k in one kernel launch: `liger::rope`.

Two conventions, both with partial rotary (channels past rotary_dim pass through):
  * rotate_half (Hugging Face / GPT-NeoX), cos/sin last dim = rotary_dim r:
        out[..., :r] = x[..., :r] * cos + rotate_half(x[..., :r]) * sin,
        rotate_half(y) = cat(-y[..., r/2:], y[..., :r/2])
  * interleaved (original Llama / torchtitan complex form), cos/sin last dim = r/2:
        out[2i] = x[2i] c_i - x[2i+1] s_i,   out[2i+1] = x[2i] s_i + x[2i+1] c_i

`halves_out` (interleaved only; DeepSeek-V3's `apply_rotary_pos_emb_interleave`): the pairs
(x[2i], x[2i+1]) are read as above but written de-interleaved, the first members to out[i] and the
second to out[r/2 + i] (`cat((x0 c - x1 s, x1 c + x0 s))`).  Its backward reads halves and writes
pairs.

`round_steps` (for q/k in bf16/fp16 with tables of the same dtype): eager code computing the
rotation in that dtype rounds each product and the sum to it (each elementwise op computes in fp32
and rounds); with round_steps the kernel does exactly that, forward and backward (the backward of
eager's ops rounds the same way: two products, then their sum), so it is bit-equal to eager.
Without it, the rotation is computed in fp32 and rounded once.

`grad_dtype` (backward only): eager code whose products promote q to a wider dtype (a bf16 q times
fp32 or fp16 tables computes in fp32) computes forward in that dtype, but autograd casts each
product's gradient back to q's dtype and sums the two branches there.  With grad_dtype the
backward rounds each of its two products and their sum to grad_dtype, which reproduces that; the
result is stored in the gradient's own dtype (exact: it already holds grad_dtype values).

q/k are 4-D, [b, h, t, d] (seq_dim=2) or [b, t, h, d] (seq_dim=1); k may have fewer heads (GQA).
cos/sin are [t, r'], [1, t, r'] or [b, t, r'], fp32 or the activation dtype.  The backward is the
exact transpose of the forward map (it does not assume the two cos halves are equal), so random
cos/sin tables give correct gradients too.  cos/sin get no gradient: the autograd formula raises
if either requires grad, rather than silently dropping it.

Kernel layout: one program per (token, block of heads); the grid's second axis enumerates q's head
blocks then k's, so q and k are rotated in the same launch and each program loads its token's
cos/sin row once for all heads in its block.  Strides are passed explicitly, so transposed views
(HF's `q.view(b, t, h, d).transpose(1, 2)`) and slices of a fused qkv projection need no copy.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from ligerfx.kernels.rounding import cast_rne, round_to
from ligerfx.kernels.runtime import cpu_decomposition, next_pow2, use_triton

# Elements (heads x rotary lanes) one program handles; more heads are split over the grid.
_MAX_TILE = 2048


@triton.jit
def _rope_heads(
    x_ptr, o_ptr,
    x_sb, x_sh, x_st, x_sd,
    o_sb, o_sh, o_st, o_sd,
    bi, ti, h0, n_heads,
    c_a, c_b, s_a, s_b,
    HALF: tl.constexpr, D: tl.constexpr,
    BH: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
    IN_PAIRS: tl.constexpr, OUT_PAIRS: tl.constexpr, BACKWARD: tl.constexpr,
    RDT: tl.constexpr,
):
    """Rotate heads [h0, h0 + BH) of one token of x into o; IN_PAIRS / OUT_PAIRS: the pairs sit
    at (2i, 2i+1) of x / o, else at (i, HALF + i).

    c_a/c_b (s_a/s_b) are the cos (sin) values for the two members of each rotated pair, shape
    [BLOCK_HALF], already fp32: the two halves for rotate_half, the same row twice for interleaved.
    """
    offs_h = h0 + tl.arange(0, BH)
    hmask = offs_h < n_heads
    # int64 head offsets: heads * head stride can pass 2**31 for long sequences in [b, h, t, d].
    h64 = offs_h.to(tl.int64)[:, None]
    x_row = x_ptr + (bi * x_sb + ti * x_st) + h64 * x_sh
    o_row = o_ptr + (bi * o_sb + ti * o_st) + h64 * o_sh
    offs_c = tl.arange(0, BLOCK_HALF)
    mask = hmask[:, None] & (offs_c < HALF)[None, :]

    offs_r = tl.arange(0, 2 * BLOCK_HALF)
    rmask = hmask[:, None] & (offs_r < 2 * HALF)[None, :]
    if IN_PAIRS:
        # Load the whole rotary span contiguously, then de-interleave in registers.
        x = tl.load(x_row + offs_r[None, :] * x_sd, mask=rmask, other=0.0).to(tl.float32)
        xa, xb = tl.split(tl.reshape(x, (BH, BLOCK_HALF, 2)))
    else:
        xa = tl.load(x_row + offs_c[None, :] * x_sd, mask=mask, other=0.0).to(tl.float32)
        xb = tl.load(x_row + (offs_c + HALF)[None, :] * x_sd, mask=mask, other=0.0).to(tl.float32)

    c_a = c_a[None, :]
    c_b = c_b[None, :]
    s_a = s_a[None, :]
    s_b = s_b[None, :]
    # RDT: the dtype each product and the sum are rounded to (eager's roundings); fp32: none
    if BACKWARD:
        # Transpose of [[C_a, -S_a], [S_b, C_b]].
        oa = round_to(round_to(xa * c_a, RDT) + round_to(xb * s_b, RDT), RDT)
        ob = round_to(round_to(xb * c_b, RDT) - round_to(xa * s_a, RDT), RDT)
    else:
        oa = round_to(round_to(xa * c_a, RDT) - round_to(xb * s_a, RDT), RDT)
        ob = round_to(round_to(xb * c_b, RDT) + round_to(xa * s_b, RDT), RDT)

    if OUT_PAIRS:
        o = tl.reshape(tl.join(oa, ob), (BH, 2 * BLOCK_HALF))
        tl.store(o_row + offs_r[None, :] * o_sd, cast_rne(o, o_ptr.dtype.element_ty), mask=rmask)
    else:
        tl.store(o_row + offs_c[None, :] * o_sd, cast_rne(oa, o_ptr.dtype.element_ty), mask=mask)
        tl.store(o_row + (offs_c + HALF)[None, :] * o_sd, cast_rne(ob, o_ptr.dtype.element_ty), mask=mask)

    if BLOCK_PASS > 0:
        # Partial rotary: channels [2*HALF, D) are copied unchanged.
        offs_p = 2 * HALF + tl.arange(0, BLOCK_PASS)
        pmask = hmask[:, None] & (offs_p < D)[None, :]
        p = tl.load(x_row + offs_p[None, :] * x_sd, mask=pmask, other=0.0)
        tl.store(o_row + offs_p[None, :] * o_sd, p.to(o_ptr.dtype.element_ty), mask=pmask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr,
    q_sb, q_sh, q_st, q_sd, k_sb, k_sh, k_st, k_sd,
    qo_sb, qo_sh, qo_st, qo_sd, ko_sb, ko_sh, ko_st, ko_sd,
    c_sb, c_st, c_sr, s_sb, s_st, s_sr,
    T, HQ, HK,
    HALF: tl.constexpr, D: tl.constexpr,
    BHQ: tl.constexpr, BHK: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
    INTERLEAVED: tl.constexpr, IN_PAIRS: tl.constexpr, OUT_PAIRS: tl.constexpr,
    BACKWARD: tl.constexpr, RDT: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    bi = tok // T
    ti = tok % T

    # cos/sin row of this token, once for every head of the block.
    offs_c = tl.arange(0, BLOCK_HALF)
    cmask = offs_c < HALF
    c_row = cos_ptr + bi * c_sb + ti * c_st
    s_row = sin_ptr + bi * s_sb + ti * s_st
    c_a = tl.load(c_row + offs_c * c_sr, mask=cmask, other=0.0).to(tl.float32)
    s_a = tl.load(s_row + offs_c * s_sr, mask=cmask, other=0.0).to(tl.float32)
    if INTERLEAVED:
        c_b = c_a
        s_b = s_a
    else:
        c_b = tl.load(c_row + (offs_c + HALF) * c_sr, mask=cmask, other=0.0).to(tl.float32)
        s_b = tl.load(s_row + (offs_c + HALF) * s_sr, mask=cmask, other=0.0).to(tl.float32)

    n_qblk = tl.cdiv(HQ, BHQ)
    if blk < n_qblk:
        _rope_heads(q_ptr, qo_ptr, q_sb, q_sh, q_st, q_sd, qo_sb, qo_sh, qo_st, qo_sd,
                    bi, ti, blk * BHQ, HQ, c_a, c_b, s_a, s_b,
                    HALF, D, BHQ, BLOCK_HALF, BLOCK_PASS, IN_PAIRS, OUT_PAIRS, BACKWARD,
                    RDT)
    else:
        _rope_heads(k_ptr, ko_ptr, k_sb, k_sh, k_st, k_sd, ko_sb, ko_sh, ko_st, ko_sd,
                    bi, ti, (blk - n_qblk) * BHK, HK, c_a, c_b, s_a, s_b,
                    HALF, D, BHK, BLOCK_HALF, BLOCK_PASS, IN_PAIRS, OUT_PAIRS, BACKWARD,
                    RDT)


def _pair_layouts(interleaved: bool, halves_out: bool, backward: bool) -> tuple[bool, bool]:
    """Whether the pairs sit interleaved in the tensor read and in the one written: halves_out
    writes halves in the forward, so its backward (the transpose) reads halves."""
    return (interleaved and not (halves_out and backward),
            interleaved and not (halves_out and not backward))


def _bhtd_strides(x: torch.Tensor, seq_dim: int) -> tuple[int, int, int, int]:
    s = x.stride()
    return (s[0], s[1], s[2], s[3]) if seq_dim == 2 else (s[0], s[2], s[1], s[3])


def _cos_strides(c: torch.Tensor) -> tuple[int, int, int]:
    """(batch, seq, channel) strides; batch stride 0 broadcasts one table over the batch."""
    if c.dim() == 2:
        return 0, c.stride(0), c.stride(1)
    return (0 if c.shape[0] == 1 else c.stride(0)), c.stride(1), c.stride(2)


def _check(q, k, cos, sin, seq_dim, interleaved, halves_out=False) -> int:
    """Validate shapes; return rotary_dim."""
    torch._check(q.dim() == 4 and k.dim() == 4, lambda: "rope: q and k must be 4-D")
    torch._check(seq_dim in (1, 2), lambda: f"rope: seq_dim must be 1 or 2, got {seq_dim}")
    torch._check(interleaved or not halves_out,
                 lambda: "rope: halves_out needs interleaved=True (it de-interleaves pairs)")
    head_dim = 3 - seq_dim  # the heads axis is the other one of (1, 2)
    for i in range(4):
        if i != head_dim:
            torch._check(k.shape[i] == q.shape[i], lambda: "rope: q and k differ outside the heads axis")
    torch._check(cos.shape == sin.shape, lambda: "rope: cos and sin shapes differ")
    torch._check(cos.dim() in (2, 3), lambda: "rope: cos/sin must be [t, r] or [b, t, r]")
    t, d = q.shape[seq_dim], q.shape[3]
    torch._check(cos.shape[-2] == t, lambda: "rope: cos/sin seq length differs from q's")
    if cos.dim() == 3:
        torch._check(cos.shape[0] == 1 or cos.shape[0] == q.shape[0],
                     lambda: "rope: cos/sin batch must be 1 or q's batch")
    rot = cos.shape[-1] * (2 if interleaved else 1)
    torch._check(rot % 2 == 0 and 0 < rot <= d, lambda: f"rope: bad rotary_dim {rot} for head_dim {d}")
    return rot


_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _launch(q, k, cos, sin, q_out, k_out, seq_dim: int, interleaved: bool, backward: bool, *,
            round_dtype: torch.dtype | None = None, halves_out: bool = False) -> None:
    """Launch the kernel: rotate q into q_out and k into k_out (forward, or transpose if backward);
    each product and sum rounded to `round_dtype` (bf16 / fp16; None: fp32 throughout)."""
    in_pairs, out_pairs = _pair_layouts(interleaved, halves_out, backward)
    b, t, d = q.shape[0], q.shape[seq_dim], q.shape[3]
    hq, hk = q.shape[3 - seq_dim], k.shape[3 - seq_dim]
    rot = cos.shape[-1] * (2 if interleaved else 1)
    half = rot // 2
    if b * t == 0 or hq + hk == 0 or d == 0:
        return
    block_half = next_pow2(half)
    block_pass = next_pow2(d - rot) if d > rot else 0
    cap = max(1, _MAX_TILE // (2 * block_half))
    bhq, bhk = min(next_pow2(max(hq, 1)), cap), min(next_pow2(max(hk, 1)), cap)
    grid = (b * t, triton.cdiv(hq, bhq) + triton.cdiv(hk, bhk))
    tile = max(bhq, bhk) * 2 * block_half
    _rope_kernel[grid](
        q, k, q_out, k_out, cos, sin,
        *_bhtd_strides(q, seq_dim), *_bhtd_strides(k, seq_dim),
        *_bhtd_strides(q_out, seq_dim), *_bhtd_strides(k_out, seq_dim),
        *_cos_strides(cos), *_cos_strides(sin),
        t, hq, hk,
        HALF=half, D=d, BHQ=bhq, BHK=bhk, BLOCK_HALF=block_half, BLOCK_PASS=block_pass,
        INTERLEAVED=interleaved, IN_PAIRS=in_pairs, OUT_PAIRS=out_pairs, BACKWARD=backward,
        RDT=_TL_DTYPES.get(round_dtype, tl.float32),
        num_warps=8 if tile >= 4096 else 4 if tile >= 512 else 2,
    )


# ----------------------------------------------------------------------------- torch reference


def _table(c: torch.Tensor, x: torch.Tensor, seq_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """cos/sin as a tensor broadcastable against x[..., :r'] in x's layout."""
    c = c.to(dtype)
    if c.dim() == 2:
        c = c.unsqueeze(0)
    return c.unsqueeze(1) if seq_dim == 2 else c.unsqueeze(2)


def _round_dtype(x_dtype, backward: bool, round_steps: bool, grad_dtype) -> torch.dtype | None:
    """The dtype each product and their sum are rounded to (module docstring: round_steps,
    grad_dtype), or None when they are not rounded below the compute dtype."""
    if backward and grad_dtype is not None:
        d = grad_dtype
    elif round_steps and x_dtype in (torch.bfloat16, torch.float16):
        d = x_dtype
    else:
        return None
    cdt = torch.promote_types(x_dtype, torch.float32)
    return d if d != cdt and torch.promote_types(d, cdt) == cdt else None


def rope_reference(x, cos, sin, seq_dim: int, interleaved: bool, backward: bool = False,
                   round_steps: bool = False, halves_out: bool = False,
                   grad_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rotate one tensor in fp32 (or wider); `backward` applies the transpose map;
    `round_steps` rounds each product and the sum to x's dtype, `grad_dtype` those of the backward
    to it (see the module docstring)."""
    o, rot = _rotated(x, cos, sin, seq_dim, interleaved, backward, round_steps, halves_out,
                      grad_dtype)
    out = torch.empty_like(x)  # same strides as the fake impl promises
    out[..., :rot] = o
    out[..., rot:] = x[..., rot:]
    return out


def rope_functional(x, cos, sin, seq_dim: int, interleaved: bool, backward: bool = False,
                    round_steps: bool = False, halves_out: bool = False,
                    grad_dtype: torch.dtype | None = None) -> torch.Tensor:
    """rope_reference without writes into a buffer (a decomposition must be functional); its
    result is contiguous instead of laid out like x, which inductor accounts for."""
    o, rot = _rotated(x, cos, sin, seq_dim, interleaved, backward, round_steps, halves_out,
                      grad_dtype)
    o = o.to(x.dtype)
    return o if rot == x.shape[-1] else torch.cat((o, x[..., rot:]), dim=-1)


def _rotated(x, cos, sin, seq_dim: int, interleaved: bool, backward: bool,
             round_steps: bool = False, halves_out: bool = False, grad_dtype=None):
    """The rotated first `rot` features of x (compute dtype) and `rot`."""
    cdt = torch.promote_types(x.dtype, torch.float32)
    rdt = _round_dtype(x.dtype, backward, round_steps, grad_dtype)

    def r(v):
        return v if rdt is None else v.to(rdt).to(cdt)

    rot = cos.shape[-1] * (2 if interleaved else 1)
    xr = x[..., :rot].to(cdt)
    c, s = _table(cos, x, seq_dim, cdt), _table(sin, x, seq_dim, cdt)
    half = rot // 2
    in_pairs, out_pairs = _pair_layouts(interleaved, halves_out, backward)
    xa, xb = (xr[..., 0::2], xr[..., 1::2]) if in_pairs else (xr[..., :half], xr[..., half:])
    if interleaved:  # one angle per pair
        ca, cb, sa, sb = c, c, s, s
    else:
        ca, cb, sa, sb = c[..., :half], c[..., half:], s[..., :half], s[..., half:]
    if backward:
        oa, ob = r(r(xa * ca) + r(xb * sb)), r(r(xb * cb) - r(xa * sa))
    else:
        oa, ob = r(r(xa * ca) - r(xb * sa)), r(r(xb * cb) + r(xa * sb))
    o = torch.stack((oa, ob), dim=-1).flatten(-2) if out_pairs else torch.cat((oa, ob), dim=-1)
    return o, rot


def _rope_impl(q, k, cos, sin, seq_dim, interleaved, backward, round_steps=False,
               halves_out=False, grad_dtype=None):
    _check(q, k, cos, sin, seq_dim, interleaved, halves_out)
    if use_triton(q, k, cos, sin):
        q_out, k_out = torch.empty_like(q), torch.empty_like(k)
        _launch(q, k, cos, sin, q_out, k_out, seq_dim, interleaved, backward,
                round_dtype=_round_dtype(q.dtype, backward, round_steps, grad_dtype),
                halves_out=halves_out)
        return q_out, k_out
    return _rope_torch(q, k, cos, sin, seq_dim, interleaved, round_steps, halves_out,
                       grad_dtype, backward=backward)


def _rope_torch(q, k, cos, sin, seq_dim, interleaved, round_steps=False, halves_out=False,
                grad_dtype=None, *, backward=False, rotate=rope_reference):
    # positional order of the ops' schema (q, k, cos, sin, seq_dim, interleaved, round_steps,
    # halves_out, grad_dtype): the CPU decompositions below are called with it
    _check(q, k, cos, sin, seq_dim, interleaved, halves_out)
    return (rotate(q, cos, sin, seq_dim, interleaved, backward, round_steps, halves_out,
                   grad_dtype),
            rotate(k, cos, sin, seq_dim, interleaved, backward, round_steps, halves_out,
                   grad_dtype))


# ----------------------------------------------------------------------------- torch ops


@torch.library.custom_op("liger::rope", mutates_args=())
def rope_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            seq_dim: int, interleaved: bool, round_steps: bool = False, halves_out: bool = False,
            grad_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
    return _rope_impl(q, k, cos, sin, seq_dim, interleaved, False, round_steps, halves_out)


@rope_op.register_fake
def _(q, k, cos, sin, seq_dim, interleaved, round_steps=False, halves_out=False, grad_dtype=None):
    _check(q, k, cos, sin, seq_dim, interleaved, halves_out)
    return torch.empty_like(q), torch.empty_like(k)


@torch.library.custom_op("liger::rope_backward", mutates_args=())
def rope_backward_op(dq_out: torch.Tensor, dk_out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     seq_dim: int, interleaved: bool, round_steps: bool = False,
                     halves_out: bool = False, grad_dtype: Optional[torch.dtype] = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    return _rope_impl(dq_out, dk_out, cos, sin, seq_dim, interleaved, True, round_steps,
                      halves_out, grad_dtype)


@rope_backward_op.register_fake
def _(dq_out, dk_out, cos, sin, seq_dim, interleaved, round_steps=False, halves_out=False,
      grad_dtype=None):
    _check(dq_out, dk_out, cos, sin, seq_dim, interleaved, halves_out)
    return torch.empty_like(dq_out), torch.empty_like(dk_out)


def _setup_context(ctx, inputs, output):
    _, _, cos, sin, seq_dim, interleaved, round_steps, halves_out, grad_dtype = inputs
    if cos.requires_grad or sin.requires_grad:
        raise RuntimeError(
            "liger::rope does not compute gradients for cos/sin; detach them "
            "(they are normally derived from a frozen inv_freq buffer)")
    ctx.save_for_backward(cos, sin)
    ctx.seq_dim, ctx.interleaved, ctx.round_steps = seq_dim, interleaved, round_steps
    ctx.halves_out, ctx.grad_dtype = halves_out, grad_dtype


def _backward(ctx, dq_out, dk_out):
    cos, sin = ctx.saved_tensors
    dq, dk = torch.ops.liger.rope_backward(dq_out, dk_out, cos, sin, ctx.seq_dim, ctx.interleaved,
                                           ctx.round_steps, ctx.halves_out, ctx.grad_dtype)
    return dq, dk, None, None, None, None, None, None, None


rope_op.register_autograd(_backward, setup_context=_setup_context)
# On CPU, inductor fuses the torch path better than it runs as separate aten calls (runtime.py).
cpu_decomposition(torch.ops.liger.rope)(functools.partial(_rope_torch, rotate=rope_functional))
cpu_decomposition(torch.ops.liger.rope_backward)(
    functools.partial(_rope_torch, backward=True, rotate=rope_functional))


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         seq_dim: int = 2, interleaved: bool = False, round_steps: bool = False,
         halves_out: bool = False, grad_dtype: torch.dtype | None = None
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply rotary embeddings to q and k (see the module docstring); returns (q_out, k_out)."""
    return torch.ops.liger.rope(q, k, cos, sin, seq_dim, interleaved, round_steps, halves_out,
                                grad_dtype)
