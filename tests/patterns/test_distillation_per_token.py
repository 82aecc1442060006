"""Issue 23 §2: a per-token distillation divergence keeps the fused path.

A generalised JSD written `jsd.sum(-1)[mask]` before its mean (the issue's TRL form): the
boolean indexing cuts the graph, so the per-token divergence is a graph output.  Any other reduction the algebra does
not model (weights broadcast per sequence, a per-sequence sum, a value returned for logging)
reads it too.  The pattern then replaces the per-token value with the per-token op's output
(liger::fused_linear_distillation_per_token / liger::distillation_per_token: chunked, no [N, V]
kept, backward recomputes the chunks with the per-row upstream gradient) and leaves everything
after it in the graph.

Each case: compiled with validate="raise" (inner aot_eager), forward and backward compared
against float64 by `within_eager_rounding` (eager in the same dtype sets the bar), fp32 and a
bf16 student upcast to fp32, both kernel paths; the report must count the rewrite.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ligerfx.compiler.validate import within_eager_rounding
from tests.differential.oracle import collect_reports

B, T, H, V = 2, 5, 16, 40
PATTERNS = ("fused_linear_distillation", "distillation_loss")
BETA = 0.3


def _jsd_rows(s, t):
    """TRL's generalized_jsd_loss up to its per-token sum (student logits s, teacher t)."""
    ls = F.log_softmax(s.float(), -1)
    lt = F.log_softmax(t.float(), -1)
    beta = torch.tensor(BETA, dtype=ls.dtype)
    m = torch.logsumexp(torch.stack([ls + torch.log(1 - beta), lt + torch.log(beta)]), 0)
    kl_t = F.kl_div(m, lt, reduction="none", log_target=True)
    kl_s = F.kl_div(m, ls, reduction="none", log_target=True)
    return (beta * kl_t + (1 - beta) * kl_s).sum(-1)


def trl_jsd(s, t, mask, w):
    return _jsd_rows(s, t)[mask].mean()  # boolean indexing: a graph break after the sum


def weighted_kl(s, t, mask, w):
    per_tok = F.kl_div(F.log_softmax(s.float() / 2.0, -1), F.log_softmax(t.float() / 2.0, -1),
                       reduction="none", log_target=True).sum(-1) * mask
    # per-sequence weights [B, 1] broadcast over the tokens: not a row mask the algebra reads
    return (per_tok * w[:, None]).sum() / mask.sum(), per_tok.detach()


def per_sequence(s, t, mask, w):
    sf = s.float()  # one cast (two casts of the head's output keep the head unfused)
    ps = F.softmax(sf, -1)
    lt = F.log_softmax(t.float(), -1)
    rkl = (ps * (F.log_softmax(sf, -1) - lt)).sum(-1)  # [B, T]
    return rkl.sum(-1)  # [B]: a per-sequence sum


CASES = {"trl_jsd": trl_jsd, "weighted_kl": weighted_kl, "per_sequence": per_sequence}


class _M(nn.Module):
    def __init__(self, fn, head: bool):
        super().__init__()
        self.fn = fn
        self.head = nn.Linear(H, V) if head else None

    def forward(self, x, t, mask, w):
        s = self.head(x) if self.head is not None else x
        if self.fn is trl_jsd:
            # the break written in this frame (one in a called function would cut the graph at
            # the call, before the loss, in Dynamo)
            return _jsd_rows(s, t)[mask].mean()
        return self.fn(s, t, mask, w)


def _run(fn, head, dtype, seed=0):
    torch.manual_seed(seed)
    model = _M(fn, head)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H if head else V, generator=g, dtype=torch.float64) * (1 if head else 2)
    t = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    mask = torch.rand(B, T, generator=g) > 0.3
    w = torch.rand(B, generator=g, dtype=torch.float64) + 0.5
    outs = {}
    for name, dt in (("ref", torch.float64), ("low", dtype), ("got", dtype)):
        m = copy.deepcopy(model).to(dt)
        xi = x.to(dt).requires_grad_(not head)
        wf = w.to(torch.float64 if dt == torch.float64 else torch.float32)
        reports: list = []
        if name == "got":
            torch._dynamo.reset()
            m = torch.compile(m, backend="liger", options={"inner": "aot_eager",
                                                           "log_report": False,
                                                           "validate": "raise"})
        with collect_reports(reports):
            out = m(xi, t.to(dt), mask, wf)
        out = out if isinstance(out, tuple) else (out,)
        up = [torch.randn(o.shape, generator=torch.Generator().manual_seed(7 + i),
                          dtype=torch.float64).to(o.dtype) for i, o in enumerate(out)]
        leaves = [xi] if not head else list(m.parameters())
        diff = [(o, u) for o, u in zip(out, up) if o.requires_grad]
        grads = torch.autograd.grad([o for o, _ in diff], leaves, [u for _, u in diff])
        outs[name] = [o.detach() for o in out] + list(grads), reports
    problems = [p for i, (a, b, c) in enumerate(zip(outs["got"][0], outs["low"][0],
                                                   outs["ref"][0]))
                if (p := within_eager_rounding(f"value {i}", a, b, c, torch.float32))]
    reps = outs["got"][1]
    matches = [m for r in reps for m in r.matches if m.pattern in PATTERNS]
    misses = [n.reason for r in reps for n in r.near_misses if n.pattern in PATTERNS]
    assert not problems, (problems, [m.detail for m in matches], misses)
    assert matches and all("per-token" in m.detail for m in matches), ([m.detail for m in
                                                                         matches], misses)
    want = "fused_linear_distillation" if head else "distillation_loss"
    assert {m.pattern for m in matches} == {want}, [m.pattern for m in matches]
    return matches


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_per_token_on_logits(kernel_path, case, dtype):
    _run(CASES[case], False, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_per_token_fused_lm_head(kernel_path, case, dtype):
    _run(CASES[case], True, dtype)


def _mean_and_rows(s, t, mask, w):
    rows = F.kl_div(F.log_softmax(s.float(), -1), F.softmax(t.float(), -1),
                    reduction="none").sum(-1)
    return rows.mean(), rows  # the reduced loss and its per-token values, both returned


def test_per_token_and_its_mean_both_returned(kernel_path):
    _run(_mean_and_rows, True, torch.float32)


def test_per_token_in_bf16_is_refused():
    import ligerfx

    def fn(s, t):  # no upcast: eager's log-softmax and per-token sum round in bf16
        return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="none",
                        log_target=True).sum(-1)

    s = torch.randn(B, T, V, dtype=torch.bfloat16, requires_grad=True)
    report = ligerfx.explain(fn, s, torch.randn(B, T, V, dtype=torch.bfloat16))
    assert not [m for m in report.matches if m.pattern in PATTERNS]
    assert [n for n in report.near_misses if n.pattern in PATTERNS], report


# -- every leaf's own chain (found while adding the per-token mode) ------------------------------

def _lossy_leaf(s, t, mask, w):
    ls = F.log_softmax(s, -1)
    ps = F.softmax(s.to(torch.bfloat16).float(), -1)  # this leaf reads the rounded logits
    return (ps * (ls - F.log_softmax(t, -1))).sum(-1)


def test_a_lossy_cast_on_one_leaf_is_refused():
    # was rewritten: the kernel computed ps from the unrounded logits (a wrong answer, 2e-4 off
    # where eager is 2e-8 off float64)
    import ligerfx

    x = torch.randn(B, T, V, requires_grad=True)
    report = ligerfx.explain(_M(_lossy_leaf, False), x, torch.randn(B, T, V), None, None)
    assert not [m for m in report.matches if m.pattern in PATTERNS], report
    assert any("bfloat16" in n.reason and "on the way to" in n.reason
               for n in report.near_misses), report


def _two_casts(s, t, mask, w):
    ps = F.softmax(s.float(), -1)
    return (ps * (F.log_softmax(s.float(), -1) - F.log_softmax(t.float(), -1))).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_two_casts_of_the_head_keep_it_fused(kernel_path, dtype):
    # each leaf's cast is its own node: the head was left unfused (distillation_loss on logits)
    _run(_two_casts, True, dtype)
