"""2:4 semi-structured sparsity: `sparsify_` (lossy pruning + compressed storage) and the checks
the compile pass uses to serve already-2:4 frozen weights losslessly.

Schemes (format in kernels/sparse24_matmul.py): "2:4" (kept values in the weight's dtype and
2-bit positions), "2:4+int8" (kept values quantized like the int8 scheme, plus per-channel
scales).  The compile pass (ligerfx/compiler/quantize_pass.py) checks every frozen linear weight exactly
(`frozen_reason`); a 2:4 weight is compressed once and cached per parameter by the low-bit cache
(ligerfx/compress/quantize.py), which re-checks it after in-place changes.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn

from . import quantize as Q
from .schemes import validate_sparsity
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
    def from_weight(cls, weight: torch.Tensor, bias: Optional[torch.Tensor], scheme: str) -> "SparseLinear":
        """From a 2:4 sparse weight [N, K] (raises ValueError if it is not)."""
        N, K = weight.shape
        s = cls.__new__(cls)
        nn.Module.__init__(s)
        s.in_features, s.out_features, s.scheme = K, N, scheme
        for name, t in zip(("values", "meta", "scale"), Q.pack(weight, scheme, 0, weight.dtype)):
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
              sparsify_lm_head: bool = False) -> dict:
    """Prune eligible `nn.Linear` modules of `model` to 2:4 and store them compressed, in place.

    **Lossy**: in every group of 4 consecutive weights along in_features the 2 of largest
    magnitude are kept and the other 2 set to zero (magnitude pruning, no calibration or
    retraining; see docs/quantization.md for the accuracy it costs).  Each linear becomes a
    `SparseLinear` holding only the compressed buffers; "2:4+int8" also quantizes the kept values
    (int8 per output channel).  Skipped like `quantize_`: module names matching a glob in `skip`,
    the lm head unless `sparsify_lm_head`, and shapes the format cannot serve (a dim below 16,
    in_features not a multiple of 8).  Returns {module name: reason} for every linear left alone.
    To load a saved state_dict, build the model, call the same `sparsify_`, then load_state_dict.
    """

    validate_sparsity(scheme)
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    heads = set() if sparsify_lm_head else Q.lm_head_like(model)
    skipped = {}
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
            continue
        with torch.no_grad():
            sp = SparseLinear.from_weight(S24.prune_24(mod.weight), mod.bias, scheme)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, sp)
    return skipped
