"""The rewrite pass: run every enabled pattern over a graph, rewrite what is safe, report the rest.

Patterns run in priority order.  For each pattern and variant, every node whose canonical op is
the pattern's output op is a candidate; a structural match must then pass three checks before it
is rewritten: inputs of the right kind (tensor or scalar), safety (no intermediate value escapes
the subgraph), and the pattern's own constraints.  A failure is recorded as a near miss with its
reason.  Nodes claimed by one rewrite are never matched again in the same round.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.fx as fx

from . import rewriter
from .canonical import View
from .matcher import Match, match_at
from .pattern import REGISTRY, Pattern
from .report import MatchRecord, NearMiss, Report, locate



class Reject(Exception):
    """Raised by a constraint (or returned as a string) to refuse a match with a reason."""


def _kind_problem(match: Match) -> str | None:
    var = match.variant
    for name in var.inputs:
        if name not in match.bindings:
            continue
        b = match.bindings[name]
        v = match.value(name)
        if name in var.scalar_inputs:
            if isinstance(v, torch.Tensor):
                return (f"`{name}` is a tensor here; the fused kernel needs it as a Python number "
                        "(make it a float attribute instead of a tensor)")
        elif not isinstance(v, torch.Tensor):
            what = "a constant" if not isinstance(b, fx.Node) else "not a tensor"
            return f"`{name}` is {what}, the pattern needs a tensor"
    return None


def _run_constraints(match: Match) -> str | None:
    for c in match.pattern.constraints:
        try:
            r = c(match)
        except Reject as e:
            return str(e)
        if isinstance(r, str):
            return r
        if r is False:
            return f"constraint {getattr(c, '__name__', c)} is not met"
    return None


def _candidates(view: View, pattern: Pattern, variant) -> list:
    """Anchor tuples for a variant: one candidate node per pattern output."""
    ops = [o.op for o in variant.outputs]
    by_op: dict[str, list] = {}
    for c in view.cnodes():
        if c.nodes:
            by_op.setdefault(c.op, []).append(c)
    first = by_op.get(ops[0], [])
    if len(ops) == 1:
        return [(c,) for c in reversed(first)]
    # Multi-output patterns (e.g. q and k rotated together): later outputs are searched among
    # nodes of the right op; the shared bindings prune the search quickly.
    import itertools

    rest = [by_op.get(op, []) for op in ops[1:]]
    return [combo for combo in itertools.product(reversed(first), *rest)
            if len({id(c) for c in combo}) == len(combo)]


def run_patterns(gm: fx.GraphModule, patterns: Iterable[Pattern]) -> Report:
    """Rewrite `gm` in place and return the report for this graph."""
    report = Report(graphs=1)
    graph = gm.graph
    claimed: set[fx.Node] = set()
    # The view is built once per pattern; values a rewrite replaced are looked up here so a later
    # match binds to the new node that now computes them.
    replaced: dict[fx.Node, fx.Node] = {}
    seen_misses: set = set()
    position = {n: i for i, n in enumerate(graph.nodes)}
    for pattern in patterns:
        view = View(graph)
        for variant in pattern.variants:
            for anchors in _candidates(view, pattern, variant):
                if any(n in claimed for a in anchors for n in a.nodes):
                    continue
                for match in match_at(pattern, variant, view, list(anchors)):
                    if any(n in claimed for n in match.covered):
                        continue
                    problem = (_kind_problem(match) or match.safety_problem()
                               or _run_constraints(match))
                    if problem is None and not rewriter.can_order(match):
                        problem = "its outputs are used before all of its inputs are computed"
                    if problem is not None:
                        key = (pattern.name, match.tops[0], problem)
                        if key not in seen_misses:
                            seen_misses.add(key)
                            report.near_misses.append(
                                NearMiss(pattern.name, locate(match.tops[0]), problem,
                                         position=position.get(match.tops[0], -1)))
                        continue
                    rec = MatchRecord(pattern.name, locate(match.tops[0]),
                                      [n.name for n in match.covered],
                                      detail=match.detail,
                                      position=position.get(match.tops[0], -1))
                    claimed.update(match.covered)
                    claimed.update(match.outputs)
                    for k, v in match.bindings.items():
                        while isinstance(v, fx.Node) and v in replaced:
                            v = replaced[v]
                        match.bindings[k] = v
                    new = rewriter.apply(match)
                    claimed.update(new)
                    replaced.update(zip(match.outputs, match.replacements))
                    report.matches.append(rec)
                    break
        graph.lint()
    # Report in program order (candidates are scanned from the graph's end).
    report.matches.sort(key=lambda m: m.position)
    report.near_misses.sort(key=lambda m: m.position)
    gm.recompile()
    return report


def enabled_patterns(options) -> list[Pattern]:
    from . import builtins  # noqa: F401 - registers the built-in patterns and plugins

    pats = REGISTRY.ordered()
    if options.patterns is not None:
        pats = [p for p in pats if p.name in options.patterns]
    return [p for p in pats if p.name not in options.exclude]
