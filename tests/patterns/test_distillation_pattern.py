"""Distillation losses found in user code: rewrite counted, loss and student gradients = eager.

Styles (tests/models/distill.py): Hinton KL with batchmean and T**2, log_target=True on rows, the
hand-written KL, masked reverse KL, TRL/GKD's generalised JSD at beta 0 / 0.5 / 1, a Python-beta
JSD, masked TVD, and KD mixed with the hard-label CE; the teacher a second model in the same graph
(its lm head fused into the same op) or precomputed logits; HF tiny models as student and teacher.
Near misses for the look-alikes that must not be rewritten.
"""

import pytest
import torch
import torch.nn.functional as F

import ligerfx
from tests.compare import compare_training_step
from tests.models import distill as D

ONLY = {"patterns": ["fused_linear_distillation", "distillation_loss"]}
# The interpreter path runs one style per branch of the kernel (forward / reverse KL, mixture,
# TVD, CE): the algebra that tells the styles apart is the same code on both paths.
INTERPRETED = ("kl_batchmean_t2", "reverse_kl_masked", "gkd_jsd_beta05", "gkd_jsd_log1p",
               "tvd_masked", "kd_plus_ce")
STYLE_PATHS = [("torch", s) for s in D.LOSSES] + [("triton", s) for s in INTERPRETED]


@pytest.mark.parametrize("path,style", STYLE_PATHS, ids=[f"{p}-{s}" for p, s in STYLE_PATHS])
def test_styles_teacher_model_fused(monkeypatch, path, style):
    monkeypatch.setenv("TRITON_INTERPRET", "1" if path == "triton" else "0")
    model, args = D.make(D.LOSSES[style], bias=style == "kd_plus_ce")
    report = compare_training_step(model, args)
    assert report.counts.get("fused_linear_distillation") == 1, (report.counts,
                                                                report.near_misses)
    m = [m for m in report.matches if m.pattern == "fused_linear_distillation"][0]
    assert m.detail.startswith("teacher head fused"), m.detail
    if style == "kd_plus_ce":
        assert "CE" in m.detail and report.counts.get("fused_linear_cross_entropy", 0) == 0


@pytest.mark.parametrize("style", ["kl_batchmean_t2", "gkd_jsd_beta05"])
def test_teacher_as_logits(kernel_path, style):
    model, (ids, labels) = D.make(D.LOSSES[style])
    with torch.no_grad():
        t = model.teacher(ids) * 1.5
    report = compare_training_step(model, (ids, labels, t))
    assert report.counts.get("fused_linear_distillation") == 1
    assert "teacher head" not in report.matches[0].detail


def test_student_logits_not_from_a_linear(kernel_path):
    # softcapped student logits: no lm head to fuse -> liger::distillation_loss on the logits
    def loss(s, t, y):
        return D.kl_batchmean_t2(30.0 * torch.tanh(s / 30.0), t, y)

    model, args = D.make(loss)
    report = compare_training_step(model, args)
    assert report.counts.get("distillation_loss") == 1, (report.counts, report.near_misses)


def test_hf_student_and_teacher(triton_path):
    # the interpreted kernel (the torch path runs every style above on hand-written models)
    pytest.importorskip("transformers")
    from tests.models.hf import build

    student, inputs = build("llama")
    teacher, _ = build("llama", seed=1, hidden_size=64, intermediate_size=96)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    model = D.Distill(student, teacher, D.LOSSES["gkd_jsd_beta05"], hf=True)
    # only the distillation patterns: the model's norms / RoPE / MLP have their own tests
    report = compare_training_step(model, (inputs["input_ids"], inputs["labels"]), options=ONLY)
    assert report.counts.get("fused_linear_distillation") == 1, (report.counts,
                                                                report.near_misses)


# -- near misses -------------------------------------------------------------------------------

def _explain(loss, *extra):
    model, args = D.make(loss)
    return ligerfx.explain(model, *args, *extra)


def _reasons(report):
    return [m.reason for m in report.near_misses]


def test_temperature_tensor_is_a_near_miss_for_the_fused_head():
    T = torch.tensor(2.0)

    def loss(s, t, y):
        return F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean")

    model, args = D.make(loss)
    report = compare_training_step(model, args)  # still exact: distillation_loss on s / T
    assert report.counts.get("fused_linear_distillation", 0) == 0
    assert any("temperature is a tensor" in r for r in _reasons(report)), _reasons(report)


def test_teacher_requiring_grad_is_a_near_miss():
    model, (ids, labels) = D.make(D.kl_batchmean_t2)
    t = model.teacher(ids).detach().requires_grad_()
    report = ligerfx.explain(model, ids, labels, t)
    assert not report.counts.get("fused_linear_distillation") and \
        not report.counts.get("distillation_loss")
    assert any("require grad" in r for r in _reasons(report)), _reasons(report)


def test_mask_of_the_wrong_shape_keeps_its_product_in_the_graph():
    def loss(s, t, y):
        kl = F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction="none").sum(-1)
        mask = y[:1] != -100  # [1, S]: broadcast over the batch, not one flag per token
        return (kl * mask).sum() / mask.sum()

    # not a row mask the op applies: the per-token divergence is the op's (issue 23 §2) and the
    # broadcast product and its reduction stay in the graph
    report = _explain(loss)
    assert sum(report.counts.get(k, 0) for k in ("fused_linear_distillation",
                                                  "distillation_loss")) == 1
    assert "per-token" in report.matches[0].detail


@pytest.mark.parametrize("where", ["softmax", "sum"])
def test_divergence_over_another_dim_is_a_near_miss(where):
    def loss(s, t, y):
        if where == "softmax":
            return F.kl_div(F.log_softmax(s, -1), F.softmax(t, 1), reduction="batchmean")
        return (F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction="none")
                .sum(1).mean())

    report = _explain(loss)
    assert sum(report.counts.get(k, 0) for k in ("fused_linear_distillation",
                                                  "distillation_loss")) == 0
    assert any("dim" in r for r in _reasons(report)), _reasons(report)


def test_per_token_divergence_returned_is_rewritten_per_token():
    # issue 23 §2: the per-token op returns it (tests/patterns/test_distillation_per_token.py)
    def loss(s, t, y):
        return F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction="none").sum(-1)

    report = _explain(loss)
    assert sum(report.counts.get(k, 0) for k in ("fused_linear_distillation",
                                                  "distillation_loss")) == 1
    assert "per-token" in report.matches[0].detail


def test_per_element_divergence_returned_is_a_near_miss():
    def loss(s, t, y):
        return F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction="none")

    report = _explain(loss)
    assert sum(report.counts.get(k, 0) for k in ("fused_linear_distillation",
                                                  "distillation_loss")) == 0
    assert any("divergence" in r for r in _reasons(report)), _reasons(report)


def test_attention_softmax_is_no_near_miss():
    def loss(s, t, y):
        a = F.softmax(s @ s.transpose(-1, -2), -1)
        return (a @ s).sum()

    report = _explain(loss)
    assert not [m for m in report.near_misses if "distill" in m.pattern]


def test_check_pattern_probe():
    from ligerfx.testing import check_pattern

    assert check_pattern("fused_linear_distillation", trials=1) == 2
    assert check_pattern("distillation_loss", trials=1) == 2
