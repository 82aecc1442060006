"""rms_norm cases: `x * rsqrt(mean(x^2) + eps) * w` in its spellings, then perturbed."""

from __future__ import annotations

from hypothesis import strategies as st

from tests.differential import spelling as sp
from tests.differential.perturb import dynamic, perturbed, tensor_eps
from tests.differential.source import Case, Input, Src

PATTERNS = ("rms_norm",)

# Edits that change the math (each must then not be rewritten, unless still equal).
MATH_EDITS = (
    ("eps added after the rsqrt", r"torch\.rsqrt\((\w+) \+ (\w+|[\d.e-]+)\)", r"(torch.rsqrt(\1) + \2)"),
    ("eps subtracted", r"\+ (1e-0\d)", r"- \1"),
    ("mean over dim -2", r"mean\((-1|2|dim=-1)", "mean(-2"),
    ("cube instead of square", r"\.pow\(2\)", ".pow(3)"),
    ("sum over D-1 instead of mean", r"\.mean\((-1|2|dim=-1), keepdim=True\)", r".sum(-1, keepdim=True) / 15.0"),
    ("Gemma offset 1 - w", r"\(1\.0 \+ self\.weight", "(1.0 - self.weight"),
    ("negated normalised value", r"^(n = )", r"\1-"),
)


@st.composite
def cases(draw):
    dtype = draw(sp.DTYPES)
    D = draw(st.sampled_from((16, 32)))
    src = Src(inputs=[Input("x", (2, 3, D))])
    src.init = [f"self.proj = nn.Linear({D}, {D}, bias=False)"]
    gemma = draw(st.booleans())
    src.init.append(f"self.weight = nn.Parameter({'0.1 * torch.randn' if gemma else '1.0 + 0.1 * torch.randn'}({D}))")
    body = ["h = self.proj(x)"]
    form = draw(st.sampled_from(("manual", "manual", "manual", "functional")))
    if form == "functional":
        body.append(f"out = F.rms_norm(h, ({D},), self.weight, EPS)")
    else:
        up = draw(st.booleans())
        body.append(f"hf = {sp.upcast(draw, 'h')}" if up else "hf = h")
        body.append(f"sq = {sp.square(draw, 'hf')}")
        body.append(f"var = {sp.mean(draw, 'sq', 3, keepdim=draw(st.booleans()))}")
        if draw(st.booleans()):
            body.append(f"n = hf * {sp.rsqrt(draw, 'var + EPS')}")
        else:
            body.append("n = hf / torch.sqrt(var + EPS)")
        scale = "(1.0 + self.weight)" if gemma else "self.weight"
        where = draw(st.sampled_from(("after cast", "before cast", "weight first", "none")))
        back = sp.downcast(draw, "n", "h")
        if where == "after cast":
            body.append(draw(st.sampled_from((f"out = {scale} * {back}", f"out = {back} * {scale}"))))
        elif where == "before cast":
            body.append(f"nw = n * {scale}.float()")
            body.append(f"out = {sp.downcast(draw, 'nw', 'h')}")
        elif where == "weight first":
            body[-1] = body[-1].replace("n = hf", f"n = ({scale} * hf)")
            body.append(f"out = {back}")
        else:
            body.append(f"out = {back}")
    eps = draw(st.sampled_from(("1e-06", "1e-05")))
    src.body = body
    src.returns = ["out"]
    kind, what = draw(perturbed(src, MATH_EDITS, (tensor_eps,)))
    src.body = [line.replace("EPS", eps) for line in src.body]
    return Case(src, ("rms_norm",), kind, dtype, what or f"{form} rms_norm", dynamic=dynamic(draw))
