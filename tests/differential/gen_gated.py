"""swiglu / geglu cases: `act(gate) * up` from two linears or one fused projection, perturbed."""

from __future__ import annotations

from hypothesis import strategies as st

from tests.differential import spelling as sp
from tests.differential.perturb import perturbed
from tests.differential.source import Case, Input, Src

ACTS = {  # spelling of act(g) -> the pattern it is
    "F.silu(g)": "swiglu",
    "torch.nn.functional.silu(g)": "swiglu",
    "g * torch.sigmoid(g)": "swiglu",
    "F.gelu(g)": "geglu",
    "F.gelu(g, approximate='tanh')": "geglu",
    "0.5 * g * (1.0 + torch.tanh(0.7978845608028654 * (g + 0.044715 * torch.pow(g, 3.0))))": "geglu",
    "g * 0.5 * (1.0 + torch.erf(g / 1.4142135623730951))": "geglu",
}

MATH_EDITS = (
    ("activation of up instead of gate", r"F\.silu\(g\)", "F.silu(u)"),
    ("gate times gate", r"^y = a \* u", "y = a * g"),
    ("sigmoid without the gate factor", r"g \* torch\.sigmoid\(g\)", "torch.sigmoid(g)"),
    ("sigmoid of a scaled gate", r"torch\.sigmoid\(g\)", "torch.sigmoid(1.702 * g)"),
    ("gelu tanh constant changed", r"0\.044715", "0.04"),
    ("erf of an unscaled gate", r"torch\.erf\(g / 1\.4142135623730951\)", "torch.erf(g)"),
    ("negated gate", r"F\.gelu\(g", "F.gelu(-g"),
    ("gate and up slices overlap", r"gu\[\.\.\., (\d+):\]", r"gu[..., 1:\1 + 1]"),
)


@st.composite
def cases(draw):
    dtype = draw(sp.DTYPES)
    D, Fd = 16, draw(st.sampled_from((24, 32)))
    src = Src(inputs=[Input("x", (2, 3, D))])
    body = []
    split = draw(st.sampled_from(("two linears", "chunk", "split", "slices")))
    if split == "two linears":
        src.init = [f"self.gate = nn.Linear({D}, {Fd}, bias=False)",
                    f"self.up = nn.Linear({D}, {Fd}, bias=False)"]
        body += ["g = self.gate(x)", "u = self.up(x)"]
    else:
        src.init = [f"self.gate_up = nn.Linear({D}, {2 * Fd}, bias=False)"]
        body.append("gu = self.gate_up(x)")
        body += {"chunk": ["g, u = gu.chunk(2, dim=-1)"],
                 "split": [f"g, u = torch.split(gu, {Fd}, -1)"],
                 "slices": [f"g = gu[..., :{Fd}]", f"u = gu[..., {Fd}:]"]}[split]
    src.init.append(f"self.down = nn.Linear({Fd}, {D}, bias=False)")
    act = draw(st.sampled_from(sorted(ACTS)))
    if draw(st.booleans()) and act.startswith("F."):  # activation in fp32, cast back
        body.append(f"a = {sp.downcast(draw, act.replace('(g', '(g.float()'), 'g')}")
    else:
        body.append(f"a = {act}")
    body.append(draw(st.sampled_from(("y = a * u", "y = u * a", "y = torch.mul(a, u)"))))
    body.append("out = self.down(y)")
    src.body = body
    src.returns = ["out"]
    kind, what = draw(perturbed(src, MATH_EDITS))
    return Case(src, (ACTS[act],), kind, dtype, what or f"{ACTS[act]} {act} ({split})")
