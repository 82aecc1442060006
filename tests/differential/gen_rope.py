"""rope / rope_single cases: q and k (or q alone) rotated by cos/sin tables built in forward.

Spellings: rotate_half by slices or `chunk`, interleaved pairs (`stack(..).flatten(-2)` with
`repeat_interleave` tables), [t, d] or [b, t, d] tables (positions given), [b, h, t, d] or
[b, t, h, d] layouts, GQA, tables cast to the activation dtype or q upcast to fp32, one table
of another dtype (mixed-dtype promotion), dynamic=True.
"""

from __future__ import annotations

from hypothesis import strategies as st

from tests.differential import spelling as sp
from tests.differential.perturb import dynamic, perturbed
from tests.differential.source import Case, Input, Src

PATTERNS = ("rope", "rope_single")

MATH_EDITS = (
    ("rotation direction flipped", r"torch\.cat\(\(-(\w+)2, (\w+)1\)", r"torch.cat((\g<1>2, -\g<2>1)"),
    ("cos and sin swapped", r"^(qf?o) = (\w+) \* cos \+ (\w+) \* sin", r"\1 = \2 * sin + \3 * cos"),
    ("minus instead of plus", r"\* cos \+ ", "* cos - "),
    ("tables not one angle per pair", r"freqs\.repeat_interleave\(2, dim=-1\)", "torch.cat((freqs, freqs), dim=-1)"),
    ("pairs rotated the wrong way", r"torch\.stack\(\(-(\w+)\[\.\.\., 1::2\], (\w+)\[\.\.\., ::2\]\)",
     r"torch.stack((\1[..., 1::2], -\2[..., ::2])"),
    ("sin table from a shifted angle", r"sin = emb\.sin\(\)", "sin = (emb + 0.1).sin()"),
)


def _rotate(draw, v: str, half: int, interleaved: bool) -> list:
    """Lines computing `{v}o`, the rotation of `{v}` (cos/sin already broadcastable)."""
    if interleaved:
        lines = [f"r{v} = torch.stack((-{v}[..., 1::2], {v}[..., ::2]), dim=-1).flatten(-2)"]
    elif draw(st.booleans()):
        lines = [f"{v}1, {v}2 = {v}.chunk(2, dim=-1)", f"r{v} = torch.cat((-{v}2, {v}1), dim=-1)"]
    else:
        lines = [f"{v}1 = {v}[..., :{half}]", f"{v}2 = {v}[..., {half}:]",
                 f"r{v} = torch.cat((-{v}2, {v}1), dim=-1)"]
    lines.append(draw(st.sampled_from((f"{v}o = {v} * cos + r{v} * sin",
                                       f"{v}o = (r{v} * sin) + ({v} * cos)"))))
    return lines


@st.composite
def cases(draw):
    dtype = draw(sp.DTYPES)
    B, T, H, d = 2, 4, 2, 8
    Hk = draw(st.sampled_from((1, 2)))
    pair = draw(st.booleans())
    src = Src(inputs=[Input("x", (B, T, H * d))])
    src.init = [f"self.wq = nn.Linear({H * d}, {H * d}, bias=False)",
                f"self.wk = nn.Linear({H * d}, {Hk * d}, bias=False)"]
    bhtd = draw(st.booleans())
    per_batch = draw(st.booleans())
    interleaved = draw(st.booleans())
    body = [f"inv = 1.0 / (10000.0 ** (torch.arange(0, {d}, 2, dtype=torch.float32) / {d}))"]
    if per_batch:
        src.inputs.append(Input("pos", (B, T), kind="positions", high=64))
        body.append("freqs = pos[..., None].float() * inv")
    else:
        body.append(draw(st.sampled_from((f"freqs = torch.outer(torch.arange({T}, dtype=torch.float32), inv)",
                                          f"freqs = torch.arange({T}, dtype=torch.float32)[:, None] * inv[None, :]"))))
    body.append("emb = freqs.repeat_interleave(2, dim=-1)" if interleaved else
                "emb = torch.cat((freqs, freqs), dim=-1)")
    upcast = draw(st.booleans())
    tables = {t: f"emb.{t}()" if upcast else f"emb.{t}().to(x.dtype)" for t in ("cos", "sin")}
    mixed = draw(st.sampled_from((None, None, None, "cos", "sin")))
    if mixed:  # one table of its own dtype: eager's type promotion rounds one branch differently
        half = draw(st.sampled_from(("torch.bfloat16", "torch.float16", "torch.float32")))
        tables[mixed] = f"emb.{mixed}().to({half})"
    for t in ("cos", "sin"):
        body.append(f"{t} = {tables[t]}")
    axis = (1 if per_batch else 0) if bhtd else (2 if per_batch else 1)
    if bhtd and not per_batch and draw(st.booleans()):
        pass  # [t, d] tables broadcast against [b, h, t, d] as they are
    else:
        for t in ("cos", "sin"):
            body.append(draw(st.sampled_from((f"{t} = {t}.unsqueeze({axis})", f"{t} = {t}.unsqueeze({axis - (4 if per_batch else 3)})"))))
    for v, heads in (("q", H), ("k", Hk))[: 2 if pair else 1]:
        line = f"{v} = self.w{v}(x).view({B}, {T}, {heads}, {d})"
        body.append(line + (".transpose(1, 2)" if bhtd else ""))
        if upcast:
            body.append(f"{v}f = {sp.upcast(draw, v)}")
            body += _rotate(draw, f"{v}f", d // 2, interleaved)
            body.append(f"{v}o = {sp.downcast(draw, f'{v}fo', v)}")
        else:
            body += _rotate(draw, v, d // 2, interleaved)
    src.body = body
    src.returns = ["qo", "ko"] if pair else ["qo"]
    kind, what = draw(perturbed(src, MATH_EDITS))
    if mixed:
        what = f"{what}; {tables[mixed]}" if what else f"{mixed} table {tables[mixed]}"
    layout = f"{'[b,h,t,d]' if bhtd else '[b,t,h,d]'}, {'[b,t,d]' if per_batch else '[t,d]'} tables"
    form = "interleaved" if interleaved else "rotate_half"
    return Case(src, ("rope",) if pair else ("rope_single",), kind, dtype,
                what or f"{'q,k' if pair else 'q only'} {form}, {layout}, {'fp32' if upcast else 'cast tables'}", dynamic=dynamic(draw))
