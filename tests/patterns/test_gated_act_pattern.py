"""swiglu / geglu patterns on real model code: counts, near misses, numerics, casting."""

import pytest
import torch
import torch.nn.functional as F

import ligerfx
import ligerfx.kernels.gated_act as gated_kernels
from ligerfx.compiler import validate
from tests.compare import compare_training_step, rel_err
from tests.models import HANDWRITTEN, HF_MODELS, hf_model
from tests.models.extra_styles import EXTRA_STYLES, NEAR_MISSES

GATED = ("swiglu", "geglu")
OPTS = {"patterns": list(GATED)}


def _counts(counts):
    return {k: counts.get(k, 0) for k in GATED}


def _explain(model, args):
    return ligerfx.explain(model, **args) if isinstance(args, dict) else ligerfx.explain(model, *args)


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "gemma", "gemma2", "phi3",
                                  "gpt_neox", "mixtral", "stablelm"])
def test_hf_counts(name):
    # gemma/gemma2: gelu_pytorch_tanh; phi3: fused gate_up chunk; mixtral: grouped experts;
    # gpt_neox: a plain GELU MLP (no gate), so nothing
    model, inputs = hf_model(name)
    report = _explain(model, inputs)
    assert _counts(report.counts) == _counts(HF_MODELS[name]["counts"])
    assert not [m for m in report.near_misses if m.pattern in GATED]


@pytest.mark.parametrize("name", ["gemma", "phi3"])
def test_hf_training_step_matches_eager(name, kernel_path, monkeypatch):
    launches = []
    for fn_name in ("launch_forward", "launch_backward"):
        orig = getattr(gated_kernels, fn_name)

        def spy(*a, _orig=orig, _name=fn_name, **k):
            if not validate.running():  # the program's launches, not translation validation's
                launches.append(_name)
            return _orig(*a, **k)

        monkeypatch.setattr(gated_kernels, fn_name, spy)
    model, inputs = hf_model(name)
    report = compare_training_step(model, inputs, options=OPTS)
    assert _counts(report.counts) == _counts(HF_MODELS[name]["counts"])
    if kernel_path == "triton":  # the interpreter really ran the kernels, both directions
        assert launches.count("launch_forward") == 2 and launches.count("launch_backward") == 2
    else:
        assert not launches


def test_llama_ref(kernel_path):
    model, args, counts = HANDWRITTEN["llama_ref"]()
    report = compare_training_step(model, args, options=OPTS)
    assert _counts(report.counts) == _counts(counts)


@pytest.mark.parametrize("name", GATED)
def test_replacement_matches_every_spelling(name):
    # ligerfx.testing.check_pattern: each variant vs the replacement, forward and backward
    from ligerfx.compiler.pattern import REGISTRY
    from ligerfx.testing import check_pattern

    assert check_pattern(name) == 2 * len(REGISTRY.get(name).variants)


def test_gelu_alone_is_not_gated():
    model, args, _ = HANDWRITTEN["nanogpt"]()
    report = _explain(model, args)
    assert _counts(report.counts) == {"swiglu": 0, "geglu": 0}
    # no gated-activation look-alike reported (nanoGPT's broadcast `tok_emb + pos_emb` before ln_1
    # is add_layer_norm's near miss, not this family's)
    assert not [m for m in report.near_misses if m.pattern in ("swiglu", "geglu")], report


@pytest.mark.parametrize("name", ["mlp_fused_split", "mlp_slices", "mlp_sigmoid", "mlp_gelu_new",
                                  "mlp_gelu_erf"])
def test_extra_styles(name, kernel_path):
    # gate/up from `split` and from slices of one projection; silu and gelu written out
    model, args, counts = EXTRA_STYLES[name]()
    report = compare_training_step(model, args, options=OPTS)
    assert _counts(report.counts) == _counts(counts)
    assert not report.near_misses
    expected = {"mlp_slices": "gelu_tanh", "mlp_gelu_new": "gelu_tanh", "mlp_gelu_erf": "gelu"}
    assert {m.detail.split(",")[0] for m in report.matches} == {expected.get(name, "silu")}


def test_broadcast_up_is_a_near_miss():
    name = "mlp_broadcast"
    model, args, _ = EXTRA_STYLES[name]()
    report = _explain(model, args)
    pattern, reason = NEAR_MISSES[name]
    assert _counts(report.counts) == {"swiglu": 0, "geglu": 0}
    reasons = [m.reason for m in report.near_misses if m.pattern == pattern]
    assert reasons and all(reason in r for r in reasons), reasons


# bf16 gate/up with casts written around the activation.  `exact`: the rewrite reproduces eager
# bit for bit on the torch path; None: a near miss.
def _act_in_dtype(g, u):
    return F.silu(g) * u


def _fp32_product(g, u):
    return (F.silu(g.float()) * u.float()).to(g.dtype)


def _fp32_act(g, u):
    return F.silu(g.float()).to(g.dtype) * u


def _rounded_then_fp32(g, u):
    return F.silu(g).float() * u.float()


def _gelu_tanh_fp32_out(g, u):
    return (F.gelu(g, approximate="tanh") * u).float()


CASTS = [(_act_in_dtype, "silu, bfloat16"), (_fp32_product, "silu, float32"),
         (_fp32_act, "silu, bfloat16; fp32 activation"), (_rounded_then_fp32, None),
         (_gelu_tanh_fp32_out, "gelu_tanh, bfloat16")]


@pytest.mark.parametrize("fn,detail", CASTS, ids=[f.__name__ for f, _ in CASTS])
def test_bf16_casts_reproduced_or_refused(fn, detail, torch_path):
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(4, 6, 40, generator=gen).bfloat16().requires_grad_()
    u = torch.randn(4, 6, 40, generator=gen).bfloat16().requires_grad_()
    report = ligerfx.explain(fn, g, u)
    pattern = "geglu" if "gelu" in fn.__name__ else "swiglu"
    if detail is None:
        assert not report.matches
        assert any("rounds act(gate)" in m.reason for m in report.near_misses), report.near_misses
        return
    assert [(m.pattern, m.detail) for m in report.matches] == [(pattern, detail)]
    compiled = torch.compile(fn, backend="liger", options={"inner": "aot_eager", **OPTS})
    out, ref = compiled(g, u), fn(g, u)
    assert out.dtype == ref.dtype and torch.equal(out, ref)
    cot = torch.randn(ref.shape, generator=gen).to(ref.dtype)
    grads = torch.autograd.grad(out, (g, u), cot)
    grads_ref = torch.autograd.grad(ref, (g, u), cot)
    for a, b in zip(grads, grads_ref):
        assert a.dtype == b.dtype and rel_err(a, b) < 1e-2


# gelu written out (exact with erf, tanh as gelu_new) is its own function, not F.gelu: at +inf
# `g * 0.5 * (1 + erf(g / sqrt2))` is +inf (and so is up's gradient) where CPU eager's F.gelu gives
# NaN in fp32; the rewrite computed F.gelu's value there.  Each spelling must give its own eager's
# non-finite values (forward, both gradients) at +-inf and NaN gates, and be within eager's
# rounding elsewhere.
def _gelu_erf_written(g, u):
    return g * 0.5 * (1.0 + torch.erf(g / 1.4142135623730951)) * u


def _gelu_tanh_written(g, u):
    return 0.5 * g * (1.0 + torch.tanh(0.7978845608028654 * (g + 0.044715 * torch.pow(g, 3.0)))) * u


def _gelu_f(g, u):
    return F.gelu(g) * u


def _gelu_tanh_f(g, u):
    return F.gelu(g, approximate="tanh") * u


GELUS = [(_gelu_erf_written, "gelu"), (_gelu_tanh_written, "gelu_tanh"), (_gelu_f, "gelu"),
         (_gelu_tanh_f, "gelu_tanh")]


@pytest.mark.parametrize("fn,act", GELUS, ids=[f.__name__ for f, _ in GELUS])
def test_gelu_spellings_keep_eager_inf_and_nan(fn, act, kernel_path):
    from ligerfx.compiler.validate import within_eager_rounding

    gen = torch.Generator().manual_seed(1)
    # 64 columns: CPU eager's vectorized loop (where F.gelu's NaN at +inf comes from) runs
    g = torch.randn(3, 64, generator=gen) * 3
    g[:, :5] = torch.tensor([float("inf"), -float("inf"), float("nan"), 1e20, -1e20])
    u = torch.randn(3, 64, generator=gen)
    cot = torch.randn(3, 64, generator=gen)
    report = ligerfx.explain(fn, g, u)
    assert [(m.pattern, m.detail.split(",")[0]) for m in report.matches] == [("geglu", act)]
    compiled = torch.compile(fn, backend="liger", options={"inner": "aot_eager", **OPTS})
    results = []
    for f, dt in ((compiled, torch.float32), (fn, torch.float32), (fn, torch.float64)):
        gi, ui = g.to(dt).requires_grad_(), u.to(dt).requires_grad_()
        y = f(gi, ui)
        results.append((y, *torch.autograd.grad(y, (gi, ui), cot.to(dt))))
    for what, got, low, ref in zip(("out", "d gate", "d up"), *results):
        problem = within_eager_rounding(what, got.detach(), low.detach(), ref.detach(), torch.float32)
        assert problem is None, problem


def test_gelu_erf_bit_equal_torch_path(torch_path):
    # "gelu_erf" runs the written ops in eager's order on the torch path: eager's bits, forward
    # and backward, non-finite values included
    gen = torch.Generator().manual_seed(2)
    g, u, dy = (torch.randn(3, 64, generator=gen) * 3 for _ in range(3))
    g[0, :6] = torch.tensor([float("inf"), -float("inf"), float("nan"), 3e38, 1e-40, -0.0])
    ge, ue = g.clone().requires_grad_(), u.clone().requires_grad_()
    ye = _gelu_erf_written(ge, ue)
    ye.backward(dy)
    gk, uk = g.clone().requires_grad_(), u.clone().requires_grad_()
    yk = torch.ops.liger.gated_act(gk, uk, "gelu_erf")
    yk.backward(dy)
    for a, b in ((yk, ye), (gk.grad, ge.grad), (uk.grad, ue.grad)):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
