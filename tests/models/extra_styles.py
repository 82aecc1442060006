"""Hand-written models in RoPE and gated-MLP styles the zoo lacks, for the rope/swiglu/geglu tests.

Every entry of `EXTRA_STYLES` is a factory `() -> (model, args, expected_counts)`, called as
`model(*args)` -> scalar loss, like tests/models/handwritten.py.  One small causal LM (2 layers,
dim 64, 4 query heads and 2 kv heads of 16) takes a `rope` style and an `mlp` style:

rope styles: `posids_bthd` (cos/sin [b, t, d] gathered by position ids, [b, t, h, d] layout,
rotate_half by `chunk`, an fp32 upcast around the rotation), `gptj` (GPT-J: [b, t, h, d], partial
rotary on half of each head, interleaved pairs rotated by `stack((-x2, x1), -1).flatten(-2)`,
tables `repeat_interleave`d), `q_only` (k is not rotated), `diff_tables` (k rotated with tables of
shifted positions), and near misses: `learned_tables` (cos/sin are parameters), `off_center`
(the "rotate_half" splits at d/4), `per_head` (a table per head, [h, t, d]), `pairs_unproven`
(interleaved pairs with rotate_half-layout tables: not one angle per pair).
mlp styles: `fused_split` (one gate_up linear, `split`), `slices` (`h[..., :I]`, tanh GeGLU),
`gelu_new` / `gelu_erf` (GELU written out), `sigmoid` (`g * sigmoid(g) * up`), and the near miss
`broadcast` (up is one channel, broadcast over gate).

`NEAR_MISSES[name] = (pattern, reason substring)` for the near-miss styles.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

DIM, HEADS, KV_HEADS, HEAD_DIM, INTER = 64, 4, 2, 16, 96
VOCAB, LAYERS, BATCH, SEQ = 256, 2, 2, 8


def _tables(positions: torch.Tensor, head_dim: int = HEAD_DIM):
    """rotate_half cos/sin for integer positions of any shape: [..., head_dim]."""
    inv = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = positions.float()[..., None] * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_every_two(x):
    return torch.stack((-x[:, :, :, 1::2], x[:, :, :, ::2]), dim=-1).flatten(-2)


def rotate_half_chunk(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_half_at(x, split):
    return torch.cat((-x[..., split:], x[..., :split]), dim=-1)


_BTHD = ("posids_bthd", "gptj")  # styles that rotate q/k in [b, t, h, d]


class Attention(nn.Module):
    def __init__(self, rope: str):
        super().__init__()
        self.rope = rope
        self.wq = nn.Linear(DIM, HEADS * HEAD_DIM, bias=False)
        self.wk = nn.Linear(DIM, KV_HEADS * HEAD_DIM, bias=False)
        self.wv = nn.Linear(DIM, KV_HEADS * HEAD_DIM, bias=False)
        self.wo = nn.Linear(HEADS * HEAD_DIM, DIM, bias=False)
        if rope == "learned_tables":
            cos, sin = _tables(torch.arange(SEQ))
            self.cos, self.sin = nn.Parameter(cos), nn.Parameter(sin)

    def _rotate(self, q, k, cos, sin):
        """q, k: [b, h, t, d], or [b, t, h, d] for the _BTHD styles."""
        style = self.rope
        if style == "posids_bthd":
            # tables [b, t, d] -> [b, t, 1, d]; rotation in fp32, cast back (Qwen2-VL style)
            c, s = cos.unsqueeze(2).float(), sin.unsqueeze(2).float()
            qf, kf = q.float(), k.float()
            q2 = qf * c + rotate_half_chunk(qf) * s
            k2 = kf * c + rotate_half_chunk(kf) * s
            return q2.to(q.dtype), k2.to(k.dtype)
        if style == "gptj":
            # tables [b, t, r/2] (one angle per pair) -> [b, t, 1, r], each angle twice
            rot = 2 * cos.shape[-1]
            c = torch.repeat_interleave(cos[:, :, None, :], 2, 3)
            s = torch.repeat_interleave(sin[:, :, None, :], 2, 3)
            out = []
            for x in (q, k):
                xr, xp = x[:, :, :, :rot], x[:, :, :, rot:]
                out.append(torch.cat([xr * c + rotate_every_two(xr) * s, xp], dim=-1))
            return out[0], out[1]
        if style == "pairs_unproven":
            c, s = cos[None, None], sin[None, None]
            return q * c + rotate_every_two(q) * s, k * c + rotate_every_two(k) * s
        if style == "learned_tables":
            cos, sin = self.cos, self.sin
        if style == "per_head":
            # a different table per head: [h, t, d], not RoPE's one row per position
            scale = torch.arange(1, HEADS + 1, dtype=cos.dtype, device=cos.device)[:, None, None]
            q2 = q * (cos * scale) + rotate_half_at(q, HEAD_DIM // 2) * (sin * scale)
            return q2, k
        c, s = cos[None, None], sin[None, None]
        split = HEAD_DIM // 4 if style == "off_center" else HEAD_DIM // 2
        q2 = q * c + rotate_half_at(q, split) * s
        if style == "q_only":
            return q2, k
        if style == "diff_tables":
            c2, s2 = _tables(torch.arange(3, 3 + q.shape[2], device=q.device))
            c, s = c2.to(k.dtype)[None, None], s2.to(k.dtype)[None, None]
        return q2, k * c + rotate_half_at(k, split) * s

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, HEADS, HEAD_DIM)
        k = self.wk(x).view(b, t, KV_HEADS, HEAD_DIM)
        v = self.wv(x).view(b, t, KV_HEADS, HEAD_DIM).transpose(1, 2)
        if self.rope in _BTHD:
            q, k = self._rotate(q, k, cos, sin)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        else:
            q, k = self._rotate(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        k = k.repeat_interleave(HEADS // KV_HEADS, dim=1)
        v = v.repeat_interleave(HEADS // KV_HEADS, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, style: str):
        super().__init__()
        self.style = style
        fused = style in ("fused_split", "slices")
        self.gate_up = nn.Linear(DIM, 2 * INTER, bias=False) if fused else None
        self.gate = None if fused else nn.Linear(DIM, INTER, bias=False)
        self.up = None if fused else nn.Linear(DIM, 1 if style == "broadcast" else INTER, bias=False)
        self.down = nn.Linear(INTER, DIM, bias=False)

    def forward(self, x):
        style = self.style
        if style == "fused_split":
            g, u = self.gate_up(x).split(INTER, dim=-1)
            return self.down(F.silu(g) * u)
        if style == "slices":
            h = self.gate_up(x)
            return self.down(F.gelu(h[..., :INTER], approximate="tanh") * h[..., INTER:])
        g, u = self.gate(x), self.up(x)
        if style == "gelu_new":
            act = 0.5 * g * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * torch.pow(g, 3.0))))
        elif style == "gelu_erf":
            act = g * 0.5 * (1.0 + torch.erf(g / math.sqrt(2.0)))
        elif style == "sigmoid":
            act = g * torch.sigmoid(g)
        else:  # "silu", "broadcast"
            act = F.silu(g)
        return self.down(act * u)


class Block(nn.Module):
    def __init__(self, rope, mlp):
        super().__init__()
        self.attn, self.mlp = Attention(rope), MLP(mlp)

    def forward(self, x, cos, sin):
        x = x + self.attn(x, cos, sin)
        return x + self.mlp(x)


class StyleLM(nn.Module):
    def __init__(self, rope="plain", mlp="silu"):
        super().__init__()
        self.rope = rope
        self.embed = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(Block(rope, mlp) for _ in range(LAYERS))
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens, labels, position_ids):
        x = self.embed(tokens)
        if self.rope == "posids_bthd":
            cos, sin = _tables(position_ids)  # [b, t, d]
        elif self.rope == "gptj":
            half = _tables(position_ids, HEAD_DIM // 2)  # [b, t, r]; first half: one per pair
            cos, sin = (t[..., :HEAD_DIM // 4] for t in half)
        else:
            cos, sin = _tables(torch.arange(tokens.shape[1], device=tokens.device))  # [t, d]
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return F.cross_entropy(self.head(x).flatten(0, 1).float(), labels.flatten())


def _batch():
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    # left padding in row 0: its positions start later
    position_ids = torch.stack([torch.arange(SEQ) + 2, torch.arange(SEQ)])
    return tokens, labels, position_ids


_ROPE_COUNTS = {"plain": {"rope": LAYERS}, "posids_bthd": {"rope": LAYERS}, "gptj": {"rope": LAYERS},
                "pairs_unproven": {},
                "q_only": {"rope_single": LAYERS}, "diff_tables": {"rope_single": 2 * LAYERS},
                "learned_tables": {}, "off_center": {}, "per_head": {}}
_MLP_COUNTS = {"silu": "swiglu", "fused_split": "swiglu", "sigmoid": "swiglu", "slices": "geglu",
               "gelu_new": "geglu", "gelu_erf": "geglu", "broadcast": None}


def style_model(rope="plain", mlp="silu"):
    def factory():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = StyleLM(rope, mlp)
        counts = dict(_ROPE_COUNTS[rope])
        if _MLP_COUNTS[mlp]:
            counts[_MLP_COUNTS[mlp]] = LAYERS
        return model, _batch(), counts
    return factory


EXTRA_STYLES = {
    **{f"rope_{r}": style_model(rope=r) for r in _ROPE_COUNTS if r != "plain"},
    **{f"mlp_{m}": style_model(mlp=m) for m in _MLP_COUNTS if m != "silu"},
}
NEAR_MISSES = {
    "rope_learned_tables": ("rope", "requires grad"),
    "rope_off_center": ("rope", "not in the middle"),
    "rope_per_head": ("rope_single", "does not broadcast"),
    "rope_pairs_unproven": ("rope", "not provably one angle per pair"),
    "mlp_broadcast": ("swiglu", "same shape"),
}
