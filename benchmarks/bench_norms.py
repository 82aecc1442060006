"""Benchmark RMSNorm and LayerNorm: eager, torch.compile (inductor), liger:: ops, Liger-Kernel.

Also the residual add + norm (`add_rms_norm`, `add_layer_norm`, via benchmarks/run.py): the fused
op against the eager pair, inductor compiling the pair, and (`add_rms_norm_unfused`, liger
variant) `rms_norm` after an inductor-compiled add; `add_norm_bytes` gives the bytes each moves.

For hidden sizes 1024..16384 (4096 rows, bf16), each variant's forward and forward+backward time,
their peak memory, and the achieved bandwidth from the bytes the op must move (one count for every
variant, so GB/s compare like for like), next to the device's measured copy bandwidth.

    python benchmarks/bench_norms.py            # CUDA; on a CPU-only machine it says so and exits 0
    python benchmarks/bench_norms.py --smoke    # tiny sizes on CPU (Triton interpreter): proves it runs

Records go to <out>/bench_norms.json: a list of
{benchmark, variant, shape, metric, value, unit, device, torch, triton, ...}.
"""

import argparse
import os
import sys

if "--smoke" in sys.argv[1:]:
    # Smoke runs the kernels in Triton's interpreter on CPU; triton reads this when first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from ligerfx.kernels.add_norm import add_layer_norm, add_rms_norm  # noqa: E402
import ligerfx.kernels.gated_rms_norm  # noqa: E402,F401 - liger::gated_rms_norm
from ligerfx.kernels.layer_norm import layer_norm  # noqa: E402
from ligerfx.kernels.rms_norm import rms_norm  # noqa: E402

HIDDEN_SIZES = (1024, 2048, 4096, 8192, 16384)
ROWS = 4096
EPS = 1e-6


class HFLlamaRMSNorm(nn.Module):
    """The eager Llama RMSNorm as HF transformers writes it (fp32 statistics, cast, then weight)."""

    def __init__(self, hidden, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class LigerFxRMSNorm(HFLlamaRMSNorm):
    def forward(self, x):
        return rms_norm(x, self.weight, self.variance_epsilon, casting_mode="llama")


class LigerFxLayerNorm(nn.LayerNorm):
    def forward(self, x):
        return layer_norm(x, self.weight, self.bias, self.eps)


def liger_kernel_modules():
    try:
        from liger_kernel.transformers import LigerLayerNorm, LigerRMSNorm
    except Exception:
        return None
    return LigerRMSNorm, LigerLayerNorm


def variants(op: str, device, with_compile: bool) -> dict:
    """name -> factory(hidden) returning a module (weights set later, identically for all)."""
    if op == "rms_norm":
        out = {"eager": lambda h: HFLlamaRMSNorm(h, EPS), "ligerfx": lambda h: LigerFxRMSNorm(h, EPS)}
        if with_compile:
            out["torch_compile"] = lambda h: torch.compile(HFLlamaRMSNorm(h, EPS))
    else:
        out = {"eager": lambda h: nn.LayerNorm(h, eps=EPS), "ligerfx": lambda h: LigerFxLayerNorm(h, eps=EPS)}
        if with_compile:
            out["torch_compile"] = lambda h: torch.compile(nn.LayerNorm(h, eps=EPS))
    liger = liger_kernel_modules() if device.type == "cuda" else None
    if liger is not None:
        rms_cls, ln_cls = liger
        out["liger_kernel"] = (lambda h: rms_cls(h, eps=EPS)) if op == "rms_norm" else (lambda h: ln_cls(h, eps=EPS))
    return out


def bytes_moved(op: str, rows: int, hidden: int, elem: int, p_elem: int) -> tuple[int, int]:
    """Bytes an ideal kernel reads+writes: forward (x, params -> y) and forward+backward
    (plus dy, x, params -> dx, param grads).  Saved per-row statistics are negligible and left out."""
    n_params = 1 if op == "rms_norm" else 2
    act = rows * hidden * elem
    fwd = 2 * act + n_params * hidden * p_elem
    bwd = 3 * act + 2 * n_params * hidden * p_elem
    return fwd, fwd + bwd


def bench_case(op, rows, hidden, device, dtype, factories, args, env, records):
    shape = (rows, hidden)
    x = torch.randn(shape, device=device, dtype=dtype)
    dy = torch.randn_like(x)
    gen = torch.Generator().manual_seed(0)
    weight = (1.0 + 0.1 * torch.randn(hidden, generator=gen)).to(device, dtype)
    bias = (0.1 * torch.randn(hidden, generator=gen)).to(device, dtype)
    y_eager = None
    for name, make in factories.items():
        m = make(hidden).to(device=device, dtype=dtype)
        with torch.no_grad():
            for pname, p in m.named_parameters():
                p.copy_(weight if pname.endswith("weight") else bias)
        params = list(m.parameters())
        xg = x.detach().clone().requires_grad_()
        dy_v = dy.clone()  # Liger-Kernel's in-place backward overwrites dy

        def fwd():
            return m(xg)

        def fwd_bwd():
            return torch.autograd.grad(m(xg), [xg, *params], dy_v)

        fwd_bwd()  # compiles / autotunes outside the timed region
        y = fwd().detach().float()
        if y_eager is None:
            y_eager = y
        max_diff = (y - y_eager).abs().max().item()
        t_f = common.time_ms(fwd, device, args.warmup, args.reps)
        t_fb = common.time_ms(fwd_bwd, device, args.warmup, args.reps)
        mem_f = common.peak_memory_mb(fwd, device)
        mem_fb = common.peak_memory_mb(fwd_bwd, device)
        b_f, b_fb = bytes_moved(op, rows, hidden, x.element_size(), params[0].element_size())
        results = [
            ("fwd_time", t_f, "ms"), ("fwd_bwd_time", t_fb, "ms"),
            ("fwd_bandwidth", common.gbps(b_f, t_f), "GB/s"), ("fwd_bwd_bandwidth", common.gbps(b_fb, t_fb), "GB/s"),
            ("fwd_peak_memory", mem_f, "MiB"), ("fwd_bwd_peak_memory", mem_fb, "MiB"),
            ("max_abs_diff_vs_eager", max_diff, "abs"),
        ]
        for metric, value, unit in results:
            if value is not None:
                records.append(common.record(op, name, shape, metric, value, unit, env))
        mem = f"{mem_fb:9.1f}" if mem_fb is not None else "      n/a"
        print(f"{op:10s} {hidden:6d} {name:14s} {t_f:9.4f} {t_fb:9.4f} {common.gbps(b_f, t_f):9.1f} "
              f"{common.gbps(b_fb, t_fb):9.1f} {mem} {max_diff:9.2e}")
        del m, xg


# ----------------------------------------------------------------------------- run.py registry
# benchmarks/run.py discovers OPS and measures them with benchmarks/harness.py (functional
# variants: the weights are arguments, so every variant sees the same tensors).

from harness import Case, OpBench  # noqa: E402


def _eager_rms(x, w):
    dt = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
    return w * h.to(dt)


def _eager_ln(x, w, b):
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b, EPS)


def _lk_rms():
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    return lambda x, w: LigerRMSNormFunction.apply(x, w, EPS, 0.0, "llama", False)


def _lk_ln():
    from liger_kernel.ops.layer_norm import LigerLayerNormFunction
    return lambda x, w, b: LigerLayerNormFunction.apply(x, w, b, EPS)


def _norm_case(op):
    def make(hidden, device, dtype, rows=None):
        rows = rows or (16 if device.type == "cpu" else ROWS)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=True)
        w = (1.0 + 0.1 * torch.randn(hidden, generator=gen)).to(device, dtype).requires_grad_()
        args = (x, w)
        if op == "layer_norm":
            args += ((0.1 * torch.randn(hidden, generator=gen)).to(device, dtype).requires_grad_(),)
        f, fb = bytes_moved(op, rows, hidden, x.element_size(), w.element_size())
        return Case(f"r{rows}_h{hidden}", hidden, args, (torch.randn_like(x),), f, fb - f)
    return make


def add_norm_bytes(rows: int, hidden: int, elem: int, p_elem: int, n_params: int = 1,
                   fused: bool = True) -> tuple[int, int]:
    """(forward, backward) bytes of the residual add + norm.  Fused: x, residual -> h, y, then
    dy, dh, h -> dx (= dresidual).  The unfused pair moves h once more each way: the add
    (x, residual -> h), the norm (h -> y); the norm's backward (dy, h -> dnorm) and autograd's
    sum (dnorm, dh -> dx)."""
    act = rows * hidden * elem
    params = n_params * hidden * p_elem
    if fused:
        return 4 * act + params, 4 * act + 2 * params
    return 5 * act + params, 6 * act + 2 * params


def _eager_add_rms(x, r, w):
    h = x + r
    return _eager_rms(h, w), h


def _eager_add_ln(x, r, w, b):
    h = x + r
    return _eager_ln(h, w, b), h


_compiled_add = None


def _rms_after_compiled_add(x, r, w):
    global _compiled_add
    if _compiled_add is None:
        _compiled_add = torch.compile(lambda a, b: a + b, dynamic=False)
    h = _compiled_add(x, r)
    return rms_norm(h, w, EPS, casting_mode="llama"), h


def _add_norm_case(op, fused=True):
    def make(hidden, device, dtype, rows=None):
        rows = rows or (16 if device.type == "cpu" else ROWS)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=True)
        r = torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=True)
        w = (1.0 + 0.1 * torch.randn(hidden, generator=gen)).to(device, dtype).requires_grad_()
        args = (x, r, w)
        if op == "layer_norm":
            args += ((0.1 * torch.randn(hidden, generator=gen)).to(device, dtype).requires_grad_(),)
        f, b = add_norm_bytes(rows, hidden, x.element_size(), w.element_size(), len(args) - 2, fused)
        return Case(f"r{rows}_h{hidden}", hidden, args, (torch.randn_like(x), torch.randn_like(x)), f, b)
    return make


def _eager_gated_rms(x, w, gate):
    """transformers' Qwen3NextRMSNormGated (norm, weight, then silu(gate.float()), cast back)."""
    dt = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
    h = (w * h.to(dt)) * torch.nn.functional.silu(gate.to(torch.float32))
    return h.to(dt)


def _liger_gated_rms(x, w, gate):
    # the dtypes the pattern derives for the Qwen3-Next code: bf16 norm, fp32 product, bf16 out
    return torch.ops.liger.gated_rms_norm(x, w, gate.float(), EPS, 0.0, "llama", x.dtype,
                                          torch.float32, x.dtype)[0]


def _gated_norm_case(hidden, device, dtype):
    # Qwen3-Next normalises per value head (128 wide, 32 heads a token): keep rows x hidden fixed
    rows = 16 if device.type == "cpu" else ROWS * max(1, 4096 // hidden)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=True)
    gate = torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=True)
    w = (1.0 + 0.1 * torch.randn(hidden, generator=gen)).to(device, dtype).requires_grad_()
    act, p = rows * hidden * x.element_size(), hidden * w.element_size()
    # fwd: read x, gate, w; write y.  bwd: read dy, x, gate, w; write dx, dgate, dw.
    return Case(f"r{rows}_h{hidden}", hidden, (x, w, gate), (torch.randn_like(x),), 3 * act + p,
                5 * act + 2 * p)


OPS = [
    OpBench("add_rms_norm", "add_norm", _add_norm_case("rms_norm"), HIDDEN_SIZES, (64,), "hidden",
            eager=_eager_add_rms, liger=lambda x, r, w: add_rms_norm(x, r, w, EPS, casting_mode="llama")),
    OpBench("add_rms_norm_unfused", "add_norm", _add_norm_case("rms_norm", fused=False), HIDDEN_SIZES,
            (64,), "hidden", eager=_eager_add_rms, liger=_rms_after_compiled_add),
    OpBench("add_layer_norm", "add_norm", _add_norm_case("layer_norm"), HIDDEN_SIZES, (64,), "hidden",
            eager=_eager_add_ln, liger=lambda x, r, w, b: add_layer_norm(x, r, w, b, EPS)),
    OpBench("rms_norm", "rms_norm", _norm_case("rms_norm"), HIDDEN_SIZES, (64, 200), "hidden",
            eager=_eager_rms, liger=lambda x, w: rms_norm(x, w, EPS, casting_mode="llama"),
            liger_kernel=_lk_rms, smoke_inductor=True),
    OpBench("layer_norm", "layer_norm", _norm_case("layer_norm"), HIDDEN_SIZES, (64, 200), "hidden",
            eager=_eager_ln, liger=lambda x, w, b: layer_norm(x, w, b, EPS), liger_kernel=_lk_ln),
    OpBench("gated_rms_norm", "gated_rms_norm", _gated_norm_case, (128, 1024, 4096, 8192), (64, 200),
            "hidden", eager=_eager_gated_rms, liger=_liger_gated_rms),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(parser)
    parser.add_argument("--ops", default="rms_norm,layer_norm", help="comma-separated: rms_norm,layer_norm")
    parser.add_argument("--sizes", default=None, help="comma-separated hidden sizes")
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    args = parser.parse_args(argv)

    device = common.pick_device(args.smoke, "bench_norms")
    if device is None:
        return 0
    if args.smoke:
        sizes, rows, dtype = (64, 200), 16, torch.bfloat16
        args.warmup, args.reps = 1, 3
    else:
        sizes, rows, dtype = HIDDEN_SIZES, ROWS, torch.bfloat16
    if args.sizes:
        sizes = tuple(int(s) for s in args.sizes.split(","))
    rows = args.rows or rows
    common.raise_recompile_limit()
    torch.manual_seed(0)
    env = common.environment(device)
    records = []
    copy_bw = common.copy_bandwidth_gbps(device, nbytes=(1 << 30) if device.type == "cuda" else (64 << 20))
    records.append(common.record("device", "copy", None, "copy_bandwidth", copy_bw, "GB/s", env))
    print(f"{env['device']}: torch {env['torch']}, triton {env['triton']}; y.copy_(x) bandwidth {copy_bw:.1f} GB/s")
    if device.type == "cuda" and liger_kernel_modules() is None:
        print("liger_kernel not importable: its variants are skipped")
    print(f"{'op':10s} {'hidden':>6s} {'variant':14s} {'fwd ms':>9s} {'f+b ms':>9s} {'fwd GB/s':>9s} "
          f"{'f+b GB/s':>9s} {'f+b MiB':>9s} {'|y-eager|':>9s}")
    for op in args.ops.split(","):
        factories = variants(op, device, with_compile=not args.no_compile)
        for hidden in sizes:
            bench_case(op, rows, hidden, device, dtype, factories, args, env, records)
    path = common.write_records(records, args.out, "bench_norms")
    print(f"{len(records)} records -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
