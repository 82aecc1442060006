"""Issue 10 §5: no silent misses.

Partners that each repeat the table expression still pair (pure expressions of the same inputs
are one value); a rotation rewritten alone says why; `last_report` covers every graph of a
compiled model, and a pattern cut by a graph break is a near miss; module paths are
`named_modules()` names (PEFT-style wrappers); `ligerfx.compile` raises `OptionsError` at once.
"""

import fnmatch

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import ligerfx
from ligerfx.compiler.canonical import View
from ligerfx.graph.nodes import node_pure
from tests.compare import compare_training_step
from tests.models.hf import tiny_causal_lm
from tests.models.repeated_tables import make_deepseek, make_llama4

ROPES = ("rope", "rope_single")


# -- 1. pure expressions repeated per partner are one value ------------------------------------


def _call_nodes(fn, *args):
    gm = fx.symbolic_trace(fn)
    return gm, [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


def test_purity_from_schema():
    def f(x):
        return (x.repeat_interleave(2, dim=-1), torch.repeat_interleave(x, 2, dim=-1),
                F.dropout(x, 0.5), torch.rand_like(x), x.add_(1), torch.cos(x, out=x),
                x[:, None, :])

    _, nodes = _call_nodes(f)
    pure = [node_pure(n) for n in nodes]
    # repeat_interleave (method and function) is pure; dropout and rand_like draw random
    # numbers; add_ writes its input; out= writes; the plain getitem is a canonical op
    assert pure[:6] == [True, True, False, False, False, False]


def test_repeated_pure_nodes_merge():
    def f(t):
        a = t[:, :, None, :]
        b = t[:, :, None, :]  # slices inside the index: unhashable before Python 3.12
        c = t.repeat_interleave(2, dim=-1)
        d = t.repeat_interleave(2, dim=-1)
        e = torch.rand_like(t)
        g = torch.rand_like(t)
        return a, b, c, d, e, g

    gm = fx.symbolic_trace(f)
    view = View(gm.graph, strip_casts=True)
    n = {x.name: x for x in gm.graph.nodes}
    assert view[n["getitem"]] is view[n["getitem_1"]]
    assert view[n["repeat_interleave"]] is view[n["repeat_interleave_1"]]
    assert view[n["rand_like"]] is not view[n["rand_like_1"]]  # random: never one value


@pytest.mark.parametrize("make", [make_llama4, make_deepseek], ids=["llama4", "deepseek_v4"])
def test_partners_repeating_the_table_pair(make, kernel_path):
    model, args, expected = make()
    report = compare_training_step(model, args)
    assert {k: v for k, v in report.counts.items() if k in ROPES} == expected
    assert not report.near_misses, [str(m) for m in report.near_misses]




# DeepSeek-V4 at its smallest: one sliding-attention layer, which rotates q, kv (the same
# tables: one `rope`) and the attention output back with (cos, -sin) (other tables: alone).
_HF = {
    "llama4_text": (dict(num_hidden_layers=1), {"rope": 1}),
    "deepseek_v4": (dict(attn_implementation="eager", num_hidden_layers=1, head_dim=16,
                         q_lora_rank=16, o_lora_rank=16, o_groups=2, n_routed_experts=2,
                         num_experts_per_tok=1, moe_intermediate_size=16, hc_mult=2,
                         num_key_value_heads=1, layer_types=["sliding_attention"],
                         mlp_layer_types=["moe"], index_n_heads=2, index_head_dim=16),
                    {"rope": 1, "rope_single": 1}),
}


@pytest.mark.parametrize("model_type", list(_HF))
def test_hf_families_pair_q_and_k(model_type):
    overrides, expected = _HF[model_type]
    model, inputs = tiny_causal_lm(model_type, **overrides)
    report = ligerfx.explain(model, **inputs)
    assert {k: v for k, v in report.counts.items() if k in ROPES} == expected
    singles = [m for m in report.matches if m.pattern == "rope_single"]
    assert all("not paired" in m.detail for m in singles), [m.detail for m in singles]


# -- 2. partial matches say why ----------------------------------------------------------------


def _rot(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), -1)


class _OtherTables(nn.Module):
    def forward(self, q, k, cos, sin):
        return q * cos + _rot(q) * sin, k * (cos + 1) + _rot(k) * sin


class _KFromQ(nn.Module):
    def forward(self, q, k, cos, sin):
        qo = q * cos + _rot(q) * sin
        k2 = k + qo[:, :2]  # k's input is computed from q's rotation
        return qo, k2 * cos + _rot(k2) * sin


def _qk():
    return (torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(5, 8),
            torch.randn(5, 8))


def test_rotation_alone_says_why():
    report = ligerfx.explain(_OtherTables(), *_qk())
    assert report.counts == {"rope_single": 2}
    for m in report.matches:
        assert "not paired: no other rotation by the same cos/sin" in m.detail, m.detail
        assert "not paired" in str(m)


def test_refused_pairing_is_a_near_miss_and_named_by_the_single():
    report = ligerfx.explain(_KFromQ(), *_qk())
    assert report.counts == {"rope_single": 2}
    (miss,) = report.near_misses
    assert miss.pattern == "rope" and "is computed from this output" in miss.reason
    assert all(miss.reason in m.detail for m in report.matches)


# -- 3. one report per compiled model; patterns cut by a graph boundary -------------------------


class _BrokenMLP(nn.Module):
    """RMSNorm, a SwiGLU cut by a graph break between silu(gate) and * up, RMSNorm again."""

    def __init__(self, cut=True):
        super().__init__()
        self.cut = cut
        self.norm = nn.RMSNorm(16)
        self.gate, self.up = nn.Linear(16, 32), nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)

    def forward(self, x):
        x = self.norm(x)
        g = F.silu(self.gate(x)) if self.cut else self.gate(x)
        torch._dynamo.graph_break()
        return self.norm(self.down(g * self.up(x)))


def test_last_report_covers_every_graph_and_names_the_cut():
    model = _BrokenMLP()
    compiled = torch.compile(model, backend="liger", options={"inner": "eager"})
    x = torch.randn(3, 16)
    torch.testing.assert_close(compiled(x), model(x))
    report = ligerfx.backend.last_report
    assert report.graphs == 2
    assert report.counts == {"rms_norm": 2}
    assert {m.graph for m in report.matches} == {0, 1}  # a rewrite in each graph
    (miss,) = report.near_misses
    assert miss.pattern == "swiglu" and "graph boundary cuts it" in miss.reason
    assert "`silu`" in miss.reason and miss.graph == 1
    compiled(torch.randn(5, 16))  # a recompile replaces its frame's graphs, adds none
    assert ligerfx.backend.last_report.graphs == 2
    assert ligerfx.backend.last_report.counts == {"rms_norm": 2}
    # explain reports the same
    assert [str(m.reason) for m in ligerfx.explain(model, x).near_misses] == [miss.reason]


def test_boundary_needs_evidence():
    # the next graph starts from a linear's output, not a silu: no swiglu was cut
    report = ligerfx.explain(_BrokenMLP(cut=False), torch.randn(3, 16))
    assert report.graphs == 2 and not report.near_misses, [str(m) for m in report.near_misses]


def test_new_compiled_model_starts_a_new_report():
    torch.compile(_BrokenMLP(), backend="liger", options={"inner": "eager"})(torch.randn(3, 16))
    other = nn.Sequential(nn.RMSNorm(16))
    torch.compile(other, backend="liger", options={"inner": "eager"})(torch.randn(3, 16))
    assert ligerfx.backend.last_report.graphs == 1
    assert ligerfx.backend.last_report.counts == {"rms_norm": 1}


# -- 4. module paths are named_modules() names --------------------------------------------------


class _Forwarding(nn.Module):
    """Stores the wrapped model and forwards unknown attributes to it, as PEFT's PeftModel and
    its tuner do (Dynamo then reaches submodules through `__dict__['_modules']`)."""

    def __init__(self, inner, attr):
        super().__init__()
        self._attr = attr
        setattr(self, attr, inner)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules[self.__dict__["_attr"]], name)

    def forward(self, *args):
        return getattr(self, self._attr)(*args)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.RMSNorm(16)
        self.gate, self.up, self.down = nn.Linear(16, 32), nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        h = self.norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class _Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Block(), _Block()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _peft_like():
    return _Forwarding(_Forwarding(_Inner(), "model"), "base_model").requires_grad_(False)


def test_report_paths_are_named_modules():
    model = _peft_like()
    names = {n for n, _ in model.named_modules()}
    report = ligerfx.explain(model, torch.randn(2, 3, 16))
    # layer 1's norm reads layer 0's residual add
    assert report.counts == {"rms_norm": 1, "add_rms_norm": 1, "swiglu": 2}
    assert {m.location.module for m in report.matches} == {
        "base_model.model.layers.0.norm", "base_model.model.layers.1.norm",
        "base_model.model.layers.0", "base_model.model.layers.1"}
    assert all(m.location.module in names for m in report.matches)


class _GlobalGate(nn.Module):
    """A module held in a global and called from inside the model's layers, as transformers'
    hub-kernel wrappers around functions such as apply_rotary_pos_emb are."""

    def forward(self, x):
        return F.silu(x[..., :8]) * x[..., 8:]


_GLOBAL_GATE = _GlobalGate()


class _CallsGlobal(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 16, bias=False)

    def forward(self, x):
        return _GLOBAL_GATE(self.up(x))


def test_report_path_of_a_global_module_is_its_caller():
    # Regression: a global module's nodes were named after the global (G.<module>.<name>), so both
    # layers' rewrites were reported at one made-up path and drawn outside their layers.
    model = nn.Sequential(_CallsGlobal(), nn.Linear(8, 16), _CallsGlobal())
    report = ligerfx.explain(model, torch.randn(2, 3, 16))
    assert report.counts == {"swiglu": 2}
    assert sorted(m.location.module for m in report.matches) == ["0", "2"]


def test_quantize_skip_globs_from_named_modules():
    model = _peft_like()
    skip = "base_model.model.layers.0.*"
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert sum(fnmatch.fnmatch(n, skip) for n in linears) == 3
    with torch.no_grad():
        report = ligerfx.explain(model, torch.randn(2, 3, 16),
                                 options={"quantize": "int8", "quantize_skip": [skip]})
    assert report.counts.get("int8_linear") == 3  # layer 1's three linears
    skipped = [m for m in report.near_misses if "quantize_skip" in m.reason]
    assert sorted(m.location.module for m in skipped) == sorted(
        n for n in linears if fnmatch.fnmatch(n, skip))


# -- 5. OptionsError: when and as what -----------------------------------------------------------


def _f(x):
    return F.silu(x) * x


def test_ligerfx_compile_raises_options_error_at_once():
    with pytest.raises(ligerfx.OptionsError, match="unknown liger option.*'innr'"):
        ligerfx.compile(_f, innr="eager")
    with pytest.raises(ligerfx.OptionsError, match="'inner' must be one of"):
        ligerfx.compile(nn.Linear(2, 2), inner="fast")


def test_torch_compile_wraps_options_error_at_first_call():
    compiled = torch.compile(_f, backend="liger", options={"innr": "eager"})  # no error yet
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as info:
        compiled(torch.randn(3))
    err = info.value
    cause = getattr(err, "inner_exception", None) or err.__cause__
    assert isinstance(cause, ligerfx.OptionsError)


def test_ligerfx_compile_runs_with_torch_kwargs():
    x = torch.randn(4, 3)
    compiled = ligerfx.compile(_f, inner="eager", mode="max-autotune", dynamic=False)
    torch.testing.assert_close(compiled(x), _f(x))
    assert ligerfx.backend.last_report.counts == {"swiglu": 1}
    decorated = ligerfx.compile(inner="eager")(_f)
    torch.testing.assert_close(decorated(x), _f(x))


class _QUsedEarly(nn.Module):
    """q's rotation is used before k's input exists; `noisy` draws random numbers in between."""

    def __init__(self, noisy):
        super().__init__()
        self.noisy = noisy
        q, k, _, _ = _qk()
        self.q, self.k = nn.Parameter(q), nn.Parameter(k)

    def forward(self, cos, sin):
        q = self.q * 1.5
        qo = q * cos + _rot(q) * sin
        y = qo * 2.0
        k2 = self.k + torch.rand_like(self.k) if self.noisy else self.k * 0.5
        return y.sum() + (k2 * cos + _rot(k2) * sin).pow(2).sum()


def test_early_use_moves_below_the_partner(kernel_path):
    _, _, cos, sin = _qk()
    report = compare_training_step(_QUsedEarly(noisy=False), (cos, sin))
    assert report.counts == {"rope": 1} and not report.near_misses


def test_early_use_past_an_effect_is_a_near_miss():
    _, _, cos, sin = _qk()
    report = ligerfx.explain(_QUsedEarly(noisy=True), cos, sin)
    assert report.counts == {"rope_single": 2}
    (miss,) = report.near_misses
    assert miss.pattern == "rope" and "may have effects" in miss.reason, miss.reason
    assert "rand_like" in miss.reason


class _L2Norms(nn.Module):
    """nGPT-style unit-norm projections (Dory): a sum of squares, not a mean: not RMSNorm."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8))

    def forward(self, x, y):
        a = (x.float() * torch.rsqrt(x.float().pow(2).sum(-1, keepdim=True) + 1e-6)).type_as(x)
        return a + y * torch.rsqrt(y.pow(2).sum(-1, keepdim=True) + 1e-6) * self.w


def test_l2_normalisation_is_a_near_miss_not_an_rms_norm():
    report = ligerfx.explain(_L2Norms(), torch.randn(2, 3, 8), torch.randn(2, 3, 8))
    assert report.counts == {}
    assert len(report.near_misses) == 2, [str(m) for m in report.near_misses]
    for m in report.near_misses:
        assert "not divided by the width: an L2 normalisation" in m.reason, m.reason
