"""fp8 (e4m3 W8A8) matmul: packing, per-token activation quantization, kernels (interpreter) and
torch paths vs a float64 reference built from the same quantized operands."""

import pytest
import torch

from ligerfx.kernels import fp8_matmul as F8
from ligerfx.kernels.fp8_matmul import fp8_linear, pack_fp8, unpack_fp8

FP8 = torch.float8_e4m3fn
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # relative to max |y|


def _ref64(x, q, s, b):
    """float64 product of the quantized operands (activation quantization done by the torch path,
    whose bits the kernel must reproduce: checked separately)."""
    xq, xs = F8.quantize_rows_reference(x.reshape(-1, x.shape[-1]))
    y = (xq.double() * xs.double()[:, None]) @ unpack_fp8(q, s, torch.float64).t()
    y = y + b.double() if b is not None else y
    return y.reshape(*x.shape[:-1], q.shape[0])


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def _bits(t):
    return t.view(torch.uint8)


def test_pack_roundtrip():
    w = torch.randn(37, 50)
    w[3] = 0.0  # an all-zero row: zero scale, zero codes, no NaN
    q, s = pack_fp8(w)
    assert q.dtype == FP8 and s.dtype == torch.float32 and s.shape == (37,)
    assert s[3] == 0 and not unpack_fp8(q, s).isnan().any()
    rows = torch.arange(37) != 3
    assert (q.float().abs().amax(1)[rows] == 448).all()  # each row's largest entry uses the full range
    # e4m3 has 3 mantissa bits: rounding to nearest is within 2^-4 relative (normal range).
    err = (unpack_fp8(q, s) - w).abs()
    assert (err <= w.abs() / 16 + s[:, None] * 2.0**-10 + 1e-7).all()
    q2, s2 = pack_fp8(unpack_fp8(q, s))  # quantizing a dequantized weight is exact
    assert torch.equal(_bits(q2), _bits(q)) and torch.allclose(s2, s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_quantization_bits(triton_path, dtype):
    """The kernel's per-token quantization is bit-identical to the torch path (exact ties and
    subnormals included), and the torch path agrees with an independent fp64 RNE rounding."""
    x = torch.randn(9, 300, dtype=dtype)
    x[0, :4] = torch.tensor([3.0, -1.5, 0.75, 0.0])  # exact e4m3 ties after scaling by 448/3
    x[1] *= 1e-3  # tiny row
    x[2] = 0.0  # all-zero row
    x[3, 7] = 1e4  # one outlier: most of the row lands in e4m3's subnormal range
    xq, xs = F8.quantize_rows_triton(x, xq=torch.full((9, 300), float("nan")).to(FP8),
                                     xs=torch.full((9,), float("nan")))
    rq, rs = F8.quantize_rows_reference(x)
    assert torch.equal(_bits(xq), _bits(rq)) and torch.equal(xs, rs)
    assert not xq.float().isnan().any() and (xq.float()[2] == 0).all()
    # independent check: scaled values rounded in float64 to the nearest e4m3 value
    grid = torch.arange(256, dtype=torch.uint8).view(FP8).double()
    grid = grid[grid.isfinite()].unique()
    amax = x.double().abs().amax(1).clamp_min(1e-12)
    v = (x.double() * (448.0 / amax)[:, None]).clamp(-448, 448)
    nearest = (v[..., None] - grid).abs().min(-1).values
    assert ((xq.double() - v).abs() <= nearest + 1e-6 * v.abs()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 64, 48), (3, 16, 20), (37, 100, 33), (70, 96, 130)])
@pytest.mark.parametrize("bias", [False, True])
def test_forward(kernel_path, dtype, shape, bias):
    M, K, N = shape
    x = torch.randn(M, K, dtype=dtype)
    q, s = pack_fp8(torch.randn(N, K))
    b = torch.randn(N, dtype=dtype) if bias else None
    y = fp8_linear(x, q, s, b)
    assert y.dtype == dtype and y.shape == (M, N)
    assert _rel(y, _ref64(x, q, s, b)) < TOL[dtype]
    # and W8A8 really quantizes the activation: it differs from the W8A16 product
    w16 = x.double() @ unpack_fp8(q, s, torch.float64).t() + (b.double() if bias else 0)
    assert _rel(y.float(), w16) > 1e-4


@pytest.mark.parametrize("split", [1, 2, 3])
@pytest.mark.parametrize("M", [2, 33])
def test_launcher_split_k_and_poison(triton_path, split, M):
    K, N = 200, 70
    x = torch.randn(M, K)
    q, s = pack_fp8(torch.randn(N, K))
    b = torch.randn(N)
    xq, xs = F8.quantize_rows_triton(x)
    y = torch.full((M, N), float("nan"))
    F8.fp8_matmul_triton(xq, xs, q, s, b, torch.float32, y=y, split=split)
    assert not y.isnan().any()
    assert _rel(y, _ref64(x, q, s, b)) < 1e-5


def test_leading_dims_and_strided_input(kernel_path):
    x = torch.randn(2, 3, 80)[..., :64]  # non-contiguous rows
    q, s = pack_fp8(torch.randn(24, 64))
    y = fp8_linear(x, q, s)
    assert y.shape == (2, 3, 24)
    assert _rel(y, _ref64(x, q, s, None)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward(kernel_path, dtype):
    x = torch.randn(5, 48, dtype=dtype, requires_grad=True)
    q, s = pack_fp8(torch.randn(20, 48))
    b = torch.randn(20, dtype=dtype, requires_grad=True)
    g = torch.randn(5, 20, dtype=dtype)
    dx, db = torch.autograd.grad(fp8_linear(x, q, s, b), (x, b), g)
    w64 = unpack_fp8(q, s, torch.float64)
    assert dx.dtype == dtype and _rel(dx, g.double() @ w64) < TOL[dtype]
    assert _rel(db, g.double().sum(0)) < TOL[dtype]


def test_compile_dynamic(kernel_path):
    q, s = pack_fp8(torch.randn(24, 40))
    b = torch.randn(24)
    fn = torch.compile(lambda x: fp8_linear(x, q, s, b).square().sum(), backend="aot_eager",
                       dynamic=True)
    for M in (3, 7):
        x = torch.randn(M, 40, requires_grad=True)
        loss = fn(x)
        (dx,) = torch.autograd.grad(loss, x)
        y64 = _ref64(x.detach(), q, s, b)
        ref = y64.square().sum()
        dx64 = (2 * y64) @ unpack_fp8(q, s, torch.float64)  # straight-through activation quantization
        assert _rel(loss, ref) < 1e-5 and _rel(dx, dx64) < 1e-5


def test_opcheck():
    # opcheck's test_schema cannot run here: SchemaCheckMode compares tensors with ops that have
    # no float8 kernels ("mul_cpu_reduced_float" not implemented for 'Float8_e4m3fn').  The ops
    # declare mutates_args=(); inputs are checked unchanged (bitwise) by hand instead.
    x = torch.randn(3, 32, requires_grad=True)
    q, s = pack_fp8(torch.randn(16, 32))
    b = torch.randn(16)
    torch.library.opcheck(torch.ops.liger.fp8_linear.default, (x, q, s, b),
                          test_utils=("test_autograd_registration", "test_faketensor"))
    g = torch.randn(3, 16)
    torch.library.opcheck(torch.ops.liger.fp8_linear_backward.default, (g, q, s, torch.float32),
                          test_utils=("test_faketensor", "test_aot_dispatch_dynamic"))
    before = [t.detach().clone() for t in (x, q, s, b, g)]
    torch.ops.liger.fp8_linear(x, q, s, b)
    torch.ops.liger.fp8_linear_backward(g, q, s, torch.float32)
    for t, t0 in zip((x, q, s, b, g), before):
        assert torch.equal(_bits(t.detach()) if t.dtype == FP8 else t.detach(),
                           _bits(t0) if t0.dtype == FP8 else t0)


def test_bad_inputs_and_device_requirement(monkeypatch):
    q, s = pack_fp8(torch.randn(16, 32))
    with pytest.raises(ValueError, match="features"):
        fp8_linear(torch.randn(2, 31), q, s)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_linear(torch.randn(2, 32), q.float(), s)
    # A pre-Ada GPU is refused with the requirement named (faked: no GPU here).
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100")
    with pytest.raises(RuntimeError, match=r"compute capability 8\.9\+.*A100 has 8\.0.*int8"):
        F8.check_device(torch.device("cuda"))
    F8.check_device(torch.device("cpu"))
