"""`ligerfx.register_pattern`, `ligerfx.testing.check_pattern` and pattern plugins.

A user's QuickGELU (`x * sigmoid(1.702 * x)`) is registered with their own custom op (forward and
backward ops count their calls), compiled with the liger backend, explained and checked; bad
registrations must fail with errors naming the pattern; a test distribution's entry point adds a
plugin pattern.  Every test removes the patterns it registers.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import warnings
from collections import Counter

import pytest
import torch
import torch.nn as nn

import ligerfx
from ligerfx import PatternError, register_pattern
from ligerfx.compiler.pattern import REGISTRY
from ligerfx.compiler import validate
from ligerfx.testing import check_pattern

PLUGIN_DIR = os.path.join(os.path.dirname(__file__), "plugin_dist")
CALLS: Counter = Counter()


@torch.library.custom_op("ligerfx_test::quick_gelu", mutates_args=())
def quick_gelu_op(x: torch.Tensor) -> torch.Tensor:
    CALLS["forward"] += 0 if validate.running() else 1  # the program's calls only
    return x * torch.sigmoid(1.702 * x)


@quick_gelu_op.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("ligerfx_test::quick_gelu_backward", mutates_args=())
def quick_gelu_backward_op(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    CALLS["backward"] += 0 if validate.running() else 1  # the program's calls only
    s = torch.sigmoid(1.702 * x)
    return grad * (s + 1.702 * x * s * (1 - s))


@quick_gelu_backward_op.register_fake
def _(grad, x):
    return torch.empty_like(x)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return quick_gelu_backward_op(grad, x)


quick_gelu_op.register_autograd(_backward, setup_context=_setup)


def quick_gelu(x):
    """QuickGELU, x * sigmoid(1.702 x) -> ligerfx_test::quick_gelu"""
    return x * torch.sigmoid(1.702 * x)


def quick_gelu_replacement(x):
    return torch.ops.ligerfx_test.quick_gelu(x)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8)

    def forward(self, x):
        h = self.up(x)
        h = h * torch.sigmoid(1.702 * h)
        return self.down(h)




@pytest.fixture
def quick(names):
    names.append("test_quick_gelu")
    register_pattern("test_quick_gelu", quick_gelu, quick_gelu_replacement,
                     (torch.randn(2, 8),))
    return "test_quick_gelu"


def test_custom_op_runs_forward_and_backward_under_compile(quick):
    model = MLP()
    x = torch.randn(3, 8)
    ref = model(x)
    (gref,) = torch.autograd.grad(ref.sum(), model.up.weight)
    CALLS.clear()
    compiled = torch.compile(model, backend="liger",
                             options={"inner": "aot_eager", "log_report": False})
    out = compiled(x)
    (g,) = torch.autograd.grad(out.sum(), model.up.weight)
    assert CALLS["forward"] == 1 and CALLS["backward"] == 1, CALLS
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, gref)
    assert ligerfx.backend.last_report.counts == {quick: 1}


def test_explain_counts_user_pattern_by_name(quick):
    report = ligerfx.explain(MLP(), torch.randn(3, 8))
    assert report.counts.get(quick) == 1
    (m,) = [m for m in report.matches if m.pattern == quick]
    assert m.location.file == __file__ and "sigmoid(1.702 * h)" in m.location.code


def test_excluded_user_pattern_is_not_applied(quick):
    report = ligerfx.explain(MLP(), torch.randn(3, 8), options={"exclude": [quick]})
    assert quick not in report.counts


def test_check_pattern_passes_on_a_correct_replacement(quick):
    assert check_pattern(quick) >= 2


def test_check_pattern_catches_wrong_forward(names):
    names.append("test_quick_gelu_bad_fwd")
    # Same shape and dtype (so registration accepts it), wrong values.
    register_pattern("test_quick_gelu_bad_fwd", quick_gelu, lambda x: x * torch.sigmoid(1.6 * x),
                     (torch.randn(2, 8),))
    with pytest.raises(AssertionError, match="test_quick_gelu_bad_fwd.*output 0"):
        check_pattern("test_quick_gelu_bad_fwd")


class _WrongGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(1.702 * x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(1.702 * x)  # forgets the product rule


def test_check_pattern_catches_wrong_backward(names):
    names.append("test_quick_gelu_bad_bwd")
    register_pattern("test_quick_gelu_bad_bwd", quick_gelu, lambda x: _WrongGrad.apply(x),
                     (torch.randn(2, 8),))
    assert check_pattern("test_quick_gelu_bad_bwd", backward=False) == 2
    with pytest.raises(AssertionError, match="gradient of `x`"):
        check_pattern("test_quick_gelu_bad_bwd")


def test_check_pattern_unknown_name():
    with pytest.raises(KeyError, match="no pattern named"):
        check_pattern("no_such_pattern_xyz")


# Built-ins whose replacement, called without a match (as check_pattern calls it), is not the
# rewrite of every spelling: the constraint decides per match what the replacement computes (a
# rotation's signs and pair layout, the negation kept around an NLL, a subtrahend proven to be the
# logsumexp).  Those spellings are compared end to end in their own pattern tests.
_MATCH_DECIDED = {
    "rope": ("rope_partial", "rope_rotate_half", "rope_complex"),
    "rope_single": ("rope_single_partial", "rope_single_rotate_half", "rope_single_complex"),
    "fused_linear_logprob": ("logprob_gather_lse", "logprob_log_softmax"),
}
_FROZEN = {"rope": ("cos", "sin"), "rope_single": ("cos", "sin")}  # refused with a gradient


def _builtin_names():
    import ligerfx.builtins  # noqa: F401

    return [n for n in REGISTRY.names() if REGISTRY.get(n).builtin]


@pytest.mark.parametrize("name", _builtin_names())
def test_check_pattern_on_builtins(name):
    spellings = [v.fn.__name__ for v in REGISTRY.get(name).rewritable]
    keep = _MATCH_DECIDED.get(name, spellings)
    skip = [s for s in spellings if s not in keep]
    assert check_pattern(name, trials=1, frozen=_FROZEN.get(name, ()), skip=skip) == len(keep)


def test_look_alike_is_refused_with_its_reason_and_not_checked(quick, names):
    def not_quick_gelu(x):  # the constant differs: another function
        return x * torch.sigmoid(1.5 * x)

    names.append("test_quick_gelu_la")
    REGISTRY.remove(quick)
    pat = register_pattern("test_quick_gelu_la", quick_gelu, quick_gelu_replacement,
                           (torch.randn(2, 8),),
                           look_alikes={not_quick_gelu: "1.5 is not QuickGELU's 1.702"})
    assert [v.fn for v in pat.rewritable] == [quick_gelu]
    assert check_pattern("test_quick_gelu_la") == 2  # the look-alike is not compared

    class M(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(1.5 * x)

    report = ligerfx.explain(M(), torch.randn(3, 8))
    assert "test_quick_gelu_la" not in report.counts
    assert any(m.pattern == "test_quick_gelu_la" and "1.702" in m.reason
               for m in report.near_misses), report.near_misses
    with pytest.raises(PatternError, match="look_alikes"):
        register_pattern("test_quick_gelu_la2", quick_gelu, quick_gelu_replacement,
                         (torch.randn(2, 8),), look_alikes={not_quick_gelu: ""})


def test_check_pattern_names_unknown_spellings(quick):
    with pytest.raises(KeyError, match="no spelling or input"):
        check_pattern(quick, skip=["no_such_spelling"])


def test_decorator_on_pattern_and_on_replacement(names):
    names += ["test_deco_pattern", "test_deco_replacement"]

    @register_pattern("test_deco_pattern", replacement=quick_gelu_replacement,
                      example_inputs=(torch.randn(4),))
    def my_pattern(x):
        """My activation."""
        return x * torch.sigmoid(1.702 * x)

    assert callable(my_pattern) and my_pattern.__name__ == "my_pattern"
    assert REGISTRY.get("test_deco_pattern").description == "My activation."

    @register_pattern("test_deco_replacement", pattern=quick_gelu, example_inputs={"x": torch.randn(4)},
                      priority=3)
    def my_replacement(x):
        return torch.ops.ligerfx_test.quick_gelu(x)

    assert my_replacement(torch.ones(2)).shape == (2,)
    p = REGISTRY.get("test_deco_replacement")
    assert p.replacement is my_replacement and p.priority == 3


@pytest.mark.parametrize("replacement, message", [
    (lambda x: x.sum(-1), r"'test_bad'.*output 0 differs.*\(2, 8\).*\(2,\)"),
    (lambda x: x.double(), r"'test_bad'.*output 0 differs.*float32.*float64"),
    (lambda x: (x, x), r"'test_bad'.*returns 1 outputs, replacement returns 2"),
    (lambda x, y: x, r"'test_bad'"),
])
def test_bad_replacement_is_a_clear_error(replacement, message):
    with pytest.raises(PatternError, match=message):
        register_pattern("test_bad", quick_gelu, replacement, (torch.randn(2, 8),))
    assert "test_bad" not in REGISTRY


def test_registration_checks_the_replacement_on_fake_tensors():
    """Registering checks the replacement's outputs (count, shapes, dtypes) on fake copies of the
    example inputs: no real kernel runs (under Triton's interpreter the built-in patterns' kernels
    cost seconds at import), and a replacement that needs real values still runs for real."""
    from torch._subclasses.fake_tensor import FakeTensor

    seen = []

    def replacement(x):
        seen.append(isinstance(x, FakeTensor))
        return torch.ops.ligerfx_test.quick_gelu(x)

    register_pattern("test_fake_check", quick_gelu, replacement, (torch.randn(2, 8),))
    try:
        assert seen == [True]
    finally:
        REGISTRY.remove("test_fake_check")

    seen.clear()

    def reads_a_value(x):
        seen.append(isinstance(x, FakeTensor))
        if x.abs().max().item() < 0:  # data-dependent: a fake tensor cannot answer
            raise AssertionError("unreachable")
        return torch.ops.ligerfx_test.quick_gelu(x)

    register_pattern("test_fake_check", quick_gelu, reads_a_value, (torch.randn(2, 8),))
    try:
        assert seen == [True, False]
    finally:
        REGISTRY.remove("test_fake_check")


def test_bad_arguments_are_clear_errors():
    with pytest.raises(PatternError, match="example_inputs"):
        register_pattern("test_bad", quick_gelu, quick_gelu_replacement)
    with pytest.raises(PatternError, match="needs a name"):
        register_pattern(quick_gelu)
    with pytest.raises(PatternError, match="takes 1 arguments but 2"):
        register_pattern("test_bad", quick_gelu, quick_gelu_replacement,
                         (torch.randn(2), torch.randn(2)))
    with pytest.raises(PatternError, match="identifier"):
        register_pattern("not a name", quick_gelu, quick_gelu_replacement, (torch.randn(2),))
    with pytest.raises(PatternError, match="could not trace"):
        register_pattern("test_bad", lambda x: x * 2 if x.sum() > 0 else x,
                         lambda x: x, (torch.randn(2),))
    assert "test_bad" not in REGISTRY


def test_duplicate_name_needs_replace(quick):
    with pytest.raises(PatternError, match="already registered.*replace=True"):
        register_pattern(quick, quick_gelu, quick_gelu_replacement, (torch.randn(2, 8),))
    with pytest.raises(PatternError, match="'rms_norm' is already registered"):
        register_pattern("rms_norm", quick_gelu, quick_gelu_replacement, (torch.randn(2, 8),))
    new = register_pattern(quick, quick_gelu, quick_gelu_replacement, (torch.randn(2, 8),),
                           replace=True, priority=7)
    assert REGISTRY.get(quick) is new and new.priority == 7


# -- plugins -------------------------------------------------------------------------------

@pytest.fixture
def plugin_path(monkeypatch):
    from ligerfx import plugins

    monkeypatch.syspath_prepend(PLUGIN_DIR)
    importlib.invalidate_caches()
    yield plugins
    REGISTRY.remove("demo_plugin_tanh_gate")
    sys.modules.pop("ligerfx_demo_plugin", None)
    plugins.sources.pop("demo_plugin_tanh_gate", None)
    plugins.errors.pop("broken", None)


def test_plugin_entry_point_registers_its_pattern(plugin_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plugin_path.load_plugins(reload=True)
    assert "demo_plugin_tanh_gate" in REGISTRY
    assert plugin_path.sources["demo_plugin_tanh_gate"] == "demo (ligerfx-demo-plugin)"
    # The broken entry point only warns.
    assert "broken" in plugin_path.errors
    assert any("'broken'" in str(w.message) for w in caught)
    assert check_pattern("demo_plugin_tanh_gate", trials=1) == 1


def test_plugins_load_on_first_use_in_a_fresh_process():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [PLUGIN_DIR, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "ligerfx", "patterns"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("demo_plugin_tanh_gate"))
    assert "x * tanh(x), from the demo plugin." in line and "plugin demo" in line
    assert "rms_norm" in r.stdout
    assert "'broken' failed to load" in r.stderr and "Traceback" not in r.stderr


# -- the worked example of docs/patterns.md ------------------------------------------------

def test_docs_worked_example_runs(tmp_path, monkeypatch, capsys, triton_path):
    """The docs' kernel, registration and dump target, extracted and run (Triton interpreter)."""
    import json
    import re

    from ligerfx.tools.cli import main

    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "patterns.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", doc, re.S)
    (tmp_path / "my_kernels.py").write_text(blocks[0])
    (tmp_path / "my_patterns.py").write_text(blocks[1])
    (tmp_path / "clip_mlp.py").write_text(next(b for b in blocks if "def make()" in b))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        importlib.import_module("my_patterns")
        assert check_pattern("quick_gelu") == 2
        assert main(["dump", f"{tmp_path}/clip_mlp.py:make", "-f", "json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["counts"] == {"quick_gelu": 1}
        assert out["matches"][0]["location"]["code"] == "return x * torch.sigmoid(1.702 * x)"
        assert "mylib.quick_gelu" in out["graphs_after"][0]
    finally:
        REGISTRY.remove("quick_gelu")
        for m in ("my_patterns", "my_kernels", "_ligerfx_target_clip_mlp"):
            sys.modules.pop(m, None)
