"""cross_entropy and fused_linear_cross_entropy patterns on real model code."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ligerfx
from ligerfx.tools.example_model import make_example
from tests.compare import compare_training_step, rel_err
from tests.models import HANDWRITTEN, hf_model

LOSSES = ("cross_entropy", "fused_linear_cross_entropy")


def _loss_counts(counts):
    return {k: counts.get(k, 0) for k in LOSSES}


FUSED = {"cross_entropy": 0, "fused_linear_cross_entropy": 1}


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma", "gemma2", "gpt_neox", "phi3"])
def test_hf_models_fuse_lm_head_and_loss(name, kernel_path):
    model, inputs = hf_model(name)
    report = compare_training_step(model, inputs, options={"patterns": list(LOSSES)})
    assert _loss_counts(report.counts) == FUSED
    m = next(m for m in report.matches if m.pattern == "fused_linear_cross_entropy")
    assert "logits also returned" in m.detail  # HF returns the logits next to the loss


def test_hf_logits_output_is_exact_and_gets_gradients():
    model, inputs = hf_model("gemma2")  # softcapped: the returned logits are the capped ones
    ref = copy.deepcopy(model)
    c = torch.compile(model, backend="liger", options={"inner": "aot_eager", "patterns": list(LOSSES)})
    out, out_ref = c(**inputs), ref(**inputs)
    assert rel_err(out.logits, out_ref.logits) < 1e-5
    # a gradient arriving on the logits (e.g. a distillation term) is added correctly
    g = torch.randn_like(out_ref.logits)
    (out.loss + (out.logits * g).sum()).backward()
    (out_ref.loss + (out_ref.logits * g).sum()).backward()
    for (n, p_ref), (_, p) in zip(ref.named_parameters(), model.named_parameters()):
        if p_ref.grad is not None:
            assert rel_err(p.grad, p_ref.grad) < 1e-4, n


def test_hf_num_items_in_batch_sum_reduction(kernel_path):
    model, inputs = hf_model("llama")
    inputs = dict(inputs, num_items_in_batch=torch.tensor(17))
    report = compare_training_step(model, inputs, options={"patterns": list(LOSSES)})
    assert _loss_counts(report.counts) == FUSED


@pytest.mark.parametrize("name", ["nanogpt", "llama_ref"])
def test_handwritten_models(name, kernel_path):
    model, args, counts = HANDWRITTEN[name]()
    report = compare_training_step(model, args, options={"patterns": list(LOSSES)})
    assert _loss_counts(report.counts) == FUSED


def test_example_model_label_shift_slices_hidden(kernel_path):
    model, ids, labels = make_example()
    report = compare_training_step(model, (ids, labels), options={"patterns": list(LOSSES)})
    assert _loss_counts(report.counts) == FUSED
    m = next(m for m in report.matches if m.pattern == "fused_linear_cross_entropy")
    assert "logits" not in m.detail  # the logits do not escape: nothing of size N x V is returned


def test_skip_logits_is_stated():
    model, inputs = hf_model("llama")
    report = ligerfx.explain(model, **inputs, options={"skip_logits": True})
    assert report.counts.get("fused_linear_cross_entropy") == 1
    assert any("skip_logits" in n for n in report.notes)
    c = torch.compile(model, backend="liger", options={"inner": "aot_eager", "skip_logits": True})
    out = c(**inputs)
    assert out.logits.numel() == 0
    assert torch.isfinite(out.loss)


class TemperatureLM(nn.Module):
    """lm head with a bias, a temperature, label smoothing, ignore_index=-1 and a sum."""

    def __init__(self, h=32, v=97):
        super().__init__()
        self.emb = nn.Embedding(v, h)
        self.w = nn.Parameter(torch.randn(v, h) * 0.1)
        self.b = nn.Parameter(torch.randn(v) * 0.1)

    def forward(self, ids, targets):
        x = self.emb(ids)
        logits = F.linear(x, self.w, self.b)
        logits = logits / 0.7
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), label_smoothing=0.1,
                               ignore_index=-1, reduction="sum")


class MatmulLM(nn.Module):
    def __init__(self, h=32, v=97):
        super().__init__()
        self.emb = nn.Embedding(v, h)
        self.w = nn.Parameter(torch.randn(v, h) * 0.1)

    def forward(self, ids, targets):
        logits = self.emb(ids) @ self.w.t()
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1))


class PlainCE(nn.Module):
    """Logits not produced by a linear (a softmax-free mixture): only the loss is fused."""

    def __init__(self, v=50):
        super().__init__()
        self.a = nn.Parameter(torch.randn(8, v))

    def forward(self, x, targets):
        logits = torch.tanh(x @ self.a) * 3.0 + x.sum(-1, keepdim=True)
        cap = 20.0
        logits = cap * torch.tanh(logits / cap)
        return F.cross_entropy(logits, targets, weight=torch.linspace(0.5, 1.5, 50))


def _ids(v, shape=(2, 9)):
    ids = torch.randint(0, v, shape)
    t = torch.randint(0, v, shape)
    t[0, :3] = -1
    return ids, t


@pytest.mark.parametrize("cls", [TemperatureLM, MatmulLM])
def test_other_lm_head_styles(cls, kernel_path):
    model = cls()
    ids, t = _ids(97)
    if cls is MatmulLM:
        t[t < 0] = -100
    report = compare_training_step(model, (ids, t), options={"patterns": list(LOSSES)})
    assert _loss_counts(report.counts) == FUSED


def test_plain_cross_entropy_with_softcap_and_weight(kernel_path):
    model = PlainCE()
    x = torch.randn(12, 8)
    t = torch.randint(0, 50, (12,))
    report = compare_training_step(model, (x, t), options={"patterns": list(LOSSES)})
    assert _loss_counts(report.counts) == {"cross_entropy": 1, "fused_linear_cross_entropy": 0}
    assert "softcap 20" in report.matches[0].detail


class ScaledLogitsLM(nn.Module):
    """Returns the scaled logits next to the loss; the scale is written constant-first."""

    def __init__(self, h=32, v=97):
        super().__init__()
        self.emb = nn.Embedding(v, h)
        self.head = nn.Linear(h, v, bias=False)

    def forward(self, ids, targets):
        logits = 0.5 * self.head(self.emb(ids))
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), targets.view(-1))
        return loss, logits


def test_returned_logits_replay_the_steps_after_the_linear(kernel_path):
    model = ScaledLogitsLM()
    ids, t = _ids(97)
    t[t < 0] = -100
    ref = copy.deepcopy(model)
    c = torch.compile(model, backend="liger", options={"inner": "aot_eager", "patterns": list(LOSSES)})
    (loss, logits), (loss_r, logits_r) = c(ids, t), ref(ids, t)
    assert ligerfx.backend.last_report.counts == {"fused_linear_cross_entropy": 1}
    assert rel_err(logits, logits_r) < 1e-6 and rel_err(loss, loss_r) < 1e-5
    (loss + logits.square().mean()).backward()
    (loss_r + logits_r.square().mean()).backward()
    assert rel_err(model.head.weight.grad, ref.head.weight.grad) < 1e-4
