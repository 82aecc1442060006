"""clamped_glu on GPT-OSS's real experts (transformers, tiny config) and on hand-written forms:
one rewrite per `_apply_gate` call, the training step equal to eager (bit for bit on the torch
path), and the forms the pattern does not take reported as near misses."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import ligerfx
import ligerfx.backend
from ligerfx.compiler.validate import within_eager_rounding

pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def _gpt_oss_mlp(dtype, experts_implementation):
    from tests.models.families import build_tiny

    model, _ = build_tiny("gpt_oss", attn_implementation="eager",
                          experts_implementation=experts_implementation)
    mlp = model.model.layers[0].mlp
    with torch.no_grad():  # gate_up values well beyond ±limit, so the clamps and their masks act
        mlp.experts.gate_up_proj.normal_(0, 1.0)
        mlp.experts.gate_up_proj_bias.normal_(0, 4.0)
        mlp.experts.down_proj.normal_(0, 0.3)
    return mlp.to(dtype)


def _step(mlp, x, dy, compiled=None):
    x = x.detach().requires_grad_()
    out, _ = (mlp if compiled is None else compiled)(x)
    out.backward(dy)
    return [out.detach(), x.grad] + [p.grad for p in mlp.parameters()]


def _counting_apply_gate(mlp, calls):
    apply = mlp.experts._apply_gate

    def counted(*a, **k):
        calls.append(1)
        return apply(*a, **k)
    mlp.experts._apply_gate = counted


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["grouped_mm", "eager"])
def test_gpt_oss_experts(kernel_path, dtype, impl):
    mlp = _gpt_oss_mlp(dtype, impl)
    test, ref64 = copy.deepcopy(mlp), copy.deepcopy(mlp).double()
    ref64.experts.config._experts_implementation = "eager"  # grouped_mm has no float64
    x = torch.randn(2, 8, mlp.experts.hidden_size).to(dtype)
    dy = torch.randn(2, 8, mlp.experts.hidden_size).to(dtype)
    calls = []
    _counting_apply_gate(mlp, calls)
    want = _step(mlp, x, dy)
    ligerfx.backend.last_report = None
    compiled = torch.compile(test, backend="liger", options={"inner": "aot_eager"})
    got = _step(test, x, dy, compiled)
    ref = _step(ref64, x.double(), dy.double())
    report = ligerfx.backend.last_report
    assert not [str(m) for m in report.near_misses], report.near_misses
    if impl == "grouped_mm":  # one graph, one `_apply_gate` call: one rewrite
        assert report.counts.get("clamped_glu") == len(calls) == 1, report.counts
    else:  # one graph per expert iteration (Dynamo breaks at `nonzero`), reused for each expert
        assert report.counts.get("clamped_glu", 0) >= 1 and len(calls) > 1, report.counts
    for i, (g, w, r) in enumerate(zip(got, want, ref)):
        if kernel_path == "torch":
            assert torch.equal(g, w), f"value {i} is not eager's"
        problem = within_eager_rounding(f"value {i}", g, w, r, dtype)
        assert problem is None, problem


class Glu(nn.Module):
    """GPT-OSS's gate on one fused projection, with the steps as arguments."""

    def __init__(self, body):
        super().__init__()
        self.gate_up, self.down, self.body = nn.Linear(16, 64), nn.Linear(32, 16), body

    def forward(self, x):
        gu = self.gate_up(x)
        return self.down(self.body(gu[..., ::2], gu[..., 1::2]))


def _report(body, dtype=torch.float32):
    m = Glu(body).to(dtype)
    x = (torch.randn(2, 5, 16) * 4).to(dtype)
    return ligerfx.explain(m, x)


TAKEN = {
    "gpt_oss": lambda g, u: (u.clamp(-7.0, 7.0) + 1) * (g.clamp(max=7.0) * torch.sigmoid(
        g.clamp(max=7.0) * 1.702)),
    "clip and clamp_min/max": lambda g, u: (torch.clip(u, -7.0, 7.0) + 1) * (
        (gc := torch.clamp_max(g, 7.0)) * torch.sigmoid(1.702 * gc)),
    "other alpha, constant 0.5 first": lambda g, u: (0.5 + u.clamp(-3.0, 3.0)) * (
        (gc := g.clamp(-5.0, 5.0)) * torch.sigmoid(gc * 2.5)),
    "no clamps": lambda g, u: (u + 1) * (g * torch.sigmoid(g * 1.702)),
    "up clamp only": lambda g, u: u.clamp(max=2.0) * (g * torch.sigmoid(g * 1.702)),
}


@pytest.mark.parametrize("name", sorted(TAKEN))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
def test_forms_taken(name, dtype):
    report = _report(TAKEN[name], dtype)
    assert report.counts.get("clamped_glu") == 1, (report.counts, [str(m) for m in report.near_misses])
    assert not report.near_misses


# form -> (rewrites, words a near miss must have).  A clamp whose bound the kernel cannot take
# stays in the graph, computed by eager, and a shorter form takes the rest; the near miss says why
# that clamp was not fused.  A cast inside the activation leaves it all to the detector.
REFUSED = {
    "a tensor bound": (lambda g, u: (u.clamp(-7.0, 7.0) + 1) * (
        (gc := g.clamp(max=torch.full_like(g, 7.0))) * torch.sigmoid(gc * 1.702)), 1, "tensor"),
    "a bound no bf16 value": (lambda g, u: (u.clamp(-7.3, 7.3) + 1) * (
        (gc := g.clamp(max=7.0)) * torch.sigmoid(gc * 1.702)), 1, "not a bfloat16 value"),
    "min above max": (lambda g, u: (u.clamp(3.0, -3.0) + 1) * (
        (gc := g.clamp(max=7.0)) * torch.sigmoid(gc * 1.702)), 1, "exceeds its max"),
    "a cast inside": (lambda g, u: (u.clamp(-7.0, 7.0) + 1) * (
        (gc := g.clamp(max=7.0)) * torch.sigmoid((gc.float() * 1.702)).to(g.dtype)), 0,
        "with a cast between its steps"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_forms_refused_with_a_near_miss(name):
    body, n, words = REFUSED[name]
    report = _report(body, torch.bfloat16)
    assert report.counts.get("clamped_glu", 0) == n, report.counts
    assert any(words in str(m) for m in report.near_misses), [str(m) for m in report.near_misses]
    m = Glu(body).to(torch.bfloat16)  # what is rewritten still computes eager's values
    x = (torch.randn(2, 5, 16) * 4).to(torch.bfloat16)
    ref = copy.deepcopy(m)
    y = torch.compile(m, backend="liger", options={"inner": "aot_eager"})(x)
    assert torch.equal(y, ref(x))


def test_validated_compile_with_nan_and_inf(kernel_path):
    """Eager's NaN / inf handling through the compiled model (validate re-checks the rewrite)."""
    m = Glu(TAKEN["gpt_oss"]).to(torch.bfloat16)
    x = (torch.randn(2, 5, 16) * 4).to(torch.bfloat16)
    x[0, 0, 0], x[0, 1, 3], x[1, 2, 5] = float("nan"), float("inf"), float("-inf")
    ref = copy.deepcopy(m)
    c = torch.compile(m, backend="liger", options={"inner": "aot_eager", "validate": True})
    y, y_ref = c(x), ref(x)
    assert ligerfx.backend.last_report.counts.get("clamped_glu") == 1
    assert torch.equal(y.isnan(), y_ref.isnan())
