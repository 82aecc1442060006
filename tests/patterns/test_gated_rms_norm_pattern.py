"""gated_rms_norm pattern: every rms_norm spelling times silu(gate) counted and eager-equal, the
Qwen3-Next form bit-equal in bf16, look-alikes refused with a reason (the norm alone then still
rewritten), transformers' Qwen3-Next; and Llama 4's weightless q/k L2 norms still counted."""

import pytest
import torch
import torch.nn.functional as F

import ligerfx
from tests.compare import compare_training_step, rel_err
from tests.models.act_norm import GATED_NORMS, GatedNormBlock, Qwen3NextGatedNorm
from tests.models.hf import tiny_causal_lm

OPTS = {"patterns": ["gated_rms_norm", "rms_norm"]}


def _norm_counts(report):
    return {k: v for k, v in report.counts.items() if k in ("gated_rms_norm", "rms_norm")}


@pytest.mark.parametrize("style", list(GATED_NORMS))
def test_styles_train_like_eager(style, monkeypatch):
    # the interpreted kernel on the Qwen3-Next form, torch elsewhere (tests/kernels covers both)
    monkeypatch.setenv("TRITON_INTERPRET", "1" if style == "qwen3_next" else "0")
    model, args, counts = GATED_NORMS[style]()
    report = compare_training_step(model, args, options=OPTS)
    assert _norm_counts(report) == counts
    assert not report.near_misses, [str(m) for m in report.near_misses]


def test_every_rms_norm_spelling_is_a_variant():
    from ligerfx.compiler.pattern import REGISTRY
    from ligerfx.testing import check_pattern

    n = len(REGISTRY.get("rms_norm").rewritable)
    assert n < len(REGISTRY.get("rms_norm").variants)  # the L2 look-alike is left out
    # each with F.silu(gate) and with silu written out as gate * sigmoid(gate)
    assert len(REGISTRY.get("gated_rms_norm").variants) == 2 * n
    assert check_pattern("gated_rms_norm") == 4 * n


def test_qwen3_next_bf16_bit_equal(kernel_path):
    torch.manual_seed(0)
    norm = Qwen3NextGatedNorm(64).bfloat16()
    x = torch.randn(2, 5, 64).bfloat16().requires_grad_()
    z = (2 * torch.randn(2, 5, 64)).bfloat16().requires_grad_()
    compiled = torch.compile(norm, backend="liger", options={"inner": "aot_eager", **OPTS})
    out, ref = compiled(x, z), norm(x, z)
    (m,) = ligerfx.backend.last_report.matches
    assert m.pattern == "gated_rms_norm" and m.detail == "llama casting, gate float32, product float32"
    assert out.dtype == ref.dtype and torch.equal(out, ref)
    cot = torch.randn(ref.shape).bfloat16()
    got = torch.autograd.grad(out, (x, z, norm.weight), cot)
    want = torch.autograd.grad(ref, (x, z, norm.weight), cot)
    assert torch.equal(got[1], want[1])  # the gate's gradient: every rounding eager's
    for a, b in zip(got, want):  # the norm's: as close as liger::rms_norm's backward
        assert a.dtype == b.dtype and rel_err(a, b) < 1e-2


def test_bf16_block_trains_like_eager():
    # the whole block in bf16 (weights too): no further from fp32 than eager bf16
    ref32 = GatedNormBlock("qwen3_next")
    model = GatedNormBlock("qwen3_next")
    model.load_state_dict(ref32.state_dict())
    model.bfloat16()
    h = torch.randn(2, 5, 32)
    compiled = torch.compile(model, backend="liger", options={"inner": "aot_eager", **OPTS})
    import copy

    eager = copy.deepcopy(model)
    for m in (compiled, eager, ref32):
        m(h.to(next(m.parameters()).dtype)).backward()
    assert ligerfx.backend.last_report.counts.get("gated_rms_norm") == 1
    for (n, p32), pe, pc in zip(ref32.named_parameters(), eager.parameters(), model.parameters()):
        e_err, c_err = rel_err(pe.grad, p32.grad), rel_err(pc.grad, p32.grad)
        assert c_err <= 2 * e_err + 1e-3, (n, c_err, e_err)


def _broadcast_gate(x, w, z):
    return F.rms_norm(x, (x.shape[-1],), w, 1e-6) * F.silu(z[..., :1])


def _rounded_gate(x, w, z):
    # silu in fp32, rounded to bf16 before an fp32 product: the kernel multiplies silu's value
    return F.rms_norm(x, (x.shape[-1],), w, 1e-6) * F.silu(z.float()).bfloat16().float()


def _norm_escapes(x, w, z):
    h = F.rms_norm(x, (x.shape[-1],), w, 1e-6)
    return h * F.silu(z), h


def _half_statistic(x, w, z):
    # the statistic in fp16: refused by the rms_norm rules, for the gated pattern too
    n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    return n * w * F.silu(z)


LOOK_ALIKES = [
    (_broadcast_gate, torch.float32, "the gate broadcasts", 1),
    (_rounded_gate, torch.float32, "silu(gate) is cast float32 -> bfloat16", 1),
    (_norm_escapes, torch.float32, "also used by", 1),
    (_half_statistic, torch.float16, "the norm: the RMS statistic is computed in float16", 0),
]


@pytest.mark.parametrize("fn,dtype,reason,norms", LOOK_ALIKES, ids=[f[0].__name__ for f in LOOK_ALIKES])
def test_look_alikes_say_why(fn, dtype, reason, norms):
    x, z = torch.randn(2, 3, 16, dtype=dtype), torch.randn(2, 3, 16, dtype=dtype)
    w = torch.randn(16, dtype=dtype)
    report = ligerfx.explain(fn, x, w, z)
    assert "gated_rms_norm" not in report.counts
    reasons = [m.reason for m in report.near_misses if m.pattern == "gated_rms_norm"]
    assert reasons and any(reason in r for r in reasons), reasons
    assert report.counts.get("rms_norm", 0) == norms  # the norm alone, where it is one




def test_qwen3_next(triton_path):
    # Qwen3-Next (and Qwen3.5) fail in AOTAutograd's backward without ligerfx too ("view size is
    # not compatible"), so the training step runs with inner="eager" (Dynamo's graph run as is).
    model, inputs = tiny_causal_lm(
        "qwen3_next", num_hidden_layers=1, layer_types=["linear_attention"], num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
        linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
        linear_value_head_dim=16)
    report = compare_training_step(model, inputs, options={"inner": "eager"})
    assert report.counts.get("gated_rms_norm") == 1  # one per linear-attention layer
    # (the linear attention's L2-normalised q/k is a look-alike with its own near miss)
    assert not [m for m in report.near_misses if m.pattern in ("gated_rms_norm", "rms_norm")
                and "L2 normalisation" not in m.reason]


def test_llama4_weightless_qk_norms_counted():
    # Llama 4's q/k norm is an L2 norm without a weight (`x * rsqrt(mean(x^2) + eps)`): found by
    # rms_norm as "no weight", one for q and one for k, next to the two decoder norms and the final
    model, inputs = tiny_causal_lm("llama4_text", num_hidden_layers=1)
    assert model.config.use_qk_norm
    report = ligerfx.explain(model, **inputs)
    norms = [m for m in report.matches if m.pattern in ("rms_norm", "add_rms_norm")]
    assert len(norms) == 5  # (the two after a residual add are add_rms_norm)
    assert sum(m.detail == "no weight" for m in norms) == 2
    assert not [m for m in report.near_misses if m.pattern == "rms_norm"]
