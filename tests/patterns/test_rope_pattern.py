"""rope / rope_single patterns on real model code: counts, near misses, numerics, casts, shapes."""

import pytest
import torch

import ligerfx
import ligerfx.kernels.rope as rope_kernels
from ligerfx.compiler import validate
from ligerfx.tools.example_model import make_example
from tests.compare import compare_training_step, rel_err
from tests.models import HANDWRITTEN, HF_MODELS, hf_model
from tests.models.extra_styles import EXTRA_STYLES, NEAR_MISSES

ROPE = ("rope", "rope_single")
OPTS = {"patterns": list(ROPE)}
# Which form each zoo model's attention is written in (the match detail starts with it).
HF_FORMS = {"llama": "rotate_half", "mistral": "rotate_half", "qwen2": "rotate_half",
            "gemma": "rotate_half", "phi3": "partial rotate_half", "gpt_neox": "partial rotate_half",
            "stablelm": "partial rotate_half"}


def _counts(report):
    return {k: report.counts.get(k, 0) for k in ROPE}


def _explain(model, args):
    return ligerfx.explain(model, **args) if isinstance(args, dict) else ligerfx.explain(model, *args)


@pytest.mark.parametrize("name", list(HF_FORMS))
def test_hf_counts(name):
    model, inputs = hf_model(name)
    report = _explain(model, inputs)
    assert _counts(report) == {"rope": HF_MODELS[name]["counts"]["rope"], "rope_single": 0}
    assert not [m for m in report.near_misses if m.pattern in ROPE]
    assert {m.detail for m in report.matches if m.pattern == "rope"} == {
        f"{HF_FORMS[name]}, [b, h, t, d]"}


@pytest.mark.parametrize("name", ["llama", "gpt_neox"])
def test_hf_training_step_matches_eager(name, kernel_path, monkeypatch):
    # llama: rotate_half with GQA; gpt_neox: partial rotary (4 of 16 channels), fused qkv chunk
    launches = []
    orig = rope_kernels._launch

    def spy(*a, **k):
        if not validate.running():  # the program's launches, not translation validation's
            launches.append(a[-1])  # the `backward` flag
        return orig(*a, **k)

    monkeypatch.setattr(rope_kernels, "_launch", spy)
    model, inputs = hf_model(name)
    report = compare_training_step(model, inputs, options=OPTS)
    assert _counts(report) == {"rope": 2, "rope_single": 0}
    if kernel_path == "triton":  # the interpreter really ran the kernels, both directions
        assert launches.count(False) == 2 and launches.count(True) == 2, launches
    else:
        assert not launches


def test_llama_ref_complex_form(kernel_path):
    model, args, counts = HANDWRITTEN["llama_ref"]()
    report = compare_training_step(model, args, options=OPTS)
    assert _counts(report) == {"rope": counts["rope"], "rope_single": 0}
    assert {m.detail for m in report.matches} == {"complex, [b, t, h, d]"}


def test_cohere_interleaved_pairs(kernel_path):
    # Cohere rotates interleaved pairs with repeat_interleave'd tables: the kernel's interleaved
    # mode, once check proves each pair of cos/sin holds one angle
    from ligerfx.dump.hf_targets import build

    model, _, inputs = build("cohere")
    report = compare_training_step(model, inputs, options=OPTS)
    assert _counts(report) == {"rope": 2, "rope_single": 0}
    assert {m.detail for m in report.matches} == {"pairs, [b, h, t, d]"}


def test_example_model_counts():
    model, ids, labels = make_example()
    report = ligerfx.explain(model, ids, labels)
    assert _counts(report) == {"rope": model.cfg.n_layers, "rope_single": 0}


@pytest.mark.parametrize("name", ["rope_posids_bthd", "rope_gptj", "rope_q_only",
                                  "rope_diff_tables"])
def test_extra_styles(name, kernel_path):
    # [b, t, d] tables from position ids in [b, t, h, d]; GPT-J's partial interleaved pairs; only
    # q rotated; q and k with different tables (each rotated alone)
    model, args, counts = EXTRA_STYLES[name]()
    report = compare_training_step(model, args, options=OPTS)
    assert _counts(report) == {k: counts.get(k, 0) for k in ROPE}
    assert not report.near_misses
    assert all(("alone" in m.detail) == (m.pattern == "rope_single") for m in report.matches)


@pytest.mark.parametrize("name", [n for n in NEAR_MISSES if n.startswith("rope")])
def test_near_misses(name):
    model, args, counts = EXTRA_STYLES[name]()
    report = _explain(model, args)
    assert _counts(report) == {"rope": 0, "rope_single": 0}
    pattern, reason = NEAR_MISSES[name]
    reasons = [m.reason for m in report.near_misses if m.pattern == pattern]
    assert reasons and all(reason in r for r in reasons), reasons
    compare_training_step(model, args, options=OPTS)  # what is left is still the same model


def test_many_layers_pair_each_layer_once():
    # q and k of one layer share cos/sin with every other layer's: the multi-output search must
    # pair them within their layer, without trying (and reporting) cross-layer pairs.
    model, inputs = hf_model("llama", num_hidden_layers=6)
    report = _explain(model, inputs)
    assert _counts(report) == {"rope": 6, "rope_single": 0}
    assert not report.near_misses


def _rope_fn(cast_back: bool):
    def fn(q, k, cos, sin):
        c, s = cos[None, None], sin[None, None]  # fp32 tables, bf16 q/k: eager promotes to fp32
        h = q.shape[-1] // 2
        q2 = q * c + torch.cat((-q[..., h:], q[..., :h]), dim=-1) * s
        k2 = k * c + torch.cat((-k[..., h:], k[..., :h]), dim=-1) * s
        return (q2.to(q.dtype), k2.to(k.dtype)) if cast_back else (q2, k2)
    return fn


@pytest.mark.parametrize("cast_back", [False, True])
def test_mixed_dtypes_are_reproduced(cast_back, torch_path):
    # bf16 q/k with fp32 tables: the product is fp32 (q upcast exactly); with a cast back the
    # kernel takes bf16 q directly.  Either way outputs and gradients match eager closely.
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 8, 16, generator=gen).bfloat16().requires_grad_()
    k = torch.randn(2, 2, 8, 16, generator=gen).bfloat16().requires_grad_()
    t = torch.arange(8.0)[:, None] * torch.rand(16, generator=gen)
    cos, sin = t.cos(), t.sin()
    fn = _rope_fn(cast_back)
    report = ligerfx.explain(fn, q, k, cos, sin)
    assert report.counts.get("rope") == 1, (report.counts, report.near_misses)
    detail = report.matches[0].detail
    assert ("fp32 math, bfloat16 in/out" in detail) == cast_back, detail
    compiled = torch.compile(fn, backend="liger", options={"inner": "aot_eager", **OPTS})
    out, ref = compiled(q, k, cos, sin), fn(q, k, cos, sin)
    cot = [torch.randn(o.shape, generator=gen).to(o.dtype) for o in ref]
    g = torch.autograd.grad(out, (q, k), cot)
    g_ref = torch.autograd.grad(ref, (q, k), cot)
    for a, b in zip(out + g, ref + g_ref):
        assert a.dtype == b.dtype
        assert rel_err(a, b) < (1e-6 if a.dtype == torch.float32 else 4e-3)


def test_cast_inside_rotation_is_a_near_miss():
    def fn(q, k, cos, sin):
        c, s = cos[None, None], sin[None, None]
        h = q.shape[-1] // 2
        rot = [(x * c).to(torch.bfloat16) + torch.cat((-x[..., h:], x[..., :h]), dim=-1) * s
               for x in (q, k)]
        return rot[0], rot[1]

    q, k = torch.randn(2, 4, 8, 16), torch.randn(2, 2, 8, 16)
    cos, sin = torch.randn(8, 16), torch.randn(8, 16)
    report = ligerfx.explain(fn, q, k, cos, sin)
    assert not report.counts.get("rope") and not report.counts.get("rope_single")
    assert any("casts inside the rotation" in m.reason for m in report.near_misses)


@pytest.mark.parametrize("name,detail", [
    ("rope_posids_bthd", "rotate_half, [b, t, h, d]; fp32 math, bfloat16 in/out"),
    ("llama_ref", "complex, [b, t, h, d]; fp32 math, bfloat16 in/out")])
def test_bf16_upcast_inside_rotation(name, detail, torch_path):
    # `q.float() ... .to(q.dtype)` (Qwen2-VL) and `view_as_complex(q.float() ...).type_as(q)`
    # (Llama reference) in a bf16 model: the kernel's own fp32 math on the bf16 tensors
    model, args, _ = (EXTRA_STYLES.get(name) or HANDWRITTEN[name])()
    model = model.to(torch.bfloat16)
    report = _explain(model, args)
    assert {m.detail for m in report.matches if m.pattern == "rope"} == {detail}
    compiled = torch.compile(model, backend="liger", options={"inner": "aot_eager", **OPTS})
    assert rel_err(compiled(*args).detach(), model(*args).detach()) < 1e-5


def _graphs_compiled(model, calls, backend, **kw) -> int:
    torch._dynamo.reset()
    n = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = torch.compile(model, backend=backend, dynamic=True, **kw)
    for args in calls:
        out, ref = compiled(*args), model(*args)
        assert rel_err(out.detach(), ref.detach()) < 1e-5
    return torch._dynamo.utils.counters["stats"]["unique_graphs"] - n


def test_dynamic_sequence_length_no_extra_recompile(torch_path):
    # Shape facts are proved symbolically (no guards), so new sequence lengths recompile no more
    # often than without the rewrite.
    model, ids, labels = make_example()
    calls = [(ids[:, :t].contiguous(), labels[:, :t].contiguous()) for t in (32, 20, 13)]
    liger = _graphs_compiled(model, calls, "liger", options={"inner": "eager", **OPTS})
    assert ligerfx.backend.last_report.counts.get("rope") == 2
    assert liger == _graphs_compiled(model, calls, "eager")
