"""Models compiled with backend="liger", inner="inductor", on CUDA: the Hugging Face families and
hand-written styles in fp32 (loss and every gradient against eager) and bf16 (no further from the
fp32 truth than eager bf16), CUDA graphs (mode="reduce-overhead") on one model, and dynamic
sequence lengths without recompiles.  The comparisons are tests/compare.py's and
tests/patterns/test_bf16_models.py's, run with inductor."""

import copy

import pytest
import torch

import ligerfx.backend
from tests.compare import _loss, call, compare_training_step, rel_err
from tests.models import HANDWRITTEN, hf_model
from tests.models.hf import MAIN_HF_MODELS, make_inputs
from tests.patterns.test_bf16_models import check_bf16_step

INDUCTOR = {"inner": "inductor", "log_report": False}


@pytest.fixture(autouse=True)
def _build_on_cpu():
    """Models and inputs are built on the CPU (their seeded generators are CPU ones), then moved."""
    torch.set_default_device(None)


def _cuda(model, args):
    args = {k: v.cuda() for k, v in args.items()} if isinstance(args, dict) else \
        tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
    return model.cuda(), args


def _hf(name):
    return _cuda(*hf_model(name))
# Inductor fuses and reorders reductions on the GPU (eager does not): 1e-4 would test its sums.
RTOL = 1e-3


@pytest.mark.parametrize("name", MAIN_HF_MODELS)
def test_hf_fp32_training_step(name):
    model, inputs = _hf(name)
    report = compare_training_step(model, inputs, options=INDUCTOR, rtol=RTOL)
    assert report.counts.get("fused_linear_cross_entropy") == 1, report.counts


@pytest.mark.parametrize("name", ["nanogpt", "llama_ref"])
def test_handwritten_fp32_training_step(name):
    model, args, counts = HANDWRITTEN[name]()
    model, args = _cuda(model, args)
    report = compare_training_step(model, args, options=INDUCTOR, rtol=RTOL)
    for pattern, n in counts.items():
        assert report.counts.get(pattern, 0) >= 1, (pattern, report.counts)


@pytest.mark.parametrize("name", ["llama", "gemma2", "phi3", "gpt_neox"])
def test_hf_bf16_training_step(name):
    check_bf16_step(name, inner="inductor", device="cuda")


def test_reduce_overhead_cuda_graphs():
    model, inputs = _hf("llama")
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend="liger", mode="reduce-overhead", options=INDUCTOR)
    for step in range(3):  # warm-up, record, replay
        loss = _loss(call(compiled, inputs))
        loss_ref = _loss(call(ref, inputs))
        assert rel_err(loss.detach(), loss_ref.detach()) < RTOL, step
        loss.backward()
        loss_ref.backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if q.grad is not None:
            assert rel_err(p.grad, q.grad) < 3 * RTOL, n  # three accumulated steps


def test_dynamic_sequence_lengths_do_not_recompile():
    model, inputs = _hf("llama")
    compiled = torch.compile(model, backend="liger", dynamic=True, options=INDUCTOR)
    _loss(call(compiled, inputs)).backward()
    assert ligerfx.backend.last_report is not None
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seq in (24, 37, 64):
            args = {k: v.cuda() for k, v in make_inputs(batch=2, seq=seq, seed=seq).items()}
            loss = _loss(call(compiled, args))
            ref = _loss(call(copy.deepcopy(model), args))
            assert rel_err(loss.detach(), ref.detach()) < RTOL, seq
            loss.backward()
