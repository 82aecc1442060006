"""The quantization pass and `ligerfx.quantize_` end to end on tiny models (CPU)."""

import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ligerfx
from ligerfx import backend
from ligerfx.compress.quantize import QuantizedLinear
from tests.models import hf_model

# Logits error max|diff| / max|ref| against fp32 eager, measured (docs/quantization.md): int8
# 5e-4 (gemma) to 1.0e-2 (llama), int4 group 32: 9e-3 (gemma) to 1.2e-1 (qwen2).  It is the
# quantization noise of random Gaussian weights (int8 per-channel: ~0.8% rms per layer; int4: ~9%),
# not the kernels: compiled vs the eager dequantized reference agree to ~1e-6.
BOUND = {"int8": 2e-2, "int4": 2.5e-1}


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _llama_with_ref():
    """The tiny HF llama (eval), its inputs, the fp32 bytes of its linears but the lm head, and
    its fp32 eager logits."""
    model, inputs = hf_model("llama")
    model.eval()
    lin_bytes = sum(m.weight.numel() * 4 for n, m in model.named_modules()
                    if isinstance(m, nn.Linear) and n != "lm_head")
    with torch.no_grad():
        ref = model(input_ids=inputs["input_ids"]).logits
    return model, inputs, lin_bytes, ref


def _reload_matches(model, scheme, ids, eager, **kw):
    """A fresh llama quantized the same way and loaded with model's state dict gives the same
    logits, bit for bit.  Returns it."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    fresh, _ = hf_model("llama")
    fresh.eval()
    ligerfx.quantize_(fresh, scheme, **kw)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, eager)
    return fresh


class Tiny(nn.Module):
    """Hand-written LM: tied-free lm head named `output`, a tiny layer and a K=96 layer."""

    def __init__(self, vocab=100, dim=64):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.up = nn.Linear(dim, 128)
        self.down = nn.Linear(128, dim, bias=False)
        self.odd = nn.Linear(dim, 96)  # K=96 next: int4 group 64 cannot serve `back`
        self.back = nn.Linear(96, dim)
        self.gate = nn.Linear(dim, 8)  # too small
        self.norm = nn.LayerNorm(dim)
        self.output = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        h = self.tok(ids)
        h = h + self.down(F.silu(self.up(h)))
        h = h + self.back(F.gelu(self.odd(h))) * torch.sigmoid(self.gate(h)).mean(-1, keepdim=True)
        return self.output(self.norm(h))


def _compile(model, **opts):
    return torch.compile(model, backend="liger", options={"inner": "aot_eager", **opts})


@pytest.mark.parametrize("scheme,extra", [("int8", {}), ("int4", {"group_size": 64})])
def test_tiny_counts_near_misses_and_error(scheme, extra):
    model = Tiny().eval()
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        ref = model(ids)
        out = _compile(model, quantize=scheme, **extra)(ids)
    rep = backend.last_report
    name = f"{scheme}_linear"
    served = 4  # up, down, odd, back (int4: back has K=96, two groups of 64 and 32)
    assert rep.counts.get(name) == served
    reasons = " | ".join(n.reason for n in rep.near_misses if n.pattern == name)
    assert "lm head" in reasons and "too small" in reasons
    assert _rel(out, ref) < BOUND[scheme]


def test_skip_globs_and_lm_head_option():
    model = Tiny().eval()
    ids = torch.randint(0, 100, (1, 5))
    with torch.no_grad():
        _compile(model, quantize="int8", quantize_skip=["u*", "down"], quantize_lm_head=True)(ids)
    rep = backend.last_report
    assert rep.counts["int8_linear"] == 3  # odd, back, output
    assert sum("quantize_skip" in n.reason for n in rep.near_misses) == 2


def test_grad_needed_is_a_near_miss_and_frozen_is_quantized():
    model = Tiny()
    ids = torch.randint(0, 100, (2, 8))
    _compile(model, quantize="int8")(ids).sum().backward()
    rep = backend.last_report
    assert "int8_linear" not in rep.counts
    assert any("requires_grad_(False)" in n.reason and "torch.no_grad()" in n.reason
               for n in rep.near_misses)


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma"])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_hf_inference(name, scheme):
    model, inputs = hf_model(name)
    model.eval()
    cfg = model.config
    with torch.no_grad():
        ref = model(input_ids=inputs["input_ids"]).logits
        out = _compile(model, quantize=scheme, group_size=32 if scheme == "int4" else 128)(
            input_ids=inputs["input_ids"]).logits
    rep = backend.last_report
    L = cfg.num_hidden_layers
    assert rep.counts.get(f"{scheme}_linear") == 7 * L  # q k v o gate up down; lm head skipped
    assert any("lm head" in n.reason for n in rep.near_misses)
    assert _rel(out, ref) < BOUND[scheme]


def test_qlora_style_grads_through_frozen_weights(kernel_path):
    model, inputs = hf_model("llama")
    for n, p in model.named_parameters():
        p.requires_grad_("norm" in n)  # trainable norms, frozen base
    ref_model = copy.deepcopy(model)
    ligerfx.quantize_(ref_model, "int8")  # same quantized weights, eager reference path
    compiled = _compile(model, quantize="int8")
    loss = compiled(**inputs).loss
    loss.backward()
    assert backend.last_report.counts.get("int8_linear") == 14
    ref_model(**inputs).loss.backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        if p.requires_grad:
            assert _rel(p.grad, q.grad) < 1e-3, n


def test_in_place_change_requantizes():
    model = Tiny().eval()
    ids = torch.randint(0, 100, (2, 6))
    compiled = _compile(model, quantize="int8")
    with torch.no_grad():
        compiled(ids)
        model.up.weight.mul_(-2.0)  # in place: same storage, new version
        ref = model(ids)
        out = compiled(ids)
        assert _rel(out, ref) < BOUND["int8"]
        model.load_state_dict(Tiny().state_dict())  # copy_ into the parameters
        assert _rel(compiled(ids), model(ids)) < BOUND["int8"]


@pytest.mark.parametrize("scheme,gs,ratio", [("int8", 128, 0.27), ("int4", 32, 0.2)])
def test_quantize_eager_state_dict_and_compile(scheme, gs, ratio):
    model, inputs, lin_bytes, ref = _llama_with_ref()
    ids = inputs["input_ids"]
    skipped = ligerfx.quantize_(model, scheme, group_size=gs)
    assert list(skipped) == ["lm_head"]
    qbytes = sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, QuantizedLinear)
                 for b in m.buffers())
    assert qbytes <= ratio * lin_bytes
    assert not any(isinstance(m, nn.Linear) for n, m in model.named_modules() if n != "lm_head")
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        assert _rel(eager, ref) < BOUND[scheme]
        compiled = _compile(model)(input_ids=ids).logits
    assert backend.last_report.counts.get(f"{scheme}_linear") == 14
    assert _rel(compiled, eager) < 1e-5
    _reload_matches(model, scheme, ids, eager, group_size=gs)


def test_bad_options():
    with pytest.raises(ligerfx.OptionsError, match="int8, int4, fp8"):
        ligerfx.quantize_(Tiny(), "int2")
    with pytest.raises(ligerfx.OptionsError, match="32, 64, 128"):
        ligerfx.Options.from_any({"quantize": "int4", "group_size": 100})
    with pytest.raises(ligerfx.OptionsError, match="need 'quantize'"):
        ligerfx.Options.from_any({"quantize_skip": ["x"]})


def test_recompile_reuses_the_weight_cache():
    """A second graph on the same parameters (decode, then prefill) looks them up in the cache."""
    model = Tiny().eval()
    compiled = _compile(model, quantize="int8")
    with torch.no_grad():
        for seq in (1, 9):
            ids = torch.randint(0, 100, (1, seq))
            assert _rel(compiled(ids), model(ids)) < BOUND["int8"]
            assert backend.last_report.counts.get("int8_linear") == 4


def test_bench_quant_smoke(tmp_path, capsys):
    """benchmarks/bench_quant.py --smoke (per-op table and e2e decode/prefill) runs in-process."""
    import json
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    "benchmarks"))
    import bench_quant

    assert bench_quant.main(["--smoke", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "FAILED" not in out, out
    recs = json.loads((tmp_path / "bench_quant.json").read_text())
    for s in ("int8", "int4", "fp8"):
        err = [r["value"] for r in recs if r["variant"] == f"{s}_liger" and r["metric"] == "rel_l2_vs_bf16"]
        assert err and max(err) < {"int8": 2e-2, "int4": 0.2, "fp8": 0.1}[s]
        for phase in ("decode", "prefill"):
            assert [r for r in recs if r["benchmark"] == "quant_e2e" and r["variant"] == f"{s}_liger"
                    and r["shape"] == phase and r["metric"] == "tokens_per_s" and r["value"] > 0]
    # 2:4 schemes: error against F.linear with the same pruned weight (lossless; +int8: int8 noise)
    for v, bound in (("sparse24_liger", 1e-5), ("sparse24_int8_liger", 2e-2)):
        err = [r["value"] for r in recs if r["variant"] == v and r["metric"] == "rel_l2_vs_bf16"]
        assert err and max(err) < bound, (v, err)
    assert [r for r in recs if r["benchmark"] == "quant_e2e" and r["variant"] == "sparse24_liger"
            and r["metric"] == "tokens_per_s" and r["value"] > 0]
