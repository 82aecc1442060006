"""add_rms_norm / add_layer_norm cases: a residual add `h = h0 + res` before a norm drawn by the
rms_norm / layer_norm generators (every spelling and perturbation of theirs), the sum returned or
read again by the next residual add, as pre-norm decoders write it.

The add's own spellings (`+`, `torch.add`, operands either way round) and look-alikes: a
subtraction or a scaled operand (other math), `alpha=` (refused), a residual of another dtype or
one that broadcasts.  A near miss of the plain norm pattern counts as the report too (the add
pattern skips, by design, where the norm alone is refused).
"""

from __future__ import annotations

import re

from hypothesis import strategies as st

from tests.differential import gen_layer_norm, gen_rms_norm
from tests.differential.perturb import dynamic, edges
from tests.differential.source import MATH, SAFETY, Input

PATTERNS = ("add_rms_norm", "add_layer_norm")

ADDS = ("h = h0 + res", "h = res + h0", "h = torch.add(h0, res)")
LOOK_ALIKES = (  # (kind, line)
    (MATH, "h = h0 - res"),
    (MATH, "h = h0 + 0.5 * res"),
    (SAFETY, "h = torch.add(h0, res, alpha=2.0)"),
)


@st.composite
def cases(draw):
    norm, base = draw(st.sampled_from((("rms_norm", gen_rms_norm), ("layer_norm", gen_layer_norm))))
    case = draw(base.cases())
    src = case.src
    at = next(i for i, line in enumerate(src.body) if re.match(r"^h = ", line))
    src.body[at] = re.sub(r"^h = ", "h0 = ", src.body[at])
    add = draw(st.sampled_from(ADDS + tuple(line for _, line in LOOK_ALIKES)))
    src.body.insert(at + 1, add)
    src.inputs.append(Input("res", tuple(src.inputs[0].shape[:-1]) + (_width(src),)))
    kind = case.kind
    for k, line in LOOK_ALIKES:
        if add == line and kind != MATH:
            kind = k
    reuse = draw(st.sampled_from(("returned", "next residual", "not reused")))
    if reuse == "returned":
        src.returns.append("h")
    elif reuse == "next residual":
        src.returns[0] = f"({src.returns[0]}) + h"
    kind, what = draw(edges(src, kind, "", logits=("res",), shapes=("res",)))
    desc = f"{add}, sum {reuse}; {case.what}" + (f"; {what}" if what else "")
    case.kind, case.what, case.patterns = kind, desc, ("add_" + norm,)
    case.reported_as, case.dynamic = (norm,), dynamic(draw)
    cast = re.search(r"(\w+) cast through ", case.what)
    if cast and any(re.match(rf"^{cast.group(1)} = ", line) for line in src.body[at + 2:]):
        # a lossy cast (perturb.lossy_cast) of a value between the sum and the norm: the norm no
        # longer reads the sum, so there is no add + norm to fuse; the norm alone is the answer
        case.rewritten_as = (norm,)
    return case


def _width(src) -> int:
    """The norm's width: the proj's out_features in the rms_norm / layer_norm generators."""
    return int(re.search(r"nn\.Linear\((\d+), (\d+)", src.init[0]).group(2))
