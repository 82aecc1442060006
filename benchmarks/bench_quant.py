"""Benchmark the low-bit linears (int8 / int4 weight-only, fp8 W8A8, 2:4 sparse [+int8]) against bf16.

Per op, for the Llama-3-8B linear shapes (out x in: 4096x4096, 14336x4096, 4096x14336) at decode
(M = 1, 4, 16 rows) and prefill (M = 2048) in bf16:

    bf16            F.linear(x, W)                      (cuBLAS)
    <s>_eager       dequantize the packed weight, then F.linear (fp8: also fake-quantize x)
    <s>_inductor    torch.compile of <s>_eager
    <s>_liger       the liger::<s>_linear op
    <s>_torchao     torchao's matching scheme (compiled), when torchao is importable

with the median forward time, the achieved GB/s from the bytes an ideal kernel moves (packed weight,
scales, x, y: decode is bound by them) and TFLOP/s (prefill).  The 2:4 schemes ("2:4", "2:4+int8";
variants sparse24_* and sparse24_int8_*) run on the weight magnitude-pruned to 2:4: their error is
against `bf16_24` (F.linear with that pruned weight), their bytes count values, positions and
scales, and their TFLOP/s count the dense 2MNK (the kernel expands each tile and executes them
all).  End to end: forward only, under torch.no_grad(), of a Llama-3-8B-shaped model cut to
--layers decoder layers, decode (1 token, no KV cache: it streams every weight once) and prefill
(2048 tokens), compiled with backend="liger" and options quantize=int8/int4/fp8 against bf16
(inductor, and liger without quantization); the 2:4 variants go through `ligerfx.sparsify_` first
(lossy pruning).  The lm head stays bf16 (skipped by default).  fp8 needs compute capability 8.9+.

    python benchmarks/bench_quant.py            # CUDA; on a CPU-only machine it says so and exits 0
    python benchmarks/bench_quant.py --smoke    # tiny sizes on CPU (Triton interpreter): proves it runs

Records go to <out>/bench_quant.json.  benchmarks/run.py also measures int8/int4/fp8 linear (its
OPS below: eager dequantize + F.linear vs the liger op, forward and input-gradient backward).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if "--smoke" in sys.argv[1:]:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from harness import Case, OpBench  # noqa: E402

from ligerfx.kernels import fp8_matmul, int4_matmul, int8_matmul, sparse24_matmul  # noqa: E402

SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336))  # (out N, in K) of Llama-3-8B's linears
DECODE_M = (1, 4, 16)  # the issue asks for M = 1, 16, 256, 4096; 4 is a common decode batch
PREFILL_M = (256, 2048, 4096)
SCHEMES = ("int8", "int4", "fp8", "2:4", "2:4+int8")
SPARSE = {"2:4": "sparse24", "2:4+int8": "sparse24_int8"}  # scheme -> variant / op name prefix
GROUP = 128


def variant_of(scheme: str) -> str:
    return SPARSE.get(scheme, scheme)


def fp8_supported(device) -> bool:
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= fp8_matmul.MIN_CAPABILITY


# ----------------------------------------------------------------------------- the three schemes


def pack(scheme, w, group):
    """Packed tensors of w (the 2:4 schemes prune it first, see `weight_for`)."""
    if scheme == "2:4":
        return sparse24_matmul.pack_24(weight_for(scheme, w))
    if scheme == "2:4+int8":
        return sparse24_matmul.pack_24_int8(weight_for(scheme, w), w.dtype)
    if scheme == "int8":
        return int8_matmul.pack_int8(w, w.dtype)
    if scheme == "int4":
        return int4_matmul.pack_int4(w, group, w.dtype)
    return fp8_matmul.pack_fp8(w)


def weight_for(scheme, w):
    """The dense weight a scheme serves: w, or w magnitude-pruned to 2:4."""
    return sparse24_matmul.prune_24(w) if scheme in SPARSE else w


def eager_fn(scheme):
    """Plain PyTorch: dequantize, then F.linear (fp8: x fake-quantized per token, straight-through)."""
    if scheme in SPARSE:
        return lambda x, v, m, *s: F.linear(x, sparse24_matmul.unpack_24(v, m, *s, dtype=x.dtype))
    if scheme == "int8":
        return lambda x, q, s: F.linear(x, int8_matmul.unpack_int8(q, s, x.dtype))
    if scheme == "int4":
        return lambda x, q, s, o: F.linear(x, int4_matmul.unpack_int4(q, s, o, x.dtype))

    def fp8(x, q, s):
        xq, xs = fp8_matmul.quantize_rows_reference(x.reshape(-1, x.shape[-1]).detach())
        xd = (xq.float() * xs[:, None]).to(x.dtype).reshape(x.shape)
        return F.linear(x + (xd - x).detach(), fp8_matmul.unpack_fp8(q, s, x.dtype))
    return fp8


def liger_fn(scheme):
    return {"int8": int8_matmul.int8_linear, "int4": int4_matmul.int4_linear,
            "fp8": fp8_matmul.fp8_linear, "2:4": sparse24_matmul.sparse24_linear,
            "2:4+int8": sparse24_matmul.sparse24_int8_linear}[scheme]


def nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def torchao_linear(scheme, w):
    """A compiled nn.Linear quantized by torchao's matching config, or None."""
    if scheme in SPARSE:  # not compared here
        return None
    try:
        import torchao.quantization as tq
    except Exception:
        return None
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    names = {"int8": ("Int8WeightOnlyConfig", "int8_weight_only"),
             "int4": ("Int4WeightOnlyConfig", "int4_weight_only"),
             "fp8": ("Float8DynamicActivationFloat8WeightConfig", "float8_dynamic_activation_float8_weight")}
    try:
        for name in names[scheme]:
            make = getattr(tq, name, None)
            if make is not None:
                cfg = make(group_size=GROUP) if scheme == "int4" else make()
                tq.quantize_(lin, cfg)
                return torch.compile(lin)
    except Exception as e:
        print(f"torchao {scheme}: {type(e).__name__}: {e}")
    return None


# ----------------------------------------------------------------------------- per op


def bench_ops(device, shapes, ms, schemes, args, env, records, with_compile, with_torchao):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"{'shape NxK':12s} {'M':>5s} {'variant':14s} {'ms':>9s} {'GB/s':>8s} {'TFLOP/s':>8s} {'|y-bf16|/|y|':>12s}")
    for N, K in shapes:
        torch.manual_seed(0)
        w = (torch.randn(N, K, device=device) * 0.02).to(dtype)
        packed = {s: pack(s, w, GROUP if K % GROUP == 0 else 32) for s in schemes}
        for M in ms:
            x = torch.randn(M, K, device=device, dtype=dtype)
            io_bytes = nbytes(x) + M * N * x.element_size()
            runs = [("bf16", lambda: F.linear(x, w), nbytes(w))]
            if any(s in SPARSE for s in schemes):  # the reference of the 2:4 variants
                runs.append(("bf16_24", lambda w24=weight_for("2:4", w): F.linear(x, w24), nbytes(w)))
            for s in schemes:
                wb = nbytes(*packed[s])
                eager = eager_fn(s)
                v = variant_of(s)
                runs.append((f"{v}_eager", lambda e=eager, p=packed[s]: e(x, *p), wb))
                if with_compile:
                    comp = torch.compile(eager, dynamic=False)
                    runs.append((f"{v}_inductor", lambda c=comp, p=packed[s]: c(x, *p), wb))
                runs.append((f"{v}_liger", lambda f=liger_fn(s), p=packed[s]: f(x, *p), wb))
                ao = torchao_linear(s, w) if with_torchao else None
                if ao is not None:
                    runs.append((f"{v}_torchao", lambda m=ao: m(x), wb))
            refs = {}
            for name, fn, wbytes in runs:
                try:
                    with torch.no_grad():
                        y = fn().float()
                        if name in ("bf16", "bf16_24"):
                            refs[name] = y
                        ref = refs["bf16_24" if name.startswith("sparse24") else "bf16"]
                        err = ((y - ref).norm() / ref.norm()).item()
                        t = common.time_ms(lambda: fn(), device, args.warmup, args.reps)
                except Exception as e:
                    print(f"{N}x{K:<7d} {M:5d} {name:14s} FAILED: {type(e).__name__}: {e}")
                    records.append(common.record("quant_linear", name, (M, N, K), "failed", 1, "bool", env))
                    continue
                gbs = common.gbps(wbytes + io_bytes, t)
                tfl = 2 * M * N * K / (t * 1e-3) / 1e12
                for metric, value, unit in (("fwd_time", t, "ms"), ("fwd_bandwidth", gbs, "GB/s"),
                                            ("fwd_tflops", tfl, "TFLOP/s"), ("rel_l2_vs_bf16", err, "ratio")):
                    records.append(common.record("quant_linear", name, (M, N, K), metric, value, unit, env))
                print(f"{N}x{K:<7d} {M:5d} {name:14s} {t:9.4f} {gbs:8.1f} {tfl:8.2f} {err:12.2e}")


# ----------------------------------------------------------------------------- end to end


def bench_e2e(device, layers, smoke, schemes, args, env, records):
    import e2e

    dtype = torch.float32 if smoke else torch.bfloat16
    inner = "aot_eager" if smoke else "inductor"
    group = 32 if smoke else GROUP
    phases = (("decode", 1, 1), ("prefill", 1, 32 if smoke else 2048))
    # (inductor compiles take ~15 s on a CPU: the smoke run keeps liger without quantization)
    variants = ([] if smoke else [("bf16_inductor", None)]) + [("bf16_liger", {})]
    variants += [(f"{variant_of(s)}_liger", {} if s in SPARSE else
                  {"quantize": s, **({"group_size": group} if s == "int4" else {})}) for s in schemes]
    if smoke:  # the op table covers 2:4+int8; one sparsify_'d model proves the e2e path
        variants = [v for v in variants if v[0] != "sparse24_int8_liger"]
    sparsify = {f"{variant_of(s)}_liger": s for s in schemes if s in SPARSE}
    print(f"\nend to end: llama3_8b-shaped, {layers} layers, forward under no_grad, {dtype}")
    for vname, opts in variants:
        torch._dynamo.reset()
        model, _, vocab = e2e.build("llama3_8b", layers, smoke, device, dtype)
        model.eval().requires_grad_(False)
        if vname in sparsify:  # prune + compress the weights; the graph then calls the 2:4 ops
            import ligerfx

            ligerfx.sparsify_(model, sparsify[vname])
        fn = (torch.compile(model) if opts is None else
              torch.compile(model, backend="liger", options={"inner": inner, "log_report": False, **opts}))
        wbytes = nbytes(*model.parameters())
        stored = wbytes + nbytes(*model.buffers())  # + packed weights of sparsify_'d linears
        for phase, batch, seq in phases:
            ids = torch.randint(3, vocab, (batch, seq), device=device)
            try:
                with torch.no_grad():
                    t0 = time.perf_counter()
                    fn(input_ids=ids)
                    common.sync(device)
                    first = time.perf_counter() - t0
                    t = common.time_ms(lambda: fn(input_ids=ids), device, min(args.warmup, 3),
                                       min(args.reps, 10), flush_l2=False)
            except Exception as e:
                print(f"  {vname:14s} {phase:8s} FAILED: {type(e).__name__}: {e}")
                records.append(common.record("quant_e2e", vname, phase, "failed", 1, "bool", env))
                continue
            tps = batch * seq / (t * 1e-3)
            for metric, value, unit in (("fwd_time", t, "ms"), ("tokens_per_s", tps, "tokens/s"),
                                        ("first_call_time", first, "s"),
                                        ("bf16_weight_bytes", wbytes, "B"),
                                        ("stored_weight_bytes", stored, "B")):
                records.append(common.record("quant_e2e", vname, phase, metric, value, unit, env))
            print(f"  {vname:14s} {phase:8s} {t:9.3f} ms  {tps:10.1f} tokens/s  (first call {first:.1f} s)")
        del model, fn
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- run.py registry


def _case(scheme):
    """Inputs of one run.py size (the 2:4 schemes prune the weight inside `pack`)."""
    def make(M, device, dtype):
        N, K = (14336, 4096) if device.type == "cuda" else (48, 64)
        group = GROUP if device.type == "cuda" else 32
        w = (torch.randn(N, K, device=device) * 0.02).to(dtype)
        packed = pack(scheme, w, group)
        x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
        act = (M * K + M * N) * x.element_size()
        fwd = nbytes(*packed) + act
        return Case(f"m{M}_n{N}_k{K}", M, (x, *packed), (torch.randn(M, N, device=device, dtype=dtype),),
                    fwd_bytes=fwd, bwd_bytes=fwd, fwd_flops=2 * M * N * K, bwd_flops=2 * M * N * K)
    return make


OPS = [OpBench(f"{variant_of(s)}_linear", "sparse24_matmul" if s in SPARSE else f"{s}_matmul", _case(s),
               DECODE_M + PREFILL_M, (1, 20), "rows", eager=eager_fn(s), liger=liger_fn(s))
       for s in SCHEMES]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(parser)
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the e2e model")
    parser.add_argument("--no-e2e", action="store_true")
    parser.add_argument("--no-compile", action="store_true", help="skip the inductor variants")
    args = parser.parse_args(argv)
    device = common.pick_device(args.smoke, "bench_quant")
    if device is None:
        return 0
    if args.smoke:
        device = torch.device("cpu")
        args.warmup, args.reps = 0, 1
    schemes = [s for s in args.schemes.split(",") if s]
    if "fp8" in schemes and not fp8_supported(device):
        print(f"fp8 skipped: needs compute capability 8.9+ ({torch.cuda.get_device_name(device)})")
        schemes.remove("fp8")
    common.raise_recompile_limit()
    env = common.environment(device)
    records = []
    print(f"{env['device']}: torch {env['torch']}, triton {env['triton']}"
          + ("; --smoke: CPU, timings mean nothing" if args.smoke else ""))
    if args.smoke:
        bench_ops(device, ((48, 64),), (1, 20), schemes, args, env, records, False, False)
    else:
        bench_ops(device, SHAPES, DECODE_M + PREFILL_M, schemes, args, env, records,
                  not args.no_compile, True)
    if not args.no_e2e:
        bench_e2e(device, 1 if args.smoke else args.layers, args.smoke, schemes, args, env, records)
    path = common.write_records(records, args.out, "bench_quant")
    print(f"{len(records)} records -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
