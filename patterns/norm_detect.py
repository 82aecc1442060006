"""Detector for RMS norms no norm pattern took (issue 23: a silent miss is a bug).

What an RMS norm is, by data flow: the mean of the squares of x over its last dim (a `mean`, or a
`sum` scaled by a number), plus eps or not, whose reciprocal square root (`rsqrt`, `1 / sqrt`,
`sqrt` then divide: the canonical view spells them all `rsqrt`) multiplies x itself (also through
a weight multiplied first).  A mean of squares with no rsqrt (a loss) is never a hit, nor a sum of
squares alone (an L2 norm, which the rms_norm pattern reports itself).
"""

from __future__ import annotations

from ligerfx.compiler.canonical import CNode
from ligerfx.compiler.detect import (fx_nodes, name, op, register_detector, rewritten_by, strip,
                                     users, written_base)


def _number(a) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool)


def _mean_of_squares(c):
    """(mean node, x) when `c` is mean(x², last dim) (or sum(x², last dim) scaled by a number)."""
    c = strip(c)
    if not isinstance(c, CNode):
        return None
    if op(c) in ("mul", "div") and len(c.args) == 2 and _number(c.args[1]):
        c2 = strip(c.args[0])
        if isinstance(c2, CNode) and op(c2) == "sum":
            c = c2
        else:
            return None
    elif op(c) != "mean":
        return None
    if len(c.args) < 2 or c.args[1] != (-1,):
        return None
    sq = strip(c.args[0])
    if not isinstance(sq, CNode) or op(sq) != "square":
        return None
    return c, strip(sq.args[0])


def _scaled(c):
    """(rsqrt node, its argument) when `c` is an rsqrt (through casts)."""
    c = strip(c)
    if isinstance(c, CNode) and op(c) == "rsqrt" and isinstance(c.args[0], CNode):
        return c, c.args[0]
    return None


def _eps_and_mean(v):
    """(mean match, eps description or None) for the rsqrt's argument."""
    v = strip(v)
    if not isinstance(v, CNode):
        return None, None
    hit = _mean_of_squares(v)
    if hit is not None:
        return hit, "no eps is added to the mean of squares"
    if op(v) == "add" and len(v.args) == 2:
        for m, e in (v.args, v.args[::-1]):
            hit = _mean_of_squares(m)
            if hit is not None:
                if isinstance(e, CNode):
                    return hit, (f"its eps {name(e)} is a tensor; the norm kernels take eps as a "
                                 "Python number")
                return hit, None
    if op(v) in ("clamp", "clamp_min", "maximum", "max") and v.args:
        hit = _mean_of_squares(v.args[0])
        if hit is not None:
            # the op as the code spells it (the canonical view makes clamp_min a clamp)
            spelled = v.nodes[0].target if v.nodes else op(v)
            spelled = getattr(spelled, "__name__", spelled)
            return hit, (f"eps bounds the mean with `{spelled}` instead of being added to it "
                         "(not the math of the norm kernels)")
    return None, None


def _multiplies(x, other):
    """"same" when `other` is x (through casts), or x times something (a weight applied first);
    "written" when it is x only through an in-place write of x (`x += 1` between the mean of
    squares and the product: the two read different values); None otherwise."""
    o = strip(other)
    cands = [o] + ([strip(a) for a in o.args if isinstance(a, CNode)]
                   if isinstance(o, CNode) and op(o) == "mul" else [])
    if any(c is x for c in cands):
        return "same"
    if any(_base(c) is _base(x) for c in cands):
        return "written"
    return None


def _base(c):
    # the tensor behind in-place writes, through casts (`hf = h.float(); hf += 1`: in fp32 the
    # cast is h itself, and either way the mean and the product read different values)
    return strip(written_base(strip(c)))


def _rsqrt_products(view, hit_of):
    """The hits `hit_of(product, (rsqrt node, its argument), other factor)` reports over each
    `a * rsqrt(v)` in the view (the norm detectors' shared walk): each rsqrt and each product
    reported once."""
    seen: set = set()
    for c in view.cnodes():
        if op(c) != "mul" or len(c.args) != 2 or not c.nodes:
            continue
        for r, other in (c.args, c.args[::-1]):
            got = _scaled(r)
            if got is None or id(got[0]) in seen:
                continue
            hit = hit_of(c, got, other)
            if hit is not None:
                seen.add(id(got[0]))
                yield hit
                break


def _rms_hit(c, got, other):
    hit, why = _eps_and_mean(got[1])
    same = _multiplies(hit[1], other) if hit is not None else None
    if same is None:
        return None
    if _centre(hit[1]) is not None and _layer_norm_hit(c, got, other) is not None:
        # the normalised value is a centring: a layer norm look-alike, which its own detector
        # reports (first come would name the RMS norm's family; issue 22 long run, layer_norm
        # seeds 26407 and 5111: `xc += 1.0` between the variance and the product)
        return None
    mean, x = hit
    if same == "written":
        why = (f"{name(_base(x))} is written in place between its mean of squares "
               "and the product, which read two different values of it: no norm")
    what = why or ("x * rsqrt(mean(x², -1) + eps) of "
                   f"{name(x)}, in a spelling (casts, order of the weight) no norm "
                   "pattern takes")
    return c.nodes[0], fx_nodes(c, got[0], mean), what


def detect_rms_norm(view):
    yield from _rsqrt_products(view, _rms_hit)


register_detector("rms_norm", detect_rms_norm,
                  patterns=("rms_norm", "add_rms_norm", "gated_rms_norm"),
                  looks_like="an RMS norm")


# -- layer norms ---------------------------------------------------------------------------------
# What a layer norm is, by data flow: a value centred by its own mean over the last dim
# (x - mean(x, -1)), whose variance (`var`, or a mean of squares of the centred value) plus eps
# goes through an rsqrt that multiplies the centred value.  A hit needs the centring on the
# variance's side or the product's side, so an RMS norm (no centring) is never one.  Where an
# RMS-norm rewrite took the product, a centring whose reads of x differ (a write between them) is
# the hit, anchored on what the rewrite left (`_written_centrings`).


def _centre(v):
    """(x, written) when `v` is x - mean(x', -1) with x' x itself or x through in-place writes
    (`written`: the two read different values), through casts and writes of the result; else
    None."""
    v = _base(v)
    if not (isinstance(v, CNode) and op(v) == "sub" and len(v.args) >= 2):
        return None
    a, m = v.args[0], strip(v.args[1])
    if not (isinstance(m, CNode) and op(m) == "mean" and len(m.args) >= 2 and m.args[1] == (-1,)):
        return None
    if _base(a) is not _base(m.args[0]):
        return None
    return _base(a), strip(a) is not strip(m.args[0])


def _variance(v):
    """(variance node, its input) when `v` is var(y, -1) or mean(y², -1), plus eps or not."""
    v = strip(v)
    cands = [v] + (list(v.args[:2]) if isinstance(v, CNode) and op(v) == "add" else [])
    for c in cands:
        c = strip(c)
        if isinstance(c, CNode) and op(c) == "var" and len(c.args) >= 2 and c.args[1] == (-1,):
            return c, strip(c.args[0])
        hit = _mean_of_squares(c)
        if hit is not None:
            return hit
    return None


def _layer_norm_hit(c, got, other):
    hit = _variance(got[1])
    if hit is None:
        return None
    var, y = hit
    o = strip(other)
    factors = [o] + ([strip(a) for a in o.args if isinstance(a, CNode)]
                     if isinstance(o, CNode) and op(o) == "mul" else [])
    # the product's factor: the variance's input itself (or it through writes), or the centred
    # value of it (`var` centres its input itself)
    f = next((f for f in factors if _base(f) is _base(y)
              or (_centre(f) or (None,))[0] is _base(y)), None)
    centres = [ct for ct in (_centre(y), _centre(f) if f is not None else None) if ct]
    if f is None or not centres:
        return None
    written = (any(strip(v) is not _base(v) for v in (y, f))
               or (f is not y and _base(f) is _base(y)) or any(w for _, w in centres))
    x = centres[0][0]
    what = (f"{name(x)} (or its centred value) is written in place between the uses the "
            "norm reads (its mean, its variance, the product read different values): no "
            "layer norm") if written else (
            f"(x - mean(x)) * rsqrt(var + eps) of {name(x)}, in a spelling no layer norm "
            "pattern takes")
    return c.nodes[0], fx_nodes(c, got[0], var), what


# Patterns whose kernel normalises its first input by its RMS over the last dim: on the rewritten
# graph such a call is the product `x * rsqrt(mean(x²) + eps)` the walk above no longer sees.
_RMS_OF_FIRST = ("rms_norm", "gated_rms_norm")


def _rms_normalised(c, readers):
    """Whether the value of `c` (through casts) is the input an RMS-norm rewrite normalises."""
    todo, seen = [c], set()
    while todo:
        v = todo.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        for r in readers.get(id(v), ()):
            if op(r) == "cast":
                todo.append(r)
            elif rewritten_by(r) in _RMS_OF_FIRST and r.args and r.args[0] is v:
                return True
    return False


def _written_centrings(view):
    """Centrings x - mean(x, -1) whose two reads of x see different values (an in-place write of x
    between them), normalised by an RMS norm another pattern rewrote: the RMS norm of the value
    is right, but no layer norm is there (the centred value is not x - mean(x)), and the product
    the rsqrt walk looks for is gone into the rewrite."""
    readers = users(view)
    for v in view.cnodes():
        if op(v) != "sub" or not v.nodes:
            continue
        got = _centre(v)
        if got is None or not got[1] or not _rms_normalised(v, readers):
            continue
        x, m = got[0], strip(v.args[1])
        # the read that is not x itself is x after the write
        writes = [w for w in (strip(v.args[0]), strip(m.args[0])) if w is not x]
        what = (f"{name(x)} is written in place (by {', '.join(name(w) for w in writes)}) "
                f"between its mean {name(m)} and the centring {name(v)}: the two read different "
                f"values of it, so {name(v)} is not {name(x)} - mean({name(x)}) and its RMS norm "
                "(rewritten as one) is no layer norm")
        yield v.nodes[0], fx_nodes(v, m), what


def detect_layer_norm(view):
    yield from _rsqrt_products(view, _layer_norm_hit)
    yield from _written_centrings(view)


register_detector("layer_norm", detect_layer_norm, patterns=("layer_norm", "add_layer_norm"),
                  looks_like="a layer norm")
