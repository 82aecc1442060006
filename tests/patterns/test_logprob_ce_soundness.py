"""Soundness regressions of the log-prob / cross-entropy families (issue 22, differential suite).

Each case is compiled with the liger backend and compared, forward and every gradient, with the
same code run eagerly in float64 and in the case's dtype, by the oracle's rule
(`within_eager_rounding`: eager's non-finite pattern, and an error no larger than eager's own).
Both kernel paths (`kernel_path`): the torch implementation and the interpreted Triton kernels.
"""

import pytest
import torch
import torch.nn.functional as F

import ligerfx
from ligerfx.compiler.validate import within_eager_rounding

OPTS = {"inner": "aot_eager"}
B, T, H, V = 2, 6, 16, 40


def _leaves(args):
    return [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]


def _run(fn, args, upstream):
    """Outputs and gradients of `fn(*args)` under the upstream gradients `upstream`."""
    args = [a.detach().clone().requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor)
            else a for a in args]
    outs = fn(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o.to(torch.float64) * u).sum() for o, u in zip(outs, upstream))
    leaves = _leaves(args)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [o.detach() for o in outs], list(grads)


def _cast(args, dtype):
    return [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in args]


def check(fn, args, dtype, pattern=None, seed=0):
    """fn compiled == eager within eager's rounding, on inputs `args` (float64 masters, cast to
    `dtype`); returns the report.  `pattern`: the rewrite that must have happened."""
    torch.manual_seed(seed)
    ref_outs = fn(*args)
    ref_outs = ref_outs if isinstance(ref_outs, tuple) else (ref_outs,)
    upstream = [torch.randn(o.shape, dtype=torch.float64) for o in ref_outs]
    ref, ref_g = _run(fn, args, upstream)
    low, low_g = _run(fn, _cast(args, dtype), upstream)
    ligerfx.backend.last_report = None
    torch._dynamo.reset()
    cfn = torch.compile(fn, backend="liger", options=OPTS)
    got, got_g = _run(cfn, _cast(args, dtype), upstream)
    report = ligerfx.backend.last_report
    if pattern is not None:
        assert report.counts.get(pattern), str(report)
    errs = []
    for i, (g, lo, r) in enumerate(zip(got, low, ref)):
        errs.append(within_eager_rounding(f"output {i}", g, lo, r, dtype))
    for i, (g, lo, r) in enumerate(zip(got_g, low_g, ref_g)):
        errs.append(within_eager_rounding(f"grad {i}", g, lo, r, dtype))
    errs = [e for e in errs if e]
    assert not errs, errs
    return report


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# -- 2: bf16 gradients of the fused lm-head ops on the interpreter ----------------------------

def logprob_bf16_head(h, w, b, ids):
    z = F.linear(h, w, b).float() / 0.7
    return F.log_softmax(z, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def flce_bf16_head(h, w, b, ids):
    z = F.linear(h, w, b).float()
    return F.cross_entropy(z.reshape(-1, V), ids.reshape(-1))


@pytest.mark.parametrize("fn,pattern", [(logprob_bf16_head, "fused_linear_logprob"),
                                        (flce_bf16_head, "fused_linear_cross_entropy")])
def test_bf16_head_gradients_round_as_eager(kernel_path, fn, pattern):
    # The logits gradient is rounded to bf16 before the head's GEMMs; the interpreter's plain
    # fp32 -> bf16 cast truncates, eager (and CUDA) round to nearest even.
    for seed in range(3):
        g = _gen(seed)
        h = torch.randn(B, T, H, generator=g, dtype=torch.float64)
        w = torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5
        b = torch.randn(V, generator=g, dtype=torch.float64)
        ids = torch.randint(0, V, (B, T), generator=g)
        check(fn, [h, w, b, ids], torch.bfloat16, pattern, seed)


# -- 3 and 4: logits spread over hundreds (log-probabilities formed as eager forms them) -------

def ce_log_softmax_gather(logits, labels):
    lp = F.log_softmax(logits, -1)
    return -lp.gather(-1, labels.unsqueeze(-1)).squeeze(-1).mean()


def ce_functional(logits, labels):
    return F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1))


@pytest.mark.parametrize("fn", [ce_log_softmax_gather, ce_functional])
@pytest.mark.parametrize("spread", [110.0, 200.0, 1000.0])
def test_cross_entropy_wide_rows(kernel_path, fn, spread):
    # lse = max + log(sum) rounds log(sum) away: the target's gradient p_t - 1 became 0
    for seed in range(3):
        g = _gen(seed)
        # a ramp over the vocabulary (the differential suite's "rows spread over ..."): the
        # row max sits far from 0, next to terms that do not underflow
        logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2 \
            + torch.linspace(0.0, spread, V, dtype=torch.float64)
        labels = torch.randint(0, V, (B, T), generator=g)
        labels[:, ::2] = V - 1  # the max: its gradient 1 - p is the small sum of the others
        check(fn, [logits, labels], torch.float32, "cross_entropy", seed)


def logprob_entropy(h, w, ids):
    z = F.linear(h, w)
    lp = F.log_softmax(z, -1)
    tok = lp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return tok, -(lp.exp() * lp).sum(-1)


def logprob_entropy_softmax(h, w, ids):
    z = F.linear(h, w)
    tok = F.log_softmax(z, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return tok.sum(-1), -(F.softmax(z, -1) * F.log_softmax(z, -1)).sum(-1)


@pytest.mark.parametrize("fn", [logprob_entropy, logprob_entropy_softmax])
@pytest.mark.parametrize("scale", [1.0, 200.0, 1000.0])
def test_logprob_entropy_large_logits(kernel_path, fn, scale):
    for seed in range(3):
        g = _gen(seed)
        h = torch.randn(B, T, H, generator=g, dtype=torch.float64) * scale
        w = torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5
        ids = torch.randint(0, V, (B, T), generator=g)
        check(fn, [h, w, ids], torch.float32, "fused_linear_logprob", seed)


def ratio_log_softmax_gather(logits, labels, old):
    lp = F.log_softmax(logits, -1)
    tok = lp.gather(-1, labels[..., None]).squeeze(-1)
    return torch.exp(tok - old)


@pytest.mark.parametrize("spread", [110.0, 200.0])
def test_per_token_log_softmax_wide_rows(kernel_path, spread):
    for seed in range(3):
        g = _gen(seed)
        logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2 \
            + torch.linspace(0.0, spread, V, dtype=torch.float64)
        labels = torch.randint(0, V, (B, T), generator=g)
        labels[:, ::2] = V - 1
        old = torch.randn(B, T, generator=g, dtype=torch.float64)
        check(lambda x, y: ratio_log_softmax_gather(x, y, old), [logits, labels], torch.float32,
              "cross_entropy", seed)


# -- 5: -inf in the hidden state or the logits: eager's non-finite pattern ---------------------

def logprob_head_per_sequence(h, w, b, ids):
    z = F.linear(h, w, b).float() / 2.0
    return z.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1).sum(-1)


def neg_ce_head(h, w, b, ids):
    z = F.linear(h, w, b).float() / 0.7
    nll = F.cross_entropy(z.reshape(-1, V), ids.reshape(-1), reduction="none")
    return -nll.view(ids.shape)


@pytest.mark.parametrize("fn", [logprob_head_per_sequence, neg_ce_head])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_neg_inf_hidden_column(kernel_path, fn, dtype):
    # a -inf hidden column makes logits of both signs infinite: eager's log_softmax is nan on the
    # whole row (inf - inf), and so is every gradient
    g = _gen(0)
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    h[..., 5] = float("-inf")
    w = torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5
    b = torch.randn(V, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T), generator=g)
    check(fn, [h, w, b, ids], dtype, "fused_linear_logprob")



# -- bf16 logits upcast, per-token upstream: the logits' gradient rounded once ------------------

def ratio_upcast(logits, labels, old):
    lp = F.log_softmax(logits.to(torch.float32), -1)
    tok = lp.gather(-1, labels[..., None]).squeeze(-1)
    return torch.exp(0.5 * (tok - old.float()))


def scaled_mean_upcast(logits, labels):
    return F.cross_entropy(logits.float().reshape(-1, V), labels.reshape(-1)) * 0.37


@pytest.mark.parametrize("fn", [ratio_upcast, scaled_mean_upcast])
def test_bf16_logits_gradient_rounded_once(kernel_path, fn):
    # the op's stored per-row gradient was bf16, then scaled by the upstream gradient and rounded
    # again; eager rounds the scaled fp32 gradient once
    for seed in range(3):
        g = _gen(seed)
        logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
        labels = torch.randint(0, V, (B, T), generator=g)
        args = [logits, labels]
        if fn is ratio_upcast:
            args.append(torch.randn(B, T, generator=g, dtype=torch.float64))
        check(fn, args, torch.bfloat16, "cross_entropy", seed)


# -- 1: the negated per-token NLL reshaped with view_as is a log-prob --------------------------

def neg_nll_view_as(h, w, ids):
    z = F.linear(h, w)[:, :-1, :]
    idx = ids[:, 1:].clamp_min(0)
    nll = F.cross_entropy(z.reshape(-1, V), idx.reshape(-1), reduction="none")
    tok = -nll.view_as(idx)
    return (tok * (ids[:, 1:] != -100)).sum(-1)


def test_neg_nll_view_as_is_a_logprob(kernel_path):
    g = _gen(0)
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5
    ids = torch.randint(0, V, (B, T), generator=g)
    ids[0, 2] = -100
    report = check(neg_nll_view_as, [h, w, ids], torch.float32, "fused_linear_logprob")
    assert not report.counts.get("fused_linear_cross_entropy"), str(report)
