"""Small hand-written models in the styles people write by hand, for the pattern tests.

Every entry of `HANDWRITTEN` is a factory `() -> (model, args, expected_counts)`: call the model
as `model(*args)`; the result is a scalar loss or a tensor to `.sum()`.  `expected_counts` maps a
pattern name (rms_norm, layer_norm, rope, swiglu, geglu, cross_entropy,
fused_linear_cross_entropy) to its occurrences in one forward; patterns that do not apply are
left out.  Factories are seeded and leave the global RNG alone.

Norm models stack a few norms of one written form (`RMS_VARIANTS`, `LN_VARIANTS`) between
linear layers.  `NEGATIVE` models hold one ordinary HF-style RMSNorm as a control next to a
look-alike that must NOT be rewritten, so their rms_norm count is 1: a matcher that rewrites
the look-alike gives 2, one that finds nothing gives 0.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

DIM, BATCH, SEQ, EPS = 64, 2, 8, 1e-6
N_NORMS = 3


def _seeded(build, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _randn(*shape, seed=1, requires_grad=False):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return x.requires_grad_(requires_grad)


# ---------------------------------------------------------------------------------------------
# RMSNorm written in different ways.  Weights start near 1 (not exactly 1) so weight gradients
# and weight placement matter in comparisons.


class _Norm(nn.Module):
    def __init__(self, dim=DIM, eps=EPS, offset=1.0):
        super().__init__()
        self.weight = nn.Parameter(offset + 0.1 * torch.randn(dim))
        self.eps = eps


class RMSPow(_Norm):  # Hugging Face Llama
    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        return self.weight * x.to(dtype)


class RMSMulSelf(_Norm):
    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt((x32 * x32).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RMSSquare(_Norm):
    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(torch.square(x32).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RMSMeanDim2(_Norm):  # positive reduction dim; inputs are 3-D so dim 2 is the last
    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(torch.mean(x32.pow(2), dim=2, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RMSOneOverSqrt(_Norm):
    def forward(self, x):
        x32 = x.float()
        x32 = x32 * (1 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps))
        return self.weight * x32.to(x.dtype)


class RMSDivSqrt(_Norm):
    def forward(self, x):
        x32 = x.float()
        x32 = x32 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RMSEpsFirst(_Norm):
    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(self.eps + x32.pow(2).mean(-1, keepdim=True))
        return self.weight * x32.to(x.dtype)


class RMSWeightBeforeCast(_Norm):  # T5 / some forks: scale in fp32, then cast
    def forward(self, x):
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * x32 * rstd).to(x.dtype)


class RMSGemma(_Norm):  # Gemma: zero-centred weight, (1 + w) applied in fp32
    def __init__(self):
        super().__init__(offset=0.0)

    def forward(self, x):
        x32 = x.float()
        out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).type_as(x)


class RMSTorchtitan(_Norm):  # Meta Llama reference / torchtitan
    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        return self._norm(x.float()).type_as(x) * self.weight


class RMSNoWeight(nn.Module):
    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)


class RMSKeepdimFalse(_Norm):
    def forward(self, x):
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1) + self.eps).unsqueeze(-1)
        return self.weight * (x32 * rstd).to(x.dtype)


class RMSFunctional(_Norm):
    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def _nn_rmsnorm():
    m = nn.RMSNorm(DIM, eps=EPS)
    with torch.no_grad():
        m.weight.add_(0.1 * torch.randn(DIM))
    return m


# ---------------------------------------------------------------------------------------------
# LayerNorm written in different ways.


class _LN(nn.Module):
    def __init__(self, dim=DIM, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(dim))
        self.bias = nn.Parameter(0.1 * torch.randn(dim))
        self.eps = eps


class LNFunctional(_LN):
    def forward(self, x):
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


class LNManual(_LN):
    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + self.eps) * self.weight + self.bias


class LNManualVar(_LN):
    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        var = x.var(-1, keepdim=True, unbiased=False)
        return (x - mu) / torch.sqrt(var + self.eps) * self.weight + self.bias


def _nn_layernorm(**kw):
    def make():
        m = nn.LayerNorm(DIM, **kw)
        with torch.no_grad():
            if m.weight is not None:
                m.weight.add_(0.1 * torch.randn(DIM))
            if m.bias is not None:
                m.bias.add_(0.1 * torch.randn(DIM))
        return m
    return make


# ---------------------------------------------------------------------------------------------
# Look-alikes that must not become rms_norm.


class RMSVarianceReused(_Norm):
    """The variance also feeds the output, so it must stay in the graph."""

    def forward(self, x):
        x32 = x.float()
        variance = x32.pow(2).mean(-1, keepdim=True)
        out = self.weight * (x32 * torch.rsqrt(variance + self.eps)).to(x.dtype)
        return out + variance


class RMSTensorEps(_Norm):
    """eps arrives as a runtime tensor input, not a constant."""

    def forward(self, x, eps):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return self.weight * x32.to(x.dtype)


class RMS2DWeight(nn.Module):
    """A per-position [seq, dim] weight: not the per-channel weight of an RMSNorm."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(SEQ, DIM))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + EPS)
        return self.weight * x32.to(x.dtype)


class RMSNonLastDim(_Norm):
    """Normalises over the sequence dim (1), not the last dim."""

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Norm-stack models.


class NormStack(nn.Module):
    """x -> [norm -> linear] * n; returns the last activation ([BATCH, SEQ, DIM])."""

    def __init__(self, make_norm, n=N_NORMS):
        super().__init__()
        self.norms = nn.ModuleList(make_norm() for _ in range(n))
        self.projs = nn.ModuleList(nn.Linear(DIM, DIM) for _ in range(n))

    def forward(self, x):
        for norm, proj in zip(self.norms, self.projs):
            x = proj(norm(x))
        return x


class WithControl(nn.Module):
    """control RMSNorm -> linear -> look-alike; extra forward args go to the look-alike."""

    def __init__(self, lookalike):
        super().__init__()
        self.control = RMSPow()
        self.proj = nn.Linear(DIM, DIM)
        self.lookalike = lookalike

    def forward(self, x, *extra):
        return self.lookalike(self.proj(self.control(x)), *extra)


def _stack_factory(make_norm, pattern):
    def factory():
        model = _seeded(lambda: NormStack(make_norm))
        return model, (_randn(BATCH, SEQ, DIM, requires_grad=True),), {pattern: N_NORMS}
    return factory


def _negative_factory(make_lookalike, *extra_args):
    def factory():
        model = _seeded(lambda: WithControl(make_lookalike()))
        args = (_randn(BATCH, SEQ, DIM, requires_grad=True), *extra_args)
        return model, args, {"rms_norm": 1}
    return factory


RMS_VARIANTS = {
    "rms_pow": RMSPow,
    "rms_mul_self": RMSMulSelf,
    "rms_square": RMSSquare,
    "rms_mean_dim2": RMSMeanDim2,
    "rms_one_over_sqrt": RMSOneOverSqrt,
    "rms_div_sqrt": RMSDivSqrt,
    "rms_eps_first": RMSEpsFirst,
    "rms_weight_before_cast": RMSWeightBeforeCast,
    "rms_gemma": RMSGemma,
    "rms_torchtitan": RMSTorchtitan,
    "rms_no_weight": RMSNoWeight,
    "rms_keepdim_false": RMSKeepdimFalse,
    "rms_nn_module": _nn_rmsnorm,
    "rms_functional": RMSFunctional,
}
LN_VARIANTS = {
    "ln_nn_module": _nn_layernorm(),
    "ln_no_affine": _nn_layernorm(elementwise_affine=False),
    "ln_no_bias": _nn_layernorm(bias=False),
    "ln_functional": LNFunctional,
    "ln_manual": LNManual,
    "ln_manual_var": LNManualVar,
}
NEGATIVE = {
    "neg_rms_variance_reused": _negative_factory(RMSVarianceReused),
    "neg_rms_tensor_eps": _negative_factory(RMSTensorEps, torch.tensor(EPS)),
    "neg_rms_2d_weight": _negative_factory(RMS2DWeight),
    "neg_rms_non_last_dim": _negative_factory(RMSNonLastDim),
}


# ---------------------------------------------------------------------------------------------
# nanoGPT-style GPT: LayerNorm (optionally without bias), learned positions, fused qkv, GELU MLP,
# tied lm head, targets already shifted, ignore_index=-1.

VOCAB, LAYERS, HEADS = 256, 2, 4


class GPTLayerNorm(nn.Module):
    def __init__(self, dim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class GPTBlock(nn.Module):
    def __init__(self, bias):
        super().__init__()
        self.ln_1 = GPTLayerNorm(DIM, bias)
        self.c_attn = nn.Linear(DIM, 3 * DIM, bias=bias)
        self.c_proj = nn.Linear(DIM, DIM, bias=bias)
        self.ln_2 = GPTLayerNorm(DIM, bias)
        self.c_fc = nn.Linear(DIM, 4 * DIM, bias=bias)
        self.gelu = nn.GELU()
        self.mlp_proj = nn.Linear(4 * DIM, DIM, bias=bias)

    def attn(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, HEADS, c // HEADS).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp_proj(self.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, DIM)
        self.wpe = nn.Embedding(SEQ * 4, DIM)
        self.h = nn.ModuleList(GPTBlock(bias) for _ in range(LAYERS))
        self.ln_f = GPTLayerNorm(DIM, bias)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx, targets):
        pos = torch.arange(idx.shape[1], dtype=torch.long, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def _token_batch(seq=SEQ, ignore=-100):
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (BATCH, seq + 1), generator=gen)
    idx, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    targets[0, -2:] = ignore
    return idx, targets


def nanogpt(bias=True):
    model = _seeded(lambda: NanoGPT(bias))
    # every norm but the first reads a residual add (the first: tok + pos embeddings, which
    # broadcast, a near miss of add_layer_norm)
    counts = {"layer_norm": 1, "add_layer_norm": 2 * LAYERS, "cross_entropy": 1,
              "fused_linear_cross_entropy": 1}
    return model, _token_batch(ignore=-1), counts


# ---------------------------------------------------------------------------------------------
# Meta Llama reference / torchtitan style: [b, t, h, d], complex RoPE, SwiGLU w2(silu(w1) * w3).


def apply_rotary_emb(xq, xk, freqs_cis):
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs_cis = freqs_cis.view(1, xq_.shape[1], 1, xq_.shape[-1])
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


class RefAttention(nn.Module):
    def __init__(self, n_heads=HEADS, n_kv_heads=2):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, DIM // n_heads
        self.wq = nn.Linear(DIM, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(DIM, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(DIM, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, DIM, bias=False)

    def forward(self, x, freqs_cis):
        bs, t, _ = x.shape
        xq = self.wq(x).view(bs, t, self.n_heads, self.head_dim)
        xk = self.wk(x).view(bs, t, self.n_kv_heads, self.head_dim)
        xv = self.wv(x).view(bs, t, self.n_kv_heads, self.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis)
        rep = self.n_heads // self.n_kv_heads  # repeat_kv: expand + reshape
        xk = xk[:, :, :, None].expand(bs, t, self.n_kv_heads, rep, self.head_dim).reshape(
            bs, t, self.n_heads, self.head_dim)
        xv = xv[:, :, :, None].expand(bs, t, self.n_kv_heads, rep, self.head_dim).reshape(
            bs, t, self.n_heads, self.head_dim)
        out = F.scaled_dot_product_attention(
            xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2), is_causal=True)
        return self.wo(out.transpose(1, 2).contiguous().view(bs, t, -1))


class RefFeedForward(nn.Module):
    def __init__(self, hidden=172):
        super().__init__()
        self.w1 = nn.Linear(DIM, hidden, bias=False)
        self.w2 = nn.Linear(hidden, DIM, bias=False)
        self.w3 = nn.Linear(DIM, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class RefBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention_norm = RMSTorchtitan(eps=1e-5)
        self.attention = RefAttention()
        self.ffn_norm = RMSTorchtitan(eps=1e-5)
        self.feed_forward = RefFeedForward()

    def forward(self, x, freqs_cis):
        h = x + self.attention(self.attention_norm(x), freqs_cis)
        return h + self.feed_forward(self.ffn_norm(h))


class LlamaRef(nn.Module):
    def __init__(self, theta=10000.0):
        super().__init__()
        self.theta = theta
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(RefBlock() for _ in range(LAYERS))
        self.norm = RMSTorchtitan(eps=1e-5)
        self.output = nn.Linear(DIM, VOCAB, bias=False)

    def freqs_cis(self, t, device):
        # Built per call rather than kept as a complex buffer: module.to(bf16) would drop the
        # imaginary part of a complex buffer.
        head_dim = DIM // HEADS
        freqs = 1.0 / self.theta ** (
            torch.arange(0, head_dim, 2, device=device).float() / head_dim)
        freqs = torch.outer(torch.arange(t, device=device).float(), freqs)
        return torch.polar(torch.ones_like(freqs), freqs)

    def forward(self, tokens, labels):
        h = self.tok_embeddings(tokens)
        freqs_cis = self.freqs_cis(tokens.shape[1], tokens.device)
        for layer in self.layers:
            h = layer(h, freqs_cis)
        pred = self.output(self.norm(h))
        return F.cross_entropy(pred.flatten(0, 1).float(), labels.flatten(0, 1))


def llama_ref():
    model = _seeded(LlamaRef)
    counts = {"rms_norm": 1, "add_rms_norm": 2 * LAYERS, "rope": LAYERS, "swiglu": LAYERS,
              "cross_entropy": 1, "fused_linear_cross_entropy": 1}
    return model, _token_batch(ignore=-100), counts


MODELS = {
    "nanogpt": nanogpt,
    "nanogpt_nobias": lambda: nanogpt(bias=False),
    "llama_ref": llama_ref,
}

HANDWRITTEN = {
    **MODELS,
    **{name: _stack_factory(make, "rms_norm") for name, make in RMS_VARIANTS.items()},
    **{name: _stack_factory(make, "layer_norm") for name, make in LN_VARIANTS.items()},
    **NEGATIVE,
}
