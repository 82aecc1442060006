"""One regression test per hole the differential suite found (minimal modules, written out).

Each test is the generated source, shrunk by hand, through the same oracle: eager-equal in output
and every gradient on both kernel paths, or not rewritten and reported as a near miss.  The
comment above each test names the area of the fix (mutation safety, casts/precision, silent
misses, or a pattern/canonical gap fixed here).
"""

import pytest
import torch

from tests.differential.oracle import check
from tests.differential.source import MATH, SAFETY, SPELLING, Case, Input, Written

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32


def _case(code, patterns, kind=SPELLING, dtype=F32, inputs=None):
    return Case(Written(code, inputs or [Input("x", (2, 3, 16))]), patterns, kind, dtype, "regression")


_NORM_INIT = """
class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16, bias=False)
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(16))
        self.bias = nn.Parameter(0.1 * torch.randn(16))

    def forward(self, x):
        h = self.proj(x)
"""


def _norm(body, patterns, kind=SPELLING, dtype=F32, scale=1.0):
    lines = "".join(f"        {line.strip()}\n" for line in body.strip().splitlines())
    return _case(_NORM_INIT + lines, patterns, kind, dtype, [Input("x", (2, 3, 16), scale=scale)])


# -- rms_norm ------------------------------------------------------------------------------------

# pattern (fixed here): keepdim=False, the statistic unsqueezed *before* `+ eps` was a silent miss
def test_rms_norm_statistic_unsqueezed_before_eps():
    check(_norm("""
        var = h.pow(2).mean(-1).unsqueeze(-1)
        n = h / torch.sqrt(var + 1e-06)
        return (self.weight * n.to(h.dtype),)
    """, ("rms_norm",), dtype=BF16), seed=1)


# canonical (fixed here): the weight multiplied in first (`(w * x) / sqrt(..)`) with a
# keepdim=False statistic put back by indexing: no variant covered the combination; the view now
# reads `mean(x, d)[..., None]` / `.unsqueeze(d)` as `mean(x, d, keepdim=True)`
def test_rms_norm_weight_first_with_unsqueezed_statistic():
    check(_norm("""
        var = torch.mean(torch.square(h), dim=-1)[..., None]
        n = ((1.0 + self.weight) * h) / torch.sqrt(var + 1e-05)
        return (n,)
    """, ("rms_norm",)), seed=13)


# the same in bf16, judged by the same precision and casting rules as the keepdim=True spelling:
# upcast to fp32 first (rewritten, fp32 casting); all in bf16 (the statistic rounds in bf16:
# refused unless upcast_statistics); rstd rounded to bf16 before the product (refused)
def test_rms_norm_weight_first_unsqueezed_statistic_bf16():
    check(_norm("""
        hf = h.float()
        var = hf.pow(2).mean(-1)[..., None]
        return (((self.weight * hf) * torch.rsqrt(var + 1e-06)).to(h.dtype),)
    """, ("rms_norm",), dtype=BF16), seed=23)
    check(_norm("""
        var = h.pow(2).mean(-1).unsqueeze(-1)
        return ((self.weight * h) / torch.sqrt(var + 1e-06),)
    """, ("rms_norm",), dtype=BF16), seed=20)
    check(_norm("""
        var = h.float().pow(2).mean(-1)[..., None]
        return ((self.weight * h) * torch.rsqrt(var + 1e-06).to(h.dtype),)
    """, ("rms_norm",), SAFETY, dtype=BF16), seed=21)


# canonical (fixed here): layer norm with both statistics keepdim=False, unsqueezed back
def test_layer_norm_statistics_unsqueezed():
    check(_norm("""
        xc = h - h.mean(-1).unsqueeze(-1)
        var = xc.pow(2).mean(dim=-1)[..., None]
        return (xc * torch.rsqrt(var + 1e-05) * self.weight + self.bias,)
    """, ("layer_norm",)), seed=22)


# canonical (fixed here): `t[..., None]` is unsqueeze(-1); it was an opaque getitem (silent miss)
def test_rms_norm_statistic_indexed_with_none():
    check(_norm("""
        hf = h.float()
        var = torch.mean(hf * hf, dim=-1)[..., None]
        n = hf * torch.rsqrt(var + 1e-05)
        return (n.type_as(h) * self.weight,)
    """, ("rms_norm",), dtype=F16), seed=2)


# cast: eager F.rms_norm in bf16 multiplies the weight in fp32 (then rounds once); the rewrite
# uses the Llama mode (rounds the normalised value, then multiplies in bf16): 1.6x eager's error
def test_functional_rms_norm_bf16_casting_mode():
    case = _norm("return (F.rms_norm(h, (16,), self.weight, 1e-06),)", ("rms_norm",), dtype=BF16)
    case.src.inputs = [Input("x", (8, 32, 16))]  # enough rows for a stable error ratio
    check(case, seed=3)


# rounding (kernels/rms_norm.py, fixed here; long run, seed 10358): an fp16 llama-cast norm times
# (1 + weight): eager's mul backward rounds dy * n and dy * w to fp16 per element; the kernel summed
# unrounded products (weight gradient 1.44x eager's error)
def test_rms_norm_low_precision_product_gradient_rounds_per_element():
    check(_norm("""
        hf = h.float()
        var = hf.pow(2).mean(-1).unsqueeze(-1)
        n = hf / torch.sqrt(var + 1e-05)
        return ((1.0 + self.weight) * n.to(h.dtype),)
    """, ("rms_norm",), dtype=F16), seed=10358, strict=True)


# rounding (kernels/gated_rms_norm.py, fixed here; a search of 100 seeds at 1.25x): the gated
# norm with an fp16 llama-cast (1 + weight) product: its backward summed unrounded dh * n terms
# and used an unrounded dh * w, where eager's mul backward rounds each to fp16 (weight gradient
# 1.40x eager's error); it now rounds as rms_norm's backward does (ROUND_GRAD)
def test_gated_rms_norm_low_precision_product_gradient_rounds_per_element():
    case = _norm("""
        hf = h.float()
        n = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-06)
        return (((1.0 + self.weight) * n.to(h.dtype) * F.silu(x.float())).to(h.dtype),)
    """, ("gated_rms_norm",), dtype=F16)
    case.src.inputs = [Input("x", (8, 32, 16))]
    check(case, seed=4, strict=True)


# detector (fixed here; long run, seed 1): `hf = h.float(); hf += 1.0` between the mean of squares
# and the product (in fp32 the cast is h itself): the detector compared the written tensor with
# the mean's input without looking through the cast: refused by the pattern, reported by no one
def test_rms_norm_written_through_a_cast_between_its_reads_is_reported():
    check(_norm("""
        hf = h.float()
        sq = (hf * hf)
        hf += 1.0
        var = torch.mean(sq, dim=-1, keepdim=True)
        n = ((1.0 + self.weight) * hf) * (var + 1e-06).rsqrt()
        return (n.to(h.dtype),)
    """, ("rms_norm",), SAFETY), seed=1)


# -- layer_norm ----------------------------------------------------------------------------------

# cast (issue 10 §4): the variance of the centred value, `xc.var(unbiased=False)`: silent miss
def test_layer_norm_var_of_centred_value():
    check(_norm("""
        mu = h.mean(-1, keepdim=True)
        xc = h - mu
        var = xc.var(-1, unbiased=False, keepdim=True)
        return (xc * torch.rsqrt(var + 1e-05) * self.weight + self.bias,)
    """, ("layer_norm",)), seed=4)


# detector (new here; long run, seeds 523848, 3587, 1224): a layer norm with its input or centred
# value written in place between the uses the norm reads: refused by the pattern (no layer norm),
# reported by no one (there was no layer-norm detector)
def test_layer_norm_written_between_its_uses_is_reported():
    for body, seed in (("""
        hf = h.to(torch.float32)
        mu = torch.mean(hf, dim=-1, keepdim=True)
        xc = hf - mu
        var = xc.var(-1, unbiased=False, keepdim=True)
        xc += 1.0
        n = xc * (1.0 / torch.sqrt(var + 1e-05))
        return (n.to(h.dtype) + self.bias,)
    """, 523848), ("""
        hf = h.float()
        mu = torch.mean(hf, dim=-1, keepdim=True)
        xc = hf - mu
        hf += 1.0
        var = torch.var(hf, dim=-1, correction=0, keepdim=True)
        n = xc * torch.rsqrt(var + 1e-05)
        return (n.to(h.dtype) + self.bias,)
    """, 3587)):
        check(_norm(body, ("layer_norm",), SAFETY, BF16), seed=seed)


# cast (issue 10 §4): F.layer_norm with a bias and no weight: silent miss
def test_layer_norm_functional_bias_only():
    check(_norm("return (F.layer_norm(h, (16,), None, self.bias, 1e-05),)", ("layer_norm",)),
          seed=5)


# mut: a write through a view of the centred value between its uses; layer_norm refuses (the
# view escapes) but rms_norm then rewrites `xc * rsqrt(mean(xc^2))` with the pre-write xc
def test_layer_norm_write_through_view_between_uses():
    check(_norm("""
        hf = h.to(torch.float32)
        mu = hf.mean(dim=-1, keepdim=True)
        xc = hf - mu
        var = torch.mean(torch.square(xc), -1, keepdim=True)
        xc.view(-1)[:3].add_(1.0)
        n = xc * torch.rsqrt(var + 1e-05)
        return (self.weight * n.to(h.dtype) + self.bias,)
    """, ("layer_norm", "rms_norm"), SAFETY), seed=6)


# mut: the upcast input written through a view after the mean read it, before the variance
# reads it: the whole layer norm is rewritten with one value of hf
def test_layer_norm_write_between_mean_and_variance():
    check(_norm("""
        hf = h.float()
        mu = torch.mean(hf, 2, keepdim=True)
        xc = hf - mu
        hf.view(-1)[:3].add_(1.0)
        var = torch.var(hf, dim=-1, correction=0, keepdim=True)
        return ((xc * torch.rsqrt(var + 1e-06)).type_as(h),)
    """, ("layer_norm",), SAFETY, F16), seed=11)


# cast: the input rounded through bf16 (`h.to(bf16).to(h.dtype)`) is looked through: the kernel
# reads the unrounded value.  (Found in an fp16 model; shown in fp32, where eager's own error
# against float64 is small enough that the skipped rounding stands out.)
def test_layer_norm_input_rounded_through_bf16():
    check(_norm("""
        hb = h.to(torch.bfloat16).to(h.dtype)
        return (F.layer_norm(hb, (16,), None, None, 1e-05),)
    """, ("layer_norm",), SAFETY), seed=12)


# detector (fixed here): `h += 1.0` between the mean of squares and the product rebinds h to the
# write's result; the RMS-norm detector compared tensors by node and said nothing
def test_rms_norm_written_by_augmented_assignment_between_reads():
    check(_norm("""
        var = h.pow(2).mean(-1, keepdim=True)
        h += 1.0
        return (self.weight * (h * torch.rsqrt(var + 1e-6)),)
    """, ("rms_norm",), SAFETY), seed=5)


# oracle (tests/differential/oracle.py; long run, seed 947): fp16 add + F.layer_norm (bias only)
# after an fp16 linear: the norm's gradient is 0.94x eager's error on its own inputs (the kernel's
# formula is the more accurate), the module input's gradient after the linear 1.70x eager's
# against float64 of the whole module: rounding noise carried downstream.  End to end in half
# precision the oracle allows 2x (each region still 1.25x in the validator)
def test_add_layer_norm_half_precision_noise_downstream():
    code = """
class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16, bias=False)
        self.bias = nn.Parameter(0.1 * torch.randn(16))

    def forward(self, x, res):
        h = self.proj(x) + res
        return (F.layer_norm(h, (16,), None, self.bias, 1e-05),)
"""
    inputs = [Input("x", (2, 3, 16)), Input("res", (2, 3, 16), dtype=F16)]
    check(_case(code, ("add_layer_norm",), SPELLING, F16, inputs), seed=947)


# -- rope ----------------------------------------------------------------------------------------

_ROPE_INIT = """
class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.wq = nn.Linear(16, 16, bias=False)
        self.wk = nn.Linear(16, 16, bias=False)

    def forward(self, x):
        inv = 1.0 / (10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8))
        freqs = torch.outer(torch.arange(4, dtype=torch.float32), inv)
"""


def _rope(body, patterns, kind=SPELLING, dtype=F32):
    lines = "".join(f"        {line.strip()}\n" for line in body.strip().splitlines())
    return _case(_ROPE_INIT + lines, patterns, kind, dtype, [Input("x", (2, 4, 16))])


# mut: a write through a transposed view of q between the rotate-half read and the `q * cos` read
def test_rope_single_write_through_transposed_view():
    check(_rope("""
        emb = freqs.repeat_interleave(2, dim=-1)
        cos = emb.cos().unsqueeze(1)
        sin = emb.sin().unsqueeze(1)
        q = self.wq(x).view(2, 4, 2, 8)
        rq = torch.stack((-q[..., 1::2], q[..., ::2]), dim=-1).flatten(-2)
        q.transpose(0, -1).sub_(0.125)
        return ((rq * sin) + (q * cos),)
    """, ("rope_single",), SAFETY), seed=7)


# detector (fixed here; long run, seed 3957): `q += 1.0` between the rotate-half read and the
# `q * cos` read rebinds q to the write's result, which the rope detector did not read as q itself:
# refused by the patterns and reported by no one
def test_rope_single_written_by_augmented_assignment_between_reads():
    check(_rope("""
        emb = freqs.repeat_interleave(2, dim=-1)
        cos = emb.cos().unsqueeze(-2)
        sin = emb.sin().unsqueeze(1)
        q = self.wq(x).view(2, 4, 2, 8)
        rq = torch.stack((-q[..., 1::2], q[..., ::2]), dim=-1).flatten(-2)
        q += 1.0
        return ((rq * sin) + (q * cos),)
    """, ("rope_single",), SAFETY), seed=3957)


# detector (fixed here; long run, seed 16245): q and k by tables of mixed dtypes (q's rotation a
# near miss for that), k written by `k += 1.0` after its halves were viewed: k's rotation was
# refused with no near miss
def test_rope_pair_with_a_written_key_and_mixed_tables():
    code = """
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.wq = nn.Linear(16, 16, bias=False)
            self.wk = nn.Linear(16, 8, bias=False)

        def forward(self, x, pos):
            inv = 1.0 / (10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8))
            freqs = pos[..., None].float() * inv
            emb = torch.cat((freqs, freqs), dim=-1)
            cos = emb.cos().to(torch.float32).unsqueeze(-3)
            sin = emb.sin().to(x.dtype).unsqueeze(-3)
            q = self.wq(x).view(2, 4, 2, 8).transpose(1, 2)
            q1, q2 = q.chunk(2, dim=-1)
            qo = (torch.cat((-q2, q1), dim=-1) * sin) + (q * cos)
            k = self.wk(x).view(2, 4, 1, 8).transpose(1, 2)
            k1 = k[..., :4]
            k2 = k[..., 4:]
            k += 1.0
            ko = (torch.cat((-k2, k1), dim=-1) * sin) + (k * cos)
            return (qo, ko)
    """
    check(Case(Written(code, [Input("x", (2, 4, 16)), Input("pos", (2, 4), kind="positions", high=64)]),
               ("rope",), SAFETY, F16, "regression"), seed=16245)


# -- gated activations ---------------------------------------------------------------------------

# pattern (fixed here; long run, seeds 0 and 44): an fp16 gate upcast for an exact gelu,
# `F.gelu(g.float()).type_as(g) * u`, with +inf gate values (a -inf input column through the
# linear): CPU eager's fp32 gelu gives NaN at +inf, the op for an fp16 gate +inf (fp16's rule).
# Refused on CPU with the reason (CUDA gives +inf in every dtype: fused there)
def test_geglu_fp32_upcast_of_an_fp16_gate_at_inf():
    code = """
class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_up = nn.Linear(16, 64, bias=False)
        self.down = nn.Linear(32, 16, bias=False)

    def forward(self, x):
        g, u = self.gate_up(x).chunk(2, dim=-1)
        a = F.gelu(g.float()).type_as(g)
        return (self.down(a * u),)
"""
    inputs = [Input("x", (2, 3, 16), scale=30.0, neginf=(3, 7, 15))]
    check(_case(code, ("geglu",), SPELLING, F16, inputs), seed=44)


# -- 2:4 sparsity -----------------------------------------------------------------------------------

# rounding (kernels/lowbit.py, fixed here; long run, 19 seeds): the low-bit kernels' shared epilogue
# stored bf16 with Triton's `.to`, which the interpreter truncates: ~1.6x eager's error (one
# rounding either way, but toward zero); cast_rne rounds to nearest even as eager does
def test_sparse24_bf16_output_rounds_to_nearest():
    code = """
class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16, bias=False)
        keep = (torch.rand(16, 4, 4).argsort(-1) < 2).reshape(16, 16)
        self.lin.weight.data.mul_(keep)

    def forward(self, x):
        return (self.lin(x),)
"""
    case = _case(code, ("sparse24_linear",), SPELLING, BF16, [Input("x", (5, 16))])
    case.options, case.grad = {"sparsity": "2:4"}, False
    check(case, seed=0, strict=True)


# -- losses --------------------------------------------------------------------------------------

_HEAD_INIT = """
class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16, 40, bias=BIAS)

    def forward(self, h, labels):
"""
_HEAD_INPUTS = [Input("h", (2, 5, 16)), Input("labels", (2, 5), kind="labels", high=40)]


def _head(body, patterns, kind=SPELLING, dtype=F32, bias=False):
    lines = "".join(f"        {line.strip()}\n" for line in body.strip().splitlines())
    head = _HEAD_INIT.replace("BIAS", str(bias))
    return _case(head + lines, patterns, kind, dtype, list(_HEAD_INPUTS))


# cast: logits through int32 and back are accepted above the loss (loss off by 2%, and a
# gradient where eager has none)
def test_flce_logits_cast_through_int32():
    check(_head("""
        l = self.head(h).float()
        li = l.to(torch.int32).to(l.dtype)
        return (F.cross_entropy(li.view(-1, 40), labels.view(-1)),)
    """, ("fused_linear_cross_entropy",), SAFETY, BF16), seed=8)


# cast (issue 10 §4): nll_loss of log_softmax is cross-entropy: silent miss
def test_flce_nll_of_log_softmax():
    check(_head("""
        lp = F.log_softmax(self.head(h).view(-1, 40), dim=-1)
        return (F.nll_loss(lp, labels.view(-1), ignore_index=-100),)
    """, ("fused_linear_cross_entropy",)), seed=9)


# pattern (fixed here; long run, 9 wrong answers, e.g. seeds 10650 and 1048575): q and k rotated
# by one `rope` launch when k went through an integer cast (no gradient) gave k's rotation a
# gradient; the oracle paired q's cotangent with it and q's gradient was lost.  The pattern now
# rotates them apart (a near miss says why), and the validator compares autograd's flags.
def test_rope_pair_where_one_side_has_no_gradient():
    check(_rope("""
        emb = freqs.repeat_interleave(2, dim=-1)
        cos = emb.cos().unsqueeze(-2)
        sin = emb.sin().unsqueeze(1)
        q = self.wq(x).view(2, 4, 2, 8)
        rq = torch.stack((-q[..., 1::2], q[..., ::2]), dim=-1).flatten(-2)
        qo = (rq * sin) + (q * cos)
        pre = self.wk(x).view(2, 4, 2, 8)
        k = pre.to(torch.int32).to(pre.dtype)
        rk = torch.stack((-k[..., 1::2], k[..., ::2]), dim=-1).flatten(-2)
        return (qo, k * cos + rk * sin)
    """, ("rope",), SAFETY), seed=10650)


# oracle (long run, seeds 144 and 187): `sin += 1.0` between q's and k's rotations: q rotated
# alone, k's rotation a `rope_single` near miss, which is the report for the pair
def test_rope_pair_with_a_table_written_between_the_rotations():
    case = _rope("""
        emb = freqs.repeat_interleave(2, dim=-1)
        cos = emb.cos().unsqueeze(-2)
        sin = emb.sin().unsqueeze(1)
        q = self.wq(x).view(2, 4, 2, 8)
        rq = torch.stack((-q[..., 1::2], q[..., ::2]), dim=-1).flatten(-2)
        qo = q * cos + rq * sin
        sin += 1.0
        k = self.wk(x).view(2, 4, 2, 8)
        rk = torch.stack((-k[..., 1::2], k[..., ::2]), dim=-1).flatten(-2)
        return (qo, (rk * sin) + (k * cos))
    """, ("rope",), SAFETY, F16)
    case.reported_as = ("rope_single",)
    reports = check(case, seed=144)
    assert any(m.pattern == "rope_single" for r in reports for m in r.matches)
    assert any(n.pattern == "rope_single" for r in reports for n in r.near_misses)


# mut: q and k rotated together (one `rope` launch); q's fp32 copy written through a flat view
# between the two half-slice reads
def test_rope_pair_write_through_flat_view_between_slices():
    check(_rope("""
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos().unsqueeze(-2)
        sin = emb.sin().unsqueeze(-2)
        q = self.wq(x).view(2, 4, 2, 8)
        qf = q.to(torch.float32)
        qf1 = qf[..., :4]
        qf.view(-1)[:3].add_(1.0)
        qf2 = qf[..., 4:]
        qo = (qf * cos + torch.cat((-qf2, qf1), dim=-1) * sin).to(q.dtype)
        k = self.wk(x).view(2, 4, 2, 8).float()
        k1, k2 = k.chunk(2, dim=-1)
        ko = (k * cos + torch.cat((-k2, k1), dim=-1) * sin).to(q.dtype)
        return (qo, ko)
    """, ("rope",), SAFETY, BF16), seed=10)


# rounding (kernels/fused_linear_cross_entropy.py): the lm-head bias gradient was further from
# float64 than eager bf16 (1.6x here): the forward's gradients were rounded to bf16 and rounded
# again after backward's scale.  Since then: formed in fp32 and rounded once after the scale, and
# now, for an fp16 / bf16 head, recomputed in backward and rounded where eager rounds
# (test_flce_low_precision_head_rounds_as_eager)
def test_flce_bf16_bias_gradient_precision():
    case = _head("""
        l = self.head(h).to(torch.float32)
        lv = l[:, :-1, :].contiguous().flatten(0, 1)
        tv = labels[:, :-1].contiguous().reshape(-1)
        lsum = F.cross_entropy(lv, tv, ignore_index=-100, reduction='sum')
        return (lsum / (tv != -100).sum().clamp_min(1),)
    """, ("fused_linear_cross_entropy",), SPELLING, BF16, bias=True)
    check(case, seed=250, strict=True)


# rounding (kernels/fused_linear_cross_entropy.py, fixed here; a search of 150 seeds at 1.25x): an
# fp16 / bf16 lm head with bias, label smoothing, a mean over 3 tokens: the gradients formed in the
# forward (for an upstream gradient of 1, fp32) and rounded once after the scale were a different
# rounding from eager's (which rounds upstream * the CE gradient to the head's dtype before the
# linear's backward), further from float64 than eager's on 6 of 300 (fp16 seed 57: weight
# gradient 1.51x; bf16 seed 4: hidden gradient 1.42x).  A low-precision head now recomputes in
# backward with the upstream gradient folded in and rounds where eager does (strict: 1.25x).
def test_flce_low_precision_head_rounds_as_eager():
    code = _HEAD_INIT.replace("BIAS", "True") + """        l = self.head(h).float()
        return (F.cross_entropy(l.view(-1, 40), labels.view(-1), label_smoothing=0.1),)
"""
    inputs = [Input("h", (1, 3, 16)), Input("labels", (1, 3), kind="labels", high=40, ignore=True)]
    for dtype, seed in ((F16, 57), (BF16, 4)):
        check(_case(code, ("fused_linear_cross_entropy",), SPELLING, dtype, inputs), seed=seed,
              strict=True)


# crash (kernels/fused_linear_cross_entropy.py, fixed here; long run, 13 seeds): an empty batch
# through the fused lm head + loss with reduction="sum" (label smoothing or not): the backward
# reshaped its saved gradient to (0, -1), which torch cannot resolve
def test_flce_zero_size_batch_sum_backward():
    code = """
class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16, 24, bias=False)

    def forward(self, h, labels):
        lv = F.linear(h, self.head.weight, self.head.bias).float().flatten(0, 1)
        return (F.cross_entropy(lv, labels.reshape(-1), ignore_index=-100, reduction='sum',
                                label_smoothing=0.1),)
"""
    inputs = [Input("h", (0, 5, 16)), Input("labels", (0, 5), kind="labels", high=24, ignore=True)]
    check(_case(code, ("fused_linear_cross_entropy",), SPELLING, F32, inputs), seed=68494)


# detector (new here: patterns/loss_detect.py; long run, seeds 11745 and 512): a log-softmax
# rounded through fp16 (or cast through int32) before nll_loss: no loss pattern matched and none
# reported it; the cross-entropy detector names the casts
def test_cross_entropy_with_a_cast_between_log_softmax_and_nll_is_reported():
    code = """
class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16, 40, bias=False)

    def forward(self, h, labels):
        lv = (h @ self.head.weight.t()).reshape(-1, 40)
        pre = F.log_softmax(lv, dim=-1)
        lp = pre.to(torch.float16).to(pre.dtype)
        return (F.nll_loss(lp, labels.reshape(-1), ignore_index=-100),)
"""
    inputs = [Input("h", (2, 5, 16), scale=1000.0), Input("labels", (2, 5), kind="labels", high=40, ignore=True)]
    check(_case(code, ("fused_linear_cross_entropy",), SAFETY, F32, inputs), seed=11745)


# -- an input rounded on the way in, in every pattern family --------------------------------------

# cast (fixed in the matcher): a bound input binds to the value after a lossy cast chain, so each
# kernel reads the rounded value eager reads (`h.to(bf16).to(h.dtype)`), in every family
_ROUNDED = "hb = h.to(torch.bfloat16).to(h.dtype)"


def test_rms_norm_functional_input_rounded_through_bf16():
    check(_norm(f"""
        {_ROUNDED}
        return (F.rms_norm(hb, (16,), self.weight, 1e-06),)
    """, ("rms_norm",), SAFETY), seed=14)


def test_hand_written_norms_input_rounded_through_fp16():
    check(_norm("""
        hb = h.to(torch.float16).to(torch.float32)
        r = hb * torch.rsqrt(hb.pow(2).mean(-1, keepdim=True) + 1e-06) * self.weight
        xc = hb - hb.mean(-1, keepdim=True)
        ln = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + 1e-05) * self.weight + self.bias
        return (r, ln)
    """, ("rms_norm", "layer_norm"), SAFETY), seed=15)


_GATED_INIT = """
class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.g = nn.Linear(16, 32, bias=False)
        self.u = nn.Linear(16, 32, bias=False)

    def forward(self, x):
"""


def test_gated_act_inputs_rounded_through_bf16():
    body = """
        g = self.g(x).to(torch.bfloat16).to(torch.float32)
        u = self.u(x).to(torch.bfloat16).float()
        return (F.silu(g) * u,)
    """
    lines = "".join(f"        {line.strip()}\n" for line in body.strip().splitlines())
    check(_case(_GATED_INIT + lines, ("swiglu",), SAFETY), seed=16)


def test_rope_input_rounded_through_bf16():
    check(_rope("""
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos().unsqueeze(-2)
        sin = emb.sin().unsqueeze(-2)
        q = self.wq(x).view(2, 4, 2, 8).to(torch.bfloat16).to(torch.float32)
        q1, q2 = q.chunk(2, dim=-1)
        return (q * cos + torch.cat((-q2, q1), dim=-1) * sin,)
    """, ("rope", "rope_single"), SAFETY), seed=17)


def test_flce_hidden_rounded_through_bf16():
    check(_head("""
        hb = h.to(torch.bfloat16).to(h.dtype)
        return (F.cross_entropy(self.head(hb).view(-1, 40), labels.view(-1)),)
    """, ("fused_linear_cross_entropy", "cross_entropy"), SAFETY), seed=18)


def test_cross_entropy_logits_rounded_through_bf16():
    check(_head("""
        l = self.head(h)
        lb = l.to(torch.bfloat16).to(l.dtype)
        return (F.cross_entropy(lb.view(-1, 40), labels.view(-1)), l)
    """, ("cross_entropy", "fused_linear_cross_entropy"), SAFETY), seed=19)


# cast (matcher): the statistic reads h, the product its bf16 rounding: the uses see one input
# cast differently, so it binds before all casts and the lossy chain is refused (not a silent miss)
def test_rms_norm_uses_see_the_input_rounded_differently():
    check(_norm("""
        hb = h.to(torch.bfloat16).to(h.dtype)
        return (hb * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-06) * self.weight,)
    """, ("rms_norm",), SAFETY), seed=24)


# -- distillation (issue 22 survey, 300 examples) --------------------------------------------------

_DISTILL = ("fused_linear_distillation", "distillation_loss")


# gradient accuracy (kernels/distillation.py, fixed here): TVD over rows whose softmax saturates
# (spread 200 at T = 0.5): at the row's largest probability h_j - ps_j * sum(h) cancels; the kernel
# was 1.36x eager's error against float64, it now forms that entry without the cancellation
def test_distill_saturated_row_gradient_at_the_max():
    code = """
class M(nn.Module):
    def forward(self, s, t, labels):
        s1 = s / 0.5
        t1 = t * 2.0
        ls = F.log_softmax(s1, dim=-1)
        ps = ls.exp()
        lt = t1.log_softmax(-1)
        pt = torch.exp(lt)
        d = (pt - ps).abs() / 2.0
        r = d.sum(-1)
        loss = r.mean()
        return (loss,)
"""
    inputs = [Input("s", (2, 3, 24), scale=2.0, spread=200.0),
              Input("t", (2, 3, 24), scale=2.0, grad=False),
              Input("labels", (2, 3), kind="labels", high=24, ignore=True)]
    check(_case(code, _DISTILL, SPELLING, F32, inputs), seed=5095)


# silent miss (patterns/distillation.py, fixed here): a write between the uses of the student's
# softmax (`ps += 1.0`) left the algebra with a node it does not know and no near miss; the write
# is now named
def test_distill_write_to_the_student_softmax_is_reported():
    code = """
class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16, 24, bias=False)

    def forward(self, h, t, labels):
        s = F.linear(h, self.head.weight, self.head.bias)
        s1 = s.reshape(-1, 24) / 0.5
        t1 = t.view(-1, 24) * 2.0
        ps = F.softmax(s1, dim=-1)
        ls = ps.log()
        ps += 1.0
        lt = torch.log_softmax(t1, -1)
        d = ps * (ls - lt)
        r = d.mean(dim=-1)
        mask = (labels != -100).reshape(-1)
        loss = (r * mask).sum() / mask.sum()
        return (loss * (0.5 * 0.5),)
"""
    inputs = [Input("h", (2, 3, 16)), Input("t", (2, 3, 24), scale=2.0, grad=False, spread=110.0),
              Input("labels", (2, 3), kind="labels", high=24, ignore=True)]
    check(_case(code, _DISTILL, SAFETY, F32, inputs), seed=1483)


# gradient accuracy (kernels/distillation.py, fixed here; long run, seed 321): per-token reverse KL
# of logits of size 1000 (rows saturated): the correction at the row's largest probability is
# ~1e-35, below float64's resolution of the terms, where eager (and the float64 reference) give
# exactly 0; the kernel gave the true value, 100% off both.  It keeps the plain form there.
def test_distill_saturated_rows_below_float64_resolution():
    code = """
class M(nn.Module):
    def forward(self, s, t, labels):
        ls = s.log_softmax(-1)
        lt = t.log_softmax(-1)
        d = F.kl_div(lt, ls, reduction='none', log_target=True)
        r = d.sum(-1)
        loss = r[labels != -100].mean()
        return (loss,)
"""
    inputs = [Input("s", (2, 3, 24), scale=1000.0), Input("t", (2, 3, 24), scale=1000.0, grad=False),
              Input("labels", (2, 3), kind="labels", high=24, ignore=True)]
    check(_case(code, _DISTILL, SPELLING, F32, inputs), seed=321)


# rounding (kernels/distillation.py, fixed here; long run, seed 0): per-token JSD of an fp16 / bf16
# lm head summed per sequence: eager rounds the logits gradient to the head's dtype before the
# linear's backward, the per-token backward did not (weight gradient 1.45x eager's error).  The
# per-token backward knows the upstream gradient, so it rounds where eager does (round_grad).
def test_distill_per_token_low_precision_head_rounds_the_logits_gradient():
    code = """
class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16, 24, bias=True)

    def forward(self, h, t):
        s0 = self.head(h).to(torch.float32)
        ls = (s0 / 0.5).log_softmax(-1)
        lt = torch.log_softmax(t.float() * 2.0, -1)
        m = torch.logsumexp(torch.stack([ls + -1.203972804325936, lt + -0.35667494393873245]), 0)
        d = 0.7 * F.kl_div(m, lt, reduction='none', log_target=True) + 0.3 * F.kl_div(m, ls, reduction='none', log_target=True)
        return (d.sum(-1).sum(-1),)
"""
    inputs = [Input("h", (2, 3, 16)), Input("t", (2, 3, 24), scale=2.0, grad=False)]
    for dtype in (F16, BF16):
        check(_case(code, _DISTILL, SPELLING, dtype, inputs), seed=0, strict=True)


# rounding (kernels/distillation.py + patterns/distillation.py, fixed here; long run, seed 10): an
# fp16 head's reduced loss: the gradients computed in the forward (for an upstream gradient of 1,
# unrounded, scaled in backward) were statistically eager's error but 1.37x it here (eager rounds
# upstream * the logits gradient to fp16 before the linear's backward).  A low-precision head now
# recomputes in backward with the upstream gradient folded in, rounded where eager rounds.
def test_distill_low_precision_head_reduced_loss_rounds_as_eager():
    code = """
class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16, 24, bias=True)

    def forward(self, h, t):
        s0 = self.head(h).to(torch.float32)
        ls = F.log_softmax(s0 / 0.5, dim=-1)
        lt = F.log_softmax(t.float() / 0.5, dim=-1)
        d = F.kl_div(lt, ls.exp(), reduction='none')
        return (d.sum(-1).mean(),)
"""
    inputs = [Input("h", (2, 3, 16)), Input("t", (2, 3, 24), scale=2.0, grad=False)]
    for dtype in (F16, BF16):
        check(_case(code, _DISTILL, SPELLING, dtype, inputs), seed=10, strict=True)


# silent miss (patterns/distillation.py, fixed here; long run, seed 2625): `s1 += 1.0` between
# log_softmax(s1) and softmax(s1) made the two leaves read two tensors, so no student was found and
# no reason given; the write to the logits the leaves read is now named
def test_distill_write_to_the_logits_between_the_student_leaves_is_reported():
    code = """
class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16, 24, bias=True)
        self.teacher = nn.Linear(16, 24, bias=True)
        self.teacher.requires_grad_(False)

    def forward(self, h):
        s = F.linear(h, self.head.weight, self.head.bias)
        t = self.teacher(h).detach()
        s1 = s.float() / 1.0
        t1 = t.float() * 1.0
        ls = F.log_softmax(s1, dim=-1)
        s1 += 1.0
        ps = F.softmax(s1, dim=-1)
        lt = torch.log_softmax(t1, -1)
        d = ps * (ls - lt)
        return (d.sum(),)
"""
    check(_case(code, _DISTILL, SAFETY, F16, [Input("h", (2, 3, 16))]), seed=2625)

# -- fused_linear_logprob (issue 22) ----------------------------------------------------------------

_LP_INIT = """
class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16, 40, bias=True)

    def forward(self, h, labels):
"""


def _lp(body, kind=SPELLING, dtype=F32, batch=2, spread=0.0, ignore=False):
    lines = "".join(f"        {line.strip()}\n" for line in body.strip().splitlines())
    inputs = [Input("h", (batch, 4, 16), spread=spread),
              Input("labels", (batch, 4), kind="labels", high=40, ignore=ignore)]
    return _case(_LP_INIT + lines, ("fused_linear_logprob",), kind, dtype, inputs)


# pattern (fixed here): -cross_entropy(z.reshape(-1, V)) with the entropy of z itself (not of the
# flattened logits the loss reads) was not seen as the same rows' entropy; the logits then
# escaped to it and the match was left to fused_linear_cross_entropy, which refused: silent miss.
# Rewritten now, the entropy taken from the same pass in z's shape
def test_logprob_neg_cross_entropy_with_entropy_of_unflattened_logits():
    check(_lp("""
        l = F.linear(h, self.head.weight, self.head.bias)
        z = l[:, :-1, :]
        ids = labels[:, 1:]
        idx = ids.clamp_min(0)
        nll = F.cross_entropy(z.reshape(-1, 40), idx.reshape(-1), reduction='none')
        tok = -nll.view(idx.shape)
        tok = tok * (ids != -100)
        pz = torch.softmax(z, -1)
        ent = torch.logsumexp(z, -1) - (pz * z).sum(-1)
        return (tok, ent)
    """, ignore=True), seed=4)


# pattern (fixed here): the same in fp16, an empty batch, and the upcast logits also read
# after the pattern: refused now (the logits escape), with that reason
def test_logprob_neg_cross_entropy_entropy_escaping_logits_empty_batch():
    check(_lp("""
        l = self.head(h)
        l1 = l.float()
        z = l1[:, :-1, :] / 0.7
        ids = labels[:, 1:]
        idx = ids.clamp_min(0)
        nll = F.cross_entropy(z.reshape(-1, 40), idx.reshape(-1), reduction='none')
        tok = -nll.view(idx.shape)
        out = (tok * (ids != -100)).sum(-1)
        pz = torch.softmax(z, -1)
        ent = torch.logsumexp(z, -1) - (pz * z).sum(-1)
        return (out + l1.mean(), ent)
    """, SAFETY, F16, batch=0, ignore=True), seed=517703)


# passes (fixed here: passes.Defer): the logits also returned before the shift, the match left to
# fused_linear_cross_entropy (which writes logits from its pass) raised Skip; that pattern
# refused (it cannot return the unshifted logits): silent miss.  A hand-off that the other
# pattern does not take is now this pattern's near miss, with both reasons
def test_logprob_left_to_flce_which_refuses_is_a_near_miss():
    for ret in ("(out, l)", "(out + l.mean(),)"):
        check(_lp(f"""
            l = F.linear(h, self.head.weight, self.head.bias)
            z = l.float()[:, :-1, :]
            ids = labels[:, 1:]
            idx = torch.where(ids == -100, 0, ids)
            lp = z.log_softmax(-1)
            tok = torch.gather(lp, -1, idx.unsqueeze(-1)).squeeze(-1)
            out = tok * (ids != -100)
            return {ret}
        """, SAFETY, F16, spread=110.0, ignore=True), seed=42768)


# passes (fixed here: the per-token NLL's hand-off is a passes.Defer; long run, seed 2028): an NLL
# negated into log-probs and also averaged as a loss is fused_linear_cross_entropy's; that pattern
# refused (bf16 temperature) and the log-prob pattern had handed off with a plain Skip: no near
# miss of its own.  Now it is this pattern's near miss where the other does not take it
def test_logprob_nll_also_read_as_a_loss_left_to_flce_which_refuses():
    case = _lp("""
        l = F.linear(h, self.head.weight, self.head.bias)
        ids = labels[:, 1:]
        z = l[:, :-1, :] / 0.7
        idx = ids.clamp_min(0)
        nll = F.cross_entropy(z.reshape(-1, 40), idx.reshape(-1), reduction='none')
        tok = -(nll.reshape(idx.shape[0], -1)) * (ids != -100)
        return (tok.sum(-1) + nll.mean(),)
    """, SAFETY, BF16, ignore=True)
    reports = check(case, seed=2028)
    assert any(n.pattern == "fused_linear_logprob" for r in reports for n in r.near_misses)


# detector (fixed here: patterns/logprob_detect.py): the log-softmax rounded through fp16
# before the gather; the pattern reads no cast inside a log-prob, so the matcher never reached
# its constraints and no near miss was made: silent miss.  The detector reports it
def test_logprob_log_softmax_rounded_before_gather_is_a_near_miss():
    check(_lp("""
        l = F.linear(h, self.head.weight, self.head.bias)
        z = l.float()[:, :-1, :]
        pre = z.log_softmax(-1)
        lp = pre.to(torch.float16).to(pre.dtype)
        return (torch.gather(lp, -1, labels[:, 1:][..., None]).squeeze(-1),)
    """, SAFETY, F16, spread=110.0), seed=42768)


# kernel (fixed here): `z / 0.7` was computed as z times the rounded 1/0.7, an ulp off; the
# entropy of near one-hot rows (logits in the thousands) amplifies that to 3x eager's error
# (validation refused the rewrite: a crash under validate="raise").  The op divides now
def test_logprob_entropy_temperature_divides_as_eager():
    code = _LP_INIT.replace("40", "24") + """
        l = F.linear(h, self.head.weight, self.head.bias)
        z = l.float()[:, :-1, :] / 0.7
        ids = labels[:, 1:]
        idx = ids.clamp_min(0)
        tok = torch.gather(z.log_softmax(-1), -1, idx.unsqueeze(-1)).squeeze(-1)
        lq = F.log_softmax(z, dim=-1)
        ent = -(F.softmax(z, dim=-1) * lq).sum(-1)
        return (tok * (ids != -100), ent)
    """
    inputs = [Input("h", (2, 4, 16), scale=1000.0),
              Input("labels", (2, 4), kind="labels", high=24, ignore=True)]
    check(Case(Written(code, inputs), ("fused_linear_logprob",), SPELLING, F32, "regression",
               dynamic=True), seed=262145)


# detector (fixed here): in the selective form, the gathered logits rounded through fp16, or the
# logits written in place between the gather and the logsumexp (two values of them: no match),
# and the log-probs written in place before the gather: silent misses, reported now
def test_logprob_selective_form_cast_or_write_inside_is_a_near_miss():
    for inside in ("sel = sel0.to(torch.float16).to(sel0.dtype)\nl1 = l1",
                   "sel = sel0\nl1 += 1.0"):
        check(_lp(f"""
            l = self.head(h)
            l1 = l.to(torch.float32)
            sel0 = torch.gather(l1, -1, labels[:, :, None]).squeeze(-1)
            {inside}
            return ((sel - l1.logsumexp(-1)).sum(-1),)
        """, SAFETY, BF16), seed=234)
    check(_lp("""
        lp = F.log_softmax(self.head(h).float(), -1)
        lp.mul_(2.0)
        return (lp.gather(-1, labels.unsqueeze(-1)).squeeze(-1),)
    """, SAFETY, F16), seed=3)


# kernel (fixed here, issue 22 logprob seed 3311): the entropy spelled logsumexp(z) -
# (softmax(z) * z).sum(-1) at logits ~1400 in fp32 cancels to exactly 0 in eager (and in its
# float64 reference) for near one-hot rows, where the op's -(p * logp).sum() gave the true 1e-13;
# the op now forms that spelling's entropy as it does (entropy_lse), and its gradient from
# -(p * logp) again, not from the cancelled value (seed 2: 70x eager's gradient error otherwise)
def test_logprob_entropy_lse_spelling_at_large_logits_cancels_as_eager():
    code = """
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(16, 40, bias=False)

        def forward(self, h, labels):
            l = self.head(h)
            z = l / 0.7
            lp = F.log_softmax(z, -1)
            tok = lp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
            pz = torch.softmax(z, -1)
            ent = torch.logsumexp(z, -1) - (pz * z).sum(-1)
            return (tok.sum(-1), ent)
    """
    inputs = [Input("h", (2, 4, 16), scale=1000.0), Input("labels", (2, 4), kind="labels", high=40)]
    for seed in (0, 2):
        reports = check(Case(Written(code, inputs), ("fused_linear_logprob",), SPELLING, F32,
                             "regression"), seed=seed)
        assert any(m.pattern == "fused_linear_logprob" for r in reports for m in r.matches)


# validator (fixed here, issue 22 gated): gate and up written as the same slice twice
# (`gu[..., :24]` for both) are one value to the pattern, so the rewrite reads one of the two
# nodes for both operands; the validator compared the gradients of the two nodes one by one
# (rewrite: all of it to `g`, none to `u`) and refused a correct rewrite: a crash under
# validate="raise".  The gradients of two nodes computing the same pure op of the same inputs
# are now compared summed.  With -inf inputs too (the long run's finding 1 family)
def test_geglu_gate_and_up_the_same_slice():
    for neginf, act in (((), "F.gelu(g)"), ((3,), "F.gelu(g, approximate='tanh')")):
        code = f"""
        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.gate_up = nn.Linear(16, 48, bias=False)
                self.down = nn.Linear(24, 16, bias=False)

            def forward(self, x):
                gu = self.gate_up(x)
                g = gu[..., :24]
                u = gu[..., :24]
                y = {act} * u
                return (self.down(y),)
        """
        for dtype in (F32, BF16):
            check(Case(Written(code, [Input("x", (2, 3, 16), neginf=neginf)]), ("geglu",),
                       SPELLING, dtype, "regression"), seed=1)


# Logprob survey seed 1515: the selective spelling `gather(z, ids) - z.logsumexp(-1)` on a row
# holding +inf (h has a -inf column) gives -inf at a finite id in eager (torch.logsumexp shifts an
# infinite max by 0: lse = +inf), where the op formed log_softmax's (z - max) - log(sum) and got
# NaN (exp(inf - inf)); the weight gradient had 640 non-finite entries against eager's 415.  Fixed
# by the op's gather_lse flag (kernels/fused_linear_logprob.py), forward and backward.
def test_logprob_gather_lse_row_with_inf_logit():
    code = """
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(16, 40, bias=True)

        def forward(self, h, labels):
            z = self.head(h)
            sel = torch.gather(z, -1, labels.unsqueeze(-1)).squeeze(-1)
            return (sel - z.logsumexp(-1),)
    """
    inputs = [Input("h", (2, 4, 16), neginf=(9,)), Input("labels", (2, 4), kind="labels", high=40)]
    check(Case(Written(code, inputs), ("fused_linear_logprob",), SPELLING, F32, "regression"),
          seed=1515)


def _close_rows():
    """Student logits and a teacher 1e-3 away from them: the distillation close-rows cases."""
    return [Input("s", (2, 3, 24), scale=2.0),
            Input("t", (2, 3, 24), scale=1e-3, grad=False, near="s")]


# oracle (tests/differential/noise.py, fixed here; issue 22 survey, seeds 0 and 169): a close-rows
# forward KL reduced to one number: the Triton path's error 2.3x / 4x eager's, each a sum of its
# rows' log-sum-exp roundings of random sign (eager's by chance far below its noise: 0.5 and 0.03
# of the modelled standard deviation).  A scalar now also gets 3 standard deviations of that noise.
def test_distill_close_rows_reduced_loss_within_its_rounding_noise():
    kl = """
class M(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, s, t):
        s0 = s
        t0 = t
        s1 = s0 / 1.0
        t1 = t0 / 1.0
        ls = F.log_softmax(s1, dim=-1)
        lt = F.log_softmax(t1, dim=-1)
        pt = lt.exp()
        loss = F.kl_div(ls, pt, reduction='batchmean')
        return (loss,)
"""
    masked = """
class M(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, s, t, labels):
        s0 = s
        t0 = t
        s1 = s0 / 1.0
        t1 = t0 / 1.0
        ls = torch.log_softmax(s1, -1)
        pt = F.softmax(t1, dim=-1)
        lt = pt.log()
        d = F.kl_div(ls, lt, reduction='none', log_target=True)
        r = d.sum(-1)
        mask = (labels != -100).float()
        loss = (r * mask).sum() / mask.sum()
        return (loss,)
"""
    inputs = _close_rows()
    check(_case(kl, _DISTILL, SPELLING, F32, inputs), seed=0)
    check(_case(masked, _DISTILL, SPELLING, F32,
                inputs + [Input("labels", (2, 3), kind="labels", high=24)]), seed=169)


# Logprob survey seed 311211 (and 5): a bf16 lm head whose fp32-cast logits `z` feed both the
# cross-entropy and another reader (an entropy).  Eager adds the two gradients in fp32 at `z` and
# rounds the sum to bf16 once, at the cast; fused_linear_cross_entropy returned the bf16 logits
# for the other reader, so the two gradients were rounded apart and added after (bias gradient
# 0.00291 relative error against eager's 0.00195).  Now a near miss naming the cast.
@pytest.mark.parametrize("seed", [311211, 5])
def test_flce_low_precision_head_with_logits_read_after_the_upcast(seed):
    code = """
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(16, 40, bias=True)

        def forward(self, h, labels):
            l = F.linear(h, self.head.weight, self.head.bias)
            l1 = l.float()
            l2 = l1[:, :-1, :]
            ids = labels[:, 1:]
            z = l2 / 0.7
            idx = torch.where(ids == -100, 0, ids)
            nll = F.cross_entropy(z.reshape(-1, 40), idx.reshape(-1), reduction='none')
            tok = -(nll.reshape(idx.shape[0], -1))
            tok = tok * (ids != -100)
            lq = torch.log_softmax(z, -1)
            ent = -(lq.exp() * lq).sum(-1)
            return (tok, ent, nll)
    """
    inputs = [Input("h", (2, 4, 16)), Input("labels", (2, 4), kind="labels", high=40, ignore=True)]
    check(Case(Written(code, inputs), ("fused_linear_logprob",), SAFETY, torch.bfloat16,
               "regression"), seed=seed)


# Logprob survey seed 95: `exp(logprob - old)` overflows to inf, so the rewritten cross-entropy's
# upstream gradient is inf in a row; eager's log_softmax backward gives NaN at the label
# (p * inf - inf) where the op's stored gradient times inf gave inf ((p - 1) * inf).  Fixed in
# the op's backward (kernels/cross_entropy.py, _eager_nonfinite_rows).
def test_cross_entropy_upstream_inf_gives_nan_at_the_label():
    code = """
    class M(nn.Module):
        def __init__(self):
            super().__init__()

        def forward(self, logits, labels, old):
            z = logits.to(torch.float32)[:, :-1, :] / 0.7
            lp = z.log_softmax(-1)
            tok = torch.gather(lp, -1, labels[:, 1:, None]).squeeze(-1)
            lq = torch.log_softmax(z, -1)
            return (torch.exp(tok - old), -(lq.exp() * lq).sum(-1))
    """
    inputs = [Input("logits", (2, 4, 40), scale=1000.0),
              Input("labels", (2, 4), kind="labels", high=40),
              Input("old", (3,), scale=1000.0, grad=False)]
    check(Case(Written(code, inputs), ("fused_linear_logprob",), MATH, torch.bfloat16,
               "regression", dynamic=True), seed=95)


# Logprob survey (LIGERFX_DIFF_SEED=1209) seed 11722: the same gather - logsumexp spelling with
# -inf in several columns of h, so a logits row holds +inf, -inf and NaN (inf - inf in the
# matmul).  torch.logsumexp is NaN there (NaN in the row), where the Triton kernel's max skips
# NaN and took the row for +inf-max: weight gradient 211 non-finite entries against eager's 640.
def test_logprob_gather_lse_row_with_inf_and_nan_logits():
    code = """
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(16, 40, bias=True)

        def forward(self, h, labels):
            z = self.head(h).to(torch.float32) / 0.7
            idx = labels.clamp_min(0)
            sel = torch.gather(z, -1, idx.unsqueeze(-1)).squeeze(-1)
            tok = sel - z.logsumexp(-1)
            return (tok * (labels != -100),)
    """
    inputs = [Input("h", (2, 4, 16), neginf=(2, 4, 7, 9, 13)),
              Input("labels", (2, 4), kind="labels", high=40, ignore=True)]
    check(Case(Written(code, inputs), ("fused_linear_logprob",), SPELLING, torch.bfloat16,
               "regression"), seed=11722)


# Resampling (ligerfx/compiler/validate.py `resample`, fixed here; issue 22 long run, seeds 0
# and 5): close rows, whose error is mostly each row's shared log-sum-exp rounding, a few random
# draws.  Seed 0: a forward KL of bf16 inputs upcast, reduced to one number; the validator (1.25x,
# no noise model) dropped the rewrite, a Crash under validate="raise" (0.0494 vs eager's 0.0376).
# Seed 5: the logits' gradient on the Triton path at 1.46x eager's (2.63e-4 vs 1.8e-4).  A gap of
# size alone is now judged on 9 input sets an ulp apart, by majority.
def test_distill_close_rows_judged_on_resampled_inputs():
    upcast = """
class M(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, s, t):
        s0 = s.float()
        t0 = t.float()
        s1 = s0 / 2.0
        t1 = t0 * 0.5
        ls = torch.log_softmax(s1, -1)
        lt = torch.log_softmax(t1, -1)
        pt = lt.exp()
        loss = F.kl_div(ls, pt, reduction='batchmean')
        return (loss,)
"""
    rows = """
class M(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, s, t, labels):
        s0 = s.float()
        t0 = t.float()
        sr = s0.reshape(-1, 24)
        tr = t0.view(-1, 24)
        s1 = sr / 0.5
        t1 = tr / 0.5
        ls = F.log_softmax(s1, dim=-1)
        lt = F.log_softmax(t1, dim=-1)
        loss = F.kl_div(ls, lt, reduction='batchmean', log_target=True)
        return (loss,)
"""
    inputs = _close_rows()
    check(_case(upcast, _DISTILL, SPELLING, BF16, inputs), seed=0)
    check(_case(rows, _DISTILL, SPELLING, F32,
                inputs + [Input("labels", (2, 3), kind="labels", high=24)]), seed=5)


# Softcap backward on the Triton path (kernels/triton_math.py, fixed here; issue 22 long run,
# seeds 4887 and 25554): logits scaled by 1000 under a cap of 30 saturate the tanh.  The kernel's
# 1 - t * t, from its exp-based tanh (about 1.5 ulp of 1 off), gave the logits' and the head's
# gradients 2.6x and 11x eager's error (eager's libm tanh is closer); the derivative is now formed
# as 4e / (1 + e)^2, e = exp(-2|x|), without the cancellation.
@pytest.mark.parametrize("seed", [4887, 25554])
def test_softcap_gradient_where_the_cap_saturates(seed):
    if seed == 4887:
        code = """
class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16, 40, bias=False)

    def forward(self, h, labels):
        l = h @ self.head.weight.t()
        l2 = 30.0 * torch.tanh(l / 30.0)
        lsum = F.cross_entropy(l2.view(-1, 40), labels.reshape(-1), ignore_index=-100, reduction='sum')
        loss = lsum / (labels != -100).sum().clamp_min(1)
        return (loss,)
"""
        inputs = [Input("h", (2, 5, 16), scale=1000.0),
                  Input("labels", (2, 5), kind="labels", high=40, ignore=True)]
        patterns = ("fused_linear_cross_entropy",)
    else:
        code = """
class M(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, logits, labels):
        l = logits * 1.5
        l2 = 30.0 * torch.tanh(l / 30.0)
        loss = F.cross_entropy(l2.view(-1, 40), labels.reshape(-1), reduction='sum')
        return (loss,)
"""
        inputs = [Input("logits", (2, 5, 40), scale=1000.0), Input("labels", (2, 5), kind="labels", high=40)]
        patterns = ("cross_entropy",)
    check(Case(Written(code, inputs), patterns, SPELLING, F32, "regression", dynamic=True),
          seed=seed, paths=("triton",))


# OPEN (issue 22 long run, logprob seed 0; not fixed, kept as a strict xfail): the entropy spelled
# `logsumexp(z) - (softmax(z) * z).sum(-1)` of logits in the thousands (h scaled by 1000), a near
# one-hot row.  Eager's sum(softmax * z) absorbs the other logits' terms (1e-17 * 37) into the
# largest logit exactly, in fp32 and in the float64 reference alike, so both give the largest
# logit's gradient as exactly 0; the op's entropy_lse gradient, -p * (logp + H), gives the true
# -3.4e-15, 100% off both (hidden's gradient at 1.09 relative error, eager's 2.5e-5, on 9 of 9
# input sets).  Forming the gradient as eager's autograd does (g * exp(z - lse) - g * p + softmax's
# backward of E[z]) matches eager on the torch path but not on the Triton one, whose log-sum-exp
# rounds to the other side of an ulp of the logits in a tie (5.5% vs eager's 0.5% on a row of
# tests/kernels/test_logprob_entropy_lse.py seed 1); leaving out the two terms that cancel exactly
# gives 4%.  See docs/post_training.md.
@pytest.mark.xfail(strict=True, reason="open: float64 reference absorbs like eager (issue 22)")
def test_entropy_lse_gradient_where_the_reference_absorbs_like_eager():
    code = """
class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16, 40, bias=False)

    def forward(self, h, labels, old):
        l = F.linear(h, self.head.weight, self.head.bias)
        ids = labels.to(torch.float16).to(labels.dtype)
        z = l / 2.0
        idx = ids.clamp_min(0)
        sel = torch.gather(z, -1, idx[:, :, None]).squeeze(-1)
        tok = sel - z.logsumexp(-1)
        tok = tok * (ids != -100)
        out = torch.exp(tok - old)
        pz = torch.softmax(z, -1)
        ent = torch.logsumexp(z, -1) - (pz * z).sum(-1)
        return (out, ent)
"""
    inputs = [Input("h", (2, 4, 16), scale=1000.0),
              Input("labels", (2, 4), kind="labels", high=40, ignore=True),
              Input("old", (2, 4), scale=1000.0, grad=False)]
    check(Case(Written(code, inputs), ("fused_linear_logprob",), SAFETY, F32, "regression"),
          seed=0, paths=("torch",))


# +inf logits on the Triton path (kernels/cross_entropy.py, fixed here; issue 22 long run, seeds
# 3403 and 2): -inf-masked columns squared become +inf.  Eager's log_softmax of a row whose max
# is +inf is NaN throughout, so even an ignored row's gradient is NaN (0 - exp(nan) * 0); the
# kernel wrote 0 into every ignored row without reading it (130 non-finite values, eager 196).
@pytest.mark.parametrize("seed,neginf", [(3403, (0, 21)), (2, (0,))])
def test_ce_ignored_rows_with_plus_inf_logits(seed, neginf):
    code = """
class M(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, logits, labels):
        l = logits * 1.5
        l1 = l.float() ** 2
        ls = l1[:, :-1, :].contiguous()
        ts = labels[:, 1:].contiguous()
        lsum = F.cross_entropy(ls.reshape(-1, 24), ts.reshape(-1), ignore_index=-100, reduction='sum')
        loss = lsum / (ts != -100).sum().clamp_min(1)
        return (loss,)
"""
    inputs = [Input("logits", (2, 5, 24), scale=3.0, neginf=neginf),
              Input("labels", (2, 5), kind="labels", high=24, ignore=True)]
    check(Case(Written(code, inputs), ("cross_entropy",), MATH, F16, "regression"), seed=seed)


# detector (fixed here; issue 22 long run, layer_norm family, seed 302): `hf += 1.0` between the
# mean and its use in the centring (`mu` read hf before the write, `hf - mu` after): xc is no
# centred value, so the tail is an RMS norm of xc (rewritten, correct), and the layer-norm detector
# said nothing of the refused centring: it walked only the rsqrt products the rewrite had taken.
# Both spellings of the variance's mean the long run failed on
@pytest.mark.parametrize("mean", ["mean(2, keepdim=True)", "mean(dim=-1, keepdim=True)"])
def test_layer_norm_written_between_its_mean_and_the_centring_is_reported(mean):
    code = """
class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 32, bias=False)
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(32))
        self.bias = nn.Parameter(0.1 * torch.randn(32))

    def forward(self, x):
        h = self.proj(x)
        hf = h
        mu = torch.mean(hf, dim=-1, keepdim=True)
        hf += 1.0
        xc = hf - mu
        var = torch.square(xc).MEAN
        n = xc * (var + 1e-06).rsqrt()
        nb = n.type_as(h)
        out = nb * self.weight
        return (out,)
""".replace("MEAN", mean)
    check(Case(Written(code, [Input("x", (2, 3, 32))]), ("layer_norm",), SAFETY, F32, "regression"),
          seed=302)


# detector (fixed here; issue 22 long run, layer_norm seeds 26407 and 5111): `xc += 1.0` between
# the variance of the centred value and the product.  The RMS-norm detector reported it first
# (its mean of squares and product read different values of xc) and the layer-norm detector,
# which sees the same look-alike, was skipped as a second report: a near miss of the wrong family
# for a centred value.  The RMS-norm detector now leaves a centring the layer-norm one reports.
@pytest.mark.parametrize("seed,body", [
    (26407, """
        mu = torch.mean(hf, 2, keepdim=True)
        xc = hf - mu
        var = torch.mean(torch.square(xc), -1, keepdim=True)
        xc += 1.0
        n = xc * (var + 1e-05).rsqrt()
        out = self.weight * n.type_as(h) + self.bias"""),
    (5111, """
        mu = torch.mean(hf, -1, keepdim=True)
        xc = hf - mu
        var = (xc * xc).mean(-1, keepdim=True)
        xc += 1.0
        n = xc * (1.0 / torch.sqrt(var + 1e-05))
        out = n.type_as(h)""")])
def test_layer_norm_written_between_its_variance_and_the_product_is_its_near_miss(seed, body):
    code = """
class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 32, bias=False)
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(32))
        self.bias = nn.Parameter(0.1 * torch.randn(32))

    def forward(self, x):
        h = self.proj(x)
        hf = h.to(torch.float32)BODY
        return (out,)
""".replace("BODY", body)
    check(Case(Written(code, [Input("x", (2, 3, 32))]), ("layer_norm",), SAFETY, F32, "regression"),
          seed=seed)


# constraint (fixed here; issue 22 long run, add_norm seed 38851): `h = h0 + res` then
# `torch.Tensor.add_(h, 0.25)` before the norm reads h.  The RMS norm of the written h is
# rewritten (right), but add_rms_norm's constraint took the scalar add_ for the residual add and
# skipped without a word: a SilentMiss.  It now names the write that stops the fusion.
def test_add_norm_sum_written_in_place_before_the_norm_is_a_near_miss():
    code = """
class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16, bias=False)
        self.weight = nn.Parameter(0.1 * torch.randn(16))

    def forward(self, x, res):
        h0 = self.proj(x)
        h = h0 + res
        hf = h
        torch.Tensor.add_(h, 0.25)
        sq = hf.pow(2)
        var = sq.mean(-1).unsqueeze(-1)
        n = hf / torch.sqrt(var + 1e-06)
        out = (1.0 + self.weight) * n.to(h.dtype)
        return (out,)
"""
    inputs = [Input("x", (2, 3, 16)), Input("res", (2, 3, 16), spread=200.0)]
    reports = check(Case(Written(code, inputs), ("add_rms_norm",), SAFETY, F32, "regression"),
                    seed=38851)
    misses = [n for r in reports for n in r.near_misses if n.pattern == "add_rms_norm"]
    assert misses and "written in place" in misses[0].reason
