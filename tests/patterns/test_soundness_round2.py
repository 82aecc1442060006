"""Issue 22 regressions for RoPE, the norms and gated RMSNorm: mixed-dtype RoPE tables, the
gradient eager rounds per branch, symbolic eps under dynamic=True, and equal spellings.

Each case runs eager in float64 (the reference), eager in the case's dtype and the liger-compiled
module (inner aot_eager) on both kernel paths, forward and backward, and compares them with the
differential oracle's rule (tests/differential/oracle.compare).  Where a rewrite is exact by
construction (RoPE's dtype plans) the tests also ask for eager's bits.
"""

import pytest
import torch
import torch.nn.functional as F

from tests.differential.oracle import collect_reports, compare

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


def _run(fn, masters, dtypes, grads, cot_seed=1):
    """Outputs and gradients of `fn` on the masters cast to `dtypes` (grads: which need one)."""
    ins = [m.to(d).requires_grad_(g) for m, d, g in zip(masters, dtypes, grads)]
    outs = fn(*ins)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(cot_seed)
    cots = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype) for o in outs]
    leaves = [x for x in ins if x.requires_grad]
    grads = torch.autograd.grad(outs, leaves, cots, allow_unused=True) if leaves else []
    return list(outs), list(grads)


def _compiled(fn, masters, dtypes, grads, dynamic=None):
    """(reference, eager, compiled) results and the reports of the compile."""
    # the reference: the same code in float64 on the inputs rounded to their dtypes
    ref = _run(fn, [m.to(d).double() for m, d in zip(masters, dtypes)], [torch.float64] * len(dtypes),
               grads)
    low = _run(fn, masters, dtypes, grads)
    reports: list = []
    torch._dynamo.reset()
    c = torch.compile(fn, backend="liger", dynamic=dynamic,
                      options={"inner": "aot_eager", "log_report": False})
    with collect_reports(reports):
        got = _run(c, masters, dtypes, grads)
    return ref, low, got, reports


def _assert_as_eager(ref, low, got, dtype, bits=False):
    problems = []
    for kind in (0, 1):
        for i, (a, b, r) in enumerate(zip(got[kind], low[kind], ref[kind])):
            problems.append(compare(f"{'output' if kind == 0 else 'grad'} {i}", a, b, r, dtype))
            if bits and a is not None and not torch.equal(a, b):
                problems.append(f"{'output' if kind == 0 else 'grad'} {i}: not eager's bits "
                                f"(max diff {(a.double() - b.double()).abs().max().item():.3g})")
    problems = [p for p in problems if p]
    assert not problems, problems


def _matches(reports, *names):
    return [m for r in reports for m in r.matches if m.pattern in names]


def _misses(reports, *names):
    return [n for r in reports for n in r.near_misses if n.pattern in names]


# -- RoPE: the dtype each product, the sum and the backward compute in -------------------------

def _rh(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _rope_rotate_half(q, cos, sin):
    return q * cos + _rh(q) * sin


def _rope_typed_back(q, cos, sin):
    return (q * cos + _rh(q) * sin).type_as(q)


def _rope_chunk(q, cos, sin):
    a, b = q.chunk(2, -1)
    c, s = cos[..., :4], sin[..., :4]
    return torch.cat((a * c - b * s, b * c + a * s), -1)


def _rope_even_odd(q, cos, sin):
    a, b = q[..., 0::2], q[..., 1::2]
    c, s = cos[..., :4], sin[..., :4]
    return torch.cat((a * c - b * s, b * c + a * s), -1)


def _rope_pairs(q, cos, sin):
    c, s = cos[..., :4].repeat_interleave(2, -1), sin[..., :4].repeat_interleave(2, -1)
    return q * c + torch.stack((-q[..., 1::2], q[..., ::2]), -1).flatten(-2) * s


def _rope_float_twice(q, cos, sin):
    # q cast separately at each use: autograd rounds each branch back to q's dtype at q
    return q.float() * cos + _rh(q.float()) * sin


def _rope_pair_qk(q, k, cos, sin):
    return q * cos + _rh(q) * sin, k * cos + _rh(k) * sin


def _rope_masters(n_x=1):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64) for _ in range(n_x)]
    ang = torch.rand(5, 4, generator=g, dtype=torch.float64) * 6
    ang = torch.cat((ang, ang), -1)
    return xs + [ang.cos(), ang.sin()]


@pytest.mark.parametrize("q_dt,cos_dt,sin_dt", [(BF16, BF16, FP32), (BF16, FP32, BF16),
                                                (BF16, BF16, FP16), (FP16, FP16, FP32)])
@pytest.mark.parametrize("form", [_rope_rotate_half, _rope_chunk])
def test_rope_mixed_table_dtypes_refused(q_dt, cos_dt, sin_dt, form, kernel_path):
    # one product computes in q's low dtype, the other promoted to fp32: eager rounds only one
    # of them, which liger::rope cannot do; it was rewritten with both in fp32
    ref, low, got, reports = _compiled(form, _rope_masters(), [q_dt, cos_dt, sin_dt],
                                       [True, False, False])
    assert not _matches(reports, "rope", "rope_single")
    misses = _misses(reports, "rope", "rope_single")
    assert misses and "different dtypes by type promotion" in misses[0].reason, misses
    assert "bfloat16" in misses[0].reason or "float16" in misses[0].reason
    _assert_as_eager(ref, low, got, q_dt, bits=True)


@pytest.mark.parametrize("q_dt,table_dt", [(BF16, FP32), (BF16, FP16), (FP16, FP32),
                                           (FP16, BF16)])
@pytest.mark.parametrize("form", [_rope_rotate_half, _rope_typed_back, _rope_chunk,
                                  _rope_even_odd, _rope_pairs, _rope_float_twice])
def test_rope_promoted_tables_gradient_as_eager(q_dt, table_dt, form, kernel_path):
    # the products compute in fp32; eager's autograd casts each product's gradient back to q's
    # dtype and sums the two branches there: liger::rope's grad_dtype does the same (before, the
    # kernel summed in fp32 and rounded once: not eager's gradient)
    ref, low, got, reports = _compiled(form, _rope_masters(), [q_dt, table_dt, table_dt],
                                       [True, False, False])
    ms = _matches(reports, "rope", "rope_single")
    assert ms, [str(r) for r in reports]
    _assert_as_eager(ref, low, got, q_dt, bits=True)


@pytest.mark.parametrize("tables", [(FP32, FP32), (FP16, FP16), (BF16, BF16), (BF16, FP32)])
def test_rope_q_and_k_dtype_grid(tables, kernel_path):
    # q and k rotated together, both needing gradients: rewritten exactly or refused
    ref, low, got, reports = _compiled(_rope_pair_qk, _rope_masters(2), [BF16, BF16, *tables],
                                       [True, True, False, False])
    if tables[0] != tables[1]:
        assert not _matches(reports, "rope", "rope_single")
    else:
        assert _matches(reports, "rope")
    _assert_as_eager(ref, low, got, BF16, bits=True)


@pytest.mark.slow
def test_rope_every_dtype_combination(kernel_path):
    # (q, cos, sin) in {fp32, bf16, fp16}^3, with and without q's gradient: eager's bits or left
    # alone with a reason
    dts = (FP32, BF16, FP16)
    for q_dt in dts:
        for c_dt in dts:
            for s_dt in dts:
                for grad in (True, False):
                    ref, low, got, reports = _compiled(
                        _rope_rotate_half, _rope_masters(), [q_dt, c_dt, s_dt],
                        [grad, False, False])
                    if not _matches(reports, "rope", "rope_single"):
                        assert _misses(reports, "rope", "rope_single")
                    _assert_as_eager(ref, low, got, q_dt, bits=True)


# -- symbolic eps (dynamic=True): kept symbolic, never a crash ----------------------------------

def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _sym_rms(x, r, w, g, eps):
    return _rms(x, w, eps)


def _sym_rms_functional(x, r, w, g, eps):
    return F.rms_norm(x, (16,), w, eps)


def _sym_add_rms(x, r, w, g, eps):
    h = x + r
    return _rms(h, w, eps), h


def _sym_layer_norm(x, r, w, g, eps):
    return F.layer_norm(x, (16,), w, None, eps)


def _sym_layer_norm_manual(x, r, w, g, eps):
    m = x.mean(-1, keepdim=True)
    return (x - m) * torch.rsqrt((x - m).pow(2).mean(-1, keepdim=True) + eps) * w


def _sym_add_layer_norm(x, r, w, g, eps):
    h = x + r
    return F.layer_norm(h, (16,), w, None, eps), h


def _sym_gated(x, r, w, g, eps):
    return _rms(x, w, eps) * F.silu(g)


def _sym_gated_functional(x, r, w, g, eps):
    return F.rms_norm(x, (16,), w, eps) * F.silu(g)


_SYM = {_sym_rms: "rms_norm", _sym_rms_functional: "rms_norm", _sym_add_rms: "add_rms_norm",
        _sym_layer_norm: "layer_norm", _sym_layer_norm_manual: "layer_norm",
        _sym_add_layer_norm: "add_layer_norm", _sym_gated: "gated_rms_norm",
        _sym_gated_functional: "gated_rms_norm"}


@pytest.mark.parametrize("fn", list(_SYM), ids=lambda f: f.__name__)
def test_symbolic_eps_kept_symbolic(fn, kernel_path):
    # eps passed as a float input under dynamic=True arrives as a SymFloat: the replacement
    # passes it on (gated RMSNorm's called float() on it and crashed the compile)
    g = torch.Generator().manual_seed(0)
    masters = [torch.randn(2, 3, 16, generator=g, dtype=torch.float64) for _ in range(2)]
    masters += [torch.randn(16, generator=g, dtype=torch.float64),
                torch.randn(2, 3, 16, generator=g, dtype=torch.float64)]
    reports: list = []
    torch._dynamo.reset()
    c = torch.compile(fn, backend="liger", dynamic=True,
                      options={"inner": "aot_eager", "log_report": False})
    for eps in (1e-6, 1e-3):
        def with_eps(*a, f=fn, e=eps):
            return f(*a, e)

        ref = _run(with_eps, masters, [torch.float64] * 4, [True] * 4)
        low = _run(with_eps, masters, [FP32] * 4, [True] * 4)
        with collect_reports(reports):
            got = _run(lambda *a, e=eps: c(*a, e), masters, [FP32] * 4, [True] * 4)
        _assert_as_eager(ref, low, got, FP32)
    assert _matches(reports, _SYM[fn]), [str(r) for r in reports]


# -- equal spellings: silu written out before a gated norm, h read again after add + norm ------

def _llama_rms(x, w, eps=1e-6):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _gated_sigmoid(x, w, g):
    return _rms(x, w, 1e-6) * (g * torch.sigmoid(g))


def _gated_sigmoid_first(x, w, g):
    a = torch.sigmoid(g) * g
    return _rms(x, w, 1e-6) * a


def _gated_qwen_sigmoid(x, w, g):
    # Qwen3-Next's Qwen3NextRMSNormGated with silu written as g * sigmoid(g) on the fp32 gate
    gf = g.float()
    return (_llama_rms(x, w) * (gf * torch.sigmoid(gf))).to(x.dtype)


@pytest.mark.parametrize("fn,dtype", [(_gated_sigmoid, FP32), (_gated_sigmoid_first, FP32),
                                      (_gated_qwen_sigmoid, FP32), (_gated_qwen_sigmoid, BF16)])
def test_gated_norm_with_silu_written_out(fn, dtype, kernel_path):
    g = torch.Generator().manual_seed(0)
    masters = [torch.randn(2, 3, 16, generator=g, dtype=torch.float64),
               torch.randn(16, generator=g, dtype=torch.float64),
               torch.randn(2, 3, 16, generator=g, dtype=torch.float64)]
    ref, low, got, reports = _compiled(fn, masters, [dtype] * 3, [True] * 3)
    ms = _matches(reports, "gated_rms_norm")
    assert ms and "silu written out" in ms[0].detail, [str(r) for r in reports]
    _assert_as_eager(ref, low, got, dtype)


def test_gated_norm_with_silu_written_out_in_bf16_is_a_near_miss(kernel_path):
    # bf16 `g * sigmoid(g)` rounds sigmoid and the product each; the kernel rounds silu once
    def fn(x, w, g):
        return _llama_rms(x, w) * (g * torch.sigmoid(g))

    g = torch.Generator().manual_seed(0)
    masters = [torch.randn(2, 3, 16, generator=g, dtype=torch.float64),
               torch.randn(16, generator=g, dtype=torch.float64),
               torch.randn(2, 3, 16, generator=g, dtype=torch.float64)]
    ref, low, got, reports = _compiled(fn, masters, [BF16] * 3, [True] * 3)
    assert not _matches(reports, "gated_rms_norm")
    assert any("written out as gate * sigmoid(gate) in bfloat16" in n.reason
               for n in _misses(reports, "gated_rms_norm"))
    _assert_as_eager(ref, low, got, BF16)


def _add_h_read_twice(x, r, w):
    h = x + r
    return _llama_rms(h, w), h * 2, h + 1


def _add_h_read_before_and_after(x, r, w):
    h = x + r
    a = h.sum(-1, keepdim=True)
    y = F.rms_norm(h, (16,), w, 1e-6)
    return y * a, h - a


def _add_h_next_residual(x, r, w):
    h = x + r
    h2 = h + _llama_rms(h, w)
    return _llama_rms(h2, w) * h, h2 * h


def _add_ln_h_read_twice(x, r, w):
    h = x + r
    return F.layer_norm(h, (16,), w, None, 1e-5), h * 2, h.float().sum()


@pytest.mark.parametrize("fn", [_add_h_read_twice, _add_h_read_before_and_after,
                                _add_h_next_residual, _add_ln_h_read_twice],
                         ids=lambda f: f.__name__)
@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_add_norm_fuses_when_h_is_read_again(fn, dtype, kernel_path):
    g = torch.Generator().manual_seed(0)
    masters = [torch.randn(2, 3, 16, generator=g, dtype=torch.float64),
               torch.randn(2, 3, 16, generator=g, dtype=torch.float64),
               torch.randn(16, generator=g, dtype=torch.float64)]
    ref, low, got, reports = _compiled(fn, masters, [dtype] * 3, [True] * 3)
    ms = _matches(reports, "add_rms_norm", "add_layer_norm")
    assert ms and all("h also returned" in m.detail for m in ms), [str(r) for r in reports]
    _assert_as_eager(ref, low, got, dtype)
