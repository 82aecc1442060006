"""Hand-written blocks for the relu² and gated-RMSNorm patterns (issue 13 §3).

`RELU_SQ[name]()` and `GATED_NORMS[name]()` are factories `() -> (model, args, expected_counts)`,
called as `model(*args)` -> scalar loss, like tests/models/handwritten.py.

relu² MLPs (up -> relu² -> down, or the gated `relu(gate)**2 * up`), one per spelling:
`square` (transformers' `ReLUSquaredActivation`: `torch.square(F.relu(x))`), `pow`, `starstar`,
`mul` (`x.relu() * x.relu()`), `module` (`nn.ReLU()` then `** 2`), `gated` (two linears),
`gated_chunk` (one fused gate_up projection split by `chunk`).

Gated norms (x, z = in_proj(h).chunk(2); out_proj(norm(x, z))): `qwen3_next` (transformers'
`Qwen3NextRMSNormGated`, written out), `functional` (`F.rms_norm(x, ..., w) * F.silu(z)`),
`module` (`nn.RMSNorm` then `* F.silu(z)`), `offset` (Gemma's `(1 + w)`, fp32 weight multiply).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

DIM, INTER, BATCH, SEQ = 32, 48, 2, 5


def _relu_sq(spelling):
    def act(h):
        if spelling == "square":
            return torch.square(F.relu(h))
        if spelling == "pow":
            return F.relu(h).pow(2)
        if spelling == "starstar":
            return F.relu(h) ** 2
        if spelling == "mul":
            return h.relu() * h.relu()
        raise KeyError(spelling)
    return act


class ReluSqMLP(nn.Module):
    def __init__(self, spelling):
        super().__init__()
        self.spelling = spelling
        self.relu = nn.ReLU()
        gated = spelling.startswith("gated")
        self.up = nn.Linear(DIM, 2 * INTER if spelling == "gated_chunk" else INTER)
        self.gate = nn.Linear(DIM, INTER) if spelling == "gated" else None
        self.down = nn.Linear(INTER, DIM)
        self.gated = gated

    def forward(self, x):
        h = x
        for _ in range(2):  # two layers: counts are per layer
            if self.spelling == "gated":
                a = torch.square(F.relu(self.gate(h))) * self.up(h)
            elif self.spelling == "gated_chunk":
                g, u = self.up(h).chunk(2, dim=-1)
                a = F.relu(g) ** 2 * u
            elif self.spelling == "module":
                a = self.relu(self.up(h)) ** 2
            else:
                a = _relu_sq(self.spelling)(self.up(h))
            h = h + self.down(a)
        return h.pow(2).mean()


def _make_relu_sq(spelling):
    def make():
        torch.manual_seed(0)
        model = ReluSqMLP(spelling)
        x = torch.randn(BATCH, SEQ, DIM)
        kind = "relu_sq_glu" if spelling.startswith("gated") else "relu_sq"
        return model, (x,), {kind: 2}
    return make


RELU_SQ = {s: _make_relu_sq(s) for s in ("square", "pow", "starstar", "mul", "module", "gated",
                                         "gated_chunk")}


class Qwen3NextGatedNorm(nn.Module):
    """transformers' Qwen3NextRMSNormGated.forward (gate after the norm)."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(d))
        self.variance_epsilon = eps

    def forward(self, hidden_states, gate):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        hidden_states = self.weight * hidden_states.to(input_dtype)
        hidden_states = hidden_states * F.silu(gate.to(torch.float32))
        return hidden_states.to(input_dtype)


class FunctionalGatedNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(d))

    def forward(self, x, z):
        return F.rms_norm(x, (x.shape[-1],), self.weight, 1e-5) * F.silu(z)


class ModuleGatedNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.RMSNorm(d, eps=1e-5)

    def forward(self, x, z):
        return self.norm(x) * F.silu(z)


class OffsetGatedNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(0.1 * torch.randn(d))

    def forward(self, x, z):
        xf = x.float()
        n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (n * (1.0 + self.weight.float())).type_as(x) * F.silu(z)


_NORMS = {"qwen3_next": Qwen3NextGatedNorm, "functional": FunctionalGatedNorm,
          "module": ModuleGatedNorm, "offset": OffsetGatedNorm}


class GatedNormBlock(nn.Module):
    def __init__(self, style, dtype=torch.float32):
        super().__init__()
        self.in_proj = nn.Linear(DIM, 2 * DIM)
        self.norm = _NORMS[style](DIM)
        self.out_proj = nn.Linear(DIM, DIM)
        self.to(dtype)

    def forward(self, h):
        x, z = self.in_proj(h).chunk(2, dim=-1)
        return self.out_proj(self.norm(x, z)).float().pow(2).mean()


def _make_norm(style):
    def make():
        torch.manual_seed(0)
        return GatedNormBlock(style), (torch.randn(BATCH, SEQ, DIM),), {"gated_rms_norm": 1}
    return make


GATED_NORMS = {s: _make_norm(s) for s in _NORMS}
