"""Residual add + norm: the `liger::add_rms_norm` / `liger::add_layer_norm` ops with autograd.

    h = x + residual            (eager's add in their dtype: fp32 sum, one rounding to h's dtype)
    y = rms_norm(h, ...) / layer_norm(h, ...)     (exactly kernels/rms_norm.py / layer_norm.py)

Forward: one pass reads x and residual and writes h and y (the norm kernels' HAS_RESIDUAL
variant; the norm math has one home, in those files).  Backward: h's gradient from its other uses
(`dh`, None when h has none) and y's gradient `dy` give dx = dresidual = dh + dnorm(dy), with
dnorm rounded to h's dtype before the sum as eager's autograd sums the two gradients of h, and
dweight (and dbias) in the same pass (HAS_DH).  x and residual must have one shape and dtype: the
op does not broadcast or promote (the pattern leaves such adds alone with a near miss).
"""

from typing import Optional

import torch

from . import layer_norm as ln
from . import rms_norm as rn
from .runtime import cpu_decomposition


def _check_add(x, residual, what):
    if x.shape != residual.shape or x.dtype != residual.dtype or x.device != residual.device:
        raise ValueError(
            f"{what}: x {tuple(x.shape)} {x.dtype} and residual {tuple(residual.shape)} "
            f"{residual.dtype} must have one shape, dtype and device (the fused add does not "
            "broadcast or promote); add them with `x + residual` and call the plain norm instead")


def _plus_dh(dx, dh):
    # eager sums h's two gradients in h's dtype (the norm's one arrives rounded to it)
    return dx if dh is None else dx + dh


# ----------------------------------------------------------------------------- add + RMSNorm


def add_rms_norm_reference(x, residual, weight, eps, offset, casting_mode, out_dtype):
    h = (x + residual).contiguous()
    y, rstd = rn.rms_norm_reference(h, weight, eps, offset, casting_mode, out_dtype)
    return y, h, rstd


def add_rms_norm_backward_reference(dy, dh, h, weight, rstd, offset, casting_mode, weight_grad):
    dx, dw = rn.rms_norm_backward_reference(dy, h, weight, rstd, offset, casting_mode, weight_grad)
    return _plus_dh(dx, dh), dw


def add_rms_norm_forward_triton(x, residual, weight, eps, offset, casting_mode, out_dtype, y=None,
                                h=None, rstd=None):
    h = h if h is not None else rn._alloc(x.shape, x.dtype, x.device)
    y, rstd = rn.rms_norm_forward_triton(x, weight, eps, offset, casting_mode, out_dtype, y=y,
                                         rstd=rstd, residual=residual, h=h)
    return y, h, rstd


def _add_rms_norm_torch(x, residual, weight, eps, offset, casting_mode, out_dtype):
    _check_add(x, residual, "add_rms_norm")
    rn._check(x, weight, casting_mode)
    return add_rms_norm_reference(x, residual, weight, eps, offset, casting_mode, out_dtype)


def _add_rms_norm_backward_torch(dy, dh, h, weight, rstd, offset, casting_mode, weight_grad):
    dx, dw = rn._rms_norm_backward_torch(dy, h, weight, rstd, offset, casting_mode, weight_grad)
    return _plus_dh(dx, dh), dw


@torch.library.custom_op("liger::add_rms_norm", mutates_args=())
def add_rms_norm_op(
    x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor], eps: float,
    offset: float, casting_mode: str, out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h, rstd): y = rms_norm(h), h = x + residual."""
    _check_add(x, residual, "add_rms_norm")
    rn._check(x, weight, casting_mode)
    if rn._kernel_ok(x, weight, out_dtype) and rn.use_triton(residual):
        return add_rms_norm_forward_triton(x, residual, weight, eps, offset, casting_mode, out_dtype)
    return _add_rms_norm_torch(x, residual, weight, eps, offset, casting_mode, out_dtype)


@add_rms_norm_op.register_fake
def _(x, residual, weight, eps, offset, casting_mode, out_dtype):
    _check_add(x, residual, "add_rms_norm")
    rn._check(x, weight, casting_mode)
    return (x.new_empty(x.shape, dtype=out_dtype), x.new_empty(x.shape),
            x.new_empty(x.shape[:-1], dtype=torch.float32))


@torch.library.custom_op("liger::add_rms_norm_backward", mutates_args=())
def add_rms_norm_backward_op(
    dy: torch.Tensor, dh: Optional[torch.Tensor], h: torch.Tensor, weight: Optional[torch.Tensor],
    rstd: torch.Tensor, offset: float, casting_mode: str, weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight): dx is the gradient of x and of residual; dweight as rms_norm_backward's."""
    rn._check(h, weight, casting_mode)
    if rn._kernel_ok(h, weight) and rn.use_triton(dy, dh):
        dx, dw = rn.rms_norm_backward_triton(dy, h, weight, rstd, offset, casting_mode, weight_grad,
                                             dh=dh)
        if dw is None:
            dw = h.new_empty((0,), dtype=weight.dtype if weight is not None else h.dtype)
        return dx, dw
    return _add_rms_norm_backward_torch(dy, dh, h, weight, rstd, offset, casting_mode, weight_grad)


@add_rms_norm_backward_op.register_fake
def _(dy, dh, h, weight, rstd, offset, casting_mode, weight_grad):
    dx = h.new_empty(h.shape)
    if weight is not None and weight_grad:
        return dx, weight.new_empty(weight.shape)
    return dx, h.new_empty((0,), dtype=weight.dtype if weight is not None else h.dtype)


def _rms_setup_context(ctx, inputs, output):
    x, residual, weight, eps, offset, casting_mode, out_dtype = inputs
    _, h, rstd = output
    ctx.save_for_backward(h, weight, rstd)
    ctx.offset, ctx.casting_mode, ctx.out_dtype = offset, casting_mode, out_dtype
    ctx.mark_non_differentiable(rstd)
    ctx.set_materialize_grads(False)  # h unused elsewhere: no zero gradient to read


def _rms_backward(ctx, dy, dh, _drstd):
    h, weight, rstd = ctx.saved_tensors
    need_x, need_r, need_w = ctx.needs_input_grad[:3]
    if dy is None and dh is None or not (need_x or need_r or need_w):
        return (None,) * 7
    if dy is None:
        dy = torch.zeros_like(h, dtype=ctx.out_dtype)  # only h's gradient flows (y unused)
    need_w = need_w and weight is not None
    dx, dw = torch.ops.liger.add_rms_norm_backward(dy, dh, h, weight, rstd, ctx.offset,
                                                   ctx.casting_mode, need_w)
    return (dx if need_x else None, dx if need_r else None, dw if need_w else None,
            None, None, None, None)


add_rms_norm_op.register_autograd(_rms_backward, setup_context=_rms_setup_context)
# On CPU, inductor fuses the torch path better than it runs as separate aten calls (runtime.py).
cpu_decomposition(torch.ops.liger.add_rms_norm)(_add_rms_norm_torch)
cpu_decomposition(torch.ops.liger.add_rms_norm_backward)(_add_rms_norm_backward_torch)


def add_rms_norm(x, residual, weight=None, eps=1e-6, offset=0.0, casting_mode="llama", out_dtype=None):
    """(y, h): h = x + residual, y = RMSNorm(h) (semantics as kernels/rms_norm.py's rms_norm)."""
    if out_dtype is None:
        out_dtype = rn.default_out_dtype(x, weight, casting_mode)
    y, h, _ = torch.ops.liger.add_rms_norm(x, residual, weight, float(eps), float(offset),
                                           casting_mode, out_dtype)
    return y, h


# ----------------------------------------------------------------------------- add + LayerNorm


def add_layer_norm_reference(x, residual, weight, bias, eps, out_dtype):
    h = (x + residual).contiguous()
    y, mean, rstd = ln.layer_norm_reference(h, weight, bias, eps, out_dtype)
    return y, h, mean, rstd


def add_layer_norm_backward_reference(dy, dh, h, weight, bias, mean, rstd, weight_grad, bias_grad):
    dx, dw, db = ln.layer_norm_backward_reference(dy, h, weight, bias, mean, rstd, weight_grad,
                                                  bias_grad)
    return _plus_dh(dx, dh), dw, db


def add_layer_norm_forward_triton(x, residual, weight, bias, eps, out_dtype, y=None, h=None,
                                  mean=None, rstd=None):
    h = h if h is not None else rn._alloc(x.shape, x.dtype, x.device)
    y, mean, rstd = ln.layer_norm_forward_triton(x, weight, bias, eps, out_dtype, y=y, mean=mean,
                                                 rstd=rstd, residual=residual, h=h)
    return y, h, mean, rstd


def _add_layer_norm_torch(x, residual, weight, bias, eps, out_dtype):
    _check_add(x, residual, "add_layer_norm")
    ln._check(x, weight, bias)
    return add_layer_norm_reference(x, residual, weight, bias, eps, out_dtype)


def _add_layer_norm_backward_torch(dy, dh, h, weight, bias, mean, rstd, weight_grad, bias_grad):
    dx, dw, db = ln._layer_norm_backward_torch(dy, h, weight, bias, mean, rstd, weight_grad, bias_grad)
    return _plus_dh(dx, dh), dw, db


@torch.library.custom_op("liger::add_layer_norm", mutates_args=())
def add_layer_norm_op(
    x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor], eps: float, out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h, mean, rstd): y = layer_norm(h), h = x + residual."""
    _check_add(x, residual, "add_layer_norm")
    ln._check(x, weight, bias)
    if ln._kernel_ok(x, weight, bias, out_dtype) and rn.use_triton(residual):
        return add_layer_norm_forward_triton(x, residual, weight, bias, eps, out_dtype)
    return _add_layer_norm_torch(x, residual, weight, bias, eps, out_dtype)


@add_layer_norm_op.register_fake
def _(x, residual, weight, bias, eps, out_dtype):
    _check_add(x, residual, "add_layer_norm")
    ln._check(x, weight, bias)
    stat = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(x.shape), stat, torch.empty_like(stat)


@torch.library.custom_op("liger::add_layer_norm_backward", mutates_args=())
def add_layer_norm_backward_op(
    dy: torch.Tensor, dh: Optional[torch.Tensor], h: torch.Tensor, weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor, weight_grad: bool,
    bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias): dx is the gradient of x and of residual."""
    ln._check(h, weight, bias)
    if ln._kernel_ok(h, weight, bias) and rn.use_triton(dy, dh):
        dx, dw, db = ln.layer_norm_backward_triton(dy, h, weight, bias, mean, rstd, weight_grad,
                                                   bias_grad, dh=dh)
        return (dx, dw if dw is not None else ln._empty_grad(h, weight),
                db if db is not None else ln._empty_grad(h, bias))
    return _add_layer_norm_backward_torch(dy, dh, h, weight, bias, mean, rstd, weight_grad, bias_grad)


@add_layer_norm_backward_op.register_fake
def _(dy, dh, h, weight, bias, mean, rstd, weight_grad, bias_grad):
    dw = weight.new_empty(weight.shape) if weight is not None and weight_grad else ln._empty_grad(h, weight)
    db = bias.new_empty(bias.shape) if bias is not None and bias_grad else ln._empty_grad(h, bias)
    return h.new_empty(h.shape), dw, db


def _ln_setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, out_dtype = inputs
    _, h, mean, rstd = output
    ctx.save_for_backward(h, weight, bias, mean, rstd)
    ctx.out_dtype = out_dtype
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)


def _ln_backward(ctx, dy, dh, _dmean, _drstd):
    h, weight, bias, mean, rstd = ctx.saved_tensors
    need_x, need_r, need_w, need_b = ctx.needs_input_grad[:4]
    if dy is None and dh is None or not (need_x or need_r or need_w or need_b):
        return (None,) * 6
    if dy is None:
        dy = torch.zeros_like(h, dtype=ctx.out_dtype)
    need_w = need_w and weight is not None
    need_b = need_b and bias is not None
    dx, dw, db = torch.ops.liger.add_layer_norm_backward(dy, dh, h, weight, bias, mean, rstd,
                                                         need_w, need_b)
    return (dx if need_x else None, dx if need_r else None, dw if need_w else None,
            db if need_b else None, None, None)


add_layer_norm_op.register_autograd(_ln_backward, setup_context=_ln_setup_context)
cpu_decomposition(torch.ops.liger.add_layer_norm)(_add_layer_norm_torch)
cpu_decomposition(torch.ops.liger.add_layer_norm_backward)(_add_layer_norm_backward_torch)


def add_layer_norm(x, residual, weight=None, bias=None, eps=1e-5, out_dtype=None):
    """(y, h): h = x + residual, y = LayerNorm(h) (fp32 statistics); out_dtype defaults to x's."""
    if out_dtype is None:
        out_dtype = x.dtype
    y, h, _, _ = torch.ops.liger.add_layer_norm(x, residual, weight, bias, float(eps), out_dtype)
    return y, h
