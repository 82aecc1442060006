"""Replace a checked match in the graph with its pattern's replacement, traced in place.

The replacement function is called on fx Proxies of the bound inputs, so whatever torch code it
runs (usually one `torch.ops.liger.*` call) is recorded as new nodes right where the pattern's
output was.  New nodes get fake example values (later passes and inductor read them) and the
source metadata of the node they replace (so reports still point at the user's code).  Each
output must be drop-in for the value it replaces: same shape, dtype, device and strides; strides
are restored by a restride when needed (`drop_in`), and a rewrite that cannot be made drop-in is
refused (LayoutMismatch) with the graph left unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch.fx.proxy import GraphAppendingTracer, Proxy

from ligerfx.graph import grad_mode, layout
from ligerfx.graph.nodes import node_value
from .matcher import Match
from .pattern import call_replacement

_KEEP_META = ("stack_trace", "nn_module_stack", "source_fn_stack")
PATTERN_META = "ligerfx_pattern"  # node.meta key: the pattern whose rewrite created the node


class ValueProxy(Proxy):
    """A Proxy that also answers dtype/shape/device questions from the node's example value,
    so replacement functions can be written like eager code (`x.dtype`, `x.shape[-1]`)."""

    def _val(self):
        return node_value(self.node)

    @property
    def dtype(self):
        return self._val().dtype

    @property
    def device(self):
        return self._val().device

    @property
    def shape(self):
        return self._val().shape

    @property
    def ndim(self):
        return self._val().dim()

    def dim(self):
        return self._val().dim()

    def size(self, d=None):
        s = self._val().shape
        return s if d is None else s[d]


def _fake_mode(values) -> Any:
    """The fake mode the example values live in (the values' own, not the ambient one)."""
    for v in values:
        mode = getattr(v, "fake_mode", None)
        if mode is not None:
            return mode
    return None


def insertion_point(match: Match) -> fx.Node | None:
    """A node before which every replacement output can be computed, or None if none exists."""
    order = {n: i for i, n in enumerate(match.graph.nodes)}
    if len(match.tops) == 1:
        return match.tops[0]
    inputs = [b for b in match.bindings.values() if isinstance(b, fx.Node)]
    last_input = max((order[b] for b in inputs), default=-1)
    covered = set(match.covered)
    first_use = min((order[u] for o in match.outputs for u in o.users if u not in covered),
                    default=len(order))
    # Insert right after the last input, provided no output is consumed before that.
    nodes = list(match.graph.nodes)
    if last_input + 1 > first_use:
        return None
    return nodes[last_input + 1]


class LayoutMismatch(Exception):
    """The replacement cannot give an output the layout of the value it replaces (the rewrite is
    refused with this reason; the graph is left as it was)."""


def apply(match: Match) -> list[fx.Node]:
    """Rewrite the graph; returns the new nodes.  The match must already be checked.

    Raises LayoutMismatch (graph unchanged) when an output cannot be made drop-in."""
    graph = match.graph
    where = insertion_point(match)
    if where is None:
        raise RuntimeError("no insertion point")  # callers check `can_order` first
    before = set(graph.nodes)
    tracer = GraphAppendingTracer(graph)
    _, detach = grad_mode.plan(match, where)
    with graph.inserting_before(where):
        # inputs read only inside a `no_grad()` block of the match are constants to the op
        # (ligerfx/graph/grad_mode.py): pass them detached, as that block saw them
        values = {k: (_detached(graph, v) if v in detach else v) for k, v in match.bindings.items()}
    bound = {k: (ValueProxy(v, tracer) if isinstance(v, fx.Node) else v) for k, v in values.items()}
    with graph.inserting_before(where):
        out = call_replacement(match.pattern, match.variant, bound, match)
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    new_nodes = [n for n in graph.nodes if n not in before]
    _propagate_meta(graph, new_nodes, match)
    outs = [new.node if isinstance(new, Proxy) else new for new in outs]
    try:
        with graph.inserting_before(where):
            outs = [drop_in(graph, old, new, match) for old, new in zip(match.outputs, outs)]
    except LayoutMismatch:
        for n in reversed([n for n in graph.nodes if n not in before]):
            graph.erase_node(n)
        raise
    new_nodes = [n for n in graph.nodes if n not in before]
    for n in new_nodes:
        n.meta[PATTERN_META] = match.pattern.name
    match.replacements = []
    for old, new_node in zip(match.outputs, outs):
        old.replace_all_uses_with(new_node)
        match.replacements.append(new_node)
    for n in reversed(list(graph.nodes)):
        if n in set(match.covered) and not n.users:
            graph.erase_node(n)
    return new_nodes


def _detached(graph: fx.Graph, node: fx.Node) -> fx.Node:
    d = graph.call_method("detach", (node,))
    value = node_value(node)
    if isinstance(value, torch.Tensor):
        d.meta["example_value"] = value.detach()
    return d


def can_order(match: Match) -> bool:
    return insertion_point(match) is not None


def _propagate_meta(graph: fx.Graph, nodes: list[fx.Node], match: Match) -> None:
    src = match.tops[0]
    bound = [node_value(b) for b in match.bindings.values() if isinstance(b, fx.Node)]
    mode = _fake_mode(bound)
    for n in nodes:
        for k in _KEEP_META:
            if k in src.meta and k not in n.meta:
                n.meta[k] = src.meta[k]
        if mode is None or n.op not in ("call_function", "call_method"):
            continue

        def val(a: Any):
            return node_value(a) if isinstance(a, fx.Node) else a

        args = fx.node.map_aggregate(n.args, val)
        kwargs = fx.node.map_aggregate(n.kwargs, val)
        fn = n.target if n.op == "call_function" else getattr(type(args[0]), n.target, None)
        try:
            with mode:
                n.meta["example_value"] = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - metadata is best effort; the graph is still valid
            import logging
            logging.getLogger("ligerfx").debug("no example value for %s: %s", n, e)


def drop_in(graph: fx.Graph, old: fx.Node, new: fx.Node, match: Match) -> fx.Node:
    """`new`, or nodes restriding it, so that it has the layout of `old` (ligerfx/graph/layout.py);
    raises LayoutMismatch when that cannot be done."""
    if not isinstance(new, fx.Node):  # a constant the pattern chose (skip_logits' empty logits)
        return new
    vo, vn = node_value(old), node_value(new)
    if not isinstance(vo, torch.Tensor) or not isinstance(vn, torch.Tensor):
        return new
    try:
        order = layout.restride_plan(vo, vn)
    except ValueError as e:
        raise LayoutMismatch(f"output `{old.name}`: {e}") from None
    if order is None:
        return new
    if order == list(range(vo.dim())):
        nodes = [graph.call_method("contiguous", (new,))]
    else:
        inverse = sorted(range(len(order)), key=order.__getitem__)
        p = graph.call_method("permute", (new, *order))
        c = graph.call_method("contiguous", (p,))
        nodes = [p, c, graph.call_method("permute", (c, *inverse))]
    _propagate_meta(graph, nodes, match)
    vr = node_value(nodes[-1])
    if not isinstance(vr, torch.Tensor) or not layout.same_strides(vo, vr):
        raise LayoutMismatch(f"output `{old.name}`: its strides {tuple(vo.stride())} could not be "
                             "restored on the fused op's output")
    return nodes[-1]
