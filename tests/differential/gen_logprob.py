"""fused_linear_logprob cases: per-token log-probabilities of chosen ids (and the entropy) from an
lm head, as post-training code writes them (patterns/logprob.py lists the claimed spellings).

Log-prob: `log_softmax(z).gather(-1, ids[..., None]).squeeze(-1)` (method, `torch.gather`,
`dtype=torch.float32`), the selective `z.gather(..) - z.logsumexp(-1)`, and
`-F.cross_entropy(.., reduction='none')` reshaped back; the index spelled `unsqueeze(-1)`,
`[..., None]`, `[:, :, None]`; ignored labels clamped to a valid id and masked after.  Entropy
(optional second output): `-(softmax * log_softmax).sum(-1)`, `-(exp(lp) * lp).sum(-1)`,
`logsumexp(z) - (softmax(z) * z).sum(-1)`.  Between head and log-softmax: an fp32 upcast, `/ T`,
the `[:, :-1]` shift.  The per-token value is then returned, summed per sequence, or turned into
a GRPO-style ratio against old log-probs (not reduced to a scalar NLL: that is
fused_linear_cross_entropy's).  Without an lm head no pattern claims the code: such cases are
judged on equality alone.
"""

from __future__ import annotations

from hypothesis import strategies as st

from tests.differential import spelling as sp
from tests.differential.perturb import dynamic, edges, perturbed
from tests.differential.source import MATH, Case, Input, Src

PATTERNS = ("fused_linear_logprob",)

MATH_EDITS = (
    ("log-softmax over dim 1", r"log_softmax\((\w+), -1", r"log_softmax(\1, 1"),
    ("logsumexp of scaled logits", r"(\w+)\.logsumexp\(-1\)", r"(\1 * 0.5).logsumexp(-1)"),
    ("ids flipped along time", r"\bidx = (\w+)", r"idx = \1.flip(1)"),
    ("entropy with a scaled log-probability", r"\* (lp|lq)\)\.sum\(-1\)", r"* (0.5 * \1)).sum(-1)"),
    ("entropy's expectation of scaled logits", r"\* z\)\.sum\(-1\)", "* z * 0.5).sum(-1)"),
    ("log-prob squared", r"^(tok = )(.*)$", r"\1(\2) ** 2"),
    ("exp of a scaled difference", r"torch\.exp\(tok - old\)", "torch.exp(0.5 * (tok - old))"),
    ("temperature applied twice", r"^z = (\w+) / ([\d.]+)", r"z = \1 / \2 / \2"),
)


def _logprob(draw, body, V) -> str:
    """Lines computing `tok`, the log-prob of `idx` under `z`; returns the spelling's name."""
    form = draw(st.sampled_from(("log_softmax+gather", "torch.gather", "gather-lse", "-cross_entropy")))
    index = draw(st.sampled_from(("idx.unsqueeze(-1)", "idx[..., None]", "idx[:, :, None]")))
    if form == "log_softmax+gather":
        lsm = draw(st.sampled_from(("F.log_softmax(z, -1)", "z.log_softmax(-1)",
                                    "F.log_softmax(z, -1, dtype=torch.float32)")))
        body.append(f"lp = {lsm}")
        body.append(f"tok = lp.gather(-1, {index}).squeeze(-1)")
    elif form == "torch.gather":
        body.append("lp = z.log_softmax(-1)")
        body.append(f"tok = torch.gather(lp, -1, {index}).squeeze(-1)")
    elif form == "gather-lse":
        body.append(f"sel = torch.gather(z, -1, {index}).squeeze(-1)")
        body.append("tok = sel - z.logsumexp(-1)")
    else:
        body.append(f"nll = F.cross_entropy(z.reshape(-1, {V}), idx.reshape(-1), reduction='none')")
        body.append(draw(st.sampled_from(("tok = -nll.view_as(idx)", "tok = -nll.view(idx.shape)",
                                          "tok = -(nll.reshape(idx.shape[0], -1))"))))
    return form


def _entropy(draw, body) -> str:
    form = draw(st.sampled_from(("softmax*log_softmax", "exp(lp)*lp", "lse - E[z]")))
    if form == "softmax*log_softmax":
        body.append("lq = F.log_softmax(z, dim=-1)")
        body.append("ent = -(F.softmax(z, dim=-1) * lq).sum(-1)")
    elif form == "exp(lp)*lp":
        body.append("lq = torch.log_softmax(z, -1)")
        body.append("ent = -(lq.exp() * lq).sum(-1)")
    else:
        body.append("pz = torch.softmax(z, -1)")
        body.append("ent = torch.logsumexp(z, -1) - (pz * z).sum(-1)")
    return form


@st.composite
def cases(draw):
    dtype = draw(sp.DTYPES)
    B, T, D, V = 2, 4, 16, draw(st.sampled_from((24, 40)))
    head = draw(st.sampled_from((True, True, True, False)))
    src = Src()
    body = []
    if head:
        src.inputs.append(Input("h", (B, T, D)))
        src.init = [f"self.head = nn.Linear({D}, {V}, bias={draw(st.booleans())})"]
        body.append(draw(st.sampled_from(("l = self.head(h)", "l = F.linear(h, self.head.weight, self.head.bias)"))))
    else:
        src.inputs.append(Input("logits", (B, T, V), scale=2.0))
        body.append("l = logits")
    ignore = draw(st.booleans())
    src.inputs.append(Input("labels", (B, T), kind="labels", high=V, ignore=ignore))
    body.append(f"l1 = {sp.upcast(draw, 'l')}" if draw(st.booleans()) else "l1 = l")
    shift = draw(st.booleans())
    if shift:
        body += ["l2 = l1[:, :-1, :]", "ids = labels[:, 1:]"]
    else:
        body += ["l2 = l1", "ids = labels"]
    temp = draw(st.sampled_from((None, 0.7, 2.0)))
    body.append(f"z = l2 / {temp}" if temp else "z = l2")
    body.append(draw(st.sampled_from(("idx = ids.clamp_min(0)", "idx = torch.where(ids == -100, 0, ids)")))
                if ignore else "idx = ids")
    form = _logprob(draw, body, V)
    if ignore:
        body.append("tok = tok * (ids != -100)")
    use = draw(st.sampled_from(("per token", "per sequence", "ratio")))
    if use == "per sequence":
        body.append("out = tok.sum(-1)")
    elif use == "ratio":
        src.inputs.append(Input("old", (B, T - 1 if shift else T), grad=False))
        body.append("out = torch.exp(tok - old)")
    else:
        body.append("out = tok")
    src.returns = ["out"]
    ent = None
    if draw(st.booleans()):
        ent = _entropy(draw, body)
        src.returns.append("ent")
    src.body = body
    kind, what = draw(perturbed(src, MATH_EDITS))
    kind, what = draw(edges(src, kind, what, logits=("logits", "h"), labels=("labels",) if ignore else (),
                              shapes=("old",)))
    base = (f"{'lm head' if head else 'no lm head'}: {form}{f', entropy {ent}' if ent else ''}, "
            f"{'shifted, ' if shift else ''}T={temp}, {use}, ignore={ignore}")
    if not head:
        kind = MATH  # no built-in pattern claims log-probs of given logits: equality alone
    # log-probs whose logits are also read elsewhere are fused_linear_cross_entropy's by design
    # (it writes the logits from its pass: patterns/logprob.py); its rewrite counts, its near
    # miss does not (a refusal there must be reported as this pattern's)
    return Case(src, PATTERNS, kind, dtype, f"{base}; {what}" if what else base, dynamic=dynamic(draw),
                rewritten_as=("fused_linear_cross_entropy",))
