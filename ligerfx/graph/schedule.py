"""Making room for a multi-output replacement: move pure users of an early output below the
last input.

One replacement computes all outputs of a multi-output match (q and k rotated in one launch), so
it must sit after every input.  Code that uses its first output before the second input exists
(DeepSeek-V4 rotates q, concatenates it with the unrotated channels, and only then computes k)
leaves no such place.  When every node in the way is a pure function of its arguments, moving
those users (and their users) below the last input changes nothing a program can observe: no
value they read is written in between, and no random number is drawn out of order by them.
"""

from __future__ import annotations

import torch.fx as fx

from .nodes import CAST_METHODS, FUNCTIONS, node_pure


def _movable(n: fx.Node) -> bool:
    """A node whose result depends only on its arguments and which has no effect of its own."""
    if n.op == "call_method":
        return n.target in CAST_METHODS or node_pure(n)
    if n.op != "call_function" or n.kwargs.get("inplace") or "out" in n.kwargs:
        return False
    try:
        known = n.target in FUNCTIONS
    except TypeError:  # an unhashable target
        known = False
    return known or node_pure(n)


def make_room(match, order_ok) -> str | None:
    """Reorder the graph so `match` can be rewritten; None on success, else why it cannot.

    `order_ok(match)` says whether a place for the replacement exists (the rewriter's rule)."""
    graph = match.graph
    nodes = list(graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    inputs = [b for b in match.bindings.values() if isinstance(b, fx.Node)]
    if not inputs:
        return "its outputs are used before all of its inputs are computed"
    last = max(inputs, key=pos.__getitem__)
    limit = pos[last]
    covered = set(match.covered)
    early = [(o, u) for o in match.outputs for u in o.users
             if u not in covered and pos[u] <= limit]
    if not early:
        return "its outputs are used before all of its inputs are computed"
    out, user = early[0]
    move: set = set()
    stack = [u for _, u in early]
    while stack:
        n = stack.pop()
        if n in move:
            continue
        if not _movable(n):
            return (f"output `{out.name}` is used by `{user.name}` before input `{last.name}` "
                    f"is computed, and `{n.name}` on the way is not a pure op that could be "
                    "moved below it")
        move.add(n)
        stack.extend(u for u in n.users if pos[u] <= limit and u not in covered)
    first = min(pos[n] for n in move)
    # Nothing the moved nodes need may come from themselves: the last input's ancestors.
    seen, stack = set(), list(inputs)
    while stack:
        n = stack.pop()
        if n in seen or pos[n] < first:
            continue
        seen.add(n)
        if n in move:
            return (f"`{n.name}` uses an output of the pattern and is needed to compute input "
                    f"`{last.name}`")
        stack.extend(a for a in n.all_input_nodes)
    for n in nodes[first:limit + 1]:
        if n not in move and n not in covered and n.op not in ("placeholder", "get_attr") \
                and not _movable(n):
            return (f"an output is used by `{min(move, key=pos.__getitem__).name}` before input "
                    f"`{last.name}` is computed, and `{n.name}` in between may have effects (a "
                    "write or random numbers), so those uses cannot be moved past it")
    prev = last
    for n in sorted(move, key=pos.__getitem__):
        prev.append(n)
        prev = n
    if not order_ok(match):
        return "its outputs are used before all of its inputs are computed"
    return None
