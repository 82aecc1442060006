"""On CPU tensors with inner="inductor", the memory-bound `liger::` ops are decomposed for inductor.

kernels/runtime.py keeps a table of ops whose torch implementation inductor inlines on the CPU
(norms, RoPE, gated activations, plain cross-entropy); the backend hands it to inductor when every
input of the graph is a CPU tensor and Triton's interpreter is off, and records in each match what
runs there.  The fused lm head + loss keeps its own chunked CPU implementation where it saves the
[N, V] logits; when they are returned anyway (fp32) its forward is decomposed (loss and logits
gradient, one fused loop) and its backward op writes the gradient GEMMs.
These tests prove: which path each rewrite takes, that the decomposed ops' bodies are not called
at run time (inductor inlined them) while the kept op's is, and that loss and gradients still
equal eager's; and that the interpreter / other inner backends keep the ops (kernel coverage).
"""

import copy

import pytest
import torch

import ligerfx.backend as backend
from ligerfx.kernels import fused_linear_cross_entropy as flce
from ligerfx.kernels import gated_act, rms_norm, rope
from ligerfx.kernels.runtime import cpu_decompositions

from tests.compare import call, compare_training_step, rel_err
from tests.models.hf import build

DECOMPOSED = {"rms_norm", "add_rms_norm", "rope", "swiglu"}


def _count_calls(monkeypatch, module, name, counter):
    orig = getattr(module, name)

    def wrapped(*a, **k):
        counter[name] = counter.get(name, 0) + 1
        return orig(*a, **k)

    monkeypatch.setattr(module, name, wrapped)


def test_every_decomposed_op_has_forward_and_backward():
    table = cpu_decompositions()
    for op in ("rms_norm", "layer_norm", "add_rms_norm", "add_layer_norm", "rope", "gated_act", "act",
               "gated_rms_norm"):
        assert getattr(torch.ops.liger, op).default in table, op
        assert getattr(torch.ops.liger, op + "_backward").default in table, op
    assert torch.ops.liger.cross_entropy.default in table
    assert torch.ops.liger.cross_entropy_backward.default in table
    # the lm head + loss: only the forward of its logits-returned mode; the backward's GEMMs and
    # its skip of a zero logits gradient stay in the op
    assert torch.ops.liger.fused_linear_cross_entropy.default in table
    assert torch.ops.liger.fused_linear_cross_entropy_backward.default not in table


@pytest.mark.slow  # an inductor compile of forward + backward (as test_backend's)
def test_llama_on_cpu_inductor_decomposes_norms_rope_mlp(torch_path, monkeypatch):
    model, inputs = build("llama", num_hidden_layers=1)
    test = copy.deepcopy(model)
    compiled = torch.compile(test, backend="liger", options={"inner": "inductor", "log_report": False})
    call(compiled, inputs).loss.backward()  # compiles forward and backward
    report = backend.last_report
    paths = {m.pattern: m.path for m in report.matches}
    assert DECOMPOSED <= set(paths), paths
    for p in DECOMPOSED:
        assert paths[p] == "CPU: decomposed for inductor", (p, paths[p])
    assert paths["fused_linear_cross_entropy"] == (
        "CPU: logits returned: loss and logits gradient in the forward (decomposed for inductor), "
        "the gradient GEMMs in the backward (liger::fused_linear_cross_entropy_backward)")
    assert "[CPU: decomposed for inductor]" in str(report)

    # A second step, counting run-time calls of the ops' torch bodies (the decomposition table
    # holds the original functions, and compiling is over, so only the compiled code counts).
    calls: dict = {}
    for mod, name in ((rms_norm, "_rms_norm_torch"), (rms_norm, "_rms_norm_backward_torch"),
                      (rope, "_rope_torch"), (gated_act, "_gated_act_torch"),
                      (gated_act, "_gated_act_backward_torch"), (flce, "_linear_into"),
                      (flce, "_grads_from_saved_logits")):
        _count_calls(monkeypatch, mod, name, calls)
    test.zero_grad(set_to_none=True)
    loss = call(compiled, inputs).loss
    loss.backward()
    assert calls.get("_grads_from_saved_logits", 0) == 1, calls  # the backward op ran
    inlined = {k: v for k, v in calls.items() if k != "_grads_from_saved_logits"}
    assert not inlined, f"decomposed ops still called at run time: {inlined}"

    # Loss and every gradient equal eager's, computed in float64.
    ref = copy.deepcopy(model).double()
    loss_ref = call(ref, inputs).loss
    loss_ref.backward()
    assert rel_err(loss.detach(), loss_ref.detach()) < 1e-5
    for (name, p_ref), (_, p) in zip(ref.named_parameters(), test.named_parameters()):
        if p_ref.grad is not None:
            assert rel_err(p.grad, p_ref.grad) < 1e-4, name


def test_interpreter_and_other_inner_backends_keep_the_ops(monkeypatch):
    cpu = [torch.randn(3, 4)]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not backend._on_cpu(cpu)  # the interpreted kernels stay under test
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert backend._on_cpu(cpu)
    assert not backend._on_cpu(cpu + [torch.empty(2, device="meta")])


def test_aot_eager_runs_the_op_on_cpu(torch_path, monkeypatch):
    model, inputs = build("llama", num_hidden_layers=1)
    calls: dict = {}
    _count_calls(monkeypatch, rms_norm, "_rms_norm_torch", calls)
    report = compare_training_step(model, inputs, options={"inner": "aot_eager"})
    assert calls.get("_rms_norm_torch", 0) >= 1
    assert all(m.path == "" for m in report.matches)


def _flce_args(h, w, b, t, **kw):
    o = dict(ce_weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
             lse_square_scale=0.0, softcap=0.0, logit_scale=1.0, return_logits=True,
             need_grad_hidden=True, need_grad_weight=True, need_grad_bias=b is not None,
             chunk_size=0)
    o.update(kw)
    return (h, w, b, t) + tuple(o.values())


def _flce_backward(out, grad_loss, grad_logits, h, w, b, t, fwd_args):
    # the backward op's arguments as _flce_backward passes them (recompute False)
    return torch.ops.liger.fused_linear_cross_entropy_backward(
        grad_loss, grad_logits, out[3], out[4], out[5], out[6], h, w, b, t, fwd_args[4],
        *fwd_args[5:11], False, True, True, b is not None, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_flce_backward_skips_a_zero_logits_gradient(torch_path, monkeypatch, dtype):
    # AOTAutograd materializes zeros as the gradient of the returned (unused) logits; the CPU
    # backward must not spend [N, V] work on them (GEMMs, or a scaled copy of the saved logits
    # gradient in the fp32 mode), and must equal the no-gradient result bit for bit. float64
    # takes the path with the gradients formed in the forward, float32 the logits-gradient mode.
    N, H, V = 24, 8, 40
    h, w = torch.randn(N, H, dtype=dtype), torch.randn(V, H, dtype=dtype)
    t = torch.randint(0, V, (N,))
    fa = _flce_args(h, w, None, t)
    out = torch.ops.liger.fused_linear_cross_entropy(*fa)
    assert (out[6].numel() > 0) == (dtype == torch.float32)
    g = torch.tensor(0.37, dtype=torch.float32)
    ref = _flce_backward(out, g, None, h, w, None, t, fa)
    n = {"addmm_": 0, "add": 0}
    orig_addmm, orig_add = torch.Tensor.addmm_, torch.add

    def counting_addmm(self, *a, **k):
        n["addmm_"] += 1
        return orig_addmm(self, *a, **k)

    def counting_add(*a, **k):
        n["add"] += 1
        return orig_add(*a, **k)

    monkeypatch.setattr(torch.Tensor, "addmm_", counting_addmm)
    monkeypatch.setattr(torch, "add", counting_add)
    before = dict(n)
    got = _flce_backward(out, g, torch.zeros(N, V, dtype=dtype), h, w, None, t, fa)
    extra = 2 if dtype == torch.float32 else 0  # the mode's two alpha GEMMs themselves
    assert n == {"addmm_": before["addmm_"] + extra, "add": before["add"]}, n
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    gl = torch.randn(N, V, dtype=dtype)  # a real gradient is still added
    got = _flce_backward(out, g, gl, h, w, None, t, fa)
    assert torch.allclose(got[0].double(), ref[0].double() + gl.double() @ w.double(), atol=1e-5)
    assert torch.allclose(got[1].double(), ref[1].double() + gl.double().t() @ h.double(), atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("logits_grad", ["none", "zeros", "random"])
def test_flce_logits_mode_against_float64(torch_path, monkeypatch, bias, weighted, reduction,
                                          logits_grad):
    # The fp32 CPU mode with the logits returned: the forward keeps only the logits' CE
    # gradient, the backward writes both GEMMs with grad_output as alpha. Loss, logits and every
    # gradient against float64 eager (ignored rows, class weights, a logit scale, a grad_output
    # that is not a power of two, a gradient on the logits); the backward's outputs start as NaN
    # (torch.empty poisoned), so an element it does not write fails.
    N, H, V = 29, 12, 67
    h = (torch.randn(N, H) * 2).requires_grad_()
    w = (torch.randn(V, H) * 0.5).requires_grad_()
    b = torch.randn(V).requires_grad_() if bias else None
    t = torch.randint(0, V, (N,))
    t[::4] = -100
    cw = torch.rand(V) + 0.5 if weighted else None
    from ligerfx.kernels import fused_linear_cross_entropy as mod

    loss, logits = mod.fused_linear_cross_entropy(h, w, t, bias=b, ce_weight=cw,
                                                  reduction=reduction, logit_scale=0.8,
                                                  return_logits=True)
    G = {"none": None, "zeros": torch.zeros(N, V), "random": torch.randn(N, V)}[logits_grad]
    orig_empty = torch.empty
    monkeypatch.setattr(torch, "empty",
                        lambda *a, **k: orig_empty(*a, **k).fill_(float("nan")))
    grads = torch.autograd.grad([loss * 0.37] + ([logits] if G is not None else []),
                                [x for x in (h, w, b) if x is not None],
                                [torch.ones(())] + ([G] if G is not None else []))
    monkeypatch.setattr(torch, "empty", orig_empty)
    leaves = [x.detach().double().requires_grad_() for x in (h, w, b) if x is not None]
    z = torch.nn.functional.linear(leaves[0], leaves[1], leaves[2] if bias else None)
    ref = torch.nn.functional.cross_entropy(z * 0.8, t, weight=cw.double() if weighted else None,
                                            reduction=reduction)
    ref_grads = torch.autograd.grad([ref * 0.37] + ([z] if G is not None else []), leaves,
                                    [torch.ones((), dtype=torch.float64)]
                                    + ([G.double()] if G is not None else []))
    assert rel_err(loss.detach(), ref.detach()) < 1e-6
    assert rel_err(logits.detach(), z.detach()) < 1e-6
    for got, want in zip(grads, ref_grads):
        assert torch.isfinite(got).all()
        assert rel_err(got, want) < 1e-5


def test_flce_logits_mode_decomposition_equals_the_op(torch_path):
    # What inductor inlines for the forward of the logits-returned mode gives the op's outputs
    # (same layouts); it declines (NotImplemented) outside the mode or for a loss it does not
    # spell (smoothing), so the op's own implementation runs there.
    N, H, V = 19, 8, 53
    h, w, b = torch.randn(N, H), torch.randn(V, H), torch.randn(V)
    t = torch.randint(0, V, (N,))
    t[3] = -100
    decomp = cpu_decompositions()[torch.ops.liger.fused_linear_cross_entropy.default]
    for kw in (dict(), dict(reduction="sum", logit_scale=0.5), dict(ce_weight=torch.rand(V) + .5)):
        args = _flce_args(h, w, b, t, **kw)
        got, ref = decomp(*args), torch.ops.liger.fused_linear_cross_entropy(*args)
        assert len(got) == len(ref) == 7
        for i, (g, r) in enumerate(zip(got, ref)):
            assert g.shape == r.shape and g.dtype == r.dtype and g.stride() == r.stride(), i
            assert torch.allclose(g, r, rtol=1e-5, atol=1e-6), i
    for kw in (dict(return_logits=False), dict(label_smoothing=0.1), dict(reduction="none")):
        assert decomp(*_flce_args(h, w, b, t, **kw)) is NotImplemented, kw
    assert decomp(*_flce_args(h.double(), w.double(), b.double(), t)) is NotImplemented


def test_decomposed_rope_keeps_the_ops_layout(torch_path):
    # The op's output follows q's strides (its fake impl: empty_like); the torch implementation's
    # cat is contiguous. The decomposition handed to inductor must give the op's layout, or
    # inductor copies the attention output back into it before the o-projection (once per layer).
    q = torch.randn(2, 16, 4, 8).transpose(1, 2)  # [b, h, t, d] view of a [b, t, h, d] buffer
    k = torch.randn(2, 16, 2, 8).transpose(1, 2)
    cos, sin = torch.randn(16, 4), torch.randn(16, 4)
    for op, args in ((torch.ops.liger.rope.default, (q, k, cos, sin, 2, False)),
                     (torch.ops.liger.rope_backward.default, (q, k, cos, sin, 2, False))):
        got = cpu_decompositions()[op](*args)
        ref = op(*args)
        for g, r, x in zip(got, ref, (q, k)):
            assert g.stride() == x.stride() == r.stride(), (op, g.stride(), x.stride())
            assert torch.equal(g, r)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_plain_cross_entropy_cpu_path_against_float64(torch_path, weighted, reduction):
    # No smoothing / z-loss / softcap: the CPU path takes the log_softmax formulation
    # (cross_entropy._plain_ce_rows). Loss and gradient against float64 eager, on ignored rows
    # and a poisoned gradient buffer (every element must be written).
    N, V = 37, 301
    x = (3 * torch.randn(N, V)).requires_grad_()
    t = torch.randint(0, V, (N,))
    t[::5] = -100
    w = torch.rand(V) + 0.5 if weighted else None
    loss, _, grad = torch.ops.liger.cross_entropy(x, t, w, -100, reduction, 0.0, 0.0, 0.0, 1.0, True)
    xd = x.detach().double().requires_grad_()
    ref = torch.nn.functional.cross_entropy(xd, t, weight=w.double() if weighted else None,
                                            reduction=reduction)
    ref.backward(torch.ones_like(ref) if reduction == "none" else None)
    assert rel_err(loss.detach(), ref.detach()) < 1e-6
    if reduction != "none":  # the op's saved gradient is for grad_output = 1
        assert torch.isfinite(grad).all()
        assert rel_err(grad, xd.grad) < 1e-6

    from ligerfx.kernels import cross_entropy as ce
    stats, _, _ = ce.reduction_stats(t, w, -100, "mean", V, torch.float32)
    g = torch.full((N, V), float("nan"))
    loss_rows, z_rows = torch.full((N,), float("nan")), torch.full((N,), float("nan"))
    ce.ce_rows_torch(x.detach(), t, w, stats, loss_rows, z_rows, g, ignore_index=-100,
                     label_smoothing=0.0, lse_square_scale=0.0, softcap=0.0, logit_scale=1.0,
                     chunk_rows=8)  # several row blocks
    assert torch.isfinite(g).all() and torch.isfinite(loss_rows).all()
    assert torch.equal(z_rows, torch.zeros(N))
    if reduction == "mean":
        assert rel_err(g, xd.grad) < 1e-6


def test_flce_zero_check():
    assert flce._all_zero(torch.zeros(3, 4)) and flce._all_zero(torch.empty(0, 4))
    assert flce._all_zero(-torch.zeros(5))  # -0.0 adds nothing either
    for bad in (float("nan"), 1e-30, -2.0):
        x = torch.zeros(3, 4)
        x[2, 3] = bad
        assert not flce._all_zero(x), bad


def test_flce_one_chunk_on_cpu_when_the_logits_are_kept(torch_path, monkeypatch):
    # Returned logits already hold [N, V]: one gradient chunk beside them (one K = N grad-weight
    # GEMM, no accumulation passes over [V, H]); without them the 64 MiB chunk budget stands.
    N, V = 4096, 32000
    assert flce.chunk_rows(N, V, torch.device("cpu"), 4, logits_kept=True) == N
    assert flce.chunk_rows(N, V, torch.device("cpu"), 4) == 512
    assert flce.chunk_rows(N, V, torch.device("cpu"), 4, chunk_size=64, logits_kept=True) == 64
    calls = []
    orig = flce._chunk_loop
    monkeypatch.setattr(flce, "_chunk_loop", lambda *a, **k: (calls.append(k["C"]), orig(*a, **k)))
    monkeypatch.setattr(flce, "_CPU_CHUNK_BYTES", 40 * 4 * 8)  # 16 rows (the least) otherwise
    # float64: fp32 with the logits returned takes the logits-gradient mode (no chunk loop)
    h, w = torch.randn(24, 8, dtype=torch.float64), torch.randn(40, 8, dtype=torch.float64)
    t = torch.randint(0, 40, (24,))
    args = lambda keep: (h, w, None, t, None, -100, "mean", 0.0, 0.0, 0.0, 1.0, keep, True, True,
                         False, 0)
    kept = torch.ops.liger.fused_linear_cross_entropy(*args(True))
    chunked = torch.ops.liger.fused_linear_cross_entropy(*args(False))
    assert calls == [24, 16]
    for a, b in zip(kept[:2] + kept[3:5], chunked[:2] + chunked[3:5]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert torch.allclose(kept[2], h @ w.t(), rtol=1e-5, atol=1e-5)


def test_cross_entropy_decomposition_equals_the_op(torch_path):
    # liger::cross_entropy on the CPU: inductor inlines the plain loss (forward: loss and
    # gradient in one fused loop; backward: the scale), the op stays for smoothing / z-loss /
    # softcap (NotImplemented), and the report says which.
    from ligerfx.kernels.runtime import cpu_path

    N, V = 23, 71
    x = torch.randn(2, N, V) * 3
    t = torch.randint(0, V, (2, N))
    t[0, ::3] = -100
    op, op_b = torch.ops.liger.cross_entropy.default, torch.ops.liger.cross_entropy_backward.default
    table = cpu_decompositions()
    for w in (None, torch.rand(V) + 0.5):
        for red in ("mean", "sum", "none"):
            args = (x, t, w, -100, red, 0.0, 0.0, 0.0, 0.7, True)
            got, ref = table[op](*args), op(*args)
            for g, r in zip(got, ref):
                assert g.shape == r.shape and g.stride() == r.stride()
                assert torch.allclose(g, r, rtol=1e-5, atol=1e-6)
            s = torch.rand(t.shape) if red == "none" else torch.tensor(0.3)
            assert torch.allclose(table[op_b](s, ref[2], red), op_b(s, ref[2], red))
            assert cpu_path(op, args, {}) == "CPU: decomposed for inductor"
    smoothed = (x, t, None, -100, "mean", 0.1, 0.0, 0.0, 1.0, True)
    assert table[op](*smoothed) is NotImplemented
    assert cpu_path(op, smoothed, {}) is None  # the op's own CPU implementation


def test_flce_logits_mode_without_rows_or_forward_gradients(torch_path):
    # No rows (an empty batch) and need_grad_* all False in the forward while the inputs do
    # require gradients: the backward recomputes instead of reading an empty logits gradient.
    V, H = 31, 6
    w = torch.randn(V, H, requires_grad=True)
    for N, flags in ((0, (True, True)), (9, (False, False))):
        h = torch.randn(N, H, requires_grad=True)
        t = torch.randint(0, V, (N,))
        out = torch.ops.liger.fused_linear_cross_entropy(
            *_flce_args(h, w, None, t, reduction="sum", need_grad_hidden=flags[0],
                        need_grad_weight=flags[1]))
        assert out[6].numel() == 0
        gh, gw = torch.autograd.grad(out[0] * 0.5, (h, w))
        hd, wd = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        ref = torch.nn.functional.cross_entropy(hd @ wd.t(), t, reduction="sum")
        rh, rw = torch.autograd.grad(ref * 0.5, (hd, wd))
        assert torch.allclose(gh.double(), rh, atol=1e-5) and torch.allclose(gw.double(), rw, atol=1e-5)


@pytest.mark.slow  # an inductor compile of forward + backward
def test_flce_calls_the_decomposition_covers_only_partly_keep_the_op(torch_path):
    # Two lm heads + losses in one graph, one returning its logits (the decomposition covers it)
    # and one not (it declines): inductor cannot inline an op for one call and keep it for the
    # other, so both keep the op, the report says so, and the step still equals eager's.
    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(16, 97, bias=False)
            self.b = torch.nn.Linear(16, 89, bias=False)

        def forward(self, h, ta, tb):
            za = self.a(h)
            la = torch.nn.functional.cross_entropy(za.view(-1, 97), ta.view(-1))
            lb = torch.nn.functional.cross_entropy(self.b(h).view(-1, 89), tb.view(-1))
            return la + lb, za

    h = torch.randn(2, 11, 16, requires_grad=True)
    ta, tb = torch.randint(0, 97, (2, 11)), torch.randint(0, 89, (2, 11))
    paths = _flce_paths_of_a_step_equal_to_float64(TwoHeads(), h, ta, tb)
    assert paths == ["CPU: liger::fused_linear_cross_entropy's own CPU implementation"] * 2, paths


def _flce_paths_of_a_step_equal_to_float64(model, h, *targets):
    """One liger step (inner inductor) of `model` (returning loss, logits): loss and every
    parameter gradient against float64 eager; returns the fused lm head matches' CPU paths."""
    test = copy.deepcopy(model)
    compiled = torch.compile(test, backend="liger", options={"inner": "inductor", "log_report": False})
    loss, _ = compiled(h, *targets)
    loss.backward()
    paths = [m.path for m in backend.last_report.matches if m.pattern == "fused_linear_cross_entropy"]
    ref = copy.deepcopy(model).double()
    loss_ref, _ = ref(h.detach().double(), *targets)
    loss_ref.backward()
    assert rel_err(loss.detach(), loss_ref.detach()) < 1e-6
    for p, p_ref in zip(test.parameters(), ref.parameters()):
        assert rel_err(p.grad, p_ref.grad) < 1e-5
    return paths


@pytest.mark.slow  # an inductor compile of forward + backward
def test_a_users_own_flce_call_the_decomposition_declines_compiles(torch_path):
    # A model calling ligerfx.kernels' fused lm head + loss itself (no rewrite made it, so no
    # pattern names the node) without returning the logits: the decomposition declines that
    # call, so the backend must not hand it to inductor (which rejects an op both inlined and
    # kept as a call).
    from ligerfx.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(61, 16) * 0.3)

        def forward(self, h, t):
            return fused_linear_cross_entropy(h, self.w, t)

    model = Head()
    h, t = torch.randn(13, 16, requires_grad=True), torch.randint(0, 61, (13,))
    compiled = torch.compile(copy.deepcopy(model), backend="liger",
                             options={"inner": "inductor", "log_report": False})
    loss = compiled(h, t)
    loss.backward()
    ref = torch.nn.functional.cross_entropy(h.detach().double() @ model.w.detach().double().t(), t)
    assert rel_err(loss.detach(), ref) < 1e-6


@pytest.mark.slow  # an inductor compile of forward + backward
def test_flce_logits_returned_with_smoothing_keeps_the_op(torch_path):
    # The logits-gradient mode with label smoothing: the forward decomposition spells plain
    # losses only and declines, so the op must not be in inductor's table (inlined and kept at
    # once is an error there) and the report must say the op's own implementation runs.
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = torch.nn.Linear(16, 83, bias=False)

        def forward(self, h, t):
            z = self.lm(h)
            return torch.nn.functional.cross_entropy(z.view(-1, 83), t.view(-1),
                                                     label_smoothing=0.1), z

    h, t = torch.randn(2, 7, 16, requires_grad=True), torch.randint(0, 83, (2, 7))
    paths = _flce_paths_of_a_step_equal_to_float64(Head(), h, t)
    assert paths == ["CPU: liger::fused_linear_cross_entropy's own CPU implementation"], paths
