"""Mutation and aliasing: a match is rewritten only when nothing it reads is written while it runs.

Each case is ordinary PyTorch that looks like a pattern; a write (in any spelling Dynamo produces,
directly or through a view) between two reads of the match must make it a near miss naming the
writer, and writes before the first or after the last read must not stop the rewrite.  Compiled
results and every gradient are compared with eager on fresh random inputs.
"""

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._higher_order_ops.triton_kernel_wrap import triton_kernel_wrapper_mutation

import ligerfx
import ligerfx.backend
from ligerfx.graph.mutation import Memory, written_args
from tests.compare import rel_err


def _rms(h, m, w):
    return h * torch.rsqrt(m + 1e-6) * w


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _compiled_matches_eager(fn, inputs, patterns, grad=True):
    """Compile `fn` with the liger backend; outputs and input gradients equal eager's (fp32,
    rtol 1e-5).  Returns the backend's report.  `grad=False` where eager autograd itself refuses
    (a value saved for backward is written afterwards): the forward is compared alone."""
    gen = torch.Generator().manual_seed(1)
    ref_in = [t.detach().clone().requires_grad_(grad and t.is_floating_point()) for t in inputs]
    test_in = [t.detach().clone().requires_grad_(grad and t.is_floating_point()) for t in inputs]
    ligerfx.backend.last_report = None
    compiled = torch.compile(fn, backend="liger",
                             options={"inner": "aot_eager", "patterns": patterns})
    out = compiled(*test_in)
    report = ligerfx.backend.last_report
    assert report is not None
    ref = fn(*ref_in)
    out, ref = (out if isinstance(out, tuple) else (out,)), (ref if isinstance(ref, tuple) else (ref,))
    for a, b in zip(out, ref):
        assert rel_err(a, b) < 1e-5, rel_err(a, b)
    if not grad:
        return report
    cot = [torch.randn(r.shape, generator=gen) for r in ref]
    wrt = [i for i, t in enumerate(ref_in) if t.requires_grad]
    g = torch.autograd.grad(out, [test_in[i] for i in wrt], cot, allow_unused=True)
    g_ref = torch.autograd.grad(ref, [ref_in[i] for i in wrt], cot, allow_unused=True)
    for a, b in zip(g, g_ref):
        assert (a is None) == (b is None)
        if b is not None:
            assert rel_err(a, b) < 1e-5, rel_err(a, b)
    return report


def _reasons(report, pattern):
    return [m.reason for m in report.near_misses if m.pattern == pattern]


# ----------------------------------------------------------------- the three examples

def rms_mul_between(x, w):
    h = x * 1.5
    m = h.pow(2).mean(-1, keepdim=True)
    h.mul_(2.0)
    return _rms(h, m, w)


def rope_training_layout(x, wq, wk, cos, sin):
    # q/k projected, split in heads, transposed to [b, h, t, d]: the usual training code
    b, t, _ = x.shape
    q = (x @ wq).view(b, t, 2, 8).transpose(1, 2)
    k = (x @ wk).view(b, t, 2, 8).transpose(1, 2)
    qq = q * 1.0
    a = qq * cos
    qq.mul_(2.0)
    return a + _rotate_half(qq) * sin, k * cos + _rotate_half(k) * sin


def swiglu_add_between(x, wg, wu):
    g = x @ wg
    u = x @ wu
    a = F.silu(g)
    g.add_(u)
    return a * g


def _rms_inputs():
    return [torch.randn(4, 16), torch.randn(16)]


def _rope_inputs():
    t = torch.arange(6.0)[:, None] * torch.rand(4)
    t = torch.cat((t, t), -1)
    return [torch.randn(2, 6, 16), torch.randn(16, 16), torch.randn(16, 16), t.cos(), t.sin()]


def test_rms_norm_write_between_uses(kernel_path):
    # (eager autograd cannot differentiate this one: `h` is saved by pow, then written)
    report = _compiled_matches_eager(rms_mul_between, _rms_inputs(), ["rms_norm"], grad=False)
    assert not report.counts.get("rms_norm")
    assert any("`mul_` (line" in r and "writes `h`" in r and "between its uses" in r
               for r in _reasons(report, "rms_norm")), report.near_misses


def test_rope_write_between_uses(kernel_path):
    report = _compiled_matches_eager(rope_training_layout, _rope_inputs(), ["rope", "rope_single"],
                                     grad=False)
    # q is written between its two reads; k alone is still an exact rotation
    assert not report.counts.get("rope") and report.counts.get("rope_single") == 1, report.counts
    reasons = _reasons(report, "rope") + _reasons(report, "rope_single")
    assert any("`mul_`" in r and "writes `qq`" in r for r in reasons), reasons


def test_swiglu_write_between_uses(kernel_path):
    inputs = [torch.randn(4, 8), torch.randn(8, 16), torch.randn(8, 16)]
    report = _compiled_matches_eager(swiglu_add_between, inputs, ["swiglu"], grad=False)
    assert not report.counts.get("swiglu")
    assert any("`add_`" in r and "writes `g`" in r for r in _reasons(report, "swiglu"))


# ----------------------------------------------------------------- every spelling of a write

@torch._dynamo.allow_in_graph
def _opaque_scale(t):
    """A callable Dynamo keeps as one node: nothing says it leaves its argument alone."""
    return t.mul_(2.0)


def _between(write):
    def fn(x, w):
        h = x * 1.5
        m = h.pow(2).mean(-1, keepdim=True)
        write(h, x)
        return _rms(h, m, w)
    return fn


def _setitem(h, x):
    h[..., 0] = 0.5


def _index_put(h, x):
    h.index_put_((torch.tensor([0, 2]),), torch.ones(16))


WRITES = {
    "method": (lambda h, x: h.add_(1.0), "`add_`"),
    "tensor_method_as_function": (lambda h, x: torch.Tensor.sub_(h, 1.0), "`sub_`"),
    "torch_function": (lambda h, x: torch.sigmoid_(h), "`sigmoid_`"),
    "functional_inplace": (lambda h, x: F.relu(h, inplace=True), "`relu`"),
    "setitem": (_setitem, "`setitem`"),
    "copy_": (lambda h, x: h.copy_(x), "`copy_`"),
    "out_kwarg": (lambda h, x: torch.mul(x, 3.0, out=h), "writes `h`"),
    "index_put_": (_index_put, "`index_put_`"),
    "op_overload_schema": (lambda h, x: torch.ops.aten.mul_.Scalar(h, 2.0), "writes `h`"),
    "unknown_callable": (lambda h, x: _opaque_scale(h), "writes `h`"),
    # through an alias: a view, a slice, a transpose, a piece of chunk
    "through_view": (lambda h, x: h.view(-1).mul_(2.0), "shares memory with `h`"),
    "through_slice": (lambda h, x: h[1:3].zero_(), "shares memory with `h`"),
    "through_transpose": (lambda h, x: h.t().add_(1.0), "shares memory with `h`"),
    "through_chunk": (lambda h, x: h.chunk(2, -1)[1].mul_(3.0), "shares memory with `h`"),
    "iadd_through_view": (lambda h, x: operator.iadd(h.view(-1), 1.0), "shares memory with `h`"),
}


@pytest.mark.parametrize("name", list(WRITES))
def test_every_write_spelling_is_a_near_miss(name):
    write, said = WRITES[name]
    fn = _between(write)
    report = ligerfx.explain(fn, *_rms_inputs(), options={"patterns": ["rms_norm"]})
    assert not report.counts.get("rms_norm"), report.counts
    reasons = _reasons(report, "rms_norm")
    assert any(said in r and "between its uses" in r for r in reasons), reasons


@pytest.mark.parametrize("name", ["through_transpose", "iadd_through_view", "unknown_callable"])
def test_refused_writes_keep_eager_numerics(name, torch_path):
    # (nothing is rewritten, so no kernel runs: one path is enough)
    report = _compiled_matches_eager(_between(WRITES[name][0]), _rms_inputs(), ["rms_norm"],
                                     grad=False)
    assert not report.counts.get("rms_norm")


# ----------------------------------------------------------------- writes that change nothing

def rms_write_before(x, w):
    h = x * 1.5
    h.mul_(2.0)
    h[0] = 1.0
    return _rms(h, h.pow(2).mean(-1, keepdim=True), w)


def rms_write_after(x, w):
    h = x * 1.5
    y = _rms(h, h.pow(2).mean(-1, keepdim=True), w)
    h.mul_(2.0)
    y.add_(1.0)  # the output itself may be written afterwards: the replacement's is fresh too
    return y, h


def rms_pure_calls_between(x, w):
    h = x * 1.5
    m = h.pow(2).mean(-1, keepdim=True)
    e = F.embedding(torch.tensor([[0, 1]]), h)
    att = F.scaled_dot_product_attention(h[None, None], h[None, None], h[None, None])
    side = F.linear(h, h).softmax(-1).sum() + e.sum() + att.sum()
    return _rms(h, m, w), side


def rms_unrelated_write_between(x, w):
    h = x * 1.5
    other = x * 2.0
    m = h.pow(2).mean(-1, keepdim=True)
    other.mul_(3.0)  # writes memory the match never reads
    return _rms(h, m, w), other


@pytest.mark.parametrize("fn", [rms_write_before, rms_write_after, rms_pure_calls_between,
                                rms_unrelated_write_between], ids=lambda f: f.__name__)
def test_writes_outside_the_match_still_rewrite(fn, kernel_path):
    # writing `h` after the norm read it makes eager autograd refuse: forward only there
    report = _compiled_matches_eager(fn, _rms_inputs(), ["rms_norm"], grad=fn is not rms_write_after)
    assert report.counts.get("rms_norm") == 1, (report.counts, report.near_misses)
    assert not _reasons(report, "rms_norm")


def rope_pair_write_between(q, k, cos, sin):
    # The pair would run where both inputs exist (before k's write); k alone is rewritten after it.
    qq, kk = q.clone(), k.clone()
    q2 = qq * cos + _rotate_half(qq) * sin
    kk.mul_(2.0)
    return q2, kk * cos + _rotate_half(kk) * sin


def rope_pair_write_after_noop(q, k, cos, sin):
    # `k * 1.0` is folded as an identity by the canonical view, so k's rotation binds `k` and reads
    # `kk` (a fresh tensor, written in between) through that identity: refused, never wrong.
    qq, kk = q * 1.0, k * 1.0
    q2 = qq * cos + _rotate_half(qq) * sin
    kk.mul_(2.0)
    return q2, kk * cos + _rotate_half(kk) * sin


def _qk_inputs():
    """q, k [b, h, t, d] and rotate_half tables [t, d], drawn fresh."""
    t = torch.arange(6.0)[:, None] * torch.rand(8)
    t = torch.cat((t, t), -1)
    return [torch.randn(2, 2, 6, 16), torch.randn(2, 2, 6, 16), t.cos(), t.sin()]


def test_pair_insertion_point_before_a_write(kernel_path):
    inputs = _qk_inputs()
    report = _compiled_matches_eager(rope_pair_write_between, inputs, ["rope", "rope_single"],
                                     grad=False)
    assert not report.counts.get("rope") and report.counts.get("rope_single") == 2, report.counts
    assert any("`mul_`" in r and "writes `kk`" in r for r in _reasons(report, "rope"))


def test_write_through_a_folded_noop_is_refused(kernel_path):
    inputs = _qk_inputs()
    report = _compiled_matches_eager(rope_pair_write_after_noop, inputs, ["rope", "rope_single"],
                                     grad=False)
    assert not report.counts.get("rope") and report.counts.get("rope_single") == 1, report.counts
    assert any("`mul_`" in r for r in _reasons(report, "rope_single")), report.near_misses


def rms_equal_expressions_across_a_write(x, w):
    # `h * 1.5` twice, with h written in between: two different values, not one.
    h = x * 1.0
    m = (h * 1.5).pow(2).mean(-1, keepdim=True)
    h.mul_(2.0)
    return _rms(h * 1.5, m, w)


def test_common_subexpressions_are_not_merged_across_a_write(kernel_path):
    report = _compiled_matches_eager(rms_equal_expressions_across_a_write, _rms_inputs(),
                                     ["rms_norm"], grad=False)
    assert not report.counts.get("rms_norm")


# ----------------------------------------------------------------- write detection, node by node

def _node(target, *args, op="call_function", **kwargs):
    g = fx.Graph()
    x = g.placeholder("x")
    y = g.placeholder("y")
    env = {"x": x, "y": y}
    args = tuple(env.get(a, a) if isinstance(a, str) else a for a in args)
    kwargs = {k: fx.node.map_aggregate(v, lambda a: env.get(a, a) if isinstance(a, str) else a)
              for k, v in kwargs.items()}
    return g.create_node(op, target, args, kwargs), x, y


@pytest.mark.parametrize("target,args,kwargs,op,written", [
    (operator.iadd, ("x", "y"), {}, "call_function", ["x"]),
    (operator.imul, ("x", 2.0), {}, "call_function", ["x"]),
    (operator.itruediv, ("x", 2.0), {}, "call_function", ["x"]),
    (operator.setitem, ("x", 0, "y"), {}, "call_function", ["x"]),
    ("mul_", ("x", 2.0), {}, "call_method", ["x"]),
    ("__setitem__", ("x", 0, 1.0), {}, "call_method", ["x"]),
    (torch.Tensor.add_, ("x", "y"), {}, "call_function", ["x"]),
    (torch.add, ("x", "y"), {"out": "y"}, "call_function", ["y"]),
    (torch.ops.aten.index_put_.default, ("x", ["y"], 1.0), {}, "call_function", ["x"]),
    (torch.ops.aten.add_, ("x", "y"), {}, "call_function", ["x"]),
    (F.embedding, ("y", "x"), {"max_norm": 1.0}, "call_function", ["x"]),
    (F.batch_norm, ("y", "x", "x"), {"training": True}, "call_function", ["x", "x"]),
    (_opaque_scale, ("x",), {}, "call_function", ["x"]),
    (triton_kernel_wrapper_mutation, (), {"kwargs": {"a": "x"}}, "call_function", ["x"]),
    # pure: never writes
    (F.linear, ("x", "y"), {}, "call_function", []),
    (F.scaled_dot_product_attention, ("x", "x", "y"), {}, "call_function", []),
    (F.embedding, ("y", "x"), {}, "call_function", []),
    (F.softmax, ("x", -1), {}, "call_function", []),
    (F.batch_norm, ("y", "x", "x"), {"training": False}, "call_function", []),
    (torch.ops.aten.add.Tensor, ("x", "y"), {}, "call_function", []),
    (torch.ops.higher_order.tag_activation_checkpoint, ("y", "x"), {}, "call_function", []),
    (operator.add, ("x", "y"), {}, "call_function", []),
    ("softmax", ("x", -1), {}, "call_method", []),
    ("requires_grad_", ("x",), {}, "call_method", []),
])
def test_written_args(target, args, kwargs, op, written):
    node, x, y = _node(target, *args, op=op, **kwargs)
    names = [a.name for a in written_args(node) if isinstance(a, fx.Node)]
    assert names == written


def test_alias_sets_come_from_storage_not_names():
    seen = {}

    def capture(gm, example_inputs):
        seen["mem"] = Memory(gm.graph)
        seen["nodes"] = {n.name: n for n in gm.graph.nodes}
        return gm.forward

    def fn(x):
        h = x * 2.0
        a, b = h.chunk(2, -1)
        r = torch.view_as_real(torch.view_as_complex(h.reshape(4, 4, 2)))
        return a.t() + 1.0, b, r, h.clone()

    torch.compile(fn, backend=capture, dynamic=True)(torch.randn(4, 8))
    mem, nodes = seen["mem"], seen["nodes"]
    keys = {name: mem.keys(n) for name, n in nodes.items() if name != "output"}
    assert keys["a"] == keys["b"] == keys["h"] == keys["r"]
    assert keys["clone"] != keys["h"] and keys["l_x_"] != keys["h"]
