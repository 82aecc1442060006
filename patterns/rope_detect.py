"""Detector for rotary embeddings no rope pattern took (issue 23: a silent miss is a bug).

What a rotation is, by data flow: two parts of one tensor (halves, even/odd elements, the pieces
of an unbind / chunk, or the tensor and its rotate_half) each multiplied by a table that comes
from `cos` and `sin` of angles (through unsqueeze / expand / index / cast / cat / repeat and
scaling by a number), the two products added or subtracted, the sums recombined by cat / stack.
Or in complex numbers: a complex number built from the tensor (`view_as_complex`, `complex`)
times a complex table, read back as real numbers (`view_as_real`, `.real` / `.imag`).

Sinusoidal absolute embeddings (a table added to x), attention and ALiBi have no such products and
are never hits.  Tables that enter the graph precomputed (a buffer, an input) carry no `cos` node
to trace and are not seen: a known blind spot.
"""

from __future__ import annotations


from ligerfx.compiler.canonical import CNode, arg_cnodes
from ligerfx.compiler.detect import fx_nodes, name, op, register_detector, strip, users, writes_first

# Ops through which a cos/sin table stays the same table (reshaped, indexed, cast, repeated).
_TABLE_OPS = {"unsqueeze", "expand", "expand_as", "getitem", "slice", "cast", "cat", "stack",
              "repeat", "repeat_interleave", "view", "reshape", "unflatten", "flatten",
              "transpose", "permute", "squeeze", "index_select", "embedding", "neg", "clone",
              "to", "contiguous", "type_as", "float", "half", "bfloat16"}
# Ops that take a part of a tensor or rearrange its parts.
_PART_OPS = {"slice", "getitem", "unbind", "chunk", "split", "neg", "cast", "view", "reshape",
             "unflatten", "flatten", "narrow", "select", "cat", "stack", "contiguous", "clone"}
_RECOMBINE = {"cat", "stack"}
_PASS = {"cast", "view", "reshape", "flatten", "unflatten", "contiguous", "clone"}


def _number(a) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool)


def _tags(view) -> dict:
    """id(cnode) -> (kind, angles): a table of `kind` ("cos" / "sin") of the angle nodes."""
    tags: dict = {}
    for c in view.cnodes():
        if op(c) in ("cos", "sin") and c.args and isinstance(c.args[0], CNode):
            tags[id(c)] = (op(c), (c.args[0],))
            continue
        ts = list(arg_cnodes(c.args))
        tagged = [tags[id(t)] for t in ts if id(t) in tags]
        if not tagged:
            continue
        if op(c) in ("mul", "div") and len(ts) == 1 and any(_number(a) for a in c.args):
            tags[id(c)] = tagged[0]  # scaled (attention_scaling)
        elif op(c) in _TABLE_OPS and len({k for k, _ in tagged}) == 1:
            if op(c) in ("cat", "stack") and len(tagged) != len(ts):
                continue  # a table next to something else is no table
            angles = tuple({id(a): a for _, ang in tagged for a in ang}.values())
            tags[id(c)] = (tagged[0][0], angles)
    return tags


def _bases(view, tags, written) -> dict:
    """id(cnode) -> (root, dims): the tensor a part was taken from and the dims it was cut on.
    `written` gets id(cnode) -> the in-place write its value went through."""
    bases: dict = {}
    for c in view.cnodes():
        if id(c) in tags:
            continue
        ts = list(arg_cnodes(c.args))
        for t in ts:
            if id(t) in written and op(c) in _PART_OPS:
                written[id(c)] = written[id(t)]
        if ts and writes_first(c):
            # the written tensor itself, read after the write: the same root as before it
            bases[id(c)] = bases.get(id(ts[0]), (ts[0], frozenset()))
            written[id(c)] = c
            continue
        if op(c) in _PART_OPS and ts:
            if op(c) in _RECOMBINE:
                got = [bases.get(id(t), (t, frozenset())) for t in ts]
                roots = {id(r) for r, _ in got}
                if len(roots) == 1:
                    dim = c.args[1] if len(c.args) > 1 and isinstance(c.args[1], int) else None
                    dims = frozenset().union(*(d for _, d in got)) | (
                        {dim} if dim is not None else set())
                    bases[id(c)] = (got[0][0], dims)
                continue
            src = ts[0]
            root, dims = bases.get(id(src), (src, frozenset()))
            if op(c) == "slice" and isinstance(c.args[1], int):
                dims = dims | {c.args[1]}
            bases[id(c)] = (root, dims)
    return bases


def _product(c, tags, bases):
    """(part, root, dims, kind, angles) when `c` is a part of a tensor times a cos/sin table."""
    c = strip(c, ("cast", "neg"))
    if not isinstance(c, CNode) or op(c) != "mul" or len(c.args) != 2:
        return None
    a, b = c.args
    if not isinstance(a, CNode) or not isinstance(b, CNode):
        return None
    if id(a) in tags and id(b) not in tags:
        a, b = b, a
    if id(b) not in tags or id(a) in tags:
        return None
    root, dims = bases.get(id(a), (a, frozenset()))
    kind, angles = tags[id(b)]
    return c, a, root, dims, kind, angles


def _up(c, use) -> CNode:
    """Where a rotated sum is recombined: the cat / stack it reaches through reshapes and casts."""
    seen = 0
    while seen < 6:
        us = use.get(id(c), [])
        if len(us) != 1:
            return c
        u = us[0]
        if op(u) in _RECOMBINE:
            return u
        if op(u) not in _PASS:
            return c
        c, seen = u, seen + 1
    return c


def _unique(cs) -> tuple:
    return tuple({id(c): c for c in cs}.values())


def _angle_names(angles) -> str:
    return ", ".join(name(a) for a in angles)


def _why(sums, written) -> str:
    """Which condition of a rotation the hit fails, where that can be told."""
    for _, p, q in sums:
        w = written.get(id(p[1])) or written.get(id(q[1]))
        if w is not None:
            where = w.nodes[0].meta.get("stack_trace", "").strip().splitlines()[-1:] if w.nodes else []
            what = w.args[0] if w.args and isinstance(w.args[0], CNode) else p[2]
            return (f"{name(what)} is written in place ({op(w)}{': ' + where[0].strip() if where else ''}) "
                    "while its parts are read: the rotated parts are not one value of the tensor, "
                    "so this is no rotation the rope kernel can compute")
    # (The kernel takes any cos and sin tables, of one angle or not; what it needs is the same
    # pair of tables for both elements of a pair.)
    tables = {(frozenset(id(a) for a in p[5]), frozenset(id(a) for a in q[5])) for _, p, q in sums}
    if len(tables) > 1:
        return ("its rotated parts use different angle tables "
                f"({'; '.join(_angle_names(_unique(p[5] + q[5])) for _, p, q in sums)}): the rope kernel "
                "rotates both elements of a pair by one cos / sin table")
    dims = set().union(*(p[3] | q[3] for _, p, q in sums))
    off = sorted(d for d in dims if isinstance(d, int) and d != -1)
    if off:
        return (f"it rotates along dim {off[0]}, not the last dim (the rope kernel rotates pairs "
                "of the last dim; move that dim last with transpose before rotating)")
    p = sums[0][1]
    return (f"parts of {name(p[2])} times cos / sin of {_angle_names(p[5])}, added and "
            "recombined in a spelling no rope pattern takes")


def _real_rotations(view, tags, bases, use, written):
    by_end: dict = {}
    for c in view.cnodes():
        if op(c) not in ("add", "sub") or len(c.args) != 2 or not c.nodes:
            continue
        p, q = (_product(a, tags, bases) for a in c.args)
        if p is None or q is None or p[2] is not q[2] or p[1] is q[1] or {p[4], q[4]} != {
                "cos", "sin"}:
            continue
        if p[4] == "sin":
            p, q = q, p
        end = _up(c, use)
        by_end.setdefault(id(end), (end, []))[1].append((c, p, q))
    for end, sums in by_end.values():
        covered = fx_nodes(end, *(x for s, p, q in sums for x in (s, p[0], q[0])))
        anchor = end.nodes[0] if end.nodes else sums[0][0].nodes[0]
        yield anchor, covered, _why(sums, written)


def _complex_built(c, bases):
    """The real tensor a complex number was built from (`view_as_complex`, `complex(a, b)`)."""
    c = strip(c, ("cast", "view", "reshape", "unflatten"))
    if not isinstance(c, CNode):
        return None
    if op(c) == "view_as_complex" and isinstance(c.args[0], CNode):
        return c, c.args[0], "view_as_complex"
    if op(c) == "complex" and len(c.args) == 2 and all(isinstance(a, CNode) for a in c.args):
        ra, rb = (bases.get(id(a), (a, None))[0] for a in c.args)
        if ra is rb:
            return c, ra, "complex() of two parts"
    return None


def _is_complex(c) -> bool:
    v = c.value if isinstance(c, CNode) else None
    return getattr(getattr(v, "dtype", None), "is_complex", False)


def _reads_real(c, use) -> bool:
    """Whether the complex product is read back as real numbers."""
    frontier, depth = [c], 0
    while frontier and depth < 4:
        nxt = []
        for x in frontier:
            for u in use.get(id(x), []):
                if op(u) in ("view_as_real", "real", "imag") or (
                        op(u) == "getattr" and len(u.args) > 1 and u.args[1] in ("real", "imag")):
                    return True
                if op(u) in _PASS:
                    nxt.append(u)
        frontier, depth = nxt, depth + 1
    return False


def _complex_rotations(view, bases, use):
    for c in view.cnodes():
        if op(c) != "mul" or len(c.args) != 2 or not c.nodes:
            continue
        for a, b in (c.args, c.args[::-1]):
            built = _complex_built(a, bases)
            if built is None or not _is_complex(b) or _complex_built(b, bases) is not None:
                continue
            if not _reads_real(c, use):
                continue
            how = built[2]
            why = (f"{name(built[1])} as complex numbers ({how}) times the complex table "
                   f"{name(b)}, read back as real numbers, in a spelling no rope pattern takes")
            yield c.nodes[0], fx_nodes(c, built[0]), why
            break


def detect_rope(view):
    tags = _tags(view)
    written: dict = {}
    bases = _bases(view, tags, written)
    use = users(view)
    yield from _real_rotations(view, tags, bases, use, written)
    yield from _complex_rotations(view, bases, use)


register_detector("rope", detect_rope, patterns=("rope", "rope_single"),
                  looks_like="a rotary embedding")
