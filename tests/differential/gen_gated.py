"""swiglu / geglu / relu_sq_glu cases: `act(gate) * up` from two linears or one fused projection,
and relu_sq: a non-gated MLP's `relu(x) ** 2` (Nemotron's relu2), in their spellings, perturbed
(extreme values, mixed dtypes, a broadcast operand, dynamic=True too)."""

from __future__ import annotations

from hypothesis import strategies as st

from tests.differential import spelling as sp
from tests.differential.perturb import dynamic, edges, perturbed
from tests.differential.source import Case, Input, Src

PATTERNS = ("swiglu", "geglu", "relu_sq_glu", "relu_sq")

ACTS = {  # spelling of act(g) -> the pattern it is
    "F.silu(g)": "swiglu",
    "torch.nn.functional.silu(g)": "swiglu",
    "g * torch.sigmoid(g)": "swiglu",
    "F.gelu(g)": "geglu",
    "F.gelu(g, approximate='tanh')": "geglu",
    "0.5 * g * (1.0 + torch.tanh(0.7978845608028654 * (g + 0.044715 * torch.pow(g, 3.0))))": "geglu",
    "g * 0.5 * (1.0 + torch.erf(g / 1.4142135623730951))": "geglu",
    "torch.square(F.relu(g))": "relu_sq_glu",
    "F.relu(g) ** 2": "relu_sq_glu",
    "torch.relu(g).pow(2)": "relu_sq_glu",
    "F.relu(g) * F.relu(g)": "relu_sq_glu",
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
    ("relu cubed", r"F\.relu\(g\) \*\* 2", "F.relu(g) ** 3"),
    ("relu of a shifted value", r"relu\(g\)", "relu(g - 0.1)"),
    ("squared before the relu", r"torch\.square\(F\.relu\(g\)\)", "F.relu(torch.square(g))"),
    ("square scaled", r"\.pow\(2\)", ".pow(2) * 0.5"),
    ("relu times the value", r"F\.relu\(g\) \* F\.relu\(g\)", "F.relu(g) * g"),
)


@st.composite
def cases(draw):
    dtype = draw(sp.DTYPES)
    D, Fd = 16, draw(st.sampled_from((24, 32)))
    src = Src(inputs=[Input("x", (2, 3, D))])
    body = []
    act = draw(st.sampled_from(sorted(ACTS)))
    split = draw(st.sampled_from(("two linears", "chunk", "split", "slices")
                                 + (("no gate",) * 2 if ACTS[act] == "relu_sq_glu" else ())))
    if split == "no gate":  # relu_sq: the activation of one projection, no up
        src.init = [f"self.gate = nn.Linear({D}, {Fd}, bias=False)"]
        body.append("g = self.gate(x)")
    elif split == "two linears":
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
    if draw(st.booleans()) and act.startswith("F."):  # activation in fp32, cast back
        up = act.replace("(g", "(g.float()")
        body.append(f"a = {sp.downcast(draw, f'({up})' if ' ' in up else up, 'g')}")
    else:
        body.append(f"a = {act}")
    if split == "no gate":
        body.append("y = a")
    else:
        body.append(draw(st.sampled_from(("y = a * u", "y = u * a", "y = torch.mul(a, u)"))))
    body.append("out = self.down(y)")
    src.body = body
    src.returns = ["out"]
    pattern = "relu_sq" if split == "no gate" else ACTS[act]
    src.inputs[0].scale = draw(st.sampled_from((1.0, 1.0, 30.0)))  # large pre-activations too
    kind, what = draw(perturbed(src, MATH_EDITS))
    kind, what = draw(edges(src, kind, what, logits=("x",), shapes=()))
    base = f"{pattern} {act} ({split})"
    return Case(src, (pattern,), kind, dtype, f"{base}; {what}" if what else base, dynamic=dynamic(draw))
