"""How ligerfx's own names import: two meta path finders that `import ligerfx` installs.

## `ligerfx.kernels` and `ligerfx.patterns`: the top-level kernels/ and patterns/ folders

Those folders have no __init__.py, on purpose.  A folder with one is a regular package, and a
regular package in a directory on sys.path shadows every installed distribution of the same
top-level name; the repository root is on sys.path whenever Python starts there (`python -m
ligerfx`, a script or notebook, pytest's rootdir), and Hugging Face's `kernels`, which
transformers imports at start-up, is one such name.  Without __init__.py a folder is at most a
PEP 420 namespace portion, which the import system uses only when no regular package or module of
that name exists anywhere on sys.path, so the root can no longer hide another distribution.

What was each package's __init__.py is its `_package.py`.  `SubpackageFinder`, first on
sys.meta_path, loads that file as the package and searches the folder for its modules: in a source checkout (editable install: setuptools' finder does not resolve a
namespace package nested under a mapped one) the folders beside ligerfx/, in an installed wheel
the copies inside it.  Importing `ligerfx.patterns.rope` therefore still runs the package first,
which registers every built-in family in its fixed order, exactly as an __init__.py did.

## Old module paths
Up to this release every module sat directly in ligerfx/; they now live in rooms (graph/,
compiler/, compress/, dump/, tools/; docs/architecture.md).  `MovedFinder`, last on
sys.meta_path (only names nothing else finds reach it), keeps each old path importing for one
release, with a DeprecationWarning that names the new one: `ligerfx.canonical` is a module
holding the names of its new homes (a name that moved to another room is found there too), so
`from ligerfx.canonical import View, node_value` keeps working.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import warnings

NAMES = ("kernels", "patterns")


class SubpackageFinder:
    """A meta path finder for `<package>.kernels` and `<package>.patterns` alone."""

    def __init__(self, package: str, package_dir: str):
        self.folders = {}
        for name in NAMES:
            inside = os.path.join(package_dir, name)          # an installed wheel
            beside = os.path.join(os.path.dirname(package_dir), name)  # a source checkout
            folder = inside if os.path.isdir(inside) else beside
            if os.path.isfile(os.path.join(folder, "_package.py")):
                self.folders[f"{package}.{name}"] = folder

    def find_spec(self, fullname, path=None, target=None):
        folder = self.folders.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(
            fullname, os.path.join(folder, "_package.py"), submodule_search_locations=[folder])

    def invalidate_caches(self):
        pass


# old module (under ligerfx) -> its new homes, the first the module itself
MOVED = {
    **{m: (f"graph.{m}",) for m in ("mutation", "grad_mode", "precision", "symbolic", "layout",
                                   "schedule")},
    "canonical": ("compiler.canonical", "graph.nodes"),
    "report": ("compiler.report", "graph.source"),
    "passes": ("compiler.passes", "builtins"),
    **{m: (f"compiler.{m}",) for m in ("matcher", "pattern", "rewriter", "boundary",
                                      "quantize_pass")},
    "quantize": ("compress.quantize",), "sparsify": ("compress.sparsify",),
    "dump_cost": ("dump.cost",), "dump_dot": ("dump.dot",), "dump_graph": ("dump.picture",),
    "dump_html": ("dump.html",), "dump_svg": ("dump.svg",), "hf_targets": ("dump.hf_targets",),
    **{m: (f"tools.{m}",) for m in ("cli", "demo", "example_model", "offline_compile")},
    "integrations": ("compiling",),
}


class MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`<package>.<old>` for each old module path in MOVED: a module of its homes' names."""

    def __init__(self, package: str):
        self.package = package

    def find_spec(self, fullname, path=None, target=None):
        parent, _, old = fullname.rpartition(".")
        if parent != self.package or old not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return None  # a plain module, filled by exec_module

    def exec_module(self, module):
        old = module.__name__.rpartition(".")[2]
        homes = [importlib.import_module(f"{self.package}.{h}") for h in MOVED[old]]
        warnings.warn(f"{module.__name__} moved to {homes[0].__name__}; import it from there "
                      "(the old path goes in the next release)", DeprecationWarning, stacklevel=2)
        for home in reversed(homes):  # the first home wins a name two of them define
            module.__dict__.update({k: v for k, v in vars(home).items()
                                    if not (k.startswith("__") and k.endswith("__"))})
        module.__doc__ = f"Moved: see {homes[0].__name__}."

    def invalidate_caches(self):
        pass


def install(package: str, package_dir: str) -> None:
    """Put SubpackageFinder first and MovedFinder last on sys.meta_path (once each)."""
    if not any(isinstance(f, SubpackageFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, SubpackageFinder(package, package_dir))
    if not any(isinstance(f, MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedFinder(package))
