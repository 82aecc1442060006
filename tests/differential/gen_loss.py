"""cross_entropy / fused_linear_cross_entropy cases: one generator, with or without the lm head.

With a head (`nn.Linear`, `F.linear`, `@ W.t()`) in the graph the case is about
`fused_linear_cross_entropy`; with the logits given as an input, about `cross_entropy`.  Between
logits and loss: an fp32 upcast, `/ temperature`, a softcap, the label shift, `view(-1, V)`, and
the loss spelled `F.cross_entropy` (ignore_index, reduction, label_smoothing) or
`F.nll_loss(F.log_softmax(..))`, or `sum / num_items`.  Edges: -inf vocabulary columns,
underflowing rows, every label ignored, a zero-size batch, logits of another dtype, dynamic=True.
"""

from __future__ import annotations

from hypothesis import strategies as st

from tests.differential import spelling as sp
from tests.differential.perturb import dynamic, edges, perturbed
from tests.differential.source import Case, Input, Src

PATTERNS = ("fused_linear_cross_entropy", "cross_entropy")

MATH_EDITS = (
    ("softcap with mismatched constants", r"(\d+\.0) \* torch\.tanh\((\w+) / \1\)", r"\1 * torch.tanh(\2 / 7.0)"),
    ("softmax over the wrong dim", r"F\.log_softmax\((\w+), dim=-1\)", r"F.log_softmax(\1, dim=0)"),
    ("logits squared", r"^(l\d*) = (\w+)\.float\(\)", r"\1 = \2.float() ** 2"),
    ("labels shifted the wrong way", r"labels\[:, 1:\]", "labels[:, :-1]"),
    ("absolute logits", r"^(lv = )(\w+)", r"\1\2.abs()"),
)


@st.composite
def cases(draw):
    dtype = draw(sp.DTYPES)
    B, T, D, V = 2, 5, 16, draw(st.sampled_from((24, 40)))
    head = draw(st.booleans())
    ignore = draw(st.booleans())
    src = Src()
    body = []
    if head:
        src.inputs.append(Input("h", (B, T, D)))
        src.init = [f"self.head = nn.Linear({D}, {V}, bias={draw(st.booleans())})"]
        body.append(draw(st.sampled_from(("l = self.head(h)",
                                          "l = F.linear(h, self.head.weight, self.head.bias)"))))
        if "bias=False" in src.init[0] and draw(st.booleans()):
            body[-1] = "l = h @ self.head.weight.t()"
    else:
        src.inputs.append(Input("logits", (B, T, V), scale=3.0))
        body.append("l = logits * 1.5")
    src.inputs.append(Input("labels", (B, T), kind="labels", high=V, ignore=ignore))
    if draw(st.booleans()):
        body.append(f"l1 = {sp.upcast(draw, 'l')}")
    else:
        body.append("l1 = l")
    step = draw(st.sampled_from(("none", "temperature", "softcap")))
    if step == "temperature":
        body.append("l2 = l1 / 0.7")
    elif step == "softcap":
        body.append("l2 = 30.0 * torch.tanh(l1 / 30.0)")
    else:
        body.append("l2 = l1")
    shift = draw(st.booleans())
    if shift:
        body += ["ls = l2[:, :-1, :].contiguous()", "ts = labels[:, 1:].contiguous()"]
    else:
        body += ["ls = l2", "ts = labels"]
    body.append(draw(st.sampled_from((f"lv = ls.view(-1, {V})", "lv = ls.reshape(-1, ls.size(-1))",
                                      "lv = ls.flatten(0, 1)"))))
    body.append("tv = ts.reshape(-1)")
    red = draw(st.sampled_from(("mean", "sum", "num_items", "nll")))
    smooth = draw(st.sampled_from(("0.0", "0.1"))) if red in ("mean", "sum") else "0.0"
    if red == "nll":
        body.append("lp = F.log_softmax(lv, dim=-1)")
        body.append("loss = F.nll_loss(lp, tv, ignore_index=-100)")
    elif red == "num_items":
        body.append("lsum = F.cross_entropy(lv, tv, ignore_index=-100, reduction='sum')")
        body.append("loss = lsum / (tv != -100).sum().clamp_min(1)")
    else:
        body.append(f"loss = F.cross_entropy(lv, tv, ignore_index=-100, reduction='{red}', "
                    f"label_smoothing={smooth})")
    src.body = body
    src.returns = ["loss"]
    kind, what = draw(perturbed(src, MATH_EDITS))
    kind, what = draw(edges(src, kind, what, logits=("logits",), labels=("labels",), shapes=()))
    name = "fused_linear_cross_entropy" if head else "cross_entropy"
    return Case(src, (name,), kind, dtype,
                what or f"{name}: {step}, {'shifted' if shift else 'no shift'}, {red}, ignore={ignore}", dynamic=dynamic(draw))
