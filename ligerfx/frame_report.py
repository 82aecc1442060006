"""One report per compiled model, not per graph: what `ligerfx.backend.last_report` holds.

One `torch.compile` call makes several graphs: one per graph break (Dynamo compiles the code after
a break as a separate resume function), one per DDP bucket, and new versions on recompiles.  The
backend is called once per graph, so its report of one graph is only part of the answer.  Here the
graphs are grouped by the compiled object being called (the `OptimizedModule` or compiled
function whose Dynamo wrapper is the outermost on the Python stack while the backend runs) and by
the frame Dynamo compiled (`CompileId.frame_id`): a recompile of a frame, or a restart of its
compile (a new trace attempt), replaces that frame's graphs; the graphs of one attempt (DDP's
buckets) are all kept, in order.
"""

from __future__ import annotations

import copy
import os
import sys
import weakref
from typing import Any

from .compiler.report import Report

_EVAL_FRAME = os.path.join("_dynamo", "eval_frame.py")


def _owner() -> Any:
    """The compiled object whose call is compiling now, or None when none is found (a backend
    called by hand, or a Dynamo layout this does not know)."""
    owner = None
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename.endswith(_EVAL_FRAME):
            owner = frame.f_locals.get("self", owner)
        frame = frame.f_back
    return owner


def _compile_id() -> tuple:
    """(frame id, which compile of that frame): a recompile or a restart of the same compile
    (Dynamo retracing the frame, e.g. to specialise a constant) is a new second element."""
    try:
        from torch._guards import CompileContext

        trace = CompileContext.current_trace_id()
    except Exception:  # noqa: BLE001 - an older or newer torch without it: one graph per frame
        trace = None
    cid = getattr(trace, "compile_id", None)
    if cid is None:
        return (None, None)
    return (getattr(cid, "frame_id", None),
            (getattr(cid, "frame_compile_id", None), getattr(trace, "attempt", 0)))


class FrameReports:
    """The graphs compiled for the most recently compiling owner, merged into one `Report`."""

    def __init__(self):
        self._owner: Any = None  # weakref to the owner, or None
        # (frame_id, frame_compile_id, Report of one graph, what it returns: boundary.signature)
        self._graphs: list = []
        self._serial = 0  # graphs without a frame id (each one its own frame)

    def begin(self) -> list:
        """Start one graph: find its owner (a new owner starts afresh) and return what the
        owner's earlier graphs return, for `boundary.cut_reason`."""
        owner = _owner()
        current = self._owner() if self._owner is not None else None
        if owner is None or owner is not current:
            self._graphs = []
            try:
                self._owner = weakref.ref(owner) if owner is not None else None
            except TypeError:
                self._owner = None
        frame, attempt = _compile_id()
        # Other frames' graphs, and this compile's own earlier graphs (DDP's buckets are graphs of
        # one frame and attempt); not an earlier compile of this frame, which this one replaces.
        return [s for g in self._graphs if g[0] != frame or g[1] == attempt for s in g[3]]

    def add(self, report: Report, produced: list) -> Report:
        """Record one graph's report; returns the merged report of its owner's graphs."""
        frame, attempt = _compile_id()
        if frame is None:
            self._serial += 1
            frame, attempt = ("graph", self._serial), 0
        # A recompile of a frame supersedes its earlier graphs (the new guards are the live ones).
        self._graphs = [g for g in self._graphs if g[0] != frame or g[1] == attempt]
        self._graphs.append((frame, attempt, report, list(produced)))
        return self.merged()

    def merged(self) -> Report:
        out = Report()
        for g in self._graphs:
            out.extend(copy.deepcopy(g[2]))  # extend renumbers graphs in place: keep ours intact
        return out
