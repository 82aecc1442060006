"""Structural matching of a traced pattern against the canonical view of a graph.

Matching starts at a candidate output node and walks the pattern's arguments upward.  Placeholders
bind to whatever value sits there (the same placeholder must bind to the same value everywhere);
`add` and `mul` are tried in both argument orders; identity casts are always looked through, and
real casts too when the pattern allows casts (its constraints then judge the dtypes).  A structural
match is then checked for safety (`Match.safety_problem`: no escaping intermediate, no write to
what it reads while it runs) and by the pattern's constraints; a failure there is a near miss with
a reason, never a rewrite.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.fx as fx

from .canonical import CAST, COMMUTATIVE, INPUT, CNode, View

from ligerfx.graph.nodes import node_value
from .pattern import Pattern, TracedVariant
from ligerfx.graph.precision import is_free_cast, shared_cast_problem


@dataclass
class _State:
    bind: dict  # placeholder name -> CNode or constant
    pmap: dict  # id(pattern CNode) -> target CNode
    covered: list  # fx nodes the match replaces (internal nodes and the output)
    casts: list  # real cast fx nodes looked through inside the match
    # (pattern CNode, graph input CNode) where a graph input stands for a pattern op; only a
    # matcher asked to look for graph boundaries (ligerfx/compiler/boundary.py) sets a list here
    cuts: list | None = None

    def copy(self) -> "_State":
        return _State(dict(self.bind), dict(self.pmap), list(self.covered), list(self.casts),
                      None if self.cuts is None else list(self.cuts))


def _strip(t: CNode, allow_casts: bool, st: _State, record: bool) -> CNode:
    while isinstance(t, CNode) and t.op == CAST and (t.identity or allow_casts):
        if record:
            st.covered.extend(n for n in t.covers if n not in st.covered)
            if not t.identity:
                st.casts.extend(t.nodes)
        t = t.args[0]
    return t


def _strip_free(t: CNode, allow_casts: bool) -> CNode:
    """`t` with identity casts stripped, and real casts too (where allowed) while each preserves
    every value of its input (precision.is_free_cast)."""
    while isinstance(t, CNode) and t.op == CAST and (t.identity or (allow_casts and is_free_cast(
            getattr(t.args[0].value, "dtype", None), t.args[1]))):
        t = t.args[0]
    return t


def _same_const(p: Any, t: Any) -> bool:
    if isinstance(p, tuple) or isinstance(t, tuple):
        return (isinstance(p, tuple) and isinstance(t, tuple) and len(p) == len(t)
                and all(_same_const(a, b) for a, b in zip(p, t)))
    if isinstance(t, CNode) or isinstance(p, CNode):
        return False
    if isinstance(t, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return False
    if type(p) is bool or type(t) is bool:
        return type(p) is type(t) and p == t
    return p == t


def _match(p: Any, t: Any, st: _State, pat: Pattern, var: TracedVariant) -> Iterator[_State]:
    if isinstance(p, CNode) and p.op == INPUT:
        name = p.node.target
        if name in var.scalar_inputs:
            val = t
        else:
            if not isinstance(t, CNode):
                return
            # Casts between a tensor input and its uses stay in the graph (they are outside the
            # match).  The input binds to the value before the free (widening) ones, which the
            # kernels reproduce by computing in fp32, but after any lossy one: the kernel must read
            # the rounded value eager reads (`h.to(bf16).to(h.dtype)`), not the value before it.
            val = _strip_free(t, pat.allow_casts)
            if not val.nodes:  # a value the view synthesised has no graph node to hand over
                return
        if name in st.bind:
            old = st.bind[name]
            if old is val or (not isinstance(val, CNode) and _same_const(old, val)):
                yield st
            elif name not in var.scalar_inputs and _strip(old, pat.allow_casts, st, False) is (
                    src := _strip(val, pat.allow_casts, st, False)) and src.nodes:
                # the uses see one input cast differently: bind the value before all the casts,
                # so the constraints see every chain and refuse with the reason (not a silent miss)
                st = st.copy()
                st.bind[name] = src
                yield st
            return
        st = st.copy()
        st.bind[name] = val
        yield st
        return
    if not isinstance(p, CNode):
        if _same_const(p, t):
            yield st
        return
    if not isinstance(t, CNode):
        return
    st = st.copy()
    t = _strip(t, pat.allow_casts, st, record=True)
    if t.op != p.op or len(t.args) != len(p.args):
        if st.cuts is not None and t.op == INPUT and t.nodes and t.nodes[0].op == "placeholder":
            st.cuts.append((p, t))
            yield st
        return
    prev = st.pmap.get(id(p))
    if prev is not None:
        if prev is t:
            yield st
        return
    st.pmap[id(p)] = t
    st.covered.extend(n for n in t.covers if n not in st.covered)
    orders = [t.args]
    if p.op in COMMUTATIVE and len(t.args) == 2:
        orders.append((t.args[1], t.args[0]))
    for targs in orders:
        yield from _match_args(list(p.args), list(targs), st, pat, var)


def _match_args(ps: list, ts: list, st: _State, pat: Pattern, var: TracedVariant):
    if not ps:
        yield st
        return
    pa, ta = ps[0], ts[0]
    if isinstance(pa, tuple) and isinstance(ta, tuple) and len(pa) == len(ta) and not all(
            not isinstance(x, CNode) for x in pa + ta):
        # Tuples holding nodes (cat inputs, shapes with symbols): match element-wise.
        for s in _match_args(list(pa), list(ta), st, pat, var):
            yield from _match_args(ps[1:], ts[1:], s, pat, var)
        return
    for s in _match(pa, ta, st, pat, var):
        yield from _match_args(ps[1:], ts[1:], s, pat, var)


@dataclass(eq=False)
class Match:
    """A structural match: what a pattern's inputs bound to and which nodes it would replace."""

    pattern: Pattern
    variant: TracedVariant
    graph: fx.Graph
    bindings: dict  # parameter name -> fx.Node or constant
    outputs: list  # fx nodes whose uses the replacement takes over (after trailing casts)
    tops: list  # the fx nodes computing each pattern output before trailing casts
    covered: list  # every fx node the rewrite makes dead
    casts: list  # real casts looked through (inside the match or trailing)
    pmap: dict = field(default_factory=dict)
    detail: str = ""  # constraints may note what they decided (e.g. a casting mode)
    params: dict = field(default_factory=dict)  # decisions constraints hand to the replacement
    replacements: list = field(default_factory=list)  # the new nodes, once rewritten
    notes: list = field(default_factory=list)  # statements for the report (e.g. a dropped output)
    # outputs the replacement deliberately does not compute, by index into `outputs`, with why
    # (an option's contract: skip_logits' empty logits); translation validation does not compare
    # them (nor send a gradient through them) and says so in its record
    dropped: dict = field(default_factory=dict)
    options: Any = None  # the backend's Options, for patterns whose behaviour an option sets
    # near misses of patterns tried earlier on nodes this match covers (set by the pass)
    earlier_misses: list = field(default_factory=list)

    # -- helpers for constraints and replacements -------------------------------------------
    def __getitem__(self, name: str) -> Any:
        return self.bindings[name]

    def value(self, name: str) -> Any:
        """Example value (fake tensor, symbolic or constant scalar) of a bound input."""
        b = self.bindings[name]
        return node_value(b) if isinstance(b, fx.Node) else b

    def resolved(self, name: str) -> Any:
        """A bound argument with every graph value in it (fx node or canonical node, also inside
        a tuple such as `normalized_shape=(x.shape[-1],)` under dynamic shapes) replaced by its
        example value, so constraints compare sizes symbolically."""
        def go(b):
            if isinstance(b, fx.Node):
                return node_value(b)
            if isinstance(b, CNode):
                return b.value
            if isinstance(b, (tuple, list)):
                return type(b)(go(x) for x in b)
            return b
        return go(self.bindings[name])

    def out_value(self, i: int = 0) -> Any:
        return node_value(self.outputs[i])

    @property
    def out_dtype(self):
        return getattr(self.out_value(0), "dtype", None)

    def nodes_of(self, op: str) -> list[fx.Node]:
        """Graph nodes matched to pattern nodes with canonical op `op` (pattern order)."""
        out = []
        for pc in self.variant.view.cnodes():
            t = self.pmap.get(id(pc))
            if pc.op == op and t is not None and t.node is not None:
                out.append(t.node)
        return out

    def safety_problem(self, memory=None, where: fx.Node | None = None) -> str | None:
        """Why replacing the covered nodes (by a replacement inserted before `where`) would change
        the program, or None: an intermediate that escapes, or a write to memory the match reads
        while it runs (ligerfx/graph/mutation.py; `memory` is the graph's `mutation.Memory`)."""
        inside = set(self.covered)
        outs = set(self.outputs)
        for n in self.covered:
            if n in outs:
                continue
            for u in n.users:
                if u not in inside:
                    where = "a graph output" if u.op == "output" else f"`{u.name}`"
                    return (f"intermediate value `{n.name}` is also used by {where} outside the "
                            "pattern, so the subgraph cannot be replaced")
        problem = shared_cast_problem(self)
        if problem:
            return problem
        from ligerfx.graph import mutation  # (mutation imports the canonical view, as this module does)

        return mutation.match_problem(self, where, memory or mutation.Memory(self.graph))


def _absorb_trailing_casts(node: fx.Node, view: View, allow_casts: bool, covered: list,
                           casts: list) -> fx.Node:
    while len(node.users) == 1:
        (u,) = node.users
        if u not in view:
            break
        c = view[u]
        if c.op != CAST or u not in c.nodes or not (c.identity or allow_casts):
            break
        covered.append(u)
        if not c.identity:
            casts.append(u)
        node = u
    return node


def _spent_splits(covered: list) -> list:
    """Tuple-valued nodes (`chunk`, `split`, `unbind`) that read a covered node and whose every
    piece is covered: the view reads the pieces as slices / selects of the covered value, so the
    tuple dies with them (and must, or it would keep the covered value alive)."""
    inside, out = set(covered), []
    for n in covered:
        for u in n.users:
            if (u in inside or u in out or not isinstance(node_value(u), (tuple, list))
                    or not u.users):
                continue
            if all(w in inside and w.op == "call_function" and w.target is operator.getitem
                   for w in u.users):
                out.append(u)
    return out


def match_at(pat: Pattern, var: TracedVariant, view: View, anchors: list[CNode]) -> Iterator[Match]:
    """All structural matches of `var` whose outputs are computed by `anchors` (one per output)."""
    st0 = _State({}, {}, [], [])

    def go(i: int, st: _State):
        if i == len(anchors):
            yield st
            return
        a = anchors[i]
        p = var.outputs[i]
        if a.op != p.op or not a.nodes:
            return
        for s in _match(p, a, st, pat, var):
            yield from go(i + 1, s)

    for st in go(0, st0):
        tops, outs, covered, casts = [], [], list(st.covered), list(st.casts)
        for a in anchors:
            top = a.nodes[0]
            tops.append(top)
            outs.append(_absorb_trailing_casts(top, view, pat.allow_casts, covered, casts))
        covered += _spent_splits(covered)
        bindings = {k: (v.node if isinstance(v, CNode) else v) for k, v in st.bind.items()}
        yield Match(pat, var, view.graph, bindings, outs, tops, covered, casts, st.pmap)
