"""Patterns: plain torch functions traced once into canonical graphs, and the registry holding them.

A pattern is registered as a name, one or more pattern functions (variants of the same math, tried
in order), a replacement function with the same parameters, example inputs, optional constraints
and a priority.  Built-in patterns in `ligerfx.patterns` and users' patterns go through the same
`register()` here; `ligerfx.register_pattern` is a thin public layer over it.
"""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from .canonical import View

from ligerfx.graph.nodes import node_value


class PatternError(ValueError):
    """A pattern definition is malformed (raised at registration, naming the pattern)."""


@dataclass(eq=False)
class TracedVariant:
    fn: Callable
    graph: fx.Graph
    view: View
    inputs: list[str]  # parameter names, in order
    scalar_inputs: set[str]
    outputs: list[Any]  # canonical nodes (or placeholders) the pattern returns
    # a look-alike: matched only to be refused with this reason (never rewritten, never checked
    # against the replacement)
    refuse: str | None = None


@dataclass(eq=False)
class Pattern:
    name: str
    variants: list[TracedVariant]
    replacement: Callable
    example_inputs: Any  # a tuple in parameter order, or a dict by parameter name
    constraints: list[Callable] = field(default_factory=list)
    priority: int = 0
    allow_casts: bool = False
    description: str = ""
    builtin: bool = False

    @property
    def num_outputs(self) -> int:
        return len(self.variants[0].outputs)

    @property
    def rewritable(self) -> list[TracedVariant]:
        """The variants a match of which is rewritten (the look-alikes left out)."""
        return [v for v in self.variants if v.refuse is None]


def _run_with_meta(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """Record each node's value on the example inputs in node.meta['example_value']."""

    class _Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            n.meta["example_value"] = out
            return out

    _Recorder(gm).run(*example_inputs)


def _examples_for(fn: Callable, example_inputs: Any, name: str) -> tuple[list[str], list]:
    params = list(inspect.signature(fn).parameters)
    if isinstance(example_inputs, dict):
        missing = [p for p in params if p not in example_inputs]
        if missing:
            raise PatternError(f"pattern {name!r}: no example input for parameter(s) {missing}")
        return params, [example_inputs[p] for p in params]
    if len(params) != len(example_inputs):
        raise PatternError(
            f"pattern {name!r}: {getattr(fn, '__name__', fn)} takes {len(params)} arguments but "
            f"{len(example_inputs)} example inputs were given"
        )
    return params, list(example_inputs)


def trace_variant(fn: Callable, example_inputs: Any, name: str) -> TracedVariant:
    params, example_inputs = _examples_for(fn, example_inputs, name)
    try:
        gm = fx.symbolic_trace(fn)
        _run_with_meta(gm, example_inputs)
    except Exception as e:  # noqa: BLE001 - reported with the pattern's name
        raise PatternError(f"pattern {name!r}: could not trace {fn.__name__}: {e}") from e
    view = View(gm.graph, strip_casts=True)
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    ret = out_node.args[0]
    rets = list(ret) if isinstance(ret, (tuple, list)) else [ret]
    outputs = []
    for r in rets:
        if not isinstance(r, fx.Node) or r.op == "placeholder":
            raise PatternError(f"pattern {name!r}: every output must be computed from the inputs")
        outputs.append(view[r])
    scalars = {p for p, v in zip(params, example_inputs) if not isinstance(v, torch.Tensor)}
    return TracedVariant(fn, gm.graph, view, params, scalars, outputs)


def _run_both(pattern: Pattern, v, ex) -> tuple:
    expected = v.fn(*ex)
    return expected, call_replacement(pattern, v, dict(zip(v.inputs, ex)), None)


def _fake_run(pattern: Pattern, v, ex) -> tuple | None:
    """Pattern and replacement on fake copies of the examples (shapes and dtypes only, as the
    compile will trace them): no kernel runs, which under Triton's interpreter cost seconds per
    pattern at import.  None where the fake run cannot decide (a replacement reading a value)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in ex]
            return _run_both(pattern, v, fake)
    except Exception:  # noqa: BLE001 - decided by the real run below
        return None


def check_replacement(pattern: Pattern) -> None:
    """The replacement must produce what the pattern produces on the example inputs: the same
    number of outputs, each of the same shape and dtype (checked on fake tensors first, then, if
    those cannot decide, by running both)."""
    for v in pattern.rewritable:
        _, ex = _examples_for(v.fn, pattern.example_inputs, pattern.name)
        ran = _fake_run(pattern, v, ex)
        try:
            expected, got = ran if ran is not None else _run_both(pattern, v, ex)
        except Exception as e:  # noqa: BLE001
            raise PatternError(f"pattern {pattern.name!r}: running it on the example inputs "
                               f"failed: {type(e).__name__}: {e}") from e
        exp = list(expected) if isinstance(expected, (tuple, list)) else [expected]
        out = list(got) if isinstance(got, (tuple, list)) else [got]
        if len(exp) != len(out):
            raise PatternError(f"pattern {pattern.name!r}: pattern returns {len(exp)} outputs, "
                               f"replacement returns {len(out)}")
        for i, (e_, o) in enumerate(zip(exp, out)):
            if tuple(e_.shape) != tuple(o.shape) or e_.dtype != o.dtype:
                raise PatternError(
                    f"pattern {pattern.name!r}: output {i} differs: pattern gives "
                    f"{tuple(e_.shape)} {e_.dtype}, replacement gives {tuple(o.shape)} {o.dtype}")


def call_replacement(pattern: Pattern, variant: TracedVariant, bound: dict, match) -> Any:
    """Call the replacement with the pattern's inputs; pass `match` if it asks for it."""
    # Constraints may bind more values than the pattern's own inputs (e.g. the lm head found
    # above a loss); the replacement receives every binding it names.
    sig = inspect.signature(pattern.replacement).parameters
    kwargs = {k: v for k, v in bound.items() if k in sig}
    if "match" in sig:
        kwargs["match"] = match
    return pattern.replacement(**kwargs)


class Registry:
    """Patterns by name, kept in priority order."""

    def __init__(self):
        self._patterns: dict[str, Pattern] = {}
        self._lock = threading.Lock()

    def add(self, pattern: Pattern, replace: bool = False) -> Pattern:
        with self._lock:
            if pattern.name in self._patterns and not replace:
                raise PatternError(f"a pattern named {pattern.name!r} is already registered; "
                                   "pass replace=True to replace it")
            self._patterns[pattern.name] = pattern
        return pattern

    def remove(self, name: str) -> None:
        with self._lock:
            self._patterns.pop(name, None)

    def get(self, name: str) -> Pattern:
        return self._patterns[name]

    def names(self) -> list[str]:
        return list(self._patterns)

    def ordered(self) -> list[Pattern]:
        # Higher priority first; registration order breaks ties.
        pats = list(self._patterns.values())
        return sorted(pats, key=lambda p: -p.priority)

    def __contains__(self, name: str) -> bool:
        return name in self._patterns


REGISTRY = Registry()


def register(name: str, pattern: Callable | Sequence[Callable], replacement: Callable,
             example_inputs: Sequence[Any], *, constraints: Callable | Sequence[Callable] | None = None,
             priority: int = 0, allow_casts: bool = False, description: str = "",
             replace: bool = False, builtin: bool = False,
             look_alikes: dict[Callable, str] | None = None) -> Pattern:
    """Trace a pattern and add it to the registry (see ligerfx.register_pattern for the docs)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise PatternError(f"pattern name must be an identifier-like string, got {name!r}")
    fns = list(pattern) if isinstance(pattern, (list, tuple)) else [pattern]
    if not fns or not all(callable(f) for f in fns):
        raise PatternError(f"pattern {name!r}: `pattern` must be a function or a list of them")
    if not callable(replacement):
        raise PatternError(f"pattern {name!r}: `replacement` must be a function")
    if not isinstance(example_inputs, dict):
        example_inputs = tuple(example_inputs)
    if constraints is None:
        cons = []
    elif callable(constraints):
        cons = [constraints]
    else:
        cons = list(constraints)
    variants = [trace_variant(f, example_inputs, name) for f in fns]
    for fn, reason in (look_alikes or {}).items():
        if not callable(fn) or not isinstance(reason, str) or not reason:
            raise PatternError(f"pattern {name!r}: `look_alikes` maps functions to the reason "
                               "(a non-empty string) each is left alone")
        v = trace_variant(fn, example_inputs, name)
        v.refuse = reason
        variants.append(v)
    if len({len(v.outputs) for v in variants}) != 1:
        raise PatternError(f"pattern {name!r}: all variants must return the same number of outputs")
    if description == "":
        doc = inspect.getdoc(fns[0]) or ""
        description = doc.splitlines()[0] if doc else ""
    pat = Pattern(name, variants, replacement, example_inputs, cons, priority, allow_casts,
                  description, builtin)
    check_replacement(pat)
    return REGISTRY.add(pat, replace=replace)


def input_value(x: Any) -> Any:
    """The example value behind a bound pattern input (an fx node or a constant)."""
    return node_value(x) if isinstance(x, fx.Node) else x
