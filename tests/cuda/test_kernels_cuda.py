"""Kernels on CUDA at model sizes (Llama-3-8B / Qwen2-7B / Gemma-7B widths, vocab 32k-256k, head
dims 64-256, int4 groups 32-128, matmuls at M = 1, 16, 256, 4096), odd widths, one row and many
rows, in fp32, bf16 and fp16, against the float64 references of tests/kernels (imported, not
copied)."""

import pytest
import torch

from tests.kernels import test_add_norm as tan
from tests.kernels import test_cross_entropy as tce
from tests.kernels import test_distillation as tdi
from tests.kernels import test_fused_linear_logprob as tlp
from tests.kernels import test_gated_act as tga
from tests.kernels import test_gated_rms_norm as tgrn
from tests.kernels import test_int4_matmul as ti4
from tests.kernels import test_int8_matmul as ti8
from tests.kernels import test_fp8_matmul as tf8
from tests.kernels import test_layer_norm as tln
from tests.kernels import test_rms_norm as trn
from tests.kernels import test_rope as tro
from ligerfx.kernels.int4_matmul import int4_linear, pack_int4
from ligerfx.kernels.int8_matmul import int8_linear, pack_int8
from ligerfx.kernels.fp8_matmul import fp8_linear, pack_fp8

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# fp16 keeps 3 more mantissa bits than bf16: bf16's tolerances hold.
NORM_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
MM_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
ROWS_WIDTHS = [(1, 4096), (4096, 4096), (333, 3584), (17, 3072), (5, 4097), (4096 * 4, 128),
               (3, 16384), (2, 16385)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ROWS_WIDTHS, ids=str)
@pytest.mark.parametrize("case", list(trn.CASES))
def test_rms_norm(shape, dtype, case):
    x, w, offset, mode = trn.make_inputs(shape, dtype, case)
    trn.check_against_reference(x, w, offset, mode, NORM_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ROWS_WIDTHS, ids=str)
@pytest.mark.parametrize("case", list(tln.CASES))
def test_layer_norm(shape, dtype, case):
    x, w, b = tln.make_inputs(shape, dtype, case)[:3]
    tln.check_against_reference(x, w, b, NORM_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 4096), (4096, 4096), (333, 3584), (5, 4097), (3, 16384),
                                   (2, 16385)], ids=str)
@pytest.mark.parametrize("use_h", [True, False], ids=["h_reused", "h_only_normed"])
def test_add_norms(shape, dtype, use_h):
    for case in tan.RMS_CASES:
        _, w, offset, mode = trn.make_inputs(shape, dtype, case)
        tan.check_add_rms(*tan._pair(shape, dtype), w, offset, mode, NORM_TOL[dtype], use_h=use_h)
    for case in tan.LN_CASES:
        _, w, b = tln.make_inputs(shape, dtype, case)
        tan.check_add_ln(*tan._pair(shape, dtype), w, b, NORM_TOL[dtype], use_h=use_h)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", [(32, 8, 128, 128, False), (28, 4, 128, 128, False),
                                    (16, 16, 256, 256, False), (32, 32, 80, 32, False),
                                    (32, 8, 64, 64, True), (16, 16, 256, 64, True)], ids=str)
@pytest.mark.parametrize("seq_dim", [1, 2])
@pytest.mark.parametrize("t", [1, 1000])
def test_rope(dtype, layout, seq_dim, t):
    hq, hk, d, rot, inter = layout
    q, k, cos, sin = tro.make(2, t, hq, hk, d, rot, seq_dim, inter, dtype)
    tro.check(q, k, cos, sin, seq_dim, inter, tro.FP32 if dtype == torch.float32 else tro.BF16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hq,hk", [(128, 1), (16, 16)])
@pytest.mark.parametrize("t", [1, 1000])
def test_rope_halves_out(dtype, hq, hk, t):
    # DeepSeek-V3's interleave: MLA's 64 rope channels, 128 query heads and one shared key
    q, k, cos, sin = tro.make(2, t, hq, hk, 64, 64, 2, True, dtype)
    tro.check_halves_out(q, k, cos, sin, 2, tro.FP32 if dtype == torch.float32 else tro.BF16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 14336), (4096, 14336), (7, 18944), (3, 24577)], ids=str)
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu_sq"])
def test_gated_act(dtype, shape, activation):
    g, u = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    tga.check(g, u, activation, tga.FP32 if dtype == torch.float32 else tga.BF16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 24576), (4096, 24576), (7, 21504), (3, 24577)], ids=str)
def test_relu_sq(dtype, shape):
    # relu² rounds once, as eager does: bit-equal on the GPU too (tests/kernels)
    tga.test_relu_sq_bit_equal_to_eager("cuda", shape, dtype)


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu_sq"])
def test_gated_act_shares_the_activation(activation):
    # the gated backward multiplies d(up) by the forward's act(gate), bit for bit (tests/kernels)
    tga.test_gated_and_plain_share_the_activation("cuda", activation)


def test_gated_rms_norm_is_rms_norm_times_silu():
    tgrn.test_is_rms_norm_times_silu_bit_for_bit("cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(4096 * 32, 128), (1, 128), (4096, 4096), (5, 8191), (3, 8192)],
                         ids=str)
@pytest.mark.parametrize("case,gate", [("llama", "gate_fp32"), ("llama", "gate_x"),
                                       ("no_weight", "gate_fp32"), ("fp32_offset", "gate_fp32"),
                                       ("llama_fp32_weight", "gate_fp32")])
def test_gated_rms_norm(dtype, shape, case, gate):
    x, w, g, offset, mode = tgrn.make_inputs(shape, dtype, case, gate)
    tgrn.check_against_reference(x, w, g, offset, mode, NORM_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gated_rms_norm_qwen3_next_bit_equal(dtype):
    tgrn.test_qwen3_next_bit_equal(dtype, "cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N,V", [(1, 32000), (512, 128256), (64, 152064), (33, 256000), (9, 32001)])
@pytest.mark.parametrize("name,opts", tce.CASES, ids=[c[0] for c in tce.CASES])
def test_cross_entropy(dtype, N, V, name, opts):
    x, target, kw = tce.make(N, V, dtype, opts)
    tce.check(x, target, kw, "mean", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N,H,V", [(512, 4096, 128256), (1, 3072, 256000), (333, 4096, 32000)],
                         ids=str)
@pytest.mark.parametrize("name,opts", tlp.CASES, ids=[c[0] for c in tlp.CASES])
def test_fused_linear_logprob(dtype, N, H, V, name, opts):
    h, w, b, ids, kw = tlp.make(dtype, opts, lead=(N,), hidden=H, vocab=V)
    tlp.run_and_compare(h, w, b, ids, kw, dtype)


def _linear_case(M, N, K, dtype):
    return torch.randn(M, K, dtype=dtype), torch.randn(N, K) * 0.05, torch.randn(N, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 16, 256, 4096])
@pytest.mark.parametrize("N,K", [(4096, 4096), (1024, 4096), (4096, 14336), (1000, 3584)])
def test_int8_linear(dtype, M, N, K):
    x, w, b = _linear_case(M, N, K, dtype)
    q, s = pack_int8(w, dtype)
    assert ti8._rel(int8_linear(x, q, s, b), ti8._ref64(x, q, s, b)) < MM_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 16, 256, 4096])
@pytest.mark.parametrize("G", [32, 64, 128])
def test_int4_linear(dtype, M, G):
    x, w, b = _linear_case(M, 4096, 4096, dtype)
    p, s, z = pack_int4(w, G, dtype)
    assert ti4._rel(int4_linear(x, p, s, z, b), ti4._ref64(x, p, s, z, b)) < MM_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 16, 256, 4096])
def test_fp8_linear(dtype, M):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 tensor cores need compute capability 8.9+")
    x, w, b = _linear_case(M, 4096, 4096, dtype)
    q, s = pack_fp8(w)
    assert tf8._rel(fp8_linear(x, q, s, b), tf8._ref64(x, q, s, b)) < tf8.TOL.get(dtype, 2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("V", [32000, 128256, 32001])
@pytest.mark.parametrize("name,case", tdi.CASES, ids=[c[0] for c in tdi.CASES])
def test_fused_linear_distillation(dtype, V, name, case):
    # the float64 reference of tests/kernels/test_distillation.py at a real vocabulary
    case = dict(case)
    mask, ce = case.pop("mask", False), case.pop("ce", False)
    N, H = 257, 1024
    hs = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    ws = (torch.randn(V, H, dtype=torch.float64) * 0.05).requires_grad_()
    zt = torch.randn(N, V, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (N,))
    labels[::4] = -100
    kd_mask = labels != -100 if mask else None
    ref = tdi.reference(torch.nn.functional.linear(hs, ws), zt, kd_mask=kd_mask,
                        labels=labels if ce else None, **case)
    ref.backward()
    h, w = (x.detach().to(dtype).requires_grad_() for x in (hs, ws))
    loss = tdi.dk.fused_linear_distillation(h, w, zt.to(dtype), kd_mask=kd_mask,
                                            labels=labels if ce else None, **case)
    loss.backward()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert abs(loss.item() - ref.item()) <= tol * abs(ref.item()) + 1e-6
    assert tdi._rel(h.grad, hs.grad) < tol and tdi._rel(w.grad, ws.grad) < tol
