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


@functools.lru_cache(maxsize=None)
def triton_version() -> tuple[int, int]:
    """(major, minor) of the installed triton, (0, 0) without one: launchers that must pick a
    different configuration for an older triton's code generation ask this."""
    try:
        import triton
    except Exception:
        return (0, 0)
    major, minor = (int("".join(c for c in p if c.isdigit()) or 0)
                    for p in (triton.__version__.split(".") + ["0"])[:2])
    return (major, minor)


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
# forward and backward ops are inlined and fused.  Ops whose own CPU path also saves memory (the
# chunked lm head + loss) register only for the calls where it does not (their decomposition
# declines the others with NotImplemented, and `applies` tells the backend which calls those are).
_CPU_DECOMPOSITIONS: dict = {}
_APPLIES: dict = {}


def cpu_decomposition(*ops, applies=None):
    """Decorator: `fn` (same signature as each op) is what inductor inlines for `ops` on CPU.

    `applies(*args, **kwargs)`, given the same arguments (fake tensors), says which calls `fn`
    covers (see cpu_path): it is the one test, asked by the backend before handing the table to
    inductor and by the decomposition itself, which declines (NotImplemented: the op stays a
    call of its own CPU implementation) wherever `applies` answers False."""
    def deco(fn):
        for op in ops:
            key = op.default if hasattr(op, "default") else op
            _CPU_DECOMPOSITIONS[key] = fn
            if applies is not None:
                _APPLIES[key] = applies
        return fn
    return deco


def cpu_path(op, args, kwargs) -> str | None:
    """How `op`'s CPU decomposition covers a call with these arguments, in the report's words,
    or None where it does not (the op's own CPU implementation runs).

    `applies` may answer True (decomposed), False, or a string describing a split (part
    decomposed, part the op's own)."""
    if op not in _CPU_DECOMPOSITIONS:
        return None
    check = _APPLIES.get(op)
    verdict = True if check is None else check(*args, **kwargs)
    if verdict is True:
        return "CPU: decomposed for inductor"
    return f"CPU: {verdict}" if verdict else None


def cpu_decompositions() -> dict:
    """OpOverload -> torch implementation, for every registered op (a copy), each giving its
    outputs the strides the op's fake implementation declares (see _in_op_layout)."""
    return {op: _in_op_layout(op, _covering(op, fn)) for op, fn in _CPU_DECOMPOSITIONS.items()}


def _covering(op, fn):
    check = _APPLIES.get(op)
    if check is None:
        return fn

    @functools.wraps(fn)
    def covered(*args, **kwargs):
        return fn(*args, **kwargs) if check(*args, **kwargs) else NotImplemented

    return covered


def _fake_impl(op):
    try:
        from torch._library.simple_registry import singleton

        kernel = singleton.find(op._schema.name).fake_impl.kernel
        return kernel.func if kernel is not None else None
    except Exception:  # a torch without this registry: the decomposition's own layout
        return None


def _in_op_layout(op, fn):
    """`fn` with each output restrided to the op's declared layout.

    A torch implementation may lay its result out differently from the op (RoPE's is contiguous
    where the op's output follows q's strides, e.g. the [b, t, h, d] order of a transposed
    projection); the code after it was traced against the op's layout, so inductor would add a
    copy there (before the attention's output projection, once per layer). Restriding at the
    source instead lets inductor write the fused result in that order directly.
    """
    fake = _fake_impl(op)
    if fake is None:
        return fn

    @functools.wraps(fn)
    def decomposed(*args, **kwargs):
        from ligerfx.graph.layout import restride_plan

        out = fn(*args, **kwargs)
        if out is NotImplemented:  # the op's own implementation runs instead
            return out
        want = fake(*args, **kwargs)
        single = isinstance(out, torch.Tensor)
        outs, wants = ((out,), (want,)) if single else (out, want)
        fixed = []
        for o, w in zip(outs, wants):
            try:
                order = restride_plan(w, o) if isinstance(o, torch.Tensor) else None
            except ValueError:  # not a dense layout: leave it to inductor
                order = None
            if order is not None:
                inverse = sorted(range(len(order)), key=order.__getitem__)
                o = o.permute(order).contiguous().permute(inverse)
            fixed.append(o)
        return fixed[0] if single else type(out)(fixed)

    return decomposed
