"""Compile the Triton kernels for real GPUs on a machine that has none, and check their resources.

Three steps, each usable alone:

- `record(chip)`: a context in which CUDA tensors are fake (FakeTensorMode: shapes, dtypes and
  strides, no memory), `torch.cuda` reports the device properties of `chip`, and every Triton
  launch (`JITFunction.run`) is recorded as a `Launch` (kernel, arguments, grid, launch options)
  instead of run.  Calling a launcher or a `liger::` op body inside it records exactly the launch
  configurations that launcher picks for that shape on that chip.
- `compile_launch(launch, chip)`: binds the recorded arguments through Triton's own specialisation
  (the signature, constexprs and alignment attributes a real launch would produce) and compiles
  them with `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`: PTX through the
  ptxas bundled in the triton wheel, no driver needed.  Triton's on-disk cache makes reruns cheap.
- `check(resources, chip)`: shared memory, registers, spills (stack frame from the bundled
  `cuobjdump -res-usage`), threads per block and grid against the chip's limits.

Only the launch machinery is here; which shapes to record is the caller's (tests/gpu_compile/).
It must run in a process where triton was imported with TRITON_INTERPRET unset or 0 (interpreted
kernels cannot be compiled): `python -m ligerfx.tools.offline_compile` re-executes itself that way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import tempfile
import types
from typing import Any, Callable, Iterator, Optional
from unittest import mock

import torch


@dataclasses.dataclass(frozen=True)
class Chip:
    """The device properties a launcher may read, and the limits a kernel must respect."""
    name: str
    cc: int  # compute capability as Triton writes it (90 = 9.0)
    sms: int
    smem_optin: int  # bytes of shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin)
    regs_per_block: int = 65536
    max_threads: int = 1024
    total_memory: int = 80 << 30

    @property
    def capability(self) -> tuple[int, int]:
        return divmod(self.cc, 10)

    def properties(self) -> Any:
        """An object with the attributes of torch.cuda.get_device_properties(...)."""
        major, minor = self.capability
        return types.SimpleNamespace(
            name=self.name, major=major, minor=minor, multi_processor_count=self.sms,
            shared_memory_per_block_optin=self.smem_optin, shared_memory_per_block=48 << 10,
            total_memory=self.total_memory, regs_per_multiprocessor=65536, warp_size=32,
            max_threads_per_multi_processor=2048 if self.cc in (80, 90) else 1536,
            L2_cache_size=50 << 20, gcnArchName="")


# One chip per shared-memory class the kernels must fit (figures from NVIDIA's tuning guides).
CHIPS = {
    "sm_90": Chip("NVIDIA H100 80GB HBM3 (simulated)", 90, 132, 227 << 10),
    "sm_80": Chip("NVIDIA A100-SXM4-80GB (simulated)", 80, 108, 163 << 10),
    # sm_86 (A10, RTX 30) and sm_89 (L4, L40S, RTX 40) both allow 99 KB per block; sm_89 also
    # has fp8 tensor cores, so it stands for both.
    "sm_89": Chip("NVIDIA L4 (simulated)", 89, 58, 99 << 10, total_memory=24 << 30),
}


# ----------------------------------------------------------------------------- recording


@dataclasses.dataclass(frozen=True)
class TensorArg:
    """What Triton's specialisation reads from a tensor argument: dtype and pointer alignment."""
    dtype: torch.dtype
    ptr: int  # a stand-in address with the real one's alignment (allocations are 256-aligned)

    def data_ptr(self) -> int:
        return self.ptr


@dataclasses.dataclass
class Launch:
    kernel: Any  # the JITFunction
    args: tuple
    kwargs: dict
    grid: tuple[int, int, int]
    label: str = ""  # what the caller was recording (for messages)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def constexprs(self) -> dict:
        """Constexpr parameter name -> value, positional or keyword."""
        out = {}
        for p, v in zip(self.kernel.params, self.args):
            if p.is_constexpr:
                out[p.name] = v
        for k, v in self.kwargs.items():
            if any(p.name == k and p.is_constexpr for p in self.kernel.params):
                out[k] = v
        return out


def _stand_in(a):
    if isinstance(a, torch.Tensor):
        offset = a.storage_offset() * a.element_size()
        return TensorArg(a.dtype, 1 << 20 if offset % 16 == 0 else (1 << 20) + 8)
    return a


def _grid3(grid, bound) -> tuple[int, int, int]:
    if callable(grid):
        grid = grid(bound)
    g = tuple(int(v) for v in grid) + (1, 1)
    return g[0], g[1], g[2]


@contextlib.contextmanager
def record(chip: Chip, label: Callable[[], str] = lambda: "") -> Iterator[list[Launch]]:
    """Fake CUDA tensors on `chip`; yields the list every Triton launch inside is appended to."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []

    def fake_run(self, *args, grid, warmup, **kwargs):
        if warmup:
            return None
        launches.append(Launch(self, tuple(_stand_in(a) for a in args), dict(kwargs),
                               _grid3(grid, args), label()))
        return None

    props = chip.properties()
    real_tensor = torch.tensor

    def tensor(data, *, device=None, **kwargs):
        # FakeTensorMode keeps small constants real, which fails on a device this torch has no
        # backend for: give such a constant its shape and dtype only (launchers never read it).
        t = real_tensor(data, **kwargs)
        if device is None or torch.device(device).type != "cuda":
            return t
        return torch.empty(t.shape, dtype=t.dtype, device=device)

    def getitem(self, idx):
        # Indexing a tensor enters a device guard in C++ before dispatch, and this torch has no
        # CUDA: spell the basic indexing launchers use (ints, slices, None, ..., one integer
        # index tensor) with view ops, which dispatch to the fake kernels.
        return _index(self, idx)

    patches = [
        mock.patch.object(torch, "tensor", tensor),
        mock.patch.object(torch.Tensor, "__getitem__", getitem),
        mock.patch.object(JITFunction, "run", fake_run),
        mock.patch.object(torch.cuda, "is_available", lambda: True),
        mock.patch.object(torch.cuda, "device_count", lambda: 1),
        mock.patch.object(torch.cuda, "current_device", lambda: 0),
        mock.patch.object(torch.cuda, "get_device_properties", lambda device=None: props),
        mock.patch.object(torch.cuda, "get_device_capability", lambda device=None: chip.capability),
        mock.patch.object(torch.cuda, "get_device_name", lambda device=None: chip.name),
    ]
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        stack.enter_context(FakeTensorMode(allow_non_fake_inputs=False))
        yield launches


def _index(t: torch.Tensor, idx) -> torch.Tensor:
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(i is Ellipsis for i in idx):
        k = idx.index(Ellipsis)
        n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
        idx = idx[:k] + (slice(None),) * (t.dim() - n_real) + idx[k + 1:]
    dim = 0
    for i in idx:
        if i is None:
            t = t.unsqueeze(dim)
            dim += 1
        elif isinstance(i, slice):
            start, stop, step = i.indices(t.shape[dim])
            t = t.narrow(dim, start, max(0, stop - start))
            if step != 1:
                size, stride = list(t.shape), list(t.stride())
                size[dim], stride[dim] = -(-size[dim] // step), stride[dim] * step
                t = t.as_strided(size, stride, t.storage_offset())
            dim += 1
        elif isinstance(i, torch.Tensor) and i.dtype != torch.bool:
            t = torch.index_select(t, dim, i.reshape(-1))
            t = t.unflatten(dim, i.shape) if i.dim() else t.squeeze(dim)
            dim += i.dim()
        elif isinstance(i, int):
            t = t.select(dim, i)
        else:
            raise NotImplementedError(f"offline recording: index {i!r} is not supported")
    return t


def op_body(qualname: str) -> Callable:
    """The Python implementation of a custom op ("liger::rms_norm"): under FakeTensorMode the op
    itself would dispatch to its fake impl, the body runs the real launcher code."""
    from torch._library.custom_ops import OPDEFS

    try:
        return OPDEFS[qualname]._init_fn
    except (KeyError, AttributeError) as e:
        raise LookupError(f"{qualname} is not a torch.library.custom_op defined in this process "
                          f"(import its module first)") from e


# ----------------------------------------------------------------------------- compiling


@dataclasses.dataclass
class Resources:
    kernel: str
    chip: str
    config: str  # constexprs, warps and stages, for messages
    shared: int  # bytes: dynamic (Triton's) + static
    regs: int
    stack: int  # bytes of stack frame: > 0 means spilled registers (Triton allocates no arrays)
    threads: int
    grid: tuple[int, int, int]
    labels: list[str] = dataclasses.field(default_factory=list)


def _bin(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} is not bundled with this triton ({triton.__version__}) at "
                                f"{path}; the offline compile needs the Linux x86-64 triton wheel")
    return path


def _res_usage(cubin: bytes) -> dict[str, int]:
    """REG / STACK / SHARED / LOCAL of the (single) kernel in a cubin, via cuobjdump -res-usage."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([_bin("cuobjdump"), "-res-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}


def bind(launch: Launch, chip: Chip):
    """(target, signature, constexprs, attrs, options) a real launch of `launch` on `chip` binds."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", chip.cc, 32)
    backend = make_backend(target)
    fn = launch.kernel
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound,
                                                          specialization, options)
    return target, signature, constexprs, attrs, options


def config_key(launch: Launch, chip: Chip) -> tuple:
    """Launches with equal keys use the same launch configuration: kernel, chip, argument types,
    constexprs, warps and stages.  Only the integer arguments' alignment specialisations (which
    change vector widths, not tiles) may differ between them; one of them is compiled."""
    _, signature, constexprs, _, options = bind(launch, chip)
    return (launch.name, chip.cc, repr(sorted(signature.items())), repr(sorted(constexprs.items())),
            options.num_warps, options.num_stages)


def compile_launch(launch: Launch, chip: Chip) -> Resources:
    import triton
    from triton.compiler import ASTSource

    target, signature, constexprs, attrs, options = bind(launch, chip)
    kernel = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=target,
                            options=options.__dict__)
    use = _res_usage(kernel.asm["cubin"])
    cfg = ", ".join(f"{k}={v}" for k, v in launch.constexprs().items())
    cfg += f", num_warps={kernel.metadata.num_warps}, num_stages={kernel.metadata.num_stages}"
    return Resources(launch.name, f"sm_{chip.cc}", cfg, kernel.metadata.shared + use.get("SHARED", 0),
                     use.get("REG", 0), use.get("STACK", 0) + use.get("LOCAL", 0),
                     kernel.metadata.num_warps * 32, launch.grid, [launch.label])


def check(res: Resources, chip: Chip, grid: Optional[tuple[int, int, int]] = None) -> list[str]:
    """Every limit `res` (launched with `grid`) breaks on `chip`, as readable lines."""
    grid = grid or res.grid
    where = f"{res.kernel} on {res.chip} [{res.config}]"
    bad = []
    if res.shared > chip.smem_optin:
        bad.append(f"{where}: {res.shared} B shared memory > {chip.smem_optin} B per block")
    if res.stack > 0:
        bad.append(f"{where}: {res.stack} B stack frame (register spills), {res.regs} registers")
    if res.threads > chip.max_threads:
        bad.append(f"{where}: {res.threads} threads per block > {chip.max_threads}")
    if res.regs * res.threads > chip.regs_per_block:
        bad.append(f"{where}: {res.regs} registers x {res.threads} threads > {chip.regs_per_block}")
    if not (0 < grid[0] < 2**31 and 0 < grid[1] < 2**16 and 0 < grid[2] < 2**16):
        bad.append(f"{where}: grid {grid} outside (2^31-1, 65535, 65535)")
    return bad


# ----------------------------------------------------------------------------- driver


def kernels_defined(package: str = "ligerfx.kernels") -> dict[str, Any]:
    """Every launchable `@triton.jit` kernel of a package (by convention named `*_kernel`)."""
    import importlib
    import pkgutil

    from triton.runtime.jit import JITFunction

    pkg = importlib.import_module(package)
    out = {}
    for m in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{package}.{m.name}")
        for name, v in vars(mod).items():
            if isinstance(v, JITFunction) and v.__module__ == mod.__name__ and name.endswith("_kernel"):
                out[name] = v
    return out


_WORK: list = []  # what forked compile workers read (launches hold kernels, which do not pickle)


def _compile_one(i: int) -> Resources:
    return compile_launch(*_WORK[i])


def _compile_many(work: list, log, t0: float) -> list[Resources]:
    """compile_launch over `work` in forked worker processes (LIGERFX_COMPILE_JOBS, default: the
    CPU count): Triton's compile is mostly single-threaded C++ and ptxas."""
    import multiprocessing
    import time

    jobs = int(os.environ.get("LIGERFX_COMPILE_JOBS", "0")) or len(os.sched_getaffinity(0))
    _WORK[:] = work
    out = []
    if jobs <= 1:
        it = map(_compile_one, range(len(work)))
        pool = None
    else:
        pool = multiprocessing.get_context("fork").Pool(jobs)
        it = pool.imap(_compile_one, range(len(work)))
    try:
        for res in it:
            out.append(res)
            if len(out) % 50 == 0:
                log(f"compiled {len(out)}/{len(work)} ({time.time() - t0:.1f} s)")
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        _WORK.clear()
    return out


def run_all(cases: Callable[[Chip], Any], chips: dict[str, Chip], log=print) -> dict:
    """Record `cases(chip)` on every chip, compile each distinct launch once, check limits.

    Returns a JSON-serialisable report: `configs` (one Resources per distinct binary), `problems`
    (limit violations), `coverage` (kernel -> constexpr -> values seen), `recorded` (kernel ->
    chips), `launches`, `seconds`."""
    import time

    t0 = time.time()
    distinct: dict[tuple, tuple[Launch, Chip, list[tuple[int, int, int]]]] = {}
    coverage: dict[str, dict[str, set]] = {}
    recorded: dict[str, set] = {}
    n_launches = 0
    for chip_name, chip in chips.items():
        current = [""]
        with record(chip, label=lambda: current[0]) as launches:
            for label, fn in cases(chip):
                current[0] = label
                try:
                    fn()
                except Exception as e:  # a launcher that fails on a fake tensor is a finding too
                    raise RuntimeError(f"recording {label!r} on {chip_name} failed: {e}") from e
        n_launches += len(launches)
        for ln in launches:
            recorded.setdefault(ln.name, set()).add(chip_name)
            for k, v in ln.constexprs().items():
                coverage.setdefault(ln.name, {}).setdefault(k, set()).add(repr(v))
            key = config_key(ln, chip)
            if key in distinct:
                distinct[key][2].append(ln.grid)
                if len(distinct[key][0].label) < 2000:
                    distinct[key][0].label += "; " + ln.label
            else:
                distinct[key] = (ln, chip, [ln.grid])
    log(f"recorded {n_launches} launches, {len(distinct)} distinct binaries "
        f"({time.time() - t0:.1f} s)")
    items = list(distinct.values())
    configs, problems = [], []
    for i, res in enumerate(_compile_many([(ln, chip) for ln, chip, _ in items], log, t0)):
        ln, chip, grids = items[i]
        res.labels = [ln.label]
        configs.append(res)
        for g in sorted(set(grids)):
            for p in check(res, chip, g):
                if p not in problems:
                    problems.append(p)
                    log(f"PROBLEM {p}  (from: {ln.label[:200]})")
    return {
        "configs": [dataclasses.asdict(c) for c in configs],
        "problems": problems,
        "coverage": {k: {p: sorted(v) for p, v in d.items()} for k, d in coverage.items()},
        "recorded": {k: sorted(v) for k, v in recorded.items()},
        "launches": n_launches,
        "seconds": round(time.time() - t0, 1),
    }


def _load_cases(path: str) -> Callable:
    import importlib.util

    spec = importlib.util.spec_from_file_location("_offline_cases", path)
    if spec is None:
        raise FileNotFoundError(f"no cases file at {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.cases


def main(argv=None) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(description="Compile every kernel at the launch configurations "
                                 "its launchers pick, for GPUs that are not here, and check limits.")
    ap.add_argument("cases", help="a .py file defining cases(chip) -> (label, fn) pairs")
    ap.add_argument("--chips", default=",".join(CHIPS), help=f"comma-separated, of {list(CHIPS)}")
    ap.add_argument("--json", help="write the report here")
    ap.add_argument("--only", help="record only the cases whose label matches this regex")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        ap.error("TRITON_INTERPRET=1 makes every kernel an interpreted function; run with "
                 "TRITON_INTERPRET=0")
    unknown = [c for c in args.chips.split(",") if c not in CHIPS]
    if unknown:
        ap.error(f"unknown chip(s) {unknown}; choose from {list(CHIPS)}")
    kernels_defined()  # imports every kernel module
    cases = _load_cases(args.cases)
    if args.only:
        pattern, every = re.compile(args.only), cases
        cases = lambda chip: ((lb, fn) for lb, fn in every(chip) if pattern.search(lb))  # noqa: E731
    report = run_all(cases, {c: CHIPS[c] for c in args.chips.split(",")})
    report["kernels_defined"] = sorted(kernels_defined())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    worst = {}
    for c in report["configs"]:
        k = (c["kernel"], c["chip"])
        w = worst.setdefault(k, [0, 0, 0])
        w[0], w[1], w[2] = max(w[0], c["shared"]), max(w[1], c["regs"]), max(w[2], c["stack"])
    for (k, chip), (sh, rg, st) in sorted(worst.items()):
        print(f"{chip} {k:28s} max shared {sh / 1024:6.1f} KB  max regs {rg:3d}  max stack {st}")
    print(f"{len(report['configs'])} binaries, {len(report['problems'])} problems, "
          f"{report['seconds']} s")
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
