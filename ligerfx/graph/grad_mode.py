"""Autograd on/off inside a match: which inputs the replacement must detach, or why it cannot.

Dynamo records `torch.no_grad()` / `torch.enable_grad()` blocks as `_set_grad_enabled(bool)` calls
in the graph, so nodes of one match may run in different modes (a distillation loss computes the
teacher's logits under `no_grad`, the student's with gradients).  The fused op runs in the one mode
of its insertion point.  That gives eager's gradients when every part of the match that ran with
autograd off reads only inputs the op may treat as constants: those inputs are passed detached,
which is exactly what `no_grad` did to them.  An input read both with and without autograd, or a
part that ran with autograd on where the op would run with it off, cannot be expressed: refused
(unless none of that part's inputs requires grad: it then computes the same in either mode).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .nodes import node_value

_SET = {"_set_grad_enabled", "set_grad_enabled"}
_OTHER = {"_enter_inference_mode", "_exit_inference_mode", "inference_mode"}
AMBIENT, UNKNOWN = "ambient", "unknown"  # the graph's caller's mode; a switch we cannot read


def _switch(n: fx.Node):
    """The mode a node switches to (True / False / UNKNOWN), or None if it switches nothing."""
    if n.op != "call_function":
        return None
    name = getattr(n.target, "__name__", "")
    if name in _SET:
        arg = n.args[0] if n.args else n.kwargs.get("mode")
        return arg if isinstance(arg, bool) else UNKNOWN
    if name in _OTHER:
        return UNKNOWN
    return None


def modes(graph: fx.Graph) -> dict:
    """node -> the autograd mode it runs in: True, False, AMBIENT (no switch before it) or UNKNOWN.

    The caller's mode is known to be on when a value computed in it requires grad (Dynamo's
    example values are computed in the traced mode, and Dynamo guards on that mode)."""
    mode, out = AMBIENT, {}
    for n in graph.nodes:
        out[n] = mode
        s = _switch(n)
        if s is not None:
            mode = s
    if any(m == AMBIENT and n.op != "placeholder" and getattr(node_value(n), "requires_grad", False)
           for n, m in out.items()):
        out = {n: (True if m == AMBIENT else m) for n, m in out.items()}
    return out


def _reads_no_grad(n: fx.Node) -> bool:
    """Neither `n` nor any of its inputs is known (from the example values) to require grad (a
    factory asked for `requires_grad=True` reads nothing but makes a leaf that does)."""
    def free(v):
        if isinstance(v, torch.Tensor):
            return not v.requires_grad
        return isinstance(v, (bool, int, float, torch.SymInt, torch.SymFloat, torch.SymBool))
    return free(node_value(n)) and all(free(node_value(a)) for a in n.all_input_nodes)


def plan(match, where: fx.Node | None) -> tuple[str | None, set]:
    """(problem, bound input nodes to pass detached) for replacing `match` before `where`."""
    graph = match.graph
    if not any(_switch(n) is not None for n in graph.nodes):
        return None, set()
    m = modes(graph)
    here = m.get(where, AMBIENT) if where is not None else AMBIENT
    if where is None:  # the replacement would run after the last node
        last = list(graph.nodes)[-1]
        here = m[last] if _switch(last) is None else _switch(last)
    covered = [n for n in match.covered if n in m]
    if all(m[n] == here for n in covered):
        return None, set()
    if here == UNKNOWN or any(m[n] == UNKNOWN for n in covered):
        return "autograd is switched inside the pattern in a way ligerfx cannot read", set()
    # The op runs with autograd as at `here`: parts that ran with it off read constants (detach
    # their inputs); parts that ran with it on where the op runs with it off (or in the
    # caller's unknown mode) would lose their gradients.
    off = [n for n in covered if m[n] is False and here is not False]
    # A node none of whose inputs requires grad computes the same value, requiring no grad, in
    # either mode (HRM: a device `.to` after `no_grad` ends, absorbed as the norm's trailing cast).
    wrong = [n for n in covered if m[n] != here and m[n] is not False
             and not (here is False and _reads_no_grad(n))]
    if wrong:
        n = wrong[0]
        return (f"`{n.name}` runs with autograd {'on' if m[n] is True else 'as the caller set it'} "
                "inside the pattern while the fused op would run with it "
                f"{'off' if here is False else 'as the caller set it'}"), set()
    bound = {b for b in match.bindings.values() if isinstance(b, fx.Node)}
    inside = set(covered)
    on_reads = {a for n in covered if m[n] is not False for a in n.all_input_nodes}
    detach = set()
    for n in off:
        for a in n.all_input_nodes:
            if a in inside:
                if m[a] is not False and getattr(node_value(a), "requires_grad", False):
                    # eager's block sees it as a constant; the op would differentiate through it
                    return (f"`{n.name}` reads `{a.name}` inside a `torch.no_grad()` block, where "
                            "the pattern computed it with autograd on; the fused op would run "
                            "in one mode"), set()
                continue
            if a in on_reads or a not in bound:
                return (f"`{a.name}` is read both inside and outside a `torch.no_grad()` block of "
                        "the pattern; the fused op would run in one mode"), set()
            detach.add(a)
    # a value computed under no_grad inside the match and read by a part with autograd on is a
    # constant there too: it requires no grad, and the op computes it from detached inputs
    return None, detach
