"""`ligerfx.register_pattern`: the public way to teach the liger backend a new rewrite.

A thin layer over `ligerfx.compiler.pattern.register` (which traces and checks); this adds the decorator
form and makes sure built-in and plugin patterns are loaded first, so a duplicate name is caught
at registration rather than later, when the built-ins load.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from .compiler.pattern import Pattern, PatternError, register

_UNSET: Any = object()


def _ensure_loaded() -> None:
    from . import builtins  # noqa: F401 - built-in patterns, then plugins (once)


def register_pattern(name: str, pattern: Callable | Sequence[Callable] | None = None,
                     replacement: Callable | None = None, example_inputs: Any = None, *,
                     constraints: Callable | Sequence[Callable] | None = None, priority: int = 0,
                     allow_casts: bool = False, description: str = "",
                     replace: bool = False, look_alikes: dict[Callable, str] | None = None):
    """Register a rewrite: wherever `pattern` is computed in a compiled graph, call `replacement`.

    name: identifier shown in `ligerfx.explain` counts, `ligerfx dump` and `ligerfx patterns`.
    pattern: a plain function of tensors (and constants), or a list of equivalent spellings.
    replacement: a function with the same parameters (it may take fewer, and may add a `match`
        keyword to see the match); typically it calls your own `torch.library` custom op.
    example_inputs: a tuple in parameter order, or a dict by parameter name.  Both functions are
        traced and run on them; different output count, shape or dtype is a `PatternError`.
    constraints: function(s) of the `Match`; return a string (the reason) or False to refuse.
    priority: patterns with higher priority are tried first (built-ins use 0-20).
    allow_casts: look through dtype casts inside the pattern (constraints then judge dtypes).
    description: one line for `ligerfx patterns` (default: the pattern's docstring first line).
    replace: replace an already registered pattern of the same name instead of raising.
    look_alikes: {function: reason} for spellings that look like the pattern but compute something
        else (a sum where the kernel takes a mean); a match of one is never rewritten and shows
        in the report as a near miss with the reason.

    Decorator form: leave out `pattern` (or `replacement`) and decorate it; the function is
    returned unchanged.  Called directly, returns the registered `Pattern`.
    """
    if callable(name):
        raise PatternError("register_pattern needs a name: use @register_pattern(\"my_name\", "
                           "replacement=..., example_inputs=...)")
    if pattern is None and replacement is None:
        raise PatternError(f"pattern {name!r}: give `pattern` or `replacement` (the other can "
                           "be the decorated function)")

    def _register(pat, repl) -> Pattern:
        if example_inputs is None:
            raise PatternError(f"pattern {name!r}: `example_inputs` is required (the pattern is "
                               "traced and checked on them)")
        _ensure_loaded()
        return register(name, pat, repl, example_inputs, constraints=constraints,
                        priority=priority, allow_casts=allow_casts, description=description,
                        replace=replace, look_alikes=look_alikes)

    if pattern is not None and replacement is not None:
        return _register(pattern, replacement)

    def decorator(fn: Callable) -> Callable:
        if pattern is None:
            _register(fn, replacement)
        else:
            _register(pattern, fn)
        return fn

    return decorator


def register_detector(family: str, fn: Callable | None = None, patterns: Sequence[str] = (), *,
                      looks_like: str | None = None, replace: bool = False):
    """Register a detector: `fn(view)` yields (anchor fx node, covered fx nodes, message) for each
    subgraph of the canonical view (`view.graph` is the rewritten fx graph) that looks like an
    instance of `family`.  A hit that no rewrite took and no near miss covers becomes a near miss
    "looks like <looks_like> but no <family> pattern matched: <message>".  The detector runs when
    one of `patterns` (the family's pattern names) is enabled, or always if none is given.
    Decorator form: leave out `fn`.  See docs/patterns.md, "Detectors: no silent misses"."""
    from .compiler.detect import register_detector as _register

    _ensure_loaded()
    if fn is None:
        def decorator(f: Callable) -> Callable:
            _register(family, f, patterns, looks_like=looks_like, replace=replace)
            return f
        return decorator
    return _register(family, fn, patterns, looks_like=looks_like, replace=replace)
