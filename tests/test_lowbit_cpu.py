"""The CPU path of the int8 / int4 linears (kernels/lowbit_cpu.py): fused dequantize-GEMV loops.

Proves, against the dequantized weight in float64 on fresh random inputs: the loop expressions
(int8; int4 at group 32/64/128, a partial last group, odd shapes, bias or none, bf16 input), the
eager op on CPU (the loop compiled once per shape, and called), a model compiled on CPU (the loop
inlined by inductor: the op's eager body is not called; forward and input gradient), and where
the loop cannot serve a call the reason and the dequantizing fallback's result.  On a loaded
2-core machine the two compiling tests take a minute or more each (inductor's C++ compiles).
"""

import pytest
import torch

import ligerfx
from ligerfx.kernels import int4_matmul as I4
from ligerfx.kernels import int8_matmul as I8
from ligerfx.kernels import lowbit_cpu as L


def _rel(y, ref):
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


def _int8(N, K):
    q, s = I8.pack_int8(torch.randn(N, K))
    return (q, s), I8.unpack_int8(q, s, torch.float64)


def _int4(N, K, G):
    p, s, z = I4.pack_int4(torch.randn(N, K), G)
    return (p, s, z), I4.unpack_int4(p, s, z, torch.float64)


def _ref(x, w, bias):
    y = x.double() @ w.t()
    return y + bias.double() if bias is not None else y


# fp32 sums of K products: rounding ~ sqrt(K) * 2^-24 of the row's magnitude; well under 1e-5
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("M,N,K,bias,dtype", [(1, 48, 64, True, torch.float32),
                                              (3, 40, 200, False, torch.float32),
                                              (1, 24, 576, True, torch.bfloat16)])
def test_int8_loop_matches_dequantized_reference(M, N, K, bias, dtype):
    (q, s), w = _int8(N, K)
    x = torch.randn(M, K).to(dtype)
    b = torch.randn(N) if bias else None
    assert L.fast_reason("int8", x, q, K) is None
    y = L.int8_rows(x, q, s.to(dtype), b)
    assert y.dtype == dtype
    ref = _ref(x, I8.unpack_int8(q, s.to(dtype), torch.float64), b)
    assert _rel(y, ref) < TOL[dtype]


@pytest.mark.parametrize("M,N,K,G,bias", [(1, 48, 64, 32, True), (2, 40, 576, 128, False),
                                          (1, 24, 576, 64, True), (4, 16, 200, 128, True),
                                          (1, 32, 96, 64, False)])
def test_int4_loop_matches_dequantized_reference(M, N, K, G, bias):
    # 576 = 4.5 groups of 128, 200 = 1.56 groups of 128, 96 = 1.5 groups of 64: partial last groups
    packed, w = _int4(N, K, G)
    x = torch.randn(M, K)
    b = torch.randn(N) if bias else None
    assert L.fast_reason("int4", x, packed[0], K, G) is None
    assert _rel(L.int4_rows(x, *packed, b, G), _ref(x, w, b)) < TOL[torch.float32]


def test_sub_group_of_partial_groups():
    assert L.sub_group(576, 128) == 64
    assert L.sub_group(576, 64) == 64
    assert L.sub_group(200, 128) == 8
    assert L.sub_group(20, 32) is None


def test_fallback_reasons_and_results(torch_path):
    # K = 20: not a multiple of the 8 levels a word holds
    (q, s), w = _int8(24, 20)
    x = torch.randn(1, 20)
    assert "multiple of 8" in L.fast_reason("int8", x, q, 20)
    assert _rel(I8.int8_linear(x, q, s), _ref(x, w, None)) < 1e-5
    packed, w4 = _int4(24, 20, 32)
    assert "multiple of 8" in L.fast_reason("int4", x, packed[0], 20, 32)
    assert _rel(I4.int4_linear(x, *packed), _ref(x, w4, None)) < 1e-5
    # a non-contiguous packed weight, float64 activations
    (q, s), w = _int8(32, 64)
    qt = q.t().contiguous().t()
    assert "contiguous" in L.fast_reason("int8", x, qt, 64)
    x64 = torch.randn(1, 64, dtype=torch.float64)
    assert "float64" in L.fast_reason("int8", x64, q, 64)
    assert _rel(I8.int8_linear(x64, qt, s), _ref(x64, w, None)) < 1e-12


def test_eager_op_calls_the_compiled_loop(torch_path, monkeypatch):
    """QuantizedLinear-style eager calls on CPU: decode rows run the loop compiled once per shape
    (the dequantizing reference is not called); more rows take dequantize + matmul."""
    refs, reference = [], I4.int4_matmul_reference

    def counted(*args):
        refs.append(1)
        return reference(*args)

    monkeypatch.setattr(I4, "int4_matmul_reference", counted)
    packed, w = _int4(40, 576, 128)
    b = torch.randn(40)
    x = torch.randn(1, 1, 576)
    y = I4.int4_linear(x, *packed, b)
    assert y.shape == (1, 1, 40) and not refs
    assert _rel(y[0], _ref(x[0], w, b)) < 1e-5
    assert _rel(I4.int4_linear(x, *packed, b)[0], _ref(x[0], w, b)) < 1e-5  # cached kernel
    xs = torch.randn(9, 576)
    assert _rel(I4.int4_linear(xs, *packed, b), _ref(xs, w, b)) < 1e-5
    assert refs == [1]


def test_compiled_model_inlines_the_loop_forward_and_input_grad(torch_path, monkeypatch):
    """A packed model compiled on CPU: inductor inlines the loop (the op's eager body is never
    called); logits and the input gradient match the float64 dequantized reference."""
    calls = []
    monkeypatch.setattr(L, "call_eager", lambda *a: calls.append(1))
    lin = torch.nn.Linear(576, 40)
    model = torch.nn.Sequential(lin, torch.nn.Tanh(), torch.nn.Linear(40, 32, bias=False))
    ligerfx.quantize_(model, "int4", group_size=128)
    w1 = model[0].dequantized_weight(torch.float64)
    w2 = model[2].dequantized_weight(torch.float64)
    compiled = torch.compile(model, backend="liger", options={"log_report": False, "inner": "inductor"})
    x = torch.randn(1, 576, requires_grad=True)
    y = compiled(x)
    xd = x.detach().double().requires_grad_(True)
    ref = torch.tanh(xd @ w1.t() + model[0].bias.double()) @ w2.t()
    assert _rel(y, ref.detach()) < 1e-5
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g.double())
    assert _rel(x.grad, xd.grad) < 1e-5
    # prefill rows: dequantize + matmul inlined; the partial last group once read garbage there
    xs = torch.randn(9, 576)
    with torch.no_grad():
        ref = torch.tanh(xs.double() @ w1.t() + model[0].bias.double()) @ w2.t()
        assert _rel(compiled(xs), ref) < 1e-5
    assert not calls
