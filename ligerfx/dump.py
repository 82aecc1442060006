"""`ligerfx dump`: trace a model offline and write what the liger backend would do to it.

A target is `path/to/file.py:factory` or `package.module:factory` (the factory returns `(model,
args)` or `(model, args, kwargs)`), or `hf:MODEL_TYPE` / `hf:path/to/config.json` (see
hf_targets).  The model is traced by Dynamo as `ligerfx.explain` traces it; each captured graph
is rewritten on a copy and kept, so the output can show both graphs.  Formats: text, json, dot
(Graphviz), html (one self-contained page).
"""

from __future__ import annotations

import html
import importlib
import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from .explain import trace_and_rewrite
from .options import Options
from .report import Report
from .rewriter import PATTERN_META

FORMATS = ("text", "json", "dot", "html")


class DumpError(Exception):
    """A target cannot be loaded or traced; the message is one line for the user."""


@dataclass
class Dump:
    target: str
    report: Report
    before: list = field(default_factory=list)  # fx.GraphModule per captured graph, unrewritten
    after: list = field(default_factory=list)  # the same, rewritten


# -- targets -------------------------------------------------------------------------------

def _first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0]}" if msg else type(e).__name__


def _load_module(spec: str):
    if spec.endswith(".py") or os.sep in spec or "/" in spec:
        path = os.path.abspath(spec)
        if not os.path.isfile(path):
            raise DumpError(f"no such file: {spec}")
        name = "_ligerfx_target_" + os.path.splitext(os.path.basename(path))[0]
        mod_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(mod_spec)
        # Registered like any imported module: Dynamo looks modules up by name while tracing.
        sys.modules[name] = module
        # The file's own directory is importable, as when running `python file.py`.
        sys.path.insert(0, os.path.dirname(path))
        try:
            mod_spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001
            sys.modules.pop(name, None)
            raise DumpError(f"importing {spec} failed: {_first_line(e)}") from e
        finally:
            sys.path.remove(os.path.dirname(path))
        return module
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as e:
        if e.name and spec.startswith(e.name):
            raise DumpError(f"no module named {spec!r}") from e
        raise DumpError(f"importing {spec} failed: {_first_line(e)}") from e
    except Exception as e:  # noqa: BLE001
        raise DumpError(f"importing {spec} failed: {_first_line(e)}") from e


def load_target(target: str) -> tuple[Any, tuple, dict]:
    """(model, args, kwargs) for a target string."""
    if target.startswith("hf:"):
        from .hf_targets import HFTargetError, build

        try:
            return build(target[3:])
        except HFTargetError as e:
            raise DumpError(str(e)) from e
    mod_spec, sep, factory_name = target.rpartition(":")
    if not sep or not mod_spec or not factory_name:
        raise DumpError(f"target {target!r} must be path/to/file.py:factory, "
                        "package.module:factory or hf:MODEL_TYPE")
    module = _load_module(mod_spec)
    factory = getattr(module, factory_name, None)
    if factory is None:
        raise DumpError(f"{mod_spec} has no function {factory_name!r}")
    if not callable(factory):
        raise DumpError(f"{mod_spec}:{factory_name} is not callable")
    try:
        out = factory()
    except Exception as e:  # noqa: BLE001
        raise DumpError(f"{target}: the factory raised {_first_line(e)}") from e
    wrong = (f"{target}: the factory must return (model, args) or (model, args, kwargs), "
             f"got {type(out).__name__}")
    if not isinstance(out, (tuple, list)) or len(out) not in (2, 3):
        raise DumpError(wrong)
    model, args = out[0], out[1]
    kwargs = out[2] if len(out) == 3 else {}
    if isinstance(args, torch.Tensor):
        args = (args,)
    if not callable(model):
        raise DumpError(f"{target}: the model returned by the factory is not callable "
                        f"({type(model).__name__})")
    if not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict):
        raise DumpError(wrong + " (args must be a tuple, kwargs a dict)")
    return model, tuple(args), dict(kwargs)


# -- tracing -------------------------------------------------------------------------------

def trace(model: Any, args: tuple = (), kwargs: dict | None = None, *,
          options: dict | Options | None = None, target: str = "") -> Dump:
    """Trace `model(*args, **kwargs)` like `ligerfx.explain`, keeping each graph before/after."""
    opts = Options.from_any(options)
    pairs: list = []
    torch._dynamo.reset()  # an offline tool: start from a clean Dynamo cache
    try:
        report = trace_and_rewrite(model, tuple(args), dict(kwargs or {}), opts, keep=pairs)
    except Exception as e:  # noqa: BLE001
        raise DumpError(f"{target or 'the model'} did not trace: {_first_line(e)}") from e
    dump = Dump(target, report)
    dump.before.extend(b for b, _ in pairs)
    dump.after.extend(a for _, a in pairs)
    return dump


def dump_target(target: str, options: dict | None = None) -> Dump:
    try:
        opts = Options.from_any(options)
    except ValueError as e:
        raise DumpError(str(e)) from e
    model, args, kwargs = load_target(target)
    return trace(model, args, kwargs, options=opts, target=target)


# -- formats -------------------------------------------------------------------------------

def to_dict(d: Dump) -> dict:
    out = {"target": d.target}
    out.update(d.report.to_dict())
    return out


def to_json(d: Dump) -> str:
    return json.dumps(to_dict(d), indent=2, default=str) + "\n"


def to_text(d: Dump) -> str:
    lines = [f"target: {d.target}", str(d.report), ""]
    for i, (b, a) in enumerate(zip(d.report.graphs_before, d.report.graphs_after)):
        lines += [f"=== graph {i}: before ===", b.strip("\n"), "",
                  f"=== graph {i}: after ===", a.strip("\n"), ""]
    return "\n".join(lines)


def _covered_names(d: Dump, graph: int) -> dict:
    return {n: m.pattern for m in d.report.matches if m.graph == graph for n in m.nodes}


def _dot_label(n: fx.Node) -> str:
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


def _dot_graph(gm: fx.GraphModule, prefix: str, title: str, labels: dict, out: list) -> None:
    out.append(f"  subgraph cluster_{prefix} {{")
    out.append(f"    label={_q(title)};")
    for n in gm.graph.nodes:
        pat = n.meta.get(PATTERN_META) or labels.get(n.name)
        label = _dot_label(n) + (f"\n[{pat}]" if pat else "")
        attrs = [f"label={_q(label)}"]
        if pat:
            attrs.append('style=filled, fillcolor="#ffd27f"')
        elif n.op in ("placeholder", "output"):
            attrs.append("shape=box")
        out.append(f"    {_q(prefix + '_' + n.name)} [{', '.join(attrs)}];")
    for n in gm.graph.nodes:
        for a in n.all_input_nodes:
            out.append(f"    {_q(prefix + '_' + a.name)} -> {_q(prefix + '_' + n.name)};")
    out.append("  }")


def to_dot(d: Dump) -> str:
    """A Graphviz digraph: each captured graph before and after, rewritten nodes labelled."""
    out = ["digraph ligerfx {", f"  label={_q('ligerfx dump ' + d.target)};",
           "  node [shape=ellipse, fontsize=10];"]
    for i, (b, a) in enumerate(zip(d.before, d.after)):
        _dot_graph(b, f"g{i}_before", f"graph {i} before", _covered_names(d, i), out)
        _dot_graph(a, f"g{i}_after", f"graph {i} after", {}, out)
    out.append("}")
    return "\n".join(out) + "\n"


_CSS = """body{font-family:sans-serif;margin:2em;max-width:100em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em;
text-align:left;vertical-align:top}pre{background:#f6f6f6;padding:.6em;overflow:auto;font-size:12px}
.rw{background:#ffd27f}code{font-size:12px}.cols{display:flex;gap:1em}.cols>div{flex:1;min-width:0}"""


def _loc(loc) -> str:
    where = f"{loc.file}:{loc.line}" if loc.file else "&lt;unknown source&gt;"
    if loc.file:
        where = html.escape(where)
    return (f"{where}<br><code>{html.escape(loc.code.strip())}</code>"
            f"{'<br>' + html.escape(loc.module) if loc.module else ''}")


def _code_html(code: str, mark: set) -> str:
    # Lines that define or use a rewritten node are highlighted.
    rows = []
    for line in code.strip("\n").splitlines():
        words = set(line.replace("(", " ").replace(")", " ").replace(",", " ").replace("=", " ").split())
        cls = ' class="rw"' if words & mark else ""
        rows.append(f"<span{cls}>{html.escape(line)}</span>")
    return "<pre>" + "\n".join(rows) + "</pre>"


def to_html(d: Dump) -> str:
    r = d.report
    e = html.escape
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>ligerfx dump {e(d.target)}"
             f"</title><style>{_CSS}</style></head><body>",
             f"<h1>ligerfx dump <code>{e(d.target)}</code></h1>",
             f"<p>{len(r.matches)} rewrite(s), {len(r.near_misses)} near miss(es) in {r.graphs} "
             "graph(s)</p>", "<h2>Counts</h2><table><tr><th>pattern</th><th>rewrites</th></tr>"]
    parts += [f"<tr><td>{e(k)}</td><td>{v}</td></tr>" for k, v in sorted(r.counts.items())]
    parts.append("</table><h2>Rewrites</h2><table><tr><th>pattern</th><th>graph</th>"
                 "<th>source</th><th>nodes replaced</th></tr>")
    for m in r.matches:
        det = f" ({e(m.detail)})" if m.detail else ""
        parts.append(f"<tr><td>{e(m.pattern)}{det}</td><td>{m.graph}</td><td>{_loc(m.location)}"
                     f"</td><td>{e(', '.join(m.nodes))}</td></tr>")
    parts.append("</table><h2>Near misses</h2><table><tr><th>pattern</th><th>graph</th>"
                 "<th>source</th><th>reason</th></tr>")
    for n in r.near_misses:
        parts.append(f"<tr><td>{e(n.pattern)}</td><td>{n.graph}</td><td>{_loc(n.location)}</td>"
                     f"<td>{e(n.reason)}</td></tr>")
    parts.append("</table>")
    if r.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{e(x)}</li>" for x in r.notes) + "</ul>")
    for i, (b, a) in enumerate(zip(r.graphs_before, r.graphs_after)):
        covered = set(_covered_names(d, i))
        new = ({n.name for n in d.after[i].graph.nodes if PATTERN_META in n.meta}
               if i < len(d.after) else set())
        parts.append(f"<h2>Graph {i}</h2><div class='cols'><div><h3>before</h3>"
                     f"{_code_html(b, covered)}</div><div><h3>after</h3>{_code_html(a, new)}"
                     "</div></div>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


RENDER = {"text": to_text, "json": to_json, "dot": to_dot, "html": to_html}


def render(d: Dump, fmt: str) -> str:
    return RENDER[fmt](d)
