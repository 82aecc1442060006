"""2:4 sparsity end to end on tiny models (CPU): the compile pass, `ligerfx.sparsify_`, options."""

import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ligerfx
from ligerfx import backend
from ligerfx.kernels.sparse24_matmul import broken_fraction, prune_24
from ligerfx.compress.sparsify import SparseLinear
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


def test_in_place_change_is_rechecked():
    model = Small().eval()
    x = torch.randn(3, 32)
    compiled = _compile(model, sparsity="2:4")
    with torch.no_grad():
        assert _rel(compiled(x), model(x)) < 1e-5
        assert backend.last_report.counts == {"sparse24_linear": 1}
        model.a.weight.mul_(3.0)  # still 2:4: re-compressed, the new values are served
        assert _rel(compiled(x), model(x)) < 1e-5
        model.a.weight.mul_(-1.0)  # pruned +0.0 become -0.0, which the format keeps
        with pytest.raises(ValueError, match=r"only 0\.0% break.*w\[w == 0\] = 0\.0.*no longer is 2:4"):
            compiled(x)
        model.a.weight[model.a.weight == 0] = 0.0  # as the message says: 2:4 again
        assert _rel(compiled(x), model(x)) < 1e-5
        model.a.weight.add_(1.0)  # no longer 2:4: a clear error, never a stale or wrong answer
        with pytest.raises(ValueError, match="no longer is 2:4"):
            compiled(x)


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
