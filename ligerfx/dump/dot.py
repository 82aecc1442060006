"""`ligerfx dump -f dot`: the graphs as Graphviz, marking what the svg/html picture marks.

Each captured graph appears twice.  Before the rewrite: every rewrite is a cluster labelled
`pattern -> kernel` and its source line, its nodes filled with the pattern's colour (the
picture's palette); a near miss's node has a red dashed outline and its reason.  After the
rewrite: the nodes each rewrite created, labelled with their pattern.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .picture import NEAR_MISS
from .svg import colors
from ligerfx.compiler.rewriter import PATTERN_META


def _label(n: fx.Node) -> str:
    if n.op == "call_function":
        if isinstance(n.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            t = str(n.target)  # e.g. liger.rms_norm, aten.mm.default
        else:
            t = getattr(n.target, "__name__", None) or str(n.target)
        return f"{n.name}\n{t}"
    if n.op in ("call_method", "call_module", "get_attr"):
        return f"{n.name}\n.{n.target}"
    return n.name


def _q(s: str) -> str:
    """A DOT quoted string (newlines become DOT line breaks)."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _node(n: fx.Node, prefix: str, extra: str, attrs: list, indent: str = "    ") -> str:
    attrs = [f"label={_q(_label(n) + extra)}"] + attrs
    if n.op in ("placeholder", "output"):
        attrs.append("shape=box")
    return f"{indent}{_q(prefix + '_' + n.name)} [{', '.join(attrs)}];"


def _edges(gm: fx.GraphModule, prefix: str, out: list) -> None:
    for n in gm.graph.nodes:
        for a in n.all_input_nodes:
            out.append(f"    {_q(prefix + '_' + a.name)} -> {_q(prefix + '_' + n.name)};")


def _before(gm: fx.GraphModule, model, prefix: str, palette: dict, out: list) -> None:
    out.append(f"  subgraph cluster_{prefix} {{")
    out.append(f"    label={_q(f'graph {model.index} before')};")
    by_name = {n.name: n for n in gm.graph.nodes}
    placed: set = set()
    near: dict = {}
    for k, r in enumerate(model.regions):
        if r.kind == NEAR_MISS:
            for name in r.nodes:
                near.setdefault(name, []).append(r)
            continue
        if not r.nodes:
            continue
        label = f"{r.pattern} -> {r.kernel}" if r.kernel else r.pattern
        if r.location.file:
            label += f"\n{r.location.file.rsplit('/', 1)[-1]}:{r.location.line}"
        out.append(f"    subgraph cluster_{prefix}_r{k} {{")
        out.append(f'      label={_q(label)}; style="rounded,filled"; fillcolor="#fff8e6"; '
                   'color="#c98a00";')
        fill = [f'style=filled, fillcolor="{palette.get(r.pattern, "#ffd27f")}"']
        for name in r.nodes:
            out.append(_node(by_name[name], prefix, f"\n[{r.pattern}]", fill, "      "))
            placed.add(name)
        out.append("    }")
    for n in gm.graph.nodes:
        if n.name in placed:
            continue
        if n.name in near:
            why = "; ".join(f"near miss {r.pattern}: {r.reason}" for r in near[n.name])
            out.append(_node(n, prefix, "\n" + why[:160],
                             ['color="#d62839"', "penwidth=2", "style=dashed"]))
        else:
            out.append(_node(n, prefix, "", []))
    _edges(gm, prefix, out)
    out.append("  }")


def _after(gm: fx.GraphModule, index: int, prefix: str, palette: dict, out: list) -> None:
    out.append(f"  subgraph cluster_{prefix} {{")
    out.append(f"    label={_q(f'graph {index} after')};")
    for n in gm.graph.nodes:
        pat = n.meta.get(PATTERN_META)
        attrs = [f'style=filled, fillcolor="{palette.get(pat, "#ffd27f")}"'] if pat else []
        out.append(_node(n, prefix, f"\n[{pat}]" if pat else "", attrs))
    _edges(gm, prefix, out)
    out.append("  }")


def to_dot(dump, models: list) -> str:
    """A Graphviz digraph of a `dump.Dump` and the graph models of its captured graphs."""
    palette = colors(models)
    out = ["digraph ligerfx {", f"  label={_q('ligerfx dump ' + dump.target)};",
           "  node [shape=ellipse, fontsize=10];"]
    for i, m in enumerate(models):
        _before(dump.before[i], m, f"g{i}_before", palette, out)
        _after(dump.after[i], i, f"g{i}_after", palette, out)
    out.append("}")
    return "\n".join(out) + "\n"
