"""2:4 sparsity cases (the `sparsity="2:4"` option, served by the quantize pass): a frozen linear
whose weight is exactly 2:4 sparse, run in inference (parameters frozen, no_grad), must give the
dense eager result (lossless), or be left alone with a near miss saying why.

Spellings: `nn.Linear`, `F.linear` on its parameters, with or without bias, [T, K] or [B, T, K]
input, kept entries at -0.0, the output read by a following op.  Look-alikes: one group of four
with three kept entries (not 2:4: refused), the weight needing its gradient in grad mode
(refused), a matmul `x @ W.t()` (no linear op: not claimed, judged on equality), and the shared
ones (writes, escapes, lossy casts, extreme values, a zero-size batch, dynamic=True).
`2:4+int8` quantizes the kept values (lossy by design), so it is not generated here.
"""

from __future__ import annotations

from hypothesis import strategies as st

from tests.differential import spelling as sp
from tests.differential.perturb import dynamic, edges, perturbed
from tests.differential.source import MATH, SAFETY, Case, Input, Src

PATTERNS = ("sparse24_linear",)
SPARSITY = ("2:4",)  # the lossless `sparsity` option values this generator covers

MATH_EDITS = (
    ("bias subtracted", r"\+ self\.lin\.bias", "- self.lin.bias"),
    ("output doubled before the next op", r"^out = y ", "out = 2.0 * y "),
)


@st.composite
def cases(draw):
    dtype = draw(sp.DTYPES)
    K, N = draw(st.sampled_from((16, 32))), draw(st.sampled_from((16, 24)))
    bias = draw(st.booleans())
    src = Src(inputs=[Input("x", draw(st.sampled_from(((5, K), (2, 3, K)))))])
    src.init = [f"self.lin = nn.Linear({K}, {N}, bias={bias})",
                f"keep = (torch.rand({N}, {K // 4}, 4).argsort(-1) < 2).reshape({N}, {K})"]
    kind, look = None, None
    form = draw(st.sampled_from(("kept", "kept", "-0.0 kept", "three kept", "needs grad")))
    if form == "-0.0 kept":
        src.init.append("keep_neg = keep & (torch.rand(keep.shape) < 0.2)")
    if form == "three kept":  # one group breaks the pattern
        src.init.append("keep[0, :4] = torch.tensor([True, True, True, False])")
        kind = SAFETY
    src.init.append("self.lin.weight.data.mul_(keep)")
    if form == "-0.0 kept":
        src.init.append("self.lin.weight.data[keep_neg] = -0.0")
    spell = draw(st.sampled_from(("module", "functional", "matmul")))
    b = " + self.lin.bias" if bias else ""
    body = [{"module": "y = self.lin(x)",
             "functional": "y = F.linear(x, self.lin.weight, self.lin.bias)",
             "matmul": f"y = x @ self.lin.weight.t(){b}"}[spell]]
    if spell == "matmul":
        look = MATH
    body.append(draw(st.sampled_from(("out = y", "out = y * torch.sigmoid(y)", "out = F.gelu(y)"))))
    src.body = body
    src.returns = ["out"]
    pkind, what = draw(perturbed(src, MATH_EDITS))
    kind = look or kind or pkind
    kind, what = draw(edges(src, kind, what, logits=("x",), shapes=()))
    grad = form == "needs grad"
    if grad:
        kind = look or SAFETY  # the weight's gradient is needed: refused with a reason
    base = f"2:4 linear ({form}, {spell}, bias={bias})"
    return Case(src, PATTERNS, kind, dtype, f"{base}; {what}" if what else base,
                dynamic=dynamic(draw), options={"sparsity": "2:4"}, grad=grad)
