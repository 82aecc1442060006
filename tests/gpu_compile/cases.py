"""The shapes the offline compile records: every `liger::` op body at real model sizes.

Each case is (label, fn); `fn()` runs an op body (forward and backward) on fake CUDA tensors inside
`ligerfx.tools.offline_compile.record`, so what gets compiled is what the launchers pick for that shape
on that chip.  Sizes: Llama-3-8B (hidden 4096, MLP 14336, vocab 128256, 32/8 heads of 128),
Qwen2-7B (3584, 18944, 152064, 28/4 heads), Gemma-7B (3072, 24576, 256000, 16 heads of 256),
a 32k vocab, a 16384 hidden (the looped norm kernels), QK-norm over a 128 head dim, head dims
64-256, int4 groups 32-128, matmuls at M = 1, 16, 256, 4096.

Only distinct launch configurations are compiled, so the catalogue is built to reach each one
cheaply: every flag (constexpr) value at one shape, every tile size in fp32 and bf16 (fp16 uses
bf16's tiles: it is compiled at the Llama-3-8B shapes).  The test checks that every kernel and
every boolean constexpr value was reached.
"""

from __future__ import annotations

import torch

from ligerfx.kernels.fp8_matmul import FP8, MIN_CAPABILITY
from ligerfx.kernels.fused_linear_cross_entropy import grads_in_forward
from ligerfx.tools.offline_compile import Chip, op_body

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
LLAMA = 4096
HIDDEN = (3072, 3584, 4096)
WIDE = 16384  # > rms_norm.MAX_FUSED_D: the looped / tiled kernels
VOCABS = (32000, 128256, 152064, 256000)
# (N, K) of quantized linears: Llama-3-8B q/o, k/v, MLP up and down; Qwen2-7B up; Gemma-7B down.
LINEARS = ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (18944, 3584),
           (3072, 24576))
MATMUL_M = (1, 16, 256, 4096)
TOKENS = 4096


def _e(*shape, dtype=BF16):
    return torch.empty(shape, dtype=dtype, device="cuda")


def _rms_case(dt, rows, D, wdt, off, mode):
    rms, rms_b = op_body("liger::rms_norm"), op_body("liger::rms_norm_backward")

    def run():
        x = _e(rows, D, dtype=dt)
        w = None if wdt is None else _e(D, dtype=dt if wdt == "x" else wdt)
        out_dt = torch.promote_types(dt, w.dtype) if w is not None and mode == "llama" else dt
        y, rstd = rms(x, w, 1e-6, off, mode, out_dt)
        rms_b(torch.empty_like(y), x, w, rstd, off, mode, w is not None)
        if w is not None:  # frozen weight: no dW
            rms_b(torch.empty_like(y), x, w, rstd, off, mode, False)
    return f"rms_norm {dt} rows={rows} D={D} w={wdt} offset={off} {mode}", run


def _ln_case(dt, rows, D, has_w, has_b):
    ln, ln_b = op_body("liger::layer_norm"), op_body("liger::layer_norm_backward")

    def run():
        x = _e(rows, D, dtype=dt)
        w = _e(D, dtype=dt) if has_w else None
        b = _e(D, dtype=dt) if has_b else None
        y, mean, rstd = ln(x, w, b, 1e-5, dt)
        ln_b(torch.empty_like(y), x, w, b, mean, rstd, has_w, has_b)
        if has_w:
            ln_b(torch.empty_like(y), x, w, b, mean, rstd, False, False)
    return f"layer_norm {dt} rows={rows} D={D} w={has_w} b={has_b}", run


def _norms():
    # (weight dtype: None = no weight, "x" = x's dtype; offset; casting mode): every flag.
    rms_modes = ((None, 0.0, "llama"), ("x", 0.0, "llama"), ("x", 1.0, "llama"),
                 ("x", 1.0, "fp32"), (FP32, 0.0, "llama"))
    for mode in rms_modes:
        yield _rms_case(BF16, TOKENS, LLAMA, *mode)
    for has in ((True, True), (True, False), (False, False)):
        yield _ln_case(BF16, TOKENS, LLAMA, *has)
    # Tile sizes: QK-norm rows of 128 (16 rows a tile), the model widths, the looped width; one
    # decode row; each dtype.
    for dt, widths in ((BF16, (128, *HIDDEN, WIDE)), (FP32, (128, LLAMA, WIDE)), (FP16, (LLAMA,))):
        for D in widths:
            rows = TOKENS * 32 if D == 128 else TOKENS
            yield _rms_case(dt, rows, D, "x", 0.0, "llama")
            yield _ln_case(dt, rows, D, True, True)
    yield _rms_case(BF16, 1, LLAMA, "x", 0.0, "llama")
    yield _rms_case(BF16, TOKENS, WIDE, None, 0.0, "llama")
    yield _rms_case(BF16, TOKENS, WIDE, "x", 1.0, "fp32")
    yield _ln_case(BF16, 1, LLAMA, True, True)
    yield _ln_case(BF16, TOKENS, WIDE, False, False)


def _add_norms():
    import ligerfx.kernels.add_norm  # noqa: F401 - defines the liger::add_* ops

    rms, rms_b = op_body("liger::add_rms_norm"), op_body("liger::add_rms_norm_backward")
    ln, ln_b = op_body("liger::add_layer_norm"), op_body("liger::add_layer_norm_backward")
    # HAS_RESIDUAL / HAS_DH on (h read elsewhere) and dh None (h read only by the norm), fused
    # and looped widths, each dtype at the Llama width
    for dt, D in ((BF16, LLAMA), (BF16, WIDE), (FP32, LLAMA), (FP16, LLAMA), (BF16, HIDDEN[1])):
        def run(dt=dt, D=D):
            x, r, w = _e(TOKENS, D, dtype=dt), _e(TOKENS, D, dtype=dt), _e(D, dtype=dt)
            y, h, rstd = rms(x, r, w, 1e-6, 0.0, "llama", dt)
            rms_b(torch.empty_like(y), torch.empty_like(h), h, w, rstd, 0.0, "llama", True)
            rms_b(torch.empty_like(y), None, h, w, rstd, 0.0, "llama", True)
            y, h, mean, rstd = ln(x, r, w, w, 1e-5, dt)
            ln_b(torch.empty_like(y), torch.empty_like(h), h, w, w, mean, rstd, True, True)
            ln_b(torch.empty_like(y), None, h, w, w, mean, rstd, True, True)
        yield f"add_rms_norm / add_layer_norm {dt} rows={TOKENS} D={D}", run


def _rope():
    rope, rope_b = op_body("liger::rope"), op_body("liger::rope_backward")
    # (q heads, kv heads, head dim, rotary dim, interleaved): Llama-3 (GQA), Qwen2, Gemma (256),
    # GPT-NeoX-style partial rotary (32 of 128), Phi-2 (32 of 80), interleaved pairs (GPT-J,
    # Llama reference) at 64 and 256.
    layouts = ((32, 8, 128, 128, False), (28, 4, 128, 128, False), (16, 16, 256, 256, False),
               (32, 32, 128, 32, False), (32, 32, 80, 32, False), (16, 16, 256, 64, True),
               (32, 8, 64, 64, True))
    todo = [(BF16, lay, 2, False) for lay in layouts] + [(BF16, layouts[0], 1, False)]
    todo += [(FP32, layouts[0], 2, False), (FP32, layouts[2], 2, False), (FP16, layouts[0], 2, False)]
    # tables in q's dtype, each product rounded as eager rounds it (round_steps)
    todo += [(BF16, layouts[0], 2, True), (FP16, layouts[5], 2, True)]
    todo = [(*case, False) for case in todo]
    # halves_out (DeepSeek-V3 / GLM-4-MoE-Lite's interleave: the 64 rope channels of MLA's 128
    # query heads and its one shared key), fp32 tables and bf16 tables rounded per step
    todo += [(BF16, (128, 1, 64, 64, True), 2, False, True),
             (BF16, (128, 1, 64, 64, True), 2, True, True)]
    todo = [(*case, None) for case in todo]
    # bf16 / fp16 q with fp32 tables, q upcast: the backward rounds each branch to q's dtype
    todo += [(FP32, layouts[0], 2, False, False, BF16), (FP32, layouts[5], 2, False, False, FP16)]
    for dt, (hq, hk, d, r, inter), seq_dim, steps, halves, grad_dt in todo:
        def run(dt=dt, hq=hq, hk=hk, d=d, r=r, inter=inter, seq_dim=seq_dim, steps=steps,
                halves=halves, grad_dt=grad_dt, t=TOKENS):
            shape_q = (1, hq, t, d) if seq_dim == 2 else (1, t, hq, d)
            shape_k = (1, hk, t, d) if seq_dim == 2 else (1, t, hk, d)
            q, k = _e(*shape_q, dtype=dt), _e(*shape_k, dtype=dt)
            cos = _e(t, r // 2 if inter else r, dtype=dt if steps else FP32)
            qo, ko = rope(q, k, cos, cos, seq_dim, inter, steps, halves, grad_dt)
            rope_b(qo, ko, cos, cos, seq_dim, inter, steps, halves, grad_dt)
        yield (f"rope {dt} heads={hq}/{hk} d={d} r={r} inter={inter} seq_dim={seq_dim} "
               f"round_steps={steps}" + (" halves_out" if halves else "")
               + (f" grad_dtype={grad_dt}" if grad_dt else "")), run


def _gated():
    fwd, bwd = op_body("liger::gated_act"), op_body("liger::gated_act_backward")
    todo = [(BF16, n, "silu") for n in (14336, 18944, 24576)]
    todo += [(BF16, 14336, "gelu"), (BF16, 24576, "gelu_tanh"), (FP32, 14336, "silu"),
             (FP16, 14336, "silu"), (BF16, 14336, "relu_sq"), (FP32, 14336, "relu_sq")]
    for dt, n, act in todo:
        def run(dt=dt, n=n, act=act):
            g, u = _e(TOKENS, n, dtype=dt), _e(TOKENS, n, dtype=dt)
            y = fwd(g, u, act)
            bwd(torch.empty_like(y), g, u, act)
        yield f"gated_act {dt} rows={TOKENS} n={n} {act}", run


def _clamped_glu():
    # GPT-OSS-20B/120B experts: gate_up [tokens, 2 * 2880], gate and up its stride-2 halves; the
    # GPT-OSS flags in bf16 and fp16, every flag on in bf16, every flag off in fp32
    fwd, bwd = op_body("liger::clamped_glu"), op_body("liger::clamped_glu_backward")
    gpt_oss = (1.702, None, 7.0, -7.0, 7.0, 1.0)
    todo = [(BF16, gpt_oss), (FP16, gpt_oss), (BF16, (1.5, -7.0, 7.0, -7.0, 7.0, 0.5)),
            (FP32, (1.0, None, None, None, None, None))]
    for dt, args in todo:
        def run(dt=dt, args=args):
            gu = _e(TOKENS, 2 * 2880, dtype=dt)
            g, u = gu[:, ::2], gu[:, 1::2]
            y = fwd(g, u, *args)
            bwd(torch.empty_like(y), g, u, *args)
        yield f"clamped_glu {dt} rows={TOKENS} n=2880 {args}", run


def _act():
    # the non-gated relu² MLP: Nemotron-4-15B (24576) and Nemotron-H-8B (21504) widths
    fwd, bwd = op_body("liger::act"), op_body("liger::act_backward")
    for dt, n in ((BF16, 24576), (BF16, 21504), (FP32, 24576), (FP16, 24576)):
        def run(dt=dt, n=n):
            x = _e(TOKENS, n, dtype=dt)
            y = fwd(x, "relu_sq")
            bwd(torch.empty_like(y), x, "relu_sq")
        yield f"act {dt} rows={TOKENS} n={n} relu_sq", run


def _gated_norm_case(dt, rows, D, wdt, off, mode, gdt, out_dt=None):
    fwd, bwd = op_body("liger::gated_rms_norm"), op_body("liger::gated_rms_norm_backward")

    def run():
        x, g = _e(rows, D, dtype=dt), _e(rows, D, dtype=gdt)
        w = None if wdt is None else _e(D, dtype=dt if wdt == "x" else wdt)
        norm = torch.promote_types(dt, w.dtype) if w is not None and mode == "llama" else \
            (FP32 if w is not None else dt)
        prod = torch.promote_types(norm, gdt)
        y, rstd = fwd(x, w, g, 1e-6, off, mode, norm, prod, out_dt or prod)
        bwd(torch.empty_like(y), x, w, g, rstd, off, mode, norm, prod, w is not None)
        if w is not None:  # frozen weight: no dW
            bwd(torch.empty_like(y), x, w, g, rstd, off, mode, norm, prod, False)
    return f"gated_rms_norm {dt} rows={rows} D={D} w={wdt} offset={off} {mode} gate={gdt}", run


def _gated_norms():
    # Qwen3-Next: per value head (128), 32 heads a token, bf16 norm times silu(gate.float()),
    # cast back to bf16; every flag; Mamba-style channel groups up to the fused limit (8192).
    heads = TOKENS * 32
    yield _gated_norm_case(BF16, heads, 128, "x", 0.0, "llama", FP32, BF16)
    yield _gated_norm_case(BF16, heads, 128, "x", 0.0, "llama", BF16)
    yield _gated_norm_case(BF16, heads, 128, None, 0.0, "llama", FP32, BF16)
    yield _gated_norm_case(BF16, heads, 128, "x", 1.0, "fp32", FP32, BF16)
    yield _gated_norm_case(BF16, heads, 128, "x", 1.0, "llama", BF16)
    yield _gated_norm_case(FP32, heads, 128, FP32, 0.0, "llama", FP32)
    yield _gated_norm_case(FP16, heads, 128, "x", 0.0, "llama", FP32, FP16)
    for D in (1024, 4096, 8192):
        yield _gated_norm_case(BF16, TOKENS, D, "x", 0.0, "llama", FP32, BF16)
    yield _gated_norm_case(FP32, TOKENS, 8192, FP32, 0.0, "llama", FP32)
    yield _gated_norm_case(BF16, 1, 4096, "x", 0.0, "llama", FP32, BF16)


def _losses():
    ce, ce_b = op_body("liger::cross_entropy"), op_body("liger::cross_entropy_backward")
    flce = op_body("liger::fused_linear_cross_entropy")
    flce_b = op_body("liger::fused_linear_cross_entropy_backward")
    # (class weight, label smoothing, z-loss, softcap, reduction): each flag on at least once.
    plain = (False, 0.0, 0.0, 0.0, "mean")
    flavours = (plain, (True, 0.1, 0.0, 0.0, "mean"), (False, 0.0, 1e-4, 30.0, "sum"),
                (True, 0.1, 1e-4, 30.0, "none"))
    todo = [(BF16, 128256, f) for f in flavours] + [(BF16, V, plain) for V in VOCABS]
    todo += [(FP32, 128256, plain), (FP16, 128256, plain)]
    for dt, V, (cw, ls, z, cap, red) in todo:
        def run(dt=dt, V=V, cw=cw, ls=ls, z=z, cap=cap, red=red):
            N = TOKENS
            logits, t = _e(N, V, dtype=dt), _e(N, dtype=torch.int64)
            w = _e(V, dtype=FP32) if cw else None
            loss, _, grad = ce(logits, t, w, -100, red, ls, z, cap, 1.0, True)
            ce_b(torch.empty_like(loss), grad, red)
            ce(logits, t, w, -100, red, ls, z, cap, 1.0, False)
        yield f"cross_entropy {dt} V={V} weight={cw} ls={ls} z={z} cap={cap} {red}", run
    for dt, red in ((BF16, "mean"), (BF16, "none"), (FP32, "mean")):
        # "none": the backward recomputes the chunks with per-row gradient scales.
        def run(dt=dt, V=128256, H=LLAMA, red=red):
            N = TOKENS
            h, W, t = _e(N, H, dtype=dt), _e(V, H, dtype=dt), _e(N, dtype=torch.int64)
            out = flce(h, W, None, t, None, -100, red, 0.0, 0.0, 0.0, 1.0, red == "none")
            # the recompute flag as setup_context sets it: fp16 / bf16 heads save no gradients
            recompute = red == "none" or not grads_in_forward(dt)
            flce_b(torch.empty_like(out[0]), None, out[3], out[4], out[5], out[6], h, W, None,
                   t, None, -100, red, 0.0, 0.0, 0.0, 1.0, recompute, True, True, False, 0)
        yield f"fused_linear_cross_entropy {dt} V=128256 H={LLAMA} {red}", run


def _distillation():
    fld = op_body("liger::fused_linear_distillation")
    fld_b = op_body("liger::fused_linear_distillation_backward")
    dl = op_body("liger::distillation_loss")
    fkl = [0.0, 0.0, 0.0, -1.0, 1.0, 0.0, 0.0]
    jsd = [0.5, 0.0, -0.5, 0.0, 0.5, -0.5, 0.0]
    tvd = [0.0] * 6 + [0.5]
    tvd_sm = tvd + [0.0] * 3 + [1.0]  # ps and pt both spelled softmax (TV_SM)
    fkl_conv = fkl + [1.0, 1.0]  # kl_div's xlogy and log(softmax(teacher)) conventions
    # kl_div(lt, ps): xlogy(ps, ps), ps tested as softmax (1) or as exp(log_softmax) (2)
    rkl_xlogy = [1.0, -1.0] + [0.0] * 7 + [1.0]
    rkl_xlogy_exp = [1.0, -1.0] + [0.0] * 7 + [2.0]
    # (dtype, coefficients, CE mixed in, gradients): every kernel flag value at least once.
    todo = ((BF16, fkl, False, True), (BF16, jsd, True, True), (FP32, tvd, False, True),
            (BF16, fkl, True, False), (BF16, fkl_conv, False, True),
            (BF16, rkl_xlogy, True, True), (FP32, rkl_xlogy_exp, False, True),
            (BF16, tvd_sm, False, True))
    for dt, coefs, ce, grad in todo:
        def run(dt=dt, coefs=coefs, ce=ce, grad=grad, V=128256, H=LLAMA):
            N = TOKENS
            h, W, zt = _e(N, H, dtype=dt), _e(V, H, dtype=dt), _e(N, V, dtype=dt)
            y = _e(N, dtype=torch.int64) if ce else None
            out = fld(h, W, None, zt, None, None, None, None, y, coefs, [0.5, 0.5, 1.0, -0.7, -0.7],
                      0.7, 0.0, 0.3 if ce else 0.0, -100, True, grad, grad, False, 0)
            if grad:
                fld_b(torch.empty_like(out[0]), out[3], out[4], out[5], h, W, None, True, True,
                      False)
        yield f"fused_linear_distillation {dt} V=128256 H={LLAMA} ce={ce} grad={grad}", run

    def run_dl(V=32000):
        z, zt = _e(TOKENS, V), _e(TOKENS, V)
        dl(z, zt, None, None, jsd, [1.0, 1.0, 1.0, -0.7, -0.7], 1.0, 0.0, 0.0, -100, True, True)
    yield "distillation_loss bf16 V=32000", run_dl


def _logprob():
    lp, lp_b = op_body("liger::fused_linear_logprob"), op_body("liger::fused_linear_logprob_backward")
    # (dtype, V, H, softcap, entropy, gradient on log-probs, gradient on entropies, divide by
    # the temperature, entropy spelled lse - E[z], log-prob spelled gather - logsumexp): every
    # flag of both row kernels reached once; Llama-3-8B, Gemma-7B (softcap, 256k) and a 32k vocab.
    todo = ((BF16, 128256, LLAMA, 0.0, False, True, False, False, False, True),
            (BF16, 256000, 3072, 30.0, True, True, True, False, False, False),
            (BF16, 32000, LLAMA, 0.0, True, False, True, True, True, False),
            (FP32, 128256, LLAMA, 0.0, False, True, False, False, False, False))
    for dt, V, H, cap, ent, glp, gent, div, ent_lse, glse in todo:
        def run(dt=dt, V=V, H=H, cap=cap, ent=ent, glp=glp, gent=gent, div=div, ent_lse=ent_lse,
                glse=glse):
            N = TOKENS
            h, W, t = _e(N, H, dtype=dt), _e(V, H, dtype=dt), _e(N, dtype=torch.int64)
            scale = 0.9 if div else 1 / 0.9
            out, e, lse = lp(h, W, None, t, scale, cap, ent, -100, 0, div, ent_lse, glse)
            lp_b(torch.empty_like(out) if glp else None, torch.empty_like(out) if gent else None,
                 h, W, None, t, lse, e, scale, cap, -100, True, True, False, 0, div, ent_lse, glse)
        yield (f"fused_linear_logprob {dt} V={V} H={H} softcap={cap} entropy={ent} "
               f"grad_logprob={glp} grad_entropy={gent} divide={div} entropy_lse={ent_lse} "
               f"gather_lse={glse}"), run


def _matmuls(chip: Chip):
    i8, i4, f8, s24, s24i8 = (op_body(f"liger::{s}_linear")
                              for s in ("int8", "int4", "fp8", "sparse24", "sparse24_int8"))
    fp8 = chip.capability >= MIN_CAPABILITY

    def int8(dt, M, N, K, bias):
        def run():
            x, b = _e(M, K, dtype=dt), (_e(N, dtype=dt) if bias else None)
            i8(x, _e(N, K, dtype=torch.int8), _e(N, dtype=dt), b)
        return f"int8_linear {dt} M={M} N={N} K={K} bias={bias}", run

    def int4(dt, M, N, K, bias, G):
        def run():
            x, b = _e(M, K, dtype=dt), (_e(N, dtype=dt) if bias else None)
            i4(x, _e(N, K // 2, dtype=torch.uint8), _e(N, K // G, dtype=dt), _e(N, K // G, dtype=dt), b)
        return f"int4_linear {dt} M={M} N={N} K={K} G={G} bias={bias}", run

    def fp8_(dt, M, N, K, bias):
        def run():
            x, b = _e(M, K, dtype=dt), (_e(N, dtype=dt) if bias else None)
            f8(x, _e(N, K, dtype=FP8), _e(N, dtype=FP32), b)
        return f"fp8_linear {dt} M={M} N={N} K={K} bias={bias}", run

    def sparse24(dt, M, N, K, bias, int8=False):
        def run():
            x, b = _e(M, K, dtype=dt), (_e(N, dtype=dt) if bias else None)
            meta = _e(N, K // 8, dtype=torch.uint8)
            if int8:
                s24i8(x, _e(N, K // 2, dtype=torch.int8), meta, _e(N, dtype=dt), b)
            else:
                s24(x, _e(N, K // 2, dtype=dt), meta, b)
        return f"sparse24{'_int8' if int8 else ''}_linear {dt} M={M} N={N} K={K} bias={bias}", run

    # Tiles depend on the activation dtype and M (decode / prefill); split-K on N, K and the SM
    # count: every linear shape at every M in bf16 and fp32; fp16 and bias at the Llama shapes.
    for dt in (BF16, FP32):
        for M in MATMUL_M:
            for N, K in LINEARS:
                yield int8(dt, M, N, K, False)
                for G in (32, 64, 128) if (N, K) == LINEARS[0] else (128,):
                    yield int4(dt, M, N, K, False, G)
                if fp8:
                    yield fp8_(dt, M, N, K, False)
                if (N, K) == LINEARS[0]:
                    yield sparse24(dt, M, N, K, False)
                    yield sparse24(dt, M, N, K, False, int8=True)
    for dt, bias in ((FP16, False), (BF16, True)):
        for M in (16, 4096):
            yield int8(dt, M, 4096, 4096, bias)
            yield int4(dt, M, 4096, 4096, bias, 128)
            if fp8:
                yield fp8_(dt, M, 4096, 4096, bias)
            yield sparse24(dt, M, 4096, 4096, bias, int8=bias)


# Chips on which the chip-independent kernels are compiled.  Their launchers read no device
# limits, so their configurations are the same on every chip; the test checks their sm_80
# binaries against the smallest (99 KB) shared-memory budget as well.
ALL_FAMILIES_ON = (80, 90)


def cases(chip: Chip):
    """Every (label, fn) to record on `chip`."""
    if chip.cc in ALL_FAMILIES_ON:
        yield from _norms()
        yield from _add_norms()
        yield from _rope()
        yield from _gated()
        yield from _clamped_glu()
        yield from _act()
        yield from _gated_norms()
        yield from _losses()
        yield from _distillation()
        yield from _logprob()
    yield from _matmuls(chip)
