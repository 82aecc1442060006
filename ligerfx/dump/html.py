"""The `ligerfx dump -f html` page: one self-contained file (style, data and script inline).

At the top, the per-pattern summary (rewrites, kernel, share of the graph's FLOPs / bytes now in
fused kernels, near misses), then each captured graph drawn by `page.js` from its
`GraphModel` (groups collapse and expand on click, search, details with source lines), the
rewrites and near misses as tables that locate each one in the picture (the FX code is left to
`-f text`, which would triple the page).  The data is compact JSON (indices, shared source-location table) so a 32-layer model
stays a small page.
"""

from __future__ import annotations

import html
import json
from importlib import resources

from . import svg
from .picture import NEAR_MISS, GraphModel, default_expanded

_PAGE_CSS = """body{font-family:ui-sans-serif,system-ui,sans-serif;margin:0;color:#1d2330}
header{padding:.8em 1.2em;border-bottom:1px solid #ddd;background:#fafbfd}h1{font-size:1.3em;margin:.2em 0}
table{border-collapse:collapse;margin:.4em 0;font-size:13px}td,th{border:1px solid #d5dae3;
padding:.15em .5em;text-align:left;vertical-align:top}th{background:#f0f3f8}td.num{text-align:right}
.sw{display:inline-block;width:.9em;height:.9em;border:1px solid #0004;vertical-align:middle;margin-right:.3em}
#main{display:flex;align-items:flex-start}#canvas{flex:1;overflow:auto;height:78vh;padding:.5em;
border-right:1px solid #ddd}aside{width:27em;padding:.6em 1em;font-size:13px;height:78vh;overflow:auto}
#search{width:100%;font-size:14px;padding:.3em;box-sizing:border-box}#results{padding-left:1.1em;margin:.3em 0}
#results li,[data-reveal]{cursor:pointer}#results li:hover,[data-reveal]:hover{background:#eef4ff}
.rwbox{border-left:4px solid #c98a00;padding-left:.5em}.nmbox{border-left:4px solid #d62839;padding-left:.5em}
.src{overflow-wrap:anywhere}.src code,code{font-size:12px}pre{background:#f6f6f6;padding:.6em;overflow:auto;font-size:12px}
section{padding:0 1.2em}button{font-size:12px;margin-right:.3em}h2{font-size:1.1em}
.nm-row td:first-child{border-left:4px solid #d62839}"""


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "-"


def _data(models: list, palette: dict) -> dict:
    locs: list = []
    loc_ids: dict = {}

    def loc_id(loc) -> int:
        # The module is the node's group already: per source line, one entry for all layers.
        key = (loc.file, loc.line, loc.code)
        if key not in loc_ids:
            loc_ids[key] = len(locs)
            locs.append(list(key))
        return loc_ids[key]

    graphs = []
    for m in models:
        gidx = {p: i for i, p in enumerate(sorted(m.groups, key=lambda p: (p != "", p)))}
        names = list(m.graph.nodes)
        nidx = {n: i for i, n in enumerate(names)}

        def unit(u: str) -> int:
            return nidx[u[2:]] if u.startswith("n:") else -(gidx[u[2:]] + 1)

        nodes = [[n, a["label"], a["target"], gidx[a["group"]], a["shape"], a["dtype"],
                  loc_id(a["location"]), a["regions"], a["flops"], a["bytes"]]
                 for n, a in m.graph.nodes(data=True)]
        groups = [None] * len(gidx)
        for p, i in gidx.items():
            g = m.groups[p]
            groups[i] = [p, -1 if g.parent is None else gidx[g.parent],
                         [[unit(u) for u in row] for row in g.layers], g.size, sorted(g.regions)]
        edges = [nidx[x] for e in m.graph.edges for x in e]
        regions = [[r.kind, r.pattern, r.kernel, r.detail, r.reason, loc_id(r.location),
                    [nidx[n] for n in r.nodes]] for r in m.regions]
        graphs.append(dict(index=m.index, nodes=nodes, groups=groups, edges=edges,
                           regions=regions, expanded=sorted(gidx[p] for p in default_expanded(m))))
    geom = {k: getattr(svg, k) for k in ("NODE_W", "NODE_H", "GROUP_W", "GROUP_H", "PAD",
                                              "HEAD", "HGAP", "VGAP")}
    return dict(graphs=graphs, locs=locs, palette=palette, geom=geom)


def _summary(models: list, palette: dict) -> str:
    e = html.escape
    rows: dict = {}
    tot = dict(flops=0, bytes=0, graph_flops=0, graph_bytes=0, nodes=0, graph_nodes=0,
               rewrites=0, near_misses=0)
    for m in models:
        s = m.summary()
        for k in tot:
            tot[k] += s["_total"][k]
        for pat, row in s.items():
            if pat == "_total":
                continue
            acc = rows.setdefault(pat, dict(row, rewrites=0, near_misses=0, nodes=0, flops=0,
                                            bytes=0))
            for k in ("rewrites", "near_misses", "nodes", "flops", "bytes"):
                acc[k] += row[k]
            acc["kernel"] = acc["kernel"] or row["kernel"]
    out = ["<table id='summary'><tr><th>pattern</th><th>rewrites</th><th>kernel</th>"
           "<th>nodes replaced</th><th>share of FLOPs</th><th>share of bytes</th>"
           "<th>near misses</th></tr>"]
    for pat, r in sorted(rows.items(), key=lambda t: (-t[1]["rewrites"], t[0])):
        sw = f"<span class='sw' style='background:{palette[pat]}'></span>" if pat in palette else ""
        out.append(f"<tr><td>{sw}{e(pat)}</td><td class='num'>{r['rewrites']}</td>"
                   f"<td><code>{e(r['kernel'])}</code></td><td class='num'>{r['nodes']}</td>"
                   f"<td class='num'>{_pct(r['flops'], tot['graph_flops'])}</td>"
                   f"<td class='num'>{_pct(r['bytes'], tot['graph_bytes'])}</td>"
                   f"<td class='num'>{r['near_misses']}</td></tr>")
    out.append(f"<tr><th>all</th><th class='num'>{tot['rewrites']}</th><th></th>"
               f"<th class='num'>{tot['nodes']} of {tot['graph_nodes']}</th>"
               f"<th class='num'>{_pct(tot['flops'], tot['graph_flops'])}</th>"
               f"<th class='num'>{_pct(tot['bytes'], tot['graph_bytes'])}</th>"
               f"<th class='num'>{tot['near_misses']}</th></tr></table>")
    out.append(f"<p style='font-size:12px;color:#556'>FLOPs and bytes are estimated from the nodes' "
               f"example values (graph total: {tot['graph_flops']:,} FLOPs, "
               f"{tot['graph_bytes']:,} bytes moved op by op); see docs/dump.md.</p>")
    return "".join(out)


def _where(loc) -> str:
    e = html.escape
    if not loc.file:
        return "&lt;unknown source&gt;"
    return (f"{e(loc.file.rsplit('/', 1)[-1])}:{loc.line} <code>{e(loc.code.strip())}</code>"
            f"<br><small>{e(loc.module)}</small>")


def _tables(models: list) -> str:
    e = html.escape
    rw = ["<h2>Rewrites</h2><table id='rewrites'><tr><th>pattern</th><th>kernel</th><th>graph</th>"
          "<th>source</th><th>nodes replaced</th></tr>"]
    nm = ["<h2>Near misses</h2><table id='near-misses'><tr><th>pattern</th><th>graph</th>"
          "<th>source</th><th>reason</th></tr>"]
    for m in models:
        for r in m.regions:
            first = r.nodes[0] if r.nodes else None
            reveal = e(json.dumps([m.index, first, r.location.module]))
            if r.kind == NEAR_MISS:
                nm.append(f"<tr class='nm-row' data-reveal='{reveal}' title='show in the graph'>"
                          f"<td>{e(r.pattern)}</td><td>{m.index}</td><td>{_where(r.location)}</td>"
                          f"<td>{e(r.reason)}</td></tr>")
            else:
                det = f" ({e(r.detail)})" if r.detail else ""
                rw.append(f"<tr data-reveal='{reveal}' title='show in the graph'><td>{e(r.pattern)}"
                          f"{det}</td><td><code>{e(r.kernel)}</code></td><td>{m.index}</td>"
                          f"<td>{_where(r.location)}</td><td>{len(r.nodes)}</td></tr>")
    if len(nm) == 1:
        nm.append("<tr><td colspan='4'>none</td></tr>")
    return "".join(rw) + "</table>" + "".join(nm) + "</table>"


def _script_json(data: dict) -> str:
    # Inside <script>, "</script" or "<!--" in a source line would change how the page parses:
    # every "<" is written as the JSON (and JS) escape \u003c.
    return json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")


def to_html(dump, models: list[GraphModel]) -> str:
    """The whole page for a `dump.Dump` and the graph models of its captured graphs."""
    e = html.escape
    r = dump.report
    palette = svg.colors(models)
    js = resources.files("ligerfx.dump").joinpath("page.js").read_text()
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>ligerfx dump "
             f"{e(dump.target)}</title><style>{_PAGE_CSS}\n{svg.css()}</style></head><body>",
             f"<header><h1>ligerfx dump <code>{e(dump.target)}</code></h1>",
             f"<p>{len(r.matches)} rewrite(s), {len(r.near_misses)} near miss(es) in {r.graphs} "
             "graph(s). Click a box to expand its module, a group's header to collapse it, a "
             "node for its details.</p>", _summary(models, palette)]
    if r.notes:
        parts.append("<ul>" + "".join(f"<li>{e(x)}</li>" for x in r.notes) + "</ul>")
    parts.append("</header><div id='main'><div id='canvas'>")
    for m in models:
        parts.append(f"<h2>Graph {m.index}</h2><div class='graph' id='graph-{m.index}'></div>")
    parts.append("</div><aside><input id='search' type='search' placeholder='search a node or "
                 "module, e.g. layers.1.mlp'><ol id='results'></ol><p><button data-all='open'>"
                 "expand all</button><button data-all='close'>collapse all</button><button "
                 "data-all='default'>reset</button></p><div id='details'><p>Rewritten nodes are "
                 "filled with their pattern's colour and labelled <b>pattern \u2192 kernel</b>; "
                 "near misses have a red dashed frame and \u26a0. Hover for the source line."
                 "</p></div></aside></div><section>")
    parts.append(_tables(models))
    parts.append("<p>The FX code of each graph before and after the rewrite: <code>ligerfx dump "
                 f"{e(dump.target)} -f text</code>.</p>")
    parts.append(f"</section><script>window.LIGERFX_DUMP={_script_json(_data(models, palette))};"
                 f"</script><script>{js}</script></body></html>")
    return "\n".join(parts) + "\n"
