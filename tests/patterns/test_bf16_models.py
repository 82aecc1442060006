"""bf16 models with every pattern on: the compiled model is no further from the fp32 truth than
eager bf16 is (loss, logits), and its gradients stay within bf16 noise of eager bf16's."""

import copy

import pytest
import torch

import ligerfx
from tests.compare import rel_err
from tests.models import hf_model


@pytest.mark.parametrize("name", ["llama", "gemma2", "phi3", "gpt_neox"])
def test_bf16_training_step_is_as_close_to_fp32_as_eager(name, kernel_path):
    check_bf16_step(name, inner="aot_eager")


def check_bf16_step(name, inner, device="cpu"):
    """The test body, also run on CUDA with inductor (tests/cuda/test_models_cuda.py)."""
    model, inputs = hf_model(name)
    model, inputs = model.to(device), {k: v.to(device) for k, v in inputs.items()}
    truth = model(**inputs)  # fp32
    eager = copy.deepcopy(model).to(torch.bfloat16)
    test = copy.deepcopy(model).to(torch.bfloat16)
    # Gemma 2 softcaps its logits in bf16 before the loss upcasts them: the fused loss computes
    # that in fp32, which only upcast_statistics accepts (and notes); without it the loss alone
    # is rewritten.
    upcast = name == "gemma2"
    c = torch.compile(test, backend="liger", options={"inner": inner, "log_report": False,
                                                      "upcast_statistics": upcast})
    out, ref = c(**inputs), eager(**inputs)
    report = ligerfx.backend.last_report
    counts = report.counts
    assert counts.get("fused_linear_cross_entropy") == 1 and counts.get("rope") == 2, counts
    assert any("upcast_statistics" in n for n in report.notes) == upcast, report.notes
    for field in ("logits", "loss"):
        a, b, t = getattr(out, field), getattr(ref, field), getattr(truth, field).detach()
        assert rel_err(a, t) <= 1.25 * rel_err(b, t) + 1e-4, (field, rel_err(a, t), rel_err(b, t))
    out.loss.backward()
    ref.loss.backward()
    for (n, p), (_, q) in zip(test.named_parameters(), eager.named_parameters()):
        if q.grad is not None:
            assert rel_err(p.grad, q.grad) < 3e-2, n
