"""fused_linear_logprob: per-token log-probs (and entropy) after an lm head, in users' spellings.

Each spelling is compiled with every built-in pattern enabled (so the sharing rule with
fused_linear_cross_entropy is what runs), must be rewritten exactly once, and must give eager's
per-token values and every gradient under a random per-token upstream gradient, on the torch
path and the interpreted kernels.  Look-alikes must not be rewritten and must say why.
"""

import pytest
import torch
import torch.nn.functional as F

import ligerfx
from tests.compare import rel_err
from tests.models.trl_forms import entropy_from_logits

OPTS = {"inner": "aot_eager"}
B, T, H, V = 2, 6, 8, 40
NAME = "fused_linear_logprob"


def _head(h, w):
    return F.linear(h, w)


def lsm_gather_shift_temperature(h, w, ids):
    logits = _head(h, w)[:, :-1, :] / 0.7
    return F.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def lsm_dtype_kwarg_torch_gather(h, w, ids):
    logp = torch.log_softmax(h @ w.t(), -1, dtype=torch.float32)
    return torch.gather(logp, -1, ids[..., None])[..., 0]


def gather_minus_logsumexp(h, w, ids):
    z = _head(h, w)
    return z.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)


def trl_rows_fp32(h, w, ids):
    # TRL selective_log_softmax, fp32 branch: one logsumexp per row in a Python loop
    logits = _head(h, w)
    selected = torch.gather(logits, dim=-1, index=ids.unsqueeze(-1)).squeeze(-1)
    lse = torch.stack([torch.logsumexp(lg, dim=-1) for lg in logits])
    return selected - lse


def trl_rows_log_softmax(h, w, ids):
    # TRL selective_log_softmax, low-precision branch (here on fp32 logits)
    out = []
    for row_logits, row_ids in zip(_head(h, w), ids):
        row_logps = F.log_softmax(row_logits, dim=-1)
        out.append(row_logps.gather(dim=-1, index=row_ids.unsqueeze(-1)).squeeze(-1))
    return torch.stack(out)


def neg_cross_entropy_none(h, w, ids):
    z = _head(h, w)[:, :-1]
    return -F.cross_entropy(z.reshape(-1, V), ids[:, 1:].reshape(-1),
                            reduction="none").view(B, T - 1)


def with_entropy_exp(h, w, ids):
    logp = F.log_softmax(_head(h, w) / 1.3, -1)
    lp = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return lp, -(torch.exp(logp) * logp).sum(-1)


def with_entropy_softmax(h, w, ids):
    z = _head(h, w)
    lp = z.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - z.logsumexp(-1)
    return lp, -(F.softmax(z, -1) * F.log_softmax(z, -1)).sum(-1)


def with_entropy_lse(h, w, ids):
    z = _head(h, w)
    lp = F.log_softmax(z, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return lp, torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)


# -- the ids with a trailing unit dim, in every spelling (the gather index is read by shape) ---

def index_none_after_slice(h, w, ids):
    logits = _head(h, w)
    return logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def index_view_unit(h, w, ids):
    return F.log_softmax(_head(h, w), -1).gather(-1, ids.view(B, T, 1)).squeeze(-1)


def index_reshape_unit_dim2(h, w, ids):
    logp = F.log_softmax(_head(h, w), -1)
    return logp.gather(2, ids.reshape(*ids.shape, 1)).squeeze(2)


def index_also_read_elsewhere(h, w, ids):
    idx = ids[:, 1:].unsqueeze(-1)  # the index itself is read again: the op reads it, squeezed
    lp = F.log_softmax(_head(h, w)[:, :-1], -1).gather(-1, idx).squeeze(-1)
    return lp * (idx.squeeze(-1) != 0)


def trl_rows_index_none(h, w, ids):
    z = _head(h, w)
    return torch.stack([F.log_softmax(z[i], -1).gather(-1, ids[i, :, None]).squeeze(-1)
                        for i in range(B)])


# -- the entropy in TRL's row loops ------------------------------------------------------------

def with_entropy_rows_same_loop(h, w, ids):
    lps, ents = [], []
    for row_logits, row_ids in zip(_head(h, w), ids):
        logp = F.log_softmax(row_logits, -1)
        lps.append(logp.gather(-1, row_ids.unsqueeze(-1)).squeeze(-1))
        ents.append(-(logp.exp() * logp).sum(-1))
    return torch.stack(lps), torch.stack(ents)


def with_entropy_rows_own_loop(h, w, ids):
    # selective_log_softmax's fp32 branch, then entropy_from_logits as a loop of its own
    z = _head(h, w) / 0.8
    lse = torch.stack([torch.logsumexp(r, -1) for r in z])
    lp = z.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - lse
    ent = torch.stack([-(F.softmax(r, -1) * F.log_softmax(r, -1)).sum(-1) for r in z])
    return lp, ent


def with_entropy_full_after_row_loop(h, w, ids):
    z = _head(h, w)
    lp = torch.stack([F.log_softmax(z[i], -1).gather(-1, ids[i].unsqueeze(-1)).squeeze(-1)
                      for i in range(B)])
    logp = F.log_softmax(z, -1)
    return lp, -(logp.exp() * logp).sum(-1)


def _entropy_from_logits(logits):
    return entropy_from_logits(logits, chunk_size=4)


def entropy_from_logits_extend(logits, chunk_size=1):
    # the earlier TRL version: chunks of the batch, `extend` (one getitem per row), stack
    per_token = []
    for chunk in logits.split(chunk_size, dim=0):
        logps = F.log_softmax(chunk, dim=-1)
        per_token.extend(-(torch.exp(logps) * logps).sum(-1))
    return torch.stack(per_token)


def with_entropy_grpo_trl(h, w, ids):
    # GRPOTrainer._get_per_token_logps_and_entropies: temperature, selective_log_softmax's
    # low-precision branch, entropy_from_logits
    z = _head(h, w) / 0.7
    lp = torch.stack([F.log_softmax(r, -1).gather(-1, i.unsqueeze(-1)).squeeze(-1)
                      for r, i in zip(z, ids)])
    return lp, _entropy_from_logits(z)


def with_entropy_trl_extend(h, w, ids):
    z = _head(h, w)
    lp = torch.gather(z, -1, ids.unsqueeze(-1)).squeeze(-1) \
        - torch.stack([torch.logsumexp(r, -1) for r in z])
    return lp, entropy_from_logits_extend(z)


SPELLINGS = [lsm_gather_shift_temperature, lsm_dtype_kwarg_torch_gather, gather_minus_logsumexp,
             trl_rows_fp32, trl_rows_log_softmax, neg_cross_entropy_none, with_entropy_exp,
             with_entropy_softmax, with_entropy_lse, index_none_after_slice, index_view_unit,
             index_reshape_unit_dim2, index_also_read_elsewhere, trl_rows_index_none,
             with_entropy_rows_same_loop, with_entropy_rows_own_loop,
             with_entropy_full_after_row_loop, with_entropy_grpo_trl, with_entropy_trl_extend]


def _args(seed, dtype=torch.float32, bias=False):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=gen) / H**0.5 * 2).to(dtype).requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=gen)
    return h, w, ids


def _compile(fn, *args, options=None):
    torch._dynamo.reset()
    ligerfx.backend.last_report = None
    out = torch.compile(fn, backend="liger", options={**OPTS, **(options or {})})(*args)
    return out, ligerfx.backend.last_report


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _compare(fn, args, rtol=1e-4):
    got, report = _compile(fn, *args)
    exp = fn(*args)
    got, exp = _tuple(got), _tuple(exp)
    for g, e in zip(got, exp):
        assert g.shape == e.shape and g.dtype == e.dtype
        assert rel_err(g, e) < rtol
    cots = [torch.randn_like(e) for e in exp]  # any upstream gradient per token
    diff = [a for a in args if a.requires_grad]
    for gg, ge in zip(torch.autograd.grad(got, diff, cots), torch.autograd.grad(exp, diff, cots)):
        assert rel_err(gg, ge) < rtol
    return report


@pytest.mark.parametrize("fn", SPELLINGS, ids=lambda f: f.__name__)
def test_spellings_rewritten_and_exact(fn, kernel_path):
    args = _args(SPELLINGS.index(fn))
    if fn is index_also_read_elsewhere:
        args[2][0, 3] = 0  # a masked token
    report = _compare(fn, args)
    assert report.counts.get(NAME) == 1, str(report)
    assert not report.counts.get("fused_linear_cross_entropy"), str(report)
    assert not report.counts.get("cross_entropy"), str(report)
    if fn.__name__.startswith("with_entropy"):
        m = next(m for m in report.matches if m.pattern == NAME)
        assert "entropy" in m.detail


def test_reduced_nll_with_sliced_none_index_is_not_a_silent_miss():
    # fused_linear_cross_entropy reads only `ids.unsqueeze(-1)`; this spelling stays ours
    def sft(h, w, ids):
        return -_head(h, w)[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1).mean()

    args = _args(31)
    assert ligerfx.explain(sft, *args, options=OPTS).counts.get(NAME) == 1
    got, _ = _compile(sft, *args)
    assert rel_err(got, sft(*args)) < 1e-5


def lsm_gather_logits_returned(h, w, ids):
    z = _head(h, w) / 0.9
    return F.log_softmax(z, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1), z


def test_logits_returned_beside_log_probs_written_by_the_same_pass(kernel_path):
    """The logits are an output anyway: fused_linear_cross_entropy's gather variant writes them
    from its pass (return_logits), which saves the [N, V] log-softmax and its gradients."""
    report = _compare(lsm_gather_logits_returned, _args(32))
    assert report.counts.get("fused_linear_cross_entropy") == 1, str(report)
    m = next(m for m in report.matches if m.pattern == "fused_linear_cross_entropy")
    assert "logits also returned" in m.detail
    assert not any(m.pattern == NAME for m in report.near_misses), str(report)


def test_ignored_rows_of_cross_entropy_spelling_are_minus_zero(torch_path):
    h, w, ids = _args(3)
    ids[0, 2] = ids[1, 4] = -100

    def fn(h, w, ids):
        return -F.cross_entropy(_head(h, w).view(-1, V), ids.view(-1), reduction="none")

    got, report = _compile(fn, h, w, ids)
    exp = fn(h, w, ids)
    assert report.counts.get(NAME) == 1, str(report)
    assert torch.equal(torch.signbit(got), torch.signbit(exp)) and rel_err(got, exp) < 1e-5


def test_reduced_nll_stays_with_cross_entropy_pattern():
    def sft_nll(h, w, ids):
        lp = F.log_softmax(_head(h, w), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        return -lp.mean()

    def per_sequence(h, w, ids):
        lp = F.log_softmax(_head(h, w), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        return lp.sum(-1)

    args = _args(4)
    assert ligerfx.explain(sft_nll, *args, options=OPTS).counts.get(
        "fused_linear_cross_entropy") == 1
    assert ligerfx.explain(per_sequence, *args, options=OPTS).counts.get(NAME) == 1
    # with the cross-entropy pattern off, the reduced NLL is ours
    assert ligerfx.explain(sft_nll, *args, options={**OPTS, "exclude": [
        "fused_linear_cross_entropy"]}).counts.get(NAME) == 1


def test_bf16_head_with_float_upcast(kernel_path):
    h, w, ids = _args(5, torch.bfloat16)

    def fn(h, w, ids):
        return F.log_softmax(_head(h, w).float(), -1).gather(-1, ids[..., None]).squeeze(-1)

    got, report = _compile(fn, h, w, ids)
    assert report.counts.get(NAME) == 1, str(report)
    h64, w64 = (a.detach().double().requires_grad_() for a in (h, w))
    exp, exp64 = fn(h, w, ids), fn(h64, w64, ids)
    assert rel_err(got, exp64) <= 2 * rel_err(exp, exp64) + 1e-6
    cot = torch.randn_like(exp64)
    for g, e, e64 in zip(torch.autograd.grad(got, (h, w), cot.float()),
                         torch.autograd.grad(exp, (h, w), cot.float()),
                         torch.autograd.grad(exp64, (h64, w64), cot)):
        assert rel_err(g, e64) <= 2 * rel_err(e, e64) + 1e-6


def test_out_of_range_id_raises_as_eager():
    h, w, ids = _args(6)
    ids[1, 1] = V
    with pytest.raises(RuntimeError):
        gather_minus_logsumexp(h, w, ids)
    with pytest.raises(Exception, match="out of range|out of bounds"):
        _compile(gather_minus_logsumexp, h, w, ids)


# -- look-alikes ---------------------------------------------------------------------------------

def tensor_temperature(h, w, ids, temp):
    logits = _head(h, w) / temp
    return F.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1).sum(-1)


def ids_cover_part(h, w, ids):
    logp = F.log_softmax(_head(h, w), -1)
    return logp.gather(-1, ids[:, :3].unsqueeze(-1)).squeeze(-1).sum(-1)


def bf16_log_softmax(h, w, ids):
    return F.log_softmax(_head(h, w), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1).sum(-1)


def logits_also_returned(h, w, ids):
    # the gather - logsumexp spelling: no op here writes the logits from its pass
    z = _head(h, w)
    return (z.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - z.logsumexp(-1)).sum(-1), z


def row_loop_logits_logged(h, w, ids):
    z = _head(h, w)
    lp = torch.stack([F.log_softmax(z[i], -1).gather(-1, ids[i].unsqueeze(-1)).squeeze(-1)
                      for i in range(B)])
    return lp.sum(-1), z.argmax(-1)


def index_none_not_trailing(h, w, ids):
    # ids[:, None] is [B, 1, T]: gather reads row 0 of each sequence at T ids, not a log-prob
    logp = F.log_softmax(_head(h, w), -1)
    return logp.gather(-1, ids[:, None]).squeeze(-1).sum(-1)


def entropy_chunks_swapped(h, w, ids):
    # entropy_from_logits with its two chunks concatenated the wrong way round
    z = _head(h, w)
    lp = F.log_softmax(z, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    a, b = z.reshape(-1, V).split(B * T // 2)
    ents = [-(F.softmax(c, -1) * F.log_softmax(c, -1)).sum(-1) for c in (b, a)]
    return lp, torch.cat(ents).reshape(B, T)


def entropy_rows_out_of_order(h, w, ids):
    z = _head(h, w)
    lp = z.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - z.logsumexp(-1)
    ent = torch.stack([-(F.softmax(z[i], -1) * F.log_softmax(z[i], -1)).sum(-1) for i in (1, 0)])
    return lp, ent


def rows_out_of_order(h, w, ids):
    z = _head(h, w)
    sel = z.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return sel - torch.stack([torch.logsumexp(z[1], -1), torch.logsumexp(z[0], -1)])


def log_softmax_other_dim(h, w, ids):
    logp = F.log_softmax(_head(h, w), -2)
    return logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1).sum(-1)


LOOK_ALIKES = [
    (tensor_temperature, "temperature as a Python number"),
    (ids_cover_part, "token ids have shape"),
    (bf16_log_softmax, "upcast_statistics"),
    (logits_also_returned, "does not write them"),
    (row_loop_logits_logged, "does not write them"),
    (index_none_not_trailing, "token ids have shape (2, 1, 6)"),
    (entropy_rows_out_of_order, "rows in another order: its row 0"),
    (entropy_chunks_swapped, "rows in another order: its row 0"),
    (rows_out_of_order, "stacked logsumexp"),
    (log_softmax_other_dim, "dim -2"),
]


@pytest.mark.parametrize("fn,why", LOOK_ALIKES, ids=[f.__name__ for f, _ in LOOK_ALIKES])
def test_look_alikes_not_rewritten(fn, why):
    h, w, ids = _args(7, torch.bfloat16 if fn is bf16_log_softmax else torch.float32)
    ids[:, :] = ids % B  # in range for every look-alike (rows_out_of_order gathers rows 0/1)
    args = (h, w, ids) + ((torch.tensor(0.7),) if fn is tensor_temperature else ())
    report = ligerfx.explain(fn, *args, options=OPTS)
    assert not report.counts.get(NAME), str(report)
    assert any(m.pattern == NAME and why in m.reason for m in report.near_misses), str(report)
    got, _ = _compile(fn, *args)
    for g, e in zip(_tuple(got), _tuple(fn(*args))):
        assert rel_err(g, e) < 1e-5


# -- writes (ligerfx/graph/mutation.py: each value's window starts at its first read in the match) ---

def write_ids_after_head(h, w, ids):
    # TRL's get_batch_logps: the ids are written after the lm head ran, before the gather reads them
    z = _head(h, w)[:, :-1]
    labels = ids[:, 1:].clone()
    mask = labels != 0
    labels[labels == 0] = 1
    lp = F.log_softmax(z, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return (lp * mask).sum(-1)


def write_between_row_reads(h, w, ids):
    z = _head(h, w)
    ids = ids.clone()
    a = F.log_softmax(z[0], -1).gather(-1, ids[0].unsqueeze(-1)).squeeze(-1)
    ids[1] = ids[1].flip(0)  # row 1's ids change after row 0's were read
    b = F.log_softmax(z[1], -1).gather(-1, ids[1].unsqueeze(-1)).squeeze(-1)
    return torch.stack([a, b]).sum(-1)


def test_write_before_the_first_read_still_rewrites(torch_path):
    args = _args(8)
    report = _compare(write_ids_after_head, args)
    assert report.counts.get(NAME) == 1, str(report)


def test_write_between_reads_refused():
    args = _args(9)
    report = ligerfx.explain(write_between_row_reads, *args, options=OPTS)
    assert not report.counts.get(NAME), str(report)
    assert any(m.pattern == NAME and "writes" in m.reason for m in report.near_misses), str(report)
    got, _ = _compile(write_between_row_reads, *args)
    assert rel_err(got, write_between_row_reads(*args)) < 1e-5


def lm_head_under_no_grad(h, w, ids):
    with torch.no_grad():  # a frozen head: eager's log-probs carry no gradient to h or w
        z = _head(h, w)
    return F.log_softmax(z, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1).sum(-1)


def test_grad_mode_switch_inside_the_match_detaches_the_frozen_part():
    """Regression: the fused op ran in one grad mode, so gradients reached h and w.  The head's
    inputs, read only inside the `no_grad` block, are now passed detached (ligerfx/graph/grad_mode.py)."""
    args = _args(10)
    report = ligerfx.explain(lm_head_under_no_grad, *args, options=OPTS)
    assert report.counts.get(NAME) == 1, str(report)
    got, _ = _compile(lm_head_under_no_grad, *args)
    exp = lm_head_under_no_grad(*args)
    assert got.requires_grad == exp.requires_grad is False
    assert rel_err(got, exp) < 1e-5


def log_probs_under_no_grad(h, w, ids):
    z = _head(h, w)
    with torch.no_grad():  # the op would run with autograd off, the head ran with it on
        lp = F.log_softmax(z, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return lp.sum(-1) + z.sum()


def test_grad_mode_switch_the_op_cannot_express_is_refused():
    args = _args(10)
    report = ligerfx.explain(log_probs_under_no_grad, *args, options=OPTS)
    # neither lm-head op (the plain cross_entropy op, all inside the block, is fine)
    assert not report.counts.get(NAME) and not report.counts.get("fused_linear_cross_entropy"), report
    assert any("no_grad" in m.reason for m in report.near_misses), str(report)
    got, _ = _compile(log_probs_under_no_grad, *args)
    exp = log_probs_under_no_grad(*args)
    assert rel_err(got, exp) < 1e-5


def test_entropy_of_other_logits_is_not_fused(torch_path):
    """The entropy of another head's logits is not the log-probs' entropy: the log-probs are
    rewritten alone, the entropy stays eager's."""
    def fn(h, w, w2, ids):
        lp = F.log_softmax(_head(h, w), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        z2 = _head(h, w2)
        return lp, -(F.softmax(z2, -1) * F.log_softmax(z2, -1)).sum(-1)

    h, w, ids = _args(33)
    w2 = torch.randn_like(w).requires_grad_()
    report = _compare(fn, (h, w, w2, ids))
    assert report.counts.get(NAME) == 1, str(report)
    m = next(m for m in report.matches if m.pattern == NAME)
    assert "entropy" not in m.detail


def test_row_loop_under_dynamic_shapes(torch_path):
    """Regression: with dynamic=True the batch dim Dynamo specialised (it unrolled the loop over
    it) is a SymInt of constant value; the row loop was refused with "... with None rows"."""
    args = _args(34)
    torch._dynamo.reset()
    ligerfx.backend.last_report = None
    got = torch.compile(trl_rows_log_softmax, backend="liger", options=OPTS, dynamic=True)(*args)
    assert ligerfx.backend.last_report.counts.get(NAME) == 1, str(ligerfx.backend.last_report)
    assert rel_err(got, trl_rows_log_softmax(*args)) < 1e-5
