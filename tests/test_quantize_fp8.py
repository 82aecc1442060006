"""quantize="fp8" end to end (compile pass and `ligerfx.quantize_`) on tiny models, on CPU.

Without a GPU the fp8 op runs its torch path (e4m3 casts, fp32 matmul) or, under Triton's
interpreter (the test session default), its Triton kernels on CPU tensors.
"""

import pytest
import torch

import ligerfx
from ligerfx import backend
from ligerfx.compress.quantize import QuantizedLinear
from tests.models import hf_model
from tests.test_quantize import Tiny, _compile, _llama_with_ref, _rel, _reload_matches

# Logits max|diff| / max|ref| against fp32 eager, measured (docs/quantization.md): 3.8e-3 (gemma)
# to 4.7e-2 (qwen2).  e4m3 keeps 3 mantissa bits on weights AND activations (~2% rms per linear
# on Gaussian weights) against int8's ~0.6% on weights only.
BOUND = 8e-2


def test_tiny_counts_near_misses_and_error():
    model = Tiny().eval()
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        ref = model(ids)
        out = _compile(model, quantize="fp8")(ids)
    rep = backend.last_report
    assert rep.counts.get("fp8_linear") == 4  # up, down, odd, back
    reasons = " | ".join(n.reason for n in rep.near_misses if n.pattern == "fp8_linear")
    assert "lm head" in reasons and "too small" in reasons
    assert _rel(out, ref) < BOUND


@pytest.mark.parametrize("name", ["llama", "gemma"])
def test_hf_inference(name):
    model, inputs = hf_model(name)
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=inputs["input_ids"]).logits
        out = _compile(model, quantize="fp8")(input_ids=inputs["input_ids"]).logits
    assert backend.last_report.counts.get("fp8_linear") == 7 * model.config.num_hidden_layers
    assert _rel(out, ref) < BOUND


def test_quantize_eager_state_dict_compile_and_grads(kernel_path):
    model, inputs, lin_bytes, ref = _llama_with_ref()
    ids = inputs["input_ids"]
    assert list(ligerfx.quantize_(model, "fp8")) == ["lm_head"]
    mods = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(mods) == 14 and all(m.qweight.dtype == torch.uint8 for m in mods)  # fp8 bits
    qbytes = sum(b.numel() * b.element_size() for m in mods for b in m.buffers())
    assert qbytes <= 0.27 * lin_bytes
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        assert _rel(eager, ref) < BOUND
        compiled = _compile(model)(input_ids=ids).logits
    assert backend.last_report.counts.get("fp8_linear") == 14
    assert _rel(compiled, eager) < 1e-5
    # model.to(dtype) must not touch the fp8 bits (kept as uint8 buffers)
    before = mods[0].qweight.clone()
    model.to(torch.float32)
    assert torch.equal(mods[0].qweight, before)
    fresh = _reload_matches(model, "fp8", ids, eager)
    # QLoRA-style: trainable norms get gradients through the frozen fp8 linears
    for n, p in fresh.named_parameters():
        p.requires_grad_("norm" in n)
    fresh(**inputs).loss.backward()
    grads = [p.grad for n, p in fresh.named_parameters() if "norm" in n]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_in_place_change_requantizes():
    model = Tiny().eval()
    ids = torch.randint(0, 100, (2, 6))
    compiled = _compile(model, quantize="fp8")
    with torch.no_grad():
        compiled(ids)
        model.up.weight.mul_(-2.0)
        assert _rel(compiled(ids), model(ids)) < BOUND
