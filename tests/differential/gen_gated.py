"""swiglu / geglu / relu_sq_glu cases: `act(gate) * up` from two linears or one fused projection,
and relu_sq: a non-gated MLP's `relu(x) ** 2` (Nemotron's relu2), in their spellings, perturbed
(extreme values, mixed dtypes, a broadcast operand, dynamic=True too); clamped_glu cases: GPT-OSS's
`(up.clamp(-l, l) + 1) * (g * sigmoid(g * alpha))`, g = gate.clamp(max=l), with other slopes,
limits and constants, a clamp side missing, other spellings of clamp, and casts inside."""

from __future__ import annotations

from hypothesis import strategies as st

from tests.differential import spelling as sp
from tests.differential.perturb import dynamic, edges, perturbed
from tests.differential.source import Case, Input, Src

PATTERNS = ("swiglu", "geglu", "relu_sq_glu", "relu_sq", "clamped_glu")

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
    # the same slice twice: one value to the pattern, two nodes to the validator (issue 22)
    ("gate and up the same slice", r"gu\[\.\.\., (\d+):\]", r"gu[..., :\1]"),
    ("relu cubed", r"F\.relu\(g\) \*\* 2", "F.relu(g) ** 3"),
    ("relu of a shifted value", r"relu\(g\)", "relu(g - 0.1)"),
    ("squared before the relu", r"torch\.square\(F\.relu\(g\)\)", "F.relu(torch.square(g))"),
    ("square scaled", r"\.pow\(2\)", ".pow(2) * 0.5"),
    ("relu times the value", r"F\.relu\(g\) \* F\.relu\(g\)", "F.relu(g) * g"),
)


def cases():
    return st.one_of(_plain_cases(), _plain_cases(), _clamped_cases())


# clamped GLU perturbations that change the math (no longer eager-equal if taken as the original)
CLAMPED_EDITS = (
    ("sigmoid of the unclamped gate", r"torch\.sigmoid\(g \*", "torch.sigmoid(gr *"),
    ("gate clamp missing in the product", r"^a = g \*", "a = gr *"),
    ("up scaled instead of shifted", r"\(u \+ ", "(u * "),
    ("sigmoid of the up", r"torch\.sigmoid\(g \* (\S+)\)", r"torch.sigmoid(u * \1)"),
)


def _clamp(draw, v: str, lo, hi) -> str:
    """One spelling of clamp(v, lo, hi) (a None side absent)."""
    if lo is None and hi is None:
        return v
    if lo is None:
        return draw(st.sampled_from((f"{v}.clamp(min=None, max={hi})", f"{v}.clamp(max={hi})",
                                     f"torch.clamp_max({v}, {hi})", f"torch.clamp({v}, max={hi})")))
    if hi is None:
        return draw(st.sampled_from((f"{v}.clamp(min={lo})", f"torch.clamp_min({v}, {lo})")))
    return draw(st.sampled_from((f"{v}.clamp(min={lo}, max={hi})", f"{v}.clamp({lo}, {hi})",
                                 f"torch.clip({v}, {lo}, {hi})")))


@st.composite
def _clamped_cases(draw):
    dtype = draw(sp.DTYPES)
    D, Fd = 16, draw(st.sampled_from((24, 32)))
    src = Src(inputs=[Input("x", (2, 3, D))])
    split = draw(st.sampled_from(("interleaved", "interleaved", "chunk", "two linears")))
    if split == "two linears":
        src.init = [f"self.gate = nn.Linear({D}, {Fd})", f"self.up = nn.Linear({D}, {Fd})"]
        body = ["gr = self.gate(x)", "ur = self.up(x)"]
    else:
        src.init = [f"self.gate_up = nn.Linear({D}, {2 * Fd})"]
        body = ["gu = self.gate_up(x)",
                "gr, ur = gu[..., ::2], gu[..., 1::2]" if split == "interleaved"
                else "gr, ur = gu.chunk(2, dim=-1)"]
    src.init.append(f"self.down = nn.Linear({Fd}, {D})")
    limit = draw(st.sampled_from((7.0, 7.0, 3.0, 10.0)))
    alpha = draw(st.sampled_from((1.702, 1.702, 0.5, 2.0, 1.0)))
    g_side = draw(st.sampled_from(("max", "max", "both", "none", "min")))
    u_side = draw(st.sampled_from(("both", "both", "none", "max")))
    c = draw(st.sampled_from(("1", "1", "0.5", None)))
    g_lo, g_hi = (-limit if g_side in ("both", "min") else None,
                  limit if g_side in ("both", "max") else None)
    u_lo, u_hi = (-limit if u_side == "both" else None, limit if u_side != "none" else None)
    body.append(f"g = {_clamp(draw, 'gr', g_lo, g_hi)}")
    body.append(f"u = {_clamp(draw, 'ur', u_lo, u_hi)}")
    cast = draw(st.sampled_from((False, False, False, True)))
    if cast:  # the sigmoid in fp32, cast back: a cast inside the activation
        body.append(f"a = g * torch.sigmoid(g.float() * {alpha}).to(g.dtype)")
    else:
        body.append(draw(st.sampled_from((f"a = g * torch.sigmoid(g * {alpha})",
                                          f"a = torch.sigmoid({alpha} * g) * g"))))
    shifted = "u" if c is None else draw(st.sampled_from((f"(u + {c})", f"({c} + u)")))
    body.append(draw(st.sampled_from((f"y = {shifted} * a", f"y = a * {shifted}"))))
    body.append("out = self.down(y)")
    src.body, src.returns = body, ["out"]
    src.inputs[0].scale = draw(st.sampled_from((1.0, 10.0, 30.0)))  # values beyond the limit too
    kind, what = draw(perturbed(src, CLAMPED_EDITS))
    kind, what = draw(edges(src, kind, what, logits=("x",), shapes=()))
    base = (f"clamped_glu alpha={alpha} gate {g_side} up {u_side} c={c} limit={limit} ({split})"
            + ("; sigmoid in fp32" if cast else ""))
    # alpha 1 folds `g * 1.0`: the swiglu spelling `g * sigmoid(g)` with the clamps outside;
    # a cast inside is the gated detector's near miss
    return Case(src, ("clamped_glu", "swiglu"), kind, dtype, f"{base}; {what}" if what else base,
                dynamic=dynamic(draw), reported_as=("gated_act",))


@st.composite
def _plain_cases(draw):
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
