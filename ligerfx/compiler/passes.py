"""The rewrite pass: run every enabled pattern over a graph, rewrite what is safe, report the rest.

Patterns run in priority order.  For each pattern and variant, every node whose canonical op is
the pattern's output op is a candidate; a structural match must then pass three checks before it
is rewritten: inputs of the right kind (tensor or scalar), the pattern's own constraints (which
may widen the match), and safety (no intermediate value escapes the subgraph, nothing it reads
is written while it runs: ligerfx/graph/mutation.py).  A failure is
recorded as a near miss with its reason.  Nodes claimed by one rewrite are never matched again.
After the rewrites the registered detectors (detect.py) read the rewritten graph: what looks like
an instance of a family that no rewrite took and no near miss covers is a near miss too.
"""

from __future__ import annotations

import itertools
from typing import Iterable

import torch
import torch.fx as fx

from . import boundary, detect, hop, rewriter
from ligerfx.graph import schedule
from .canonical import INPUT, CNode, View
from .matcher import Match, _match, _State, match_at
from ligerfx.graph.mutation import Memory
from .pattern import Pattern
from .report import MatchRecord, NearMiss, Report
from ligerfx.graph.source import locate


class Reject(Exception):
    """Raised by a constraint (or returned as a string) to refuse a match with a reason."""


class Skip(Exception):
    """Raised by a constraint when the match is simply not this pattern's business (no near miss:
    e.g. a loss with no linear layer above it, which another pattern handles)."""


class Defer(Skip):
    """Raised by a constraint that leaves an instance of its pattern to another pattern (`to`,
    which runs later and reads the same code: the lm head's log-probs with the logits also
    returned, which fused_linear_cross_entropy writes from its pass).  A hand-off is no proof
    that the other pattern takes it: when `to` rewrites no node at the match's anchor, the match
    becomes this pattern's near miss, with `reason` and the other pattern's own reason there
    (else a refusal of `to` would leave this pattern's instance a silent miss)."""

    def __init__(self, to: str, reason: str):
        super().__init__(reason)
        self.to, self.reason = to, reason


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


def _candidates(view: View, pattern: Pattern, variant, claimed=frozenset(), rejected=None):
    """Anchor tuples for a variant: one candidate node per pattern output.  `rejected`, when
    given, receives (anchors, reason) for pairings refused before matching."""
    ops = [o.op for o in variant.outputs]
    by_op: dict[str, list] = {}
    for c in view.cnodes():
        if c.nodes:
            by_op.setdefault(c.op, []).append(c)
    first = by_op.get(ops[0], [])
    if len(ops) == 1:
        return [(c,) for c in reversed(first)]
    return _multi_candidates(view, pattern, variant, first, by_op, claimed, rejected)


def _multi_candidates(view: View, pattern: Pattern, variant, first, by_op, claimed,
                      rejected=None):
    """Anchor tuples of a multi-output pattern (e.g. q and k rotated together), lazily.

    The product of all candidates is quadratic in the graph.  Instead output 0 is matched alone
    first; a later output must then lie within the pattern's reach below every input it shares
    with output 0 (q and k share cos/sin), and no anchor may depend on another (one replacement
    computes them all at once: pairing layer 1's q with layer 2's k could never be ordered).
    The candidates nearest to output 0 in the program come first.
    """
    outs = variant.outputs
    depths = [_input_depths(o) for o in outs]
    users = view.users()
    pos = {n: i for i, n in enumerate(view.graph.nodes)}
    below: dict = {}
    # Outputs computed alike (q and k) would match each node set once per ordering: one will do.
    symmetric = len({_shape_key(o) for o in outs}) == 1
    seen_sets: set = set()
    for c0 in reversed(first):
        if any(n in claimed for n in c0.nodes):
            continue
        states = list(_match(outs[0], c0, _State({}, {}, [], []), pattern, variant))
        if not states:
            continue
        p0 = pos.get(c0.nodes[0], 0)
        lists = []
        for i in range(1, len(outs)):
            shared = [k for k in depths[i] if k in depths[0]]
            found: dict = {}
            for st in states:
                allowed = None
                for name in shared:
                    b = st.bind.get(name)
                    if not isinstance(b, CNode):
                        continue
                    key = (id(b), depths[i][name])
                    if key not in below:
                        # casts the pattern does not spell may sit on the way: some slack
                        below[key] = _reach(b, 2 * depths[i][name] + 4, users)
                    allowed = below[key] if allowed is None else allowed & below[key]
                for c in by_op.get(outs[i].op, []):
                    if c is not c0 and (allowed is None or id(c) in allowed):
                        found[id(c)] = c
            lists.append(sorted(found.values(), key=lambda c: abs(pos.get(c.nodes[0], p0) - p0)))
        for combo in itertools.product(*lists):
            if any(n in claimed for n in c0.nodes):
                break
            anchors = (c0, *combo)
            if symmetric:
                key = frozenset(id(c) for c in anchors)
                if key in seen_sets:
                    continue
                seen_sets.add(key)
                # any order fits: program order (q before k) reads best in reports
                anchors = tuple(sorted(anchors, key=lambda c: pos.get(c.nodes[0], -1)))
            if (len({id(c) for c in anchors}) == len(anchors)
                    and not any(n in claimed for c in combo for n in c.nodes)):
                if not _dependent(anchors, pos):
                    yield anchors
                elif rejected is not None and _same_call(anchors) and all(
                        list(_match(o, a, _State({}, {}, [], []), pattern, variant))
                        for o, a in zip(outs, anchors)):
                    rejected.append((anchors, _dependent_reason(anchors, pos)))


def _input_depths(out: CNode) -> dict:
    """Pattern input name -> longest path (in canonical nodes) from it to `out`."""
    best: dict = {}

    def walk(c, d):
        if isinstance(c, tuple):
            for x in c:
                walk(x, d)
        elif isinstance(c, CNode):
            if c.op == INPUT:
                best[c.node.target] = max(best.get(c.node.target, 0), d)
            else:
                for a in c.args:
                    walk(a, d + 1)

    walk(out, 0)
    return best


def _shape_key(out: CNode):
    """The structure of a pattern output with its inputs numbered by first use."""
    names: dict = {}

    def key(c):
        if isinstance(c, tuple):
            return tuple(key(x) for x in c)
        if isinstance(c, CNode):
            if c.op == INPUT:
                return ("in", names.setdefault(c.node.target, len(names)))
            return (c.op,) + tuple(key(a) for a in c.args)
        return repr(c)

    return key(out)


def _reach(start: CNode, depth: int, users: dict) -> set:
    """ids of canonical nodes at most `depth` uses below `start`."""
    seen, frontier = {id(start)}, [start]
    for _ in range(depth):
        nxt = []
        for c in frontier:
            for u in users.get(id(c), ()):
                if id(u) not in seen:
                    seen.add(id(u))
                    nxt.append(u)
        frontier = nxt
    return seen


def _dependent(anchors, pos: dict) -> bool:
    """Whether one anchor's value flows into another's (fx data flow, bounded by position)."""
    nodes = sorted(((pos.get(a.nodes[0], -1), a) for a in anchors), key=lambda t: t[0])
    for i, (_, a) in enumerate(nodes):
        for limit, b in nodes[i + 1:]:
            targets = set(b.nodes)
            stack, seen = list(a.nodes), set(a.nodes)
            while stack:
                n = stack.pop()
                for u in n.users:
                    if u in targets:
                        return True
                    # nodes added by earlier rewrites have no position: always follow them
                    if u not in seen and pos.get(u, -1) <= limit:
                        seen.add(u)
                        stack.append(u)
    return False


def _same_call(anchors) -> bool:
    # Only a dependence inside one module call is worth a near miss: layer 2's q is always
    # computed from layer 1's, and they were never meant to be rotated together.
    mods = {tuple(c.nodes[0].meta.get("nn_module_stack") or {}) for c in anchors}
    return len(mods) == 1


def _dependent_reason(anchors, pos: dict) -> str:
    a, b = sorted(anchors, key=lambda c: pos.get(c.nodes[0], -1))[:2]
    return (f"its partner `{b.nodes[0].name}` is computed from this output `{a.nodes[0].name}` "
            "(one replacement computes both outputs at once, so neither can wait for the other)")


def run_patterns(gm: fx.GraphModule, patterns: Iterable[Pattern], options=None, *,
                 upstream: list | tuple = (), produced: list | None = None,
                 refuse: dict | None = None, body: str = "") -> Report:
    """Rewrite `gm` in place and return the report for this graph.

    `options` (the backend's Options) is handed to constraints and replacements as
    `match.options`, for patterns whose behaviour an option sets.  `upstream`: what earlier graphs
    of the same compiled model return (`boundary.signature`), to report patterns a graph
    boundary cut in two; `produced`, when given, receives this graph's own signature (taken
    before any rewrite).  `refuse`: {(pattern name, anchor node name): reason} for matches that
    must become near misses with that reason (translation validation found them wrong: the graph
    is rewritten again without them, compiler/validate.py).  The bodies of activation
    checkpointing (and other "call this graph" higher-order ops, compiler/hop.py) are rewritten
    too, with the same patterns and options; `body` is the attribute path of the graph being
    rewritten when it is such a body (recorded in each rewrite's region)."""
    report = Report(graphs=1)
    refuse = refuse or {}
    patterns = list(patterns)
    # taken before any rewrite: the graph with its checkpointed bodies inlined (compiler/hop.py)
    probe = hop.inlined(gm) if not body else None
    # near misses by the nodes their match covered: a later, smaller rewrite of those nodes
    # (q rotated alone after the q/k pair was refused) can say why the larger one was not made
    misses_at: dict[fx.Node, list] = {}
    cut_misses: list = []  # (anchor fx node, NearMiss): kept only if nothing rewrote the anchor
    # (pattern name, anchor) -> (match, Defer): near misses unless the pattern named took them
    deferred: dict = {}
    claimed_by: dict[fx.Node, str] = {}  # node -> the pattern whose rewrite covered it
    graph = gm.graph
    claimed: set[fx.Node] = set()
    # The view is built once per pattern; values a rewrite replaced are looked up here so a later
    # match binds to the new node that now computes them.
    replaced: dict[fx.Node, fx.Node] = {}
    seen_misses: set = set()
    position = {n: i for i, n in enumerate(graph.nodes)}
    memory = None
    for pattern in patterns:
        view = View(graph)
        if produced is not None and not produced:
            produced.extend(boundary.signature(view, graph))
        for variant in pattern.variants:
            rejected: list = []
            for anchors in _candidates(view, pattern, variant, claimed, rejected):
                if any(n in claimed for a in anchors for n in a.nodes):
                    continue
                structural = False
                for match in match_at(pattern, variant, view, list(anchors)):
                    structural = True
                    if any(n in claimed for n in match.covered):
                        continue
                    match.options = options
                    match.earlier_misses = list({id(m): m for n in match.covered
                                                 for m in misses_at.get(n, ())}.values())
                    # Constraints run before the safety check: they may widen the match (a
                    # pattern that absorbs a chain of steps above its anchor), and the safety
                    # check must then cover what they added.
                    # The constraints run even where an input has the wrong kind: one that says
                    # this is no instance of the pattern at all (Skip: add_rms_norm where no add
                    # feeds the norm) leaves the reason to the pattern the match really is.
                    kind = _kind_problem(match)
                    try:
                        problem = _run_constraints(match)
                    except Defer as d:
                        deferred.setdefault((pattern.name, match.tops[0]), (match, d))
                        continue
                    except Skip:
                        continue
                    except Exception:  # noqa: BLE001 - a constraint fed a value of the wrong kind
                        if kind is None:
                            raise
                        problem = None
                    # a look-alike is refused once its constraints did not skip it
                    problem = variant.refuse or kind or problem
                    if problem is None:
                        problem = refuse.get((pattern.name,
                                              anchor_key(body, match.tops[0].name)))
                    if problem is None and any(n in claimed for n in match.covered):
                        continue
                    if problem is None:
                        # Inputs computed by an earlier rewrite now come from its new nodes; the
                        # safety and ordering checks must see those, not the erased ones.
                        for k, v in match.bindings.items():
                            while isinstance(v, fx.Node) and v in replaced:
                                v = replaced[v]
                            match.bindings[k] = v
                        if memory is None:
                            memory = Memory(graph)  # writes and aliases, rebuilt after a rewrite
                        problem = match.safety_problem(memory, rewriter.insertion_point(match))
                    if problem is None and not rewriter.can_order(match):
                        # pure uses of an early output may move below the last input
                        problem = schedule.make_room(match, rewriter.can_order)
                        if problem is None:
                            # the graph was reordered: check writes again at the new place
                            memory = Memory(graph)
                            problem = match.safety_problem(memory,
                                                           rewriter.insertion_point(match))
                    if problem is None:
                        # The replacement's outputs must take the layout of what they replace;
                        # the rewriter restores strides it can and refuses the rest.
                        try:
                            new = rewriter.apply(match)
                        except rewriter.LayoutMismatch as e:
                            problem = str(e)
                    if problem is not None:
                        key = (pattern.name, match.tops[0], problem)
                        if key not in seen_misses:
                            seen_misses.add(key)
                            miss = NearMiss(pattern.name, locate(match.tops[0]), problem,
                                            position=position.get(match.tops[0], -1),
                                            size=len(match.covered))
                            report.near_misses.append(miss)
                            for n in match.covered:
                                misses_at.setdefault(n, []).append(miss)
                        continue
                    rec = MatchRecord(pattern.name, locate(match.tops[0]),
                                      [n.name for n in match.covered],
                                      detail=match.detail,
                                      position=position.get(match.tops[0], -1),
                                      region=_region(match, new, body))
                    claimed.update(match.covered)
                    claimed.update(match.outputs)
                    for n in list(match.covered) + list(match.outputs):
                        claimed_by.setdefault(n, pattern.name)
                    memory = None
                    claimed.update(new)
                    replaced.update(zip(match.outputs, match.replacements))
                    report.matches.append(rec)
                    report.notes.extend(n for n in match.notes if n not in report.notes)
                    break
                if not structural and upstream:
                    anchor = anchors[0].nodes[0]
                    key = (pattern.name, anchor, "boundary")
                    why = None if key in seen_misses else boundary.cut_reason(
                        pattern, variant, anchors[0], upstream)
                    if why is not None:
                        seen_misses.add(key)
                        cut_misses.append((anchor, NearMiss(pattern.name, locate(anchor), why,
                                                            position=position.get(anchor, -1))))
            for anchors, why in rejected:
                top = anchors[0].nodes[0]
                if (pattern.name, top, why) in seen_misses or any(
                        n in claimed for a in anchors for n in a.nodes):
                    continue
                seen_misses.add((pattern.name, top, why))
                miss = NearMiss(pattern.name, locate(top), why, position=position.get(top, -1))
                report.near_misses.append(miss)
                for a in anchors:
                    for n in a.covers:
                        misses_at.setdefault(n, []).append(miss)
        graph.lint()
    report.near_misses.extend(m for a, m in cut_misses if a not in claimed)
    for (name, top), (match, d) in deferred.items():
        if claimed_by.get(top) == d.to:
            continue  # the pattern it was left to took it
        theirs = [m.reason for m in misses_at.get(top, ()) if m.pattern == d.to]
        why = (f"{d.reason}; {d.to} refused it: {theirs[0]}" if theirs else
               f"{d.reason}; {d.to} did not rewrite it")
        miss = NearMiss(name, locate(top), why, position=position.get(top, -1),
                        size=len(match.covered))
        report.near_misses.append(miss)
        for n in match.covered:
            misses_at.setdefault(n, []).append(miss)
    # Detectors: a subgraph that looks like a family's instance but that no pattern rewrote or
    # reported gets a near miss of its own (compiler/detect.py); it runs on the rewritten graph.
    missed = set(misses_at) | {a for a, _ in cut_misses}
    report.near_misses.extend(detect.run_detectors(graph, [p.name for p in patterns], claimed,
                                                   missed, position))
    _search_bodies(gm, patterns, options, report, refuse, position, body)
    if probe is not None:
        report.near_misses.extend(_across_bodies(probe, patterns, options, position))
    report.near_misses = _one_per_cause(report.near_misses)
    # Report in program order (candidates are scanned from the graph's end).
    report.matches.sort(key=lambda m: m.position)
    report.near_misses.sort(key=lambda m: m.position)
    gm.recompile()
    return report


def anchor_key(body: str, anchor: str) -> str:
    """A rewrite's anchor as `refuse` names it: node names repeat from one body to the next."""
    return f"{body}:{anchor}" if body else anchor


def _search_bodies(gm: fx.GraphModule, patterns: list, options, report: Report, refuse: dict,
                   position: dict, prefix: str) -> None:
    """Rewrite the bodies of the "call this graph" higher-order ops of `gm` in place (their
    rewrites and near misses join `report`, placed at the op's call), and report what the patterns
    would rewrite in any other higher-order op's body as near misses naming the op."""
    from .validate import copy_graph

    for node in list(gm.graph.nodes):
        name = hop.hop_name(node)
        if name is None:
            continue
        for target, sub in hop.bodies(gm, node):
            path = f"{prefix}.{target}" if prefix else target
            where = position.get(node, -1)
            if hop.runs_body(node):
                inner = run_patterns(sub, patterns, options, refuse=refuse, body=path)
                for m in inner.matches:
                    m.position = where
                    # node names repeat from body to body and in the outer graph: qualified
                    m.nodes = [f"{target}/{n}" for n in m.nodes]
                    report.matches.append(m)
                for m in inner.near_misses:
                    m.position = where
                    report.near_misses.append(m)
                report.notes.extend(n for n in inner.notes if n not in report.notes)
                continue
            # Any other op: search a copy, rewrite nothing, say what would have been rewritten.
            probe = fx.GraphModule(sub, copy_graph(sub.graph))
            try:
                inner = run_patterns(probe, patterns, options, body=path)
            except Exception as e:  # noqa: BLE001 - the body is not ours to run: say so
                report.near_misses.append(NearMiss(
                    f"({name})", locate(node), f"the body `{target}` of {name} was not searched "
                    f"for patterns ({type(e).__name__}: {str(e)[:200]})", position=where))
                continue
            why = (f"inside the body `{target}` of {name}, which ligerfx does not rewrite (only "
                   "activation checkpointing's and Dynamo's plain wrap bodies are run as "
                   "ordinary code; this op gives its body another meaning)")
            for m in inner.matches:
                report.near_misses.append(NearMiss(m.pattern, m.location, why, position=where,
                                                   size=len(m.nodes)))
            for m in inner.near_misses:
                report.near_misses.append(NearMiss(m.pattern, m.location,
                                                   f"{m.reason} (and it is {why})",
                                                   position=where, size=m.size))


def _across_bodies(probe, patterns: list, options, position: dict) -> list:
    """Near misses for what the patterns rewrite in `probe` (the graph with its "call this graph"
    bodies inlined, `hop.inlined`) with nodes on both sides of a body's boundary: a rewrite
    replaces nodes of one graph, so those are left as they are (a part on one side may still be
    rewritten there on its own: the norm inside a checkpointed layer without the residual add
    outside it)."""
    copy, origin, calls = probe
    try:
        found = run_patterns(copy, patterns, options, body="(bodies inlined)")
    except Exception:  # noqa: BLE001 - a look only: a probe that fails reports nothing
        return []
    by_name = {n.name: n for n in position}
    out = []
    for m in found.matches:
        sides = sorted({origin.get(n, "") for n in m.nodes})
        if len(sides) < 2:
            continue
        call = next((calls[s] for s in sides if s in calls), None)

        def named(side: str) -> str:
            if not side:
                return "the outer graph"
            op = hop.hop_name(by_name[calls[side]]) if calls.get(side) in by_name else None
            return f"the body `{side}`" + (f" of {op}" if op else "")

        out.append(NearMiss(m.pattern, m.location,
                            f"its nodes lie on both sides of a body's boundary ({' and '.join(map(named, sides))}): "
                            "a rewrite replaces the nodes of one graph, so the part on each side "
                            "is left to that side's patterns (move the boundary, e.g. the "
                            "checkpointed function, to take the whole of it)",
                            position=position.get(by_name.get(call), -1), size=len(m.nodes)))
    return out


def _region(match: Match, new: list, body: str = "") -> dict:
    """What a rewrite replaced, by node name (names survive a deep copy of the graph): its anchor
    (which identifies the match for `refuse`), the nodes it covered and the outputs it took over
    (all nodes of the graph before any rewrite), the nodes that now compute them, and the
    outputs it deliberately does not compute (`Match.dropped`: output name -> why)."""
    return {"anchor": match.tops[0].name,
            "covered": [n.name for n in match.covered],
            "outputs": [n.name for n in match.outputs],
            "replacements": [r.name if isinstance(r, fx.Node) else None
                             for r in match.replacements],
            "new": [n.name for n in new],
            "body": body,  # attribute path of the higher-order op body it is in, or ""
            "dropped": {match.outputs[i].name: why for i, why in match.dropped.items()}}


def _one_per_cause(misses: list) -> list:
    """One near miss per place and reason: where several patterns (add_rms_norm and rms_norm)
    or several spellings of one (the norm with and without its weight) were refused at the same
    code for the same reason, the one whose match covered the most is kept."""
    best: dict = {}
    for m in misses:
        key = (str(m.location), m.reason)
        if key not in best or m.size > best[key].size:
            best[key] = m
    return [m for m in misses if best[(str(m.location), m.reason)] is m]
