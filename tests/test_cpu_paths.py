"""On CPU tensors with inner="inductor", the memory-bound `liger::` ops are decomposed for inductor.

kernels/runtime.py keeps a table of ops whose torch implementation inductor inlines on the CPU
(norms, RoPE, gated activations); the backend hands it to inductor when every input of the graph is
a CPU tensor and Triton's interpreter is off, and records in each match what runs there.  The
fused lm head + loss keeps its own chunked CPU implementation (it saves the [N, V] logits).
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
    assert torch.ops.liger.fused_linear_cross_entropy.default not in table


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
    assert paths["fused_linear_cross_entropy"] == \
        "CPU: liger::fused_linear_cross_entropy's own CPU implementation"
    assert "[CPU: decomposed for inductor]" in str(report)

    # A second step, counting run-time calls of the ops' torch bodies (the decomposition table
    # holds the original functions, and compiling is over, so only the compiled code counts).
    calls: dict = {}
    for mod, name in ((rms_norm, "_rms_norm_torch"), (rms_norm, "_rms_norm_backward_torch"),
                      (rope, "_rope_torch"), (gated_act, "_gated_act_torch"),
                      (gated_act, "_gated_act_backward_torch"), (flce, "_chunk_loop")):
        _count_calls(monkeypatch, mod, name, calls)
    test.zero_grad(set_to_none=True)
    loss = call(compiled, inputs).loss
    loss.backward()
    assert calls.get("_chunk_loop", 0) >= 1, calls  # the kept op ran its own implementation
    inlined = {k: v for k, v in calls.items() if k != "_chunk_loop"}
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


def test_flce_backward_skips_a_zero_logits_gradient(torch_path, monkeypatch):
    # AOTAutograd materializes zeros as the gradient of the returned (unused) logits; the CPU
    # backward must not spend two [N, V] GEMMs adding them, and must equal the no-gradient result.
    N, H, V = 24, 8, 40
    h, w = torch.randn(N, H), torch.randn(V, H)
    t = torch.randint(0, V, (N,))
    out = torch.ops.liger.fused_linear_cross_entropy(h, w, None, t, None, -100, "mean", 0.0, 0.0,
                                                     0.0, 1.0, True, True, True, False, 0)
    gh, gw, gb = out[3], out[4], out[5]
    g = torch.tensor(0.37)
    args = lambda gl: (g, gl, gh, gw, gb, h, w, None, t, None, -100, "mean", 0.0, 0.0, 0.0, 1.0,
                       False, True, True, False, 0)
    ref = torch.ops.liger.fused_linear_cross_entropy_backward(*args(None))
    n = {"addmm_": 0}
    orig = torch.Tensor.addmm_

    def counting(self, *a, **k):
        n["addmm_"] += 1
        return orig(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "addmm_", counting)
    got = torch.ops.liger.fused_linear_cross_entropy_backward(*args(torch.zeros(N, V)))
    assert n["addmm_"] == 0
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    gl = torch.randn(N, V)  # a real gradient is still added
    got = torch.ops.liger.fused_linear_cross_entropy_backward(*args(gl))
    assert n["addmm_"] == 2
    assert torch.allclose(got[0].double(), ref[0].double() + gl.double() @ w.double(), atol=1e-5)
    assert torch.allclose(got[1].double(), ref[1].double() + gl.double().t() @ h.double(), atol=1e-5)


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
    h, w, t = torch.randn(24, 8), torch.randn(40, 8), torch.randint(0, 40, (24,))
    args = lambda keep: (h, w, None, t, None, -100, "mean", 0.0, 0.0, 0.0, 1.0, keep, True, True,
                         False, 0)
    kept = torch.ops.liger.fused_linear_cross_entropy(*args(True))
    chunked = torch.ops.liger.fused_linear_cross_entropy(*args(False))
    assert calls == [24, 16]
    for a, b in zip(kept[:2] + kept[3:5], chunked[:2] + chunked[3:5]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert torch.allclose(kept[2], h @ w.t(), rtol=1e-5, atol=1e-5)
