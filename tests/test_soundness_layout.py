"""Replacements are drop-in: each output has the shape, dtype, device and strides of the value it
replaces (restored by the rewriter when the fused op lays it out differently), so later code that
`.view`s it runs as in eager; the `liger::` ops' fake impls promise the strides the ops return."""

import pytest
import torch
import torch.nn as nn

from ligerfx.graph import layout
from ligerfx.dump.hf_targets import small_config_kwargs
from tests.compare import compare_training_step


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class RopeThenView(nn.Module):
    """q/k projected in [b, t, h, d] memory, rotated as [b, h, t, d], made contiguous and viewed as
    [b*h, t, d] (GPT-NeoX-Japanese's attention): the rotation's output must be row-major."""

    def __init__(self, d=32, heads=2):
        super().__init__()
        self.heads, self.hd = heads, d // heads
        self.qk = nn.Linear(d, 2 * d)
        t = torch.arange(8.0)[:, None] * torch.rand(self.hd // 2)
        t = torch.cat((t, t), -1)
        self.register_buffer("cos", t.cos())
        self.register_buffer("sin", t.sin())

    def forward(self, x):
        b, t, _ = x.shape
        q, k = self.qk(x).view(b, t, 2 * self.heads, self.hd).transpose(1, 2).chunk(2, dim=1)
        cos, sin = self.cos[:t], self.sin[:t]
        q = (q * cos + _rotate_half(q) * sin).contiguous()
        k = (k * cos + _rotate_half(k) * sin).contiguous()
        s = torch.bmm(q.view(b * self.heads, t, self.hd), k.view(b * self.heads, t, self.hd).mT)
        return s.float().pow(2).mean()


class NormThenTransposedView(nn.Module):
    """An RMSNorm computed on a transposed value (eager keeps the input's [t, b] memory order),
    transposed back and viewed flat: the view needs the norm's output in eager's layout."""

    def __init__(self, d=32):
        super().__init__()
        self.w = nn.Parameter(torch.rand(d) + 0.5)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        h = self.proj(x).transpose(0, 1)  # [t, b, d], b-major in memory
        y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.w
        return y.transpose(0, 1).view(-1).pow(2).mean()


@pytest.mark.parametrize("model_cls,pattern", [(RopeThenView, "rope"),
                                               (NormThenTransposedView, "rms_norm")])
def test_rewritten_value_is_viewed_later(model_cls, pattern, kernel_path):
    model = model_cls()
    report = compare_training_step(model, (torch.randn(2, 8, 32),), rtol=1e-5,
                                   options={"patterns": [pattern]})
    assert report.counts.get(pattern) == 1, (report.counts, report.near_misses)


def test_gpt_neox_japanese_runs_rewritten(torch_path):
    # The family whose attention `.view`s the rotated (contiguous) q/k: the rewrite used to hand
    # back the rotation's [b, t, h, d]-ordered output and the view raised.
    import transformers

    kw = dict(small_config_kwargs("gpt_neox_japanese"), attention_dropout=0.0, hidden_dropout=0.0,
              attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.GPTNeoXJapaneseForCausalLM(transformers.GPTNeoXJapaneseConfig(**kw))
    ids = torch.randint(0, kw["vocab_size"], (2, 16))
    report = compare_training_step(model, {"input_ids": ids, "labels": ids}, rtol=1e-5,
                                   options={"patterns": ["rope"]})
    assert report.counts.get("rope") == kw["num_hidden_layers"], report.counts


def test_restride_plan():
    base = torch.empty(2, 6, 4, 16)
    permuted = base.transpose(1, 2)  # dense, dims ordered (0, 2, 1, 3)
    assert layout.restride_plan(permuted, torch.empty(2, 4, 6, 16)) == [0, 2, 1, 3]
    assert layout.restride_plan(torch.empty(2, 4, 6, 16), permuted) == [0, 1, 2, 3]
    assert layout.restride_plan(permuted, torch.empty_like(permuted)) is None
    # size-1 dims: their stride is never read
    assert layout.restride_plan(torch.empty(3, 1, 5), torch.empty(3, 5).unsqueeze(1)) is None
    with pytest.raises(ValueError, match="not dense"):
        layout.restride_plan(torch.empty(4, 32)[:, :16], torch.empty(4, 16))
    with pytest.raises(ValueError, match="float16"):
        layout.restride_plan(torch.empty(4, 16), torch.empty(4, 16, dtype=torch.float16))


def test_fake_impls_promise_the_real_strides(kernel_path):
    from torch._subclasses.fake_tensor import FakeTensorMode

    L = torch.ops.liger
    x = torch.randn(2, 6, 4, 16).transpose(1, 2)  # [b, h, t, d] in [b, t, h, d] memory
    w, b = torch.randn(16), torch.randn(16)
    t = torch.randn(6, 8)
    cos, sin = torch.cat((t, t), -1).cos(), torch.cat((t, t), -1).sin()
    ops = {
        "rms_norm": lambda x: L.rms_norm(x, w, 1e-6, 0.0, "llama", x.dtype),
        "layer_norm": lambda x: L.layer_norm(x, w, b, 1e-5, x.dtype),
        "gated_act": lambda x: L.gated_act(x, x * 2, "silu"),
        "clamped_glu": lambda x: L.clamped_glu(x, x * 2, 1.702, None, 7.0, -7.0, 7.0, 1.0),
        "rope": lambda x: L.rope(x, x * 1, cos, sin, 2, False),
    }
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    for name, op in ops.items():
        for inp in (x, x.contiguous()):
            real = op(inp)
            with mode:
                fake = op(mode.from_tensor(inp))
            real = real if isinstance(real, tuple) else (real,)
            fake = fake if isinstance(fake, tuple) else (fake,)
            assert [r.stride() for r in real] == [f.stride() for f in fake], name
