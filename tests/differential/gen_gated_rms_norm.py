"""gated_rms_norm cases: an RMSNorm drawn by the rms_norm generator (every spelling and
perturbation of it), its output times `silu(gate)` (Qwen3-Next's gated norm).

The gate's spellings: `F.silu`, `gate * torch.sigmoid(gate)`, silu in fp32 cast back, the product
either way round; look-alikes: sigmoid alone, silu of a scaled gate, the gate applied before the
norm (Mamba-2's order: another op, so other math for this pattern), a gate that broadcasts or is
of another dtype.  A near miss of rms_norm counts as the report (the norm is judged by its rules).
"""

from __future__ import annotations

import re

from hypothesis import strategies as st

from tests.differential import gen_rms_norm
from tests.differential.perturb import dynamic, edges
from tests.differential.source import MATH, Input

PATTERNS = ("gated_rms_norm",)

GATES = ("gs = F.silu(gate)", "gs = gate * torch.sigmoid(gate)", "gs = F.silu(gate.float()).to(gate.dtype)",
         "gs = torch.nn.functional.silu(gate)")
LOOK_ALIKES = ("gs = torch.sigmoid(gate)", "gs = F.silu(2.0 * gate)", "gs = F.silu(gate) * 0.5")


@st.composite
def cases(draw):
    case = draw(gen_rms_norm.cases())
    src = case.src
    D = int(re.search(r"nn\.Linear\((\d+), (\d+)", src.init[0]).group(2))
    src.inputs.append(Input("gate", tuple(src.inputs[0].shape[:-1]) + (D,)))
    gate = draw(st.sampled_from(GATES + LOOK_ALIKES))
    kind = MATH if gate in LOOK_ALIKES else case.kind
    before = draw(st.sampled_from((False, False, False, True)))
    if before:  # Mamba-2: the gate multiplies the norm's input
        at = next(i for i, line in enumerate(src.body) if re.match(r"^h = ", line))
        src.body[at] = re.sub(r"^h = ", "h0 = ", src.body[at])
        src.body[at + 1:at + 1] = [gate, "h = h0 * gs"]
        kind = MATH
    else:
        src.body.append(gate)
        src.body.append(draw(st.sampled_from(("gated = out * gs", "gated = gs * out"))))
        src.returns = [re.sub(r"\bout\b", "gated", r) for r in src.returns]
    kind, what = draw(edges(src, kind, "", logits=("gate",), shapes=("gate",)))
    desc = f"{gate}{' before the norm' if before else ''}; {case.what}" + (f"; {what}" if what else "")
    case.kind, case.what, case.patterns = kind, desc, PATTERNS
    case.reported_as, case.dynamic = ("rms_norm",), dynamic(draw)
    return case
