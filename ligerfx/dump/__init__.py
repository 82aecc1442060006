"""`ligerfx dump`: trace a model offline and write what the liger backend would do to it.

A target is `path/to/file.py:factory` or `package.module:factory` (the factory returns `(model,
args)` or `(model, args, kwargs)`), or `hf:MODEL_TYPE` / `hf:path/to/config.json` (see
hf_targets).  The model is traced by Dynamo as `ligerfx.explain` traces it; each captured graph
is rewritten on a copy and kept, so the output can show both graphs.  Formats: text, json, dot
(Graphviz, rewrites as clusters), svg (the picture alone, svg.py) and html (one self-contained
page that draws the graph, html.py); both pictures draw the graph model of picture.py.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from ligerfx.explain import trace_and_rewrite
from ligerfx.options import Options
from ligerfx.compiler.report import Report

FORMATS = ("text", "json", "dot", "svg", "html")


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


def to_dot(d: Dump) -> str:
    from .dot import to_dot as dot

    return dot(d, models(d))


def models(d: Dump) -> list:
    """The graph model (picture.GraphModel) of each captured graph."""
    from .picture import build

    return [build(d, i) for i in range(len(d.before))]


def to_svg(d: Dump) -> str:
    from .svg import to_svg as svg

    return svg(models(d), d.target)


def to_html(d: Dump) -> str:
    from .html import to_html as page

    return page(d, models(d))


RENDER = {"text": to_text, "json": to_json, "dot": to_dot, "svg": to_svg, "html": to_html}


def render(d: Dump, fmt: str) -> str:
    return RENDER[fmt](d)
