"""Where a `liger::` op runs: its Triton kernel (CUDA, or CPU under Triton's interpreter) or torch.

Every op in this package asks `use_triton(tensor)` once per call.  The answer is read at call
time, not import time, so tests can switch between the torch path and the interpreter path in one
process (triton itself must have been imported with TRITON_INTERPRET=1 for the second to work).
"""

from __future__ import annotations

import functools
import os

import torch

# Dtypes the Triton kernels are written for; anything else runs the torch implementation.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def interpreting() -> bool:
    """True when Triton's interpreter is requested (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """Whether to launch the Triton kernel for these (non-None) tensors.

    CUDA tensors use Triton whenever it is installed; CPU tensors only under the interpreter.
    Tensors of a dtype the kernels do not support fall back to torch.
    """
    ts = [t for t in tensors if t is not None]
    if not ts or not triton_available():
        return False
    if any(t.dtype not in KERNEL_DTYPES for t in ts):
        return False
    dev = ts[0].device.type
    if dev == "cuda":
        return True
    return dev == "cpu" and interpreting()


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def num_programs_hint(device: torch.device) -> int:
    """How many programs to spread a row reduction over (SM count on CUDA, small on CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


# ----------------------------------------------------------------------------- CPU decompositions
# On CPU tensors (no interpreter) an op's torch path is a handful of unfused aten calls, each a
# full pass over memory; inductor fuses the same math into one C++ loop.  An op whose kernel buys
# nothing on CPU but speed registers its torch implementation here, and the backend hands these
# to inductor as decompositions when the graph runs on the CPU (see ligerfx/backend.py), so the
# forward and backward ops are inlined and fused.  Ops that also save memory (the chunked lm head
# + loss) do not register: they keep their own CPU path.
_CPU_DECOMPOSITIONS: dict = {}


def cpu_decomposition(*ops):
    """Decorator: `fn` (same signature as each op) is what inductor inlines for `ops` on CPU."""
    def deco(fn):
        for op in ops:
            _CPU_DECOMPOSITIONS[op.default if hasattr(op, "default") else op] = fn
        return fn
    return deco


def cpu_decompositions() -> dict:
    """OpOverload -> torch implementation, for every registered op (a copy)."""
    return dict(_CPU_DECOMPOSITIONS)
