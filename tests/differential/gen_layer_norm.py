"""layer_norm cases: `(x - mean) * rsqrt(var + eps) * w + b` in its spellings, then perturbed."""

from __future__ import annotations

from hypothesis import strategies as st

from tests.differential import spelling as sp
from tests.differential.perturb import dynamic, perturbed, tensor_eps
from tests.differential.source import Case, Input, Src

PATTERNS = ("layer_norm",)

MATH_EDITS = (
    ("biased variance replaced by the unbiased one", r"unbiased=False", "unbiased=True"),
    ("biased variance replaced by correction=1", r"correction=0", "correction=1"),
    ("centred by adding the mean", r"^xc = hf - mu", "xc = hf + mu"),
    ("mean over dim -2", r"^mu = hf\.mean\([^,)]*", "mu = hf.mean(-2"),
    ("numerator not centred", r"^n = xc ", "n = hf "),
    ("eps added after the rsqrt", r"torch\.rsqrt\(var \+ (\w+|[\d.e-]+)\)", r"(torch.rsqrt(var) + \1)"),
    ("bias subtracted", r"\+ self\.bias", "- self.bias"),
)


@st.composite
def cases(draw):
    dtype = draw(sp.DTYPES)
    D = draw(st.sampled_from((16, 32)))
    src = Src(inputs=[Input("x", (2, 3, D))])
    src.init = [f"self.proj = nn.Linear({D}, {D}, bias=False)",
                f"self.weight = nn.Parameter(1.0 + 0.1 * torch.randn({D}))",
                f"self.bias = nn.Parameter(0.1 * torch.randn({D}))"]
    body = ["h = self.proj(x)"]
    affine = draw(st.sampled_from(("weight+bias", "weight", "bias", "none")))
    w = "self.weight" if "weight" in affine else "None"
    b = "self.bias" if "bias" in affine else "None"
    form = draw(st.sampled_from(("manual", "manual", "functional")))
    if form == "functional":
        body.append(f"out = F.layer_norm(h, ({D},), {w}, {b}, EPS)")
    else:
        body.append(f"hf = {sp.upcast(draw, 'h')}" if draw(st.booleans()) else "hf = h")
        body.append(f"mu = {sp.mean(draw, 'hf', 3)}")
        body.append("xc = hf - mu")
        body.append(draw(st.sampled_from((
            f"var = {sp.mean(draw, sp.square(draw, 'xc'), 3)}",
            "var = hf.var(-1, keepdim=True, unbiased=False)",
            "var = xc.var(-1, unbiased=False, keepdim=True)",
            "var = torch.var(hf, dim=-1, correction=0, keepdim=True)"))))
        body.append(f"n = xc * {sp.rsqrt(draw, 'var + EPS')}")
        body.append(f"nb = {sp.downcast(draw, 'n', 'h')}")
        terms = {"weight+bias": draw(st.sampled_from(("nb * self.weight + self.bias",
                                                      "self.weight * nb + self.bias",
                                                      "torch.addcmul(self.bias, nb, self.weight)"))),
                 "weight": "nb * self.weight", "bias": "nb + self.bias", "none": "nb"}
        body.append(f"out = {terms[affine]}")
    src.body = body
    src.returns = ["out"]
    kind, what = draw(perturbed(src, MATH_EDITS, (tensor_eps,)))
    eps = draw(st.sampled_from(("1e-05", "1e-06")))
    src.body = [line.replace("EPS", eps) for line in src.body]
    return Case(src, ("layer_norm",), kind, dtype, what or f"{form} layer_norm ({affine})", dynamic=dynamic(draw))
