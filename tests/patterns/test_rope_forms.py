"""RoPE forms of current Hugging Face families (issue 13 §2): counts, eager-equal training,
bit-equal bf16, and near misses for look-alikes that are not rotations.

Families (tests/models/rope_families.py): GPT-OSS (chunked halves, half-width tables),
DeepSeek-V3 / GLM-4-MoE-Lite (even/odd lanes written as halves, on MLA's rope part), nanochat
(rotate_half by -theta), Llama 4 (complex, table indexed per tensor), DeepSeek-V4 (tables
repeat_interleave'd per tensor), Qwen2-VL / Qwen2.5-VL text models with 3-D mrope positions.
"""

import pytest
import torch
import torch.nn as nn

import ligerfx
from tests.compare import compare_training_step
from tests.models import rope_families

pytest.importorskip("transformers")

ROPE = ("rope", "rope_single")
OPTS = {"patterns": list(ROPE)}
FORMS = {"gpt_oss": "chunked halves", "deepseek_v3": "even/odd pairs to halves",
         "glm4_moe_lite": "even/odd pairs to halves",
         "nanochat": "rotate_half by -theta (sin negated)", "llama4_text": "complex",
         "deepseek_v4": "pairs", "qwen2_vl": "rotate_half", "qwen2_5_vl": "rotate_half"}


def _build(name, **kw):
    try:
        return rope_families.build(name, **kw)
    except LookupError as e:
        pytest.skip(str(e))


def _counts(report):
    return {k: report.counts.get(k, 0) for k in ROPE}


# GLM-4-MoE-Lite and Qwen2.5-VL share their rotary code with DeepSeek-V3 and Qwen2-VL
_SAME_CODE = ("glm4_moe_lite", "qwen2_5_vl")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in _SAME_CODE else n
                                  for n in rope_families.FAMILIES])
def test_family_counts(name):
    # two layers: one q/k `rope` per layer, nothing reported as a near miss
    model, inputs, expected = _build(name)
    report = ligerfx.explain(model, **inputs)
    assert _counts(report) == expected
    assert not [m for m in report.near_misses if m.pattern in ROPE], report.near_misses
    paired = {m.detail.split(",")[0] for m in report.matches if m.pattern == "rope"}
    assert paired == {FORMS[name]}, paired


# The new forms run on both paths; the rest rotate in forms the kernel tests already cover on
# both, so their family test runs the torch path here and the interpreter in the slow set.
_BOTH = ["gpt_oss", "deepseek_v3", "nanochat"]
_SLOW = pytest.mark.slow


@pytest.mark.parametrize("name", _BOTH)
def test_family_training_step(name, kernel_path):
    model, inputs, expected = _build(name, layers=1)
    report = compare_training_step(model, inputs, options=OPTS)
    assert _counts(report) == expected


@pytest.mark.parametrize("name", ["qwen2_vl", "llama4_text"])
def test_family_training_step_torch_path(name, torch_path):
    model, inputs, expected = _build(name, layers=1)
    report = compare_training_step(model, inputs, options=OPTS)
    assert _counts(report) == expected


@_SLOW
@pytest.mark.parametrize("name", ["glm4_moe_lite", "qwen2_5_vl", "deepseek_v4", "qwen2_vl",
                                  "llama4_text"])
def test_family_training_step_slow(name, kernel_path):
    model, inputs, expected = _build(name, layers=1)
    report = compare_training_step(model, inputs, options=OPTS)
    assert _counts(report) == expected


# -- hand-written forms and look-alikes ------------------------------------------------------


def _chunk(x, cos, sin, sa=-1, sb=1):
    a, b = torch.chunk(x, 2, dim=-1)
    first = a * cos - b * sin if sa < 0 else a * cos + b * sin
    second = b * cos + a * sin if sb > 0 else b * cos - a * sin
    return torch.cat((first, second), dim=-1)


def _even_odd(x, cos, sin, sa=-1, sb=1):
    a, b = x[..., 0::2], x[..., 1::2]
    first = a * cos - b * sin if sa < 0 else a * cos + b * sin
    second = b * cos + a * sin if sb > 0 else b * cos - a * sin
    return torch.cat([first, second], dim=-1)


def _rotate_half(x, cos, sin, sa=-1, sb=1):
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return x * cos + torch.cat((x2 if sa > 0 else -x2, x1 if sb > 0 else -x1), dim=-1) * sin


def _regrouped(x, cos, sin):
    # DeepSeek-V3 as older transformers wrote it: even/odd lanes regrouped by view / transpose /
    # reshape (a copy in the graph), then Hugging Face's rotate_half on full-width tables
    b, h, s, d = x.shape
    x = x.view(b, h, s, d // 2, 2).transpose(4, 3).reshape(b, h, s, d)
    return _rotate_half(x, cos, sin)


class _Rot(nn.Module):
    """q and k of one attention layer rotated by `fn`; the tables as `fn` takes them."""

    def __init__(self, fn, signs=(-1, 1), k_signs=None):
        super().__init__()
        self.fn, self.signs, self.k_signs = fn, signs, k_signs or signs
        self.wq, self.wk = nn.Linear(16, 32, bias=False), nn.Linear(16, 16, bias=False)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, 4, 8).transpose(1, 2)
        k = self.wk(x).view(b, t, 2, 8).transpose(1, 2)
        c, s = cos[:, None], sin[:, None]
        qo, ko = self.fn(q, c, s, *self.signs), self.fn(k, c, s, *self.k_signs)
        return (qo.sum(1) * ko.sum(1)).sum(-1)


def _tables(width, t=6, batch=2, dtype=torch.float32):
    ang = torch.rand(batch, t, width) * 6.0 - 3.0  # random angles: halves of a table may differ
    return ang.cos().to(dtype), ang.sin().to(dtype)


_HALF_TABLE = {_chunk: True, _even_odd: True, _rotate_half: False, _regrouped: False}


@pytest.mark.parametrize("fn,signs,detail", [
    (_chunk, (1, -1), "chunked halves by -theta"),
    (_even_odd, (1, -1), "even/odd pairs to halves by -theta"),
    (_rotate_half, (1, -1), "rotate_half by -theta"), (_regrouped, (-1, 1), "rotate_half")],
    ids=["chunk_neg", "even_odd_neg", "rotate_half_neg", "regrouped"])
def test_forms_training_step(fn, signs, detail, kernel_path):
    model = _Rot(fn, signs) if fn is not _regrouped else _Rot(lambda x, c, s, *_: fn(x, c, s))
    cos, sin = _tables(4 if _HALF_TABLE[fn] else 8)
    report = compare_training_step(model, (torch.randn(2, 6, 16), cos, sin), options=OPTS)
    assert _counts(report) == {"rope": 1, "rope_single": 0}
    assert report.matches[0].detail.startswith(detail), report.matches[0].detail


# (the even/odd form's kernel mode is bit-equal to eager in tests/kernels/test_rope.py)
@pytest.mark.parametrize("fn,signs", [(_chunk, (-1, 1)), (_rotate_half, (1, -1))],
                         ids=["chunk", "rotate_half_neg"])
def test_bf16_bit_equal(fn, signs, kernel_path):
    # bf16 q/k and tables: eager rounds each product and each sum, the kernel does the same
    # (round_steps), with the negated sine too: outputs and gradients bit-equal
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 6, 16, generator=gen).bfloat16().requires_grad_()
    k = torch.randn(2, 2, 6, 16, generator=gen).bfloat16().requires_grad_()
    cos, sin = _tables(8 if _HALF_TABLE[fn] else 16, dtype=torch.bfloat16)

    def f(q, k, cos, sin):
        c, s = cos[:, None], sin[:, None]
        return fn(q, c, s, *signs), fn(k, c, s, *signs)

    report = ligerfx.explain(f, q, k, cos, sin)
    assert _counts(report) == {"rope": 1, "rope_single": 0}, report.near_misses
    compiled = torch.compile(f, backend="liger", options={"inner": "aot_eager", **OPTS})
    out, ref = compiled(q, k, cos, sin), f(q, k, cos, sin)
    cot = [torch.randn(o.shape, generator=gen).bfloat16() for o in ref]
    grads = torch.autograd.grad(out, (q, k), cot)
    grads_ref = torch.autograd.grad(ref, (q, k), cot)
    for a, b in zip(out + grads, ref + grads_ref):
        assert torch.equal(a, b)


def test_q_and_k_with_opposite_angles_each_alone():
    # q rotated by +theta, k by -theta: not one launch (the signs differ), each rewritten alone
    model = _Rot(_rotate_half, (-1, 1), (1, -1))
    cos, sin = _tables(8)
    report = compare_training_step(model, (torch.randn(2, 6, 16), cos, sin), options=OPTS)
    assert _counts(report) == {"rope": 0, "rope_single": 2}
    assert sorted(m.detail.split(",")[0] for m in report.matches) == [
        "rotate_half alone", "rotate_half by -theta (sin negated) alone"]


@pytest.mark.parametrize("fn,signs,width,reason", [
    (_chunk, (1, 1), 4, "not a rotation"), (_chunk, (-1, -1), 4, "not a rotation"),
    (_even_odd, (1, 1), 4, "not a rotation"),
    (_rotate_half, (1, 1), 8, "not a rotation"), (_rotate_half, (-1, -1), 8, "not a rotation"),
    (_chunk, (-1, 1), 1, "not one angle per rotated pair"),
    (_even_odd, (-1, 1), 1, "not one angle per rotated pair")],
    ids=["chunk_pp", "chunk_mm", "even_odd_pp", "rotate_half_pp", "rotate_half_mm",
         "chunk_width1", "even_odd_width1"])
def test_look_alikes_are_near_misses(fn, signs, width, reason):
    # the same sign on both sine terms ([[c, s], [s, c]]: not a rotation) or tables of one value
    # per position broadcast over the channels: left alone, the near miss says why
    model = _Rot(fn, signs)
    cos, sin = _tables(width)
    args = (torch.randn(2, 6, 16), cos, sin)
    report = ligerfx.explain(model, *args)
    assert _counts(report) == {"rope": 0, "rope_single": 0}
    reasons = [m.reason for m in report.near_misses if m.pattern in ROPE]
    assert reasons and all(reason in r for r in reasons), reasons
    compare_training_step(model, args, options=OPTS)  # what is left is still the same model


# -- DeepSeek-V4's compressed attention: which rotations share their angles --------------------
# (tests/models/compressed_attention.py) "own" is DeepSeek-V4: q and kv paired, the compressor's
# and the indexer's rotations alone (rotary buffers of their own, other positions); "shared":
# the indexer's window keys at the positions the compressor computes again from the same rotary
# module, one launch with the compressor's; "shifted": that module at other positions, alone.


def _compressed(rotary, layers=1):
    from tests.models import compressed_attention

    return compressed_attention.make(rotary, layers=layers)


def _check_compressed(report, expected):
    assert _counts(report) == expected
    assert not report.near_misses, [str(m) for m in report.near_misses]
    singles = [m.detail for m in report.matches if m.pattern == "rope_single"]
    assert singles and all("not paired" in d for d in singles), singles


def test_compressed_attention_training_step(kernel_path):
    model, args, expected = _compressed("own")
    _check_compressed(compare_training_step(model, args, options=OPTS), expected)


def test_compressed_attention_pairs_recomputed_tables(torch_path):
    # a pairing across two modules (the compressor's output is used before the indexer's keys
    # exist): eager-equal; the interpreter runs the same kernel calls in the test above
    model, args, expected = _compressed("shared")
    _check_compressed(compare_training_step(model, args, options=OPTS), expected)


@pytest.mark.parametrize("rotary", ["own", "shifted"])
def test_compressed_attention_other_angles_alone(rotary):
    # value-equal buffers of two modules, or one module at other positions: not one launch
    model, args, expected = _compressed(rotary, layers=2)
    _check_compressed(ligerfx.explain(model, *args), expected)
