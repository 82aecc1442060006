"""Benchmark RoPE and SwiGLU at Llama-3-8B shapes: eager (HF-style), torch.compile, liger:: ops,
and Liger-Kernel when it is installed.

For each variant: forward time, forward+backward time, peak memory of forward+backward, and the
achieved bandwidth from the bytes the op must move (same count for every variant, so GB/s compare
like for like).  Also measures, with saved-tensor hooks on a whole gated MLP, how many activation
bytes per token the recompute-in-backward of liger::gated_act saves over eager.

    python benchmarks/bench_rope_gated.py                 # CUDA; on a CPU-only machine: exits 0
    python benchmarks/bench_rope_gated.py --smoke         # tiny sizes on CPU, proves the script runs

Records go to <out>/bench_rope_gated.json as a list of
{benchmark, variant, shape, metric, value, unit, device, versions}.
"""

from __future__ import annotations

import argparse
import os
import sys

if "--smoke" in sys.argv[1:]:
    # Run the Triton kernels in the interpreter on CPU, so the smoke run covers the kernel path;
    # triton reads this when it is first imported (below, via ligerfx.kernels).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from ligerfx.kernels.gated_act import gated_act, geglu, relu_squared, swiglu  # noqa: E402
from ligerfx.kernels.rope import rope  # noqa: E402

# Llama-3-8B
N_Q_HEADS, N_KV_HEADS, HEAD_DIM = 32, 8, 128
HIDDEN, INTERMEDIATE = 4096, 14336
SEQS = (2048, 4096, 8192, 16384)


# ----------------------------------------------------------------------------- timing


def peak_bytes(fn, device):
    """Peak memory allocated by fn() above what was allocated before it, in bytes (CUDA only)."""
    mib = common.peak_memory_mb(fn, device)
    return None if mib is None else round(mib * 2**20)


# ----------------------------------------------------------------------------- variants


def hf_rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def hf_apply_rotary(q, k, cos, sin):
    """transformers' apply_rotary_pos_emb (unsqueeze_dim=1)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + hf_rotate_half(q) * sin, k * cos + hf_rotate_half(k) * sin


def ours_rope(q, k, cos, sin):
    return rope(q, k, cos, sin, 2, False)


def eager_swiglu(gate, up):
    return F.silu(gate) * up


def liger_variants():
    """Liger-Kernel's RoPE and SiLU-mul, or {} when it is not installed."""
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except Exception:
        return {}
    return {"rope": liger_rotary_pos_emb, "swiglu": LigerSiLUMulFunction.apply}


def rope_variants(smoke: bool):
    v = {"eager": hf_apply_rotary, "ours": ours_rope}
    if not smoke:  # inductor on CPU needs a C++ toolchain and minutes; --smoke only proves the script
        v["compile"] = torch.compile(hf_apply_rotary)
    if "rope" in liger_variants():
        v["liger_kernel"] = liger_variants()["rope"]
    return v


def swiglu_variants(smoke: bool):
    v = {"eager": eager_swiglu, "ours": swiglu}
    if not smoke:
        v["compile"] = torch.compile(eager_swiglu)
    if "swiglu" in liger_variants():
        v["liger_kernel"] = liger_variants()["swiglu"]
    return v


# ----------------------------------------------------------------------------- cases


def rope_case(seq, cfg, device, dtype):
    """Inputs as HF builds them: projections viewed to [b, t, h, d] and transposed to [b, h, t, d]."""
    b, hq, hk, d = 1, cfg["hq"], cfg["hk"], cfg["d"]
    q_lin = torch.randn(b, seq, hq * d, device=device, dtype=dtype, requires_grad=True)
    k_lin = torch.randn(b, seq, hk * d, device=device, dtype=dtype, requires_grad=True)
    inv = 1.0 / (500000.0 ** (torch.arange(0, d, 2, device=device).float() / d))
    ang = torch.outer(torch.arange(seq, device=device).float(), inv)
    emb = torch.cat((ang, ang), dim=-1)[None]  # [1, t, d]
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)

    def inputs():
        return (q_lin.view(b, seq, hq, d).transpose(1, 2), k_lin.view(b, seq, hk, d).transpose(1, 2))

    grads = (torch.randn(b, hq, seq, d, device=device, dtype=dtype),
             torch.randn(b, hk, seq, d, device=device, dtype=dtype))
    elt = torch.finfo(dtype).bits // 8
    # Read q and k, write them back, read the cos/sin rows; the backward moves the same amount.
    fwd_bytes = 2 * (q_lin.numel() + k_lin.numel()) * elt + 2 * cos.numel() * elt
    shape = f"b{b}_t{seq}_hq{hq}_hk{hk}_d{d}"
    return shape, (q_lin, k_lin), lambda f: f(*inputs(), cos, sin), grads, fwd_bytes, fwd_bytes


def swiglu_case(seq, cfg, device, dtype):
    n = cfg["inter"]
    gate = torch.randn(seq, n, device=device, dtype=dtype, requires_grad=True)
    up = torch.randn(seq, n, device=device, dtype=dtype, requires_grad=True)
    elt = torch.finfo(dtype).bits // 8
    # fwd: read gate, up; write y.  bwd: read dy, gate, up; write dgate, dup.
    shape = f"t{seq}_n{n}"
    return shape, (gate, up), lambda f: f(gate, up), (torch.randn(seq, n, device=device, dtype=dtype),), \
        3 * gate.numel() * elt, 5 * gate.numel() * elt


def run_case(name, case, variants, device, args, records, meta):
    shape, leaves, call, grads, fwd_bytes, bwd_bytes = case
    for variant, fn in variants.items():
        def fwd(fn=fn):
            with torch.no_grad():
                call(fn)

        def fwd_bwd(fn=fn):
            out = call(fn)
            torch.autograd.grad(out if isinstance(out, tuple) else (out,), leaves, grads)

        try:
            # Without L2 flushes, as these numbers were always taken (keeps them comparable).
            t_f = common.time_ms(fwd, device, args.warmup, args.reps, flush_l2=False)
            t_fb = common.time_ms(fwd_bwd, device, args.warmup, args.reps, flush_l2=False)
            peak = peak_bytes(fwd_bwd, device)
        except Exception as e:  # one broken variant should not lose the others' numbers
            print(f"  {name:7s} {variant:13s} {shape:28s} FAILED: {type(e).__name__}: {e}")
            continue
        gbs_f = common.gbps(fwd_bytes, t_f)
        gbs_fb = common.gbps(fwd_bytes + bwd_bytes, t_fb)
        peak_s = f"{peak / 2**20:9.1f} MiB" if peak is not None else "      n/a"
        print(f"  {name:7s} {variant:13s} {shape:28s} fwd {t_f:8.3f} ms {gbs_f:7.1f} GB/s | "
              f"fwd+bwd {t_fb:8.3f} ms {gbs_fb:7.1f} GB/s | peak {peak_s}")
        for metric, value, unit in (("fwd_time", t_f, "ms"), ("fwd_bwd_time", t_fb, "ms"),
                                    ("fwd_bandwidth", gbs_f, "GB/s"), ("fwd_bwd_bandwidth", gbs_fb, "GB/s"),
                                    ("fwd_bwd_peak_memory", peak, "bytes")):
            if value is not None:
                records.append(common.record(name, variant, shape, metric, value, unit, meta))


# ----------------------------------------------------------------------------- activation memory


class GatedMLP(torch.nn.Module):
    def __init__(self, hidden, inter, act):
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden, inter, bias=False)
        self.up_proj = torch.nn.Linear(hidden, inter, bias=False)
        self.down_proj = torch.nn.Linear(inter, hidden, bias=False)
        self.act = act

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x), self.up_proj(x)))


def saved_activation_bytes(mlp, x) -> int:
    """Bytes of distinct non-parameter tensors autograd saves for backward in mlp(x)."""
    params = {p.data_ptr() for p in mlp.parameters()}
    storages = {}

    def pack(t):
        if t.data_ptr() not in params:
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mlp(x)
    return sum(storages.values())


def activation_memory(cfg, device, dtype, records, meta):
    tokens = 256
    mlp = GatedMLP(cfg["hidden"], cfg["inter"], eager_swiglu).to(device, dtype)
    x = torch.randn(1, tokens, cfg["hidden"], device=device, dtype=dtype, requires_grad=True)
    eager = saved_activation_bytes(mlp, x) / tokens
    mlp.act = swiglu
    ours = saved_activation_bytes(mlp, x) / tokens
    elt = torch.finfo(dtype).bits // 8
    print(f"\nactivation memory saved for backward per token per MLP (hidden {cfg['hidden']} -> "
          f"{cfg['inter']}, {dtype}):")
    print(f"  eager silu(gate) * up : {eager:10.0f} B/token  (x, gate, up, silu(gate), y)")
    print(f"  liger::gated_act      : {ours:10.0f} B/token  (x, gate, up, y; silu recomputed in backward)")
    print(f"  saved                 : {eager - ours:10.0f} B/token  (= intermediate {cfg['inter']} x {elt} B); "
          f"y itself is kept by down_proj either way")
    full = INTERMEDIATE * 2
    print(f"  Llama-3-8B (32 layers, bf16): {full} B/token/layer = "
          f"{full * 32 * 8192 / 2**30:.2f} GiB per 8k-token sequence")
    shape = f"hidden{cfg['hidden']}_inter{cfg['inter']}"
    for variant, v in (("eager", eager), ("ours", ours)):
        records.append(common.record("mlp_saved_activations", variant, shape, "saved_bytes_per_token", v,
                                     "bytes", meta))


# ----------------------------------------------------------------------------- main


def versions():
    v = {"torch": torch.__version__, "python": sys.version.split()[0]}
    for mod in ("triton", "transformers", "liger_kernel"):
        try:
            m = __import__(mod)
            v[mod] = getattr(m, "__version__", "?")
        except Exception:
            pass
    if torch.version.cuda:
        v["cuda"] = torch.version.cuda
    return v


# ----------------------------------------------------------------------------- run.py registry
# benchmarks/run.py discovers OPS and measures them with benchmarks/harness.py.

from harness import Case, OpBench  # noqa: E402

_SMOKE_CFG = dict(hq=4, hk=2, d=64, hidden=32, inter=96)
_FULL_CFG = dict(hq=N_Q_HEADS, hk=N_KV_HEADS, d=HEAD_DIM, hidden=HIDDEN, inter=INTERMEDIATE)


def _cfg(device):
    return _SMOKE_CFG if device.type == "cpu" else _FULL_CFG


def _rope_op_case(seq, device, dtype):
    cfg = _cfg(device)
    b, hq, hk, d = 1, cfg["hq"], cfg["hk"], cfg["d"]
    # Leaves laid out as HF makes them: [b, t, h, d] projections seen as [b, h, t, d].
    q = torch.randn(b, seq, hq, d, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(b, seq, hk, d, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
    inv = 1.0 / (500000.0 ** (torch.arange(0, d, 2, device=device).float() / d))
    ang = torch.outer(torch.arange(seq, device=device).float(), inv)
    emb = torch.cat((ang, ang), dim=-1)[None]
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    elt = q.element_size()
    nbytes = 2 * (q.numel() + k.numel()) * elt + 2 * cos.numel() * elt
    grads = (torch.randn(q.shape, device=device, dtype=dtype), torch.randn(k.shape, device=device, dtype=dtype))
    return Case(f"b{b}_t{seq}_hq{hq}_hk{hk}_d{d}", seq, (q, k, cos, sin), grads, nbytes, nbytes)


def _gated_op_case(seq, device, dtype):
    n = _cfg(device)["inter"]
    gate = torch.randn(seq, n, device=device, dtype=dtype, requires_grad=True)
    up = torch.randn(seq, n, device=device, dtype=dtype, requires_grad=True)
    elt = gate.element_size()
    # fwd: read gate, up; write y.  bwd: read dy, gate, up; write dgate, dup.
    return Case(f"t{seq}_n{n}", seq, (gate, up), (torch.randn_like(gate),),
                3 * gate.numel() * elt, 5 * gate.numel() * elt)


def _eager_geglu(gate, up):
    return F.gelu(gate, approximate="tanh") * up


def _lk_geglu():
    from liger_kernel.ops.geglu import LigerGELUMulFunction
    return LigerGELUMulFunction.apply


def _eager_relu_sq(x):
    return torch.square(F.relu(x))  # transformers' ReLUSquaredActivation (Nemotron)


def _relu_sq_case(seq, device, dtype):
    n = _cfg(device)["inter"]
    x = torch.randn(seq, n, device=device, dtype=dtype, requires_grad=True)
    elt = x.element_size()
    # fwd: read x, write y.  bwd: read dy, x; write dx.
    return Case(f"t{seq}_n{n}", seq, (x,), (torch.randn_like(x),), 2 * x.numel() * elt,
                3 * x.numel() * elt)


def _eager_relu_sq_glu(gate, up):
    return torch.square(F.relu(gate)) * up


OPS = [
    OpBench("rope", "rope", _rope_op_case, SEQS, (16, 32), "tokens", eager=hf_apply_rotary, liger=ours_rope,
            liger_kernel=lambda: liger_variants().get("rope")),
    OpBench("swiglu", "gated_act", _gated_op_case, SEQS, (16, 32), "tokens", eager=eager_swiglu, liger=swiglu,
            liger_kernel=lambda: liger_variants().get("swiglu")),
    OpBench("geglu", "gated_act", _gated_op_case, SEQS, (16,), "tokens", eager=_eager_geglu,
            liger=lambda g, u: geglu(g, u, "tanh"), liger_kernel=_lk_geglu),
    OpBench("relu_sq", "gated_act", _relu_sq_case, SEQS, (16,), "tokens", eager=_eager_relu_sq,
            liger=relu_squared),
    OpBench("relu_sq_glu", "gated_act", _gated_op_case, SEQS, (16,), "tokens", eager=_eager_relu_sq_glu,
            liger=lambda g, u: gated_act(g, u, "relu_sq")),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (no GPU needed)")
    p.add_argument("--seqs", type=int, nargs="+", default=list(SEQS))
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default="benchmarks/results/local")
    args = p.parse_args(argv)

    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        cfg = dict(hq=4, hk=2, d=64, hidden=32, inter=96)
        args.seqs, args.warmup, args.reps = [16, 32], 1, 3
    else:
        if not torch.cuda.is_available():
            print("bench_rope_gated: CUDA is not available; nothing to benchmark (use --smoke to "
                  "check the script on CPU).")
            return 0
        device, dtype = torch.device("cuda"), torch.bfloat16
        cfg = dict(hq=N_Q_HEADS, hk=N_KV_HEADS, d=HEAD_DIM, hidden=HIDDEN, inter=INTERMEDIATE)

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    meta = dict(device=dev_name, versions=versions())
    print(f"device {dev_name}, dtype {dtype}, versions {meta['versions']}")
    if not liger_variants():
        print("Liger-Kernel not importable: its variants are skipped")
    if args.smoke:
        print("--smoke: torch.compile variants skipped; liger:: ops run in Triton's interpreter "
              f"(TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}), timings are meaningless")
    torch.manual_seed(0)
    records: list[dict] = []
    rv, sv = rope_variants(args.smoke), swiglu_variants(args.smoke)
    for seq in args.seqs:
        run_case("rope", rope_case(seq, cfg, device, dtype), rv, device, args, records, meta)
        run_case("swiglu", swiglu_case(seq, cfg, device, dtype), sv, device, args, records, meta)
    activation_memory(cfg, device, dtype, records, meta)

    path = common.write_records(records, args.out, "bench_rope_gated")
    print(f"\n{len(records)} records -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
