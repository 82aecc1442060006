"""Per-op benchmark harness: the registry of op benchmarks and the code that measures them.

An op family plugs in by defining, in a `benchmarks/bench_<family>.py` module, a list
`OPS = [OpBench(...), ...]`; `benchmarks/run.py` imports every such module and measures every
registered op the same way, all variants side by side in one process:

    eager         the op as Hugging Face / plain PyTorch writes it
    inductor      torch.compile(eager) with the default backend
    liger         our liger:: op, called directly
    liger_kernel  Liger-Kernel's implementation, when `liger-kernel` is installed

For each variant and size: median forward and forward+backward time (CUDA events after warm-up),
peak memory of forward+backward from the CUDA allocator, and the achieved GB/s (memory-bound ops)
or TFLOP/s (compute-bound ops) from byte and FLOP counts the op spec gives (the same count for every
variant, so they compare like for like), next to the ceilings measured on the device.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
import common  # noqa: E402

VARIANTS = ("eager", "inductor", "liger", "liger_kernel")


@dataclass
class Case:
    """One size of one op: the arguments every variant is called with, and what it must move."""

    shape: str                      # label stored in the records
    size: float                     # the x-axis of the plots
    args: tuple                     # variant(*args); tensors with requires_grad are differentiated
    grads: Optional[tuple] = None   # grad_outputs; None when the output is a scalar loss
    fwd_bytes: float = 0.0          # bytes an ideal forward reads + writes
    bwd_bytes: float = 0.0          # ... and an ideal backward
    fwd_flops: float = 0.0
    bwd_flops: float = 0.0


@dataclass
class OpBench:
    """An op benchmark: how to build its inputs at each size and its variants."""

    name: str                                   # benchmark name in the records, e.g. "rms_norm"
    family: str                                 # the kernels/<family>.py module it covers
    make_case: Callable[[int, torch.device, torch.dtype], Case]
    sizes: tuple                                # full run (GPU)
    smoke_sizes: tuple                          # --smoke (CPU, tiny)
    size_name: str                              # what the size is: "hidden", "tokens", ...
    eager: Callable
    liger: Callable
    liger_kernel: Optional[Callable[[], Optional[Callable]]] = None  # factory; None if not importable
    bound: str = "memory"                       # "memory" (report GB/s) or "compute" (TFLOP/s)
    dtype: torch.dtype = torch.bfloat16
    smoke_dtype: torch.dtype = torch.float32
    smoke_inductor: bool = False                # the one op whose inductor variant --smoke runs


def discover(names: Optional[list] = None) -> list:
    """Every OpBench in benchmarks/bench_*.py modules (optionally only those named)."""
    ops = []
    for fname in sorted(os.listdir(HERE)):
        if fname.startswith("bench_") and fname.endswith(".py"):
            mod = importlib.import_module(fname[:-3])
            ops.extend(getattr(mod, "OPS", ()))
    if names:
        unknown = set(names) - {o.name for o in ops} - {o.family for o in ops}
        if unknown:
            raise SystemExit(f"unknown op(s) {sorted(unknown)}; registered: {[o.name for o in ops]}")
        ops = [o for o in ops if o.name in names or o.family in names]
    return ops


def kernel_families() -> list:
    """Kernel modules in kernels/ that define liger:: custom ops (each should have a benchmark)."""
    kdir = os.path.join(os.path.dirname(HERE), "kernels")
    out = []
    for fname in sorted(os.listdir(kdir)):
        if fname.endswith(".py") and not fname.startswith("_"):
            with open(os.path.join(kdir, fname)) as f:
                if 'custom_op("liger::' in f.read():
                    out.append(fname[:-3])
    return out


def uncovered_families(ops: list) -> list:
    covered = {o.family for o in ops}
    return [f for f in kernel_families() if f not in covered]


def matmul_tflops(device: torch.device, n: int = 8192, dtype=torch.bfloat16, reps: int = 20) -> float:
    """Achieved TFLOP/s of an n x n x n matmul: a practical ceiling for compute-bound ops."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = common.time_ms(lambda: a @ b, device, warmup=3, reps=reps, flush_l2=False)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def ceilings(device: torch.device, smoke: bool, env: dict) -> tuple[dict, list]:
    """Measured copy bandwidth and matmul throughput of the device, and their records."""
    if smoke:
        bw = common.copy_bandwidth_gbps(device, nbytes=16 << 20, reps=3)
        tf = matmul_tflops(device, n=256, dtype=torch.float32, reps=3)
    else:
        bw = common.copy_bandwidth_gbps(device)
        tf = matmul_tflops(device)
    recs = [common.record("device", "copy", None, "copy_bandwidth", bw, "GB/s", env),
            common.record("device", "matmul", None, "matmul_tflops", tf, "TFLOP/s", env)]
    return {"GB/s": bw, "TFLOP/s": tf}, recs


def variants_of(op: OpBench, smoke: bool) -> dict:
    v = {"eager": op.eager}
    if not smoke or op.smoke_inductor:
        # A fresh wrapper per op: each compiles its own graphs; dynamic=False keeps one graph per size.
        v["inductor"] = torch.compile(op.eager, dynamic=False)
    v["liger"] = op.liger
    if op.liger_kernel is not None:
        try:
            lk = op.liger_kernel()
        except Exception:
            lk = None
        if lk is not None:
            v["liger_kernel"] = lk
    return v


def _leaves(args) -> list:
    return [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]


def _fwd_bwd(fn, case: Case):
    out = fn(*case.args)
    outs = out if isinstance(out, tuple) else (out,)
    grads = case.grads
    if grads is None:
        grads = tuple(None for _ in outs)
    return torch.autograd.grad(outs, _leaves(case.args), grads)


def _fwd(fn, case: Case):
    with torch.no_grad():
        return fn(*case.args)


def measure(op: OpBench, device, smoke: bool, warmup: int, reps: int, env: dict, ceiling: dict,
            log=print) -> list:
    """All variants of op at all its sizes; returns the records (a failed variant is logged)."""
    dtype = op.smoke_dtype if smoke else op.dtype
    sizes = op.smoke_sizes if smoke else op.sizes
    variants = variants_of(op, smoke)
    unit = "GB/s" if op.bound == "memory" else "TFLOP/s"
    records = []
    for i, size in enumerate(sizes):
        torch.manual_seed(0)
        case = op.make_case(size, device, dtype)
        ref = None
        for name, fn in variants.items():
            if name == "inductor" and smoke and i > 0:
                continue  # one inductor compile is enough to prove the path works on CPU
            try:
                t0 = time.perf_counter()
                _fwd_bwd(fn, case)  # compiles / autotunes outside the timed region
                first_s = time.perf_counter() - t0
                out = _fwd(fn, case)
                out0 = (out[0] if isinstance(out, tuple) else out).detach().float()
                ref = out0 if ref is None else ref
                diff = (out0 - ref).abs().max().item()
                t_f = common.time_ms(lambda: _fwd(fn, case), device, warmup, reps)
                t_fb = common.time_ms(lambda: _fwd_bwd(fn, case), device, warmup, reps)
                mem = common.peak_memory_mb(lambda: _fwd_bwd(fn, case), device)
            except torch.OutOfMemoryError:
                log(f"  {op.name:28s} {name:13s} {case.shape:26s} OOM")
                records.append(_rec(op, name, case, "oom", 1, "bool", env))
                continue
            except Exception as e:  # one broken variant should not lose the others' numbers
                log(f"  {op.name:28s} {name:13s} {case.shape:26s} FAILED: {type(e).__name__}: {e}")
                records.append(_rec(op, name, case, "failed", 1, "bool", env))
                continue
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            if unit == "GB/s":
                rate_f = case.fwd_bytes / (t_f * 1e-3) / 1e9
                rate_fb = (case.fwd_bytes + case.bwd_bytes) / (t_fb * 1e-3) / 1e9
            else:
                rate_f = case.fwd_flops / (t_f * 1e-3) / 1e12
                rate_fb = (case.fwd_flops + case.bwd_flops) / (t_fb * 1e-3) / 1e12
            frac = rate_fb / ceiling[unit] if ceiling.get(unit) else None
            rate_name = "bandwidth" if unit == "GB/s" else "tflops"
            for metric, value, u in (("fwd_time", t_f, "ms"), ("fwd_bwd_time", t_fb, "ms"),
                                     (f"fwd_{rate_name}", rate_f, unit),
                                     (f"fwd_bwd_{rate_name}", rate_fb, unit),
                                     ("fwd_bwd_fraction_of_ceiling", frac, "ratio"),
                                     ("fwd_bwd_peak_memory", mem, "MiB"),
                                     ("first_call_time", first_s, "s"),
                                     ("max_abs_diff_vs_eager", diff, "abs")):
                if value is not None:
                    records.append(_rec(op, name, case, metric, value, u, env))
            mem_s = f"{mem:9.1f} MiB" if mem is not None else "      n/a"
            frac_s = f"{100 * frac:5.1f}%" if frac is not None else "  n/a"
            log(f"  {op.name:28s} {name:13s} {case.shape:26s} fwd {t_f:9.3f} ms | fwd+bwd {t_fb:9.3f} ms "
                f"{rate_fb:8.1f} {unit} ({frac_s} of ceiling) | peak {mem_s} | diff {diff:.1e}")
        del case
    return records


def _rec(op: OpBench, variant: str, case: Case, metric, value, unit, env) -> dict:
    r = common.record(op.name, variant, case.shape, metric, value, unit, env)
    r["size"] = case.size
    r["size_name"] = op.size_name
    r["kind"] = "op"
    return r


def op_fields() -> list:
    return [f.name for f in dataclasses.fields(OpBench)]
