"""Detector for per-token log-probs of an lm head that no pattern took (issue 22: a silent miss
is a bug).

What a per-token log-prob is, by data flow: the gather, along the vocabulary (last) dim, of a
log-softmax over that dim (`log_softmax(z, -1).gather(-1, idx)`), or the gathered logits minus
their logsumexp over that dim (`z.gather(-1, idx) - z.logsumexp(-1)`), where the logits `z` come
from a linear layer through the row-wise chain the loss patterns read (casts, slices, scaling).
Casts may sit anywhere between those pieces: the `fused_linear_logprob` pattern reads none inside
the log-prob (a log-softmax rounded to fp16 before the gather), so such code is reported here,
naming each cast, instead of being left alone without a word.  Logits from no linear (no lm head)
are never a hit: the plain loss patterns take those.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ligerfx.compiler.canonical import CAST, CNode
from ligerfx.compiler.detect import fx_nodes, name, op, register_detector, strip
from ligerfx.graph.mutation import Memory, describe, written_args

from .cross_entropy import _linear
from .logprob import _walk_from


def _through_casts(c):
    """(value under the casts on top of `c`, the casts' canonical nodes, top first)."""
    casts = []
    while isinstance(c, CNode) and c.op == CAST and c.args and isinstance(c.args[0], CNode):
        casts.append(c)
        c = c.args[0]
    return c, casts


def _lm_logits(z) -> bool:
    """Whether the logits `z` (a canonical node) are an lm head's: a linear above the row-wise
    chain."""
    if not isinstance(z, CNode) or z.node is None:
        return False
    top, _ = _walk_from(z.node, None)
    return _linear(top) is not None


def describe_write(writer: fx.Node) -> str:
    return f"`{writer.name}` writes `{writer.args[0].name}` in place"


def _cast_words(casts) -> str:
    real = [c for c in reversed(casts) if not c.identity]  # in program order
    return ", ".join(f"{name(c)} (to {str(c.args[1]).replace('torch.', '')})" for c in real)


def _gathered(c):
    """(gather node, squeeze node or None) when `c` is gather(x, -1, idx), squeezed at -1 or not."""
    c = strip(c)
    if isinstance(c, CNode) and op(c) == "squeeze" and c.args[1:2] == (-1,):
        g = strip(c.args[0])
        sq = c
    else:
        g, sq = c, None
    if isinstance(g, CNode) and op(g) == "gather" and len(g.args) >= 3 and g.args[1] == -1:
        # one id per row (a trailing unit dim): a gather of several (top-k) is no log-prob
        idx = getattr(g.args[2], "value", None)
        if isinstance(idx, torch.Tensor) and idx.dim() >= 1 and idx.shape[-1] == 1:
            return g, sq
    return None


def _message(casts, first: str, second: str) -> str:
    words, n = _cast_words(casts), sum(not c.identity for c in casts)
    if words:
        return (f"the cast{'s' if n > 1 else ''} {words} {'sit' if n > 1 else 'sits'} between the {first} and the {second}; the pattern reads "
                "no cast inside a log-prob (the fused kernel gives the log-prob before any "
                "rounding), so the rounding cannot be reproduced there")
    return f"the {first} and the {second} are written in a form the pattern does not read"


def _written(view, c):
    """(the value `c` writes in place, its writer's fx node) when `c` is an in-place write of its
    first argument (`lp += 1`, `lp.mul_(2)`), else None."""
    n = getattr(c, "node", None)
    if n is None or not n.args or not isinstance(n.args[0], fx.Node) or n.args[0] not in view:
        return None
    if n.args[0] not in written_args(n):
        return None
    return view[n.args[0]], n


def _write_between(view, a: fx.Node, b: fx.Node, reads):
    """The first write, between `a` and `b` in program order, to memory one of `reads` lives in,
    described, or None."""
    memory = Memory(view.graph)
    lo, hi = sorted((memory.pos.get(a, -1), memory.pos.get(b, -1)))
    hit = memory.first_write(set(reads), lo, hi)
    return describe(*hit) if hit is not None else None


def detect_logprob(view):
    for c in view.cnodes():
        if not c.nodes:
            continue
        hit = _gathered(c) if op(c) in ("gather", "squeeze") else None
        if hit is not None:
            g, sq = hit
            src, casts = _through_casts(g.args[0])
            written = _written(view, src)
            writer = None
            if written is not None:  # the log-probs written in place before the gather
                src, more = _through_casts(written[0])
                casts, writer = casts + more, written[1]
            if isinstance(src, CNode) and op(src) == "log_softmax" and src.args[1] == -1 \
                    and _lm_logits(strip(src.args[0])):
                anchor = (sq or g).nodes[0]
                why = _message(casts, "log-softmax", "gather of the ids")
                if writer is not None:
                    why = (f"{describe_write(writer)} between the log-softmax and the gather of "
                           "the ids (the pattern reads the log-softmax's value)")
                yield anchor, fx_nodes(*([c for c in (sq, g) if c is not None] + casts + [src])), \
                    why
            continue
        if op(c) != "sub" or len(c.args) != 2 or not all(isinstance(a, CNode) for a in c.args):
            continue
        a, sel_casts = _through_casts(c.args[0])
        hit = _gathered(a)
        b, lse_casts = _through_casts(c.args[1])
        if hit is None or not (isinstance(b, CNode) and op(b) == "logsumexp"
                               and b.args[1:] == ((-1,), False)):
            continue
        g, sq = hit
        z, z2 = strip(g.args[0]), strip(b.args[0])
        if not _lm_logits(z) or z.node is None or z2.node is None:
            continue
        casts = sel_casts + lse_casts
        why = _message(casts, "gathered logits", "logsumexp they are reduced by")
        if z is not z2:  # two values: the same logits only when one memory, written between
            ra, rb = getattr(g.args[0], "node", None), getattr(b.args[0], "node", None)
            if ra is None or rb is None:
                continue
            memory = Memory(view.graph)
            write = _write_between(view, g.nodes[0], b.nodes[0], [ra, rb])
            if write is None or not memory.keys(ra) & memory.keys(rb):
                continue
            why = (f"{write} between the gather and the logsumexp of the logits, which then "
                   "read two different values of them")
        yield c.nodes[0], fx_nodes(*([c, g, b] + ([sq] if sq is not None else []) + casts)), why


register_detector("fused_linear_logprob", detect_logprob, patterns=("fused_linear_logprob",),
                  looks_like="the per-token log-prob of an lm head's logits")
