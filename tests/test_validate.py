"""Translation validation (`options={"validate": True}`, ligerfx/compiler/validate.py).

A correct rewrite is checked equal and kept; a deliberately wrong pattern registered through the
public API (a wrong forward, or a wrong backward) is caught on the first call: a warning, a report
entry and a near miss, and the graph is compiled without it, so every call gives eager's result.
Also: the "raise" mode and LIGERFX_VALIDATE, no-grad inference with dynamic shapes and a
non-tensor output, a validator failure that keeps the rewrite, the option's validation.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ligerfx
from ligerfx import register_pattern
from ligerfx.compiler.validate import ValidationWarning, within_eager_rounding
from ligerfx.options import Options, OptionsError




def _twice(x):
    return x * 2


@pytest.fixture
def wrong_twice(names):
    """`x * 2` "rewritten" to `x * 2.001`: same shape and dtype, wrong values."""
    names.append("test_validate_wrong_twice")
    register_pattern("test_validate_wrong_twice", _twice, lambda x: x * 2.001,
                     (torch.randn(4),))
    return "test_validate_wrong_twice"


@torch.library.custom_op("ligerfx_test::validate_gelu_wrong_grad", mutates_args=())
def _gelu_op(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


@_gelu_op.register_fake
def _(x):
    return torch.empty_like(x)


def _gelu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _gelu_wrong_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return grad * torch.sigmoid(1.702 * x)  # forgets the product rule


_gelu_op.register_autograd(_gelu_wrong_backward, setup_context=_gelu_setup)


def _quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


@pytest.fixture
def wrong_grad(names):
    names.append("test_validate_wrong_grad")
    # a custom op (an autograd.Function would be traced through into its forward's ops)
    register_pattern("test_validate_wrong_grad", _quick_gelu,
                     lambda x: torch.ops.ligerfx_test.validate_gelu_wrong_grad(x),
                     (torch.randn(2, 8),))
    return "test_validate_wrong_grad"


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(torch.sin(x) * 2).sum()


class Gelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        h = self.up(x)
        return self.down(h * torch.sigmoid(1.702 * h))


class Norm(nn.Module):
    """A Llama RMSNorm (hand-written) after a linear: the built-in rms_norm rewrite."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.weight = nn.Parameter(torch.randn(16))

    def forward(self, x):
        h = self.lin(x)
        var = h.float().pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(var + 1e-6)
        return self.weight * h


def _compile(model, **options):
    return torch.compile(model, backend="liger",
                         options={"inner": "aot_eager", "log_report": False, **options})


def _grads(model, out):
    out.float().sum().backward() if out.dim() else out.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return grads


def _validation_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, ValidationWarning)]


def _first_call(model, x, **opts):
    """Eager's output and gradients, then the compiled model's first call with `opts` and the
    warnings it raised: (ref, gref, compiled, out, record)."""
    ref = model(x)
    gref = _grads(model, ref)
    compiled = _compile(model, **opts)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = compiled(x)
    return ref, gref, compiled, out, record


def test_correct_rewrite_is_checked_equal_and_kept(kernel_path):
    model = Norm()
    x = torch.randn(4, 16)
    ref, gref, compiled, out, record = _first_call(model, x, validate=True)
    g = _grads(model, out)
    report = ligerfx.backend.last_report
    assert report.counts == {"rms_norm": 1}
    assert [v.status for v in report.validation] == ["equal"]
    assert "1 of 1 checked rewrite(s) equal" in str(report)
    assert not _validation_warnings(record)
    torch.testing.assert_close(out, ref)
    for a, b in zip(g, gref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_wrong_forward_is_dropped_on_first_call(wrong_twice, inner):
    model = Twice()
    x = torch.randn(3, 8)
    ref, gref, compiled, out, record = _first_call(model, x, validate=True, inner=inner)
    (msg,) = _validation_warnings(record)
    assert wrong_twice in msg and "differs from the original code" in msg and "dropped" in msg
    assert "relative error" in msg
    report = ligerfx.backend.last_report
    assert wrong_twice not in report.counts
    (v,) = report.validation
    assert v.status == "dropped" and v.pattern == wrong_twice and "output 0" in v.detail
    assert "sin(x) * 2" in v.location.code
    (miss,) = [n for n in report.near_misses if n.pattern == wrong_twice]
    assert miss.reason.startswith("translation validation:")
    assert "DROPPED by translation validation" in str(report)
    # the graph was compiled without the rewrite: this call and the later ones are eager's
    assert torch.equal(out, ref)
    for a, b in zip(_grads(model, out), gref):
        assert torch.equal(a, b)
    x2 = torch.randn(3, 8)
    assert torch.equal(compiled(x2), model(x2))


def test_wrong_backward_is_dropped(wrong_grad):
    model = Gelu()
    x = torch.randn(3, 8)
    ref, gref, compiled, out, record = _first_call(model, x, validate=True)
    (msg,) = _validation_warnings(record)
    assert "gradient of" in msg and "output 0" not in msg  # the forward is right
    report = ligerfx.backend.last_report
    assert [v.status for v in report.validation] == ["dropped"]
    assert wrong_grad not in report.counts
    torch.testing.assert_close(out, ref)
    for a, b in zip(_grads(model, out), gref):
        torch.testing.assert_close(a, b)


@torch.library.custom_op("ligerfx_test::validate_scale_both", mutates_args=())
def _scale_both(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return a * 3, b * 3


@_scale_both.register_fake
def _(a, b):
    return torch.empty_like(a), torch.empty_like(b)


_scale_both.register_autograd(lambda ctx, ga, gb: (ga * 3, gb * 3),
                              setup_context=lambda ctx, inputs, output: None)


def _scale_both_call(a, b):
    sa, sb = torch.ops.ligerfx_test.validate_scale_both(a, b)
    return sa, sb


def _thrice_both(a, b):
    return a * 3, b * 3


class ThriceBoth(nn.Module):
    """Two tensors scaled by one op; the second went through an integer cast (no gradient)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        a = self.lin(x)
        b = (self.lin(x) * 4).to(torch.int32).to(x.dtype)
        return a * 3, b * 3


def test_an_output_that_gains_a_gradient_is_dropped(names):
    # found by the rope long run: q and k rotated by one op when only k needs a gradient gave q's
    # rotation one too; every value was equal, so only autograd's flag tells the programs apart
    names.append("test_validate_scale_both")
    register_pattern("test_validate_scale_both", _thrice_both, _scale_both_call,
                     (torch.randn(4), torch.randn(4)))
    model = ThriceBoth()
    x = torch.randn(3, 8)
    ref = model(x)
    assert [o.requires_grad for o in ref] == [True, False]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = _compile(model, validate=True)(x)
    (msg,) = _validation_warnings(record)
    assert "output 1" in msg and "requires grad where the original's does not" in msg, msg
    assert "test_validate_scale_both" not in ligerfx.backend.last_report.counts
    assert [o.requires_grad for o in out] == [True, False]
    for a, b in zip(out, ref):
        assert torch.equal(a, b)


def test_no_grad_call_does_not_compare_autograd_flags():
    # long run (loss family): a forward-only call (torch.no_grad) of a model whose input requires
    # grad; the new op's recorded mode said "grad enabled" and the flag check dropped a correct
    # cross_entropy rewrite.  Without autograd no output requires grad, so flags are not compared
    class CE(nn.Module):
        def forward(self, logits, labels):
            return F.cross_entropy((logits * 1.5).view(-1, 24), labels.reshape(-1), reduction="sum")

    x = torch.randn(2, 5, 24, requires_grad=True)
    y = torch.randint(0, 24, (2, 5))
    with torch.no_grad():
        out = _compile(CE(), validate="raise")(x, y)
        ref = CE()(x, y)
    assert ligerfx.backend.last_report.counts == {"cross_entropy": 1}
    assert [v.status for v in ligerfx.backend.last_report.validation] == ["equal"]
    torch.testing.assert_close(out, ref)


def test_inductor(wrong_twice):
    model = Twice()
    x = torch.randn(3, 8)
    compiled = _compile(model, validate=True, inner="inductor")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = compiled(x)
    assert len(_validation_warnings(record)) == 1
    assert wrong_twice not in ligerfx.backend.last_report.counts
    # inductor's own fusion rounds differently from eager: close, not bit-equal
    torch.testing.assert_close(out, model(x))


def test_without_validate_the_wrong_rewrite_is_made(wrong_twice):
    """The control: the pattern really is rewritten (and wrong) when validation is off."""
    model = Twice()
    x = torch.randn(3, 8)
    out = _compile(model, validate=False)(x)
    assert ligerfx.backend.last_report.counts == {wrong_twice: 1}
    assert not ligerfx.backend.last_report.validation
    assert not torch.equal(out, model(x))


def test_raise_mode_and_environment(wrong_twice, monkeypatch):
    monkeypatch.setenv("LIGERFX_VALIDATE", "raise")
    assert Options().validate == "raise"
    with pytest.raises(Exception, match="translation validation.*differs from the original"):
        _compile(Twice())(torch.randn(3, 8))
    monkeypatch.setenv("LIGERFX_VALIDATE", "1")
    assert Options().validate is True
    monkeypatch.setenv("LIGERFX_VALIDATE", "0")
    assert Options().validate is False


class Shaped(nn.Module):
    def forward(self, x):
        y = torch.cos(x) * 2
        return y + 1, x.shape[0]


def test_no_grad_dynamic_shapes_and_non_tensor_output(wrong_twice):
    model = Shaped()
    compiled = torch.compile(model, backend="liger", dynamic=True,
                             options={"inner": "aot_eager", "log_report": False,
                                      "validate": True})
    with torch.no_grad(), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for n in (5, 7):
            x = torch.randn(n, 3)
            out, size = compiled(x)
            assert size == n and torch.equal(out, model(x)[0])
    assert len(_validation_warnings(record)) == 1
    assert [v.status for v in ligerfx.backend.last_report.validation] == ["dropped"]


def test_a_validator_failure_keeps_the_rewrite(monkeypatch):
    from ligerfx.compiler import validate

    def broken(*args, **kwargs):
        raise RuntimeError("validator bug")

    monkeypatch.setattr(validate, "check_region", broken)
    model = Norm()
    x = torch.randn(4, 16)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = _compile(model, validate=True)(x)
    (msg,) = _validation_warnings(record)
    assert "could not check" in msg and "validator bug" in msg
    report = ligerfx.backend.last_report
    assert report.counts == {"rms_norm": 1}
    assert [v.status for v in report.validation] == ["not validated"]
    assert "not validated: rms_norm" in str(report)
    torch.testing.assert_close(out, model(x))


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_option_must_be_a_mode(bad):
    with pytest.raises(OptionsError, match="option 'validate' must be True, False or \"raise\""):
        Options.from_any({"validate": bad})


def test_environment_value_is_checked(monkeypatch):
    monkeypatch.setenv("LIGERFX_VALIDATE", "sometimes")
    with pytest.raises(OptionsError, match="LIGERFX_VALIDATE"):
        Options()


def test_rule():
    ref = torch.randn(100, dtype=torch.float64)
    low = ref.float()
    assert within_eager_rounding("y", low.clone(), low, ref, torch.float32) is None
    assert "relative error" in within_eager_rounding("y", low * 1.001, low, ref, torch.float32)
    bad = low.clone()
    bad[3] = float("nan")
    assert "non-finite" in within_eager_rounding("y", bad, low, ref, torch.float32)
    # bf16: a result as good as eager's rounding passes, one a unit in the last place off fails
    lowb = ref.bfloat16()
    assert within_eager_rounding("y", lowb.clone(), lowb, ref, torch.bfloat16) is None
    assert within_eager_rounding("y", (ref * 1.01).bfloat16(), lowb, ref, torch.bfloat16)


def test_rule_where_eager_has_no_correct_digit():
    """A value below the rounding of its terms (a saturated softmax's gradient, ~1e-20 in float64):
    eager's fp32 result is noise of 1e-9, another algorithm's noise may lie far from it, but a
    result of the size of the terms (1e-3 here) is still wrong."""
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(64, generator=g, dtype=torch.float64) * 1e-20
    low = (torch.randn(64, generator=g) * 1e-9)
    noise = torch.randn(64, generator=g) * 5e-8  # 50 times eager's noise: still noise
    assert within_eager_rounding("g", noise, low, ref, torch.float32) is None
    terms = torch.randn(64, generator=g) * 1e-3
    assert "relative error" in within_eager_rounding("g", terms, low, ref, torch.float32)
    # one correct digit in eager (relative error 0.5): the ordinary bound applies
    ref2 = torch.randn(64, generator=g, dtype=torch.float64)
    low2 = (ref2 * 1.5).float()
    assert within_eager_rounding("g", (ref2 * 2.0).float(), low2, ref2, torch.float32)


class Writes(Norm):
    """Writes a buffer and an input in place around a validated rewrite, and draws dropout."""

    def __init__(self):
        super().__init__()
        self.register_buffer("count", torch.zeros(16))

    def forward(self, x, cache):
        self.count.add_(1)
        out = torch.nn.functional.dropout(super().forward(x), 0.5)
        cache.mul_(2)
        return out + self.count, cache.sum()


def test_validation_changes_nothing_the_program_sees():
    """In-place writes happen once, and the random stream is the one without validation."""
    results = []
    for validate in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(1)
        model, cache = Writes(), torch.ones(3)
        x = torch.randn(4, 16)
        out, total = _compile(model, validate=validate)(x, cache)
        results.append((out, total, model.count.clone(), cache.clone(), torch.rand(3)))
        if validate:
            assert [v.status for v in ligerfx.backend.last_report.validation] == ["equal"]
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert torch.equal(results[1][2], torch.ones(16)) and torch.equal(results[1][3], 2 * torch.ones(3))


def test_the_suite_runs_with_validation_on(wrong_twice):
    """tests/conftest.py makes LIGERFX_VALIDATE=raise the session's default (issue 22 §2): a test
    that compiles with no `validate` option fails on a wrong rewrite it did not ask about."""
    import os

    if os.environ.get("LIGERFX_VALIDATE") != "raise":
        pytest.skip(f"this run set LIGERFX_VALIDATE={os.environ.get('LIGERFX_VALIDATE')!r}")
    assert Options().validate == "raise"
    with pytest.raises(Exception, match=f"translation validation.*{wrong_twice}.*differs"):
        torch.compile(Twice(), backend="liger",
                      options={"inner": "aot_eager", "log_report": False})(torch.randn(3, 8))


def test_running_says_when_the_validator_runs_code(monkeypatch):
    from ligerfx.compiler import validate

    seen = []
    check_region = validate.check_region

    def spy(*args, **kwargs):
        seen.append(validate.running())
        return check_region(*args, **kwargs)

    monkeypatch.setattr(validate, "check_region", spy)
    assert not validate.running()
    _compile(Norm(), validate=True)(torch.randn(4, 16))
    assert seen == [True] and not validate.running()


class LogitsLM(nn.Module):
    """An lm head + cross-entropy that also returns its logits (what skip_logits drops)."""

    def __init__(self, h=16, v=37):
        super().__init__()
        self.emb = nn.Embedding(v, h)
        self.w = nn.Parameter(torch.randn(v, h) * 0.3)

    def forward(self, ids, t):
        logits = torch.nn.functional.linear(self.emb(ids), self.w)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), t.flatten()), logits


def test_skip_logits_output_is_not_compared_the_loss_is(kernel_path):
    """skip_logits=True returns empty logits on purpose (the option's contract): validation
    compares the loss and the gradients (no upstream gradient through the dropped logits) and
    says which output it did not compare."""
    torch.manual_seed(0)
    model = LogitsLM()
    ids, t = torch.randint(0, 37, (2, 5)), torch.randint(0, 37, (2, 5))
    ref_loss, _ = model(ids, t)
    gref = _grads(model, ref_loss)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        loss, logits = _compile(model, validate="raise", skip_logits=True)(ids, t)
    assert not _validation_warnings(record)
    report = ligerfx.backend.last_report
    assert report.counts == {"fused_linear_cross_entropy": 1}
    (v,) = report.validation
    assert v.status == "equal"
    (what,) = v.not_compared
    assert what.startswith("output 1 (`") and "skip_logits=True" in what
    assert "not compared by translation validation" in str(report)
    assert logits.numel() == 0
    torch.testing.assert_close(loss, ref_loss)
    for a, b in zip(_grads(model, loss), gref):
        torch.testing.assert_close(a, b)


# -- resampling (a gap of size alone judged again on inputs an ulp away) -------------------------

def _fifteen(x):
    return x * 15.0


class Fifteen(nn.Module):
    def forward(self, x):
        return torch.cos(x) * 15.0


def test_an_extra_rounding_is_dropped_despite_resampling(names):
    """bf16 `x * 15` (one rounding) "rewritten" to `(x * 3) * 5` (two): about 1.4x eager's error
    on every input set, a fixed part of the value, not a draw."""
    names.append("test_validate_two_roundings")
    register_pattern("test_validate_two_roundings", _fifteen, lambda x: (x * 3.0) * 5.0,
                     (torch.randn(4),))
    x = torch.randn(64, 64, dtype=torch.bfloat16, requires_grad=True)
    ref, _, compiled, out, record = _first_call(Fifteen(), x, validate=True)
    (msg,) = _validation_warnings(record)
    assert "test_validate_two_roundings" in msg and "input sets an ulp away" in msg
    assert torch.equal(out, ref)


def test_resample_votes():
    """A size gap on the real inputs is kept when most input sets an ulp away fail too, dropped
    when most pass; any other kind of difference on a moved set is kept as found; a sampler that
    raises leaves the verdict as it was."""
    from ligerfx.compiler.validate import RESAMPLES, resample
    gap = "y: relative error 3e-05 vs float64, eager torch.float32 has 1e-05"
    base = {"y": gap, "z": None}

    def sampler(fail_runs):
        calls = []

        def sample(gen):
            calls.append(1)
            return {"y": gap if len(calls) <= fail_runs else None, "z": None}
        return sample
    half = (RESAMPLES + 1) // 2  # with the real inputs' failure: a majority of the sets
    assert resample(base, sampler(half))["y"]
    assert resample(base, sampler(half - 1)) == {"y": None, "z": None}
    odd = resample(base, lambda gen: {"y": None, "z": "z: 2 non-finite values, eager has 0"})
    assert "non-finite" in odd["z"] and odd["y"] == gap

    def boom(gen):
        raise RuntimeError("no")
    assert resample(base, boom) == base


def test_nudge_moves_finite_values_by_at_most_an_ulp():
    from ligerfx.compiler.validate import nudge
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(1000, dtype=torch.float64).to(dtype)
        x[:4] = torch.tensor([0.0, float("-inf"), float("nan"), -0.0])
        y = nudge(x, g)
        assert y.dtype == dtype and (y[4:] != x[4:]).float().mean() > 0.1
        assert ((y[4:].double() - x[4:].double()).abs()
                <= x[4:].double().abs() * torch.finfo(dtype).eps).all()
        assert y[0] == 0 and y[1] == float("-inf") and y[2].isnan()
        assert torch.equal(torch.signbit(y[4:]), torch.signbit(x[4:]))
    # in the oracle: float64 masters moved by ulps of the case's dtype
    m = torch.randn(100, dtype=torch.float64)
    moved = nudge(m, g, torch.bfloat16)
    assert ((moved - m).abs() > m.abs() * 2.0 ** -20).any()
