"""int4 group-wise weight matmul: packing, kernel (interpreter) and torch paths vs float64."""

import pytest
import torch

from ligerfx.kernels import int4_matmul as K4
from ligerfx.kernels.int4_matmul import int4_linear, pack_int4, unpack_int4

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # relative to max |y|


def _ref64(x, p, s, z, b):
    y = x.double() @ unpack_int4(p, s, z, torch.float64).t()
    return y + b.double() if b is not None else y


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("G", [32, 64, 128])
def test_pack_roundtrip(G):
    w = torch.randn(19, 2 * G)
    p, s, z = pack_int4(w, G)
    assert p.dtype == torch.uint8 and p.shape == (19, G) and s.shape == z.shape == (19, 2)
    err = (unpack_int4(p, s, z) - w).abs().reshape(19, 2, G)
    assert (err <= s[..., None] / 2 + 1e-5).all()  # at most half a step per group
    # byte layout: element 2j in the low nibble, 2j+1 in the high nibble
    q = ((w.reshape(19, 2, G) - z[..., None]) / s[..., None]).round().clamp(0, 15).reshape(19, -1)
    assert torch.equal((p & 15).float(), q[:, 0::2]) and torch.equal((p >> 4).float(), q[:, 1::2])
    p2, s2, z2 = pack_int4(unpack_int4(p, s, z), G)  # re-quantizing the dequantized weight is exact
    assert (unpack_int4(p2, s2, z2) - unpack_int4(p, s, z)).abs().max() < 1e-5


@pytest.mark.parametrize("K,G", [(96, 64), (576, 128), (80, 32), (48, 128)])
def test_pack_partial_last_group(K, G):
    # A group size that does not divide K: ceil(K / G) groups, the last one K - G * (n - 1) wide
    # with its own min and max.
    w = torch.randn(7, K) * torch.linspace(0.5, 3.0, K)
    p, s, z = pack_int4(w, G)
    n = -(-K // G)
    assert p.shape == (7, K // 2) and s.shape == z.shape == (7, n)
    for j in range(n):
        grp = w[:, j * G:(j + 1) * G]
        assert torch.equal(z[:, j], grp.amin(1)) and torch.allclose(s[:, j], (grp.amax(1) - grp.amin(1)) / 15)
    err = (unpack_int4(p, s, z) - w).abs()
    assert (err <= torch.repeat_interleave(s, G, dim=1)[:, :K] / 2 + 1e-5).all()


def test_pack_rejects_bad_groups():
    with pytest.raises(ValueError, match="group_size must be one of"):
        pack_int4(torch.randn(4, 96), 48)
    with pytest.raises(ValueError, match="odd"):
        pack_int4(torch.randn(4, 95), 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,G", [((1, 64, 48), 32), ((5, 128, 70), 64), ((37, 256, 33), 128),
                                     ((70, 128, 130), 32), ((3, 96, 40), 64), ((33, 80, 24), 32),
                                     ((2, 48, 17), 128)])
@pytest.mark.parametrize("bias", [False, True])
def test_forward(kernel_path, dtype, shape, G, bias):
    M, K, N = shape
    x = torch.randn(M, K, dtype=dtype)
    p, s, z = pack_int4(torch.randn(N, K), G, dtype)
    b = torch.randn(N, dtype=dtype) if bias else None
    y = int4_linear(x, p, s, z, b)
    assert y.dtype == dtype and y.shape == (M, N)
    assert _rel(y, _ref64(x, p, s, z, b)) < TOL[dtype]


@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("M", [2, 40])
@pytest.mark.parametrize("K", [192, 176])  # 176: a partial last group of 16
def test_launcher_split_k_and_poison(triton_path, split, M, K):
    N, G = 50, 32
    x = torch.randn(M, K)
    p, s, z = pack_int4(torch.randn(N, K), G)
    b = torch.randn(N)
    y = torch.full((M, N), float("nan"))
    K4.int4_matmul_triton(x, p, s, z, b, y=y, split=split)
    assert not y.isnan().any()
    assert _rel(y, _ref64(x, p, s, z, b)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward(kernel_path, dtype):
    x = torch.randn(2, 3, 64, dtype=dtype, requires_grad=True)
    p, s, z = pack_int4(torch.randn(20, 64), 32, dtype)
    b = torch.randn(20, dtype=dtype, requires_grad=True)
    g = torch.randn(2, 3, 20, dtype=dtype)
    dx, db = torch.autograd.grad(int4_linear(x, p, s, z, b), (x, b), g)
    w64 = unpack_int4(p, s, z, torch.float64)
    assert dx.shape == x.shape and _rel(dx, g.double() @ w64) < TOL[dtype]
    assert _rel(db, g.double().sum((0, 1))) < TOL[dtype]


def test_compile_dynamic(kernel_path):
    p, s, z = pack_int4(torch.randn(24, 64), 32)
    fn = torch.compile(lambda x: int4_linear(x, p, s, z).square().sum(), backend="aot_eager",
                       dynamic=True)
    for M in (3, 6):
        x = torch.randn(M, 64, requires_grad=True)
        loss = fn(x)
        (dx,) = torch.autograd.grad(loss, x)
        x64 = x.detach().double().requires_grad_()
        ref = (x64 @ unpack_int4(p, s, z, torch.float64).t()).square().sum()
        (dx64,) = torch.autograd.grad(ref, x64)
        assert _rel(loss, ref) < 1e-5 and _rel(dx, dx64) < 1e-5


def test_opcheck():
    x = torch.randn(3, 64, requires_grad=True)
    p, s, z = pack_int4(torch.randn(16, 64), 32)
    torch.library.opcheck(torch.ops.liger.int4_linear.default, (x, p, s, z, torch.randn(16)),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(torch.ops.liger.int4_linear_backward.default,
                          (torch.randn(3, 16), p, s, z, torch.float32))
