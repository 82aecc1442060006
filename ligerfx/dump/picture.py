"""The graph model behind the dump's picture: nodes, module groups, rewritten regions, near misses.

`build(dump, i)` turns captured graph `i` (before the rewrite) into a `GraphModel`:

- `graph`: a networkx DiGraph with one vertex per fx node (by name), edges along data flow;
- `groups`: a tree of module paths (`model.layers.3.mlp` inside `model.layers.3` inside ...)
  read from `nn_module_stack`; each group's direct children (sub-groups and nodes) are laid out in
  layers (networkx topological generations of the group's quotient graph), so a picture can show
  any group collapsed to one box or expanded in place without laying anything out again;
- `regions`: each rewrite (the nodes it replaced, its pattern, the `liger::` kernel that replaced
  it, its source line) and each near miss (its anchor node and reason);
- `summary()`: per pattern, rewrites and the share of the graph's FLOPs / bytes they cover
  (`cost.node_cost`).

Renderers (svg.py, html.py) only draw this model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx as fx

from ligerfx.graph.nodes import op_name
from .cost import node_cost
from ligerfx.graph.source import Location, locate
from ligerfx.compiler.rewriter import PATTERN_META

REWRITE, NEAR_MISS = "rewrite", "near_miss"


@dataclass
class Region:
    kind: str  # REWRITE or NEAR_MISS
    pattern: str
    nodes: list  # before-graph node names: those replaced, or the near miss's anchor
    location: Location
    kernel: str = ""  # the ops that replaced it, e.g. liger::rms_norm
    detail: str = ""
    reason: str = ""  # why a near miss was not rewritten


@dataclass
class Group:
    path: str  # module path; "" is the graph's top level
    parent: str | None
    layers: list = field(default_factory=list)  # unit ids per layer ("g:PATH" / "n:NAME")
    size: int = 0  # fx nodes inside, at any depth
    regions: set = field(default_factory=set)  # indices of regions with a node inside

    @property
    def children(self) -> list:
        return [u for layer in self.layers for u in layer]


@dataclass
class GraphModel:
    index: int
    graph: nx.DiGraph
    groups: dict  # path -> Group
    regions: list

    def node_regions(self, name: str) -> list:
        return [self.regions[i] for i in self.graph.nodes[name]["regions"]]

    def group_of(self, name: str) -> str:
        return self.graph.nodes[name]["group"]

    def ancestors(self, path: str) -> list:
        """The group paths from the top level down to `path` (inclusive)."""
        chain = []
        while path is not None:
            chain.append(path)
            path = self.groups[path].parent
        return chain[::-1]

    def group_regions(self, path: str) -> list:
        """Indices of the regions with at least one node inside group `path`."""
        return sorted(self.groups[path].regions)

    def summary(self) -> dict:
        """{pattern: {rewrites, near_misses, kernel, nodes, flops, bytes}} plus "_total"."""
        g = self.graph
        total_f = sum(a["flops"] for _, a in g.nodes(data=True))
        total_b = sum(a["bytes"] for _, a in g.nodes(data=True))
        rows: dict = {}
        fused: set = set()
        for r in self.regions:
            row = rows.setdefault(r.pattern, dict(rewrites=0, near_misses=0, kernel="", nodes=0,
                                                  flops=0, bytes=0))
            if r.kind == NEAR_MISS:
                row["near_misses"] += 1
                continue
            row["rewrites"] += 1
            row["kernel"] = row["kernel"] or r.kernel
            new = [n for n in r.nodes if n not in fused]
            fused.update(new)
            row["nodes"] += len(new)
            row["flops"] += sum(g.nodes[n]["flops"] for n in new)
            row["bytes"] += sum(g.nodes[n]["bytes"] for n in new)
        rows["_total"] = dict(
            rewrites=sum(r["rewrites"] for r in rows.values()),
            near_misses=sum(r["near_misses"] for r in rows.values()), kernel="",
            nodes=len(fused), flops=sum(g.nodes[n]["flops"] for n in fused),
            bytes=sum(g.nodes[n]["bytes"] for n in fused),
            graph_nodes=g.number_of_nodes(), graph_flops=total_f, graph_bytes=total_b)
        return rows


def _describe(v) -> tuple[str, str]:
    if isinstance(v, torch.Tensor):
        return "[" + ", ".join(str(s) for s in v.shape) + "]", str(v.dtype).replace("torch.", "")
    if isinstance(v, (tuple, list)):
        parts = [_describe(x) for x in v if isinstance(x, torch.Tensor)]
        return " ".join(p[0] for p in parts[:3]) + (" ..." if len(parts) > 3 else ""), ""
    return ("" if v is None else type(v).__name__), ""


def _short_op(node: fx.Node) -> str:
    name = op_name(node)
    if name.startswith("liger."):
        return "liger::" + name.split(".")[1]
    if node.op in ("placeholder", "output", "get_attr"):
        return node.op
    return name.rsplit(".", 1)[-1]


def kernels(after: fx.GraphModule) -> dict:
    """{pattern: "liger::op, ..."}: the ops each pattern's rewrites put into the rewritten graph
    (the `liger::` ops when there are any, else every op its replacement traced)."""
    ops: dict = {}
    for n in after.graph.nodes:
        pat = n.meta.get(PATTERN_META)
        if pat and n.op == "call_function":
            ops.setdefault(pat, []).append(_short_op(n))
    out = {}
    for pat, names in ops.items():
        liger = [x for x in names if x.startswith("liger::")]
        keep = liger or [x for x in names if x not in ("getitem", "squeeze", "unsqueeze")] or names
        out[pat] = ", ".join(dict.fromkeys(keep))
    return out


def _anchor(nm, order: list, locs: dict) -> list:
    """The before-graph node a near miss points at.  Its position indexes the graph the pass
    saw, which is the graph before the rewrite for the patterns but not for a later pass (the
    quantization pass runs on the rewritten graph), so the node there is taken only if it comes
    from the near miss's module and source line; else the nearest node that does; else none."""
    want = (nm.location.module, nm.location.file, nm.location.line)

    def same(n) -> bool:
        loc = locs[n.name]
        return (loc.module, loc.file, loc.line) == want

    if 0 <= nm.position < len(order) and same(order[nm.position]):
        return [order[nm.position].name]
    hits = [i for i, n in enumerate(order) if same(n)]
    if not hits:
        return []
    return [order[min(hits, key=lambda i: abs(i - nm.position))].name]


def _regions(dump, index: int, before: fx.GraphModule, locs: dict) -> list:
    after = dump.after[index] if index < len(dump.after) else None
    kern = kernels(after) if after is not None else {}
    order = list(before.graph.nodes)
    regions = []
    for m in dump.report.matches:
        if m.graph == index:
            regions.append(Region(REWRITE, m.pattern, [n for n in m.nodes if n in locs],
                                  m.location, kernel=kern.get(m.pattern, ""), detail=m.detail))
    for nm in dump.report.near_misses:
        if nm.graph != index:
            continue
        anchor = [n for n in (getattr(nm, "nodes", None) or []) if n in locs]
        regions.append(Region(NEAR_MISS, nm.pattern, anchor or _anchor(nm, order, locs),
                              nm.location, reason=nm.reason))
    return regions


def _layers(units: list, edges: set, first: dict) -> list:
    """Layers of a group's children: topological generations of the quotient graph (edges that
    run against program order, which only a cycle through another group makes, are dropped),
    with each source moved down to just above its first consumer and each layer ordered by the
    mean position of its predecessors (fewer crossings)."""
    q = nx.DiGraph()
    q.add_nodes_from(units)
    q.add_edges_from((a, b) for a, b in edges if first[a] < first[b])
    layer = {}
    for i, gen in enumerate(nx.topological_generations(q)):
        for u in gen:
            layer[u] = i
    for u in units:
        if q.in_degree(u) == 0 and q.out_degree(u):
            layer[u] = min(layer[v] for v in q.successors(u)) - 1
    if units:
        low = min(layer.values())
        layer = {u: v - low for u, v in layer.items()}
    rows = [[] for _ in range(max(layer.values(), default=-1) + 1)]
    for u in sorted(units, key=first.get):
        rows[layer[u]].append(u)
    pos: dict = {}
    for row in rows:
        def bary(u):
            ps = [pos[p] for p in q.predecessors(u) if p in pos]
            return sum(ps) / len(ps) if ps else float(first[u])
        if any(pos.get(p) is not None for u in row for p in q.predecessors(u)):
            row.sort(key=lambda u: (bary(u), first[u]))
        for i, u in enumerate(row):
            pos[u] = i
    return rows


def build(dump, index: int = 0) -> GraphModel:
    """The graph model of captured graph `index` of a `dump.Dump`."""
    before = dump.before[index]
    g = nx.DiGraph()
    for i, n in enumerate(before.graph.nodes):
        loc = locate(n)
        shape, dtype = _describe(n.meta.get("example_value", n.meta.get("val")))
        flops, nbytes = node_cost(n)
        g.add_node(n.name, order=i, op=n.op, label=_short_op(n), target=op_name(n),
                   group=loc.module, location=loc, shape=shape, dtype=dtype, flops=flops,
                   bytes=nbytes, regions=[])
        for a in n.all_input_nodes:
            g.add_edge(a.name, n.name)
    regions = _regions(dump, index, before, {n: a["location"] for n, a in g.nodes(data=True)})
    for i, r in enumerate(regions):
        for n in r.nodes:
            g.nodes[n]["regions"].append(i)

    groups: dict = {"": Group("", None)}
    for _, a in g.nodes(data=True):
        path = a["group"]
        parts = path.split(".") if path else []
        for k in range(1, len(parts) + 1):
            p = ".".join(parts[:k])
            groups.setdefault(p, Group(p, ".".join(parts[:k - 1])))

    def chain(name: str) -> list:
        path = g.nodes[name]["group"]
        parts = path.split(".") if path else []
        return [""] + [".".join(parts[:k]) for k in range(1, len(parts) + 1)]

    chains = {n: chain(n) for n in g.nodes}
    units: dict = {p: set() for p in groups}
    first: dict = {}
    for n, ch in chains.items():
        o = g.nodes[n]["order"]
        for depth, p in enumerate(ch):
            groups[p].size += 1
            groups[p].regions.update(g.nodes[n]["regions"])
            unit = "g:" + ch[depth + 1] if depth + 1 < len(ch) else "n:" + n
            units[p].add(unit)
            first[unit] = min(first.get(unit, o), o)
    qedges: dict = {p: set() for p in groups}
    for u, v in g.edges:
        cu, cv = chains[u], chains[v]
        k = 0
        while k < min(len(cu), len(cv)) and cu[k] == cv[k]:
            k += 1
        parent = cu[k - 1]
        a = "g:" + cu[k] if k < len(cu) else "n:" + u
        b = "g:" + cv[k] if k < len(cv) else "n:" + v
        if a != b:
            qedges[parent].add((a, b))
    for p, grp in groups.items():
        grp.layers = _layers(list(units[p]), qedges[p], first)
    for i, r in enumerate(regions):
        if not r.nodes:  # no node to point at: mark the module it names (and those around it)
            p = r.location.module if r.location.module in groups else ""
            while p is not None:
                groups[p].regions.add(i)
                p = groups[p].parent
    return GraphModel(index, g, groups, regions)


def default_expanded(model: GraphModel, budget: int = 80) -> set:
    """Groups to show expanded at first: breadth first from the top level, only groups holding a
    rewrite or a near miss (the rest stay one box each), while the picture has at most `budget`
    boxes.  Siblings with as many children (the layers of a model) open together or not at all,
    larger ones first, so a 32-layer model opens on its layers and a tiny one deeper."""
    expanded = {""}
    visible = len(model.groups[""].children)
    frontier = [u[2:] for u in model.groups[""].children if u.startswith("g:")]
    while frontier:
        nxt = []
        batches: dict = {}
        for p in frontier:
            g = model.groups[p]
            if g.regions:
                batches.setdefault((g.parent, len(g.children)), []).append(p)
        for key in sorted(batches, key=lambda k: -sum(model.groups[p].size for p in batches[k])):
            batch = sorted(batches[key])
            grow = sum(len(model.groups[p].children) - 1 for p in batch)
            if visible + grow > budget:
                continue
            expanded.update(batch)
            visible += grow
            nxt += [u[2:] for p in batch for u in model.groups[p].children if u.startswith("g:")]
        frontier = nxt
    return expanded
