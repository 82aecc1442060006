"""int8 weight-only matmul: packing, kernel (interpreter) and torch paths vs a float64 reference."""

import pytest
import torch

from ligerfx.kernels import int8_matmul as K8
from ligerfx.kernels.int8_matmul import int8_linear, pack_int8, unpack_int8

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # relative to max |y|


def _ref64(x, q, s, b):
    y = x.double() @ unpack_int8(q, s, torch.float64).t()
    return y + b.double() if b is not None else y


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def test_pack_roundtrip():
    w = torch.randn(37, 50)
    q, s = pack_int8(w)
    assert q.dtype == torch.int8 and s.shape == (37,) and q.abs().max() <= 127
    err = (unpack_int8(q, s) - w).abs()
    assert (err <= s[:, None] / 2 + 1e-6).all()  # round to nearest: at most half a step
    assert (q.abs().amax(1) == 127).all()  # the largest entry of each row uses the full range
    q2, s2 = pack_int8(unpack_int8(q, s))  # quantizing a dequantized weight is exact
    assert torch.equal(q2, q) and torch.allclose(s2, s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 64, 48), (3, 40, 72), (37, 100, 33), (70, 96, 130)])
@pytest.mark.parametrize("bias", [False, True])
def test_forward(kernel_path, dtype, shape, bias):
    M, K, N = shape
    x = torch.randn(M, K, dtype=dtype)
    q, s = pack_int8(torch.randn(N, K), dtype)
    b = torch.randn(N, dtype=dtype) if bias else None
    y = int8_linear(x, q, s, b)
    assert y.dtype == dtype and y.shape == (M, N)
    assert _rel(y, _ref64(x, q, s, b)) < TOL[dtype]


@pytest.mark.parametrize("split", [1, 2, 3])
@pytest.mark.parametrize("M", [2, 33])
def test_launcher_split_k_and_poison(triton_path, split, M):
    K, N = 200, 70
    x = torch.randn(M, K)
    q, s = pack_int8(torch.randn(N, K))
    b = torch.randn(N)
    y = torch.full((M, N), float("nan"))
    K8.int8_matmul_triton(x, q, s, b, y=y, split=split)
    assert not y.isnan().any()
    assert _rel(y, _ref64(x, q, s, b)) < 1e-5


def test_leading_dims_and_strided_input(kernel_path):
    x = torch.randn(2, 3, 80)[..., :64]  # non-contiguous rows
    q, s = pack_int8(torch.randn(24, 64))
    y = int8_linear(x, q, s)
    assert y.shape == (2, 3, 24)
    assert _rel(y, _ref64(x.reshape(-1, 64), q, s, None).reshape(2, 3, 24)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward(kernel_path, dtype):
    x = torch.randn(5, 48, dtype=dtype, requires_grad=True)
    q, s = pack_int8(torch.randn(20, 48), dtype)
    b = torch.randn(20, dtype=dtype, requires_grad=True)
    g = torch.randn(5, 20, dtype=dtype)
    dx, db = torch.autograd.grad(int8_linear(x, q, s, b), (x, b), g)
    w64 = unpack_int8(q, s, torch.float64)
    assert dx.dtype == dtype and _rel(dx, g.double() @ w64) < TOL[dtype]
    assert _rel(db, g.double().sum(0)) < TOL[dtype]


def test_compile_dynamic(kernel_path):
    q, s = pack_int8(torch.randn(24, 40))
    b = torch.randn(24)
    fn = torch.compile(lambda x: int8_linear(x, q, s, b).square().sum(), backend="aot_eager",
                       dynamic=True)
    for M in (3, 7):
        x = torch.randn(M, 40, requires_grad=True)
        loss = fn(x)
        (dx,) = torch.autograd.grad(loss, x)
        x64 = x.detach().double().requires_grad_()
        ref = (x64 @ unpack_int8(q, s, torch.float64).t() + b.double()).square().sum()
        (dx64,) = torch.autograd.grad(ref, x64)
        assert _rel(loss, ref) < 1e-5 and _rel(dx, dx64) < 1e-5


def test_opcheck():
    x = torch.randn(3, 32, requires_grad=True)
    q, s = pack_int8(torch.randn(16, 32))
    torch.library.opcheck(torch.ops.liger.int8_linear.default, (x, q, s, torch.randn(16)),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(torch.ops.liger.int8_linear_backward.default,
                          (torch.randn(3, 16), q, s, torch.float32))


def test_bad_inputs():
    q, s = pack_int8(torch.randn(16, 32))
    with pytest.raises(ValueError, match="features"):
        int8_linear(torch.randn(2, 31), q, s)
    with pytest.raises(ValueError, match="int8"):
        int8_linear(torch.randn(2, 32), q.float(), s)
