"""Shared benchmark helpers: timing, peak memory, copy bandwidth, result records, environment info.

Used by the benchmarks/bench_*.py scripts (run them as `python benchmarks/bench_x.py`; this
directory is then on sys.path).  Timings are medians of per-call CUDA-event times after warm-up,
with L2 flushed before each call so the achieved GB/s reflect HBM traffic, not cache hits.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Optional

import torch

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "local")

_l2_flush_buffer: dict = {}


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder for the JSON results")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, CPU allowed: proves the script runs")
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls before timing")
    parser.add_argument("--reps", type=int, default=50, help="timed calls (the median is reported)")


def pick_device(smoke: bool, script: str) -> Optional[torch.device]:
    """CUDA when there is one; CPU under --smoke; otherwise None (print why; the caller exits 0)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if smoke:
        return torch.device("cpu")
    print(f"{script}: no CUDA device, nothing to benchmark (use --smoke for a tiny CPU run that "
          "only checks the script works)")
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _flush_l2(device: torch.device) -> None:
    # Writing a buffer larger than L2 (H100: 50 MB) evicts whatever the previous call left there.
    buf = _l2_flush_buffer.get(device)
    if buf is None:
        buf = _l2_flush_buffer[device] = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=device)
    buf.zero_()


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int = 10, reps: int = 50,
            flush_l2: bool = True) -> float:
    """Median time of one fn() call in milliseconds (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            if flush_l2:
                _flush_l2(device)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak CUDA memory fn() allocates beyond what was live before it, in MiB (None on CPU).

    Whatever fn returns is dropped inside the measurement, so outputs count only while alive.
    """
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Achieved bandwidth of y.copy_(x) on a large buffer: a practical ceiling for memory-bound ops."""
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x), device, warmup=3, reps=reps, flush_l2=False)
    return 2 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def environment(device: torch.device) -> dict:
    """Device name and library versions, stored with every record."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or 'unknown'})"
    return dict(device=name, torch=torch.__version__, triton=triton_version, cuda=torch.version.cuda,
                python=sys.version.split()[0])


def record(benchmark: str, variant: str, shape, metric: str, value, unit: str, env: dict) -> dict:
    """One result; shape is a tuple of sizes (stored as a list), a label string, or None."""
    if shape is not None and not isinstance(shape, str):
        shape = list(shape)
    return dict(benchmark=benchmark, variant=variant, shape=shape, metric=metric, value=value, unit=unit,
                **env)


def write_records(records: list, out_dir: str, name: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(records, f, indent=1)
    return path


def raise_recompile_limit(n: int = 64) -> None:
    """Each benchmarked size compiles its own graph; keep dynamo from giving up and running eager."""
    import torch._dynamo.config as cfg

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), n))
