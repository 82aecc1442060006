"""The per-token log-prob detector (patterns/logprob_detect.py): what the fused_linear_logprob
pattern does not match (a cast or an in-place write inside the log-prob) is reported under its
name; look-alikes (several ids gathered per row, logits from no lm head) and the spellings the
pattern rewrites get no detector near miss."""

import pytest
import torch
import torch.nn.functional as F

import ligerfx
from tests.patterns.test_logprob_pattern import SPELLINGS, _args

PREFIX = ("looks like the per-token log-prob of an lm head's logits but no fused_linear_logprob "
          "pattern matched: ")


def _detected(report):
    return [m for m in report.near_misses if m.reason.startswith("looks like ")]


def rounded_before_gather(h, w, ids):
    lp = F.log_softmax(F.linear(h, w).float(), -1)
    return lp.half().float().gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def selected_rounded(h, w, ids):
    z = F.linear(h, w)
    sel = z.gather(-1, ids[..., None]).squeeze(-1).to(torch.bfloat16).float()
    return sel - z.logsumexp(-1)


@pytest.mark.parametrize("fn", [rounded_before_gather, selected_rounded])
def test_a_cast_inside_the_log_prob_is_reported(fn):
    report = ligerfx.explain(fn, *_args(0))
    assert "fused_linear_logprob" not in report.counts, str(report)
    hits = _detected(report)
    assert len(hits) == 1 and hits[0].pattern == "fused_linear_logprob", str(report)
    assert hits[0].reason.startswith(PREFIX), hits[0].reason
    assert "(to float16)" in hits[0].reason or "(to bfloat16)" in hits[0].reason, hits[0].reason


def topk_logprobs(h, w, ids):
    lp = F.log_softmax(F.linear(h, w), -1)
    return lp.half().float().gather(-1, lp.topk(3, -1).indices)  # several ids per row


def no_lm_head(h, w, ids):
    lp = F.log_softmax(h.float() * 2.0, -1)
    return lp.half().float().gather(-1, ids[..., :1].unsqueeze(-1) % 8).squeeze(-1)


@pytest.mark.parametrize("fn", [topk_logprobs, no_lm_head])
def test_look_alikes_are_not_hits(fn):
    report = ligerfx.explain(fn, *_args(1))
    assert not _detected(report), str(report)


@pytest.mark.parametrize("fn", SPELLINGS, ids=[f.__name__ for f in SPELLINGS])
def test_rewritten_spellings_get_no_detector_near_miss(fn):
    report = ligerfx.explain(fn, *_args(2))
    assert report.counts.get("fused_linear_logprob"), str(report)
    assert not _detected(report), str(report)
