"""The dump's picture as one SVG: a `GraphModel` drawn with some groups expanded, the rest boxes.

Geometry (kept identical to `page.js`, which redraws the same picture when a group is
expanded in the browser): a node is a NODE_W x NODE_H box, a collapsed group a GROUP_W x GROUP_H
box; an expanded group stacks its layers (`Group.layers`) top to bottom, each layer's units side
by side and centred, inside a frame with a header line.  Edges run from the bottom of the visible
box holding their source to the top of the one holding their target.
"""

from __future__ import annotations

import html
from importlib import resources

from .picture import NEAR_MISS, REWRITE, GraphModel, default_expanded

NODE_W, NODE_H, GROUP_W, GROUP_H = 156, 34, 190, 46
PAD, HEAD, HGAP, VGAP = 10, 22, 14, 26
# One colour per pattern, in the order patterns first appear (the same list as the page's).
PALETTE = ("#f6c85f", "#8dd3c7", "#bebada", "#80b1d3", "#fdb462", "#b3de69", "#fccde5",
           "#d9d9d9", "#bc80bd", "#ccebc5")


def css() -> str:
    """The picture's style sheet, shared by the SVG and the HTML page."""
    return resources.files("ligerfx.dump").joinpath("page.css").read_text()


def colors(models) -> dict:
    out: dict = {}
    for m in models:
        for r in m.regions:
            if r.kind == REWRITE and r.pattern not in out:
                out[r.pattern] = PALETTE[len(out) % len(PALETTE)]
    return out


def layout(model: GraphModel, expanded: set) -> dict:
    """{unit id: (x, y, w, h)} of every visible unit ("g:PATH" or "n:NAME"), the top level's
    frame included as "g:"."""
    sizes: dict = {}

    def size(u: str) -> tuple:
        if u.startswith("n:"):
            s = (NODE_W, NODE_H)
        elif u[2:] not in expanded:
            s = (GROUP_W, GROUP_H)
        else:
            rows = model.groups[u[2:]].layers
            w = h = 0
            for row in rows:
                ws = [size(c)[0] for c in row]
                w = max(w, sum(ws) + HGAP * (len(row) - 1))
                h += max(size(c)[1] for c in row)
            h += VGAP * max(len(rows) - 1, 0)
            s = (max(w, GROUP_W - 2 * PAD) + 2 * PAD, h + HEAD + PAD)
        sizes[u] = s
        return s

    pos: dict = {}

    def place(u: str, x: float, y: float) -> None:
        w, h = sizes[u]
        pos[u] = (x, y, w, h)
        if u.startswith("n:") or u[2:] not in expanded:
            return
        cy = y + HEAD
        for row in model.groups[u[2:]].layers:
            rw = sum(sizes[c][0] for c in row) + HGAP * (len(row) - 1)
            rh = max(sizes[c][1] for c in row)
            cx = x + (w - rw) / 2
            for c in row:
                place(c, cx, cy + (rh - sizes[c][1]) / 2)
                cx += sizes[c][0] + HGAP
            cy += rh + VGAP

    size("g:")
    place("g:", 0, 0)
    return pos


def _visible(model: GraphModel, expanded: set, name: str) -> str:
    """The visible unit that shows node `name`: itself, or its outermost collapsed group."""
    for p in model.ancestors(model.group_of(name)):
        if p not in expanded:
            return "g:" + p
    return "n:" + name


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "\u2026"


def _where(loc) -> str:
    return f"{loc.file.rsplit('/', 1)[-1]}:{loc.line}" if loc.file else ""


def draw(model: GraphModel, expanded: set | None = None, palette: dict | None = None) -> str:
    """The picture of one graph model as an <svg> element (no XML prolog)."""
    expanded = default_expanded(model) if expanded is None else expanded
    palette = palette or colors([model])
    pos = layout(model, expanded)
    W, H = pos["g:"][2], pos["g:"][3]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="lfx" width="{W:.0f}" '
           f'height="{H:.0f}" viewBox="0 0 {W:.0f} {H:.0f}">']
    seen = set()
    for u, v in model.graph.edges:
        a, b = _visible(model, expanded, u), _visible(model, expanded, v)
        if a == b or (a, b) in seen or a not in pos or b not in pos:
            continue
        seen.add((a, b))
        x1, y1, w1, h1 = pos[a]
        x2, y2, w2, _ = pos[b]
        sx, sy, tx, ty = x1 + w1 / 2, y1 + h1, x2 + w2 / 2, y2
        my = (sy + ty) / 2
        out.append(f'<path class="edge" d="M{sx:.0f},{sy:.0f} C{sx:.0f},{my:.0f} {tx:.0f},{my:.0f} '
                   f'{tx:.0f},{ty:.0f}"/>')
    for u, (x, y, w, h) in sorted(pos.items(), key=lambda t: t[1][2] * t[1][3], reverse=True):
        if u.startswith("g:"):
            out.append(_group(model, u[2:], x, y, w, h, u[2:] in expanded, palette))
        else:
            out.append(_node(model, u[2:], x, y, palette))
    out.append("</svg>")
    return "\n".join(out)


def _group(model, path, x, y, w, h, is_open, palette) -> str:
    e = html.escape
    regs = [model.regions[i] for i in model.group_regions(path)]
    rw = [r for r in regs if r.kind == REWRITE]
    nm = [r for r in regs if r.kind == NEAR_MISS]
    cls = "grp" + (" open" if is_open else "") + (" has-rw" if rw else "") + (" has-nm" if nm else "")
    name = path or "(top level)"
    tip = f"{name}: {model.groups[path].size} nodes"
    parts = [f'<g class="{cls}" data-group="{e(path)}"><title>{e(tip)}</title>',
             f'<rect class="frame" x="{x:.0f}" y="{y:.0f}" width="{w:.0f}" height="{h:.0f}" rx="6"/>']
    if is_open:
        parts.append(f'<text x="{x + 6:.0f}" y="{y + 15:.0f}" class="ghead">{e(_short(name, 60))}</text>')
    else:
        tail = path.rsplit(".", 1)[-1] if path else name
        parts.append(f'<text x="{x + 8:.0f}" y="{y + 17:.0f}" class="gname">{e(_short(tail, 18))}'
                     f' <tspan class="gsize">{model.groups[path].size} nodes</tspan></text>')
        counts: dict = {}
        for r in rw:
            counts[r.pattern] = counts.get(r.pattern, 0) + 1
        bx = x + 8
        for pat, k in counts.items():
            label = _short(pat, 14) + (f" \u00d7{k}" if k > 1 else "")
            bw = 7 * len(label) + 8
            parts.append(f'<rect class="badge" x="{bx:.0f}" y="{y + 25:.0f}" width="{bw}" height="14"'
                         f' rx="3" fill="{palette.get(pat, "#eee")}"/><text class="btext" '
                         f'x="{bx + 4:.0f}" y="{y + 36:.0f}">{e(label)}</text>')
            bx += bw + 4
        if nm:
            parts.append(f'<text class="nmtext" x="{x + w - 8:.0f}" y="{y + 17:.0f}" '
                         f'text-anchor="end">\u26a0 {len(nm)}</text>')
    parts.append("</g>")
    return "".join(parts)


def _node(model, name, x, y, palette) -> str:
    e = html.escape
    a = model.graph.nodes[name]
    regs = model.node_regions(name)
    rw = [r for r in regs if r.kind == REWRITE]
    nm = [r for r in regs if r.kind == NEAR_MISS]
    cls = "node" + (" rw" if rw else "") + (" nm" if nm else "")
    tip = [f"{name} = {a['target']}  {a['shape']} {a['dtype']}".rstrip()]
    loc = a["location"]
    if loc.file:
        tip.append(f"{_where(loc)}  {loc.code.strip()}")
    for r in rw:
        tip.append(f"replaced by {r.kernel or r.pattern} ({r.pattern})")
    for r in nm:
        tip.append(f"near miss {r.pattern}: {r.reason}")
    fill = f' style="fill:{palette.get(rw[0].pattern, "#fff")}"' if rw else ""
    parts = [f'<g class="{cls}" data-node="{e(name)}"><title>{e(chr(10).join(tip))}</title>',
             f'<rect x="{x:.0f}" y="{y:.0f}" width="{NODE_W}" height="{NODE_H}" rx="3"{fill}/>',
             f'<text x="{x + 6:.0f}" y="{y + 14:.0f}" class="nname">{e(_short(name, 24))}</text>',
             f'<text x="{x + 6:.0f}" y="{y + 27:.0f}" class="nop">{e(_short(a["label"], 14))}'
             f' <tspan class="nshape">{e(_short(a["shape"], 14))}</tspan></text>']
    for r in rw:
        if r.nodes and r.nodes[0] == name:  # the region's output carries its label
            label = f"{r.pattern} \u2192 {r.kernel}" if r.kernel else r.pattern
            parts.append(f'<text class="rlabel" x="{x + NODE_W - 4:.0f}" y="{y - 3:.0f}" '
                         f'text-anchor="end">{e(_short(label, 70))}</text>')
    if nm:
        parts.append(f'<text class="nmtext" x="{x + NODE_W - 5:.0f}" y="{y + 14:.0f}" '
                     'text-anchor="end">\u26a0</text>')
    parts.append("</g>")
    return "".join(parts)


def to_svg(models: list, title: str = "") -> str:
    """A standalone SVG document: each graph's picture stacked, with the style sheet inline."""
    palette = colors(models)
    pics = [draw(m, palette=palette) for m in models]
    frames = [layout(m, default_expanded(m))["g:"] for m in models]
    widths, heights = [f[2] for f in frames], [f[3] for f in frames]
    W = max(widths, default=200) + 20
    H = sum(h + 30 for h in heights) + 30
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W:.0f}" height="{H:.0f}">',
           f"<style>{css()}</style>",
           f'<text x="10" y="20" class="ghead">{html.escape("ligerfx dump " + title)}</text>']
    y = 30
    for m, p, h in zip(models, pics, heights):
        out.append(f'<text x="10" y="{y + 14:.0f}" class="ghead">graph {m.index}</text>')
        out.append(f'<g transform="translate(10,{y + 20:.0f})">{p}</g>')
        y += h + 30
    out.append("</svg>")
    return "\n".join(out) + "\n"
