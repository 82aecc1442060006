"""Rotary-embedding spellings from non-Hugging-Face codebases (issue 23 §1): each is rewritten
into one paired `rope` (q and k together), eager-equal forward and backward on both kernel
paths, and look-alikes that are not these rotations are refused with a near miss.

1. `unbind`: interleaved pairs as `x.float().reshape(.., -1, 2).unbind(-1)`, `xr*cos - xi*sin`,
   `xr*sin + xi*cos`, `stack(.., -1).flatten(3)` (the gpt-fast form through canonical `select`);
2. `sign`: halves with the sign inside a product, `x1*cos + x2*sin`, `x1*(-sin) + x2*cos`
   (the halves form by -theta through the canonical `p + a*(-b)` == `p - a*b`);
3. `complex_halves`: `view_as_complex(stack(chunk(x, 2, -1), -1)) * freqs_cis`, back with
   `cat(chunk(view_as_real(..), 2, -1), -2)`: rotate_half's layout (pair (i, h + i)).
"""

import copy

import pytest
import torch
import torch.nn as nn

import ligerfx
import ligerfx.backend
from tests.compare import compare_training_step

ROPE = ("rope", "rope_single")
B, T, H, D, E = 2, 6, 4, 8, 16


def _angles(width, t=T):
    # random angles (not a position grid): every pair of a table differs
    return torch.rand(t, width) * 6.0 - 3.0


def _unbind(x, cos, sin, cast):
    # x [b, t, h, d]; cos / sin [t, d / 2], one angle per pair
    xr, xi = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    out_r = xr * cos - xi * sin
    out_i = xr * sin + xi * cos
    out = torch.stack([out_r, out_i], -1).flatten(3)
    return out.type_as(x) if cast else out


def _sign(x, cos, sin, cast, signs=(1, -1)):
    # x [b, h, t, d]; cos / sin [t, d / 2]; the sign of each sine term inside its product
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    s1 = sin if signs[0] > 0 else -sin
    s2 = sin if signs[1] > 0 else -sin
    y1 = x1 * cos + x2 * s1
    y2 = x1 * s2 + x2 * cos
    out = torch.cat([y1, y2], -1)
    return out.type_as(x) if cast else out


def _complex_halves(x, freqs_cis, cast):
    # x [b, t, h, d]; freqs_cis complex [t, d / 2]
    xc = torch.view_as_complex(torch.stack(torch.chunk(x.transpose(1, 2).float(), 2, dim=-1), dim=-1))
    out = torch.view_as_real(xc * freqs_cis)
    out = torch.cat(torch.chunk(out, 2, dim=-1), dim=-2)
    out = out.reshape(out.shape[0], out.shape[1], out.shape[2], -1).transpose(1, 2)
    return out.type_as(x) if cast else out


class _Attn(nn.Module):
    """q and k of one attention layer (k with fewer heads) rotated by one spelling."""

    def __init__(self, spelling, cast=True, table_dtype=torch.float32, **kw):
        super().__init__()
        self.spelling, self.cast, self.kw = spelling, cast, kw
        self.wq, self.wk = nn.Linear(E, H * D, bias=False), nn.Linear(E, 2 * D, bias=False)
        ang = _angles(D // 2)
        if spelling == "complex_halves":
            self.register_buffer("freqs_cis", torch.polar(torch.ones_like(ang), ang))
        else:
            self.register_buffer("cos", ang.cos().to(table_dtype))
            self.register_buffer("sin", ang.sin().to(table_dtype))

    def rot(self, x):
        if self.spelling == "unbind":
            return _unbind(x, self.cos, self.sin, self.cast)
        if self.spelling == "sign":
            return _sign(x.transpose(1, 2), self.cos, self.sin, self.cast, **self.kw).transpose(1, 2)
        return _complex_halves(x, self.freqs_cis, self.cast)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.rot(self.wq(x).view(b, t, H, D))
        k = self.rot(self.wk(x).view(b, t, 2, D))
        # every output channel reaches the loss with its own weight
        w = torch.arange(1, D + 1, dtype=q.dtype) / D
        return ((q * w).sum(2) * (k * w).sum(2)).sum(-1)


def _counts(report):
    return {k: report.counts.get(k, 0) for k in ROPE}


_SPELLINGS = ["unbind", "sign", "complex_halves"]
_FORMS = {"unbind": "stacked pairs", "sign": "chunked halves by -theta",
          "complex_halves": "complex halves"}


@pytest.mark.parametrize("cast", [True, False], ids=["type_as", "no_cast"])
@pytest.mark.parametrize("spelling", _SPELLINGS)
def test_fp32_training_step(spelling, cast, kernel_path):
    model = _Attn(spelling, cast)
    report = compare_training_step(model, (torch.randn(B, T, E),))
    assert _counts(report) == {"rope": 1, "rope_single": 0}, report.near_misses
    (m,) = [m for m in report.matches if m.pattern == "rope"]
    assert m.detail.startswith(_FORMS[spelling]), m.detail


def _run(model, x):
    x = x.clone().requires_grad_(True)
    out = model(x)
    out.double().sum().backward()
    grads = [x.grad] + [p.grad for p in model.parameters()]
    return [out.detach()] + grads


def _err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("spelling,table_dtype", [
    ("unbind", torch.float32), ("sign", torch.bfloat16), ("sign", torch.float32),
    ("complex_halves", torch.float32)], ids=["unbind", "sign_bf16_tables", "sign_fp32_tables",
                                             "complex_halves"])
def test_bf16_no_further_from_fp64_than_eager(spelling, table_dtype, kernel_path):
    # bf16 q / k: the compiled model is no further from float64 than eager bf16 is (it reproduces
    # eager's roundings: fp32 math rounded once, or each bf16 product and sum rounded)
    torch.manual_seed(0)
    base = _Attn(spelling, True, table_dtype)
    x = torch.randn(B, T, E)
    ref = _run(copy.deepcopy(base).double(), x.double())
    eager = _run(copy.deepcopy(base).bfloat16(), x.bfloat16())
    ligerfx.backend.last_report = None
    compiled = torch.compile(copy.deepcopy(base).bfloat16(), backend="liger",
                             options={"inner": "aot_eager"})
    got = _run(compiled, x.bfloat16())
    assert _counts(ligerfx.backend.last_report) == {"rope": 1, "rope_single": 0}
    for g, e, r in zip(got, eager, ref):
        assert g.dtype == e.dtype
        assert _err(g, r) <= _err(e, r) * 1.01 + 1e-7, (_err(g, r), _err(e, r))


@pytest.mark.parametrize("spelling", _SPELLINGS)
def test_validate_raise(spelling, torch_path):
    model = _Attn(spelling, True)
    report = compare_training_step(model, (torch.randn(B, T, E),),
                                   options={"validate": "raise"})
    assert _counts(report) == {"rope": 1, "rope_single": 0}


# -- look-alikes: near misses, nothing rewritten -----------------------------------------------


def _misses(report):
    return [m.reason for m in report.near_misses if m.pattern in ROPE]


@pytest.mark.parametrize("signs", [(1, 1), (-1, -1)], ids=["plus", "minus"])
def test_sign_equal_signs_refused(signs):
    model = _Attn("sign", True, signs=signs)
    report = ligerfx.explain(model, torch.randn(B, T, E))
    assert _counts(report) == {"rope": 0, "rope_single": 0}
    assert any("not a rotation" in r for r in _misses(report)), report.near_misses


class _PairsFullTables(nn.Module):
    """Interleaved pairs in real arithmetic on full-width tables whose pairs (2i, 2i+1) hold
    different angles: not a rotation of pairs."""

    def __init__(self):
        super().__init__()
        ang = _angles(D)
        self.register_buffer("cos", ang.cos())
        self.register_buffer("sin", ang.sin())

    def rot(self, x):
        c, s = self.cos[None, :, None, :], self.sin[None, :, None, :]
        xr, xi = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)
        return x * c + torch.stack((-xi, xr), -1).flatten(3) * s

    def forward(self, q, k):
        return self.rot(q), self.rot(k)


def test_pairs_not_one_angle_per_pair_refused():
    report = ligerfx.explain(_PairsFullTables(), torch.randn(B, T, H, D), torch.randn(B, T, H, D))
    assert _counts(report) == {"rope": 0, "rope_single": 0}
    assert any("one angle per pair" in r for r in _misses(report)), report.near_misses


class _ComplexHalvesToPairs(nn.Module):
    """Halves as complex numbers, written back as interleaved (real, imag) pairs."""

    def __init__(self):
        super().__init__()
        ang = _angles(D // 2)
        self.register_buffer("freqs_cis", torch.polar(torch.ones_like(ang), ang))

    def rot(self, x):
        xc = torch.view_as_complex(torch.stack(torch.chunk(x.float(), 2, dim=-1), dim=-1))
        return torch.view_as_real(xc * self.freqs_cis).flatten(3)

    def forward(self, q, k):
        return self.rot(q), self.rot(k)


def test_complex_halves_to_pairs_refused():
    q, k = torch.randn(B, H, T, D), torch.randn(B, H, T, D)
    report = ligerfx.explain(_ComplexHalvesToPairs(), q, k)
    assert _counts(report) == {"rope": 0, "rope_single": 0}
    assert any("not this mix" in r for r in _misses(report)), report.near_misses


def test_single_tensor_spellings():
    # only q rotated: `rope_single`, each spelling
    for spelling in _SPELLINGS:
        model = _Attn(spelling, True)

        class _QOnly(nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, x):
                b, t, _ = x.shape
                return self.m.rot(self.m.wq(x).view(b, t, H, D))

        report = ligerfx.explain(_QOnly(model), torch.randn(B, T, E))
        assert _counts(report) == {"rope": 0, "rope_single": 1}, (spelling, report.near_misses)


class _PairsUnbind(nn.Module):
    """GPT-J's interleaved pairs in real arithmetic, the pairs taken by unbind, on tables built
    one angle per pair (`repeat_interleave(2, -1)`): the canonical select-of-unflatten is the
    strided slice, so this is the `pairs` form."""

    def __init__(self):
        super().__init__()
        self.wq, self.wk = nn.Linear(E, H * D, bias=False), nn.Linear(E, 2 * D, bias=False)
        self.register_buffer("ang", _angles(D // 2))

    def rot(self, x):
        emb = self.ang.repeat_interleave(2, dim=-1)
        c, s = emb.cos()[None, :, None, :], emb.sin()[None, :, None, :]
        xr, xi = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
        return x * c + torch.stack((-xi, xr), -1).flatten(3) * s

    def forward(self, x):
        b, t, _ = x.shape
        q = self.rot(self.wq(x).view(b, t, H, D))
        k = self.rot(self.wk(x).view(b, t, 2, D))
        return (q.sum(2) * k.sum(2)).sum(-1)


def test_pairs_by_unbind_training_step(kernel_path):
    report = compare_training_step(_PairsUnbind(), (torch.randn(B, T, E),))
    assert _counts(report) == {"rope": 1, "rope_single": 0}, report.near_misses
    (m,) = [m for m in report.matches if m.pattern == "rope"]
    assert m.detail.startswith("pairs"), m.detail


class _ComplexPairsToHalves(nn.Module):
    """The mirror of `complex_halves`: interleaved pairs as complex numbers, the result written
    back as halves (real parts first): the kernel's interleaved mode with halves_out."""

    def __init__(self):
        super().__init__()
        self.wq, self.wk = nn.Linear(E, H * D, bias=False), nn.Linear(E, 2 * D, bias=False)
        ang = _angles(D // 2)
        self.register_buffer("freqs_cis", torch.polar(torch.ones_like(ang), ang))

    def rot(self, x):
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        out = torch.cat(torch.chunk(torch.view_as_real(xc * self.freqs_cis), 2, dim=-1), dim=-2)
        return out.squeeze(-1).type_as(x)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.rot(self.wq(x).view(b, t, H, D).transpose(1, 2))
        k = self.rot(self.wk(x).view(b, t, 2, D).transpose(1, 2))
        w = torch.arange(1, D + 1, dtype=q.dtype) / D
        return ((q * w).sum(1) * (k * w).sum(1)).sum(-1)


def test_complex_pairs_to_halves_training_step(kernel_path):
    report = compare_training_step(_ComplexPairsToHalves(), (torch.randn(B, T, E),))
    assert _counts(report) == {"rope": 1, "rope_single": 0}, report.near_misses
    (m,) = [m for m in report.matches if m.pattern == "rope"]
    assert m.detail.startswith("complex pairs to halves"), m.detail


@pytest.mark.parametrize("items,rank,keeps", [
    ((None, slice(None), None, slice(None)), 2, True), ((slice(None), None), 2, True),
    ((None,), 2, True), ((Ellipsis, None, slice(None)), 2, True), ((0,), 2, True),
    ((Ellipsis, None), 2, False), ((slice(None), slice(None), None), 2, False),
    ((slice(None), 0), 2, False), ((Ellipsis, 0), 2, False),
    ((slice(1, None), None), 2, False),  # conservative: a cut dim with a new one is not followed
    ((None, slice(None, 2)), 1, False)])
def test_keeps_last_dim(items, rank, keeps):
    # the pairs proof follows indexing only where the table's last dim stays whole and last
    from ligerfx.patterns.rope import _keeps_last_dim

    assert _keeps_last_dim(items, rank) is keeps
