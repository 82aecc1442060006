"""Shape facts proved without guards.

A rewrite must not specialise a dynamic dimension: asking `bool(s0 == 64)` of a SymInt would
install a guard (and recompile on the next sequence length).  These helpers compare sympy
expressions instead and answer True only when the fact holds for every value of the symbols.
"""

from __future__ import annotations

from typing import Any

import sympy
import torch


def expr(v: Any):
    """A sympy expression (or int) for an int or SymInt."""
    if isinstance(v, torch.SymInt):
        return v.node.expr
    if isinstance(v, int):
        return sympy.Integer(v)
    return None


def known_equal(a: Any, b: Any) -> bool:
    """a == b for every value of the shape symbols (no guard installed)."""
    ea, eb = expr(a), expr(b)
    if ea is None or eb is None:
        return False
    if ea == eb:
        return True
    try:
        return sympy.simplify(ea - eb) == 0
    except Exception:  # noqa: BLE001
        return False


def known_int(v: Any) -> int | None:
    """The int value of a dimension when it is static, else None."""
    e = expr(v)
    if e is not None and e.is_Integer:
        return int(e)
    return None


def is_vector_over_last_dim(w: Any, x: Any) -> bool:
    """w is a 1-D tensor whose length is x's last dimension."""
    return (isinstance(w, torch.Tensor) and isinstance(x, torch.Tensor) and w.dim() == 1
            and x.dim() >= 1 and known_equal(w.shape[0], x.shape[-1]))
