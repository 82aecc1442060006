"""2:4 semi-structured sparsity: `sparsify_` (lossy pruning + compressed storage) and the checks
the compile pass uses to serve already-2:4 frozen weights losslessly.

`sparsify_` prunes by magnitude, or with calibration batches by SparseGPT or Wanda (the per-layer
math in compress/sparsegpt.py, the block-by-block measuring in compress/calibrate.py).

Schemes (format in kernels/sparse24_matmul.py): "2:4" (kept values in the weight's dtype and
2-bit positions), "2:4+int8" (kept values quantized like the int8 scheme, plus per-channel
scales).  Zeros of either sign count as zero (see the format's docstring for the one difference
that makes: the sign of an output that is exactly zero).

The compile pass (ligerfx/compiler/quantize_pass.py) checks every frozen linear weight exactly
(`frozen_reason`) and replaces the linear by `liger::frozen_sparse24_linear`: the weight is
compressed once and cached per parameter by the low-bit cache (ligerfx/compress/quantize.py),
which re-checks it when its version counter or storage changes.  A weight written so that it is
no longer 2:4 is served by the exact dense product (`F.linear`, what eager runs) with a warning,
until it is 2:4 again.
"""

from __future__ import annotations

import warnings
from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import quantize as Q
from .calibrate import compress_layers, replace_module
from .obs import DAMP
from .schemes import validate_sparsity
from .sparsegpt import CALIBRATED, METHODS, pruned_24
from ligerfx.kernels import sparse24_matmul as S24


def _stored(scheme: str, N: int, K: int, value_bytes: int, scale_bytes: int) -> int:
    """Bytes of the compressed form of an [N, K] weight: values, positions and scales."""
    vb = 1 if scheme == "2:4+int8" else value_bytes
    return N * (K // 2) * vb + N * (K // 8) + (N * scale_bytes if scheme == "2:4+int8" else 0)


def bytes_stored(scheme: str, weight: torch.Tensor, scale_dtype: Optional[torch.dtype] = None) -> tuple:
    """(compressed bytes, dense bytes) of `weight` [N, K] in `scheme`."""
    N, K = weight.shape
    scale_bytes = torch.empty((), dtype=scale_dtype or weight.dtype).element_size()
    return _stored(scheme, N, K, weight.element_size(), scale_bytes), weight.numel() * weight.element_size()


def frozen_reason(weight: torch.Tensor) -> Optional[str]:
    """Why the 2:4 pass cannot serve this frozen [N, K] weight losslessly, or None."""
    if weight.dim() != 2:
        return f"the weight is not 2-D ({tuple(weight.shape)})"
    if not weight.is_floating_point() or weight.dtype == torch.float64:
        return f"2:4 sparsity serves float32/bfloat16/float16 weights, not {weight.dtype}"
    why = S24.unsupported_reason(*weight.shape, Q.MIN_FEATURES)
    if why is None and S24.broken_fraction(weight) > 0:
        why = S24.not_24_message(weight)
    return why


# ----------------------------------------------------------------------------- compiled graphs


class NotServedSparseWarning(UserWarning):
    """A frozen weight compiled as 2:4 is not 2:4 any more: its linear runs dense (exactly)."""


def _packed(weight, key, scheme, scale_dtype, where):
    packed, reason, fresh = Q.cached_packed(key, weight, scheme, 0, scale_dtype)
    if packed is None and fresh and where == "forward":
        # Once per change of the weight, not per call.
        warnings.warn(f"a frozen [{weight.shape[0]}, {weight.shape[1]}] linear weight compiled with "
                      f"sparsity={scheme!r} was written and is no longer 2:4 ({reason}); it is served "
                      "by the exact dense product until it is 2:4 again", NotServedSparseWarning,
                      stacklevel=2)
    return packed


@torch.library.custom_op("liger::frozen_sparse24_linear", mutates_args=())
def frozen_sparse24_linear(x: torch.Tensor, weight: torch.Tensor, key: int, scheme: str,
                           scale_dtype: torch.dtype, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """F.linear(x, weight, bias) for a frozen weight the compile pass found 2:4: served from its
    cached compressed form, or by F.linear itself while the weight is not 2:4."""
    packed = _packed(weight, key, scheme, scale_dtype, "forward")
    if packed is None:
        return F.linear(x, weight, bias)
    return Q.linear(scheme, x, packed, bias)


@frozen_sparse24_linear.register_fake
def _(x, weight, key, scheme, scale_dtype, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("liger::frozen_sparse24_linear_backward", mutates_args=())
def frozen_sparse24_linear_backward(grad: torch.Tensor, weight: torch.Tensor, key: int, scheme: str,
                                    scale_dtype: torch.dtype, x_dtype: torch.dtype) -> torch.Tensor:
    """dx through the weight the forward served (autograd's saved-tensor check guarantees the
    weight is the one the forward saw, so the cache gives the same answer)."""
    packed = _packed(weight, key, scheme, scale_dtype, "backward")
    if packed is None:  # what F.linear's backward computes
        g2 = grad.reshape(-1, grad.shape[-1])
        return (g2 @ weight).to(x_dtype).reshape(*grad.shape[:-1], weight.shape[1])
    op = torch.ops.liger.sparse24_linear_backward if scheme == "2:4" else torch.ops.liger.sparse24_int8_linear_backward
    return op(grad, *packed, x_dtype)


@frozen_sparse24_linear_backward.register_fake
def _(grad, weight, key, scheme, scale_dtype, x_dtype):
    return grad.new_empty((*grad.shape[:-1], weight.shape[1]), dtype=x_dtype)


def _setup_context(ctx, inputs, output):
    x, weight, key, scheme, scale_dtype, _ = inputs
    ctx.save_for_backward(weight)
    ctx.args = (key, scheme, scale_dtype, x.dtype)


def _backward(ctx, grad):
    (weight,) = ctx.saved_tensors
    dx = dbias = None
    if ctx.needs_input_grad[0]:
        dx = torch.ops.liger.frozen_sparse24_linear_backward(grad, weight, *ctx.args)
    if ctx.needs_input_grad[-1]:
        dbias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return dx, None, None, None, None, dbias


frozen_sparse24_linear.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- eager API


class SparseLinear(nn.Module):
    """An `nn.Linear` whose weight is stored 2:4-compressed (buffers `values`, `meta`[, `scale`])."""

    def __init__(self, in_features: int, out_features: int, scheme: str = "2:4", bias: bool = True,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()

        validate_sparsity(scheme)
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        N, K = out_features, in_features
        int8 = scheme == "2:4+int8"
        self.register_buffer("values", torch.zeros(N, K // 2, dtype=torch.int8 if int8 else dtype, device=device))
        self.register_buffer("meta", torch.zeros(N, K // 8, dtype=torch.uint8, device=device))
        if int8:
            self.register_buffer("scale", torch.zeros(N, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(N, dtype=dtype, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: Optional[torch.Tensor], scheme: str,
                    packed: Optional[tuple] = None) -> "SparseLinear":
        """From a 2:4 sparse weight [N, K] (raises ValueError if it is not).  `packed`: its
        tensors already packed in `scheme` (by a calibrated method that chose the int8 levels)."""
        N, K = weight.shape
        s = cls.__new__(cls)
        nn.Module.__init__(s)
        s.in_features, s.out_features, s.scheme = K, N, scheme
        if packed is None:
            packed = Q.pack(weight, scheme, 0, weight.dtype)
        for name, t in zip(("values", "meta", "scale"), packed):
            s.register_buffer(name, t)
        s.bias = bias
        return s

    def packed(self) -> tuple:
        return (self.values, self.meta) if self.scheme == "2:4" else (self.values, self.meta, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return Q.linear(self.scheme, x, self.packed(), self.bias)

    def dense_weight(self, dtype=torch.float32) -> torch.Tensor:
        scale = self.scale if self.scheme == "2:4+int8" else None
        return S24.unpack_24(self.values, self.meta, scale, dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, scheme={self.scheme}")


def sparsify_(model: nn.Module, scheme: str = "2:4", skip: Iterable[str] = (),
              sparsify_lm_head: bool = False, calibration: Optional[Iterable] = None,
              method: Optional[str] = None, sequential: bool = True, pack: bool = True,
              damp: float = DAMP, search: bool = False) -> dict:
    """Prune eligible `nn.Linear` modules of `model` to 2:4 and store them compressed, in place.

    **Lossy**: in every group of 4 consecutive weights along in_features 2 are set to zero.
    `method` chooses which (and what happens to the rest):
    - "magnitude" (the default without `calibration`): keep the 2 of largest |w|, nothing else.
    - "sparsegpt" (the default with `calibration`): SparseGPT, compress/sparsegpt.py: choose by
      the OBS cost against the layer's inputs and move each dropped weight's error onto the
      columns not yet pruned; "2:4+int8" rounds the kept values in the same sweep (joint mode).
    - "wanda": keep the 2 of largest |w_j| * ||x_j|| (input norms from calibration), no update.
    `calibration`: an iterable of batches (token-id tensors or dicts of model keyword arguments,
    as `quantize_` takes them).  `sequential` (default): calibrate block by block, each block
    measured on the inputs the already-pruned blocks before it produce (calibrate.layerwise);
    False: every layer on the dense model in one pass.  `damp`: SparseGPT's damping (fraction of
    mean diag H); `search`: SparseGPT picks each group's pair by its exact cost under the sweep
    (False: greedily by single-column saliency, as the paper).

    `pack=False` keeps every pruned linear an `nn.Linear` whose weight holds the 2:4-pruned (and
    updated, for SparseGPT; int8-grid values for "2:4+int8") dense values: trainable weights
    for recovery fine-tuning (keep the zeros by masking the gradient, e.g. `weight != 0`), served
    compressed later by `options={"sparsity": ...}` or another `sparsify_` (which then only drops
    zeros).  Otherwise each linear becomes a `SparseLinear` holding only the compressed buffers.

    Skipped like `quantize_`: module names matching a glob in `skip`, the lm head unless
    `sparsify_lm_head`, and shapes the format cannot serve (a dim below 16, in_features not a
    multiple of 8).  Returns {module name: reason} for every linear left alone.  To load a saved
    state_dict, build the model, call `sparsify_(model, scheme)`, then load_state_dict.
    """

    validate_sparsity(scheme)
    if method is None:
        method = "sparsegpt" if calibration is not None else "magnitude"
    if method not in METHODS:
        raise ValueError(f"sparsify_: method must be one of {', '.join(map(repr, METHODS))}; got {method!r}")
    if method in CALIBRATED and calibration is None:
        raise ValueError(f"sparsify_: method={method!r} needs calibration batches (calibration=[token "
                         "ids or dicts of model kwargs, ...]); without them use method='magnitude'")
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    heads = set() if sparsify_lm_head else Q.lm_head_like(model)
    skipped, chosen = {}, []
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear):
            continue
        if Q.matches_any(name, skip):
            reason = "matches skip"
        elif name in heads:
            reason = "lm head (tied to an embedding or vocabulary-sized); pass sparsify_lm_head=True"
        else:
            reason = S24.unsupported_reason(mod.out_features, mod.in_features, Q.MIN_FEATURES)
        if reason is not None:
            skipped[name] = reason
        else:
            chosen.append(name)
    int8 = scheme == "2:4+int8"

    def visit(name, mod, H):
        with torch.no_grad():
            dense, packed = pruned_24(mod.weight, H, method, int8, damp, search)
            if not pack:
                mod.weight.copy_(dense)
                return None
            return SparseLinear.from_weight(dense, mod.bias, scheme, packed)

    if method not in CALIBRATED or not chosen:
        for name in chosen:
            new = visit(name, model.get_submodule(name), None)
            if new is not None:
                replace_module(model, name, new)
        return skipped
    compress_layers(model, chosen, calibration, visit, f"sparsify_ ({scheme}, {method})", sequential)
    return skipped


