"""rms_norm and layer_norm patterns on real model code: counts, near misses, numerics."""

import pytest
import torch

import ligerfx
from tests.compare import call, compare_training_step
from tests.models import HANDWRITTEN, HF_MODELS, LN_VARIANTS, MAIN_HF_MODELS, NEGATIVE, RMS_VARIANTS, hf_model

NORMS = ("rms_norm", "layer_norm", "add_rms_norm", "add_layer_norm")


def _norm_counts(counts):
    return {k: counts.get(k, 0) for k in NORMS}


def _explain(model, args):
    return ligerfx.explain(model, **args) if isinstance(args, dict) else ligerfx.explain(model, *args)


@pytest.mark.parametrize("name", MAIN_HF_MODELS + ("mixtral", "stablelm"))
def test_hf_counts(name):
    model, inputs = hf_model(name)
    report = _explain(model, inputs)
    assert _norm_counts(report.counts) == _norm_counts(HF_MODELS[name]["counts"])
    assert not [m for m in report.near_misses if m.pattern in NORMS]
    # locations name the module by its path in the user's model
    mods = [m.location.module for m in report.matches if m.pattern in NORMS]
    assert all(p and "L[" not in p and not p[0].isdigit() and "norm" in p for p in mods), mods


@pytest.mark.parametrize("name", MAIN_HF_MODELS)
def test_hf_training_step_matches_eager(name, kernel_path):
    model, inputs = hf_model(name)
    report = compare_training_step(model, inputs, options={"patterns": list(NORMS)})
    assert _norm_counts(report.counts) == _norm_counts(HF_MODELS[name]["counts"])


@pytest.mark.parametrize("name", ["nanogpt", "nanogpt_nobias", "llama_ref"] + list(RMS_VARIANTS) + list(LN_VARIANTS))
def test_handwritten_counts_and_numerics(name, kernel_path):
    model, args, counts = HANDWRITTEN[name]()
    report = compare_training_step(model, args, options={"patterns": list(NORMS)})
    assert _norm_counts(report.counts) == _norm_counts(counts)


# Each negative model holds one ordinary RMSNorm (rewritten) and one look-alike that is not.
NEAR_MISS_REASONS = {
    "neg_rms_variance_reused": "also used",
    "neg_rms_tensor_eps": "`eps` is a tensor",
    "neg_rms_non_last_dim": "not the last dim",
    "neg_rms_2d_weight": "not a 1-D vector",
}


@pytest.mark.parametrize("name", list(NEGATIVE))
def test_negative_cases_are_near_misses(name):
    model, args, counts = HANDWRITTEN[name]()
    report = _explain(model, args)
    expected = counts["rms_norm"]
    if name == "neg_rms_2d_weight":
        # The normalisation itself is still exact to fuse; only the [seq, dim] scale stays out.
        expected += 1
    assert report.counts.get("rms_norm", 0) == expected
    reasons = [m.reason for m in report.near_misses if m.pattern == "rms_norm"]
    assert any(NEAR_MISS_REASONS[name] in r for r in reasons), reasons
    # and what is left is still numerically the same model
    compare_training_step(model, args, options={"patterns": ["rms_norm"]})


def test_report_points_at_user_source():
    model, args, _ = HANDWRITTEN["rms_pow"]()
    report = _explain(model, args)
    m = report.matches[0]
    assert m.location.file.endswith("handwritten.py") and m.location.line > 0
    assert "norms" in m.location.module
    d = report.to_dict()
    assert d["counts"] == {"rms_norm": 3}
    import json

    json.dumps(d)
    assert "rms_norm" in str(report)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_bf16_llama_and_gemma_casting(dtype, kernel_path):
    # bf16 activations: Llama casts back before the weight, Gemma applies (1 + w) in fp32.
    for name, mode in (("llama", "llama casting"), ("gemma", "fp32 casting")):
        model, inputs = hf_model(name)
        model = model.to(dtype)
        report = _explain(model, inputs)
        details = {m.detail for m in report.matches if m.pattern == "rms_norm"}
        assert details == {mode}, details
        ref = call(model, inputs).logits.float()
        compiled = torch.compile(model, backend="liger", options={"inner": "aot_eager", "patterns": ["rms_norm"]})
        out = call(compiled, inputs).logits.float()
        assert (out - ref).abs().max() / ref.abs().max() < 2e-2


def test_interpreter_path_launches_the_triton_kernels(triton_path, monkeypatch):
    # Guards the kernel_path tests above: under TRITON_INTERPRET=1 the compiled model must really
    # run the Triton launchers, forward and backward, for both norm families.
    import ligerfx.kernels.layer_norm as ln
    import ligerfx.kernels.rms_norm as rms

    calls = []
    for mod, names in ((rms, ("rms_norm_forward_triton", "rms_norm_backward_triton")),
                       (ln, ("layer_norm_forward_triton", "layer_norm_backward_triton"))):
        for fn_name in names:
            orig = getattr(mod, fn_name)

            def spy(*a, _orig=orig, _name=fn_name, **k):
                calls.append(_name)
                return _orig(*a, **k)

            monkeypatch.setattr(mod, fn_name, spy)
    for name in ("rms_pow", "ln_nn_module"):
        model, args, _ = HANDWRITTEN[name]()
        compare_training_step(model, args, options={"patterns": list(NORMS)})
    assert {"rms_norm_forward_triton", "rms_norm_backward_triton", "layer_norm_forward_triton",
            "layer_norm_backward_triton"} <= set(calls)
