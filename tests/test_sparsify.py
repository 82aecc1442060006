"""2:4 sparsity end to end on tiny models (CPU): the compile pass, `ligerfx.sparsify_`, options."""

import copy
import functools
import io
import math
import operator
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ligerfx
from ligerfx import backend
from torch.nn.utils import prune

from ligerfx.compress import quantize as Q
from ligerfx.compress.sparsify import NotServedSparseWarning, SparseLinear
from ligerfx.kernels import sparse24_matmul as S24
from ligerfx.kernels.sparse24_matmul import broken_fraction, prune_24
from tests.models import hf_model


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _compile(model, **opts):
    return torch.compile(model, backend="liger", options={"inner": "aot_eager", **opts})


def _hand_prune_(model, leave_dense=()):
    """Zero 2 random positions of every group of 4 (not by magnitude) in every linear but the lm
    head and those named in leave_dense; one weight also gets -0.0 entries."""
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and name != "lm_head" and name not in leave_dense:
                N, K = m.weight.shape
                keep = torch.rand(N, K // 4, 4).argsort(-1) < 2
                m.weight.copy_(torch.where(keep, m.weight.reshape(N, K // 4, 4), 0.0).reshape(N, K))
        w = model.model.layers[0].self_attn.q_proj.weight
        w[:, ::4] = torch.where(w[:, ::4] != 0, -0.0, 0.0)  # kept entries turned -0.0 stay kept


def _dense_linear_bytes(model):
    return sum(m.weight.numel() * m.weight.element_size() for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and n != "lm_head")


def _sparse_bytes(model):
    return sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, SparseLinear)
               for b in m.buffers())


def test_hf_llama_already_24_is_served_losslessly(kernel_path):
    model, inputs = hf_model("llama")
    model.eval()
    _hand_prune_(model, leave_dense=("model.layers.1.mlp.up_proj",))
    broken = model.model.layers[1].mlp.up_proj.weight
    ids = inputs["input_ids"]
    with torch.no_grad():
        ref = model(input_ids=ids).logits  # the dense eager model on the pruned weights
        out = _compile(model, sparsity="2:4")(input_ids=ids).logits
    rep = backend.last_report
    assert rep.counts.get("sparse24_linear") == 13
    misses = [n for n in rep.near_misses if n.pattern == "sparse24_linear"]
    frac = f"{broken_fraction(broken):.1%}"
    assert any(n.location.module == "model.layers.1.mlp.up_proj" and "not 2:4 sparse" in n.reason
               and frac in n.reason for n in misses), [str(n) for n in misses]
    assert any("lm head" in n.reason for n in misses)
    assert any("bytes of linear weights stored against" in note for note in rep.notes)
    assert _rel(out, ref) < 1e-5


@pytest.mark.parametrize("scheme", ["2:4", "2:4+int8"])
def test_sparsify_eager_compile_and_state_dict(scheme):
    model, inputs = hf_model("llama")
    model.eval()
    ids = inputs["input_ids"]
    pruned = copy.deepcopy(model)  # dense reference with the same pruned weights
    with torch.no_grad():
        for n, m in pruned.named_modules():
            if isinstance(m, nn.Linear) and n != "lm_head":
                m.weight.copy_(prune_24(m.weight))
    if scheme == "2:4+int8":
        ligerfx.quantize_(pruned, "int8")  # 2:4+int8 == int8 of the 2:4 weight
    dense = _dense_linear_bytes(model)
    skipped = ligerfx.sparsify_(model, scheme)
    assert list(skipped) == ["lm_head"]
    assert not any(isinstance(m, nn.Linear) for n, m in model.named_modules() if n != "lm_head")
    with torch.no_grad():
        ref = pruned(input_ids=ids).logits
        eager = model(input_ids=ids).logits
        assert _rel(eager, ref) < 1e-5
        compiled = _compile(model)(input_ids=ids).logits
    op = "sparse24_linear" if scheme == "2:4" else "sparse24_int8_linear"
    assert backend.last_report.counts.get(op) == 14
    note = f"{_sparse_bytes(model)} bytes of linear weights stored against {dense} dense"
    assert any(note in n for n in backend.last_report.notes), backend.last_report.notes
    assert _rel(compiled, eager) < 1e-5
    # state_dict round trip into a fresh model that went through the same call
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    fresh, _ = hf_model("llama")
    fresh.eval()
    ligerfx.sparsify_(fresh, scheme)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, eager)


@pytest.mark.parametrize("scheme,ratio", [("2:4", 0.6), ("2:4+int8", 0.35)])
def test_stored_bytes_against_dense_fp16(scheme, ratio):
    model, _ = hf_model("llama")
    model.half()
    dense = _dense_linear_bytes(model)
    ligerfx.sparsify_(model, scheme)
    stored = _sparse_bytes(model)
    # values, positions and scales counted; 2:4 fp16: 0.5625x, +int8: 0.3125x + the scales
    assert stored <= ratio * dense, stored / dense
    sl = model.model.layers[0].mlp.down_proj
    assert sl.values.dtype == (torch.float16 if scheme == "2:4" else torch.int8)


def test_qlora_style_input_gradients():
    model, inputs = hf_model("llama")
    _hand_prune_(model)
    for n, p in model.named_parameters():
        p.requires_grad_("norm" in n)  # trainable norms, frozen 2:4 base
    ref_model = copy.deepcopy(model)
    loss = _compile(model, sparsity="2:4")(**inputs).loss
    loss.backward()
    assert backend.last_report.counts.get("sparse24_linear") == 14
    ref_loss = ref_model(**inputs).loss
    ref_loss.backward()
    assert _rel(loss, ref_loss) < 1e-5
    grads = [(n, p.grad, q.grad) for (n, p), (_, q) in zip(model.named_parameters(),
                                                            ref_model.named_parameters()) if p.requires_grad]
    assert grads
    for n, g, r in grads:
        assert _rel(g, r) < 1e-4, n


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(32, 48)
        self.b = nn.Linear(48, 32, bias=False)
        with torch.no_grad():
            self.a.weight.copy_(prune_24(self.a.weight))

    def forward(self, x):
        return self.b(F.silu(self.a(x)))


class _Spy:
    """Counts the calls that serve a linear from its compressed form."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = Q.linear

        def linear(*a, **k):
            self.calls += 1
            return real(*a, **k)

        monkeypatch.setattr(Q, "linear", linear)

    def take(self):
        n, self.calls = self.calls, 0
        return n


def _entry(param):
    (key,) = Q._keys[id(param)].values()
    return Q._entries[key]


def test_in_place_change_is_rechecked(kernel_path, monkeypatch):
    model = Small().eval()
    x = torch.randn(3, 32)
    compiled = _compile(model, sparsity="2:4")
    spy = _Spy(monkeypatch)
    w = model.a.weight
    with torch.no_grad():
        assert _rel(compiled(x), model(x)) < 1e-5
        assert backend.last_report.counts == {"sparse24_linear": 1} and spy.take() == 1
        w.mul_(3.0)  # still 2:4: re-compressed, the new values are served
        assert _rel(compiled(x), model(x)) < 1e-5 and spy.take() == 1
        assert torch.equal(_entry(w).packed[0], S24.pack_24(w)[0])
        w.mul_(-1.0)  # the pruned +0.0 become -0.0: zeros all the same, still 2:4
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert _rel(compiled(x), model(x)) < 1e-5 and spy.take() == 1
        w.add_(1.0)  # no longer 2:4: the exact dense product, with a warning
        with pytest.warns(NotServedSparseWarning, match=r"no longer 2:4 \(weight is not 2:4 sparse: 100\.0%"):
            assert torch.equal(compiled(x), model(x))
        assert spy.take() == 0 and _entry(w).packed is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once per change, not per call
            assert torch.equal(compiled(x), model(x))
        w.copy_(prune_24(torch.randn_like(w)))  # 2:4 again: re-packed and served sparse
        assert _rel(compiled(x), model(x)) < 1e-5 and spy.take() == 1
        assert torch.equal(_entry(w).packed[1], S24.pack_24(w)[1])
        w.add_(1.0)
        with pytest.warns(NotServedSparseWarning):
            compiled(x)


@pytest.mark.parametrize("scheme", ["2:4", "2:4+int8"])
def test_dense_fallback_keeps_the_gradient_exact(kernel_path, scheme):
    """QLoRA-like: frozen weights, gradient of the input, through either form."""
    model = Small().train().requires_grad_(False)
    compiled = _compile(model, sparsity=scheme)
    x = torch.randn(3, 32, requires_grad=True)
    compiled(x).sum().backward()  # compiled, served sparse
    assert backend.last_report.counts == {S24_OPS[scheme]: 1}
    with torch.no_grad():
        model.a.weight.add_(torch.rand_like(model.a.weight))  # dense now
    x.grad = None
    with pytest.warns(NotServedSparseWarning):
        y = compiled(x)
    y.sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = model(x_ref)
    y_ref.sum().backward()
    assert torch.equal(y, y_ref)
    assert _rel(x.grad, x_ref.grad) < 1e-6


S24_OPS = {"2:4": "sparse24_linear", "2:4+int8": "sparse24_int8_linear"}


def test_weight_written_in_the_forward_is_left_dense(kernel_path):
    class Writes(Small):
        def forward(self, x):
            self.a.weight.mul_(1.0)  # written by the graph: re-checked every call for nothing
            return super().forward(x)

    model = Writes().eval()
    x = torch.randn(3, 32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        out = _compile(model, sparsity="2:4")(x)
        assert torch.equal(out, model(x))
    rep = backend.last_report
    assert not rep.counts
    assert any("written in the graph (`mul_`" in n.reason for n in rep.near_misses), rep.near_misses


def _pruned_model():
    """A small model pruned to 2:4 the torch.nn.utils.prune way: weight_orig * weight_mask, which
    leaves -0.0 wherever a negative weight was dropped."""
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 48), nn.SiLU(),
                          nn.Linear(48, 16, bias=False)).eval()
    for lin in model[0], model[2], model[4]:
        N, K = lin.weight.shape
        mask = (torch.rand(N, K // 4, 4).argsort(-1) < 2).reshape(N, K).float()
        prune.custom_from_mask(lin, "weight", mask)
    return model


def test_torch_prune_weights_are_served_sparse(kernel_path):
    model = _pruned_model()
    x = torch.randn(5, 32)
    # Reparametrized (weight computed by a forward pre-hook): left alone, with a hint.
    with torch.no_grad():
        out = _compile(model, sparsity="2:4")(x)
        assert torch.equal(out, model(x))
    misses = [n.reason for n in backend.last_report.near_misses]
    assert sorted(m.split(" from ")[1].split(",")[0] for m in misses) == [f"{i}.weight_orig" for i in (0, 2, 4)]
    assert all("prune.remove(module, 'weight')" in m for m in misses), misses
    for lin in model[0], model[2], model[4]:
        prune.remove(lin, "weight")
    assert all(torch.signbit(m.weight[m.weight == 0]).any() for m in (model[0], model[2], model[4]))
    ref64 = copy.deepcopy(model).double()
    for scheme in ("2:4", "2:4+int8"):
        torch._dynamo.reset()
        with torch.no_grad():
            out = _compile(model, sparsity=scheme)(x)
            ref = ref64(x.double())
        assert backend.last_report.counts == {S24_OPS[scheme]: 3}, backend.last_report.near_misses
        if scheme == "2:4":
            assert _rel(out, ref) < 1e-5
        else:  # == int8 of the 2:4 weight
            q = copy.deepcopy(model)
            ligerfx.quantize_(q, "int8")
            with torch.no_grad():
                assert _rel(out, q(x)) < 1e-5 and _rel(out, ref) < 2e-2


def test_minus_zero_weights_change_only_the_sign_of_exact_zero_outputs(kernel_path):
    """The one difference counting -0.0 as zero makes: a dropped -0.0 weight times x is a zero
    either way, and a zero added to a non-zero sum leaves it unchanged; only an output that is
    exactly zero can come out with the other sign."""
    lin = nn.Linear(32, 24, bias=False).eval()
    mask = (torch.rand(24, 8, 4).argsort(-1) < 2).reshape(24, 32).float()
    with torch.no_grad():
        w = lin.weight.abs() * mask  # all kept weights positive, the pruned ones +0.0 ...
        w[0] = -w[0] * 0.0  # ... a fully pruned output channel whose zeros are all -0.0
        w[1:] = torch.where(mask[1:] > 0, lin.weight[1:], -lin.weight[1:].abs() * 0.0)
        lin.weight.copy_(w)
    x = torch.rand(6, 32) + 0.5  # positive: the products of row 0 are all -0.0
    served = S24.unpack_24(*S24.pack_24(w))  # what the compressed form multiplies by
    assert torch.equal(served, w) and not torch.equal(torch.signbit(served), torch.signbit(w))
    # The arithmetic, one IEEE double sum per output in index order starting from the first
    # product: row 0 sums to -0.0 with the -0.0 weights and to +0.0 with the +0.0 ones served.
    def ordered_sum(xr, wr):
        return functools.reduce(operator.add, [a * b for a, b in zip(xr.tolist(), wr.tolist())])

    assert math.copysign(1, ordered_sum(x[0], w[0])) == -1.0
    assert math.copysign(1, ordered_sum(x[0], served[0])) == 1.0
    for r in range(6):
        for n in range(1, 24):  # every other output: the same double, bit for bit
            assert ordered_sum(x[r], w[n]) == ordered_sum(x[r], served[n]) != 0.0
    # The same on the platform's matmul: equal everywhere, sign included, but at exact zeros.
    a, b = F.linear(x, w), F.linear(x, served)
    assert torch.equal(a, b) and (a[:, 0] == 0).all()
    assert torch.equal(torch.signbit(a[:, 1:]), torch.signbit(b[:, 1:]))
    # Served compiled: the exact zeros stay exact zeros, every other output as before.
    with torch.no_grad():
        out = _compile(lin, sparsity="2:4")(x)
        ref = lin.double()(x.double())
    assert backend.last_report.counts == {"sparse24_linear": 1}
    assert torch.equal(out == 0, ref == 0) and (out[:, 0] == 0).all()
    assert not (torch.signbit(out) != torch.signbit(ref.float()))[:, 1:].any()
    assert _rel(out, ref) < 1e-5


def test_sparsity_with_quantize_serves_the_rest_quantized():
    model = Small().eval()
    x = torch.randn(3, 32)
    with torch.no_grad():
        ref = model(x)
        out = _compile(model, sparsity="2:4", quantize="int8")(x)
    rep = backend.last_report
    assert rep.counts == {"sparse24_linear": 1, "int8_linear": 1}
    assert any(n.pattern == "sparse24_linear" and "100.0% of its groups" in n.reason for n in rep.near_misses)
    assert _rel(out, ref) < 2e-2  # int8 noise on b


def test_bad_options():
    with pytest.raises(ligerfx.OptionsError, match="'2:4', '2:4\\+int8'"):
        ligerfx.Options.from_any({"sparsity": "2:8"})
    with pytest.raises(ligerfx.OptionsError, match="'sparsity'"):
        ligerfx.sparsify_(Small(), "4:8")
    opts = ligerfx.Options.from_any({"sparsity": "2:4+int8", "quantize_skip": ["b"]})
    assert opts.sparsity == "2:4+int8" and opts.quantize is None
    with pytest.raises(ligerfx.OptionsError, match="need 'quantize'"):
        ligerfx.Options.from_any({"sparsity": "2:4", "group_size": 64})
    assert ligerfx.sparsify_(Small(), skip=["a"]) == {"a": "matches skip"}


@pytest.mark.parametrize("scheme", ["2:4", "2:4+int8"])
def test_empty_sparse_linear_loads_a_state_dict(scheme):
    lin = Small().a
    src = SparseLinear.from_weight(lin.weight.detach(), lin.bias, scheme)
    dst = SparseLinear(32, 48, scheme)
    dst.load_state_dict(src.state_dict())
    x = torch.randn(4, 32)
    assert torch.equal(dst(x), src(x))
    assert _rel(src(x), lin(x)) < (1e-5 if scheme == "2:4" else 2e-2)
