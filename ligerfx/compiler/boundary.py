"""Patterns cut in two by a graph boundary: found, and reported as near misses.

A graph break (or DDP's bucket split) between `silu(gate)` and `* up` leaves the first graph
returning `silu(gate)` and the next one starting from it as an input: neither graph holds the
whole pattern, so no structural match exists and, without this, nothing would say why.

Where a pattern's output op is found but the match fails, the pattern is matched again letting a
graph input (a placeholder) stand for a pattern *op*.  That alone would fit almost any input, so
it counts only with evidence that the input was computed by that op in an earlier graph of the
same compiled model: an earlier graph returned a value of that canonical op with the same dtype
and shape (`signature` records what each graph returns, before it is rewritten).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .canonical import INPUT, CNode, View

from ligerfx.graph.nodes import node_value
from .matcher import _State, _match
from ligerfx.graph.symbolic import known_int


def _shape(v) -> tuple:
    # static sizes compare; a symbolic size (named differently in each graph) fits any size
    return tuple(known_int(s) for s in v.shape)


def _fits(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(x is None or y is None or x == y for x, y in zip(a, b))


def signature(view: View, graph: fx.Graph) -> list:
    """(canonical op, dtype, shape) of every tensor a graph returns."""
    out = next((n for n in graph.nodes if n.op == "output"), None)
    if out is None:
        return []
    sig = []
    for a in _flat(out.args):
        if isinstance(a, fx.Node) and a in view:
            c = view[a]
            v = node_value(a)
            if c.op != INPUT and isinstance(v, torch.Tensor):
                sig.append((c.op, v.dtype, _shape(v)))
    return sig


def _flat(x):
    if isinstance(x, (list, tuple)):
        for y in x:
            yield from _flat(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _flat(y)
    else:
        yield x


def _is_parameter(node: fx.Node) -> bool:
    ga = node.meta.get("grapharg")
    return isinstance(getattr(ga, "example", None), torch.nn.Parameter)


# Arithmetic every graph returns values of (residual sums, scaled values): an earlier graph
# returning one of the right dtype and shape says nothing about where an input came from (DDP's
# bucket graphs return several), so a cut made only of these has no evidence.
_COMMON_OPS = frozenset({"add", "sub", "mul", "div", "neg"})


def cut_reason(pattern, variant, anchor: CNode, upstream: list) -> str | None:
    """Why `pattern` is not matched at `anchor` when a graph boundary explains it, else None."""
    if not upstream or len(variant.outputs) != 1:
        return None
    for st in _match(variant.outputs[0], anchor, _State({}, {}, [], [], cuts=[]), pattern,
                     variant):
        if not st.cuts or all(p.op in _COMMON_OPS for p, _ in st.cuts):
            continue
        found = []
        for p, t in st.cuts:
            node = t.nodes[0]
            v = node_value(node)
            if _is_parameter(node) or not isinstance(v, torch.Tensor):
                break
            if not any(op == p.op and dt == v.dtype and _fits(sh, _shape(v))
                       for op, dt, sh in upstream):
                break
            found.append((p.op, node.name))
        else:
            parts = ", ".join(f"`{op}` (reaching this graph as input `{name}`)"
                              for op, name in found)
            return (f"a graph boundary cuts it in two: {parts} was computed in an earlier graph "
                    "(a graph break or DDP's bucket split falls inside the pattern); move the "
                    "break out of it to get the rewrite")
    return None
