"""2:4 sparse matmul: format, kernel (interpreter) and torch paths vs a float64 dense reference."""

import pytest
import torch

from ligerfx.kernels import sparse24_matmul as S

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # relative to max |y|


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def _random_24(N, K, dtype=torch.float32):
    """A 2:4 weight whose kept positions are random (not magnitude-chosen), with some groups
    holding fewer than 2 entries and some -0.0 entries."""
    w = torch.randn(N, K // 4, 4)
    keep = torch.rand(N, K // 4, 4).argsort(-1) < 2
    keep[:, ::3, :] &= torch.rand(N, (K // 4 + 2) // 3, 4) < 0.5  # sparser groups
    w = torch.where(keep, w, 0.0)
    w[0, 0] = torch.tensor([-0.0, 0.0, 1.5, 0.0])  # a -0.0 with room is stored bit for bit
    return w.reshape(N, K).to(dtype)


def _packed(scheme, w, dtype):
    return S.pack_24(w) if scheme == "2:4" else S.pack_24_int8(w, dtype)


def _ref64(x, packed, b):
    scale = packed[2] if len(packed) == 3 else None
    y = x.double() @ S.unpack_24(packed[0], packed[1], scale, torch.float64).t()
    return y + b.double() if b is not None else y


def _op(scheme):
    return S.sparse24_linear if scheme == "2:4" else S.sparse24_int8_linear


def test_pack_is_lossless_bit_for_bit():
    w = _random_24(20, 48)
    v, m = S.pack_24(w)
    assert v.shape == (20, 24) and m.shape == (20, 6) and m.dtype == torch.uint8
    d = S.unpack_24(v, m)
    assert torch.equal(d, w) and torch.equal(torch.signbit(d), torch.signbit(w))
    idx = S.positions(m)
    assert (idx[..., 0] < idx[..., 1]).all()  # two distinct positions per group, ascending
    assert S.broken_fraction(w) == 0.0


def test_not_24_is_refused_with_the_fraction():
    w = _random_24(8, 32)  # 8 groups per row, 64 groups
    w[:4, 4:8] = torch.tensor([1.0, 2.0, 3.0, 0.0])  # 4 groups with 3 entries
    w[5, 8:12] = torch.tensor([-0.0, 1.0, 2.0, 0.0])  # -0.0 is a zero: still 2:4
    w[6, 8:12] = torch.tensor([-0.0, 1.0, 2.0, -1e-30])  # a tiny value is not: a 5th
    assert S.broken_fraction(w) == pytest.approx(5 / 64)
    with pytest.raises(ValueError, match=r"7\.8% of its groups"):
        S.pack_24(w)
    with pytest.raises(ValueError, match="multiple of 8"):
        S.pack_24(torch.zeros(4, 12))


def test_minus_zero_counts_as_zero():
    """`w * mask` pruning leaves -0.0 where negative weights were dropped: zeros all the same.
    A -0.0 is stored bit for bit while its group has room, else it comes back as +0.0."""
    w = torch.tensor([[-0.0, 1.0, -0.0, 2.0, -0.0, 0.0, 3.0, 0.0, -0.0, -0.0, -0.0, -0.0,
                       0.0, 0.0, 0.0, 0.0]]).repeat(16, 1)
    assert S.broken_fraction(w) == 0.0
    d = S.unpack_24(*S.pack_24(w))
    assert torch.equal(d, w)  # the same values (== does not see the sign of a zero)
    flipped = torch.signbit(d) != torch.signbit(w)
    assert flipped.sum(1).tolist() == [4] * 16  # group 0's two -0.0, group 2's last two
    assert flipped[:, 0].all() and flipped[:, 2].all() and flipped[:, 10:12].all()
    assert (w[flipped] == 0).all() and torch.signbit(d[:, 4]).all() and torch.signbit(d[:, 8:10]).all()


def test_prune_keeps_the_two_largest():
    w = torch.randn(16, 64)
    p = S.prune_24(w)
    g, pg = w.reshape(16, 16, 4), p.reshape(16, 16, 4)
    assert S.broken_fraction(p) == 0.0 and ((pg != 0).sum(-1) == 2).all()
    kept_min = torch.where(pg != 0, g.abs(), float("inf")).amin(-1)
    dropped_max = torch.where(pg == 0, g.abs(), -1.0).amax(-1)
    assert (kept_min >= dropped_max).all() and torch.equal(pg[pg != 0], g[pg != 0])


@pytest.mark.parametrize("scheme", ["2:4", "2:4+int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 64, 48), (5, 40, 72), (37, 136, 33), (70, 96, 130)])
def test_forward(kernel_path, scheme, dtype, shape):
    M, K, N = shape
    x = torch.randn(M, K, dtype=dtype)
    packed = _packed(scheme, _random_24(N, K, dtype), dtype)
    b = torch.randn(N, dtype=dtype) if M % 2 else None
    y = _op(scheme)(x, *packed, b)
    assert y.dtype == dtype and y.shape == (M, N)
    assert _rel(y, _ref64(x, packed, b)) < TOL[dtype]


@pytest.mark.parametrize("scheme", ["2:4", "2:4+int8"])
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("M", [2, 33])
def test_launcher_split_k_and_poison(triton_path, scheme, split, M):
    K, N = 200, 70
    x = torch.randn(M, K)
    packed = _packed(scheme, _random_24(N, K), torch.float32)
    scale = packed[2] if len(packed) == 3 else None
    b = torch.randn(N)
    y = torch.full((M, N), float("nan"))
    S.sparse24_matmul_triton(x, packed[0], packed[1], scale, b, y=y, split=split)
    assert not y.isnan().any()
    assert _rel(y, _ref64(x, packed, b)) < 1e-5


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_equals_dense_linear_including_inf_times_zero(kernel_path):
    """The expanded tile holds explicit zeros: an inf activation meeting a pruned weight gives
    nan exactly where the dense product does."""
    w = _random_24(24, 64)
    x = torch.randn(3, 64)
    x[1, 5] = float("inf")
    dense = torch.nn.functional.linear(x, w)
    y = S.sparse24_linear(x, *S.pack_24(w))
    assert torch.equal(y.isnan(), dense.isnan()) and torch.equal(y.isinf(), dense.isinf())
    ok = dense.isfinite()
    assert _rel(y[ok], dense[ok]) < 1e-6


def test_leading_dims_and_strided_input(kernel_path):
    x = torch.randn(2, 3, 80)[..., :64]
    packed = S.pack_24(_random_24(24, 64))
    y = S.sparse24_linear(x, *packed)
    assert y.shape == (2, 3, 24)
    assert _rel(y, _ref64(x.reshape(-1, 64), packed, None).reshape(2, 3, 24)) < 1e-5


@pytest.mark.parametrize("scheme", ["2:4", "2:4+int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward(kernel_path, scheme, dtype):
    x = torch.randn(5, 48, dtype=dtype, requires_grad=True)
    packed = _packed(scheme, _random_24(20, 48, dtype), dtype)
    b = torch.randn(20, dtype=dtype, requires_grad=True)
    g = torch.randn(5, 20, dtype=dtype)
    dx, db = torch.autograd.grad(_op(scheme)(x, *packed, b), (x, b), g)
    scale = packed[2] if len(packed) == 3 else None
    w64 = S.unpack_24(packed[0], packed[1], scale, torch.float64)
    assert dx.dtype == dtype and _rel(dx, g.double() @ w64) < TOL[dtype]
    assert _rel(db, g.double().sum(0)) < TOL[dtype]


def test_opcheck():
    x = torch.randn(3, 32, requires_grad=True)
    w = _random_24(16, 32)
    v, m = S.pack_24(w)
    torch.library.opcheck(torch.ops.liger.sparse24_linear.default, (x, v, m, torch.randn(16)),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    q, m8, s = S.pack_24_int8(w)
    torch.library.opcheck(torch.ops.liger.sparse24_int8_linear.default, (x, q, m8, s, None),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(torch.ops.liger.sparse24_linear_backward.default,
                          (torch.randn(3, 16), v, m, torch.float32))


def test_bad_inputs():
    v, m = S.pack_24(_random_24(16, 32))
    with pytest.raises(ValueError, match="features"):
        S.sparse24_linear(torch.randn(2, 31), v, m)
    with pytest.raises(ValueError, match="meta must be uint8"):
        S.sparse24_linear(torch.randn(2, 32), v, m[:, :2])
    with pytest.raises(ValueError, match="int8"):
        S.sparse24_int8_linear(torch.randn(2, 32), v, m, torch.ones(16))
