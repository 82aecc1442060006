"""Pattern plugins: packages that ship patterns through the `ligerfx.patterns` entry-point group.

A package declares, in its pyproject.toml,

    [project.entry-points."ligerfx.patterns"]
    my_patterns = "my_package.ligerfx_patterns"          # a module: importing it registers
    # or  my_patterns = "my_package.patterns:register_all"  # a function: called with no arguments

and its patterns are registered the first time ligerfx needs the registry (the first
`torch.compile(..., backend="liger")`, `ligerfx.explain`, `ligerfx patterns`, or a
`register_pattern` call).  A plugin that fails to load is reported as a warning, never an
exception, so one broken package cannot break every compile.
"""

from __future__ import annotations

import importlib.metadata
import threading
import types
import warnings

GROUP = "ligerfx.patterns"

_lock = threading.RLock()
_loaded = False
# pattern name -> "entry-point name (distribution)" that registered it
sources: dict[str, str] = {}
# entry-point name -> one-line error, for plugins that failed to load
errors: dict[str, str] = {}


def _entry_points():
    return list(importlib.metadata.entry_points(group=GROUP))


def _origin(ep) -> str:
    dist = getattr(ep, "dist", None)
    name = getattr(dist, "name", None) or (getattr(dist, "metadata", None) or {}).get("Name")
    return f"{ep.name} ({name})" if name else ep.name


def load_plugins(reload: bool = False) -> None:
    """Load every plugin once (`reload=True` looks again, e.g. after installing one)."""
    global _loaded
    from .compiler.pattern import REGISTRY

    with _lock:
        if _loaded and not reload:
            return
        # Set first: a plugin's own register_pattern call asks for the plugins to be loaded.
        _loaded = True
        for ep in _entry_points():
            before = set(REGISTRY.names())
            try:
                obj = ep.load()
                if callable(obj) and not isinstance(obj, types.ModuleType):
                    obj()
            except Exception as e:  # noqa: BLE001 - reported, never raised (see module doc)
                msg = f"{type(e).__name__}: {e}".splitlines()[0]
                errors[ep.name] = msg
                warnings.warn(f"ligerfx: pattern plugin {ep.name!r} ({ep.value}) failed to load: "
                              f"{msg}", RuntimeWarning, stacklevel=2)
                continue
            errors.pop(ep.name, None)
            for name in REGISTRY.names():
                if name not in before:
                    sources[name] = _origin(ep)
