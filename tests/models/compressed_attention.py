"""DeepSeek-V4's compressed attention, hand-written: which of its rotations share their angles.

DeepSeek-V4 (transformers' `modeling_deepseek_v4`) rotates with one function called per tensor
(`_deepseek_rope` of tests/models/repeated_tables.py: half tables `repeat_interleave`'d inside
it, the trailing channels of each head rotated as interleaved pairs), and rotates five tensors per
compressed-attention layer:
- the attention's q and kv by the layer's (cos, sin) at token positions: one pair;
- the attention output back by (cos, -sin): other tables, and it is computed from q and kv;
- the compressor's pooled keys at window positions (`arange(n) * rate`), by the compressor's own
  rotary module: the only tensor rotated there;
- the indexer's pooled keys at window positions and its queries at token positions, by the
  indexer's own rotary module (an `inv_freq` buffer of its own, equal in value to the
  compressor's).
Only q and kv provably share their angles: the window keys of the compressor and the indexer
read different buffers (a buffer can change between calls without a recompile, so equal values
today prove nothing), and the indexer's queries and keys sit at different positions.

`rotary` makes the look-alikes of that question:
- "own" (DeepSeek-V4): every module its own rotary: 1 rope + 4 rope_single per layer;
- "shared": the indexer reads the compressor's rotary module and computes the same window
  positions again: two subgraphs computing the same function of the same inputs, so the two
  window-key rotations pair: 2 rope + 2 rope_single;
- "shifted": shared module, but the indexer's windows start one position later: other angles,
  never paired: 1 rope + 4 rope_single.
`make(rotary, layers)` returns (model, args, expected counts).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from tests.models.repeated_tables import _deepseek_rope

DIM, HEADS, IDX_HEADS, HEAD_DIM, ROT, RATE = 32, 4, 2, 8, 4, 2
LAYERS, BATCH, SEQ = 2, 2, 6
PER_LAYER = {"own": (1, 4), "shared": (2, 2), "shifted": (1, 4)}


class Rotary(nn.Module):
    """Half tables (one angle per pair) at the given positions, recomputed on every call."""

    def __init__(self, base: float = 160000.0):
        super().__init__()
        inv = 1.0 / base ** (torch.arange(0, ROT, 2, dtype=torch.float32) / ROT)
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, positions):  # [b, t] -> cos, sin [b, t, ROT / 2]
        freqs = positions[..., None].float() * self.inv_freq
        return freqs.cos(), freqs.sin()


def _window_positions(b: int, n: int, start: int = 0):
    return (torch.arange(n) * RATE + start).unsqueeze(0).expand(b, -1)


class _Pool(nn.Module):
    """Gated sum of each window of RATE tokens into one key [b, n, HEAD_DIM]."""

    def __init__(self):
        super().__init__()
        self.kv = nn.Linear(DIM, HEAD_DIM, bias=False)
        self.gate = nn.Linear(DIM, HEAD_DIM, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        kv = self.kv(x).view(b, t // RATE, RATE, HEAD_DIM)
        gate = self.gate(x).view(b, t // RATE, RATE, HEAD_DIM)
        return (kv * gate.softmax(dim=2)).sum(dim=2)


class Compressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = _Pool()
        self.rotary = Rotary()

    def forward(self, x):
        keys = self.pool(x)
        cos, sin = self.rotary(_window_positions(x.shape[0], keys.shape[1]))
        return _deepseek_rope(keys.unsqueeze(1), cos, sin)  # [b, 1, n, HEAD_DIM]


class Indexer(nn.Module):
    """Scores of each query against each window key: relu(q . k) summed over its heads."""

    def __init__(self, rotary: Rotary | None, start: int):
        super().__init__()
        self.pool = _Pool()
        self.wq = nn.Linear(DIM, IDX_HEADS * HEAD_DIM, bias=False)
        self.rotary = rotary if rotary is not None else Rotary()
        self.start = start

    def forward(self, x):
        b, t, _ = x.shape
        keys = self.pool(x)
        cos_w, sin_w = self.rotary(_window_positions(b, keys.shape[1], self.start))
        k = _deepseek_rope(keys.unsqueeze(1), cos_w, sin_w)
        cos_t, sin_t = self.rotary(torch.arange(t).unsqueeze(0).expand(b, -1))
        q = _deepseek_rope(self.wq(x).view(b, t, IDX_HEADS, HEAD_DIM).transpose(1, 2),
                           cos_t, sin_t)
        return torch.relu(q @ k.transpose(-1, -2)).sum(dim=1, keepdim=True)  # [b, 1, t, n]


class Layer(nn.Module):
    def __init__(self, rotary: str):
        super().__init__()
        self.wq = nn.Linear(DIM, HEADS * HEAD_DIM, bias=False)
        self.wkv = nn.Linear(DIM, HEAD_DIM, bias=False)
        self.wo = nn.Linear(HEADS * HEAD_DIM, DIM, bias=False)
        self.compressor = Compressor()
        shared = self.compressor.rotary if rotary != "own" else None
        self.indexer = Indexer(shared, start=1 if rotary == "shifted" else 0)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        q = _deepseek_rope(self.wq(x).view(b, t, HEADS, HEAD_DIM).transpose(1, 2), cos, sin)
        kv = _deepseek_rope(self.wkv(x).view(b, t, 1, HEAD_DIM).transpose(1, 2), cos, sin)
        keys = torch.cat([kv, self.compressor(x)], dim=2).expand(-1, HEADS, -1, -1)
        bias = torch.cat([x.new_zeros(b, 1, t, t), self.indexer(x)], dim=-1)
        att = ((q @ keys.transpose(-1, -2)) * HEAD_DIM ** -0.5 + bias).softmax(-1) @ keys
        out = _deepseek_rope(att, cos, -sin)  # kv is also the value: its rotation undone
        return x + self.wo(out.transpose(1, 2).reshape(b, t, -1))


class Model(nn.Module):
    def __init__(self, rotary: str, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(Layer(rotary) for _ in range(layers))
        self.rotary = Rotary(10000.0)

    def forward(self, x):
        cos, sin = self.rotary(torch.arange(x.shape[1]).unsqueeze(0).expand(x.shape[0], -1))
        for layer in self.layers:
            x = layer(x, cos, sin)
        return x


def make(rotary: str = "own", layers: int = LAYERS, seed: int = 0):
    torch.manual_seed(seed)
    pairs, alone = PER_LAYER[rotary]
    return (Model(rotary, layers), (torch.randn(BATCH, SEQ, DIM),),
            {"rope": pairs * layers, "rope_single": alone * layers})
