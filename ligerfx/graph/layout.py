"""Drop-in outputs: a replacement's value must look like the one it replaces to the code after it.

Later code may `.view` a value, which works only for some strides, so shape, dtype and device must
be equal and the strides too (ignoring dims of size 1, whose stride no op reads).  When only the
strides differ and the replaced value was dense (every element once, in some dim order), the
rewriter restores them: `permute` to that order, `contiguous`, `permute` back (a plain
`contiguous` when the order is row-major).  Anything else is refused with the reason.
Symbolic sizes compare as equal only when that is statically known; the dim order of a dense value
is read from the sizes' hints, and the restored strides are then checked statically.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true


def _eq(a: Any, b: Any) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return statically_known_true(a == b)


def _hint(s: Any) -> int | None:
    if isinstance(s, int):
        return s
    node = getattr(s, "node", None)
    h = getattr(node, "hint", None)
    return int(h) if h is not None else None


def mismatch(old: torch.Tensor, new: torch.Tensor) -> str | None:
    """Why `new` cannot stand for `old` even after a restride (shape, dtype, device), or None."""
    if new.dtype != old.dtype:
        return f"the fused op gives {new.dtype} where the code gives {old.dtype}"
    if new.device != old.device:
        return f"the fused op gives a tensor on {new.device} where the code's is on {old.device}"
    if new.dim() != old.dim() or not all(_eq(a, b) for a, b in zip(new.shape, old.shape)):
        return (f"the fused op gives shape {tuple(new.shape)} where the code gives "
                f"{tuple(old.shape)}")
    return None


def same_strides(old: torch.Tensor, new: torch.Tensor) -> bool:
    return all(_eq(size, 1) or _eq(a, b)
               for size, a, b in zip(old.shape, old.stride(), new.stride()))


def dense_order(v: torch.Tensor) -> list[int] | None:
    """The dims of a dense (non-overlapping, gap-free) tensor from outermost to innermost, or None
    when it is not dense (a slice, an expand) or its order is unknown.  Dims of size 1 keep their
    place (their stride is never read)."""
    dims = []
    for d, (size, stride) in enumerate(zip(v.shape, v.stride())):
        hs, ht = _hint(size), _hint(stride)
        if hs is None or ht is None:
            return None
        dims.append((ht, hs, d))
    big = sorted((t for t in dims if t[1] != 1), key=lambda t: (-t[0], t[2]))
    expect = 1
    for stride, size, _ in reversed(big):
        if stride != expect:
            return None
        expect *= size
    order = [d for _, _, d in big]
    for _, size, d in dims:
        if size == 1:
            order.insert(min(d, len(order)), d)
    return order


def restride_plan(old: torch.Tensor, new: torch.Tensor) -> list[int] | None:
    """None when `new` already has `old`'s layout; else the dim order to restore `old`'s strides
    (raises ValueError with the reason when they cannot be restored)."""
    problem = mismatch(old, new)
    if problem is not None:
        raise ValueError(problem)
    if same_strides(old, new):
        return None
    order = dense_order(old)
    if order is None:
        raise ValueError(f"the code's value has strides {tuple(old.stride())} (not dense), which "
                         f"the fused op's output (strides {tuple(new.stride())}) cannot take")
    return order
