"""Detectors: no silent misses.  A subgraph that looks like an instance of a pattern family but
was neither rewritten nor reported gets a near miss saying what was seen.

Patterns match spellings; a detector recognises a family by its math and data flow (a rotary
embedding multiplies parts of one tensor by the cos and sin of the same angles and recombines
them), independently of any pattern.  After the rewrite pass, each registered detector whose
family has an enabled pattern reads the canonical view of the rewritten graph and yields hits:
(anchor node, covered nodes, message).  A hit none of whose nodes was rewritten and on which no
near miss already sits becomes a `NearMiss` named after the family, whose reason reads
"looks like <what> but no <family> pattern matched: <message>".

Registration is public (`ligerfx.register_detector`); the compiler never names a family.  A
detector must be cheap (linear in the graph) and must not fire on look-alikes.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch.fx as fx

from .canonical import View
from .report import NearMiss
from ligerfx.graph.source import locate

log = logging.getLogger("ligerfx")


@dataclass(eq=False)
class Detector:
    family: str
    fn: Callable  # fn(view) -> iterable of (anchor fx node, covered fx nodes, message)
    patterns: tuple  # names of the patterns of the family: it runs when one is enabled
    looks_like: str  # "a rotary embedding": how the reason names what was seen


_DETECTORS: dict[str, Detector] = {}
_lock = threading.Lock()


def register_detector(family: str, fn: Callable, patterns: Sequence[str] = (), *,
                      looks_like: str | None = None, replace: bool = False) -> Detector:
    """Register `fn(view)` as the detector of `family` (see the module docstring).

    patterns: names of the patterns that rewrite the family; the detector runs only when one of
        them is enabled (none given: always).
    looks_like: what a hit looks like, for the reason ("a rotary embedding"); default the family.
    """
    if not isinstance(family, str) or not family.isidentifier():
        raise ValueError(f"detector family must be an identifier-like string, got {family!r}")
    if not callable(fn):
        raise ValueError(f"detector {family!r}: `fn` must be a function of the canonical view")
    if isinstance(patterns, str):
        patterns = (patterns,)
    det = Detector(family, fn, tuple(patterns), looks_like or family)
    with _lock:
        if family in _DETECTORS and not replace:
            raise ValueError(f"a detector for {family!r} is already registered; pass "
                             "replace=True to replace it")
        _DETECTORS[family] = det
    return det


def unregister_detector(family: str) -> None:
    with _lock:
        _DETECTORS.pop(family, None)


def detectors() -> list[Detector]:
    return list(_DETECTORS.values())


def run_detectors(graph: fx.Graph, enabled: Iterable[str], claimed: set, missed: set,
                  position: dict) -> list[NearMiss]:
    """Near misses for the detectors' hits in `graph` (already rewritten).

    enabled: names of the patterns this compile ran; claimed: fx nodes rewrites took or created;
    missed: fx nodes a near miss already covers; position: node -> index before any rewrite."""
    enabled = set(enabled)
    active = [d for d in detectors() if not d.patterns or enabled & set(d.patterns)]
    if not active:
        return []
    view = View(graph)
    out: list[NearMiss] = []
    taken: set = set()  # one near miss per subgraph, whichever family saw it first
    for det in active:
        try:
            hits = list(det.fn(view))
        except Exception as e:  # noqa: BLE001 - a detector's bug must never break a compile
            log.warning("ligerfx: detector %r failed: %s: %s", det.family, type(e).__name__, e)
            continue
        for anchor, covered, message in hits:
            nodes = set(covered) | {anchor}
            if nodes & claimed or nodes & missed or anchor in taken:
                continue
            taken.add(anchor)
            missed |= nodes
            reason = (f"looks like {det.looks_like} but no {det.family} pattern matched: "
                      f"{message}")
            out.append(NearMiss(det.family, locate(anchor), reason,
                                position=position.get(anchor, -1), size=len(nodes)))
    return out


# -- helpers for detectors ---------------------------------------------------------------------


def strip(c, ops=("cast",)):
    """`c` with the ops named (each a one-input value op: casts by default) peeled off its top."""
    from .canonical import CNode

    while isinstance(c, CNode) and op(c) in ops and c.args and isinstance(c.args[0], CNode):
        c = c.args[0]
    return c


def writes_first(c) -> bool:
    """Whether canonical node `c` writes its first argument in place (`q += 1`, `q.mul_(2)`):
    its value is that tensor's, after the write."""
    from ligerfx.graph.mutation import written_args

    n = c.nodes[0] if getattr(c, "nodes", None) else None
    first = n.args[0] if n is not None and n.args else None
    return isinstance(first, fx.Node) and any(w is first for w in written_args(n))


def written_base(c):
    """The tensor behind in-place writes: `q += 1` rebinds q to the write's result, which is still
    q's tensor (a detector that compares tensors by node must see them as one)."""
    from .canonical import CNode

    while isinstance(c, CNode) and c.args and isinstance(c.args[0], CNode) and writes_first(c):
        c = c.args[0]
    return c


def rewritten_by(c) -> str | None:
    """The name of the pattern whose rewrite made canonical node `c` (None for the graph's own
    code): on the rewritten graph a detector sees what a rewrite computes only through this, a
    look-alike whose tail another family's pattern took (a broken centring normalised by an RMS
    norm) still being its near miss."""
    from .rewriter import PATTERN_META

    for n in getattr(c, "nodes", ()):
        got = n.meta.get(PATTERN_META)
        if got is not None:
            return got
    return None


def users(view: View) -> dict:
    """id(canonical node) -> the canonical nodes that read it, for walking down the data flow."""
    return view.users()


def fx_nodes(*cs) -> list:
    """The fx nodes behind canonical nodes (theirs and those they folded)."""
    out = []
    for c in cs:
        for n in getattr(c, "covers", ()):
            if n not in out:
                out.append(n)
    return out


def name(c) -> str:
    """A canonical node's fx name, for messages."""
    n = getattr(c, "node", None)
    return f"`{n.name}`" if n is not None else "?"


def op(c) -> str:
    """A canonical node's op without its module (`torch.nn.functional.mish` -> `mish`): ops the
    view has no form for keep the full name of their target."""
    return c.op.rsplit(".", 1)[-1] if hasattr(c, "op") else ""
