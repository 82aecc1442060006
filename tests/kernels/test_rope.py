"""Tests for liger::rope / liger::rope_backward against a float64 eager reference.

The reference is written independently of kernels/rope.py: Hugging Face's rotate_half formula and
torchtitan's complex multiplication, with gradients from autograd (so the kernel's hand-written
transpose is checked, with random cos/sin whose halves differ).
"""

import pytest
import torch

from ligerfx.kernels import rope as rope_mod
from ligerfx.kernels.rope import rope


def ref_rope(x, cos, sin, seq_dim, interleaved):
    """float64 reference on one tensor in either layout."""
    x = x.double()
    if seq_dim == 1:
        x = x.transpose(1, 2)  # -> [b, h, t, d]
    c = (cos if cos.dim() == 3 else cos[None]).double()[:, None]  # [b|1, 1, t, r']
    s = (sin if sin.dim() == 3 else sin[None]).double()[:, None]
    r = cos.shape[-1] * (2 if interleaved else 1)
    xr, xp = x[..., :r], x[..., r:]
    if interleaved:
        xc = torch.view_as_complex(xr.reshape(*xr.shape[:-1], r // 2, 2).contiguous())
        out = torch.view_as_real(xc * torch.complex(c, s)).flatten(-2)
    else:
        x1, x2 = xr[..., : r // 2], xr[..., r // 2:]
        out = xr * c + torch.cat((-x2, x1), dim=-1) * s
    out = torch.cat((out, xp), dim=-1)
    return out.transpose(1, 2) if seq_dim == 1 else out


def make(b, t, hq, hk, d, rot, seq_dim, interleaved, dtype, cos_kind="t", cos_dtype=None):
    shape = (lambda h: (b, h, t, d)) if seq_dim == 2 else (lambda h: (b, t, h, d))
    q = torch.randn(shape(hq), dtype=dtype)
    k = torch.randn(shape(hk), dtype=dtype)
    rr = rot // 2 if interleaved else rot
    lead = {"t": (t,), "1t": (1, t), "bt": (b, t)}[cos_kind]
    cos = torch.randn(*lead, rr, dtype=cos_dtype or dtype)
    sin = torch.randn(*lead, rr, dtype=cos_dtype or dtype)
    return q, k, cos, sin


def check(q, k, cos, sin, seq_dim, interleaved, tol):
    q = q.detach().requires_grad_()
    k = k.detach().requires_grad_()
    qo, ko = rope(q, k, cos, sin, seq_dim, interleaved)
    assert qo.shape == q.shape and ko.shape == k.shape
    assert qo.dtype == q.dtype and ko.dtype == k.dtype
    dqo, dko = torch.randn_like(qo), torch.randn_like(ko)
    dq, dk = torch.autograd.grad((qo, ko), (q, k), (dqo, dko))

    q64 = q.detach().double().requires_grad_()
    k64 = k.detach().double().requires_grad_()
    rq, rk = ref_rope(q64, cos, sin, seq_dim, interleaved), ref_rope(k64, cos, sin, seq_dim, interleaved)
    rdq, rdk = torch.autograd.grad((rq, rk), (q64, k64), (dqo.double(), dko.double()))
    for got, want in ((qo, rq), (ko, rk), (dq, rdq), (dk, rdk)):
        torch.testing.assert_close(got.double(), want.detach(), **tol)


FP32 = dict(atol=1e-5, rtol=1e-5)
# One RNE rounding of an fp32 result: within half a bf16 ulp (2^-8 relative).
BF16 = dict(atol=1e-5, rtol=4e-3)

# (head_dim, rotary_dim, cos/sin shape): full, d/2 and d/4 rotary over non-power-of-two dims.
DIMS = [
    (64, 64, "bt"), (80, 80, "t"), (96, 48, "1t"), (128, 32, "bt"),
    (80, 20, "bt"), (96, 96, "t"), (128, 128, "1t"), (64, 16, "t"), (80, 40, "t"), (96, 24, "bt"),
]


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "inter"])
@pytest.mark.parametrize("seq_dim", [1, 2])
@pytest.mark.parametrize("d,rot,cos_kind", DIMS, ids=[f"d{d}r{r}{c}" for d, r, c in DIMS])
def test_rope_fp32(kernel_path, d, rot, cos_kind, seq_dim, interleaved):
    q, k, cos, sin = make(2, 5, 4, 2, d, rot, seq_dim, interleaved, torch.float32, cos_kind)
    check(q, k, cos, sin, seq_dim, interleaved, FP32)


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "inter"])
@pytest.mark.parametrize("seq_dim", [1, 2])
@pytest.mark.parametrize("d,rot,cos_dtype", [(128, 128, torch.float32), (80, 40, torch.bfloat16)])
def test_rope_bf16(kernel_path, d, rot, cos_dtype, seq_dim, interleaved):
    q, k, cos, sin = make(2, 6, 4, 1, d, rot, seq_dim, interleaved, torch.bfloat16, "bt", cos_dtype)
    check(q, k, cos, sin, seq_dim, interleaved, BF16)


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "inter"])
def test_rope_real_angles_one_token(kernel_path, interleaved):
    # Real HF-style tables (cos halves equal) with a single token and a single head.
    d, t = 64, 1
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    ang = torch.outer(torch.arange(7, 7 + t).float(), inv)
    if not interleaved:
        ang = torch.cat((ang, ang), dim=-1)
    q, k = torch.randn(1, 1, t, d), torch.randn(1, 1, t, d)
    check(q, k, ang.cos(), ang.sin(), 2, interleaved, FP32)


@pytest.mark.parametrize("hq,hk", [(20, 4), (3, 3), (5, 1)])
def test_rope_head_counts(kernel_path, hq, hk):
    # hq=20 at d=128 spans two q head blocks per token in the kernel grid.
    q, k, cos, sin = make(1, 3, hq, hk, 128, 128, 1, False, torch.float32, "t")
    check(q, k, cos, sin, 1, False, FP32)


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "inter"])
def test_rope_hf_transposed_view(kernel_path, interleaved):
    # HF: q_proj(x).view(b, t, h, d).transpose(1, 2) -> non-contiguous [b, h, t, d].
    b, t, hq, hk, d = 2, 5, 4, 2, 96
    q = torch.randn(b, t, hq * d).view(b, t, hq, d).transpose(1, 2)
    k = torch.randn(b, t, hk * d).view(b, t, hk, d).transpose(1, 2)
    assert not q.is_contiguous()
    _, _, cos, sin = make(b, t, hq, hk, d, d // 2, 2, interleaved, torch.float32, "bt")
    check(q, k, cos, sin, 2, interleaved, FP32)
    qo, _ = rope(q, k, cos, sin, 2, interleaved)
    assert qo.stride() == q.stride()  # output keeps the input's layout


def test_rope_fused_qkv_slices(kernel_path):
    # q/k as non-dense slices of one fused projection, [b, t, h, d].
    b, t, hq, hk, d = 2, 4, 4, 2, 80
    qkv = torch.randn(b, t, (hq + 2 * hk) * d)
    q = qkv[..., : hq * d].view(b, t, hq, d)
    k = qkv[..., hq * d: (hq + hk) * d].view(b, t, hk, d)
    cos, sin = torch.randn(t, d), torch.randn(t, d)
    check(q, k, cos, sin, 1, False, FP32)


def test_rope_only_q_used(kernel_path):
    q, k, cos, sin = make(1, 3, 2, 1, 64, 64, 2, False, torch.float32)
    q.requires_grad_()
    k.requires_grad_()
    qo, _ = rope(q, k, cos, sin, 2, False)
    dq, dk = torch.autograd.grad(qo.sum(), (q, k), allow_unused=True)
    q64 = q.detach().double().requires_grad_()
    want = torch.autograd.grad(ref_rope(q64, cos, sin, 2, False).sum(), q64)[0]
    torch.testing.assert_close(dq.double(), want, **FP32)
    assert dk is None or torch.count_nonzero(dk) == 0


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "inter"])
def test_rope_launcher_writes_every_element(triton_path, interleaved, backward):
    # Outputs pre-filled with NaN: any element the kernel skips (pass-through tail, masked heads,
    # the odd GQA head block) stays NaN.
    q, k, cos, sin = make(2, 3, 5, 3, 80, 20, 1, interleaved, torch.float32, "bt")
    q_out, k_out = torch.full_like(q, float("nan")), torch.full_like(k, float("nan"))
    rope_mod._launch(q, k, cos, sin, q_out, k_out, 1, interleaved, backward)
    assert not q_out.isnan().any() and not k_out.isnan().any()
    wq = rope_mod.rope_reference(q, cos, sin, 1, interleaved, backward)
    wk = rope_mod.rope_reference(k, cos, sin, 1, interleaved, backward)
    torch.testing.assert_close(q_out, wq, **FP32)
    torch.testing.assert_close(k_out, wk, **FP32)


def test_rope_cos_requires_grad_raises():
    q, k, cos, sin = make(1, 2, 2, 2, 64, 64, 2, False, torch.float32)
    q.requires_grad_()
    with pytest.raises(RuntimeError, match="cos/sin"):
        rope(q, k, cos.requires_grad_(), sin, 2, False)


def test_rope_bad_shapes_raise():
    q, k, cos, sin = make(1, 2, 2, 2, 64, 64, 2, False, torch.float32)
    with pytest.raises(RuntimeError):
        rope(q, k, torch.randn(2, 65), torch.randn(2, 65), 2, False)  # rotary_dim > head_dim
    with pytest.raises(RuntimeError):
        rope(q, k, torch.randn(3, 64), torch.randn(3, 64), 2, False)  # wrong seq length
    with pytest.raises(RuntimeError):
        rope(q, k[:, :, :1], cos, sin, 2, False)  # seq lengths of q and k differ


def test_rope_float64_uses_torch_path():
    q, k, cos, sin = make(2, 3, 2, 1, 80, 40, 2, True, torch.float64, "bt")
    check(q, k, cos, sin, 2, True, dict(atol=1e-12, rtol=1e-12))


def test_rope_aot_eager_dynamic():
    def fn(q, k, cos, sin):
        qo, ko = rope(q, k, cos, sin, 1, False)
        return (qo * qo).sum() + (ko * 2).sum()

    cfn = torch.compile(fn, backend="aot_eager", dynamic=True, fullgraph=True)
    for t in (4, 6):
        q, k, cos, sin = make(1, t, 4, 2, 80, 40, 1, False, torch.float32, "t")
        q.requires_grad_()
        k.requires_grad_()
        got = torch.autograd.grad(cfn(q, k, cos, sin), (q, k))
        want = torch.autograd.grad(fn(q, k, cos, sin), (q, k))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, **FP32)


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "inter"])
def test_rope_opcheck(interleaved):
    q, k, cos, sin = make(1, 3, 2, 1, 80, 40, 2, interleaved, torch.float32, "bt")
    q.requires_grad_()
    k.requires_grad_()
    torch.library.opcheck(torch.ops.liger.rope.default, (q, k, cos, sin, 2, interleaved))
    torch.library.opcheck(torch.ops.liger.rope_backward.default,
                          (torch.randn_like(q), torch.randn_like(k), cos, sin, 2, interleaved))


# -- halves_out: pairs (x[2i], x[2i+1]) read, written de-interleaved (DeepSeek-V3's interleave) --


def ref_halves_out(x, cos, sin, seq_dim):
    """float64 DeepSeek-V3 form: cat((x0 c - x1 s, x1 c + x0 s)) of the even/odd lanes."""
    x = x.double()
    if seq_dim == 1:
        x = x.transpose(1, 2)
    c = (cos if cos.dim() == 3 else cos[None]).double()[:, None]
    s = (sin if sin.dim() == 3 else sin[None]).double()[:, None]
    r = 2 * cos.shape[-1]
    x0, x1 = x[..., :r:2], x[..., 1:r:2]
    out = torch.cat((x0 * c - x1 * s, x1 * c + x0 * s, x[..., r:]), dim=-1)
    return out.transpose(1, 2) if seq_dim == 1 else out


def check_halves_out(q, k, cos, sin, seq_dim, tol):
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    qo, ko = rope(q, k, cos, sin, seq_dim, True, halves_out=True)
    assert qo.dtype == q.dtype and qo.shape == q.shape
    dqo, dko = torch.randn_like(qo), torch.randn_like(ko)
    dq, dk = torch.autograd.grad((qo, ko), (q, k), (dqo, dko))
    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    rq, rk = ref_halves_out(q64, cos, sin, seq_dim), ref_halves_out(k64, cos, sin, seq_dim)
    rdq, rdk = torch.autograd.grad((rq, rk), (q64, k64), (dqo.double(), dko.double()))
    for got, want in ((qo, rq), (ko, rk), (dq, rdq), (dk, rdk)):
        torch.testing.assert_close(got.double(), want.detach(), **tol)


@pytest.mark.parametrize("seq_dim", [1, 2])
@pytest.mark.parametrize("d,rot,cos_kind", [(64, 64, "bt"), (80, 80, "t"), (96, 48, "1t")])
def test_rope_halves_out_fp32(kernel_path, d, rot, cos_kind, seq_dim):
    q, k, cos, sin = make(2, 5, 4, 1, d, rot, seq_dim, True, torch.float32, cos_kind)
    check_halves_out(q, k, cos, sin, seq_dim, FP32)


def test_rope_halves_out_bf16_round_steps_bit_equal(kernel_path):
    # bf16 tables and q: eager rounds each product and the sum; round_steps does the same
    # (forward and backward: eager's autograd rounds the same products and sums)
    q, k, cos, sin = make(2, 6, 4, 1, 64, 64, 2, True, torch.bfloat16, "bt")
    q.requires_grad_()
    qo, _ = rope(q, k, cos, sin, 2, True, True, halves_out=True)
    c, s = cos[:, None], sin[:, None]
    x0, x1 = q[..., 0::2], q[..., 1::2]
    want = torch.cat((x0 * c - x1 * s, x1 * c + x0 * s), dim=-1)
    assert torch.equal(qo, want)
    g = torch.randn_like(qo)
    assert torch.equal(torch.autograd.grad(qo, q, g)[0], torch.autograd.grad(want, q, g)[0])


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
def test_rope_halves_out_writes_every_element(triton_path, backward):
    q, k, cos, sin = make(2, 3, 5, 3, 80, 20, 1, True, torch.float32, "bt")
    q_out, k_out = torch.full_like(q, float("nan")), torch.full_like(k, float("nan"))
    rope_mod._launch(q, k, cos, sin, q_out, k_out, 1, True, backward, halves_out=True)
    assert not q_out.isnan().any() and not k_out.isnan().any()
    torch.testing.assert_close(
        q_out, rope_mod.rope_reference(q, cos, sin, 1, True, backward, halves_out=True), **FP32)
    torch.testing.assert_close(
        k_out, rope_mod.rope_reference(k, cos, sin, 1, True, backward, halves_out=True), **FP32)


def test_rope_halves_out_needs_interleaved():
    q, k, cos, sin = make(1, 2, 2, 2, 64, 64, 2, False, torch.float32)
    with pytest.raises(RuntimeError, match="halves_out needs interleaved"):
        rope(q, k, cos, sin, 2, False, halves_out=True)


def test_rope_halves_out_opcheck():
    q, k, cos, sin = make(1, 3, 2, 1, 80, 40, 2, True, torch.float32, "bt")
    q.requires_grad_()
    k.requires_grad_()
    torch.library.opcheck(torch.ops.liger.rope.default, (q, k, cos, sin, 2, True, False, True))
    torch.library.opcheck(torch.ops.liger.rope_backward.default,
                          (torch.randn_like(q), torch.randn_like(k), cos, sin, 2, True, False, True))
