"""`ligerfx.explain`: what the liger backend would rewrite in a model, without compiling it.

The model is traced by Dynamo exactly as `torch.compile` traces it (one report entry per captured
graph); each graph is rewritten on a copy, and the model then runs its original, unrewritten
graph once to finish the call.  No inner backend runs and no kernel is launched.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from .backend import rewrite
from .options import Options
from .compiler.report import Report


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    g = fx.Graph()
    out = g.graph_copy(gm.graph, {})
    g.output(out)
    return fx.GraphModule(gm, g)


def trace_and_rewrite(model: Any, args: tuple, kwargs: dict, options: Options,
                      keep: list | None = None) -> Report:
    """Trace like torch.compile, rewrite a copy of each graph, run the original once.

    `keep`, when given, receives a (before, after) pair of GraphModules per captured graph.
    """
    report = Report()
    returned: list = []  # what the graphs so far return (a later one may start where they end)

    def capture(gm: fx.GraphModule, example_inputs):
        work = _copy(gm)
        if keep is not None:
            keep.append((_copy(gm), work))
        produced: list = []
        r = rewrite(work, options, list(returned), produced)
        returned.extend(produced)
        r.graphs_before.append(gm.code)
        r.graphs_after.append(work.code)
        report.extend(r)
        return gm.forward

    # Tracing the same forward code for many module types (a test zoo, a sweep) must not hit
    # Dynamo's recompile limit and silently fall back to eager, capturing nothing.
    with torch._dynamo.config.patch(recompile_limit=1 << 20, accumulated_recompile_limit=1 << 20):
        torch.compile(model, backend=capture)(*args, **kwargs)
    if report.graphs == 0:
        report.notes.append("Dynamo captured no graph (the call ran eagerly); nothing to rewrite")
    return report


def explain(model: Any, *args: Any, options: dict | Options | None = None, **kwargs: Any) -> Report:
    """Trace `model(*args, **kwargs)` with Dynamo and report the rewrites the backend would make.

    Returns a `Report` with `.counts`, `.matches`, `.near_misses`, `.to_dict()` and a readable
    `str()`.  The model's forward runs once (its original graph, on the given inputs).
    """
    return trace_and_rewrite(model, args, kwargs, Options.from_any(options))
