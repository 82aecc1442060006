"""The rooms of ligerfx and the one direction of their imports, read from the source.

Every `import` / `from ... import` of the package counts, at module level or inside a function;
a module may import its own room and the rooms below it (docs/architecture.md has the map):

    tools (the CLI, demo, offline compile; `python -m ligerfx`)
      > dump > front ends (ligerfx/*.py) > patterns > compiler > compress > kernels > graph

and no set of modules imports each other in a circle.  Old module paths (before the rooms) keep
importing, with a DeprecationWarning that names the new one.
"""

from __future__ import annotations

import ast
import importlib
import os
import sys
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The folders of the package's modules: ligerfx/ and the two folders installed under it.
FOLDERS = {"ligerfx": "ligerfx", "ligerfx.kernels": "kernels", "ligerfx.patterns": "patterns"}
RANK = {"graph": 0, "kernels": 1, "compress": 2, "compiler": 3, "patterns": 4, "front": 5,
        "dump": 6, "tools": 7}


def modules(root: str = ROOT) -> dict[str, str]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for package, folder in FOLDERS.items():
        base = os.path.join(root, folder)
        for dirpath, dirs, files in os.walk(base):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            rel = os.path.relpath(dirpath, base)
            rel = [] if rel == "." else rel.split(os.sep)
            for f in files:
                if not f.endswith(".py"):
                    continue
                stem = f[:-3]
                parts = [package, *rel] + ([] if stem in ("__init__", "_package") else [stem])
                out[".".join(parts)] = os.path.join(dirpath, f)
    return out


def room(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ("graph", "compiler", "compress", "dump", "tools",
                                       "kernels", "patterns"):
        return parts[1]
    if module == "ligerfx.__main__":
        return "tools"  # `python -m ligerfx` is the command line
    return "front"


def imports(module: str, path: str, known: dict) -> list[tuple[str, int]]:
    """(imported ligerfx module, line) for every import in the file, relative ones resolved."""
    is_pkg = os.path.basename(path) in ("__init__.py", "_package.py")
    package = module if is_pkg else module.rpartition(".")[0]
    out = []
    for n in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(n, ast.Import):
            targets = [a.name for a in n.names]
        elif isinstance(n, ast.ImportFrom):
            if n.level:
                base = package.split(".")[: len(package.split(".")) - (n.level - 1)]
                mod = ".".join(base + ([n.module] if n.module else []))
            else:
                mod = n.module or ""
            # `from pkg import sub` imports the module pkg.sub when there is one
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in n.names]
        else:
            continue
        for t in targets:
            while t and t not in known and "." in t:
                t = t.rpartition(".")[0]
            if t in known and t != module:
                out.append((t, n.lineno))
    return out


def edges(root: str = ROOT) -> dict[str, list[tuple[str, int]]]:
    known = modules(root)
    return {m: imports(m, p, known) for m, p in known.items()}


def upward(graph: dict) -> list[str]:
    return [f"{m} -> {t} (line {line}): {room(m)} may not import {room(t)}"
            for m, deps in graph.items() for t, line in deps if RANK[room(t)] > RANK[room(m)]]


def cycles(graph: dict) -> list[list[str]]:
    import networkx as nx

    g = nx.DiGraph()
    g.add_nodes_from(graph)
    g.add_edges_from((m, t) for m, deps in graph.items() for t, _ in deps)
    return [sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1]


def test_every_module_has_a_room():
    mods = modules()
    assert {"ligerfx.graph.mutation", "ligerfx.compiler.canonical", "ligerfx.backend",
            "ligerfx.kernels.rope", "ligerfx.patterns.rope", "ligerfx.dump"} <= set(mods)
    assert all(room(m) in RANK for m in mods)


def test_imports_only_run_downward():
    bad = upward(edges())
    assert not bad, "imports against the layering (docs/architecture.md):\n" + "\n".join(bad)


def test_no_import_cycle():
    found = cycles(edges())
    assert not found, "modules importing each other in a circle:\n" + "\n".join(map(str, found))


def test_the_checks_see_a_violation(tmp_path):
    """An upward import inside a function and a two-module circle are both reported."""
    for folder in ("ligerfx/graph", "ligerfx/compiler", "kernels", "patterns"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "ligerfx/__init__.py").write_text("")
    (tmp_path / "ligerfx/graph/__init__.py").write_text("")
    (tmp_path / "ligerfx/compiler/__init__.py").write_text("")
    (tmp_path / "ligerfx/graph/a.py").write_text("def f():\n    from ..compiler import b\n")
    (tmp_path / "ligerfx/compiler/b.py").write_text("from ligerfx.graph.a import f\n")
    graph = edges(str(tmp_path))
    assert upward(graph) == ["ligerfx.graph.a -> ligerfx.compiler.b (line 2): graph may not "
                             "import compiler"]
    assert cycles(graph) == [["ligerfx.compiler.b", "ligerfx.graph.a"]]


OLD_PATHS = ["canonical", "matcher", "pattern", "rewriter", "passes", "boundary", "report",
             "quantize_pass", "mutation", "grad_mode", "precision", "symbolic", "layout",
             "schedule", "quantize", "sparsify", "dump_cost", "dump_dot", "dump_graph",
             "dump_html", "dump_svg", "hf_targets", "cli", "demo", "example_model",
             "offline_compile", "integrations"]


@pytest.mark.parametrize("old", OLD_PATHS)
def test_old_module_paths_import_with_a_warning(old):
    from ligerfx._imports import MOVED

    sys.modules.pop(f"ligerfx.{old}", None)
    with pytest.warns(DeprecationWarning, match=f"ligerfx.{old} moved to ligerfx."):
        mod = importlib.import_module(f"ligerfx.{old}")
    home = importlib.import_module(f"ligerfx.{MOVED[old][0]}")
    public = [k for k in vars(home) if not k.startswith("_")]
    assert public and all(getattr(mod, k) is getattr(home, k) for k in public)


def test_names_that_changed_room_still_import_from_the_old_path():
    from ligerfx.builtins import enabled_patterns
    from ligerfx.graph.nodes import CAST_METHODS, op_name
    from ligerfx.graph.source import locate

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from ligerfx.canonical import CAST_METHODS as c, op_name as o
        from ligerfx.passes import enabled_patterns as e
        from ligerfx.report import locate as loc
    assert (c, o, e, loc) == (CAST_METHODS, op_name, enabled_patterns, locate)
