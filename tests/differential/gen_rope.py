"""rope / rope_single cases: q and k (or q alone) rotated by cos/sin tables built in forward.

Spellings: rotate_half by slices or `chunk`, interleaved pairs (`stack(..).flatten(-2)` with
`repeat_interleave` tables), [t, d] or [b, t, d] tables (positions given), [b, h, t, d] or
[b, t, h, d] layouts, GQA, tables cast to the activation dtype or q upcast to fp32, one table
of another dtype (mixed-dtype promotion), dynamic=True.  Issue 23's forms on half-width tables:
pairs through `reshape(.., -1, 2).unbind(-1)` rotated in real arithmetic and stacked back
(`unbind`), halves with the sine's sign inside a product (`sign`: `x1 * (-sin) + x2 * cos`), and
the halves as complex numbers (`complex_halves`: `view_as_complex(stack(chunk(x, 2, -1), -1)) *
freqs_cis`, back with `cat(chunk(view_as_real(..), 2, -1), -2)`).
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
    ("sign inside the product dropped (equal signs)", r"\* \(-sin\)|\* torch\.neg\(sin\)", "* sin"),
    ("real and imaginary parts swapped", r"torch\.stack\(\[(\w+)r, (\w+)i\]", r"torch.stack([\2i, \1r]"),
    ("complex conjugate table", r"\* fc\)", "* fc.conj())"),
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


def _rotate_23(draw, v: str, half: int, form: str) -> list:
    """Lines computing `{v}o` in one of issue 23's forms (tables one angle per pair)."""
    if form == "unbind":
        split = draw(st.sampled_from((f"{v}.reshape(*{v}.shape[:-1], -1, 2).unbind(-1)",
                                      f"torch.unbind({v}.unflatten(-1, (-1, 2)), dim=-1)")))
        return [f"{v}r, {v}i = {split}",
                f"{v}out_r = {v}r * cos - {v}i * sin",
                draw(st.sampled_from((f"{v}out_i = {v}r * sin + {v}i * cos",
                                      f"{v}out_i = {v}i * cos + {v}r * sin"))),
                f"{v}o = torch.stack([{v}out_r, {v}out_i], -1).flatten(3)"]
    if form == "sign":
        neg = draw(st.sampled_from(("(-sin)", "torch.neg(sin)")))
        if draw(st.booleans()):
            lines = [f"{v}1, {v}2 = {v}.chunk(2, dim=-1)"]
        else:
            lines = [f"{v}1, {v}2 = {v}[..., :{half}], {v}[..., {half}:]"]
        return lines + [f"{v}y1 = {v}1 * cos + {v}2 * sin",
                        draw(st.sampled_from((f"{v}y2 = {v}1 * {neg} + {v}2 * cos",
                                              f"{v}y2 = {v}2 * cos + {v}1 * {neg}"))),
                        f"{v}o = torch.cat([{v}y1, {v}y2], -1)"]
    back = draw(st.sampled_from((".squeeze(-1)", ".flatten(-2)", f".reshape({v}.shape)")))
    return [f"{v}c = torch.view_as_complex(torch.stack(torch.chunk({v}, 2, dim=-1), dim=-1))",
            f"{v}o = torch.cat(torch.chunk(torch.view_as_real({v}c * fc), 2, dim=-1), dim=-2){back}"]


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
    form = draw(st.sampled_from(("rotate_half", "interleaved", "unbind", "sign", "complex_halves")))
    interleaved = form == "interleaved"
    half_tables = form in ("unbind", "sign", "complex_halves")
    body = [f"inv = 1.0 / (10000.0 ** (torch.arange(0, {d}, 2, dtype=torch.float32) / {d}))"]
    if per_batch:
        src.inputs.append(Input("pos", (B, T), kind="positions", high=64))
        body.append("freqs = pos[..., None].float() * inv")
    else:
        body.append(draw(st.sampled_from((f"freqs = torch.outer(torch.arange({T}, dtype=torch.float32), inv)",
                                          f"freqs = torch.arange({T}, dtype=torch.float32)[:, None] * inv[None, :]"))))
    body.append("emb = freqs" if half_tables else "emb = freqs.repeat_interleave(2, dim=-1)"
                if interleaved else "emb = torch.cat((freqs, freqs), dim=-1)")
    # the complex form needs fp32 values (view_as_complex), so it always upcasts
    upcast = form == "complex_halves" or draw(st.booleans())
    tables = {t: f"emb.{t}()" if upcast else f"emb.{t}().to(x.dtype)" for t in ("cos", "sin")}
    if form == "complex_halves":
        tables = {"fc": "torch.polar(torch.ones_like(emb), emb)"}
    mixed = None if form == "complex_halves" else draw(st.sampled_from((None, None, None, "cos", "sin")))
    if mixed:  # one table of its own dtype: eager's type promotion rounds one branch differently
        half = draw(st.sampled_from(("torch.bfloat16", "torch.float16", "torch.float32")))
        tables[mixed] = f"emb.{mixed}().to({half})"
    for t in tables:
        body.append(f"{t} = {tables[t]}")
    axis = (1 if per_batch else 0) if bhtd else (2 if per_batch else 1)
    if bhtd and not per_batch and draw(st.booleans()):
        pass  # [t, d] tables broadcast against [b, h, t, d] as they are
    else:
        for t in tables:
            body.append(draw(st.sampled_from((f"{t} = {t}.unsqueeze({axis})", f"{t} = {t}.unsqueeze({axis - (4 if per_batch else 3)})"))))
    for v, heads in (("q", H), ("k", Hk))[: 2 if pair else 1]:
        line = f"{v} = self.w{v}(x).view({B}, {T}, {heads}, {d})"
        body.append(line + (".transpose(1, 2)" if bhtd else ""))
        if upcast:
            body.append(f"{v}f = {sp.upcast(draw, v)}")
            body += (_rotate_23(draw, f"{v}f", d // 2, form) if half_tables
                     else _rotate(draw, f"{v}f", d // 2, interleaved))
            body.append(f"{v}o = {sp.downcast(draw, f'{v}fo', v)}")
        else:
            body += (_rotate_23(draw, v, d // 2, form) if half_tables
                     else _rotate(draw, v, d // 2, interleaved))
    src.body = body
    src.returns = ["qo", "ko"] if pair else ["qo"]
    kind, what = draw(perturbed(src, MATH_EDITS))
    if mixed:
        what = f"{what}; {tables[mixed]}" if what else f"{mixed} table {tables[mixed]}"
    layout = f"{'[b,h,t,d]' if bhtd else '[b,t,h,d]'}, {'[b,t,d]' if per_batch else '[t,d]'} tables"
    # A pair the pattern cannot join (a table written between the two rotations, one side
    # without a gradient) may be rotated apart: one rotation rewritten alone and the other's
    # near miss (a `rope_single` near miss) is then the report that explains it.
    return Case(src, ("rope",) if pair else ("rope_single",), kind, dtype,
                what or f"{'q,k' if pair else 'q only'} {form}, {layout}, {'fp32' if upcast else 'cast tables'}",
                dynamic=dynamic(draw), reported_as=("rope_single",) if pair else ())
