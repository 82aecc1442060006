"""Attention layers whose q and k each repeat the table expression (issue 10 §5).

`llama4`: the complex form as Hugging Face Llama 4 writes it, `xq_ * freqs_cis[:, :, None, :]` and
`xk_ * freqs_cis[:, :, None, :]` (two indexing nodes of one table).
`deepseek`: DeepSeek-V4's layout: one rotary function called per tensor, `cos.repeat_interleave(2,
-1)` inside it, interleaved pairs rotated on the *trailing* channels of each head and concatenated
back, and q's concatenation done before k's projection exists.
Each `make_*` returns (model, args, expected counts): one `rope` per layer, nothing rotated alone.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

DIM, HEADS, KV_HEADS, HEAD_DIM, ROT = 32, 4, 2, 8, 4
LAYERS, BATCH, SEQ = 2, 2, 6


def _angles(t: int, rot: int) -> torch.Tensor:
    inv = 1.0 / 10000.0 ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot)
    return torch.arange(t, dtype=torch.float32)[:, None] * inv[None]  # [t, rot / 2]


class _Llama4Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.wq = nn.Linear(DIM, HEADS * HEAD_DIM, bias=False)
        self.wk = nn.Linear(DIM, KV_HEADS * HEAD_DIM, bias=False)
        self.wo = nn.Linear(HEADS * HEAD_DIM, DIM, bias=False)

    def forward(self, x, freqs_cis):
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, HEADS, HEAD_DIM)
        k = self.wk(x).view(b, t, KV_HEADS, HEAD_DIM)
        xq_ = torch.view_as_complex(q.float().reshape(*q.shape[:-1], -1, 2))
        xk_ = torch.view_as_complex(k.float().reshape(*k.shape[:-1], -1, 2))
        xq = torch.view_as_real(xq_ * freqs_cis[:, :, None, :]).flatten(3).type_as(q)
        xk = torch.view_as_real(xk_ * freqs_cis[:, :, None, :]).flatten(3).type_as(k)
        kk = xk.transpose(1, 2).repeat_interleave(HEADS // KV_HEADS, dim=1)
        y = F.scaled_dot_product_attention(xq.transpose(1, 2), kk, kk, is_causal=True)
        return x + self.wo(y.transpose(1, 2).reshape(b, t, -1))


def _rotate_pairs(x):
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def _deepseek_rope(x, cos, sin):
    # called once per tensor: each call expands the half-size tables again
    cos = cos.repeat_interleave(2, dim=-1).unsqueeze(1)
    sin = sin.repeat_interleave(2, dim=-1).unsqueeze(1)
    r = cos.shape[-1]
    nope, rope = x[..., :-r], x[..., -r:]
    rotated = ((rope.float() * cos) + (_rotate_pairs(rope).float() * sin)).to(x.dtype)
    return torch.cat([nope, rotated], dim=-1)


class _DeepseekAttn(nn.Module):
    def __init__(self):
        super().__init__()
        self.wq = nn.Linear(DIM, HEADS * HEAD_DIM, bias=False)
        self.wk = nn.Linear(DIM, HEAD_DIM, bias=False)
        self.wo = nn.Linear(HEADS * HEAD_DIM, DIM, bias=False)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, HEADS, HEAD_DIM).transpose(1, 2)
        q = _deepseek_rope(q, cos, sin)  # q is finished before k's projection runs
        k = self.wk(x).view(b, t, 1, HEAD_DIM).transpose(1, 2) * 0.5
        k = _deepseek_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k.expand(-1, HEADS, -1, -1),
                                           k.expand(-1, HEADS, -1, -1), is_causal=True)
        return x + self.wo(y.transpose(1, 2).reshape(b, t, -1))


class _Stack(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layers = nn.ModuleList(layer() for _ in range(LAYERS))

    def forward(self, x, *tables):
        for layer in self.layers:
            x = layer(x, *tables)
        return x


def make_llama4(seed: int = 0):
    torch.manual_seed(seed)
    ang = _angles(SEQ, HEAD_DIM)
    freqs = torch.polar(torch.ones_like(ang), ang)[None].expand(BATCH, -1, -1)  # [b, t, d / 2]
    return _Stack(_Llama4Attn), (torch.randn(BATCH, SEQ, DIM), freqs), {"rope": LAYERS}


def make_deepseek(seed: int = 0):
    torch.manual_seed(seed)
    ang = _angles(SEQ, ROT)[None]  # [1, t, rot / 2]: one angle per pair
    return (_Stack(_DeepseekAttn), (torch.randn(BATCH, SEQ, DIM), ang.cos(), ang.sin()),
            {"rope": LAYERS})
