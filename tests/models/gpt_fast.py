"""A gpt-fast-style Llama (written the way pytorch-labs/gpt-fast writes it, from memory of its
style, not its code): RMSNorm via `_norm(x.float()).type_as(x)`, fused wqkv split, RoPE on pairs
kept as a trailing dim of 2 and stacked back, SwiGLU, untied `output` head, loss on `.view(-1, V)`.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__(); self.eps = eps; self.weight = nn.Parameter(torch.ones(dim))
    def _norm(self, x):
        return x * torch.rsqrt(torch.mean(x * x, dim=-1, keepdim=True) + self.eps)
    def forward(self, x):
        output = self._norm(x.float()).type_as(x)
        return output * self.weight

def precompute_freqs_cis(seq_len, n_elem, base=10000):
    freqs = 1.0 / (base ** (torch.arange(0, n_elem, 2)[: (n_elem // 2)].float() / n_elem))
    t = torch.arange(seq_len)
    freqs = torch.outer(t, freqs)
    freqs_cis = torch.polar(torch.ones_like(freqs), freqs)
    return torch.stack([freqs_cis.real, freqs_cis.imag], dim=-1)

def apply_rotary_emb(x, freqs_cis):
    xshaped = x.float().reshape(*x.shape[:-1], -1, 2)
    freqs_cis = freqs_cis.view(1, xshaped.size(1), 1, xshaped.size(3), 2)
    x_out2 = torch.stack([
        xshaped[..., 0] * freqs_cis[..., 0] - xshaped[..., 1] * freqs_cis[..., 1],
        xshaped[..., 1] * freqs_cis[..., 0] + xshaped[..., 0] * freqs_cis[..., 1],
    ], -1)
    x_out2 = x_out2.flatten(3)
    return x_out2.type_as(x)

class Block(nn.Module):
    def __init__(s, d=64, h=4):
        super().__init__(); s.h = h; s.hd = d // h
        s.wqkv = nn.Linear(d, 3 * d, bias=False); s.wo = nn.Linear(d, d, bias=False)
        s.n1 = RMSNorm(d); s.n2 = RMSNorm(d)
        s.w1 = nn.Linear(d, 128, bias=False); s.w3 = nn.Linear(d, 128, bias=False); s.w2 = nn.Linear(128, d, bias=False)
    def forward(s, x, freqs_cis):
        b, t, d = x.shape
        q, k, v = s.wqkv(s.n1(x)).split([d, d, d], dim=-1)
        q = q.view(b, t, s.h, s.hd); k = k.view(b, t, s.h, s.hd); v = v.view(b, t, s.h, s.hd)
        q = apply_rotary_emb(q, freqs_cis); k = apply_rotary_emb(k, freqs_cis)
        q, k, v = map(lambda z: z.transpose(1, 2), (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + s.wo(y.transpose(1, 2).contiguous().view(b, t, d))
        h = s.n2(x)
        return x + s.w2(F.silu(s.w1(h)) * s.w3(h))

class GPTFast(nn.Module):
    def __init__(s, v=256, d=64):
        super().__init__(); s.tok = nn.Embedding(v, d); s.layers = nn.ModuleList([Block(), Block()])
        s.norm = RMSNorm(d); s.output = nn.Linear(d, v, bias=False)
        s.register_buffer("freqs_cis", precompute_freqs_cis(32, 16), persistent=False)
    def forward(s, idx, targets):
        x = s.tok(idx); fc = s.freqs_cis[: idx.shape[1]]
        for l in s.layers: x = l(x, fc)
        logits = s.output(s.norm(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)



def make_gpt_fast(seed=0):
    """(model, (idx, targets), expected counts)."""
    torch.manual_seed(seed)
    m = GPTFast()
    idx = torch.randint(0, 256, (2, 16))
    t = torch.randint(0, 256, (2, 16))
    t[0, :2] = -1
    return m, (idx, t), {"rms_norm": 5, "rope": 2, "swiglu": 2, "fused_linear_cross_entropy": 1}
