"""A small Llama in the gpt-fast manner (our own code, in that project's idioms): RMSNorm via
`_norm(x.float()).type_as(x)` with `torch.mean(x * x)`, one fused qkv projection split three
ways, RoPE on channel pairs kept as a trailing dim of 2 and stacked back after a real rotation,
SwiGLU, an untied `output` head and the loss on `.view(-1, V)` with ignore_index=-1.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x):
        return x * torch.rsqrt(torch.mean(x * x, dim=-1, keepdim=True) + self.eps)

    def forward(self, x):
        return self._norm(x.float()).type_as(x) * self.weight


def rotary_table(max_len, head_dim, base=10000.0):
    """[max_len, head_dim // 2, 2]: (cos, sin) of each position's angle for each channel pair."""
    inv = base ** (-torch.arange(0, head_dim, 2).float() / head_dim)
    ang = torch.arange(max_len).float()[:, None] * inv[None, :]
    return torch.stack((ang.cos(), ang.sin()), dim=-1)


def rotate_pairs(x, table):
    """x [b, t, h, d]; each pair (2i, 2i+1) turned by table[t, i]."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    tab = table.view(1, pairs.size(1), 1, pairs.size(3), 2)
    re, im = pairs[..., 0], pairs[..., 1]
    c, s = tab[..., 0], tab[..., 1]
    out = torch.stack((re * c - im * s, im * c + re * s), dim=-1)
    return out.flatten(3).type_as(x)


class Block(nn.Module):
    def __init__(self, dim=64, heads=4, hidden=128):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.attention_norm = RMSNorm(dim)
        self.ffn_norm = RMSNorm(dim)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x, table):
        b, t, d = x.shape
        q, k, v = self.wqkv(self.attention_norm(x)).split([d, d, d], dim=-1)
        q, k, v = (z.view(b, t, self.heads, self.head_dim) for z in (q, k, v))
        q, k = rotate_pairs(q, table), rotate_pairs(k, table)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True)
        x = x + self.wo(y.transpose(1, 2).contiguous().view(b, t, d))
        h = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class GPTFast(nn.Module):
    def __init__(self, vocab=256, dim=64, layers=2, max_len=32):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim) for _ in range(layers))
        self.norm = RMSNorm(dim)
        self.output = nn.Linear(dim, vocab, bias=False)
        self.register_buffer("table", rotary_table(max_len, dim // 4), persistent=False)

    def forward(self, idx, targets):
        x = self.tok_embeddings(idx)
        table = self.table[: idx.shape[1]]
        for layer in self.layers:
            x = layer(x, table)
        logits = self.output(self.norm(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def make_gpt_fast(seed=0):
    """(model, (idx, targets), expected counts)."""
    torch.manual_seed(seed)
    m = GPTFast()
    idx = torch.randint(0, 256, (2, 16))
    t = torch.randint(0, 256, (2, 16))
    t[0, :2] = -1
    return m, (idx, t), {"rms_norm": 1, "add_rms_norm": 4, "rope": 2, "swiglu": 2,
                      "fused_linear_cross_entropy": 1}
