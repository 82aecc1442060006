"""DPO, ORPO, SimPO and GRPO losses on per-token log-probs from a tiny Hugging Face model.

The losses are written as their papers and TRL's trainers write them (TRL's `get_batch_logps` /
`selective_log_softmax`, `DPOTrainer.dpo_loss` sigmoid loss, `ORPOTrainer.odds_ratio_loss`,
`CPOTrainer` SimPO loss, `GRPOTrainer._compute_loss` with the k3 KL estimator and an entropy
bonus), on chosen/rejected halves of one batch with reference log-probs as inputs.  The whole
step (model forward + loss) is compiled: the lm head + per-token log-prob must be rewritten into
liger::fused_linear_logprob, and the loss and every parameter's gradient must equal eager's
(fp32 relative error < 1e-4) on the torch path and the interpreted kernels (one compile, both
paths: the path is picked per call).
"""

import copy

import pytest
import torch
import torch.nn.functional as F

import ligerfx
from tests.compare import rel_err
from tests.models.trl_forms import entropy_from_logits

pytest.importorskip("transformers")

NAME = "fused_linear_logprob"
BATCH, SEQ = 4, 10  # rows 0-1 chosen, rows 2-3 rejected
BETA = 0.1


# -- per-token log-probs, as TRL writes them -----------------------------------------------------

def selective_log_softmax(logits, index):
    # TRL trainer/utils.py, fp32 branch: one logsumexp per row in a loop to bound peak memory
    selected_logits = torch.gather(logits, dim=-1, index=index.unsqueeze(-1)).squeeze(-1)
    logsumexp_values = torch.stack([torch.logsumexp(lg, dim=-1) for lg in logits])
    return selected_logits - logsumexp_values


def get_batch_logps(logits, labels, average_log_prob=False, gather=False):
    # TRL's DPO/ORPO helper: shift, mask the prompt/padding (label -100), sum or average
    labels = labels[:, 1:].clone()
    logits = logits[:, :-1, :]
    loss_mask = labels != -100
    labels[labels == -100] = 0  # dummy token; masked out below (a write before the read)
    if gather:
        per_token_logps = torch.gather(logits.log_softmax(-1), dim=2,
                                       index=labels.unsqueeze(2)).squeeze(2)
    else:
        per_token_logps = selective_log_softmax(logits, labels)
    if average_log_prob:
        return (per_token_logps * loss_mask).sum(-1) / loss_mask.sum(-1), per_token_logps, loss_mask
    return (per_token_logps * loss_mask).sum(-1), per_token_logps, loss_mask


# -- the losses ----------------------------------------------------------------------------------

def dpo_step(model, input_ids, labels, ref_chosen_logps, ref_rejected_logps):
    logits = model(input_ids=input_ids).logits
    logps, _, _ = get_batch_logps(logits, labels)
    chosen, rejected = logps[:BATCH // 2], logps[BATCH // 2:]
    logratios = chosen - rejected
    ref_logratios = ref_chosen_logps - ref_rejected_logps
    z = logratios - ref_logratios
    label_smoothing = 0.05
    losses = -F.logsigmoid(BETA * z) * (1 - label_smoothing) - F.logsigmoid(-BETA * z) * label_smoothing
    return losses.mean()


def orpo_step(model, input_ids, labels, ref_chosen_logps, ref_rejected_logps):
    logits = model(input_ids=input_ids).logits
    avg, per_token, mask = get_batch_logps(logits, labels, average_log_prob=True, gather=True)
    chosen, rejected = avg[:BATCH // 2], avg[BATCH // 2:]
    log_odds = (chosen - rejected) - (
        torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected)))
    ratio = F.logsigmoid(log_odds)
    n = BATCH // 2  # SFT term: NLL of the chosen responses
    nll = -(per_token[:n] * mask[:n]).sum() / mask[:n].sum()
    return nll - (BETA * ratio).mean()


def simpo_step(model, input_ids, labels, ref_chosen_logps, ref_rejected_logps):
    logits = model(input_ids=input_ids).logits
    avg, _, _ = get_batch_logps(logits, labels, average_log_prob=True)
    pi_logratios = avg[:BATCH // 2] - avg[BATCH // 2:]
    gamma_beta_ratio = 0.5
    z = pi_logratios - gamma_beta_ratio
    return (-F.logsigmoid(2.0 * z)).mean()


def grpo_step(model, input_ids, completion_mask, old_logps, ref_logps, advantages):
    temperature, eps_low, eps_high, beta, ent_coef = 0.9, 0.2, 0.28, 0.04, 0.01
    logits = model(input_ids=input_ids).logits
    logits = logits[:, :-1, :] / temperature
    completion_ids = input_ids[:, 1:]
    logps = F.log_softmax(logits, dim=-1)
    per_token_logps = logps.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    entropies = -(torch.exp(logps) * logps).sum(-1)
    coef_1 = torch.exp(per_token_logps - old_logps)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token_loss = -torch.min(coef_1 * advantages.unsqueeze(1), coef_2 * advantages.unsqueeze(1))
    per_token_kl = torch.exp(ref_logps - per_token_logps) - (ref_logps - per_token_logps) - 1
    per_token_loss = per_token_loss + beta * per_token_kl - ent_coef * entropies
    return ((per_token_loss * completion_mask).sum(-1)
            / completion_mask.sum(-1).clamp(min=1.0)).mean()


def grpo_trl_step(model, input_ids, completion_mask, old_logps, ref_logps, advantages):
    # GRPOTrainer._get_per_token_logps_and_entropies as TRL spells it: the ids sliced with a
    # trailing None, selective_log_softmax's row loop, entropy_from_logits's chunks
    logits = model(input_ids=input_ids).logits[:, :-1, :] / 0.9
    rows = [F.log_softmax(lg, -1).gather(-1, ix[:, None]).squeeze(-1)
            for lg, ix in zip(logits, input_ids[:, 1:])]
    per_token_logps = torch.stack(rows)
    entropies = entropy_from_logits(logits)
    coef = torch.exp(per_token_logps - old_logps)
    per_token_kl = torch.exp(ref_logps - per_token_logps) - (ref_logps - per_token_logps) - 1
    per_token_loss = -coef * advantages.unsqueeze(1) + 0.04 * per_token_kl - 0.01 * entropies
    return ((per_token_loss * completion_mask).sum(-1)
            / completion_mask.sum(-1).clamp(min=1.0)).mean()


# -- the check -----------------------------------------------------------------------------------

def _model():
    from tests.models.hf import build

    model, _ = build("llama", num_hidden_layers=1)
    return model


def _inputs(kind, model):
    gen = torch.Generator().manual_seed(11)
    V = model.config.vocab_size
    input_ids = torch.randint(3, V, (BATCH, SEQ), generator=gen)
    if kind.startswith("grpo"):
        mask = torch.ones(BATCH, SEQ - 1)
        mask[1, -3:] = 0  # padding after an early end of sequence
        with torch.no_grad():
            logits = model(input_ids=input_ids).logits[:, :-1] / 0.9
            lp = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None])[..., 0]
        old = lp + 0.05 * torch.randn(lp.shape, generator=gen)
        ref = lp + 0.1 * torch.randn(lp.shape, generator=gen)
        adv = torch.randn(BATCH, generator=gen)
        return (input_ids, mask, old, ref, adv)
    labels = input_ids.clone()
    labels[:, :3] = -100  # the prompt
    labels[3, -2:] = -100  # padding
    ref = -20 - 5 * torch.rand(BATCH, generator=gen)
    return (input_ids, labels, ref[:BATCH // 2], ref[BATCH // 2:])


STEPS = {"dpo": dpo_step, "orpo": orpo_step, "simpo": simpo_step, "grpo": grpo_step,
         "grpo_trl": grpo_trl_step}


def _grads_equal(ref_model, test_model):
    n = 0
    for (name, p_ref), (_, p) in zip(ref_model.named_parameters(), test_model.named_parameters()):
        err = rel_err(p.grad, p_ref.grad)
        assert err < 1e-4, f"{name}: gradient relative error {err:.2e}"
        n += 1
    assert n == len(list(ref_model.parameters()))


@pytest.mark.parametrize("kind", list(STEPS))
def test_post_training_loss_exact(kind, monkeypatch):
    """Both kernel paths through ONE compiled step: the path is chosen per call at run time
    (kernels/runtime.py), so the kernel_path fixture's two runs would only compile twice."""
    step = STEPS[kind]
    ref_model = _model()
    test_model = copy.deepcopy(ref_model)
    args = _inputs(kind, ref_model)
    loss_ref = step(ref_model, *args)
    loss_ref.backward()
    ligerfx.backend.last_report = None
    compiled = torch.compile(lambda *a: step(test_model, *a), backend="liger",
                             options={"inner": "aot_eager", "patterns": [NAME]})
    for path in ("torch", "triton"):
        monkeypatch.setenv("TRITON_INTERPRET", "1" if path == "triton" else "0")
        test_model.zero_grad(set_to_none=True)
        loss = compiled(*args)
        if path == "torch":
            report = ligerfx.backend.last_report
            assert report.counts.get(NAME) == 1, str(report)
            if kind.startswith("grpo"):
                m = next(m for m in report.matches if m.pattern == NAME)
                assert "entropy" in m.detail, str(report)
        loss.backward()
        assert rel_err(loss.detach(), loss_ref.detach()) < 1e-4, (path, loss.item(),
                                                                  loss_ref.item())
        _grads_equal(ref_model, test_model)


def test_docs_dpo_example_runs(torch_path):
    """docs/post_training.md's worked DPO step, extracted and run; checked against eager."""
    import os
    import re

    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "post_training.md")).read()
    block = re.findall(r"```python\n(.*?)```", doc, re.S)[0]
    ns: dict = {}
    exec(compile(block, "docs/post_training.md", "exec"), ns)  # noqa: S102 - our own docs
    assert ligerfx.backend.last_report.counts == {NAME: 1}
    hidden, lm_head = ns["hidden"], ns["lm_head"]
    got_loss, got_gh, got_gw = ns["loss"], hidden.grad.clone(), lm_head.weight.grad.clone()
    hidden.grad = lm_head.weight.grad = None
    exp = ns["dpo_loss"](hidden, lm_head, ns["ids"], ns["mask"], ns["ref"][:2], ns["ref"][2:])
    exp.backward()
    assert rel_err(got_loss.detach(), exp.detach()) < 1e-4
    assert rel_err(got_gh, hidden.grad) < 1e-4 and rel_err(got_gw, lm_head.weight.grad) < 1e-4
