"""distillation_loss / fused_linear_distillation cases: a divergence between a student's and a
teacher's softmax, reduced to a scalar; one case in three with the student close to the teacher
(its logits or head plus 1e-3 noise).

Divergences: forward KL, reverse KL, the generalised JSD (any beta: 0 and 1 as TRL writes them, as
plain KLs with log_target=True; otherwise the logsumexp mixture, with Python or tensor weights)
and TVD, spelled with `F.kl_div(input, target, log_target=.., reduction=..)`, hand-written
`p * (log p - log q)`, `exp` of a log-softmax, `log` of a softmax, `abs(p - q)`.  Around them: a
temperature (`/ T`, the teacher's maybe `* (1 / T)`), an fp32 upcast, rows flattened or not, a row
mask (from labels or a 0/1 input), the reductions (`sum`, `mean`, `batchmean`, per-row then mean,
`/ mask.sum()`, `.mean()` over every element, a per-class mean), `* T**2`,
`+ alpha * F.cross_entropy`; per-token outputs (the per-row divergence returned, boolean-indexed
then averaged, summed per sequence); kl_div's target may be the student's probabilities (xlogy), in the
GKD mixture too.  One case in four compiles with dynamic=True (the means then divide by
symbolic sizes, which the op reads at run time).  With an lm head (`nn.Linear`) the case is
about `fused_linear_distillation` (the teacher a no-grad linear or given logits), without one
about `distillation_loss`.
"""

from __future__ import annotations

import math

from hypothesis import strategies as st

from tests.differential import spelling as sp
from tests.differential.perturb import dynamic, edges, perturbed
from tests.differential.source import Case, Input, Src

PATTERNS = ("fused_linear_distillation", "distillation_loss")

MATH_EDITS = (
    ("exp of a scaled log-probability", r"\b(ls|lt)\.exp\(\)", r"(0.9 * \1).exp()"),
    ("exp of a negated log-probability", r"\b(ls|lt)\.exp\(\)", r"torch.exp(-\1)"),
    ("log of a scaled probability", r"\b(ps|pt)\.log\(\)", r"(2.0 * \1).log()"),
    ("coefficient inside abs", r"\(ps - pt\)\.abs\(\)", "((ps - pt) * 0.3).abs()"),
    ("abs divided inside the sum", r"torch\.abs\(ps - pt\)", "(torch.abs(ps - pt) / 3.0)"),
    ("probability squared", r"^d = pt \* ", "d = pt.pow(2) * "),
    ("power of the log ratio", r"\((lt|ls) - (ls|lt)\)", r"(\1 - \2) ** 2"),
    ("teacher at another temperature", r"^t1 = (\w+) / ([\d.]+)", r"t1 = \1 / (\2 + 0.5)"),
    ("student softmax over dim 1", r"F\.log_softmax\(s1, dim=-1\)", "F.log_softmax(s1, dim=1)"),
    ("per-row sum over dim 1", r"^r = d\.sum\(-1\)", "r = d.sum(1)"),
    ("mixture weights not summing to one", r"lt \+ (-?[\d.e-]+)\]", r"lt + (\1 - 0.2)]"),
    ("JSD halves weighted with another beta", r"^d = ([\d.]+) \* ", r"d = (\1 + 0.1) * "),
    ("sign of one term flipped", r"\(lt - ls\)", "(ls + lt)"),
)


def _lsm(draw, v: str) -> str:
    return draw(st.sampled_from((f"F.log_softmax({v}, dim=-1)", f"torch.log_softmax({v}, -1)",
                                 f"{v}.log_softmax(-1)")))


def _leaves(draw, body, who: str, needs: set):
    """`l{who}` (log-probabilities) and `p{who}` (probabilities) of `{who}1`, in a spelling."""
    form = draw(st.sampled_from(("log_softmax", "log_softmax", "softmax then log")))
    if form == "softmax then log":  # log(softmax): eager's -inf where the softmax underflows
        body.append(f"p{who} = F.softmax({who}1, dim=-1)")
        body.append(f"l{who} = p{who}.log()")
        return
    body.append(f"l{who} = {_lsm(draw, f'{who}1')}")
    if f"p{who}" in needs:
        body.append(draw(st.sampled_from((f"p{who} = l{who}.exp()", f"p{who} = F.softmax({who}1, dim=-1)",
                                          f"p{who} = torch.exp(l{who})"))))


def _divergence(draw):
    """(name, needed leaves, body lines computing `d` elementwise, a single kl_div call or None)."""
    kind = draw(st.sampled_from(("fkl", "rkl", "jsd", "jsd0", "jsd1", "tvd")))
    if kind == "fkl":
        call = draw(st.sampled_from(("F.kl_div(ls, pt, reduction=R)",
                                     "F.kl_div(ls, lt, reduction=R, log_target=True)",
                                     None, None)))
        if call:
            return "forward KL", {"pt"} if "pt" in call else set(), call
        return "forward KL", {"pt"}, draw(st.sampled_from(("pt * (lt - ls)", "(lt - ls) * pt",
                                                            "pt * lt - pt * ls")))
    if kind == "rkl":
        call = draw(st.sampled_from(("F.kl_div(lt, ps, reduction=R)",
                                     "F.kl_div(lt, ls, reduction=R, log_target=True)", None)))
        if call:
            return "reverse KL", {"ps"} if "ps" in call else set(), call
        return "reverse KL", {"ps"}, "ps * (ls - lt)"
    if kind in ("jsd0", "jsd1"):  # TRL's GKD: beta 0 / 1 are plain KLs on log-probabilities
        call = ("F.kl_div(ls, lt, reduction=R, log_target=True)" if kind == "jsd0"
                else "F.kl_div(lt, ls, reduction=R, log_target=True)")
        return f"JSD beta {kind[-1]}", set(), call
    if kind == "tvd":
        return "TVD", {"ps", "pt"}, draw(st.sampled_from(("0.5 * (ps - pt).abs()",
                                                           "torch.abs(ps - pt) * 0.5",
                                                           "(pt - ps).abs() / 2.0")))
    beta = draw(st.sampled_from((0.1, 0.5, 0.7)))
    # kl_div's target on each side: the log-probabilities (log_target=True) or the probabilities
    # (xlogy: the student's case is 0 / a NaN gradient row where ps underflows to 0)
    tgt_t = draw(st.sampled_from(("lt, reduction='none', log_target=True", "pt, reduction='none'")))
    tgt_s = draw(st.sampled_from(("ls, reduction='none', log_target=True", "ps, reduction='none'")))
    needs = {x for x in ("pt", "ps") if x in tgt_t + tgt_s}
    return f"JSD beta {beta}", needs, (beta, tgt_t, tgt_s)


@st.composite
def cases(draw):
    dtype = draw(sp.DTYPES)
    B, T, D, V = 2, 3, 16, draw(st.sampled_from((24, 40)))
    head = draw(st.booleans())
    # the student close to the teacher (a KD run near convergence, a student initialised from the
    # teacher): log-probabilities whose differences are ~1e-3 (issue 22: the kernel must subtract
    # them as eager does, not cancel ps*ls - ps*lt)
    close = draw(st.sampled_from((False, False, True)))
    src = Src()
    body = []
    if head:
        src.inputs.append(Input("h", (B, T, D)))
        bias = draw(st.booleans())
        src.init = [f"self.head = nn.Linear({D}, {V}, bias={bias})"]
        body.append(draw(st.sampled_from(("s = self.head(h)", "s = F.linear(h, self.head.weight, self.head.bias)"))))
        if close or draw(st.booleans()):  # the teacher a frozen linear in the same graph
            src.init += [f"self.teacher = nn.Linear({D}, {V}, bias=True)", "self.teacher.requires_grad_(False)"]
            if close:  # the teacher's head = the student's + 1e-3 of its own initial values
                src.init.append("with torch.no_grad(): self.teacher.weight.mul_(1e-3).add_(self.head.weight)")
                if bias:
                    src.init.append("with torch.no_grad(): self.teacher.bias.mul_(1e-3).add_(self.head.bias)")
            body.append("t = self.teacher(h).detach()")
        else:
            src.inputs.append(Input("t", (B, T, V), grad=False, scale=2.0))
    elif close:
        src.inputs += [Input("s", (B, T, V), scale=2.0), Input("t", (B, T, V), grad=False, scale=1e-3, near="s")]
    else:
        src.inputs += [Input("s", (B, T, V), scale=2.0), Input("t", (B, T, V), grad=False, scale=2.0)]
    temp = draw(st.sampled_from((1.0, 2.0, 0.5)))
    up = draw(st.booleans())
    body.append(f"s0 = {sp.upcast(draw, 's')}" if up else "s0 = s")
    body.append(f"t0 = {sp.upcast(draw, 't')}" if up else "t0 = t")
    rows = draw(st.booleans())
    sv, tv = "s0", "t0"
    if rows:  # flattened to [N, V] rows first (batchmean then divides by N)
        body += [f"sr = s0.reshape(-1, {V})", f"tr = t0.view(-1, {V})"]
        sv, tv = "sr", "tr"
    body.append(f"s1 = {sv} / {temp}")
    body.append(draw(st.sampled_from((f"t1 = {tv} / {temp}", f"t1 = {tv} * {1 / temp!r}"))))
    name, needs, div = _divergence(draw)
    _leaves(draw, body, "s", needs)
    _leaves(draw, body, "t", needs)
    single = isinstance(div, str) and div.startswith("F.kl_div")
    if isinstance(div, tuple):  # the GKD mixture
        beta, tgt_t, tgt_s = div
        if draw(st.booleans()):
            body.append(f"m = torch.logsumexp(torch.stack([ls + {math.log(1 - beta)!r}, lt + {math.log(beta)!r}]), 0)")
        else:
            body += [f"b = torch.tensor({beta}, dtype=ls.dtype)",
                     "m = torch.logsumexp(torch.stack([ls + torch.log(1 - b), lt + torch.log(b)]), dim=0)"]
        body.append(f"d = {beta} * F.kl_div(m, {tgt_t}) + "
                    f"{round(1 - beta, 6)!r} * F.kl_div(m, {tgt_s})")
    # the means divide by sizes that are symbolic under dynamic=True (read by the op at run time)
    reds = ("rows mean", "rows masked", "sum", "sum / B", "mean", "class mean", "class mean masked",
            # the per-token divergence as the op's per-token output (issue 23 §2): returned,
            # boolean-indexed (a graph break, TRL's jsd[mask]) or summed per sequence
            "per-token", "per-token indexed", "per-sequence")
    red = draw(st.sampled_from((("kl_div",) if single else ()) + reds))
    if isinstance(div, str):
        if single and red == "kl_div":
            r = draw(st.sampled_from(("'batchmean'", "'sum'", "'mean'")))
            body.append("loss = " + div.replace("reduction=R", f"reduction={r}"))
        else:
            body.append("d = " + div.replace("reduction=R", "reduction='none'"))
    labels = red in ("rows masked", "class mean masked", "per-token indexed") or draw(st.booleans())
    if labels:
        src.inputs.append(Input("labels", (B, T), kind="labels", high=V, ignore=draw(st.booleans())))
    if red == "rows mean":
        body += ["r = d.sum(-1)", "loss = r.mean()"]
    elif red == "mean":
        body.append("loss = d.mean()")
    elif red == "class mean":
        body += ["r = d.mean(-1)", draw(st.sampled_from(("loss = r.sum()", "loss = r.mean()")))]
    elif red in ("rows masked", "class mean masked"):
        body.append("r = d.sum(-1)" if red == "rows masked" else "r = d.mean(dim=-1)")
        if draw(st.booleans()):
            src.inputs.append(Input("keep", (B, T), kind="mask"))
            mask = "keep"
        else:
            mask = draw(st.sampled_from(("(labels != -100).float()", "(labels != -100)")))
        body.append(f"mask = {mask}" + (".reshape(-1)" if rows else ""))
        body.append("loss = (r * mask).sum() / mask.sum()")
    elif red == "per-token":
        body += ["r = d.sum(-1)", "loss = r"]
    elif red == "per-token indexed":
        keep = "labels.reshape(-1) != -100" if rows else "labels != -100"
        body += ["r = d.sum(-1)", f"loss = r[{keep}].mean()"]
    elif red == "per-sequence":
        body += ["r = d.sum(-1)", f"loss = r.view({B}, -1).sum(-1)" if rows else "loss = r.sum(-1)"]
    elif red == "sum":
        body.append("loss = d.sum()")
    elif red == "sum / B":
        body.append("loss = d.sum() / s.shape[0]")
    if temp != 1.0 and draw(st.booleans()):
        body.append(draw(st.sampled_from((f"loss = loss * {temp} ** 2", f"loss = loss * ({temp} * {temp})"))))
    if labels and draw(st.booleans()):  # plus the hard-label loss on the student logits
        body.append(f"ce = F.cross_entropy(s.reshape(-1, {V}), labels.reshape(-1), ignore_index=-100)")
        body.append("loss = 0.3 * ce + 0.7 * loss")
    src.body = body
    src.returns = ["loss"]
    kind, what = draw(perturbed(src, MATH_EDITS))
    kind, what = draw(edges(src, kind, what, logits=("s", "t"), labels=("labels",), shapes=("t", "keep")))
    pattern = "fused_linear_distillation" if head else "distillation_loss"
    base = f"{pattern}: {name}, T={temp}, {red}{', rows' if rows else ''}{', close' if close else ''}"
    return Case(src, PATTERNS, kind, dtype, f"{base}; {what}" if what else base, dynamic=dynamic(draw))
